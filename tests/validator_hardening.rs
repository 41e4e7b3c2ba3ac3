//! Issue 9, items 1, 6 and 13: the validator's bounds, with the real agent.
//! A far-future `expiresAt` is refused (never a panic, in `run`, `sync` and
//! `doctor`), a year-9999 one cannot wedge later refreshes as rollbacks, and
//! tokens with bad characters, over-long tokens and duplicate JSON keys are
//! refused without their text reaching a log and without being copied.
mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

const WATCH: &str = r#"
[[watch.copy]]
dest = "{ROOT}/shared/.credentials.json"

[watch.restart]
units = ["bridge.service"]
min_interval = "0s"
"#;

/// 10000-01-01T00:00:00Z: the first millisecond RFC 3339 cannot show.
const YEAR_10000: i64 = 253_402_300_800_000;
/// 9999-12-31T00:00:00Z: a date, but implausibly far ahead.
const YEAR_9999: i64 = 253_402_214_400_000;

struct Setup {
    env: Env,
    config: PathBuf,
    src: PathBuf,
    copy: PathBuf,
}

fn setup() -> Setup {
    let env = Env::new();
    let src = source_path(&env);
    fs::create_dir_all(env.path("shared")).unwrap();
    let config = env.config(&standard_config(WATCH));
    let copy = env.path("shared/.credentials.json");
    Setup {
        env,
        config,
        src,
        copy,
    }
}

/// The first log line written after byte `from` that refuses or applies a
/// source file.
fn next_verdict(agent: &Agent, from: usize) -> Option<String> {
    let mut verdict = None;
    wait_until(WAIT, || {
        let log = agent.stderr();
        verdict = log
            .get(from..)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("keeping the last good state") || l.contains(": applied "))
            .map(str::to_string);
        verdict.is_some()
    });
    verdict
}

/// Writes `content` to the source; `Err` says how the agent failed to
/// refuse it with a line naming `reason`, or to keep the last good copy.
fn refusal(s: &Setup, agent: &mut Agent, content: &str, reason: &str) -> Result<(), String> {
    let from = agent.stderr().len();
    let before = fs::read(&s.copy).ok();
    write_atomic(&s.src, content);
    let verdict = next_verdict(agent, from);
    let mut problems = Vec::new();
    match &verdict {
        Some(l) if l.contains("refused: ") && l.contains(reason) => {}
        Some(l) if l.contains(": applied ") => problems.push("accepted and applied".to_string()),
        Some(l) => problems.push(format!("refused for another reason: {l}")),
        None => problems.push("no verdict logged".to_string()),
    }
    if let Some(status) = agent.exited_within(Duration::ZERO) {
        problems.push(format!("the agent exited: {status}"));
    }
    if fs::read(&s.copy).ok() != before {
        problems.push("the copy was rewritten".to_string());
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(format!("{reason}: {}", problems.join("; "))),
    }
}

/// Runs every case, then fails listing all that were not refused.
fn expect_refusals(s: &Setup, agent: &mut Agent, cases: &[(String, String)]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(content, reason)| refusal(s, agent, content, reason).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases not refused as expected:\n{}\n--- agent log:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        agent.stderr()
    );
}

/// The access token in a copy (compared, never printed).
fn copied_access_token(copy: &Path) -> Option<String> {
    read_json(copy)?["claudeAiOauth"]["accessToken"]
        .as_str()
        .map(str::to_string)
}

/// Waits until the copy holds the credential number `seq` of `creds`.
fn wait_copied(s: &Setup, agent: &Agent, seq: u64) {
    let want = format!("sk-ant-oat01-test-access-{seq:06}");
    assert!(
        wait_until(WAIT, || copied_access_token(&s.copy).as_deref()
            == Some(want.as_str())),
        "credential {seq} was not copied:\n{}",
        agent.stderr()
    );
}

/// `doctor` with the units double, like tests/doctor.rs: (exit code, stdout).
fn doctor(s: &Setup) -> (i32, String) {
    let units = s.env.path("units.json");
    fs::write(
        &units,
        r#"{"units": {"bridge.service": {"load_state": "loaded", "active_state": "active"}}}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--config", s.config.to_str().unwrap()])
        .env("CRED_WATCH_TEST_UNITS", &units)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_no_secret(&stdout, "doctor stdout");
    assert_no_secret(&stderr, "doctor stderr");
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// A good file applied and copied; returns the agent and the copy's bytes.
fn start_with_good(s: &Setup) -> (Agent, Vec<u8>) {
    write_atomic(&s.src, &creds(1));
    let agent = Agent::start(&s.env, &s.config);
    wait_copied(s, &agent, 1);
    let good = fs::read(&s.copy).unwrap();
    (agent, good)
}

/// SIGTERM exits 0 and the log holds no token text.
fn stop(agent: Agent) -> String {
    let (status, log) = agent.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{log}");
    for text in [
        "SECRET",
        "test-access-0000",
        "test-refresh-0000",
        "panicked",
    ] {
        assert!(!log.contains(text), "{text:?} in the log:\n{log}");
    }
    log
}

#[test]
fn far_future_expiry_is_refused_and_the_agent_stays_up() {
    let s = setup();
    let (mut agent, good) = start_with_good(&s);
    let cases: Vec<(String, String)> = [(2, YEAR_10000), (3, i64::MAX), (4, i64::MAX - 1)]
        .into_iter()
        .map(|(seq, exp)| {
            (
                creds_exp(seq, exp),
                format!("{exp} ms since the epoch: not a valid date"),
            )
        })
        .collect();
    expect_refusals(&s, &mut agent, &cases);
    assert_eq!(fs::read(&s.copy).unwrap(), good, "last good copy kept");
    stop(agent);
    s.env.assert_state_clean();
}

#[test]
fn sync_and_doctor_refuse_far_future_expiry_with_exit_1() {
    let s = setup();
    let config = s.config.to_str().unwrap();
    write_atomic(&s.src, &creds(1));
    let (code, out, err) = s.env.cmd(&["sync", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    let good = fs::read(&s.copy).unwrap();
    let mut failures = Vec::new();
    for exp in [YEAR_10000, i64::MAX] {
        write_atomic(&s.src, &creds_exp(2, exp));
        let (code, out, err) = s.env.cmd(&["sync", "--config", config]);
        if code != 1 || !out.contains("refused") || !out.contains("not a valid date") {
            failures.push(format!("sync, expiresAt {exp}: exit {code}\n{out}{err}"));
        }
        let (code, out) = doctor(&s);
        if code != 1 || !out.contains("not a valid date") {
            failures.push(format!("doctor, expiresAt {exp}: exit {code}\n{out}"));
        }
        if fs::read(&s.copy).unwrap() != good {
            failures.push(format!("sync, expiresAt {exp}: the copy was rewritten"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.env.assert_state_clean();
}

#[test]
fn year_9999_is_refused_and_later_refreshes_still_apply() {
    let s = setup();
    let (mut agent, _) = start_with_good(&s);
    let far = vec![(creds_exp(2, YEAR_9999), "max_lifetime".to_string())];
    expect_refusals(&s, &mut agent, &far);
    // A genuine refresh afterwards is applied, not refused as a rollback.
    write_atomic(&s.src, &creds(3));
    wait_copied(&s, &agent, 3);
    let log = stop(agent);
    assert!(!log.contains("refused: rollback"), "{log}");

    // The same after an agent restart: the state holds no far-future expiry.
    let mut agent = Agent::start(&s.env, &s.config);
    let far = vec![(creds_exp(4, YEAR_9999), "max_lifetime".to_string())];
    expect_refusals(&s, &mut agent, &far);
    write_atomic(&s.src, &creds(5));
    wait_copied(&s, &agent, 5);
    let log = stop(agent);
    assert!(!log.contains("refused: rollback"), "{log}");
    let (code, out, err) = s.env.cmd(&["sync", "--config", s.config.to_str().unwrap()]);
    assert_eq!(code, 0, "the genuine file is in sync:\n{out}{err}");
    s.env.assert_state_clean();
}

/// Replaces the access (or refresh) token of `creds(seq)` with its prefix
/// followed by `tail`, a JSON string fragment (escapes allowed).
fn with_token(seq: u64, refresh: bool, tail: &str) -> String {
    let (kind, prefix) = if refresh {
        ("refresh", "sk-ant-ort01-")
    } else {
        ("access", "sk-ant-oat01-")
    };
    creds(seq).replace(
        &format!("{prefix}test-{kind}-{seq:06}"),
        &format!("{prefix}{tail}"),
    )
}

/// After the refusals, a good file is still applied, and it alone restarted
/// the unit.
fn good_file_still_applies(s: &Setup, agent: &Agent, seq: u64) {
    write_atomic(&s.src, &creds(seq));
    wait_copied(s, agent, seq);
    assert!(
        wait_until(WAIT, || !s.env.restarts().is_empty()),
        "{}",
        agent.stderr()
    );
    assert_eq!(s.env.restarts().len(), 1, "no restart for any refused file");
}

#[test]
fn tokens_with_bad_characters_or_over_4_kib_are_refused() {
    let s = setup();
    let (mut agent, good) = start_with_good(&s);
    let chars = "has a character outside [A-Za-z0-9_-] after its prefix";
    let access = format!("`accessToken` {chars}");
    let refresh = format!("`refreshToken` {chars}");
    let cases: Vec<(String, String)> = vec![
        (
            with_token(10, false, r"SECRETnul\u0000tail"),
            access.clone(),
        ),
        (with_token(11, true, "SECRET space"), refresh.clone()),
        (with_token(12, false, r"SECRET\u001besc"), access.clone()),
        (with_token(13, true, r"SECRETx\ttab"), refresh.clone()),
        (with_token(14, false, r"SECRETxy\u007fdel"), access),
        (with_token(15, true, "SECRET\u{e9}"), refresh),
        (
            with_token(16, false, &"SECRETlong".repeat(500)),
            "`accessToken` is 5013 bytes long (at most 4096)".to_string(),
        ),
    ];
    expect_refusals(&s, &mut agent, &cases);
    assert_eq!(fs::read(&s.copy).unwrap(), good, "nothing copied");
    assert_eq!(mode(&s.src), 0o600);
    good_file_still_applies(&s, &agent, 20);
    stop(agent);
    s.env.assert_state_clean();
}

#[test]
fn duplicate_json_keys_are_refused_at_any_depth() {
    let s = setup();
    let (mut agent, good) = start_with_good(&s);
    let valid = creds(30);
    let oauth = &valid[valid.find("{\"accessToken").unwrap()..valid.find(",\"mcpOAuth").unwrap()];
    let cases: Vec<(String, String)> = vec![
        (
            // The first `claudeAiOauth` is broken, the last one is fine.
            format!(
                r#"{{"claudeAiOauth":{{"accessToken":"sk-ant-oat01-SECRETbroken"}},"claudeAiOauth":{oauth}}}"#
            ),
            "duplicate key `claudeAiOauth` at line 1".to_string(),
        ),
        (
            creds(31).replace("\"expiresAt\":", "\"expiresAt\":1,\"expiresAt\":"),
            "duplicate key `claudeAiOauth.expiresAt` at line 1".to_string(),
        ),
        (
            // A key that is not a plain identifier is not quoted.
            creds(32).replace("}}}", "},\"server|abc\":{}}}"),
            "a duplicate key at line 1".to_string(),
        ),
    ];
    expect_refusals(&s, &mut agent, &cases);
    assert_eq!(fs::read(&s.copy).unwrap(), good, "nothing copied");
    // The same key name in different objects is fine (`accessToken` is
    // also under `mcpOAuth`).
    good_file_still_applies(&s, &agent, 33);
    let log = stop(agent);
    assert!(!log.contains("server|abc"), "{log}");
    s.env.assert_state_clean();
}
