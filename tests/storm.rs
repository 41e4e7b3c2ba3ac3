//! Tests 3 and 10: a storm of renames converges, readers never see a
//! partial file, restarts stay bounded, and SIGTERM mid-storm is clean.
mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COPY: &str = r#"
[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"
mode = "0640"
drop_keys = ["mcpOAuth"]

[watch.restart]
units = ["bridge.service"]
min_interval = "1s"
"#;

#[test]
fn thousand_renames_converge_with_bounded_restarts() {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    write_atomic(&src, &creds(0));
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(read_json(&dest).is_some(), "initial copy");

    // A reader that must only ever see complete, valid files.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, dest) = (stop.clone(), reads.clone(), dest.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&dest).expect("destination always exists");
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).expect("destination always parses");
                assert!(
                    v["claudeAiOauth"]["accessToken"].as_str().is_some(),
                    "complete credential"
                );
                assert!(v.get("mcpOAuth").is_none(), "drop_keys applied");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let start = Instant::now();
    let mut last = String::new();
    for i in 1..=1000 {
        last = creds(i);
        write_atomic(&src, &last);
    }
    let storm = start.elapsed();
    let expected = without(&last, &["mcpOAuth"]);
    assert!(
        wait_until(Duration::from_secs(10), || read_json(&dest).as_ref()
            == Some(&expected)),
        "destination converges to the final source"
    );
    // Let any owed restart happen, then count.
    quiesce(&env, &agent);
    let window = start.elapsed() + Duration::from_millis(100);
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader saw only complete files");
    assert!(reads.load(Ordering::Relaxed) > 10);
    let restarts = env.restarts().len() as u64;
    let bound = window.as_secs_f64() / 1.0 + 2.0;
    assert!(
        restarts >= 1 && restarts as f64 <= bound,
        "{restarts} restarts for a {storm:?} storm (bound {bound})"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    env.assert_state_clean();
}

#[test]
fn sigterm_during_storm_exits_0_with_a_complete_destination() {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    let first = creds(0);
    write_atomic(&src, &first);
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    let writer = {
        let src = src.clone();
        std::thread::spawn(move || {
            let mut written = vec![];
            for i in 1..=400 {
                let c = creds(i);
                write_atomic(&src, &c);
                written.push(without(&c, &["mcpOAuth"]));
            }
            written
        })
    };
    // SIGTERM once the storm is under way (the source has changed).
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&src).is_ok_and(|now| now != first)
    }));
    let (status, _) = agent.stop();
    let mut written = writer.join().unwrap();
    written.push(without(&first, &["mcpOAuth"]));
    assert_eq!(status.code(), Some(0), "exit 0 on SIGTERM");
    let got = read_json(&dest).expect("destination is a complete JSON file");
    assert!(
        written.contains(&got),
        "the destination is one of the complete versions written"
    );
    // No temp file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(env.path("shared"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".credentials.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    env.assert_state_clean();
}

/// The kernel reads max_queued_events when an inotify instance is created:
/// lowered only while the agent starts, it gives that agent a tiny queue.
#[test]
fn queue_overflow_triggers_a_full_rescan() {
    const KNOB: &str = "/proc/sys/fs/inotify/max_queued_events";
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("queue_overflow_triggers_a_full_rescan: skipped (needs root to lower {KNOB})");
        return;
    }
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    write_atomic(&src, &creds(0));
    let old = std::fs::read_to_string(KNOB).unwrap();
    std::fs::write(KNOB, "4").unwrap();
    let agent =
        std::panic::catch_unwind(|| Agent::start(&env, &env.config(&standard_config(COPY))));
    std::fs::write(KNOB, old.trim()).unwrap();
    let agent = agent.unwrap();
    // Stop the agent reading for a moment so the queue overflows.
    agent.signal(libc::SIGSTOP);
    let mut last = String::new();
    for i in 1..=50 {
        last = creds(i);
        write_atomic(&src, &last);
    }
    agent.signal(libc::SIGCONT);
    let expected = without(&last, &["mcpOAuth"]);
    assert!(
        wait_until(Duration::from_secs(10), || read_json(&dest).as_ref()
            == Some(&expected)),
        "{}",
        agent.stderr()
    );
    assert!(
        agent.stderr().contains("inotify queue overflowed"),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}
