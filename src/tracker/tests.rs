//! The tracker's rules with synthetic time: no sleeps, no files.

use super::*;
use crate::config::parse_str;
use crate::reconcile::Notice;
use crate::validate::Refusal;
use std::collections::BTreeMap;
use std::path::Path;

const T0: i64 = 1_900_000_000_000;
/// When the source files in these tests were written.
const WRITTEN: i64 = T0 - 60_000;
const MIN: Duration = Duration::from_secs(60);

fn watch() -> WatchSettings {
    let text = r#"
[[watch]]
name = "w"
source = "/home/u/.claude/.credentials.json"
deletion_grace = "30s"
expiry_warning = "30m"
[watch.restart]
units = ["bridge.service"]
"#;
    parse_str(Path::new("/t.toml"), text)
        .unwrap()
        .watches
        .remove(0)
}

fn start() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: T0,
    }
}

fn valid(seq: u8, expires_at: i64, changed: bool) -> Result<Reconciled, FsError> {
    Ok(Reconciled::Applied(Valid {
        fingerprint: Fingerprint::of(&[seq]),
        expires_at: Some(expires_at),
        content_changed: changed,
        written_ms: WRITTEN,
        changes: vec!["mode 0600 -> 0644".into()],
        notices: vec![Notice::Format("`subscriptionType` is missing")],
        errors: Vec::new(),
        written: BTreeMap::new(),
    }))
}

fn logs(fx: &[Effect], level: Level) -> Vec<&str> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Log(l, m) if *l == level => Some(m.as_str()),
            _ => None,
        })
        .collect()
}

/// Restarts that must happen (not mere start-time checks).
fn restarts(fx: &[Effect]) -> usize {
    fx.iter()
        .filter(|e| matches!(e, Effect::Restart(_, need) if need.must))
        .count()
}

#[test]
fn first_sight_is_adopted_and_a_change_owes_a_restart() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let fx = t.on_read(&w, &mut rec, valid(1, T0 + 3_600_000, true), true, now);
    assert_eq!(restarts(&fx), 0, "{fx:?}");
    assert!(logs(&fx, Level::Info)[0].contains("adopted without a restart"));
    // Restarts follow state: a unit known to have started before the
    // credential was written is still restarted (a check, not a must).
    let check = Need {
        written_ms: Some(WRITTEN),
        must: false,
    };
    assert!(fx.contains(&Effect::Restart(vec!["bridge.service".into()], check)));
    assert_eq!(rec.expires_at_ms, Some(T0 + 3_600_000));
    assert_eq!(rec.written_ms, Some(WRITTEN));
    let fx = t.on_read(&w, &mut rec, valid(2, T0 + 7_200_000, true), true, now);
    let must = Need {
        written_ms: Some(WRITTEN),
        must: true,
    };
    assert_eq!(
        fx.iter().find(|e| matches!(e, Effect::Restart(..))),
        Some(&Effect::Restart(vec!["bridge.service".into()], must))
    );
    // The same credential again: nothing owed, nothing logged above debug.
    let again = valid(2, T0 + 7_200_000, false).map(|r| match r {
        Reconciled::Applied(mut v) => {
            v.changes.clear();
            Reconciled::Applied(v)
        }
        other => other,
    });
    let fx = t.on_read(&w, &mut rec, again, true, now);
    assert_eq!(restarts(&fx), 0);
    assert!(
        logs(&fx, Level::Info).is_empty() && logs(&fx, Level::Warn).is_empty(),
        "{fx:?}"
    );
}

#[test]
fn format_warnings_once_per_credential_tampering_every_time() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let tampered = || {
        valid(1, T0 + 3_600_000, false).map(|r| match r {
            Reconciled::Applied(mut v) => {
                v.notices.push(Notice::CopyTampered { dest: "/d".into() });
                Reconciled::Applied(v)
            }
            other => other,
        })
    };
    let fx = t.on_read(&w, &mut rec, tampered(), true, now);
    assert_eq!(logs(&fx, Level::Warn).len(), 2, "{fx:?}");
    let fx = t.on_read(&w, &mut rec, tampered(), true, now);
    let warns = logs(&fx, Level::Warn);
    assert_eq!(warns.len(), 1, "{fx:?}");
    assert!(warns[0].contains("modified by another writer"));
}

#[test]
fn a_refusal_is_warned_once_and_cleared_by_a_good_file() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let refused = || Ok(Reconciled::Invalid(Refusal::Missing("accessToken")));
    let fx = t.on_read(&w, &mut rec, refused(), true, now);
    assert_eq!(logs(&fx, Level::Warn).len(), 1);
    assert!(fx.contains(&Effect::Status("w: refused a source file".into())));
    let fx = t.on_read(&w, &mut rec, refused(), true, now);
    assert!(logs(&fx, Level::Warn).is_empty(), "de-duplicated: {fx:?}");
    assert!(t.is_refused() && rec.problem().is_some());
    // What `sync` left stale before the tracker: a good file clears it.
    t.on_read(&w, &mut rec, valid(1, T0 + 3_600_000, true), true, now);
    assert!(!t.is_refused());
    assert_eq!(rec.last_refusal, None);
    assert_eq!(rec.problem(), None);
    // A partial write is not a refusal until the write is known complete.
    let partial = || {
        Ok(Reconciled::Invalid(Refusal::InvalidJson(
            "truncated".into(),
        )))
    };
    let fx = t.on_read(&w, &mut rec, partial(), false, now);
    assert!(logs(&fx, Level::Warn).is_empty() && rec.last_refusal.is_none());
    let fx = t.on_read(&w, &mut rec, partial(), true, now);
    assert_eq!(logs(&fx, Level::Warn).len(), 1);
}

#[test]
fn deletion_grace_warns_once_after_the_grace() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let fx = t.on_read(&w, &mut rec, Ok(Reconciled::Absent), true, now);
    assert!(logs(&fx, Level::Info)[0].contains("is absent"));
    assert_eq!(
        t.next_deadline(&w, now),
        Some(now.at + Duration::from_secs(30))
    );
    assert!(t
        .on_tick(&w, &mut rec, now.plus(Duration::from_secs(29)))
        .is_empty());
    let fx = t.on_tick(&w, &mut rec, now.plus(Duration::from_secs(30)));
    assert!(logs(&fx, Level::Warn)[0].contains("looks like a logout"));
    assert!(t.on_tick(&w, &mut rec, now.plus(MIN)).is_empty(), "once");
    assert_eq!(t.next_deadline(&w, now.plus(MIN)), None, "idle: no wake-up");
    let fx = t.on_read(
        &w,
        &mut rec,
        valid(1, T0 + 3_600_000, true),
        true,
        now.plus(MIN),
    );
    assert!(logs(&fx, Level::Info)[0].contains("is back"));
}

#[test]
fn expiry_warns_then_errors_once_each() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    t.on_read(&w, &mut rec, valid(1, T0 + 120 * 60_000, true), true, now);
    let warn_at = now.plus(90 * MIN);
    assert_eq!(t.next_deadline(&w, now), Some(warn_at.at));
    assert!(t.on_tick(&w, &mut rec, now.plus(89 * MIN)).is_empty());
    let fx = t.on_tick(&w, &mut rec, warn_at);
    assert!(logs(&fx, Level::Warn)[0].contains("expires at"), "{fx:?}");
    assert_eq!(t.next_deadline(&w, warn_at), Some(now.plus(120 * MIN).at));
    assert!(
        t.on_tick(&w, &mut rec, now.plus(100 * MIN)).is_empty(),
        "warned once"
    );
    let fx = t.on_tick(&w, &mut rec, now.plus(120 * MIN));
    assert!(logs(&fx, Level::Error)[0].contains("expired at"), "{fx:?}");
    assert!(t.on_tick(&w, &mut rec, now.plus(200 * MIN)).is_empty());
    assert_eq!(t.next_deadline(&w, now.plus(200 * MIN)), None);
}

/// Found in review: a token applied already inside the warning window got
/// its next deadline at the expiry itself, so the warning never came.
#[test]
fn a_token_applied_inside_the_warning_window_is_warned_about_at_once() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    t.on_read(&w, &mut rec, valid(1, T0 + 20 * 60_000, true), true, now);
    let due = t.next_deadline(&w, now).unwrap();
    assert!(due <= now.at, "deadline {due:?} is after now");
    let fx = t.on_tick(&w, &mut rec, now);
    assert!(logs(&fx, Level::Warn)[0].contains("(in 20m)"), "{fx:?}");
    assert_eq!(t.next_deadline(&w, now), Some(now.plus(20 * MIN).at));
    // Also when the agent starts with such a token in its state.
    let t = Tracker::new(Some(&rec));
    assert!(t.next_deadline(&w, now).is_some_and(|d| d <= now.at));
}

#[test]
fn failed_actions_are_retried_with_backoff_and_do_not_advance_the_state() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let failing = || {
        valid(1, T0 + 3_600_000, true).map(|r| match r {
            Reconciled::Applied(mut v) => {
                v.errors.push(FsError::Missing("/dest".into()));
                Reconciled::Applied(v)
            }
            other => other,
        })
    };
    let fx = t.on_read(&w, &mut rec, failing(), true, now);
    assert!(
        logs(&fx, Level::Error)[0].ends_with("retrying in 1s"),
        "{fx:?}"
    );
    assert_eq!(rec.fingerprint, None, "nothing recorded as applied");
    assert_eq!(restarts(&fx), 0);
    assert_eq!(
        t.next_deadline(&w, now),
        Some(now.plus(Duration::from_secs(1)).at)
    );
    assert!(!t.on_tick(&w, &mut rec, now).contains(&Effect::Reread));
    let later = now.plus(Duration::from_secs(1));
    assert!(t.on_tick(&w, &mut rec, later).contains(&Effect::Reread));
    let fx = t.on_read(&w, &mut rec, failing(), true, later);
    assert!(
        logs(&fx, Level::Error)[0].ends_with("retrying in 2s"),
        "{fx:?}"
    );
    t.on_read(&w, &mut rec, valid(1, T0 + 3_600_000, true), true, later);
    assert_eq!(rec.last_error, None);
    assert_eq!(t.next_deadline(&w, later), Some(now.plus(30 * MIN).at));
}

#[test]
fn rollback_bookkeeping_keeps_the_last_applied_credential() {
    let (w, now) = (watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    t.on_read(&w, &mut rec, valid(2, T0 + 7_200_000, true), true, now);
    let applied = rec.applied().unwrap();
    assert_eq!(applied.fingerprint, Fingerprint::of(&[2]));
    assert_eq!(applied.expires_at, Some(T0 + 7_200_000));
    let rollback = Refusal::Rollback {
        new: T0 + 3_600_000,
        last: T0 + 7_200_000,
    };
    let fx = t.on_read(&w, &mut rec, Ok(Reconciled::Invalid(rollback)), true, now);
    assert!(logs(&fx, Level::Warn)[0].contains("rollback"));
    assert_eq!(
        rec.applied(),
        Some(applied),
        "the newer credential stays the reference"
    );
}

fn refreshing_watch() -> WatchSettings {
    let text = r#"
[[watch]]
name = "w"
source = "/home/u/.claude/.credentials.json"
[watch.refresh]
unit = "claude-refresh.service"
ahead = "4m"
timeout = "2m"
"#;
    parse_str(Path::new("/t.toml"), text)
        .unwrap()
        .watches
        .remove(0)
}

fn starts(fx: &[Effect]) -> usize {
    fx.iter()
        .filter(|e| matches!(e, Effect::StartRefresh(_)))
        .count()
}

#[test]
fn refresh_starts_once_ahead_of_expiry_and_a_newer_token_ends_it() {
    let (w, now) = (refreshing_watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let exp = T0 + 60 * 60_000;
    t.on_read(&w, &mut rec, valid(1, exp, true), true, now);
    let due = now.plus(56 * MIN);
    assert_eq!(t.next_deadline(&w, now), Some(due.at));
    assert_eq!(starts(&t.on_tick(&w, &mut rec, now.plus(55 * MIN))), 0);
    let fx = t.on_tick(&w, &mut rec, due);
    assert_eq!(
        fx.iter().find(|e| matches!(e, Effect::StartRefresh(_))),
        Some(&Effect::StartRefresh("claude-refresh.service".into()))
    );
    // One in flight: nothing more, however often time passes.
    assert_eq!(starts(&t.on_tick(&w, &mut rec, due.plus(MIN))), 0);
    t.on_refresh_outcome(&w, &mut rec, Ok(()), due.plus(MIN));
    assert_eq!(
        t.next_deadline(&w, due.plus(MIN)),
        Some(due.plus(3 * MIN).at),
        "waits for the token"
    );
    let fx = t.on_read(
        &w,
        &mut rec,
        valid(2, exp + 8 * 60 * 60_000, true),
        true,
        due.plus(2 * MIN),
    );
    assert!(
        logs(&fx, Level::Info)
            .iter()
            .any(|l| l.contains("refreshed through claude-refresh.service")),
        "{fx:?}"
    );
    let r = rec.refresh.clone().unwrap();
    assert_eq!((r.refreshes, r.failures, r.last_error), (1, 0, None));
    // The waiting is over: no failure when the timeout passes.
    let fx = t.on_tick(&w, &mut rec, due.plus(10 * MIN));
    assert!(
        logs(&fx, Level::Error).is_empty() && starts(&fx) == 0,
        "{fx:?}"
    );
}

#[test]
fn a_refresh_that_brings_nothing_fails_and_backs_off() {
    let (w, now) = (refreshing_watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let exp = T0 + 3 * 60_000;
    // Applied inside `ahead`: due at once.
    t.on_read(&w, &mut rec, valid(1, exp, true), true, now);
    assert_eq!(starts(&t.on_tick(&w, &mut rec, now)), 1);
    t.on_refresh_outcome(&w, &mut rec, Ok(()), now);
    let fx = t.on_tick(&w, &mut rec, now.plus(2 * MIN));
    let errors = logs(&fx, Level::Error);
    assert!(
        errors[0].contains("no newer token arrived within 2m")
            && errors[0].ends_with("retrying in 30s"),
        "{fx:?}"
    );
    assert_eq!(
        rec.problem().map(String::as_str),
        Some("claude-refresh.service ran but no newer token arrived within 2m")
    );
    let retry = now.plus(2 * MIN + Duration::from_secs(30));
    assert_eq!(
        t.next_deadline(&w, now.plus(2 * MIN))
            .map(|d| d >= retry.at),
        Some(true)
    );
    assert_eq!(
        starts(&t.on_tick(&w, &mut rec, now.plus(2 * MIN + Duration::from_secs(29)))),
        0
    );
    assert_eq!(starts(&t.on_tick(&w, &mut rec, retry)), 1);
    // A failed job backs off further: 1 min, and never more than 5 min.
    let fx = t.on_refresh_outcome(
        &w,
        &mut rec,
        Err("job for claude-refresh.service finished with result \"failed\"".into()),
        retry,
    );
    assert!(
        logs(&fx, Level::Error)[0].ends_with("retrying in 1m"),
        "{fx:?}"
    );
    assert_eq!(REFRESH_RETRY.delay(10), Duration::from_secs(300));
}

#[test]
fn nothing_is_started_while_absent_or_refused_or_after_an_interactive_refresh() {
    let (w, now) = (refreshing_watch(), start());
    let mut rec = WatchRecord::default();
    let mut t = Tracker::new(None);
    let exp = T0 + 60 * 60_000;
    t.on_read(&w, &mut rec, valid(1, exp, true), true, now);
    // Someone ran the CLI: a newer token before the refresh was due.
    t.on_read(
        &w,
        &mut rec,
        valid(2, exp + 60 * 60_000, true),
        true,
        now.plus(50 * MIN),
    );
    assert_eq!(
        starts(&t.on_tick(&w, &mut rec, now.plus(57 * MIN))),
        0,
        "not for the replaced token"
    );
    t.on_read(
        &w,
        &mut rec,
        Ok(Reconciled::Absent),
        true,
        now.plus(60 * MIN),
    );
    assert_eq!(
        t.next_deadline(&w, now.plus(60 * MIN))
            .map(|d| d < now.plus(200 * MIN).at),
        Some(true),
        "grace only"
    );
    assert_eq!(
        starts(&t.on_tick(&w, &mut rec, now.plus(117 * MIN))),
        0,
        "absent: a logout"
    );
    let refused = Ok(Reconciled::Invalid(Refusal::Missing("accessToken")));
    t.on_read(&w, &mut rec, refused, true, now.plus(118 * MIN));
    assert_eq!(
        starts(&t.on_tick(&w, &mut rec, now.plus(118 * MIN))),
        0,
        "refused"
    );
}
