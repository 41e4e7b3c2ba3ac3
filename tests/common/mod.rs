//! Shared harness: a temp root, the real `cred-watch` binary as a child
//! process, credential fixtures, atomic writes as the CLI does them, and the
//! secret-leak check every test ends with.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_cred-watch");

pub struct Env {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cred-watch-test")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("etc")).unwrap();
        Env { _dir: dir, root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes the main config with `{ROOT}` replaced by the temp root.
    pub fn config(&self, toml: &str) -> PathBuf {
        let path = self.path("etc/cred-watch.toml");
        fs::write(&path, toml.replace("{ROOT}", self.root.to_str().unwrap())).unwrap();
        path
    }

    pub fn restart_log(&self) -> PathBuf {
        self.path("restarts.log")
    }

    /// Restarts recorded by the test double, as unit names.
    pub fn restarts(&self) -> Vec<String> {
        fs::read_to_string(self.restart_log())
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["unit"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// Runs a one-shot command; returns (status, stdout, stderr).
    pub fn cmd(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env(RECORD, self.restart_log())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_no_secret(&o, "stdout");
        assert_no_secret(&e, "stderr");
        (out.status.code().unwrap_or(-1), o, e)
    }

    /// Every file under the state dir must be free of tokens.
    pub fn assert_state_clean(&self) {
        let dir = self.path("state");
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                assert_no_secret(&text, &e.path().display().to_string());
            }
        }
    }
}

const RECORD: &str = "CRED_WATCH_TEST_RESTART_LOG";

pub fn assert_no_secret(text: &str, what: &str) {
    assert!(!text.contains("sk-ant-"), "{what} leaks a token:\n{text}");
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A valid claude-oauth file; `seq` makes tokens and expiresAt unique and increasing.
pub fn creds(seq: u64) -> String {
    creds_exp(seq, now_ms() + 3_600_000 + seq as i64)
}

pub fn creds_exp(seq: u64, expires_at: i64) -> String {
    format!(
        r#"{{"claudeAiOauth":{{"accessToken":"sk-ant-oat01-test-access-{seq:06}","refreshToken":"sk-ant-ort01-test-refresh-{seq:06}","expiresAt":{expires_at},"scopes":["user:inference","user:profile"],"subscriptionType":"max","rateLimitTier":"default_claude_max_20x"}},"mcpOAuth":{{"server|abc":{{"accessToken":"mcp-{seq}"}}}}}}"#
    )
}

/// What a copy of this credentials file holds, as JSON values: without
/// the given top-level keys and, as every copy by default (SPEC version 2:
/// consumers must never refresh), without `claudeAiOauth.refreshToken`.
pub fn without(json: &str, keys: &[&str]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    for k in keys {
        v.as_object_mut().unwrap().remove(*k);
    }
    if let Some(oauth) = v.get_mut("claudeAiOauth").and_then(|o| o.as_object_mut()) {
        oauth.remove("refreshToken");
    }
    v
}

/// What a copy without `drop_keys` holds (the refresh token left out).
pub fn copied(json: &str) -> serde_json::Value {
    without(json, &[])
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What the CLI does: `.credentials.json.tmp.<hex>` with mode 0600, then rename.
pub fn write_atomic(path: &Path, content: &str) {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(
        "{}.tmp.{:x}{n:x}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
    drop(f);
    fs::rename(&tmp, path).unwrap();
}

use std::os::unix::fs::OpenOptionsExt;

/// What older CLIs do: truncate and write in place, then chmod 0600.
pub fn write_in_place(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn set_mode(path: &Path, m: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(m)).unwrap();
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The agent as a child process, stderr captured to a file.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    pub fn start(env: &Env, config: &Path) -> Agent {
        Self::start_with(env, config, &[])
    }

    pub fn start_with(env: &Env, config: &Path, extra_env: &[(&str, &str)]) -> Agent {
        let agent = Self::spawn(env, config, extra_env);
        assert!(
            agent.wait_log("ready:", Duration::from_secs(10)),
            "agent did not become ready:\n{}",
            agent.stderr()
        );
        agent
    }

    /// Starts `cred-watch run` without waiting for it to become ready.
    pub fn spawn(env: &Env, config: &Path, extra_env: &[(&str, &str)]) -> Agent {
        let (mut cmd, log) = Self::command(env, config, extra_env);
        Agent {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }

    /// The command [`spawn`](Self::spawn) runs, and the file its stderr
    /// goes to, for a test that adds to it ([`start_command`](Self::start_command)).
    pub fn command(env: &Env, config: &Path, extra_env: &[(&str, &str)]) -> (Command, PathBuf) {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = env.path(&format!("agent-{n}.log"));
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env(RECORD, env.restart_log())
            .env("RUST_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        (cmd, log)
    }

    /// Starts a command from [`command`](Self::command); waits until ready.
    pub fn start_command(mut cmd: Command, log: PathBuf) -> Agent {
        let agent = Agent {
            child: Some(cmd.spawn().unwrap()),
            log,
        };
        assert!(
            agent.wait_log("ready:", Duration::from_secs(10)),
            "agent did not become ready:\n{}",
            agent.stderr()
        );
        agent
    }

    /// Its exit status once it has exited by itself within `timeout`.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.stderr().matches(needle).count()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr().contains(needle))
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, wait, and check that nothing it wrote leaks a token.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = self.stderr();
        assert_no_secret(&log, "agent stderr");
        (status, log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The source of [`standard_config`] (`home/.claude/.credentials.json`),
/// its directory created.
pub fn source_path(env: &Env) -> PathBuf {
    let src = env.path("home/.claude/.credentials.json");
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    src
}

/// `[watch.permissions]` that makes the source 0644.
pub const PERMS_0644: &str = "[watch.permissions]\nfile_mode = \"0644\"\n";

/// The usual start of a test: the source holding `creds(1)` and the agent
/// running on [`standard_config`] with `extra_watch`.
pub fn agent_on_creds(env: &Env, extra_watch: &str) -> (PathBuf, Agent) {
    let src = source_path(env);
    write_atomic(&src, &creds(1));
    let agent = Agent::start(env, &env.config(&standard_config(extra_watch)));
    (src, agent)
}

/// A standard single-watch setup below the temp root.
pub fn standard_config(extra_watch: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "{{ROOT}}/state"
settle = "100ms"

[[watch]]
name = "claude"
source = "{{ROOT}}/home/.claude/.credentials.json"
deletion_grace = "1s"
{extra_watch}
"#
    )
}

/// Proof that the agent has handled everything that happened before this
/// call: SIGUSR1 makes it reconcile every watch (reading each source as it
/// is now) and record the time in `state.json` (`agent.last_reconcile_ms`).
/// Returns the first state that shows a reconcile at or after the signal.
/// Tests that assert something did *not* happen call this (or `quiesce`)
/// instead of sleeping.
pub fn round_trip(env: &Env, agent: &Agent) -> serde_json::Value {
    let asked = now_ms();
    agent.signal(libc::SIGUSR1);
    let path = env.path("state/state.json");
    let mut state = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            state = read_json(&path).filter(|s| {
                s["agent"]["last_reconcile_ms"]
                    .as_i64()
                    .is_some_and(|t| t >= asked)
            });
            state.is_some()
        }),
        "no reconcile recorded after SIGUSR1:\n{}",
        agent.stderr()
    );
    state.unwrap()
}

/// `round_trip`, then waits until the state owes no restart: every restart
/// that the input so far asked for has been done (and recorded by the test
/// double) when this returns, so the restart log can be counted.
pub fn quiesce(env: &Env, agent: &Agent) -> serde_json::Value {
    round_trip(env, agent);
    let path = env.path("state/state.json");
    let mut state = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            state = read_json(&path).filter(|s| !owes_restart(s));
            state.is_some()
        }),
        "a restart is still owed:\n{}\n{}",
        fs::read_to_string(&path).unwrap_or_default(),
        agent.stderr()
    );
    state.unwrap()
}

/// Whether a `state.json` records a restart requested and not yet done.
pub fn owes_restart(state: &serde_json::Value) -> bool {
    state["units"]
        .as_object()
        .is_some_and(|units| units.values().any(|u| u["pending"] == true))
}

/// Waits until the wall clock reaches `at_ms`, then `round_trip`: the
/// agent's loop has run after `at_ms`, so a timer due by then has fired
/// (and logged) before this returns.
pub fn round_trip_after(env: &Env, agent: &Agent, at_ms: i64) -> serde_json::Value {
    wait_until(
        Duration::from_millis((at_ms - now_ms()).max(0) as u64 + 1000),
        || now_ms() >= at_ms,
    );
    round_trip(env, agent)
}

/// Runs a one-shot command with a deadline (a FIFO could block it).
pub fn bounded(env: &Env, args: &[&str], limit: Duration) -> Option<(i32, String)> {
    let log = env.path("bounded.log");
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env("CRED_WATCH_TEST_RESTART_LOG", env.restart_log())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let err = fs::read_to_string(&log).unwrap();
    assert_no_secret(&err, "stderr");
    Some((status.unwrap().code().unwrap_or(-1), err))
}
