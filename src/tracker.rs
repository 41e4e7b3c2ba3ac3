//! The rules of one watch, free of I/O: what a read outcome or the passing
//! of time means — refusal de-duplication, deletion grace, expiry warning
//! and error, retry backoff, first-sight adoption — and what the state
//! records. The agent and `sync` feed it events with the current time and
//! carry out the effects it returns, so the two cannot disagree.

use crate::clock::{self, Backoff};
use crate::config::{format_duration, WatchSettings};
use crate::fsutil::FsError;
use crate::reconcile::{Reconciled, Valid};
use crate::schedule::Need;
use crate::state::WatchRecord;
use crate::validate::{fmt_ms, Fingerprint};
use log::Level;
use std::time::{Duration, Instant};

/// Failed actions (a copy, a mode) are retried after 1 s, doubling to 1 min.
pub const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// Failed refreshes are retried after 30 s, doubling to 5 min.
pub const REFRESH_RETRY: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));

/// The current time, injected: monotonic for deadlines, the wall clock for
/// `expiresAt` and the state's timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub wall_ms: i64,
}

impl Now {
    pub fn current() -> Now {
        Now {
            at: Instant::now(),
            wall_ms: crate::state::now_ms(),
        }
    }

    /// `d` later, on both clocks.
    pub fn plus(self, d: Duration) -> Now {
        Now {
            at: clock::later(self.at, d),
            wall_ms: self.wall_ms.saturating_add(clock::ms(d)),
        }
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Log(Level, String),
    /// A `STATUS=` line for systemd.
    Status(String),
    /// These units owe a restart, for `Need` (restarts follow state: the
    /// worker skips a unit started after the credential was written).
    Restart(Vec<String>, Need),
    /// A failed action is due for another try: read the source again.
    Reread,
    /// Start the `[watch.refresh]` unit (the source's CLI refreshes).
    StartRefresh(String),
    /// The watch entered a problem state: start `[agent] alert_unit`.
    Alert(&'static str),
}

/// Where `[watch.refresh]` stands for the token last applied.
#[derive(Debug, Default)]
struct Refresh {
    /// A start job is running (at most one per watch).
    in_flight: bool,
    /// The `expiresAt` of the token the last start was for.
    started_for: Option<i64>,
    /// After a `done` start: a newer token must arrive by then.
    wait_until: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// What one watch remembers between events (the state record holds what
/// must survive an agent restart).
#[derive(Debug, Default)]
pub struct Tracker {
    absent_since: Option<Instant>,
    logout_warned: bool,
    last_refusal: Option<String>,
    retry_at: Option<Instant>,
    failures: u32,
    warned_fp: Option<Fingerprint>,
    expiry_warned: Option<i64>,
    expiry_errored: Option<i64>,
    /// `expiresAt` last applied (mirrors the state record).
    expires_at: Option<i64>,
    /// An alert was raised for the current problem (`[agent] alert_unit`):
    /// not again until the watch has been healthy.
    alerted: bool,
    refresh: Refresh,
}

impl Tracker {
    /// A tracker that continues from the state's record.
    pub fn new(rec: Option<&WatchRecord>) -> Tracker {
        Tracker {
            expires_at: rec.and_then(|r| r.expires_at_ms),
            ..Tracker::default()
        }
    }

    pub fn is_absent(&self) -> bool {
        self.absent_since.is_some()
    }

    pub fn is_refused(&self) -> bool {
        self.last_refusal.is_some()
    }

    /// Absent for longer than its `deletion_grace` (a logout).
    pub fn is_logged_out(&self) -> bool {
        self.absent_since.is_some() && self.logout_warned
    }

    /// The outcome of reading and applying the source. `complete`: the
    /// event said the write is finished (a creation alone does not).
    pub fn on_read(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        result: Result<Reconciled, FsError>,
        complete: bool,
        now: Now,
    ) -> Vec<Effect> {
        let src = w.source.display();
        match result {
            Err(e) => self.fail(w, rec, e.to_string(), now),
            Ok(Reconciled::Absent) => self.absent(w, now),
            Ok(Reconciled::Busy(why)) => vec![debug(format!(
                "{}: {src} {why}; its writer's next event brings it back",
                w.name
            ))],
            Ok(r @ Reconciled::Unsafe(_)) => {
                let msg = r.refusal(&w.source).unwrap_or_default();
                self.refuse(w, rec, msg, "unsafe")
            }
            Ok(Reconciled::Invalid(r)) if r.maybe_partial() && !complete => vec![debug(format!(
                "{}: {src} not complete yet ({r}); waiting for the write to finish",
                w.name
            ))],
            Ok(r @ Reconciled::Invalid(_)) => {
                let kind = match &r {
                    Reconciled::Invalid(refusal) => refusal.kind(),
                    _ => "invalid",
                };
                let msg = r.refusal(&w.source).unwrap_or_default();
                self.refuse(w, rec, msg, kind)
            }
            Ok(Reconciled::Applied(v)) => self.applied(w, rec, v, now),
        }
    }

    fn refuse(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        msg: String,
        kind: &str,
    ) -> Vec<Effect> {
        self.absent_since = None;
        let mut alert = None;
        let mut fx = if self.last_refusal.as_deref() != Some(msg.as_str()) {
            let count = rec.refusals.entry(kind.to_string()).or_default();
            *count = count.saturating_add(1);
            alert = self.alert(rec, "the source was refused");
            vec![
                Effect::Log(Level::Warn, format!("{}: {msg}", w.name)),
                Effect::Status(format!("{}: refused a source file", w.name)),
            ]
        } else {
            vec![debug(format!("{}: {msg} (again)", w.name))]
        };
        self.last_refusal = Some(msg.clone());
        rec.last_refusal = Some(msg);
        fx.extend(alert);
        fx
    }

    fn fail(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        msg: String,
        now: Now,
    ) -> Vec<Effect> {
        self.failures = self.failures.saturating_add(1);
        let delay = RETRY.delay(self.failures);
        self.retry_at = Some(clock::later(now.at, delay));
        let line = format!("{}: {msg}; retrying in {}", w.name, format_duration(delay));
        rec.last_error = Some(msg);
        vec![Effect::Log(Level::Error, line)]
    }

    fn absent(&mut self, w: &WatchSettings, now: Now) -> Vec<Effect> {
        self.last_refusal = None;
        if self.absent_since.is_some() {
            return Vec::new();
        }
        self.absent_since = Some(now.at);
        self.logout_warned = false;
        vec![Effect::Log(
            Level::Info,
            format!(
                "{}: {} is absent; nothing downstream is removed",
                w.name,
                w.source.display()
            ),
        )]
    }

    fn applied(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        v: Valid,
        now: Now,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.absent_since.take().is_some() {
            fx.push(info(format!("{}: {} is back", w.name, w.source.display())));
        }
        self.last_refusal = None;
        let fp = v.fingerprint;
        if self.warned_fp != Some(fp) {
            for n in v.notices.iter().filter(|n| n.once_per_credential()) {
                fx.push(Effect::Log(
                    Level::Warn,
                    format!("{}: {n} (fingerprint {fp})", w.name),
                ));
            }
            self.warned_fp = Some(fp);
        }
        rec.copies.extend(v.written.clone());
        if !v.errors.is_empty() {
            let msg = v
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            fx.extend(self.fail(w, rec, msg, now));
            return fx;
        }
        self.failures = 0;
        self.retry_at = None;
        self.alerted = false;
        rec.alerted = None;
        rec.last_error = None;
        rec.last_refusal = None;
        fx.extend(self.record(w, rec, &v, now));
        let restored = v.notices.iter().any(|n| !n.once_per_credential());
        if let (true, false, Some(r)) = (restored, v.content_changed, &w.restart) {
            // Its readers may have picked up what someone else put there.
            let need = Need {
                written_ms: Some(now.wall_ms),
                must: true,
            };
            fx.push(Effect::Restart(r.units.clone(), need));
        }
        for n in v.notices.iter().filter(|n| !n.once_per_credential()) {
            let level = if n.is_error() {
                rec.rescued = rec.rescued.saturating_add(1);
                Level::Error
            } else {
                Level::Warn
            };
            fx.push(Effect::Log(level, format!("{}: {n}", w.name)));
        }
        fx
    }

    /// Records a successful application; a new credential owes restarts,
    /// except the first one ever seen, which is adopted.
    fn record(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        v: &Valid,
        now: Now,
    ) -> Vec<Effect> {
        let fp = v.fingerprint;
        let expiry = v
            .expires_at
            .map(|e| format!(", expiresAt {}", fmt_ms(e)))
            .unwrap_or_default();
        let changes = if v.changes.is_empty() {
            "nothing to change".to_string()
        } else {
            v.changes.join(", ")
        };
        if !v.content_changed {
            return unchanged(w, rec, v, &expiry, &changes, now);
        }
        let first = rec.fingerprint.is_none();
        let mut fx = self.refreshed(w, rec, v.expires_at, now);
        rec.set_applied(fp, v.expires_at, now.wall_ms);
        rec.written_ms = Some(v.written_ms);
        let need = Need {
            written_ms: Some(v.written_ms),
            must: !first,
        };
        self.expires_at = v.expires_at;
        self.expiry_warned = None;
        self.expiry_errored = None;
        let action = format!("applied {fp}{expiry}: {changes}");
        rec.last_action = Some(action.clone());
        rec.last_action_at_ms = Some(now.wall_ms);
        match &w.restart {
            Some(r) if first => {
                // Adopted, unless a unit is known to have started before
                // they were written (then it holds something older).
                fx.push(info(format!(
                    "{}: {action}; first credentials seen, adopted without a restart unless a unit started before they were written",
                    w.name
                )));
                fx.push(Effect::Restart(r.units.clone(), need));
            }
            Some(r) => {
                // When it really happens (settle, min_interval, a restart
                // under way) is the scheduler's to say.
                fx.push(info(format!(
                    "{}: {action}; restart of {} owed",
                    w.name,
                    r.units.join(", ")
                )));
                fx.push(Effect::Restart(r.units.clone(), need));
            }
            None => fx.push(info(format!("{}: {action}", w.name))),
        }
        fx.push(Effect::Status(format!("{}: applied {fp}", w.name)));
        fx
    }

    /// The alert for a problem, unless one was raised since the watch was
    /// last healthy.
    fn alert(&mut self, rec: &mut WatchRecord, why: &'static str) -> Option<Effect> {
        if std::mem::replace(&mut self.alerted, true) {
            return None;
        }
        rec.alerted = Some(why.to_string());
        Some(Effect::Alert(why))
    }

    /// A restart of one of this watch's units failed again after its
    /// first retry.
    pub fn on_restart_failed(&mut self, rec: &mut WatchRecord) -> Vec<Effect> {
        self.alert(rec, "a restart failed").into_iter().collect()
    }

    /// Time passed: the deletion grace, the expiry warning and error, and
    /// a due retry.
    pub fn on_tick(&mut self, w: &WatchSettings, rec: &mut WatchRecord, now: Now) -> Vec<Effect> {
        let mut fx = Vec::new();
        if let Some(since) = self.absent_since {
            if !self.logout_warned && now.at >= clock::later(since, w.deletion_grace) {
                self.logout_warned = true;
                fx.push(Effect::Log(Level::Warn, format!(
                    "{}: {} has been absent for {}: this looks like a logout, not a login; nothing downstream was removed",
                    w.name,
                    w.source.display(),
                    format_duration(w.deletion_grace)
                )));
                fx.push(Effect::Status(format!("{}: source absent", w.name)));
                fx.extend(self.alert(rec, "the source is absent"));
            }
        }
        if let Some(e) = self.expiry(w, now) {
            let why = match &e {
                Effect::Log(Level::Error, _) => "the token expired",
                _ => "the token expires soon",
            };
            fx.push(e);
            fx.extend(self.alert(rec, why));
        }
        fx.extend(self.refresh_tick(w, rec, now));
        if self.retry_at.is_some_and(|at| now.at >= at) {
            self.retry_at = None;
            fx.push(Effect::Reread);
        }
        fx
    }

    /// When the token last applied starts to warn, and when it expires.
    /// With `[watch.refresh]` something *is* refreshing the token: no
    /// warning ahead of every refresh (a failed refresh is an error of its
    /// own); only the error once it has expired. The warning point is then
    /// the expiry itself.
    fn expiry_points(&self, w: &WatchSettings) -> Option<(i64, i64)> {
        let exp = self.expires_at?;
        let warning = match w.refresh {
            Some(_) => Duration::ZERO,
            None => w.expiry_warning,
        };
        Some((exp.saturating_sub(clock::ms(warning)), exp))
    }

    fn expiry(&mut self, w: &WatchSettings, now: Now) -> Option<Effect> {
        let (warn_at, exp) = self.expiry_points(w)?;
        let wall = now.wall_ms;
        if wall >= exp && self.expiry_errored != Some(exp) {
            self.expiry_errored = Some(exp);
            return Some(Effect::Log(Level::Error, format!(
                "{}: the token last applied expired at {} and no newer file arrived: nothing is refreshing it (run the CLI or /login as its user)",
                w.name,
                fmt_ms(exp)
            )));
        }
        if wall >= warn_at && wall < exp && self.expiry_warned != Some(exp) {
            self.expiry_warned = Some(exp);
            return Some(Effect::Log(Level::Warn, format!(
                "{}: the token last applied expires at {} (in {}) and no newer file has arrived: is anything refreshing it?",
                w.name,
                fmt_ms(exp),
                format_duration(Duration::from_secs(clock::between_ms(wall, exp).as_secs()))
            )));
        }
        None
    }

    /// The next moment [`on_tick`](Self::on_tick) has something to do.
    pub fn next_deadline(&self, w: &WatchSettings, now: Now) -> Option<Instant> {
        let grace = self
            .absent_since
            .filter(|_| !self.logout_warned)
            .map(|since| clock::later(since, w.deletion_grace));
        let expiry = self.expiry_points(w).and_then(|(warn_at, exp)| {
            // Not warned yet and not expired: warn at warn_at, which is
            // now when the token arrived already inside the window.
            let at = if self.expiry_warned != Some(exp) && now.wall_ms < exp && warn_at < exp {
                warn_at
            } else if self.expiry_errored != Some(exp) {
                exp
            } else {
                return None;
            };
            Some(clock::later(now.at, clock::between_ms(now.wall_ms, at)))
        });
        let refresh = self.refresh_deadline(w, now);
        [grace, expiry, self.retry_at, refresh]
            .into_iter()
            .flatten()
            .min()
    }

    /// When the token last applied is due for a refresh (wall clock), if
    /// a refresh may be started for it at all: configured, none running,
    /// the source present and accepted.
    fn refresh_due_ms(&self, w: &WatchSettings) -> Option<i64> {
        let r = w.refresh.as_ref()?;
        let exp = self.expires_at?;
        let blocked = self.refresh.in_flight
            || self.refresh.wait_until.is_some()
            || self.absent_since.is_some()
            || self.last_refusal.is_some();
        (!blocked).then(|| exp.saturating_sub(clock::ms(r.ahead)))
    }

    fn refresh_deadline(&self, w: &WatchSettings, now: Now) -> Option<Instant> {
        if let Some(until) = self.refresh.wait_until {
            return Some(until);
        }
        let due = self.refresh_due_ms(w)?;
        let at = clock::later(now.at, clock::between_ms(now.wall_ms, due));
        Some(self.refresh.retry_at.map_or(at, |retry| retry.max(at)))
    }

    /// Starts the refresh unit when the token is due, or notes that the
    /// last start brought no newer token in time.
    fn refresh_tick(&mut self, w: &WatchSettings, rec: &mut WatchRecord, now: Now) -> Vec<Effect> {
        let Some(r) = &w.refresh else {
            return Vec::new();
        };
        if let Some(until) = self.refresh.wait_until {
            if now.at < until {
                return Vec::new();
            }
            self.refresh.wait_until = None;
            let why = format!(
                "{} ran but no newer token arrived within {}",
                r.unit,
                format_duration(r.timeout)
            );
            return self.refresh_failed(w, rec, why, now);
        }
        let Some(due) = self.refresh_due_ms(w) else {
            return Vec::new();
        };
        if now.wall_ms < due || self.refresh.retry_at.is_some_and(|at| now.at < at) {
            return Vec::new();
        }
        self.refresh.in_flight = true;
        self.refresh.started_for = self.expires_at;
        self.refresh.retry_at = None;
        let refresh = rec.refresh.get_or_insert_with(Default::default);
        refresh.last_started_ms = Some(now.wall_ms);
        let exp = self.expires_at.map(fmt_ms).unwrap_or_default();
        vec![
            info(format!(
                "{}: the token expires at {exp} (within {}): starting {} to refresh it",
                w.name,
                format_duration(r.ahead),
                r.unit
            )),
            Effect::StartRefresh(r.unit.clone()),
        ]
    }

    /// The start job of the refresh unit finished.
    pub fn on_refresh_outcome(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<Effect> {
        let Some(r) = &w.refresh else {
            return Vec::new();
        };
        self.refresh.in_flight = false;
        match result {
            // A newer token already arrived while the job ran.
            Ok(()) if self.refresh.started_for != self.expires_at => Vec::new(),
            Ok(()) => {
                self.refresh.wait_until = Some(clock::later(now.at, r.timeout));
                vec![debug(format!(
                    "{}: {} ran; waiting up to {} for a newer token",
                    w.name,
                    r.unit,
                    format_duration(r.timeout)
                ))]
            }
            Err(e) => self.refresh_failed(w, rec, e, now),
        }
    }

    fn refresh_failed(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        why: String,
        now: Now,
    ) -> Vec<Effect> {
        self.refresh.failures = self.refresh.failures.saturating_add(1);
        let delay = REFRESH_RETRY.delay(self.refresh.failures);
        self.refresh.retry_at = Some(clock::later(now.at, delay));
        let refresh = rec.refresh.get_or_insert_with(Default::default);
        refresh.failures = self.refresh.failures;
        refresh.failed_total = refresh.failed_total.saturating_add(1);
        refresh.last_error = Some(why.clone());
        vec![
            Effect::Log(
                Level::Error,
                format!(
                    "{}: refresh failed: {why}; retrying in {}",
                    w.name,
                    format_duration(delay)
                ),
            ),
            Effect::Status(format!("{}: refresh failed", w.name)),
        ]
        .into_iter()
        .chain(self.alert(rec, "the refresh failed"))
        .collect()
    }

    /// A newer credential arrived: if a refresh was under way, it worked.
    fn refreshed(
        &mut self,
        w: &WatchSettings,
        rec: &mut WatchRecord,
        expires_at: Option<i64>,
        now: Now,
    ) -> Vec<Effect> {
        let newer = match (expires_at, self.expires_at) {
            (Some(new), Some(old)) => new > old,
            _ => true,
        };
        let started =
            self.refresh.started_for.is_some() && self.refresh.started_for == self.expires_at;
        let waited = std::mem::take(&mut self.refresh);
        self.refresh.in_flight = waited.in_flight;
        if !(newer && started) {
            return Vec::new();
        }
        let (Some(r), Some(record)) = (&w.refresh, rec.refresh.as_mut()) else {
            return Vec::new();
        };
        record.refreshes = record.refreshes.saturating_add(1);
        record.failures = 0;
        record.last_error = None;
        record.last_refreshed_ms = Some(now.wall_ms);
        vec![info(format!("{}: refreshed through {}", w.name, r.unit))]
    }
}

fn info(message: String) -> Effect {
    Effect::Log(Level::Info, message)
}

fn debug(message: String) -> Effect {
    Effect::Log(Level::Debug, message)
}

/// The credential already applied came by again: only what the actions
/// did is news (a mode put back, a copy restored), or nothing at all.
fn unchanged(
    w: &WatchSettings,
    rec: &mut WatchRecord,
    v: &Valid,
    expiry: &str,
    changes: &str,
    now: Now,
) -> Vec<Effect> {
    let fp = v.fingerprint;
    if v.changes.is_empty() {
        return vec![debug(format!("{}: {fp} in sync", w.name))];
    }
    let action = format!("{fp} unchanged{expiry}: {changes}");
    rec.last_action = Some(action.clone());
    rec.last_action_at_ms = Some(now.wall_ms);
    vec![info(format!("{}: {action}", w.name))]
}

#[cfg(test)]
mod tests;
