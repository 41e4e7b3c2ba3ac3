//! Test 8 and the one-shot commands: configuration errors exit 78 naming
//! file, line and key (golden fixtures); SIGHUP with a bad configuration
//! keeps the old one; `check`, `sync`, `status`; MCP-only rewrites.
mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

fn fixture(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config")
            .join(name),
    )
    .unwrap()
}

/// Each bad fixture's first line says what the error must name.
#[test]
fn bad_configs_exit_78_naming_file_line_and_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/bad");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        let text = fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .unwrap();
        let line: usize = expect
            .split(',')
            .next()
            .unwrap()
            .trim_start_matches("line ")
            .parse()
            .unwrap();
        let key = expect
            .split("key ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        let quoted = expect.split("message ").nth(1).unwrap();
        let message = quoted
            .strip_prefix('"')
            .and_then(|m| m.strip_suffix('"'))
            .unwrap()
            .replace("\\\"", "\"");
        for command in [&["check"][..], &["run"], &["sync"], &["status"]] {
            let env = Env::new();
            let mut args = command.to_vec();
            args.extend(["--config", path.to_str().unwrap()]);
            let (code, _, stderr) = env.cmd(&args);
            assert_eq!(code, 78, "{args:?}: {stderr}");
            let want = format!("{}:{line}: key `{key}`", path.display());
            assert!(
                stderr.contains(&want),
                "{}: expected {want:?} in:\n{stderr}",
                path.display()
            );
            assert!(
                stderr.contains(&message),
                "{}: expected {message:?} in:\n{stderr}",
                path.display()
            );
        }
        seen += 1;
    }
    assert!(seen >= 6);
}

#[test]
fn config_from_env_and_dropins() {
    let env = Env::new();
    let main = env.config(&fixture("good.toml"));
    fs::create_dir(env.path("etc/conf.d")).unwrap();
    fs::write(
        env.path("etc/conf.d/50-bad.toml"),
        "[agent]\nsettle = \"soon\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .env("CRED_WATCH_CONFIG", &main)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("conf.d/50-bad.toml:2: key `agent.settle`")
    );
    fs::write(
        env.path("etc/conf.d/50-bad.toml"),
        "[[watch]]\nname = \"claude\"\n[watch.restart]\nmin_interval = \"1m\"\n",
    )
    .unwrap();
    let (code, stdout, _) = env.cmd(&["check", "--config", main.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("min_interval = \"1m\""), "{stdout}");
    assert!(stdout.contains("units = [\"bridge.service\"]"), "{stdout}");
    assert!(stdout.contains("drop_keys = [\"mcpOAuth\"]"), "{stdout}");
}

#[test]
fn sighup_with_bad_config_keeps_the_old_one() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&fixture("good.toml"));
    let agent = Agent::start(&env, &config);
    fs::write(
        &config,
        fixture("good.toml").replace("\"0640\"", "\"0999\""),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("reload rejected", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(
        agent
            .stderr()
            .contains("cred-watch.toml:14: key `watch.copy.mode`"),
        "{}",
        agent.stderr()
    );
    let c = creds(2);
    write_atomic(&src, &c);
    let want = without(&c, &["mcpOAuth"]);
    assert!(wait_until(Duration::from_secs(5), || read_json(
        &env.path("shared/.credentials.json")
    ) == Some(
        want.clone()
    )));
    assert_eq!(
        mode(&env.path("shared/.credentials.json")),
        0o640,
        "old config still in force"
    );
    // A good new configuration is applied.
    env.config(&fixture("good.toml").replace("\"0640\"", "\"0600\""));
    agent.signal(libc::SIGHUP);
    assert!(agent.wait_log("reloaded configuration", Duration::from_secs(5)));
    assert!(wait_until(Duration::from_secs(5), || mode(
        &env.path("shared/.credentials.json")
    ) == 0o600));
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn mcp_only_rewrite_copies_but_does_not_restart() {
    let env = Env::new();
    let src = source_path(&env);
    let base = creds(1);
    write_atomic(&src, &base);
    let config = fixture("good.toml").replace("drop_keys = [\"mcpOAuth\"]", "");
    let agent = Agent::start(&env, &env.config(&config));
    let rewritten = base.replace("\"mcp-1\"", "\"mcp-2\"");
    write_atomic(&src, &rewritten);
    let want = copied(&rewritten);
    assert!(wait_until(Duration::from_secs(5), || read_json(
        &env.path("shared/.credentials.json")
    ) == Some(
        want.clone()
    )));
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    // Proof it has handled the rewrite, and done any restart it asked for.
    quiesce(&env, &agent);
    assert!(
        env.restarts().is_empty(),
        "MCP-only change restarted: {:?}",
        env.restarts()
    );
    // A real credential change does.
    write_atomic(&src, &creds(2));
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts()
            == ["bridge.service"]),
        "{}",
        agent.stderr()
    );
    agent.stop();
}

#[test]
fn sync_dry_run_then_apply_then_status() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&fixture("good.toml"));
    let cfg = config.to_str().unwrap();
    let (code, out, _) = env.cmd(&["sync", "--dry-run", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("would apply") && out.contains("mode 0600 -> 0644"),
        "{out}"
    );
    assert_eq!(mode(&src), 0o600, "dry run changes nothing");
    assert!(!env.path("shared/.credentials.json").exists());
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(mode(&src), 0o644);
    assert!(env.path("shared/.credentials.json").exists());
    assert!(
        env.restarts().is_empty(),
        "first sight is adopted without a restart"
    );
    let (code, out, _) = env.cmd(&["sync", "--watch", "claude", "--config", cfg]);
    assert_eq!(code, 0);
    assert!(out.contains("in sync"), "{out}");
    write_atomic(&src, &creds(2));
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("restarted bridge.service"), "{out}");
    assert_eq!(env.restarts(), ["bridge.service"]);
    write_atomic(&src, "{\"claudeAiOauth\":");
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused: invalid JSON"), "{out}");
    // A watch that does not exist is a usage error (operator round 2).
    let (code, out, _) = env.cmd(&["sync", "--watch", "nope", "--config", cfg]);
    assert_eq!(code, 2, "{out}");
    let (code, out, _) = env.cmd(&["status", "--config", cfg]);
    assert_eq!(code, 0);
    assert!(
        out.contains("unit bridge.service: no restart pending") && out.contains("1 restarts"),
        "{out}"
    );
    let (code, out, _) = env.cmd(&["status", "--json", "--config", cfg]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["units"]["bridge.service"]["restarts"], 1);
    assert_eq!(
        v["watches"]["claude"]["fingerprint"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    env.assert_state_clean();
}

/// One agent per state_dir; `sync` next to a running agent asks it to do the
/// pass, so one change still restarts the unit exactly once.
#[test]
fn sync_next_to_a_running_agent_is_done_by_it_and_a_second_agent_is_refused() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&fixture("good.toml").replace("\"100ms\"", "\"300ms\""));
    let cfg = config.to_str().unwrap();
    let agent = Agent::start(&env, &config);

    let mut second = Agent::spawn(&env, &config, &[]);
    let exited = second.exited_within(Duration::from_secs(10));
    let err = second.stderr();
    assert_no_secret(&err, "second agent stderr");
    assert!(
        exited.is_some(),
        "a second agent on the same state_dir kept running:\n{err}"
    );
    assert_eq!(exited.unwrap().code(), Some(1), "{err}");
    assert!(
        err.contains("is in use: the cred-watch agent with PID")
            && err.contains(&format!("PID {} holds", agent.pid())),
        "{err}"
    );

    // A change and a sync at once: the agent applies it, restarts once.
    write_atomic(&src, &creds(2));
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("asked it to reconcile"), "{out}");
    assert!(out.contains("claude: in sync"), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || !env.restarts().is_empty()),
        "{}",
        agent.stderr()
    );
    // Both handled, no second restart owed.
    quiesce(&env, &agent);
    assert_eq!(env.restarts(), ["bridge.service"], "{}", agent.stderr());

    write_atomic(&src, "{\"claudeAiOauth\":");
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused: invalid JSON"), "{out}");
    let (status, _) = agent.stop();
    assert!(status.success());
    env.assert_state_clean();
}

/// Operator round 2: a watch name that does not exist is a usage error
/// (exit 2, like clap's), and `status` says whether an agent runs.
#[test]
fn usage_errors_exit_2_and_status_knows_when_no_agent_runs() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(PERMS_0644));
    let cfg = config.to_str().unwrap();
    let (code, _, err) = env.cmd(&["sync", "--config", cfg, "--watch", "nosuch"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no watch named \"nosuch\"") && err.contains("claude"),
        "{err}"
    );
    let agent = Agent::start(&env, &config);
    let (_, out, _) = env.cmd(&["status", "--config", cfg]);
    assert!(out.contains("agent: running, pid"), "{out}");
    let (status, _) = agent.stop();
    assert!(status.success());
    let (_, out, _) = env.cmd(&["status", "--config", cfg]);
    assert!(out.contains("agent: not running"), "{out}");
}
