//! `[watch.refresh]` on the host, with the recorder standing in for
//! systemd: the test plays the CLI that the refresh unit would run.
mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const REFRESH_UNIT: &str = "claude-refresh.service";

fn config(timeout: &str) -> String {
    standard_config(&format!(
        "[[watch.copy]]\ndest = \"{{ROOT}}/shared/.credentials.json\"\n\n\
         [watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"0s\"\n\n\
         [watch.refresh]\nunit = \"{REFRESH_UNIT}\"\nahead = \"4m\"\ntimeout = \"{timeout}\"\n"
    ))
}

/// The jobs the recorder saw, as (unit, method).
fn jobs(env: &Env) -> Vec<(String, String)> {
    fs::read_to_string(env.restart_log())
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["unit"].as_str().unwrap().to_string(),
                v["method"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn starts(env: &Env) -> usize {
    jobs(env).iter().filter(|(_, m)| m == "StartUnit").count()
}

fn restarts_of_bridge(env: &Env) -> usize {
    jobs(env)
        .iter()
        .filter(|(u, m)| u == "bridge.service" && m == "RestartUnit")
        .count()
}

fn setup() -> (Env, PathBuf) {
    let env = Env::new();
    let src = source_path(&env);
    (env, src)
}

fn state_refresh(env: &Env) -> serde_json::Value {
    read_json(&env.path("state/state.json")).unwrap_or_default()["watches"]["claude"]["refresh"]
        .clone()
}

fn write_later_token(src: &Path, seq: u64) -> String {
    let text = creds_exp(seq, now_ms() + 8 * 3_600_000);
    write_atomic(src, &text);
    text
}

/// A token expiring within `ahead`: the unit is started once, the CLI (the
/// test) writes a newer token, it is copied without its refresh token and
/// the bridge restarts once.
#[test]
fn the_refresh_unit_is_started_ahead_of_expiry_and_its_token_propagates() {
    let (env, src) = setup();
    write_atomic(&src, &creds_exp(1, now_ms() + 3 * 60_000));
    let agent = Agent::start(&env, &env.config(&config("1m")));
    assert!(
        wait_until(Duration::from_secs(5), || starts(&env) == 1),
        "{}",
        agent.stderr()
    );
    let text = write_later_token(&src, 2);
    let dest = env.path("shared/.credentials.json");
    assert!(
        wait_until(Duration::from_secs(5), || read_json(&dest)
            == Some(copied(&text))),
        "{}",
        agent.stderr()
    );
    let copy = fs::read_to_string(&dest).unwrap();
    assert!(
        !copy.contains("refreshToken"),
        "the copy carries a refresh token"
    );
    assert!(wait_until(Duration::from_secs(5), || restarts_of_bridge(
        &env
    ) == 1));
    assert!(
        agent.wait_log(
            "refreshed through claude-refresh.service",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    round_trip(&env, &agent);
    assert_eq!(
        starts(&env),
        1,
        "started again for a token already replaced"
    );
    assert_eq!(state_refresh(&env)["refreshes"], 1);
    let (status, _) = agent.stop();
    assert!(status.success());
    env.assert_state_clean();
}

/// The unit runs but no newer token comes: an error with the reason, in
/// the state and in `status`, and a retry later (30 s backoff).
#[test]
fn a_refresh_that_brings_no_token_is_an_error_shown_in_status() {
    let (env, src) = setup();
    write_atomic(&src, &creds_exp(1, now_ms() + 3 * 60_000));
    let config = env.config(&config("1s"));
    let agent = Agent::start(&env, &config);
    assert!(
        agent.wait_log("refresh failed", Duration::from_secs(10)),
        "{}",
        agent.stderr()
    );
    assert!(agent
        .stderr()
        .contains("no newer token arrived within 1s; retrying in 30s"));
    round_trip(&env, &agent);
    assert_eq!(starts(&env), 1, "backoff: not started again at once");
    assert_eq!(state_refresh(&env)["failures"], 1);
    let (status, _) = agent.stop();
    assert!(status.success());
    let cfg = config.to_str().unwrap();
    let (_, out, _) = env.cmd(&["status", "--config", cfg]);
    assert!(out.contains("refresh FAILED (1 in a row)"), "{out}");
    assert!(
        out.contains("alert raised: the refresh failed") || !out.contains("alert raised"),
        "{out}"
    );
    let (code, out, _) = env.cmd(&["doctor", "--json", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "claude refresh claude-refresh.service")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line["status"], "fail", "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("no newer token arrived"),
        "{line}"
    );
}

/// A start job that fails (e.g. a misspelled unit) is an error too.
#[test]
fn a_failed_start_job_is_an_error() {
    let (env, src) = setup();
    write_atomic(&src, &creds_exp(1, now_ms() + 3 * 60_000));
    let agent = Agent::start_with(
        &env,
        &env.config(&config("1m")),
        &[("CRED_WATCH_TEST_RESTART_FAIL", REFRESH_UNIT)],
    );
    assert!(
        agent.wait_log(
            "refresh failed: job for claude-refresh.service finished with result \"failed\"",
            Duration::from_secs(10)
        ),
        "{}",
        agent.stderr()
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Someone ran the CLI interactively before the refresh was due: nothing
/// is started for the token it replaced.
#[test]
fn an_interactive_refresh_first_means_no_start() {
    let (env, src) = setup();
    let due = now_ms() + 1500;
    write_atomic(&src, &creds_exp(1, due + 4 * 60_000));
    let agent = Agent::start(&env, &env.config(&config("1m")));
    write_later_token(&src, 2);
    assert!(agent.wait_log("restart of bridge.service in", Duration::from_secs(5)));
    // The old token's refresh time passes; the agent has handled it.
    assert!(wait_until(Duration::from_secs(5), || now_ms() > due + 200));
    round_trip(&env, &agent);
    assert_eq!(starts(&env), 0, "{}", agent.stderr());
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// A consumer refreshed through its copy: the copy now holds the only live
/// refresh token. It is saved under `state_dir` (0600) before the copy is
/// restored, with an error that says how to recover.
#[test]
fn a_newer_credential_in_a_copy_is_saved_before_the_copy_is_restored() {
    let (env, src) = setup();
    let source = creds_exp(1, now_ms() + 3_600_000);
    write_atomic(&src, &source);
    let config = env.config(&standard_config(
        "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n",
    ));
    let agent = Agent::start(&env, &config);
    let dest = env.path("shared/.credentials.json");
    assert_eq!(read_json(&dest), Some(copied(&source)));
    // The consumer's CLI refreshed and saved its new pair into the copy.
    let theirs = creds_exp(2, now_ms() + 8 * 3_600_000);
    write_atomic(&dest, &theirs);
    round_trip(&env, &agent);
    assert_eq!(read_json(&dest), Some(copied(&source)), "copy restored");
    let saved: Vec<_> = fs::read_dir(env.path("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("rescued-")
        })
        .collect();
    assert_eq!(saved.len(), 1, "{}", agent.stderr());
    assert_eq!(
        fs::read_to_string(&saved[0]).unwrap(),
        theirs,
        "saved as it was"
    );
    assert_eq!(mode(&saved[0]), 0o600);
    let log = agent.stderr();
    assert!(
        log.contains("ERROR") && log.contains("held a newer credential"),
        "{log}"
    );
    // A consumer writing forged "newer" copies in a loop cannot fill
    // state_dir: one file per watch, holding the newest credential found.
    let newest = creds_exp(3, now_ms() + 9 * 3_600_000);
    for text in [
        newest.clone(),
        creds_exp(4, now_ms() + 8 * 3_600_000 + 60_000),
    ] {
        write_atomic(&dest, &text);
        round_trip(&env, &agent);
        assert_eq!(read_json(&dest), Some(copied(&source)), "copy restored");
    }
    assert_eq!(
        fs::read_to_string(&saved[0]).unwrap(),
        newest,
        "the newest is kept"
    );
    // The last one was older than the one kept: the error says so.
    let log = agent.stderr();
    let last = log
        .lines()
        .rfind(|l| l.contains("held a newer credential"))
        .unwrap_or_default();
    assert!(
        last.contains("the newest one found, rescued earlier, stays in")
            && !last.contains("It was saved to"),
        "{last}"
    );
    // Garbage in the copy is only a tampering warning.
    write_atomic(&dest, "{}");
    round_trip(&env, &agent);
    assert_eq!(read_json(&dest), Some(copied(&source)));
    let (status, _) = agent.stop();
    assert!(status.success());
    let (_, out, _) = env.cmd(&["status", "--config", config.to_str().unwrap()]);
    assert!(out.contains("RESCUED 3"), "{out}");
    let rescued_files = fs::read_dir(env.path("state")).unwrap().count();
    assert_eq!(rescued_files, 3, "state.json, lock and one rescued file");
}
