//! Tests 5 and 6: symlinks and hard links are refused and never followed;
//! bad contents are refused with their own reason and change nothing.
mod common;
use common::*;
use std::fs;
use std::time::Duration;

const ALL: &str = r#"
[watch.permissions]
file_mode = "0644"

[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"

[watch.restart]
units = ["bridge.service"]
min_interval = "0s"
"#;

fn setup() -> (Env, std::path::PathBuf, std::path::PathBuf) {
    let env = Env::new();
    let src = source_path(&env);
    fs::create_dir_all(env.path("shared")).unwrap();
    (env, src, std::path::PathBuf::new())
}

#[test]
fn symlinked_or_hardlinked_source_is_refused() {
    let (env, src, _) = setup();
    let secret = env.path("secret.json");
    fs::write(&secret, creds(1)).unwrap();
    set_mode(&secret, 0o600);
    std::os::unix::fs::symlink(&secret, &src).unwrap();
    let agent = Agent::start(&env, &env.config(&standard_config(ALL)));
    assert!(
        agent.wait_log("is a symlink", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert_eq!(mode(&secret), 0o600, "target mode untouched");
    assert_eq!(
        fs::read_to_string(&secret).unwrap(),
        creds_seq_text(&secret)
    );
    assert!(
        !env.path("shared/.credentials.json").exists(),
        "nothing copied"
    );

    // Replaced by a symlink later (rename of a link over the file).
    fs::remove_file(&src).unwrap();
    write_atomic(&src, &creds(2));
    assert!(wait_until(Duration::from_secs(5), || env
        .path("shared/.credentials.json")
        .exists()));
    let good = fs::read(env.path("shared/.credentials.json")).unwrap();
    let link = env.path("home/.claude/link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    fs::rename(&link, &src).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || agent.count("is a symlink") >= 2),
        "{}",
        agent.stderr()
    );
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(
        fs::read(env.path("shared/.credentials.json")).unwrap(),
        good,
        "last good copy kept"
    );

    // A valid change restarts once; a file that arrives with a second hard link does not.
    write_atomic(&src, &creds(3));
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts().len() == 1),
        "{}",
        agent.stderr()
    );
    let good = fs::read(env.path("shared/.credentials.json")).unwrap();
    let tmp = env.path("home/.claude/.credentials.json.tmp.linked");
    fs::write(&tmp, creds(4)).unwrap();
    set_mode(&tmp, 0o600);
    fs::hard_link(&tmp, env.path("home/hardlink")).unwrap();
    fs::rename(&tmp, &src).unwrap();
    assert!(
        agent.wait_log("has 2 hard links", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert_eq!(mode(&src), 0o600, "not chmodded through a second link");
    assert_eq!(
        fs::read(env.path("shared/.credentials.json")).unwrap(),
        good
    );
    // Proof the hard-linked file was handled, and no restart is owed.
    quiesce(&env, &agent);
    assert_eq!(env.restarts().len(), 1, "only the valid change restarted");
    agent.stop();
    env.assert_state_clean();
}

fn creds_seq_text(p: &std::path::Path) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn symlinked_destination_is_refused() {
    let (env, src, _) = setup();
    let victim = env.path("victim.txt");
    fs::write(&victim, "do not touch\n").unwrap();
    set_mode(&victim, 0o600);
    std::os::unix::fs::symlink(&victim, env.path("shared/.credentials.json")).unwrap();
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(ALL)));
    assert!(
        agent.wait_log(
            "shared/.credentials.json: refused: is a symlink",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not touch\n");
    assert_eq!(mode(&victim), 0o600);
    assert!(fs::symlink_metadata(env.path("shared/.credentials.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    agent.stop();
}

#[test]
fn bad_contents_are_refused_each_with_its_reason() {
    let (env, src, _) = setup();
    let first = creds(10);
    write_atomic(&src, &first);
    let agent = Agent::start(&env, &env.config(&standard_config(ALL)));
    write_atomic(&src, &creds(11));
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts().len() == 1),
        "{}",
        agent.stderr()
    );
    let good = fs::read(env.path("shared/.credentials.json")).unwrap();
    let last_good = creds(11);
    let v: serde_json::Value = serde_json::from_str(&last_good).unwrap();
    let exp = v["claudeAiOauth"]["expiresAt"].as_i64().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            last_good[..last_good.len() - 7].to_string(),
            "invalid JSON (truncated",
        ),
        (
            creds(12).replace("sk-ant-ort01-test-refresh-000012", ""),
            "`refreshToken` is empty",
        ),
        (
            creds(13).replace("\"accessToken\":\"sk-ant-oat01-test-access-000013\",", ""),
            "missing `accessToken`",
        ),
        (creds_exp(14, now_ms() - 60_000), "token already expired"),
        (
            r#"{"mcpOAuth":{"server":{"accessToken":"x"}}}"#.to_string(),
            "missing `claudeAiOauth`",
        ),
        (creds_exp(15, exp - 60_000), "rollback"),
    ];
    for (content, reason) in &cases {
        write_atomic(&src, content);
        assert!(
            agent.wait_log(reason, Duration::from_secs(5)),
            "expected {reason:?}:\n{}",
            agent.stderr()
        );
        assert_eq!(
            mode(&src),
            0o600,
            "a refused file is not chmodded ({reason})"
        );
        assert_eq!(
            fs::read(env.path("shared/.credentials.json")).unwrap(),
            good,
            "last good bytes kept ({reason})"
        );
    }
    // Proof every refused file was handled, and no restart is owed.
    quiesce(&env, &agent);
    assert_eq!(env.restarts().len(), 1, "no restart for any refused file");
    let (_, log) = agent.stop();
    assert!(log.matches("keeping the last good state").count() >= cases.len());
    env.assert_state_clean();
}

#[test]
fn fifo_and_huge_sources_are_refused_without_hanging() {
    let (env, src, _) = setup();
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(ALL)));
    let good = fs::read(env.path("shared/.credentials.json")).unwrap();
    // A FIFO: opening it for reading would block forever.
    let fifo = env.path("home/.claude/fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    fs::rename(&fifo, &src).unwrap();
    assert!(
        agent.wait_log("is a FIFO, not a regular file", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    // A file over 64 KiB.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
    write_atomic(&src, &big);
    assert!(
        agent.wait_log("is larger than 65536 bytes", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    // Not stuck: a valid file afterwards is applied.
    let c = creds(2);
    write_atomic(&src, &c);
    let want = copied(&c);
    assert!(wait_until(Duration::from_secs(5), || read_json(
        &env.path("shared/.credentials.json")
    ) == Some(
        want.clone()
    )));
    assert_ne!(
        fs::read(env.path("shared/.credentials.json")).unwrap(),
        good
    );
    agent.stop();
}
