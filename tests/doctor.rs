//! `cred-watch doctor`: every check shown failing and then passing, on temp
//! fixtures. Units come from a JSON double (CRED_WATCH_TEST_UNITS); the
//! nspawn suite runs the same checks against real systemd.
mod common;
use common::*;
use serde_json::{json, Value};
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

    /// The line for `check` with `status` that contains `needle` (a check
    /// may have several lines).
    fn line_with(&self, out: &str, status: &str, check: &str, needle: &str) -> String {
        let prefix = format!("{status:<4} {check}: ");
        out.lines()
            .find(|l| l.starts_with(&prefix) && l.contains(needle))
            .unwrap_or_else(|| panic!("no `{prefix}` line with `{needle}` in:\n{out}"))
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
    // The source is now refused: the worker holds the last good token, and
    // restarting it would make it read the broken file.
    write_atomic(&src, "{\"claudeAiOauth\": {}}");
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "warn", "claude stale handles bridge.service");
    assert!(line.contains("hold the last good token"), "{line}");
    assert!(
        line.contains("do not restart bridge.service until a valid file is back"),
        "{line}"
    );
    assert!(!line.contains("fix: systemctl restart"), "{line}");
    worker.kill().unwrap();
    worker.wait().unwrap();
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude stale handles bridge.service");
}

#[test]
fn old_path_unit_and_agent_checks() {
    let env = Env::new();
    // As root, healthy includes a consumer reading the copy as its own user.
    let config = if is_root() {
        consumer_config()
    } else {
        CONFIG.to_string()
    };
    let d = Doctor::new(&env, &config);
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
    if is_root() {
        set_mode(&env.root, 0o711);
        bridge(&d, reads_shared(&env));
    }
    let agent = Agent::start(&env, &d.config);
    let (code, out) = d.run(&[]);
    if is_root() {
        d.line(&out, "ok", "claude consumer bridge.service");
        assert_eq!(code, 0, "healthy:\n{out}");
    } else {
        eprintln!("old_path_unit_and_agent_checks: healthy consumer skipped (needs root)");
    }
    d.line(&out, "ok", "path units");
    assert!(
        d.line(&out, "ok", "agent")
            .contains(&format!("running (pid {})", agent.pid())),
        "{out}"
    );
    agent.stop();
}

// ---- consumers: what each restart unit's CLI reads, as its user ----

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// CONFIG whose copy the group `nogroup` (nobody's primary group) reads.
fn consumer_config() -> String {
    CONFIG.replace(
        "mode = \"0640\"\n",
        "mode = \"0640\"\ngroup = \"nogroup\"\n",
    )
}

/// A valid source, synced to its copy, in a temp root other users can
/// traverse.
fn consumer_setup<'e>(env: &'e Env, config: &str) -> Doctor<'e> {
    let d = Doctor::new(env, config);
    fs::create_dir_all(src(env).parent().unwrap()).unwrap();
    write_atomic(&src(env), &creds(1));
    set_mode(&env.root, 0o711);
    d.sync();
    d
}

/// The units fixture: a loaded, active bridge.service with `fields`.
fn bridge(d: &Doctor, fields: Value) {
    bridge_and(d, fields, json!({}));
}

/// Like [`bridge`], plus more units.
fn bridge_and(d: &Doctor, fields: Value, more: Value) {
    let mut unit = json!({"load_state": "loaded", "active_state": "active"});
    unit.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let mut units = json!({ "bridge.service": unit });
    units
        .as_object_mut()
        .unwrap()
        .extend(more.as_object().unwrap().clone());
    d.units(&json!({ "units": units }).to_string());
}

/// The supported topology: User=nobody, the copy's directory as
/// CLAUDE_SECURESTORAGE_CONFIG_DIR (CLAUDE_CONFIG_DIR stays elsewhere).
fn reads_shared(env: &Env) -> Value {
    json!({"user": "nobody", "environment": [
        format!("CLAUDE_SECURESTORAGE_CONFIG_DIR={}", env.path("shared").display()),
        "CLAUDE_CONFIG_DIR=/nonexistent/.claude",
    ]})
}

/// The JSON finding for `check` with `status`.
fn json_finding(out: &str, check: &str, status: &str) -> Value {
    let v: Value = serde_json::from_str(out).unwrap();
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check && c["status"] == status)
        .unwrap_or_else(|| panic!("no {status} {check} in {out}"))
        .clone()
}

const CONSUMER: &str = "claude consumer bridge.service";

macro_rules! needs_root {
    ($name:literal) => {
        if !is_root() {
            eprintln!(concat!($name, ": skipped (needs root to switch users)"));
            return;
        }
    };
}

#[test]
fn consumer_reading_the_copy_in_a_root_owned_dir_is_ok() {
    needs_root!("consumer_reading_the_copy_in_a_root_owned_dir_is_ok");
    let env = Env::new();
    let d = consumer_setup(&env, &consumer_config());
    bridge(&d, reads_shared(&env));
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "ok", CONSUMER);
    let copy = env.path("shared/.credentials.json");
    assert!(
        line.contains(&format!("User=nobody reads a copy {}", copy.display()))
            && line.contains("(CLAUDE_SECURESTORAGE_CONFIG_DIR from Environment=)")
            && line.contains("cannot create entries"),
        "{line}"
    );
    assert!(!out.contains(&format!("fail {CONSUMER}")), "{out}");
    let (_, out) = d.run(&["--json"]);
    let finding = json_finding(&out, CONSUMER, "ok");
    assert!(finding["message"]
        .as_str()
        .unwrap()
        .contains("reads a copy"));
}

#[test]
fn consumer_that_can_create_entries_in_its_credentials_dir_fails() {
    needs_root!("consumer_that_can_create_entries_in_its_credentials_dir_fails");
    let env = Env::new();
    let d = consumer_setup(&env, &consumer_config());
    let shared = env.path("shared");
    bridge(&d, reads_shared(&env));
    // Writable through a group the user is in: its groups count.
    std::os::unix::fs::chown(&shared, Some(0), Some(65534)).unwrap();
    set_mode(&shared, 0o775);
    let before: Vec<_> = fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains(&format!(
            "User=nobody can create entries in {}",
            shared.display()
        )) && line.contains("refresh and rotate the single-use refresh token"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "fix: set Environment=CLAUDE_SECURESTORAGE_CONFIG_DIR={} on bridge.service",
            shared.display()
        )) && line
            .contains("root-owned 0755 and the copy 0640 root:nogroup, with nobody in nogroup"),
        "{line}"
    );
    let after: Vec<_> = fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "the test creates nothing");
    set_mode(&shared, 0o755);
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", CONSUMER);
    // Root (no User=) can create entries anywhere.
    let mut root = reads_shared(&env);
    root.as_object_mut().unwrap().remove("user");
    bridge(&d, root);
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains("root (no User=) can create entries")
            && line.contains("fix: run bridge.service as its own User="),
        "{line}"
    );
}

#[test]
fn consumer_that_cannot_read_its_file_fails() {
    needs_root!("consumer_that_cannot_read_its_file_fails");
    let env = Env::new();
    // No group on the copy: 0640 root:root.
    let d = consumer_setup(&env, CONFIG);
    bridge(&d, reads_shared(&env));
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let line = d.line(&out, "fail", CONSUMER);
    let copy = env.path("shared/.credentials.json");
    assert!(
        line.contains(&format!("User=nobody cannot read {}", copy.display()))
            && line.contains("EACCES")
            && line.contains("Not logged in"),
        "{line}"
    );
    assert!(line.contains("usermod -aG"), "{line}");
    // The unit's Group= counts.
    bridge(&d, {
        let mut v = reads_shared(&env);
        v["group"] = json!("root");
        v
    });
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", CONSUMER);
}

#[test]
fn consumer_reading_another_file_is_warned() {
    needs_root!("consumer_reading_another_file_is_warned");
    let env = Env::new();
    let d = consumer_setup(&env, &consumer_config());
    let other = env.path("other/.credentials.json");
    fs::create_dir_all(other.parent().unwrap()).unwrap();
    fs::write(&other, creds(1)).unwrap();
    set_mode(&other, 0o644);
    bridge(
        &d,
        json!({"user": "nobody", "environment": [
            format!("CLAUDE_CONFIG_DIR={}", other.parent().unwrap().display())]}),
    );
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "warn", CONSUMER);
    assert!(
        line.contains(&format!("reads {}", other.display()))
            && line.contains("(CLAUDE_CONFIG_DIR from Environment=)")
            && line.contains("neither this watch's source nor a copy"),
        "{line}"
    );
    assert!(line.contains("CLAUDE_SECURESTORAGE_CONFIG_DIR="), "{line}");
}

#[test]
fn oauth_token_in_anthropic_api_key_fails_and_is_never_printed() {
    let env = Env::new();
    // Without root: only the environment matters here.
    let d = consumer_setup(&env, CONFIG);
    let value = "sk-ant-oat01-NEVERPRINTED-abcdef0123456789";
    let mut fields = reads_shared(&env);
    fields["environment"]
        .as_array_mut()
        .unwrap()
        .push(json!(format!("ANTHROPIC_API_KEY={value}")));
    bridge(&d, fields);
    // `run` also fails on any `sk-ant-` in stdout or stderr.
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let line = d.line_with(&out, "fail", CONSUMER, "ANTHROPIC_API_KEY");
    assert!(
        line.contains("ANTHROPIC_API_KEY (from Environment=) holds an OAuth access token")
            && line.contains("Invalid API key · Fix external API key"),
        "{line}"
    );
    let (_, json_out) = d.run(&["--json"]);
    for text in [&out, &json_out] {
        assert!(!text.contains("NEVERPRINTED"), "{text}");
    }
    // The same from an EnvironmentFile, named in the fix.
    let file = env.path("etc/bridge.env");
    fs::write(&file, format!("ANTHROPIC_API_KEY='{value}'\n")).unwrap();
    let mut fields = reads_shared(&env);
    fields["environment_files"] = json!([[file, false]]);
    bridge(&d, fields);
    let (_, out) = d.run(&[]);
    let origin = format!("EnvironmentFile={}", file.display());
    assert!(
        d.line_with(&out, "fail", CONSUMER, "ANTHROPIC_API_KEY")
            .contains(&format!("fix: remove ANTHROPIC_API_KEY from {origin}")),
        "{out}"
    );
    // A real API key is not a finding.
    let mut fields = reads_shared(&env);
    fields["environment"]
        .as_array_mut()
        .unwrap()
        .push(json!("ANTHROPIC_API_KEY=sk-ant-api03-NEVERPRINTED"));
    bridge(&d, fields);
    let (_, out) = d.run(&[]);
    assert!(!out.contains("ANTHROPIC_API_KEY"), "{out}");
}

#[test]
fn claude_code_oauth_token_in_the_environment_is_information() {
    let env = Env::new();
    // Without root: only the environment matters here.
    let d = consumer_setup(&env, CONFIG);
    let mut fields = reads_shared(&env);
    fields["environment"]
        .as_array_mut()
        .unwrap()
        .push(json!("CLAUDE_CODE_OAUTH_TOKEN=sk-ant-oat01-NEVERPRINTED"));
    bridge(&d, fields);
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "info", CONSUMER);
    assert!(
        line.contains("CLAUDE_CODE_OAUTH_TOKEN is set (from Environment=)")
            && line.contains("environment token, not the file"),
        "{line}"
    );
    let (_, out) = d.run(&["--json"]);
    json_finding(&out, CONSUMER, "info");
    assert!(!out.contains("NEVERPRINTED"), "{out}");
}

#[test]
fn environment_files_set_the_credentials_dir() {
    needs_root!("environment_files_set_the_credentials_dir");
    let env = Env::new();
    let d = consumer_setup(&env, &consumer_config());
    let file = env.path("etc/bridge.env");
    fs::write(
        &file,
        format!(
            "# where the CLI finds the copy\n; systemd comment\n  CLAUDE_SECURESTORAGE_CONFIG_DIR=\"{}\"  \nOTHER=x\n",
            env.path("shared").display()
        ),
    )
    .unwrap();
    let missing = env.path("etc/missing.env");
    // Environment= first, then the files: the file's assignment wins; a
    // missing file marked "-" is skipped.
    bridge(
        &d,
        json!({"user": "nobody",
            "environment": ["CLAUDE_SECURESTORAGE_CONFIG_DIR=/nonexistent"],
            "environment_files": [[file, false], [missing, true]]}),
    );
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "ok", CONSUMER);
    assert!(
        line.contains(&format!(
            "(CLAUDE_SECURESTORAGE_CONFIG_DIR from EnvironmentFile={})",
            file.display()
        )),
        "{line}"
    );
    // Without "-", a missing file keeps the unit from starting.
    bridge(
        &d,
        json!({"user": "nobody", "environment_files": [[file, false], [missing, false]]}),
    );
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains(&format!("EnvironmentFile={}", missing.display()))
            && line.contains("systemd will not start the unit"),
        "{line}"
    );
}

#[test]
fn refresh_unit_must_read_the_source() {
    needs_root!("refresh_unit_must_read_the_source");
    let env = Env::new();
    let config = format!(
        "{}\n[watch.refresh]\nunit = \"claude-refresh.service\"\nahead = \"4m\"\ntimeout = \"2m\"\n",
        consumer_config()
    );
    let d = consumer_setup(&env, &config);
    let check = "claude refresher claude-refresh.service";
    let refresher = |fields: Value| {
        let mut unit = json!({"load_state": "loaded", "active_state": "inactive"});
        unit.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        bridge_and(
            &d,
            reads_shared(&env),
            json!({ "claude-refresh.service": unit }),
        );
    };
    // Root's own home: not the source.
    refresher(json!({}));
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", check);
    assert!(
        line.contains("the refresh unit's CLI does not read the source")
            && line.contains("/root/.claude/.credentials.json (the user's home)"),
        "{line}"
    );
    // Pointed at the source: ok, and it may create entries there (it refreshes).
    let dir = src(&env).parent().unwrap().display().to_string();
    refresher(json!({"environment": [format!("CLAUDE_SECURESTORAGE_CONFIG_DIR={dir}")]}));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "ok", check)
            .contains(&format!("reads the source {}", src(&env).display())),
        "{out}"
    );
    assert!(!out.contains(&format!("fail {check}")), "{out}");
    d.line(&out, "ok", CONSUMER);
    // Not installed.
    bridge(&d, reads_shared(&env));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "fail", check)
            .contains("not known to systemd (not-found)"),
        "{out}"
    );
}

// ---- readers: the real credentials of the units' processes ----

/// CONFIG whose copy the group `daemon` reads (a group nobody is not in).
fn daemon_group_config() -> String {
    CONFIG.replace("mode = \"0640\"\n", "mode = \"0640\"\ngroup = \"daemon\"\n")
}

/// A real `sleep 60` run through `setpriv ARGS` (its uid, gid and groups),
/// killed on drop.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn spawn(args: &[&str]) -> Sleeper {
        let child = Command::new("setpriv")
            .args(args)
            .args(["sleep", "60"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // setpriv execs sleep once the credentials are set.
        assert!(wait_until(Duration::from_secs(5), || {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        }));
        Sleeper(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nobody with primary group nogroup and no supplementary group at all
/// (a worker that switched users without initgroups).
const NOBODY_NO_GROUPS: &[&str] = &["--reuid=nobody", "--regid=nogroup", "--clear-groups"];

/// The fixture for a running bridge: `main` is MainPID, `pids` its cgroup.
fn running_bridge(d: &Doctor, env: &Env, user: &str, main: u32, pids: &[u32], extra: Value) {
    let mut fields = reads_shared(env);
    fields["user"] = json!(user);
    fields["main_pid"] = json!(main);
    fields["pids"] = json!(pids);
    fields
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    bridge(d, fields);
}

#[test]
fn worker_without_the_copy_group_fails_naming_the_group_and_initgroups() {
    needs_root!("worker_without_the_copy_group_fails_naming_the_group_and_initgroups");
    let env = Env::new();
    let d = consumer_setup(&env, &daemon_group_config());
    let copy = env.path("shared/.credentials.json");
    // A root master that starts a worker as nobody without initgroups.
    let master = Sleeper::spawn(&["--clear-groups"]);
    let worker = Sleeper::spawn(NOBODY_NO_GROUPS);
    let (m, w) = (master.pid(), worker.pid());
    running_bridge(&d, &env, "", m, &[m, w], json!({}));
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let who = format!("PID {w} (sleep, uid 65534)");
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains(&format!("{who} cannot read {}", copy.display()))
            && line.contains("EACCES")
            && line.contains(&format!(
                "the copy is 0640 root:daemon and {who} is not in group daemon (its groups: nogroup)"
            ))
            && line.contains("bridge.service drops privileges without initgroups")
            && line.contains("fix: add SupplementaryGroups=daemon to bridge.service"),
        "{line}"
    );
    assert!(
        !line.contains("usermod"),
        "the fix matches the cause: {line}"
    );
    // The root master is named, not failed: its workers run the CLI.
    assert!(
        d.line(&out, "info", CONSUMER).contains(&format!(
            "the main process (PID {m}) runs as root: tested its processes under other users"
        )),
        "{out}"
    );
    // The reader check of the worker's user tests the same real groups.
    let reader = d.line(&out, "fail", "claude reader nobody");
    assert!(
        reader.contains(&format!("{who} cannot open {}", copy.display()))
            && reader.contains("not in group daemon")
            && reader.contains("SupplementaryGroups=daemon"),
        "{reader}"
    );
    // The same worker holding the group: ok, for both checks.
    drop(worker);
    let worker = Sleeper::spawn(&["--reuid=nobody", "--regid=nogroup", "--groups=daemon"]);
    let w = worker.pid();
    running_bridge(&d, &env, "", m, &[m, w], json!({}));
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "ok", CONSUMER).contains(&format!(
            "PID {w} (sleep, uid 65534) reads a copy {}",
            copy.display()
        )),
        "{out}"
    );
    assert!(
        d.line(&out, "ok", "claude reader nobody")
            .contains(&format!("PID {w} (sleep, uid 65534) can open")),
        "{out}"
    );
    assert!(!out.contains("fail claude consumer"), "{out}");
    assert!(!out.contains("fail claude reader"), "{out}");
}

#[test]
fn workers_that_clear_their_groups_are_told_the_copy_group_not_supplementary_groups() {
    needs_root!("workers_that_clear_their_groups_are_told_the_copy_group_not_supplementary_groups");
    let env = Env::new();
    let d = consumer_setup(&env, &daemon_group_config());
    // The unit already gives the group, and its master has it; the worker
    // cleared its groups (setpriv --clear-groups), so it has none.
    let master = Sleeper::spawn(&["--groups=daemon"]);
    let worker = Sleeper::spawn(NOBODY_NO_GROUPS);
    let (m, w) = (master.pid(), worker.pid());
    let supplementary = json!({"supplementary_groups": ["daemon"]});
    running_bridge(&d, &env, "", m, &[m, w], supplementary);
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains("starts its workers with no supplementary group at all")
            && line.contains("the group daemon of its main process does not reach them")
            && line.contains(
                "fix: give the copy their primary group: group = \"nogroup\" in the [[watch.copy]]"
            )
            && line.contains("setpriv --init-groups"),
        "{line}"
    );
    assert!(
        !line.contains("fix: add SupplementaryGroups"),
        "the fix matches the cause: {line}"
    );
}

/// The unit gives the group now, but its running master was started before
/// (a root master with no group at all): a restart, not the copy's group.
#[test]
fn a_master_started_before_the_unit_gave_the_group_is_told_to_restart() {
    needs_root!("a_master_started_before_the_unit_gave_the_group_is_told_to_restart");
    let env = Env::new();
    let d = consumer_setup(&env, &daemon_group_config());
    let master = Sleeper::spawn(&["--clear-groups"]);
    let worker = Sleeper::spawn(NOBODY_NO_GROUPS);
    let (m, w) = (master.pid(), worker.pid());
    let supplementary = json!({"supplementary_groups": ["daemon"]});
    running_bridge(&d, &env, "", m, &[m, w], supplementary);
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains("bridge.service was started before it was given the group daemon")
            && line.contains("fix: systemctl restart bridge.service")
            && !line.contains("no supplementary group at all")
            && !line.contains("[[watch.copy]]"),
        "{line}"
    );
}

#[test]
fn main_process_started_before_its_group_was_given_fails_until_restarted() {
    needs_root!("main_process_started_before_its_group_was_given_fails_until_restarted");
    let env = Env::new();
    let d = consumer_setup(&env, &daemon_group_config());
    // User=nobody, with its database groups (initgroups) from before the
    // unit got SupplementaryGroups=daemon.
    let main = Sleeper::spawn(&["--reuid=nobody", "--regid=nogroup", "--init-groups"]);
    let m = main.pid();
    let supplementary = json!({"supplementary_groups": ["daemon"]});
    running_bridge(&d, &env, "nobody", m, &[m], supplementary.clone());
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains(&format!(
            "PID {m} (sleep, uid 65534) is not in group daemon (its groups: nogroup): it was started before SupplementaryGroups=daemon was set"
        )) && line.ends_with("fix: systemctl restart bridge.service"),
        "{line}"
    );
    // `--user nobody` tests that process too, not the group database.
    let (_, out) = d.run(&["--user", "nobody"]);
    assert!(
        d.line(&out, "fail", "claude reader nobody")
            .contains(&format!("PID {m} (sleep, uid 65534) cannot open")),
        "{out}"
    );
    // Not running: what systemd will give it, SupplementaryGroups= included.
    running_bridge(&d, &env, "nobody", 0, &[], supplementary);
    let (_, out) = d.run(&[]);
    assert!(
        d.line(&out, "ok", CONSUMER)
            .contains("User=nobody reads a copy"),
        "{out}"
    );
    d.line(&out, "ok", "claude reader nobody");
    // Without it, nobody is simply not in the group.
    running_bridge(&d, &env, "nobody", 0, &[], json!({}));
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "fail", CONSUMER);
    assert!(
        line.contains("User=nobody cannot read")
            && line.contains("nobody is not a member of daemon")
            && line
                .contains("fix: usermod -aG daemon nobody, then systemctl restart bridge.service"),
        "{line}"
    );
    // `--user` for a user no process runs as: the group database.
    running_bridge(&d, &env, "", 0, &[], json!({}));
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", "claude reader nobody");
    assert!(
        line.contains("no process of the units runs as it")
            && line.contains("nobody is not a member of daemon"),
        "{line}"
    );
}

#[test]
fn plain_doctor_hints_at_the_workers_when_the_bridge_runs_as_root() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    write_atomic(&src(&env), &creds(1));
    let (_, out) = d.run(&[]);
    let line = d.line(&out, "info", "claude reader");
    assert!(
        line.contains("bridge.service: root (no User=) runs as root")
            && line.contains("cred-watch doctor --user <worker user>")
            && line.contains("workers"),
        "{line}"
    );
    if is_root() {
        let (_, out) = d.run(&["--user", "nobody"]);
        assert!(!out.contains("info claude reader"), "{out}");
        d.line_with(&out, "fail", "claude reader nobody", "cannot open");
    }
}

#[test]
fn reader_fix_follows_the_cause_and_never_loosens_a_broken_source() {
    needs_root!("reader_fix_follows_the_cause_and_never_loosens_a_broken_source");
    let env = Env::new();
    let config = CONFIG.replace(
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\nmode = \"0640\"\ndrop_keys = [\"mcpOAuth\"]\n",
        "",
    );
    let d = Doctor::new(&env, &config);
    let home = env.path("home");
    fs::create_dir_all(src(&env).parent().unwrap()).unwrap();
    set_mode(&home, 0o700);
    let reader = "claude reader nobody";
    let loosening = |line: &str| line.contains("traverse") || line.contains("0644");
    // Absent.
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", reader);
    assert!(line.contains("fix: fix the source first"), "{line}");
    assert!(!loosening(&line), "{line}");
    // Refused.
    write_atomic(&src(&env), "{\"claudeAiOauth\": {}}");
    set_mode(&src(&env), 0o644);
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", reader);
    assert!(line.contains("fix: fix the source first"), "{line}");
    assert!(!loosening(&line), "{line}");
    // Valid: the directory without the search bit is named, and the fix
    // is the one for it (traverse is configured: sync adds the bits).
    write_atomic(&src(&env), &creds(1));
    set_mode(&src(&env), 0o644);
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", reader);
    assert!(
        line.contains(&format!(
            "{} is 0700 root:root and nobody (no process of the units runs as it",
            home.display()
        )) && line.contains("has no search bit there")
            && line.contains("fix: run `cred-watch sync` (traverse = true adds the search bits"),
        "{line}"
    );
    // The file's own mode, once the directories are searchable.
    set_mode(&home, 0o711);
    set_mode(&src(&env), 0o600);
    let (_, out) = d.run(&["--user", "nobody"]);
    let line = d.line(&out, "fail", reader);
    assert!(
        line.contains("the source is 0600 root:root: no read permission for nobody")
            && line.contains("fix: set [watch.permissions] file_mode = \"0644\""),
        "{line}"
    );
}

/// Restarts follow state, and doctor says so: a running unit started
/// before the credential it should use was written holds an older one.
#[test]
fn a_unit_started_before_the_current_credential_is_out_of_sync() {
    let env = Env::new();
    let d = Doctor::new(&env, CONFIG);
    let src = src(&env);
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    write_atomic(&src, &creds(1));
    d.sync();
    let unit = |since: i64| {
        format!(
            r#"{{"units": {{"bridge.service": {{"load_state": "loaded", "active_state": "active", "active_since_ms": {since}}}}}}}"#
        )
    };
    d.units(&unit(now_ms() - 3_600_000));
    let (code, out) = d.run(&[]);
    assert_eq!(code, 1, "{out}");
    let line = d.line(&out, "fail", "claude in sync bridge.service");
    assert!(
        line.contains("before the credential it should use was written"),
        "{line}"
    );
    assert!(line.contains("cred-watch sync"), "{line}");
    d.units(&unit(now_ms() + 1_000));
    let (_, out) = d.run(&[]);
    d.line(&out, "ok", "claude in sync bridge.service");
}
