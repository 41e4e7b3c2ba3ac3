//! Tests 4 and 7: the source's directory deleted and re-created, a source
//! absent at start, and the deletion grace before a logout warning.
mod common;
use common::*;
use std::fs;
use std::time::Duration;

/// `deletion_grace` in `standard_config`.
const GRACE_MS: i64 = 1_000;

const COPY: &str = "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n";

fn copied(env: &Env, content: &str) -> bool {
    read_json(&env.path("shared/.credentials.json")) == Some(common::copied(content))
}

#[test]
fn claude_dir_removed_and_recreated() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(copied(&env, &creds_at(&src)));
    for round in 2..5u64 {
        fs::remove_dir_all(env.path("home/.claude")).unwrap();
        absent_seen(&agent, round as usize - 1);
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        let c = creds(round);
        write_atomic(&src, &c);
        assert!(
            wait_until(Duration::from_secs(5), || copied(&env, &c)),
            "round {round}:\n{}",
            agent.stderr()
        );
    }
    // The whole tree, ancestors included.
    fs::remove_dir_all(env.path("home")).unwrap();
    absent_seen(&agent, 4);
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    let c = creds(9);
    write_in_place(&src, &c);
    assert!(
        wait_until(Duration::from_secs(5), || copied(&env, &c)),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Waits until the agent has logged the source absent `n` times: it has
/// seen the deletion before the test re-creates the file.
fn absent_seen(agent: &Agent, n: usize) {
    assert!(
        wait_until(Duration::from_secs(5), || agent.count("is absent") >= n),
        "deletion {n} not seen:\n{}",
        agent.stderr()
    );
}

fn creds_at(p: &std::path::Path) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn source_absent_at_start_then_created() {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(agent.stderr().contains("is absent"), "{}", agent.stderr());
    fs::create_dir_all(env.path("home")).unwrap();
    fs::create_dir(env.path("home/.claude")).unwrap();
    let c = creds(1);
    write_atomic(&src, &c);
    assert!(
        wait_until(Duration::from_secs(5), || copied(&env, &c)),
        "{}",
        agent.stderr()
    );
    agent.stop();
}

#[test]
fn deletion_grace_warns_exactly_once() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    // /login: delete, round trip, new file, all within the 1s grace.
    fs::remove_file(&src).unwrap();
    absent_seen(&agent, 1);
    // The grace timer, had it stayed armed, would be due 1 s after the
    // agent saw the deletion (before now): at `due` at the latest.
    let due = now_ms() + GRACE_MS;
    let c = creds(2);
    write_atomic(&src, &c);
    assert!(wait_until(Duration::from_secs(5), || copied(&env, &c)));
    round_trip_after(&env, &agent, due);
    assert_eq!(agent.count("looks like a logout"), 0, "{}", agent.stderr());
    // A logout: gone for good. One warning, and the copy stays.
    fs::remove_file(&src).unwrap();
    assert!(
        agent.wait_log("looks like a logout", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    // The loop has run again since: no second warning.
    round_trip(&env, &agent);
    assert_eq!(agent.count("looks like a logout"), 1, "{}", agent.stderr());
    assert!(copied(&env, &c), "nothing downstream is removed");
    agent.stop();
}

#[test]
fn expiry_warns_once_then_errors_once() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds_exp(1, now_ms() + 2_500));
    let config = standard_config(&format!("expiry_warning = \"2s\"\n{COPY}"));
    let agent = Agent::start(&env, &env.config(&config));
    assert!(
        agent.wait_log("is anything refreshing it?", Duration::from_secs(3)),
        "{}",
        agent.stderr()
    );
    assert!(
        agent.wait_log("nothing is refreshing it", Duration::from_secs(4)),
        "{}",
        agent.stderr()
    );
    // The loop has run again since both: neither is repeated.
    round_trip(&env, &agent);
    assert_eq!(agent.count("is anything refreshing it?"), 1);
    assert_eq!(agent.count("nothing is refreshing it"), 1);
    agent.stop();
}

/// The expiry to watch for comes from the state when nothing changed while
/// the agent was down.
#[test]
fn expiry_warning_survives_an_agent_restart() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds_exp(1, now_ms() + 4_000));
    let config = env.config(&standard_config(&format!(
        "expiry_warning = \"2s\"\n{COPY}"
    )));
    let (status, first) = Agent::start(&env, &config).stop();
    assert!(status.success());
    assert!(!first.contains("is anything refreshing it?"), "{first}");
    let agent = Agent::start(&env, &config);
    assert!(
        agent.wait_log("is anything refreshing it?", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    agent.stop();
}

#[test]
fn tampered_copy_is_restored_on_sigusr1_and_resync() {
    let env = Env::new();
    let src = env.path("home/.claude/.credentials.json");
    let dest = env.path("shared/.credentials.json");
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    let c = creds(1);
    write_atomic(&src, &c);
    let config = standard_config(COPY).replace(
        "settle = \"100ms\"",
        "settle = \"100ms\"\nresync_interval = \"1s\"",
    );
    let agent = Agent::start(&env, &env.config(&config));
    assert!(copied(&env, &c));
    // A consumer writes into the shared copy: detected and undone. (An
    // older token than the source's; a newer one is also saved first, see
    // tests/refresh.rs.)
    fs::write(&dest, creds_exp(99, now_ms() + 60_000)).unwrap();
    agent.signal(libc::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(3), || copied(&env, &c)),
        "{}",
        agent.stderr()
    );
    // The warning is logged once the reconcile that restored the copy ends.
    assert!(
        agent.wait_log("was modified by another writer", Duration::from_secs(3)),
        "{}",
        agent.stderr()
    );
    fs::write(&dest, "garbage").unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || copied(&env, &c)),
        "resync_interval restores it"
    );
    agent.stop();
}

#[test]
fn source_owner_mismatch_is_refused() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let me = unsafe { libc::geteuid() };
    let other = if me == 0 { 65534 } else { 0 };
    let config = standard_config(&format!("source_owner = \"{other}\"\n{COPY}"));
    let agent = Agent::start(&env, &env.config(&config));
    assert!(
        agent
            .stderr()
            .contains(&format!("is owned by uid {me}, expected uid {other}")),
        "{}",
        agent.stderr()
    );
    assert!(!env.path("shared/.credentials.json").exists());
    agent.stop();
}
