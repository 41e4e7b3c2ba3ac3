//! fs.inotify.max_user_watches exhausted: the agent must not run blind. It
//! exits non-zero (so systemd restarts it) with an error naming the limit;
//! when only the source file's own watch is refused, it watches the
//! source's directory for every write instead.
//!
//! The limit is lowered for the agent alone, never for the host: inotify
//! watches are counted per user *namespace* (since Linux 4.9,
//! `/proc/sys/user/max_inotify_watches`, and a watch is charged to its
//! namespace and every ancestor). The agent is started in a new user
//! namespace (`unshare(CLONE_NEWUSER)` in a `pre_exec` hook, root mapped to
//! root so it keeps acting on the same files), whose own root lowers that
//! namespace's `max_inotify_watches` to 0 before `exec`. The host's
//! `fs.inotify.max_user_watches` and every other inotify user are untouched,
//! so this test can run next to the others.
mod common;
use common::*;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// In the child between fork and exec: only raw system calls, no
/// allocation (the test binary is multi-threaded).
fn write_proc(path: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if n != value.len() as isize {
        return Err(err);
    }
    Ok(())
}

/// A new user namespace for the child, root mapped to root, in which at
/// most `limit` (decimal digits) inotify watches can be added.
fn watches_in_a_new_userns(limit: &[u8]) -> io::Result<()> {
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        return Err(io::Error::last_os_error());
    }
    write_proc(c"/proc/self/setgroups", b"deny")?;
    write_proc(c"/proc/self/uid_map", b"0 0 1")?;
    write_proc(c"/proc/self/gid_map", b"0 0 1")?;
    write_proc(c"/proc/sys/user/max_inotify_watches", limit)
}

fn no_watches_in_a_new_userns() -> io::Result<()> {
    watches_in_a_new_userns(b"0")
}

/// Root mapped to root needs root: otherwise the test says it is skipped.
fn as_root() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: root mapped to root in a user namespace needs root");
    }
    root
}

/// The agent on `config`, in a new user namespace that allows `limit`
/// inotify watches; waits until it is ready.
fn agent_limited_to(env: &Env, config: &std::path::Path, limit: usize) -> Agent {
    let limit = limit.to_string();
    let (mut cmd, log) = Agent::command(env, config, &[]);
    unsafe { cmd.pre_exec(move || watches_in_a_new_userns(limit.as_bytes())) };
    Agent::start_command(cmd, log)
}

#[test]
fn watch_limit_is_a_clear_fatal_error() {
    if !as_root() {
        return;
    }
    let host_limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches").unwrap();
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config("[watch.permissions]\n"));
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET");
    unsafe { cmd.pre_exec(no_watches_in_a_new_userns) };
    let out = cmd
        .output()
        .expect("cred-watch in a user namespace with max_inotify_watches = 0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("fs.inotify.max_user_watches"), "{stderr}");
    assert_no_secret(&stderr, "stderr");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches").unwrap(),
        host_limit,
        "the host's limit is never changed"
    );
    // Outside that namespace the same configuration runs.
    let agent = Agent::start(&env, &config);
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    agent.stop();
}

/// One watch short: every directory on the way to the source is watched,
/// but not the file's inode. The agent runs, watching the source's
/// directory for every write instead, and misses no write in place.
#[test]
fn no_watch_left_for_the_file_itself_falls_back_to_its_directory() {
    if !as_root() {
        return;
    }
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config("[watch.permissions]\n"));
    // One watch per directory from `/` down to the source's.
    let agent = agent_limited_to(&env, &config, src.parent().unwrap().ancestors().count());
    assert!(
        agent.wait_log("cannot watch the file itself", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    // A mode change and a write in place, neither of which renames.
    set_mode(&src, 0o600);
    assert!(
        wait_until(Duration::from_secs(5), || mode(&src) == 0o644),
        "a chmod of the source is noticed: {}",
        agent.stderr()
    );
    // A write in place: the state follows the new credential.
    let state = env.path("state/state.json");
    let fingerprint = |s: &serde_json::Value| s["watches"]["claude"]["fingerprint"].clone();
    let first = fingerprint(&round_trip(&env, &agent));
    assert!(first.is_string(), "{first}");
    write_in_place(&src, &creds(2));
    assert!(
        wait_until(Duration::from_secs(5), || {
            read_json(&state).is_some_and(|s| fingerprint(&s) != first)
        }),
        "a write in place is noticed: {}",
        agent.stderr()
    );
    agent.stop();
}

/// Exactly as many watches as directories, with a copy: the files' own
/// watches must not take the places the copy's directories need (the
/// agent would exit at every start).
#[test]
fn directories_come_before_the_files_own_watches() {
    if !as_root() {
        return;
    }
    let env = Env::new();
    let src = source_path(&env);
    std::fs::create_dir_all(env.path("shared")).unwrap();
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
    ));
    let dirs: std::collections::BTreeSet<_> = [src.parent().unwrap(), &env.path("shared")]
        .into_iter()
        .flat_map(|d| d.ancestors())
        .map(|d| d.to_path_buf())
        .collect();
    let agent = agent_limited_to(&env, &config, dirs.len());
    let dest = env.path("shared/.credentials.json");
    let want = copied(&std::fs::read_to_string(&src).unwrap());
    assert!(wait_until(Duration::from_secs(5), || read_json(&dest)
        == Some(want.clone())));
    agent.stop();
}
