//! `[agent] metrics_file` and `alert_unit` through a scripted session:
//! a refusal, a good file, a restart that keeps failing, an expiry warning.
//! The file is parsed with a real Prometheus text-format parser.
mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

fn metrics(env: &Env) -> BTreeMap<String, f64> {
    let text = fs::read_to_string(env.path("metrics/cred-watch.prom")).unwrap_or_default();
    assert_no_secret(&text, "metrics");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid text exposition");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (format!("{}{{{}}}", s.metric, labels.join(",")), value)
        })
        .collect()
}

fn alert_starts(env: &Env) -> Vec<String> {
    fs::read_to_string(env.restart_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["method"] == "StartUnit").then(|| v["unit"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn a_scripted_session_gives_the_expected_metrics_and_alerts() {
    let env = Env::new();
    fs::create_dir_all(env.path("metrics")).unwrap();
    let src = source_path(&env);
    let config = "[agent]\nstate_dir = \"{ROOT}/state\"\nsettle = \"0s\"\nmetrics_file = \"{ROOT}/metrics/cred-watch.prom\"\nalert_unit = \"cred-watch-alert@%i.service\"\n\n\
         [[watch]]\nname = \"claude-1\"\nsource = \"{ROOT}/home/.claude/.credentials.json\"\nexpiry_warning = \"30m\"\nallow_rollback = true\n\n\
         [[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n\n\
         [watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"0s\"\n".to_string();
    write_atomic(&src, &creds(1));
    let agent = Agent::start_with(
        &env,
        &env.config(&config),
        &[("CRED_WATCH_TEST_RESTART_FAIL", "bridge.service")],
    );
    let m = metrics(&env);
    assert_eq!(m["cred_watch_source_ok{watch=claude-1}"], 1.0, "{m:?}");
    assert!(
        m["cred_watch_token_expiry_timestamp_seconds{watch=claude-1}"] > now_ms() as f64 / 1000.0
    );
    // A refusal: source_ok 0, counted by reason, one alert.
    write_atomic(&src, "{\"claudeAiOauth\": 1}");
    assert!(agent.wait_log("keeping the last good state", Duration::from_secs(5)));
    assert!(wait_until(Duration::from_secs(5), || metrics(&env)
        .get("cred_watch_source_ok{watch=claude-1}")
        == Some(&0.0)));
    let m = metrics(&env);
    assert_eq!(
        m["cred_watch_refusals_total{reason=wrong_type,watch=claude-1}"], 1.0,
        "{m:?}"
    );
    assert_eq!(
        alert_starts(&env),
        vec!["cred-watch-alert@claude\\x2d1.service"]
    );
    // A good file: ok again; its restart fails twice (the first retry):
    // one more alert, the failures counted.
    write_atomic(&src, &creds(2));
    assert!(
        wait_until(Duration::from_secs(10), || metrics(&env)
            .get("cred_watch_restarts_total{result=failed,unit=bridge.service}")
            .is_some_and(|v| *v >= 2.0)),
        "{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(5), || alert_starts(&env).len() == 2),
        "{}",
        agent.stderr()
    );
    let m = metrics(&env);
    assert_eq!(m["cred_watch_source_ok{watch=claude-1}"], 1.0);
    assert_eq!(
        m["cred_watch_restarts_total{result=done,unit=bridge.service}"],
        0.0
    );
    // A token inside the warning window: a warning, and (the watch was
    // healthy in between) an alert.
    write_atomic(&src, &creds_exp(3, now_ms() + 10 * 60_000));
    assert!(agent.wait_log("is anything refreshing it?", Duration::from_secs(5)));
    assert!(
        wait_until(Duration::from_secs(5), || alert_starts(&env).len() == 3),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    // Counters survive an agent restart (they come from the state).
    let agent = Agent::start(&env, &env.config(&config));
    let m = metrics(&env);
    assert_eq!(
        m["cred_watch_refusals_total{reason=wrong_type,watch=claude-1}"], 1.0,
        "{m:?}"
    );
    assert!(m["cred_watch_restarts_total{result=failed,unit=bridge.service}"] >= 2.0);
    assert!(m["cred_watch_last_reconcile_timestamp_seconds{}"] > 0.0);
    agent.stop();
}
