//! The agent and `sync` follow the same per-watch rules (one tracker).
mod common;
use common::*;
use std::fs;
use std::time::Duration;

const COPY: &str = "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n";

/// Before the tracker, `sync` kept its own copy of the state rules: after
/// the agent refused a broken file and was stopped, a `sync` that applied
/// a good file left `status` showing `ok (sync)` and the old refusal.
#[test]
fn sync_after_an_agent_refusal_clears_the_refusal() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(COPY));
    let agent = Agent::start(&env, &config);
    write_atomic(&src, "{\"claudeAiOauth\": {}}");
    assert!(
        agent.wait_log("keeping the last good state", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    let cfg = config.to_str().unwrap();
    let (_, out, _) = env.cmd(&["status", "--config", cfg]);
    assert!(out.contains("last refusal"), "{out}");
    write_atomic(&src, &creds(2));
    let (code, out, _) = env.cmd(&["sync", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = env.cmd(&["status", "--config", cfg]);
    assert!(out.contains("ok (sync)"), "{out}");
    assert!(!out.contains("last refusal"), "stale refusal:\n{out}");
    env.assert_state_clean();
}

/// A token that is already inside `expiry_warning` when the agent starts
/// is warned about at once, not only at its expiry. (The rule itself is
/// proven in `tracker::tests`; the old agent usually got woken by
/// something else and warned anyway.)
#[test]
fn a_token_inside_the_warning_window_at_start_is_warned_at_once() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds_exp(1, now_ms() + 20 * 60_000));
    let agent = Agent::start(&env, &env.config(&standard_config(COPY)));
    assert!(
        agent.wait_log("is anything refreshing it?", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(!agent.stderr().contains("expired at"), "{}", agent.stderr());
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Operator round 2: the log says when a restart really happens: after the
/// quiet period for the first change, held back by `min_interval` after a
/// restart (not "after 100ms quiet" for every line of a burst).
#[test]
fn restart_log_lines_say_when_the_restart_really_happens() {
    let env = Env::new();
    let (src, agent) = agent_on_creds(
        &env,
        "[watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"30s\"\n",
    );
    write_atomic(&src, &creds(2));
    assert!(
        agent.wait_log("(after 100ms quiet)", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(wait_until(Duration::from_secs(5), || env.restarts().len() == 1));
    // The recorder writes its line before the agent learns the restart is
    // done: a change in between is "once the restart under way has finished".
    assert!(
        agent.wait_log("restarted bridge.service", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    write_atomic(&src, &creds(3));
    assert!(
        agent.wait_log(
            "(min_interval 30s since its last restart)",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Restarts follow state: a unit needs a restart when it was last started
/// before the credential it should use was written. Start times come from
/// the recorder (its own restarts, else `CRED_WATCH_TEST_STARTED_AT`).
fn with_bridge_started_at(env: &Env, ms: i64) -> (String, String) {
    let file = env.path("started-at");
    fs::write(&file, format!("bridge.service {ms}\n")).unwrap();
    (
        "CRED_WATCH_TEST_STARTED_AT".to_string(),
        file.to_str().unwrap().to_string(),
    )
}

const BRIDGE: &str = "[watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"0s\"\n";

#[test]
fn a_bridge_older_than_the_current_token_is_restarted_once_at_first_start() {
    let env = Env::new();
    let (k, v) = with_bridge_started_at(&env, now_ms() - 60_000);
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(BRIDGE));
    let agent = Agent::start_with(&env, &config, &[(&k, &v)]);
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts().len() == 1),
        "{}",
        agent.stderr()
    );
    agent.stop();
    // Started again: the bridge was restarted after the token was written.
    let agent = Agent::start_with(&env, &config, &[(&k, &v)]);
    assert!(
        agent.wait_log("in sync, not restarted", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    round_trip(&env, &agent);
    assert_eq!(env.restarts().len(), 1, "{}", agent.stderr());
    agent.stop();
}

#[test]
fn a_bridge_started_after_the_change_is_not_restarted_for_it() {
    let env = Env::new();
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let config = env.config(&standard_config(BRIDGE));
    // First run: adopted (the recorder knows no start time yet).
    let agent = Agent::start(&env, &config);
    agent.stop();
    // A change while the agent is down, then someone restarts the bridge.
    write_atomic(&src, &creds(2));
    let (k, v) = with_bridge_started_at(&env, now_ms() + 1_000);
    let agent = Agent::start_with(&env, &config, &[(&k, &v)]);
    assert!(
        agent.wait_log("in sync, not restarted", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    round_trip(&env, &agent);
    assert!(env.restarts().is_empty(), "{:?}", env.restarts());
    // The same change with the bridge older than it: restarted once.
    agent.stop();
    write_atomic(&src, &creds(3));
    let (k, v) = with_bridge_started_at(&env, now_ms() - 10_000);
    let agent = Agent::start_with(&env, &config, &[(&k, &v)]);
    assert!(wait_until(Duration::from_secs(5), || env.restarts().len() == 1));
    agent.stop();
}

/// Operator round 2, item 4: a misspelled unit fails; once the name is
/// fixed and the configuration reloaded, the real bridge (older than the
/// token) is restarted, and the removed name is neither retried nor left
/// pending.
#[test]
fn a_fixed_unit_name_restarts_the_real_unit_and_drops_the_typo() {
    let env = Env::new();
    let (k, v) = with_bridge_started_at(&env, now_ms() - 60_000);
    let src = source_path(&env);
    write_atomic(&src, &creds(1));
    let typo = "[watch.restart]\nunits = [\"bridge-prodution.service\"]\nmin_interval = \"0s\"\n";
    let config = env.config(&standard_config(typo));
    let agent = Agent::start_with(
        &env,
        &config,
        &[
            (&k, &v),
            ("CRED_WATCH_TEST_RESTART_FAIL", "bridge-prodution.service"),
        ],
    );
    write_atomic(&src, &creds(2));
    assert!(
        agent.wait_log(
            "restart of bridge-prodution.service failed",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    env.config(&standard_config(BRIDGE));
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_log("its pending restart is dropped", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(5), || env
            .restarts()
            .iter()
            .any(|u| u == "bridge.service")),
        "the real bridge is restarted: {:?}\n{}",
        env.restarts(),
        agent.stderr()
    );
    let tries = env
        .restarts()
        .iter()
        .filter(|u| *u == "bridge-prodution.service")
        .count();
    // Past its backoff, the typo would have been tried again.
    std::thread::sleep(Duration::from_millis(2500));
    round_trip(&env, &agent);
    let after = env
        .restarts()
        .iter()
        .filter(|u| *u == "bridge-prodution.service")
        .count();
    assert_eq!(
        after,
        tries,
        "the removed unit is retried:\n{}",
        agent.stderr()
    );
    let state = read_json(&env.path("state/state.json")).unwrap();
    assert_ne!(
        state["units"]["bridge-prodution.service"]["pending"], true,
        "{state}"
    );
    agent.stop();
}
