//! Activity next to the watched path that cannot change it (shell history
//! written in the home directory, files written in an ancestor) does not
//! wake the agent: ancestors are watched only for entries created, deleted
//! or moved.
mod common;
use common::*;
use std::fs;
use std::io::Write;
use std::time::Duration;

/// Voluntary context switches of the agent's main thread: at least one
/// per wake-up from `poll` (and one per blocking fsync).
fn wakeups(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn writes_in_ancestor_directories_do_not_wake_the_agent() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(PERMS_0644)));
    // Settle: the first state write and whatever start-up left.
    round_trip(&env, &agent);
    let before = wakeups(agent.pid());
    let history = env.path("home/.bash_history");
    for i in 0..200 {
        // Like a shell appending to its history: open, write, close.
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history)
            .unwrap();
        writeln!(f, "command {i}").unwrap();
        drop(f);
        std::fs::set_permissions(
            &history,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Proof that the agent has read everything queued before: a SIGUSR1
    // round trip. It costs a dozen switches itself (the reconcile, the
    // state write and its fsync); one wake-up per write would be 200+.
    round_trip(&env, &agent);
    let woken = wakeups(agent.pid()) - before;
    assert!(
        woken <= 40,
        "{woken} wake-ups for 200 writes next to the watched path"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}
