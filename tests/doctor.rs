//! `cred-watch doctor`: every check shown failing and then passing, on temp
//! fixtures. Units come from a JSON double (CRED_WATCH_TEST_UNITS); the
//! nspawn suite runs the same checks against real systemd.
mod common;
use common::*;
use std::fs;
use std::process::Command;
use std::time::Duration;

const CONFIG: &str = r#"
[agent]
state_dir = "{ROOT}/state"

[[watch]]
name = "claude"
source = "{ROOT}/home/.claude/.credentials.json"
expiry_warning = "10m"

[watch.permissions]
file_mode = "0644"
traverse = true

[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"
mode = "0640"
drop_keys = ["mcpOAuth"]

[watch.restart]
units = ["bridge.service"]
"#;

struct Doctor<'a> {
    env: &'a Env,
    config: std::path::PathBuf,
    units: std::path::PathBuf,
}

impl Doctor<'_> {
    fn new<'e>(env: &'e Env, config: &str) -> Doctor<'e> {
        let d = Doctor {
            env,
            config: env.config(config),
            units: env.path("units.json"),
        };
        d.units(
            r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "active"}}}"#,
        );
        d
    }

    fn units(&self, json: &str) {
        fs::write(&self.units, json).unwrap();
    }

    /// Runs doctor; returns (exit code, stdout).
    fn run(&self, extra: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .args(["doctor", "--config", self.config.to_str().unwrap()])
            .args(extra)
            .env("CRED_WATCH_TEST_UNITS", &self.units)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_no_secret(&stdout, "doctor stdout");
        assert_no_secret(&String::from_utf8_lossy(&out.stderr), "doctor stderr");
        (out.status.code().unwrap(), stdout)
    }

    /// The line for `check`, asserting its status.
    fn line(&self, out: &str, status: &str, check: &str) -> String {
        let prefix = format!("{status:<4} {check}: ");
        out.lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
            .to_string()
    }

    fn sync(&self) {
        let (code, out, _) = self
            .env
            .cmd(&["sync", "--config", self.config.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
    }
}

fn src(env: &Env) -> std::path::PathBuf {
    env.path("home/.claude/.credentials.json")
}

#[test]
fn config_check_fails_with_file_and_line_then_passes() {
    let env = Env::new();
    let d = Doctor::new(&env, &CONFIG.replace("\"0640\"", "\"0999\""));
    let (code, out) = d.run(&[]);
    assert_eq!(code, 78);
    assert!(
        d.line(&out, "fail", "config")
            .contains("cred-watch.toml:16: key `watch.copy.mode`"),
        "{out}"
    );
    let d = Doctor::new(&env, CONFIG);
    let (_, out) = d.run(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checks"][0]["check"], "config");
    assert_eq!(v["checks"][0]["status"], "ok");
}

#[test]
fn source_checks() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1);
    assert!(
        d.line(&out, "fail", "claude source").contains("is absent"),
        "{out}"
    );
    assert!(out.contains("/login"), "the fix says what to do:\n{out}");

    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    let secret = env.path("elsewhere.json");
    fs::write(&secret, creds(1)).unwrap();
    std::os::unix::fs::symlink(&secret, src(&env)).unwrap();
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", "claude source")
            .contains("is a symlink"),
        "{out}"
    );
    fs::remove_file(src(&env)).unwrap();

    write_atomic(&src(&env), &creds_exp(1, now_ms() - 1000));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", "claude source")
            .contains("token already expired"),
        "{out}"
    );

    write_atomic(&src(&env), &creds_exp(2, now_ms() + 5 * 60_000));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "warn", "claude source").contains("expiresAt"),
        "within expiry_warning:\n{out}"
    );

    write_atomic(&src(&env), &creds(3));
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "ok", "claude source");
    assert!(
        line.contains("valid, fingerprint ") && line.contains("(in "),
        "{line}"
    );
}

#[test]
fn permission_and_traverse_checks() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    set_mode(&env.path("home"), 0o700);
    write_atomic(&src(&env), &creds(1));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", "claude permissions")
            .contains("mode 0600, expected 0644"),
        "{out}"
    );
    assert!(
        d.line(&out, "fail", "claude traverse")
            .contains("home 0700 -> 0711"),
        "{out}"
    );
    assert_eq!(mode(&env.path("home")), 0o700, "doctor changes nothing");
    d.sync();
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude permissions");
    d.line(&out, "ok", "claude traverse");
}

#[test]
fn copy_checks() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    let dest = env.path("shared/.credentials.json");
    let check = format!("claude copy {}", dest.display());
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    write_atomic(&src(&env), &creds(1));
    let (_, out) = d.run(&[]);
    assert!(d.line(&out, "fail", &check).contains("missing"), "{out}");
    d.sync();
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "ok", &check)
            .contains("identical to the source"),
        "{out}"
    );
    set_mode(&dest, 0o644);
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", &check)
            .contains("mode 0644, expected mode 0640"),
        "{out}"
    );
    d.sync();
    fs::write(&dest, creds(2)).unwrap();
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", &check)
            .contains("differs from the validated source"),
        "{out}"
    );
    assert!(out.contains("single-use refresh token"), "{out}");
}

#[test]
fn reader_check_runs_as_the_user() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("reader_check_runs_as_the_user: skipped (needs root to switch users)");
        return;
    }
    let env = Env::new();
    // Permissions only: readers open the source itself.
    let config = CONFIG.replace("[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\nmode = \"0640\"\ndrop_keys = [\"mcpOAuth\"]\n", "");
    let d = Doctor::new(&env, &config);
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    write_atomic(&src(&env), &creds(1));
    set_mode(&src(&env), 0o644);
    set_mode(&env.path("home"), 0o700);
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", "claude reader nobody");
    assert!(
        line.contains("EACCES") && line.contains("/home is 0700"),
        "{line}"
    );
    // The unit's User= is checked too, without --user.
    d.units(r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "active", "user": "nobody"}}}"#);
    let (_, out) = d.run(&[]);
    d.line(&out, "fail", "claude reader nobody");
    set_mode(&env.path("home"), 0o711);
    let (_, out) = d.run(&["--user", "nobody"]);
    assert!(
        d.line(&out, "ok", "claude reader nobody")
            .contains("can open"),
        "{out}"
    );
}

#[test]
fn unit_checks() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    write_atomic(&src(&env), &creds(1));
    d.units(r#"{"units": {}}"#);
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", "claude unit bridge.service")
            .contains("not known to systemd (not-found)"),
        "{out}"
    );
    d.units(r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "failed"}}}"#);
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", "claude unit bridge.service")
            .contains("failed"),
        "{out}"
    );
    d.units(r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "active"}}}"#);
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude unit bridge.service");
}

#[test]
fn stale_handle_of_a_real_process() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    let src = src(&env);
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    write_atomic(&src, &creds(1));
    // A worker that opened the credentials and keeps them open.
    let mut worker = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3< '{}'; exec sleep 60", src.display()))
        .spawn()
        .unwrap();
    let pid = worker.id();
    assert!(wait_until(Duration::from_secs(5), || fs::read_link(
        format!("/proc/{pid}/fd/3")
    )
    .is_ok()));
    let units = format!(
        r#"{{"units": {{"bridge.service": {{"load_state": "loaded", "active_state": "active", "pids": [{pid}]}}}}}}"#
    );
    d.units(&units);
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude stale handles bridge.service");
    // The CLI refreshes: the worker now holds the deleted old inode.
    write_atomic(&src, &creds(2));
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1);
    let line = d.line(&out, "fail", "claude stale handles bridge.service");
    assert!(
        line.contains(&format!(
            "PID {pid} (sleep) holds the deleted {}",
            src.display()
        )),
        "{line}"
    );
    assert!(line.contains("systemctl restart bridge.service"), "{line}");
    worker.kill().unwrap();
    worker.wait().unwrap();
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude stale handles bridge.service");
}

#[test]
fn old_path_unit_and_agent_checks() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    let src_path = src(&env);
    fs::create_dir_all(src_path.parent().unwrap()).unwrap();
    write_atomic(&src_path, &creds(1));
    let fixture = format!(
        r#"{{"units": {{"bridge.service": {{"load_state": "loaded", "active_state": "active"}}}}, "path_units": {{"claude-creds.path": ["{}"]}}}}"#,
        src_path.display()
    );
    d.units(&fixture);
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "warn", "claude old path unit")
            .contains("claude-creds.path is still enabled"),
        "{out}"
    );
    assert!(
        d.line(&out, "warn", "agent").contains("not running"),
        "{out}"
    );
    d.units(r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "active"}}}"#);
    let agent = Agent::start(&env, &d.config);
    let (code, out) = d.run(&[]);
    d.line(&out, "ok", "path units");
    assert!(
        d.line(&out, "ok", "agent")
            .contains(&format!("running (pid {})", agent.pid())),
        "{out}"
    );
    assert_eq!(code, 0, "healthy:\n{out}");
    agent.stop();
}
