//! Restart scheduling, free of I/O: debounce by `settle`, at most one restart
//! per unit per `min_interval`, coalescing of changes, and exponential
//! backoff after failures. A change that arrives while a restart is running
//! or cooling down is never lost: it yields exactly one more restart.

use crate::clock;
use crate::config::RestartAction;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Failed restarts are retried after 1 s, doubling to 5 min.
pub const BACKOFF: clock::Backoff =
    clock::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// How one unit is restarted (from the watch that asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub action: RestartAction,
    pub timeout: Duration,
    pub min_interval: Duration,
}

/// Why a unit is owed a restart: restarts follow state, so the worker
/// restarts a unit only when it was last started before `written_ms` (the
/// credential it should use was written then). Where its start time cannot
/// be known, `must` decides: a new credential restarts it, a mere check
/// (first sight, agent start, reload) does not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    pub written_ms: Option<i64>,
    pub must: bool,
}

impl Need {
    /// Both needs at once: the later credential, and a must if either is.
    pub fn merge(self, other: Need) -> Need {
        Need {
            written_ms: self.written_ms.max(other.written_ms),
            must: self.must || other.must,
        }
    }
}

#[derive(Debug, Clone)]
struct Unit {
    plan: Plan,
    need: Need,
    /// A restart is owed.
    pending: bool,
    /// When the owed restart became owed (caps the debounce).
    pending_since: Option<Instant>,
    /// Not before this (settle after the latest change, or backoff).
    not_before: Option<Instant>,
    last_start: Option<Instant>,
    /// `last_start` before the job in flight (put back if it restarts
    /// nothing).
    prev_start: Option<Instant>,
    in_flight: bool,
    failures: u32,
}

/// A restart the caller should start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub unit: String,
    pub plan: Plan,
    pub need: Need,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    settle: Duration,
    units: BTreeMap<String, Unit>,
}

impl Scheduler {
    pub fn new(settle: Duration) -> Self {
        Scheduler {
            settle,
            units: BTreeMap::new(),
        }
    }

    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// Restores a unit's history (e.g. from the state file after an agent
    /// restart) so `min_interval` still holds.
    pub fn restore(
        &mut self,
        unit: &str,
        plan: Plan,
        last_start: Option<Instant>,
        pending: bool,
        now: Instant,
    ) {
        let u = self.entry(unit, plan);
        u.last_start = last_start;
        if pending {
            // Owed when the agent stopped: restart it.
            u.need = u.need.merge(Need {
                written_ms: None,
                must: true,
            });
            u.pending = true;
            u.pending_since = Some(now);
            u.not_before = None;
        }
    }

    fn entry(&mut self, unit: &str, plan: Plan) -> &mut Unit {
        let u = self.units.entry(unit.to_owned()).or_insert_with(|| Unit {
            plan: plan.clone(),
            need: Need::default(),
            pending: false,
            pending_since: None,
            not_before: None,
            last_start: None,
            prev_start: None,
            in_flight: false,
            failures: 0,
        });
        u.plan = plan;
        u
    }

    /// The credentials changed: `unit` needs a restart after things settle.
    pub fn request(&mut self, unit: &str, plan: Plan, need: Need, now: Instant) {
        let settle = self.settle;
        let u = self.entry(unit, plan);
        u.need = u.need.merge(need);
        if !u.pending {
            u.pending = true;
            u.pending_since = Some(now);
            u.failures = 0;
        }
        u.not_before = Some(clock::later(now, settle));
    }

    fn due_at(&self, u: &Unit) -> Option<Instant> {
        if !u.pending || u.in_flight {
            return None;
        }
        let since = u.pending_since?;
        // Debounce, but a steady storm cannot postpone a restart forever.
        let cap = clock::later(since, self.settle.max(u.plan.min_interval));
        let mut at = u.not_before.map_or(since, |nb| nb.min(cap));
        if u.failures > 0 {
            at = at.max(u.not_before.unwrap_or(at));
        }
        if let Some(last) = u.last_start {
            at = at.max(clock::later(last, u.plan.min_interval));
        }
        Some(at)
    }

    /// When `unit`'s owed restart will really happen, in words: after the
    /// quiet period, held back by `min_interval` or a failure's backoff,
    /// or after the restart under way.
    pub fn when(&self, unit: &str, now: Instant) -> String {
        let Some(u) = self.units.get(unit) else {
            return "not owed".into();
        };
        if u.in_flight {
            return "once the restart under way has finished".into();
        }
        let Some(at) = self.due_at(u) else {
            return "not owed".into();
        };
        let wait = crate::config::format_duration(at.saturating_duration_since(now));
        let quiet = u.not_before.is_some_and(|nb| at <= nb) && u.failures == 0;
        if quiet {
            format!(
                "in {wait} (after {} quiet)",
                crate::config::format_duration(self.settle)
            )
        } else if u.failures > 0 {
            format!("in {wait} (backoff after {} failure(s))", u.failures)
        } else {
            format!(
                "in {wait} (min_interval {} since its last restart)",
                crate::config::format_duration(u.plan.min_interval)
            )
        }
    }

    /// When the next restart is due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.units.values().filter_map(|u| self.due_at(u)).min()
    }

    /// Takes the restarts due at `now`, marking them in flight.
    pub fn take_due(&mut self, now: Instant) -> Vec<Job> {
        let due: Vec<String> = self
            .units
            .iter()
            .filter(|(_, u)| self.due_at(u).is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        due.into_iter()
            .map(|name| {
                let u = self.units.get_mut(&name).expect("unit listed above");
                u.pending = false;
                u.pending_since = None;
                u.not_before = None;
                u.in_flight = true;
                u.prev_start = u.last_start.replace(now);
                Job {
                    unit: name,
                    plan: u.plan.clone(),
                    need: u.need,
                }
            })
            .collect()
    }

    /// A restart finished. On failure it is owed again, after a backoff.
    /// Returns the backoff used, if any.
    pub fn finished(&mut self, unit: &str, ok: bool, now: Instant) -> Option<Duration> {
        let u = self.units.get_mut(unit)?;
        u.in_flight = false;
        if ok {
            u.failures = 0;
            if !u.pending {
                u.need = Need::default();
            }
            return None;
        }
        u.failures = u.failures.saturating_add(1);
        let backoff = BACKOFF.delay(u.failures);
        if !u.pending {
            u.pending = true;
            u.pending_since = Some(now);
        }
        u.not_before = Some(clock::later(now, backoff));
        Some(backoff)
    }

    /// Keeps only the units `keep` accepts (a reload's new configuration).
    /// A job already running for a dropped unit reports back harmlessly.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.units.retain(|unit, _| keep(unit));
    }

    /// The job in flight restarted nothing (the unit was already in sync):
    /// it does not count for `min_interval`.
    pub fn skipped(&mut self, unit: &str) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        u.in_flight = false;
        u.failures = 0;
        u.last_start = u.prev_start;
        if !u.pending {
            u.need = Need::default();
        }
    }

    pub fn is_pending(&self, unit: &str) -> bool {
        self.units
            .get(unit)
            .is_some_and(|u| u.pending || u.in_flight)
    }

    pub fn failures(&self, unit: &str) -> u32 {
        self.units.get(unit).map_or(0, |u| u.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MUST: Need = Need {
        written_ms: None,
        must: true,
    };

    fn plan(min: u64) -> Plan {
        Plan {
            action: RestartAction::Restart,
            timeout: Duration::from_secs(90),
            min_interval: Duration::from_secs(min),
        }
    }

    #[test]
    fn settles_then_restarts_once() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_millis(500));
        s.request("a.service", plan(10), MUST, t0);
        s.request("a.service", plan(10), MUST, t0 + Duration::from_millis(300));
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(800)));
        assert!(s.take_due(t0 + Duration::from_millis(799)).is_empty());
        assert_eq!(s.take_due(t0 + Duration::from_millis(800)).len(), 1);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn change_during_restart_and_cooldown_gives_one_more() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.request("a.service", plan(10), MUST, t0);
        assert_eq!(s.take_due(t0).len(), 1);
        // Two changes while the job runs: one more restart, after min_interval.
        s.request("a.service", plan(10), MUST, t0 + Duration::from_secs(1));
        s.request("a.service", plan(10), MUST, t0 + Duration::from_secs(2));
        assert!(
            s.take_due(t0 + Duration::from_secs(3)).is_empty(),
            "in flight"
        );
        s.finished("a.service", true, t0 + Duration::from_secs(3));
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(s.take_due(t0 + Duration::from_secs(10)).len(), 1);
        s.finished("a.service", true, t0 + Duration::from_secs(11));
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn storm_cannot_postpone_forever() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_millis(500));
        for i in 0..100 {
            s.request(
                "a.service",
                plan(2),
                MUST,
                t0 + Duration::from_millis(i * 100),
            );
        }
        // Owed since t0; cap at t0 + max(settle, min_interval) = 2s.
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn failures_back_off_exponentially() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.request("a.service", plan(0), MUST, t0);
        assert_eq!(s.take_due(t0).len(), 1);
        assert_eq!(
            s.finished("a.service", false, t0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.take_due(t1).len(), 1);
        assert_eq!(
            s.finished("a.service", false, t1),
            Some(Duration::from_secs(2))
        );
        assert_eq!(s.next_deadline(), Some(t1 + Duration::from_secs(2)));
        for _ in 0..20 {
            let at = s.next_deadline().unwrap();
            s.take_due(at);
            assert!(s.finished("a.service", false, at).unwrap() <= Duration::from_secs(300));
        }
    }

    /// A check that restarted nothing (the unit was in sync) does not hold
    /// the next real restart back by `min_interval`.
    #[test]
    fn a_skipped_check_does_not_count_as_a_restart() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        let check = Need {
            written_ms: Some(1),
            must: false,
        };
        s.request("a.service", plan(10), check, t0);
        assert_eq!(s.take_due(t0).len(), 1);
        s.skipped("a.service");
        let t1 = t0 + Duration::from_millis(100);
        s.request("a.service", plan(10), MUST, t1);
        let jobs = s.take_due(t1);
        assert_eq!(jobs.len(), 1, "held back by the check's min_interval");
        assert!(jobs[0].need.must);
    }
}
