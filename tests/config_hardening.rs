//! Issue 9, items 5, 7, 8 and 9: configuration bounds. Each is an exit-78
//! configuration error that names file, line and key and never repeats the
//! contents of the file (which may be a credentials file or a system file).
mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

/// Line numbers below refer to this file.
const BASE: &str = r#"[agent]
state_dir = "{ROOT}/state"
settle = "100ms"

[[watch]]
name = "claude"
source = "{ROOT}/home/.claude/.credentials.json"

[watch.permissions]
file_mode = "0644"

[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"
mode = "0640"

[watch.restart]
units = ["bridge.service"]
min_interval = "0s"
"#;

/// A second watch whose copy's `dest` is on line 25.
const SECOND: &str = r#"
[[watch]]
name = "bot"
source = "{ROOT}/bot/.credentials.json"

[[watch.copy]]
dest = "DEST"
"#;

fn check(env: &Env, config: &Path) -> (i32, String, String) {
    env.cmd(&["check", "--config", config.to_str().unwrap()])
}

/// `check` exits 78 naming `<config>:<line>: key `<key>``, gives `reason`,
/// and shows none of `hidden`.
fn assert_refused(env: &Env, text: &str, line: usize, key: &str, reason: &str, hidden: &[&str]) {
    let config = env.config(text);
    let (code, _, stderr) = check(env, &config);
    let want = format!("{}:{line}: key `{key}`", config.display());
    assert_eq!(code, 78, "{text}\n{stderr}");
    assert!(stderr.contains(&want), "expected {want:?} in:\n{stderr}");
    assert!(stderr.contains(reason), "expected {reason:?} in:\n{stderr}");
    for h in hidden {
        assert!(!stderr.contains(h), "{h:?} is quoted:\n{stderr}");
    }
}

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

/// Item 5: `check --config` on a credentials file names file and line and
/// prints no token (compact and pretty JSON).
#[test]
fn credentials_file_as_config_is_not_quoted() {
    let env = Env::new();
    let compact = creds(1);
    let pretty = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(&creds(2)).unwrap(),
    )
    .unwrap();
    for text in [compact, pretty] {
        let path = env.path("etc/claude.json");
        fs::write(&path, &text).unwrap();
        // `cmd` itself fails on any `sk-ant-` in the output.
        let (code, stdout, stderr) = check(&env, &path);
        assert_eq!(code, 78, "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains(&format!("{}:1:", path.display())),
            "{stderr}"
        );
        for h in [
            "test-access",
            "test-refresh",
            "claudeAiOauth",
            "accessToken",
            "mcp-",
        ] {
            assert!(!stderr.contains(h), "{h:?} is quoted:\n{stderr}");
        }
    }
}

/// Item 5: a drop-in that is a symlink (here to a shadow-like file) is
/// refused without being read; the same text as a regular drop-in is an
/// error at its line that does not quote it.
#[test]
fn symlinked_dropin_is_refused_and_never_quoted() {
    let env = Env::new();
    let main = env.config(BASE);
    let secret = env.path("shadow");
    fs::write(&secret, "root:$6$SECRETHASH$xyz:19000:0:99999:7:::\n").unwrap();
    fs::create_dir(env.path("etc/conf.d")).unwrap();
    let link = env.path("etc/conf.d/10-shadow.toml");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let (code, _, stderr) = check(&env, &main);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!("{}: is a symbolic link", link.display())),
        "{stderr}"
    );
    for h in ["SECRETHASH", "root:", "19000"] {
        assert!(!stderr.contains(h), "{h:?} is quoted:\n{stderr}");
    }
    fs::remove_file(&link).unwrap();
    let copy = env.path("etc/conf.d/20-shadow.toml");
    fs::copy(&secret, &copy).unwrap();
    let (code, _, stderr) = check(&env, &main);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:1:", copy.display())),
        "{stderr}"
    );
    for h in ["SECRETHASH", "root:", "19000"] {
        assert!(!stderr.contains(h), "{h:?} is quoted:\n{stderr}");
    }
    // The main file itself may be a symlink (administrators do that).
    fs::remove_file(&copy).unwrap();
    let main_link = env.path("etc/main-link.toml");
    std::os::unix::fs::symlink(&main, &main_link).unwrap();
    assert_eq!(check(&env, &main_link).0, 0);
}

/// Item 5: a bad value is named by file, line and key, never quoted.
#[test]
fn bad_values_are_named_not_quoted() {
    let env = Env::new();
    for &(from, to, line, key) in BAD_VALUES {
        assert_refused(&env, &edit(from, to), line, key, "", &["SECRET"]);
    }
}

/// (text in `BASE`, replacement, line, key) for a bad value.
#[rustfmt::skip]
const BAD_VALUES: &[(&str, &str, usize, &str)] = &[
    ("settle = \"100ms\"", "settle = \"SECRET-dur\"", 3, "agent.settle"),
    ("file_mode = \"0644\"", "file_mode = \"SECRET-m\"", 10, "watch.permissions.file_mode"),
    ("mode = \"0640\"", "mode = \"SECRET-m\"", 14, "watch.copy.mode"),
    ("name = \"claude\"", "name = \"SECRET name\"", 6, "watch.name"),
    ("name = \"claude\"", "name = \"claude\"\nformat = \"SECRET-f\"", 7, "watch.format"),
    ("file_mode = \"0644\"", "traverse = \"SECRET-b\"", 10, "watch.permissions.traverse"),
    ("min_interval = \"0s\"", "action = \"SECRET-a\"", 18, "watch.restart.action"),
    ("[agent]", "[agent]\nlog_level = \"SECRET-l\"", 2, "agent.log_level"),
    ("mode = \"0640\"", "owner = \"SECRET-user\"", 14, "watch.copy.owner"),
    ("\"bridge.service\"", "\"SECRET unit\"", 17, "watch.restart.units"),
];

/// Attack: uid/gid 4294967295 is (uid_t)-1, "leave unchanged" to chown. A
/// copy owned by it never matches what was asked, so the agent rewrote the
/// copy endlessly (hundreds of times a second); it is a configuration error.
#[test]
fn the_id_meaning_unchanged_is_no_owner_or_group() {
    let env = Env::new();
    let cases = [
        (
            "mode = \"0640\"",
            "owner = \"4294967295\"",
            14,
            "watch.copy.owner",
        ),
        (
            "mode = \"0640\"",
            "group = \"4294967295\"",
            14,
            "watch.copy.group",
        ),
        (
            "name = \"claude\"",
            "name = \"claude\"\nsource_owner = \"4294967295\"",
            7,
            "watch.source_owner",
        ),
    ];
    for (from, to, line, key) in cases {
        assert_refused(&env, &edit(from, to), line, key, "\"unchanged\"", &[]);
    }
    // The largest id that is one is still accepted.
    let config = env.config(&edit("mode = \"0640\"", "owner = \"4294967294\""));
    assert_eq!(check(&env, &config).0, 0);
}

/// Attack: `--config /dev/zero` read memory without end and a FIFO as the
/// main file blocked `check` and start-up. The main file must be a regular
/// file (a symlink to one is fine) of at most 1 MiB.
#[test]
fn the_main_file_is_a_regular_file_of_bounded_size() {
    let env = Env::new();
    let fifo = env.path("etc/fifo.toml");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let config = env.config(BASE);
    let big = env.path("etc/big.toml");
    let padding = "# padding\n".repeat((1 << 20) / 10);
    fs::write(
        &big,
        format!("{}{padding}", fs::read_to_string(&config).unwrap()),
    )
    .unwrap();
    let cases = [
        (fifo.as_path(), "is not a regular file"),
        (Path::new("/dev/zero"), "is not a regular file"),
        (big.as_path(), "is larger than 1 MiB"),
    ];
    for (path, reason) in cases {
        let (code, err) = bounded(
            &env,
            &["check", "--config", path.to_str().unwrap()],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("check --config {} did not return", path.display()));
        assert_eq!(code, 78, "{}: {err}", path.display());
        assert!(
            err.contains(&format!("{}: {reason}", path.display())),
            "{}: {err}",
            path.display()
        );
    }
    // Cut to exactly 1 MiB (inside a comment), the same file is read.
    let text = fs::read_to_string(&big).unwrap();
    fs::write(&big, &text[..1 << 20]).unwrap();
    assert_eq!(check(&env, &big).0, 0, "{}", check(&env, &big).2);
}

/// Item 7: a mode with setuid, setgid or sticky bits is a configuration error.
#[test]
fn modes_with_special_bits_are_refused() {
    let env = Env::new();
    let cases = [
        ("mode = \"0640\"", "mode = \"4755\"", 14, "watch.copy.mode"),
        (
            "file_mode = \"0644\"",
            "file_mode = \"2755\"",
            10,
            "watch.permissions.file_mode",
        ),
        (
            "file_mode = \"0644\"",
            "file_mode = \"1644\"",
            10,
            "watch.permissions.file_mode",
        ),
        (
            "mode = \"0640\"",
            "mode = \"0640\"\ndir_mode = \"6755\"",
            15,
            "watch.copy.dir_mode",
        ),
    ];
    for (from, to, line, key) in cases {
        assert_refused(
            &env,
            &edit(from, to),
            line,
            key,
            "setuid",
            &["4755", "2755", "1644", "6755"],
        );
    }
}

/// Item 8: paths with `.`/`..` components or repeated slashes are refused
/// as written; relative paths still resolve against the working directory.
#[test]
fn unnormalized_paths_are_refused() {
    let env = Env::new();
    let source = "{ROOT}/home/.claude/.credentials.json";
    let dest = "{ROOT}/shared/.credentials.json";
    let cases = [
        (
            source,
            "{ROOT}/home/.claude/../.claude/.credentials.json",
            7,
            "watch.source",
        ),
        (
            source,
            "{ROOT}/home//.claude/.credentials.json",
            7,
            "watch.source",
        ),
        (
            dest,
            "{ROOT}/shared/./.credentials.json",
            13,
            "watch.copy.dest",
        ),
        // A `..` dest that names the source itself.
        (
            dest,
            "{ROOT}/shared/../home/.claude/.credentials.json",
            13,
            "watch.copy.dest",
        ),
        ("{ROOT}/state", "{ROOT}/state/.", 2, "agent.state_dir"),
        ("{ROOT}/state", "{ROOT}//state", 2, "agent.state_dir"),
    ];
    for (from, to, line, key) in cases {
        assert_refused(&env, &edit(from, to), line, key, "a path cannot", &[]);
    }
    let config = env.config(&edit(source, "home/.claude/.credentials.json"));
    let (code, stdout, stderr) = check(&env, &config);
    assert_eq!(code, 0, "{stderr}");
    let cwd = std::env::current_dir().unwrap();
    let want = format!(
        "source = \"{}/home/.claude/.credentials.json\"",
        cwd.display()
    );
    assert!(stdout.contains(&want), "{stdout}");
}

/// Item 8: a copy `dest` equal to another watch's source, to another dest
/// or to its own watch's source is an error at the dest's own line.
#[test]
fn dest_equal_to_a_source_or_dest_is_refused_at_its_line() {
    let env = Env::new();
    let two = format!("{BASE}{SECOND}");
    let cases = [
        (
            "{ROOT}/home/.claude/.credentials.json",
            "the source of another watch",
        ),
        ("{ROOT}/shared/.credentials.json", "used by two copies"),
        ("{ROOT}/bot/.credentials.json", "the source itself"),
    ];
    for (dest, reason) in cases {
        assert_refused(
            &env,
            &two.replace("DEST", dest),
            25,
            "watch.copy.dest",
            reason,
            &[],
        );
    }
}

/// Item 9: any duration over 366 days is a configuration error.
#[test]
fn durations_over_366_days_are_refused() {
    let env = Env::new();
    let hidden = ["300000000000", "367d", "366d 1s", "2years", "400d", "9999d"];
    for &(from, to, line, key) in LONG_DURATIONS {
        assert_refused(&env, &edit(from, to), line, key, "duration", &hidden);
    }
    let at_most = edit("settle = \"100ms\"", "settle = \"366d\"");
    assert_eq!(check(&env, &env.config(&at_most)).0, 0);
}

/// (text in `BASE`, replacement, line, key) for a duration over 366 days.
#[rustfmt::skip]
const LONG_DURATIONS: &[(&str, &str, usize, &str)] = &[
    ("settle = \"100ms\"", "settle = \"300000000000years\"", 3, "agent.settle"),
    ("min_interval = \"0s\"", "min_interval = \"367d\"", 18, "watch.restart.min_interval"),
    ("min_interval = \"0s\"", "timeout = \"366d 1s\"", 18, "watch.restart.timeout"),
    ("[agent]", "[agent]\nresync_interval = \"2years\"", 2, "agent.resync_interval"),
    ("name = \"claude\"", "name = \"claude\"\ndeletion_grace = \"400d\"", 7, "watch.deletion_grace"),
    ("name = \"claude\"", "name = \"claude\"\nexpiry_warning = \"9999d\"", 7, "watch.expiry_warning"),
    ("name = \"claude\"", "name = \"claude\"\nmax_lifetime = \"367d\"", 7, "watch.max_lifetime"),
];

/// Item 9: a SIGHUP to a configuration with an absurd duration is rejected
/// and the agent keeps working with the old configuration.
#[test]
fn sighup_with_an_absurd_duration_keeps_the_agent() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(BASE);
    let mut agent = Agent::start(&env, &config);
    env.config(&edit(
        "settle = \"100ms\"",
        "settle = \"300000000000years\"",
    ));
    agent.signal(libc::SIGHUP);
    let rejected = agent.wait_log("reload rejected", Duration::from_secs(5));
    assert!(rejected, "{}", agent.stderr());
    assert!(
        agent
            .stderr()
            .contains("cred-watch.toml:3: key `agent.settle`"),
        "{}",
        agent.stderr()
    );
    let c = creds(2);
    write_atomic(&src, &c);
    let dest = env.path("shared/.credentials.json");
    assert!(
        wait_until(Duration::from_secs(5), || read_json(&dest)
            == Some(copied(&c))),
        "{}",
        agent.stderr()
    );
    assert!(agent.exited_within(Duration::from_millis(300)).is_none());
    let (status, _) = agent.stop();
    assert!(status.success());
}
