//! `--version` names the commit the binary was built from; `completions`
//! prints the scripts the package installs, from the real command line.
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cred-watch");

fn stdout(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn version_names_the_package_version_and_the_commit() {
    for flag in ["--version", "-V"] {
        let out = stdout(&[flag]);
        let rest = out
            .trim_end()
            .strip_prefix(concat!("cred-watch ", env!("CARGO_PKG_VERSION"), " ("))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{flag}: {out:?}"));
        // 12 hex digits in a git checkout, `unknown` outside one.
        assert!(
            rest == "unknown" || (rest.len() == 12 && rest.bytes().all(|b| b.is_ascii_hexdigit())),
            "{flag}: not a commit: {out:?}"
        );
    }
    // In this checkout: the commit of HEAD (the build script reruns when
    // HEAD moves).
    if let Ok(git) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        if git.status.success() {
            let head = String::from_utf8(git.stdout).unwrap();
            assert!(stdout(&["--version"]).contains(head.trim()));
        }
    }
}

#[test]
fn completions_cover_the_subcommands_in_every_shell() {
    let bash = stdout(&["completions", "bash"]);
    assert!(bash.contains("complete -F"), "{bash}");
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&["completions", shell]);
        // fish spells the long options `-l dry-run`.
        for word in ["sync", "doctor", "status", "dry-run", "json", "config"] {
            assert!(script.contains(word), "{shell}: no {word}:\n{script}");
        }
    }
    assert!(stdout(&["completions", "zsh"]).starts_with("#compdef cred-watch"));
    assert!(stdout(&["completions", "fish"]).contains("complete -c cred-watch"));
    // No configuration is read to print them.
    let out = Command::new(BIN)
        .args(["completions", "bash", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The bash script really completes a subcommand's options, which
/// clap_complete gets wrong for a name with a `-` (clap-rs/clap#6421).
#[test]
fn bash_completes_subcommand_options() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cred-watch.bash");
    std::fs::write(&script, stdout(&["completions", "bash"])).unwrap();
    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                r#"source "$0"
                COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
                fn=$(complete -p cred-watch | sed -E 's/.*-F ([^ ]+) .*/\1/')
                "$fn" cred-watch "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
                echo "${{COMPREPLY[@]}}""#
            ))
            .arg(&script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = complete("cred-watch ''");
    assert!(top.contains("sync") && top.contains("doctor"), "{top}");
    let sync = complete("cred-watch sync --");
    assert!(
        sync.contains("--dry-run") && sync.contains("--watch"),
        "{sync}"
    );
    let doctor = complete("cred-watch doctor --");
    assert!(
        doctor.contains("--json") && doctor.contains("--user"),
        "{doctor}"
    );
}
