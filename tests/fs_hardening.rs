//! Security round 2, the file-system side: a local user who races renames
//! and swaps directories while the agent works (SPEC "Hardening rules").
//! Each test failed on the code before the fix; the race loops are bounded
//! in time.
mod common;
use common::*;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `renameat2(RENAME_EXCHANGE)`: swaps two names in one step.
fn exchange(a: &Path, b: &Path) -> bool {
    let (a, b) = (cstr(a), cstr(b));
    // SAFETY: valid NUL-terminated paths; AT_FDCWD.
    unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        ) == 0
    }
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

/// Runs `f` in a loop on another thread for `time`, then returns how many
/// rounds it made.
fn race_for(time: Duration, mut f: impl FnMut() + Send + 'static) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let end = Instant::now() + time;
        let mut rounds = 0;
        while Instant::now() < end {
            f();
            rounds += 1;
        }
        rounds
    })
}

/// Item 2: the CLI user swaps `~/.claude` with a root-owned 0700 directory
/// in its home while the agent works: only the directories whose
/// descriptors led to the file that was read get search bits.
#[test]
fn traverse_never_changes_a_directory_swapped_into_the_path() {
    let env = Env::new();
    let claude = env.path("home/.claude");
    let decoy = env.path("home/private");
    fs::create_dir_all(&claude).unwrap();
    fs::create_dir_all(&decoy).unwrap();
    fs::write(decoy.join("marker"), "root's").unwrap();
    set_mode(&claude, 0o700);
    set_mode(&decoy, 0o700);
    let src = claude.join(".credentials.json");
    write_atomic(&src, &creds(1));
    let agent = Agent::start(
        &env,
        &env.config(&standard_config(
            "[watch.permissions]\nfile_mode = \"0644\"\ntraverse = true\n",
        )),
    );
    assert!(wait_until(Duration::from_secs(5), || mode(&claude) == 0o711));
    let (a, b) = (claude.clone(), decoy.clone());
    let swapper = race_for(Duration::from_millis(1500), move || {
        exchange(&a, &b);
    });
    // Each swap already makes the agent re-arm and re-read; SIGUSR1 adds
    // full reconciles.
    let mut nudges = 0;
    while !swapper.is_finished() {
        agent.signal(libc::SIGUSR1);
        nudges += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let rounds = swapper.join().unwrap();
    if !decoy.join("marker").exists() {
        assert!(exchange(&claude, &decoy), "put the directories back");
    }
    round_trip(&env, &agent);
    assert!(rounds > 100, "only {rounds} swaps");
    assert_eq!(
        mode(&decoy),
        0o700,
        "the swapped-in directory got search bits ({rounds} swaps, {nudges} SIGUSR1)"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Item 3: the destination's parent is writable by another user (not
/// sticky), who renames a root 0700 directory into place while the agent
/// creates the destination directory. Nothing of that directory changes,
/// no token lands in it, and the copy is refused with the reason.
#[test]
fn destination_below_a_swappable_directory_is_refused_and_nothing_is_touched() {
    let env = Env::new();
    let drop = env.path("drop");
    let victim = env.path("victim");
    fs::create_dir_all(&drop).unwrap();
    fs::create_dir_all(&victim).unwrap();
    set_mode(&drop, 0o777);
    set_mode(&victim, 0o700);
    fs::write(victim.join("marker"), "root's").unwrap();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(
        "[[watch.copy]]\ndest = \"{ROOT}/drop/shared/.credentials.json\"\n",
    ));
    let agent = Agent::start(&env, &config);
    // Whatever exists there now goes: the race is with the directory's
    // creation (the old code had created it at start).
    let _ = fs::remove_dir_all(drop.join("shared"));
    let (v, d, junk) = (victim.clone(), drop.join("shared"), drop.clone());
    let mut moved = 0;
    let swapper = race_for(Duration::from_millis(2000), move || {
        // The attacker moves away whatever the agent made, puts the victim
        // in place a moment, and takes it back.
        moved += 1;
        let _ = fs::rename(&d, junk.join(format!("away-{moved}")));
        let _ = fs::rename(&v, &d);
        let _ = fs::rename(&d, &v);
    });
    let mut seq = 2;
    while !swapper.is_finished() {
        write_atomic(&src, &creds(seq));
        seq += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    swapper.join().unwrap();
    if !victim.exists() {
        fs::rename(drop.join("shared"), &victim).unwrap();
    }
    round_trip(&env, &agent);
    let st = fs::metadata(&victim).unwrap();
    assert_eq!(
        (st.mode() & 0o7777, st.uid(), st.gid()),
        (0o700, 0, 0),
        "victim directory changed"
    );
    let names: Vec<_> = fs::read_dir(&victim)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["marker"],
        "something was written into the victim"
    );
    assert!(
        agent
            .stderr()
            .contains("writable by group or others without the sticky bit"),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Item 11: a directory the agent creates for a copy belongs to root with
/// `dir_mode`, not to the copy's owner (who could then replace the copy);
/// a destination directory owned by another user is refused, not used.
#[test]
fn created_destination_directories_belong_to_root_and_foreign_ones_are_refused() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    fs::create_dir_all(env.path("theirs")).unwrap();
    chown(&env.path("theirs"), NOBODY);
    let config = env.config(&standard_config(&format!(
        "[[watch.copy]]\ndest = \"{{ROOT}}/made/deep/.credentials.json\"\nowner = \"{NOBODY}\"\nmode = \"0600\"\n\n\
         [[watch.copy]]\ndest = \"{{ROOT}}/theirs/.credentials.json\"\n"
    )));
    let agent = Agent::start(&env, &config);
    let dest = env.path("made/deep/.credentials.json");
    assert!(wait_until(Duration::from_secs(5), || dest.exists()));
    for dir in ["made", "made/deep"] {
        let st = fs::metadata(env.path(dir)).unwrap();
        assert_eq!(
            (st.uid(), st.mode() & 0o7777),
            (0, 0o755),
            "{dir}: owner and mode"
        );
    }
    assert_eq!(
        fs::metadata(&dest).unwrap().uid(),
        NOBODY,
        "the copy is theirs"
    );
    assert!(
        agent.wait_log("is owned by uid 65534", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(!env.path("theirs/.credentials.json").exists());
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Item 10: temp names cannot be guessed, so squatting the names the old
/// scheme would use (`..credentials.json.cred-watch-PID-N.tmp`) in a
/// sticky shared directory no longer blocks copies.
#[test]
fn squatted_temp_names_do_not_block_copies() {
    let env = Env::new();
    let shared = env.path("shared");
    fs::create_dir_all(&shared).unwrap();
    set_mode(&shared, 0o1777);
    let src = source_path(&env);
    let config = env.config(&standard_config(
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
    ));
    let agent = Agent::start(&env, &config);
    let pid = agent.pid();
    for n in 0..2000 {
        let squat = shared.join(format!("..credentials.json.cred-watch-{pid}-{n}.tmp"));
        fs::write(&squat, "").unwrap();
        chown(&squat, NOBODY);
    }
    write_atomic(&src, &creds(1));
    let dest = shared.join(".credentials.json");
    assert!(
        wait_until(Duration::from_secs(5), || dest.exists()),
        "copy blocked:\n{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Item 12: `state_dir` and `state.json` that someone else could plant or
/// that would block: a clear start-up error (exit 78), never a hang and
/// never read through a link.
#[test]
fn unsafe_state_dir_or_state_file_is_a_start_up_error() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(PERMS_0644));
    let config = config.to_str().unwrap();
    let state = env.path("state");
    let file = state.join("state.json");
    let planted = env.path("planted.json");
    fs::write(&planted, "{\"version\": 1}").unwrap();
    type Setup = Box<dyn Fn()>;
    let (s1, f1, s2, f2, p2, s3, s4) = (
        state.clone(),
        file.clone(),
        state.clone(),
        file.clone(),
        planted.clone(),
        state.clone(),
        state.clone(),
    );
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "FIFO state.json",
            Box::new(move || {
                fs::create_dir_all(&s1).unwrap();
                let c = cstr(&f1);
                // SAFETY: valid path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            }),
            "a FIFO",
        ),
        (
            "symlinked state.json",
            Box::new(move || {
                fs::create_dir_all(&s2).unwrap();
                std::os::unix::fs::symlink(&p2, &f2).unwrap();
            }),
            "symlink",
        ),
        (
            "state_dir owned by another user",
            Box::new(move || {
                fs::create_dir_all(&s3).unwrap();
                chown(&s3, NOBODY);
            }),
            "owned by uid 65534",
        ),
        (
            "group-writable state_dir",
            Box::new(move || {
                fs::create_dir_all(&s4).unwrap();
                set_mode(&s4, 0o770);
            }),
            "writable by group or others",
        ),
    ];
    for (what, setup, needle) in cases {
        let _ = fs::remove_dir_all(&state);
        setup();
        for args in [
            vec!["run", "--config", config],
            vec!["status", "--config", config],
            vec!["sync", "--config", config],
        ] {
            let (code, err) = bounded(&env, &args, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{what}: `{}` hung", args[0]));
            assert_eq!(code, 78, "{what}: `{}`:\n{err}", args[0]);
            assert!(err.contains(needle), "{what}: `{}`:\n{err}", args[0]);
        }
    }
    assert_eq!(mode(&src), 0o600, "nothing was done");
}

/// Item 14: ordinary CLI-style renames under a concurrent reader are not
/// warnings: a file renamed over while being read is simply read again.
#[test]
fn rename_storm_with_a_concurrent_reader_logs_no_warning() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(0));
    let agent = Agent::start(
        &env,
        &env.config(&standard_config(
            "[watch.permissions]\nfile_mode = \"0644\"\n\n[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
        )),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, path) = (stop.clone(), src.clone());
    let reader = std::thread::spawn(move || {
        let mut reads = 0u64;
        while !flag.load(Ordering::Relaxed) {
            let _ = fs::read(&path);
            reads += 1;
        }
        reads
    });
    let last = 4000;
    let mut text = String::new();
    for seq in 1..=last {
        text = creds(seq);
        write_atomic(&src, &text);
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    let dest = env.path("shared/.credentials.json");
    let want = copied(&text);
    assert!(
        wait_until(Duration::from_secs(10), || read_json(&dest).as_ref()
            == Some(&want)),
        "last file not copied:\n{}",
        tail(&agent.stderr(), 40)
    );
    round_trip(&env, &agent);
    let log = agent.stderr();
    // The one expected warning: restarts go to the test recorder.
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && !l.contains("a test double"))
        .collect();
    assert!(
        warnings.is_empty(),
        "{} warning(s) for {last} renames and {reads} concurrent reads:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Item 9: a SIGHUP to a configuration with an absurd duration is a
/// rejected reload, not a dead agent.
#[test]
fn reload_with_an_absurd_duration_keeps_the_agent_running() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let perms = "[watch.permissions]\nfile_mode = \"0644\"\n";
    let config = env.config(&standard_config(perms));
    let mut agent = Agent::start(&env, &config);
    env.config(&standard_config(perms).replace(
        "deletion_grace = \"1s\"",
        "deletion_grace = \"300000000000years\"",
    ));
    fs::remove_file(&src).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("reload", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    round_trip(&env, &agent);
    assert!(
        agent.exited_within(Duration::ZERO).is_none(),
        "{}",
        agent.stderr()
    );
    write_atomic(&src, &creds(2));
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    let (status, log) = agent.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("reload rejected"), "{log}");
}

/// Under `RUST_LOG=trace`, through refusals (bad prefix, bad characters,
/// duplicate keys, far future), applications, copies and a deletion, no
/// token text reaches the log or the state.
#[test]
fn trace_logging_never_shows_a_token() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(
        "[watch.permissions]\nfile_mode = \"0644\"\n\n[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\ndrop_keys = [\"mcpOAuth\"]\n\n[watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"0s\"\n",
    ));
    let agent = Agent::start_with(&env, &config, &[("RUST_LOG", "trace")]);
    let good = creds(2);
    let bad = [
        good.replace("sk-ant-oat01-", "sk-ant-xxx01-"),
        good.replace("test-access-", "test access\\u0000"),
        good.replacen(
            "{\"claudeAiOauth\":",
            "{\"claudeAiOauth\":{},\"claudeAiOauth\":",
            1,
        ),
        creds_exp(3, 253_402_300_800_000),
        good[..good.len() / 2].to_string(),
    ];
    for text in &bad {
        write_atomic(&src, text);
        round_trip(&env, &agent);
    }
    write_atomic(&src, &creds(4));
    round_trip(&env, &agent);
    fs::remove_file(&src).unwrap();
    round_trip(&env, &agent);
    let (status, log) = agent.stop();
    assert!(status.success());
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "{log}");
    assert!(log.matches("refused").count() >= bad.len(), "{log}");
    env.assert_state_clean();
}

/// A file renamed into place and written in place a moment later, with
/// the same size: the agent watches the new inode only after it has acted
/// on the rename, so a write in between has no event of its own. It must
/// still end up with the written content every time, at whatever moment
/// the write lands (a delay that sweeps 0 to 400 µs).
#[test]
fn a_write_in_place_right_after_a_rename_is_never_missed() {
    let env = Env::new();
    let (src, agent) = agent_on_creds(
        &env,
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
    );
    let dest = env.path("shared/.credentials.json");
    let holds = |seq: u64| {
        fs::read_to_string(&dest).is_ok_and(|c| c.contains(&format!("test-access-{seq:06}")))
    };
    assert!(wait_until(Duration::from_secs(5), || holds(1)));
    let started = Instant::now();
    let mut missed = Vec::new();
    for i in 0..120u64 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let (renamed, written) = (1000 + 2 * i, 1001 + 2 * i);
        let (a, b) = (creds(renamed), creds(written));
        assert_eq!(
            a.len(),
            b.len(),
            "the same size: only content tells them apart"
        );
        write_atomic(&src, &a);
        let delay = Duration::from_micros(i * 37 % 400);
        let t = Instant::now();
        while t.elapsed() < delay {
            std::hint::spin_loop();
        }
        fs::write(&src, &b).unwrap();
        if !wait_until(Duration::from_secs(3), || holds(written)) {
            missed.push(i);
            if missed.len() == 3 {
                break;
            }
        }
    }
    assert!(
        missed.is_empty(),
        "the copy kept the renamed file, not the one written in place, in rounds {missed:?}\n{}",
        tail(&agent.stderr(), 40)
    );
    agent.stop();
}

/// A source deleted, then created, written with a broken (truncated) file
/// and closed in one go: the close may come before the agent watches the
/// new inode, and must still count as the end of the write, so the file
/// is refused with its reason (not taken for a write still under way and
/// then for a logout).
#[test]
fn a_broken_file_created_in_one_go_is_refused_every_time() {
    let env = Env::new();
    let (src, agent) = agent_on_creds(&env, PERMS_0644);
    let started = Instant::now();
    let mut missed = Vec::new();
    for i in 0..10u64 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        fs::remove_file(&src).unwrap();
        // The agent has seen the file go and waits for it.
        round_trip(&env, &agent);
        let before = agent.count("refused");
        fs::write(&src, "{\"claudeAiOauth\":{").unwrap();
        if !wait_until(Duration::from_secs(3), || agent.count("refused") > before) {
            missed.push(i);
            if missed.len() == 3 {
                break;
            }
        }
        write_atomic(&src, &creds(10 + i));
        round_trip(&env, &agent);
    }
    assert!(
        missed.is_empty(),
        "the broken file was not refused in rounds {missed:?}\n{}",
        tail(&agent.stderr(), 40)
    );
    agent.stop();
}

/// The files below `src`'s name that process `pid` holds open: each one's
/// inode and whether its name is gone (replaced or deleted).
fn held_open(pid: i32, src: &Path) -> Vec<(u64, bool)> {
    let name = src.to_string_lossy().into_owned();
    let mut held = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let Some(rest) = target.strip_prefix(&name) else {
            continue;
        };
        if let Ok(meta) = fs::metadata(entry.path()) {
            held.push((meta.ino(), rest == " (deleted)"));
        }
    }
    held
}

/// The agent keeps the source it last read open, so that a CLI's rename
/// only unlinks the file it replaces (freeing the inode can wait on the
/// disk) and the agent frees it after its fix. A replaced or deleted
/// source is closed once the change is acted on: no old token stays
/// reachable through the agent.
#[test]
fn the_source_read_last_is_kept_open_and_a_replaced_one_released() {
    let env = Env::new();
    let (src, agent) = agent_on_creds(&env, PERMS_0644);
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    for seq in 2..6 {
        write_atomic(&src, &creds(seq));
        // Proof the rename was handled: a reconcile recorded after it.
        round_trip(&env, &agent);
        let current = fs::metadata(&src).unwrap().ino();
        assert_eq!(
            held_open(agent.pid(), &src),
            vec![(current, false)],
            "after the rename of creds({seq}), the agent holds open exactly the current source\n{}",
            tail(&agent.stderr(), 20)
        );
    }
    fs::remove_file(&src).unwrap();
    round_trip(&env, &agent);
    assert_eq!(
        held_open(agent.pid(), &src),
        vec![],
        "a deleted source is not kept open"
    );
    agent.stop();
}

/// A retry (here a copy that keeps failing) reads the source again outside
/// any batch of events: the file read before is closed all the same, so
/// retries never pile up open files.
#[test]
fn retries_keep_only_the_source_read_last_open() {
    let env = Env::new();
    fs::write(
        env.path("shared"),
        "a file where the copy's directory should be",
    )
    .unwrap();
    let (src, agent) = agent_on_creds(
        &env,
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
    );
    // The first retry comes 1 s after the first failure, the next 2 s later.
    assert!(
        wait_until(Duration::from_secs(10), || agent.count("retrying in") >= 2),
        "{}",
        tail(&agent.stderr(), 20)
    );
    let current = fs::metadata(&src).unwrap().ino();
    let mut held = Vec::new();
    assert!(
        wait_until(Duration::from_millis(1500), || {
            held = held_open(agent.pid(), &src);
            held == vec![(current, false)]
        }),
        "after a retry the agent holds open exactly the current source, not {held:?}\n{}",
        tail(&agent.stderr(), 20)
    );
    agent.stop();
}
