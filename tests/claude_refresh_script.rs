//! packaging/claude-refresh (shipped as /usr/libexec/cred-watch/claude-refresh):
//! runs the CLI until the file's expiresAt has moved. A fake CLI writes a
//! new expiresAt on its Nth run, as the real one does when its background
//! refresh wins the race with its exit.
use std::path::Path;
use std::process::Command;

/// What a run of the script is given.
struct Case<'a> {
    /// CLAUDE_SECURESTORAGE_CONFIG_DIR (None: unset; "": set empty).
    dir_var: Option<&'a str>,
    /// The credentials file before.
    initial: &'a str,
    /// On the fake CLI's run number `.0`, the file becomes `.1`.
    write: Option<(u32, String)>,
    /// Extra environment.
    env: &'a [(&'a str, &'a str)],
}

impl Default for Case<'_> {
    fn default() -> Self {
        Case {
            dir_var: None,
            initial: r#"{"claudeAiOauth":{"accessToken":"x","expiresAt":1000}}"#,
            write: None,
            env: &[],
        }
    }
}

/// The file the CLI writes after a refresh (or after invalid_grant: 0).
fn refreshed(expires_at: i64) -> String {
    format!(r#"{{"claudeAiOauth":{{"expiresAt": {expires_at}}}}}"#)
}

/// Runs the script with a fake CLI. Returns (exit code, stdout + stderr,
/// runs of the CLI).
fn run_case(case: Case) -> (i32, String, u32) {
    let home = tempfile::tempdir().unwrap();
    let creds_dir = match case.dir_var {
        Some(d) if !d.is_empty() => home.path().join(d),
        _ => home.path().join(".claude"),
    };
    std::fs::create_dir_all(&creds_dir).unwrap();
    let file = creds_dir.join(".credentials.json");
    std::fs::write(&file, case.initial).unwrap();
    let cli = home.path().join("fake-claude");
    let runs = home.path().join("runs");
    let write = case.write.map_or(String::new(), |(on_run, text)| {
        let after = home.path().join("after.json");
        std::fs::write(&after, text).unwrap();
        format!(
            "[ \"$n\" -ge {on_run} ] && cp '{}' '{}'",
            after.display(),
            file.display()
        )
    });
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = 'auth status' ] || exit 9\nn=$(( $(cat '{r}' 2>/dev/null || echo 0) + 1 )); echo $n > '{r}'\n{write}\nexit 0\n",
            r = runs.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&cli).status().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/claude-refresh");
    let mut cmd = Command::new("sh");
    cmd.arg(script)
        .arg(&cli)
        .env("HOME", home.path())
        .env("CLAUDE_REFRESH_TRIES", "4")
        .env("CLAUDE_REFRESH_DELAY", "0")
        .env_remove("CLAUDE_CONFIG_DIR")
        .env_remove("CLAUDE_SECURESTORAGE_CONFIG_DIR");
    if let Some(d) = case.dir_var {
        let value = if d.is_empty() {
            String::new()
        } else {
            home.path().join(d).display().to_string()
        };
        cmd.env("CLAUDE_SECURESTORAGE_CONFIG_DIR", value);
    }
    cmd.envs(case.env.iter().copied());
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = std::fs::read_to_string(&runs).map_or(0, |s| s.trim().parse().unwrap());
    (out.status.code().unwrap_or(-1), text, runs)
}

/// The common case: on run `on_run` the CLI writes expiresAt `new`.
fn run(dir_var: Option<&str>, on_run: u32, new: Option<i64>) -> (i32, String, u32) {
    run_case(Case {
        dir_var,
        write: new.map(|n| (on_run, refreshed(n))),
        ..Case::default()
    })
}

#[test]
fn runs_the_cli_again_until_expires_at_moves() {
    let (code, out, runs) = run(None, 3, Some(2000));
    assert_eq!((code, runs), (0, 3), "{out}");
    assert!(out.contains("refreshed the token (attempt 3)"), "{out}");
}

#[test]
fn gives_up_after_the_tries_when_nothing_moves_or_moves_back() {
    let (code, out, runs) = run(None, 1, None);
    assert_eq!((code, runs), (1, 4), "{out}");
    assert!(
        out.contains("did not refresh") && out.contains("in 4 attempts"),
        "{out}"
    );
    // An older expiresAt (a rewrite by someone else) is not a refresh.
    let (code, _, runs) = run(None, 1, Some(500));
    assert_eq!((code, runs), (1, 4));
}

#[test]
fn an_emptied_file_stops_at_once_and_says_log_in_again() {
    let (code, out, runs) = run(None, 2, Some(0));
    assert_eq!((code, runs), (1, 2), "{out}");
    assert!(
        out.contains("its refresh was refused): log in again"),
        "{out}"
    );
}

#[test]
fn follows_the_cli_choice_of_directory() {
    let (code, out, _) = run(Some("store"), 1, Some(2000));
    assert_eq!(code, 0, "CLAUDE_SECURESTORAGE_CONFIG_DIR: {out}");
    // Empty counts as unset: ~/.claude.
    let (code, out, _) = run(Some(""), 1, Some(2000));
    assert_eq!(code, 0, "empty CLAUDE_SECURESTORAGE_CONFIG_DIR: {out}");
}

/// The file also holds MCP servers' tokens with expiresAt of their own:
/// only claudeAiOauth's counts, in whichever order the keys come.
#[test]
fn only_the_expires_at_of_claude_ai_oauth_counts() {
    let mcp_first = r#"{"mcpOAuth":{"s":{"accessToken":"m","expiresAt":0}},"claudeAiOauth":{"accessToken":"x","expiresAt":1000}}"#;
    let after = r#"{"mcpOAuth":{"s":{"accessToken":"m","expiresAt":0}},"claudeAiOauth":{"accessToken":"y","expiresAt":2000}}"#;
    let (code, out, runs) = run_case(Case {
        initial: mcp_first,
        write: Some((2, after.into())),
        ..Case::default()
    });
    assert_eq!(
        (code, runs),
        (0, 2),
        "a real refresh behind an MCP entry: {out}"
    );
    // After invalid_grant the CLI may leave no claudeAiOauth at all; an MCP
    // token expiring later is not a refresh.
    let (code, out, runs) = run_case(Case {
        initial: mcp_first,
        write: Some((
            1,
            r#"{"mcpOAuth":{"s":{"accessToken":"m","expiresAt":999999}}}"#.into(),
        )),
        ..Case::default()
    });
    assert_eq!((code, runs), (1, 1), "{out}");
    assert!(out.contains("log in again"), "{out}");
}

/// Typos in the numbers or the CLI's path end the script at once, saying so.
#[test]
fn bad_numbers_fall_back_and_a_missing_cli_is_named() {
    let (code, out, runs) = run_case(Case {
        env: &[
            ("CLAUDE_REFRESH_TRIES", "6x"),
            ("CLAUDE_REFRESH_DELAY", "0"),
        ],
        ..Case::default()
    });
    assert_eq!((code, runs), (1, 6), "the default 6 tries: {out}");
    let out = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/claude-refresh"))
        .arg("/nonexistent/claud")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/claud: not found"), "{err}");
}
