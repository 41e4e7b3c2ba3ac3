//! Fault injection with real processes: a full or read-only destination
//! filesystem (small tmpfs), a destination directory removed, and kill -9 at
//! random moments during a storm. Nothing partial is ever visible, errors
//! are clear, and the agent converges once the fault is gone.
mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const COPY: &str = r#"
[watch.permissions]
file_mode = "0644"

[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"
mode = "0640"
drop_keys = ["mcpOAuth"]

[watch.restart]
units = ["bridge.service"]
min_interval = "0s"
"#;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(at.to_path_buf())
    }
    fn remount(&self, opt: &str) {
        assert!(Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A temp root with the source's directory, plus the source and copy paths.
fn setup() -> (Env, PathBuf, PathBuf) {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    (env, src, dest)
}

fn expected(content: &str) -> serde_json::Value {
    without(content, &["mcpOAuth"])
}

fn temp_leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn full_destination_filesystem_then_space_returns() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    }
    let (env, src, dest) = setup();
    let fs_guard = Tmpfs::mount(&env.path("shared"), "64k");
    // Fill it up.
    let filler = env.path("shared/filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let c = creds(1);
    write_atomic(&src, &c);
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(
        agent.wait_log("No space left on device", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(agent.stderr().contains("retrying in"), "{}", agent.stderr());
    assert!(!dest.exists(), "no partial file");
    assert!(
        temp_leftovers(&env.path("shared")).is_empty(),
        "no temp file left: {:?}",
        temp_leftovers(&env.path("shared"))
    );
    assert_eq!(mode(&src), 0o644, "the other actions still happened");
    fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || read_json(&dest)
            == Some(expected(&c))),
        "completed once space returned:\n{}",
        agent.stderr()
    );
    agent.stop();
    drop(fs_guard);
}

#[test]
fn read_only_destination_is_a_clear_error_and_watching_goes_on() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    }
    let (env, src, dest) = setup();
    let tmpfs = Tmpfs::mount(&env.path("shared"), "1m");
    let c1 = creds(1);
    write_atomic(&src, &c1);
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert_eq!(read_json(&dest), Some(expected(&c1)));
    tmpfs.remount("ro");
    let c2 = creds(2);
    write_atomic(&src, &c2);
    assert!(
        agent.wait_log("Read-only file system", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(5), || mode(&src) == 0o644),
        "still fixing the source"
    );
    assert_eq!(
        read_json(&dest),
        Some(expected(&c1)),
        "the old copy stays whole"
    );
    assert!(
        env.restarts().is_empty(),
        "no restart while the copy could not be updated"
    );
    // Still watching: another change is seen (and fails the same way).
    let c3 = creds(3);
    write_atomic(&src, &c3);
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    tmpfs.remount("rw");
    assert!(
        wait_until(Duration::from_secs(15), || read_json(&dest)
            == Some(expected(&c3))),
        "{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts().len() == 1),
        "one restart once the copy is in place"
    );
    agent.stop();
}

#[test]
fn destination_directory_removed_is_recreated_with_the_configured_mode() {
    let (env, src, dest) = setup();
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(dest.exists());
    assert_eq!(
        mode(&env.path("shared")),
        0o755,
        "created with dir_mode (default 0755, SPEC version 2)"
    );
    // Gone in one step (the agent watches the copy and would put it back
    // while a recursive removal is still under way), then deleted.
    fs::rename(env.path("shared"), env.path("shared-gone")).unwrap();
    fs::remove_dir_all(env.path("shared-gone")).unwrap();
    let c = creds(2);
    write_atomic(&src, &c);
    assert!(
        wait_until(Duration::from_secs(5), || read_json(&dest)
            == Some(expected(&c))),
        "{}",
        agent.stderr()
    );
    assert_eq!(mode(&env.path("shared")), 0o755);
    assert_eq!(mode(&dest), 0o640);
    agent.stop();
}

/// A tiny deterministic generator: no dependency, reproducible runs.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn kill_9_at_random_moments_200_times() {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    let state = env.path("state/state.json");
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    let config = env.config(&standard_config(COPY));
    let mut rng = Lcg(std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42));
    let mut seq = 0u64;
    // As JSON values: equal whatever the order of their keys.
    let mut written: Vec<serde_json::Value> = Vec::new();
    let write = |seq: &mut u64, written: &mut Vec<serde_json::Value>| {
        *seq += 1;
        let c = creds(*seq);
        write_atomic(&src, &c);
        written.push(expected(&c));
    };
    write(&mut seq, &mut written);
    let started = Instant::now();
    for round in 0..200 {
        let log = fs::File::create(env.path("kill9.log")).unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("CRED_WATCH_TEST_RESTART_LOG", env.restart_log())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(rng.next(40));
        while Instant::now() < deadline {
            write(&mut seq, &mut written);
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        assert_no_secret(
            &fs::read_to_string(env.path("kill9.log")).unwrap_or_default(),
            "agent stderr",
        );
        if let Ok(bytes) = fs::read(&dest) {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("round {round}: partial destination: {e}"));
            assert!(
                written.contains(&v),
                "round {round}: destination is not one of the written versions"
            );
        }
        if let Ok(bytes) = fs::read(&state) {
            let text = String::from_utf8(bytes).expect("utf-8 state");
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("round {round}: state does not parse: {e}"));
            assert_no_secret(&text, "state.json");
        }
    }
    eprintln!(
        "200 kill -9 rounds in {:?}, {seq} writes",
        started.elapsed()
    );
    // Converge, let owed restarts happen, then stop cleanly.
    let agent = Agent::start(&env, &config);
    let last = expected(&fs::read_to_string(&src).unwrap());
    assert!(wait_until(Duration::from_secs(10), || read_json(&dest)
        == Some(last.clone())));
    assert!(
        agent.stderr().contains("temp file(s) left")
            || temp_leftovers(&env.path("state")).is_empty()
    );
    quiesce(&env, &agent);
    agent.stop();
    assert!(
        temp_leftovers(&env.path("shared")).is_empty(),
        "{:?}",
        temp_leftovers(&env.path("shared"))
    );
    assert!(
        temp_leftovers(&env.path("state")).is_empty(),
        "{:?}",
        temp_leftovers(&env.path("state"))
    );
    let restarts = env.restarts().len();
    // Nothing changed since: a restarted agent restarts nothing.
    let agent = Agent::start(&env, &config);
    // Proof it has looked at everything and owes no restart.
    quiesce(&env, &agent);
    agent.stop();
    assert_eq!(
        env.restarts().len(),
        restarts,
        "no extra restart when nothing changed"
    );
    env.assert_state_clean();
}

/// What a run killed mid-write leaves behind is removed at the next start:
/// a copy's temp file, and the empty temp directory of a destination
/// directory being created (in its parent). Only entries of processes that
/// are gone, and never a directory with something in it.
#[test]
fn leftovers_of_a_killed_run_are_removed_at_start() {
    let (env, src, dest) = setup();
    write_atomic(&src, &creds(1));
    // A PID that no process has now.
    let dead = (900_000..4_000_000)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let shared = dest.parent().unwrap();
    fs::create_dir_all(shared).unwrap();
    let tmp = shared.join(format!(".credentials.json.cred-watch-{dead}-7.tmp"));
    fs::write(&tmp, "partial").unwrap();
    let root = shared.parent().unwrap();
    let empty = root.join(format!(".shared.cred-watch-{dead}-00ff.dir"));
    let full = root.join(format!(".other.cred-watch-{dead}-0aaa.dir"));
    fs::create_dir(&empty).unwrap();
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), "x").unwrap();
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(
        agent.wait_log(
            "removed 1 temp file(s) or dir(s) left in",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    assert!(!tmp.exists() && !empty.exists(), "{}", agent.stderr());
    assert!(
        full.join("keep").exists(),
        "a directory with something in it stays"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}
