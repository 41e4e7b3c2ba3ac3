//! fs.inotify.max_user_watches exhausted: the agent must not run blind. It
//! exits non-zero (so systemd restarts it) with an error naming the limit.
//! Alone in its own test binary: the limit is per user, machine-wide.
mod common;
use common::*;
use std::time::Duration;

const KNOB: &str = "/proc/sys/fs/inotify/max_user_watches";

struct Restore(String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(KNOB, self.0.trim());
    }
}

#[test]
fn watch_limit_is_a_clear_fatal_error() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to lower {KNOB}");
        return;
    }
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config("[watch.permissions]\n"));
    let _restore = Restore(std::fs::read_to_string(KNOB).unwrap());
    std::fs::write(KNOB, "1").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    drop(_restore);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("fs.inotify.max_user_watches"), "{stderr}");
    assert_no_secret(&stderr, "stderr");
    // With the limit back, the same configuration runs.
    let agent = Agent::start(&env, &config);
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    agent.stop();
}
