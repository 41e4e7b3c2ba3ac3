//! The log format contract: `<N>message` with syslog priorities and no
//! timestamps when stderr is the journald stream that `JOURNAL_STREAM`
//! names (device:inode, checked as systemd recommends), `RFC3339-millis
//! LEVEL message` otherwise; `RUST_LOG` (env_logger syntax, module
//! filters) wins over `log_level`, after a reload too.
mod common;
use common::*;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A child whose stderr is a socket, as journald gives services, read
/// line by line as it comes.
struct Streamed {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Streamed {
    /// Runs `cmd` with stderr on a fresh socket; `journal` sets
    /// `JOURNAL_STREAM` to that socket's device:inode, else to `other`.
    fn spawn(mut cmd: Command, journal: bool, other: &str) -> Streamed {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let st = nix::sys::stat::fstat(theirs.as_fd()).unwrap();
        let value = if journal {
            format!("{}:{}", st.st_dev, st.st_ino)
        } else {
            other.to_string()
        };
        cmd.env("JOURNAL_STREAM", value)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::from(OwnedFd::from(theirs)));
        let child = cmd.spawn().unwrap();
        // Our copy of the child's end goes with `cmd`: EOF at its exit.
        drop(cmd);
        let (tx, lines) = channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(ours).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Streamed {
            child,
            lines,
            seen: Vec::new(),
            reader: Some(reader),
        }
    }

    fn wait_line(&mut self, needle: &str) {
        let end = Instant::now() + WAIT;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no {needle:?} line:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the exit; returns whether it succeeded and every line.
    fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        self.seen.extend(self.lines.try_iter());
        let text = self.seen.join("\n");
        assert_no_secret(&text, "stderr");
        (status.success(), text)
    }
}

impl Drop for Streamed {
    /// A failed test does not leave its agent running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_cmd(env: &Env, config: &std::path::Path, rust_log: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .env("CRED_WATCH_TEST_RESTART_LOG", env.restart_log())
        .env("RUST_LOG", rust_log);
    cmd
}

fn fixture_env() -> (Env, std::path::PathBuf, std::path::PathBuf) {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(PERMS_0644));
    (env, src, config)
}

/// `2026-05-01T12:00:00.123Z LEVEL message`, the level padded to 5.
fn assert_plain_line(line: &str) {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    assert!(
        b.len() > 30
            && digits(0..4)
            && b[4] == b'-'
            && b[10] == b'T'
            && b[19] == b'.'
            && digits(20..23)
            && &line[23..25] == "Z "
            && ["ERROR ", "WARN  ", "INFO  ", "DEBUG ", "TRACE "].contains(&&line[25..31]),
        "not an RFC 3339 line with a padded level: {line}"
    );
}

#[test]
fn journald_lines_have_priority_prefixes_and_no_timestamps() {
    let (env, src, config) = fixture_env();
    let mut agent = Streamed::spawn(run_cmd(&env, &config, ""), true, "");
    agent.wait_line("<6>ready:");
    write_atomic(&src, "{\"claudeAiOauth\": {}}");
    agent.wait_line("<4>claude: ");
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let (ok, stderr) = agent.finish();
    assert!(ok, "{stderr}");
    assert!(stderr.lines().count() >= 3, "{stderr}");
    for line in stderr.lines() {
        let b = line.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && b"34567".contains(&b[1]) && b[2] == b'>',
            "no priority prefix: {line}"
        );
        assert!(
            !line[3..].starts_with("20") && !line.contains(" INFO "),
            "timestamp or level text under journald: {line}"
        );
    }

    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config", "/nonexistent/cred-watch.toml"]);
    let (ok, stderr) = Streamed::spawn(cmd, true, "").finish();
    assert!(!ok);
    assert!(
        stderr.starts_with("<3>configuration error: /nonexistent/cred-watch.toml: cannot read"),
        "{stderr}"
    );
}

/// A `JOURNAL_STREAM` that is not stderr (inherited by a child of a
/// service whose stderr went elsewhere) does not switch the format.
#[test]
fn another_stream_in_journal_stream_keeps_timestamps() {
    for other in ["8:1234", "0:0", "garbage"] {
        let mut cmd = Command::new(BIN);
        cmd.args(["check", "--config", "/nonexistent/cred-watch.toml"]);
        let (ok, stderr) = Streamed::spawn(cmd, false, other).finish();
        assert!(!ok);
        let line = stderr.lines().next().unwrap_or_default();
        assert_plain_line(line);
        assert!(
            line.contains("Z ERROR configuration error: /nonexistent/cred-watch.toml"),
            "{stderr}"
        );
    }
}

#[test]
fn the_configured_level_applies_without_rust_log_and_on_reload() {
    let (env, _src, config) = fixture_env();
    let agent = Agent::start_with(&env, &config, &[("RUST_LOG", "")]);
    assert!(
        agent.stderr().contains(" INFO  ready:"),
        "{}",
        agent.stderr()
    );
    assert!(!agent.stderr().contains("DEBUG"), "{}", agent.stderr());
    fs::write(
        &config,
        fs::read_to_string(&config)
            .unwrap()
            .replace("[agent]\n", "[agent]\nlog_level = \"debug\"\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("DEBUG reconciling all watches (reload)", WAIT),
        "{}",
        agent.stderr()
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    for line in log.lines() {
        assert_plain_line(line);
    }
}

#[test]
fn rust_log_wins_over_the_configured_level_after_a_reload_too() {
    let (env, _src, config) = fixture_env();
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("[agent]\n", "[agent]\nlog_level = \"debug\"\n");
    fs::write(&config, &text).unwrap();
    let agent = Agent::start_with(&env, &config, &[("RUST_LOG", "info")]);
    fs::write(&config, text.replace("\"100ms\"", "\"200ms\"")).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("reloaded configuration", WAIT),
        "{}",
        agent.stderr()
    );
    agent.signal(libc::SIGUSR1);
    assert!(
        agent.wait_log("SIGUSR1: reconciling", WAIT),
        "{}",
        agent.stderr()
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("DEBUG"), "{log}");
}

/// Module filters: a module named in `RUST_LOG` gets its level; the rest
/// of the crate stays at info when `RUST_LOG` gives it no level.
#[test]
fn rust_log_module_filters() {
    let (env, _src, config) = fixture_env();
    let agent = Agent::start_with(&env, &config, &[("RUST_LOG", "cred_watch::agent=debug")]);
    assert!(
        agent.wait_log("DEBUG reconciling all watches (start)", WAIT),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());

    let agent = Agent::start_with(&env, &config, &[("RUST_LOG", "cred_watch::systemd=trace")]);
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains(" INFO  ready:"), "{log}");
    assert!(!log.contains("reconciling all watches"), "{log}");

    let state = env.path("state/state.json");
    fs::remove_file(&state).unwrap();
    let agent = Agent::spawn(&env, &config, &[("RUST_LOG", "warn,cred_watch::agent=off")]);
    // Written once it has started (and handles SIGTERM).
    assert!(wait_until(WAIT, || state.exists()), "{}", agent.stderr());
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains("ready:") && !log.contains("stopping"),
        "{log}"
    );
}
