//! Signals reach the event loop through signal-hook's self-pipe, with no
//! blocked signal mask that every thread (the restart worker) and every
//! process the agent starts would inherit.
mod common;
use common::*;
use std::fs;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn started(env: &Env) -> Agent {
    let src = source_path(env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(PERMS_0644));
    Agent::start(env, &config)
}

/// A hex mask line (`SigBlk:\t0000000000000000`) of /proc/PID/task/TID/status.
fn mask(status: &str, key: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
fn no_thread_blocks_signals_and_the_four_are_caught() {
    let env = Env::new();
    let agent = started(&env);
    let tasks: Vec<_> = fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() >= 2, "the restart worker thread is missing");
    let bit = |sig: i32| 1u64 << (sig - 1);
    for task in tasks {
        let status = fs::read_to_string(task.path().join("status")).unwrap();
        assert_eq!(mask(&status, "SigBlk:"), 0, "{:?}: {status}", task.path());
        let caught = mask(&status, "SigCgt:");
        for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
            assert_ne!(caught & bit(sig), 0, "signal {sig} not caught: {status}");
        }
    }
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn sighup_reloads_sigusr1_reconciles_sigint_exits_0() {
    let env = Env::new();
    let mut agent = started(&env);
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("reload: configuration unchanged", WAIT),
        "{}",
        agent.stderr()
    );
    agent.signal(libc::SIGUSR1);
    assert!(
        agent.wait_log("SIGUSR1: reconciling everything now", WAIT),
        "{}",
        agent.stderr()
    );
    agent.signal(libc::SIGINT);
    let status = agent
        .exited_within(WAIT)
        .expect("still running after SIGINT");
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
    assert!(agent.stderr().contains("stopping on signal 2"));
}
