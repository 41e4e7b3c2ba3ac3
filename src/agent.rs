//! The agent: one synchronous event loop over inotify, signals and restart
//! completions, with deadlines for settle, deletion grace, expiry warnings,
//! retries and resync. Nothing wakes it while idle.

use crate::clock;
use crate::config::{self, Settings};
use crate::metrics;
use crate::notify::{self, Notifier};
use crate::reconcile::{self, Inputs};
use crate::schedule::{Need, Plan, Scheduler};
use crate::state::{self, now_ms, State};
use crate::systemd::{ServiceManager, Worker};
use crate::tracker::{Effect, Now, Tracker};
use crate::watch::{Change, Watcher};
use anyhow::Context;
use log::{debug, error, info, warn};
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A change of the wall clock against the monotonic one larger than this
/// is a step: the deadlines derived from wall-clock times are recomputed.
const CLOCK_STEP_MS: u64 = 1_000;

/// What woke the loop (the epoll data of each fd).
const INOTIFY: u64 = 0;
const SIGNALS: u64 = 1;
const RESTARTS: u64 = 2;

/// Which of the loop's fds were ready.
struct Woke {
    inotify: bool,
    signals: bool,
    restarts: bool,
}

/// The loop's wait: epoll rather than poll(2), the fds registered once, not
/// on every wait (measured: 22.3 µs per wake-up with poll on three fds,
/// 19.8 µs with epoll, 18.5 µs for a blocking read of inotify alone).
struct Waiter {
    epoll: Epoll,
    /// The inotify fd registered. A reload replaces the watcher while the
    /// old one is still open, so a new inotify fd always has a new number;
    /// closing the old one took it out of the epoll set.
    inotify: Option<RawFd>,
}

impl Waiter {
    fn new(signals: &UnixStream, restarts: &UnixStream) -> anyhow::Result<Waiter> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        epoll
            .add(signals, readable(SIGNALS))
            .context("epoll: the signal socket")?;
        epoll
            .add(restarts, readable(RESTARTS))
            .context("epoll: the restart worker's socket")?;
        Ok(Waiter {
            epoll,
            inotify: None,
        })
    }

    /// Waits until an fd is ready or `deadline` passes.
    fn wait(&mut self, inotify: BorrowedFd, deadline: Option<Instant>) -> anyhow::Result<Woke> {
        if self.inotify != Some(inotify.as_raw_fd()) {
            self.epoll
                .add(inotify, readable(INOTIFY))
                .context("epoll: the inotify fd")?;
            self.inotify = Some(inotify.as_raw_fd());
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(at) => {
                let ms = at.saturating_duration_since(Instant::now()).as_millis();
                // Round up so a deadline is never waited for early in a busy loop.
                PollTimeout::try_from(ms.saturating_add(1).min(i32::MAX as u128))
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut events = [EpollEvent::empty(); 3];
        let ready = match self.epoll.wait(&mut events, timeout) {
            Ok(n) => &events[..n],
            Err(nix::errno::Errno::EINTR) => &[][..],
            Err(e) => return Err(e).context("epoll_wait"),
        };
        let is = |what| ready.iter().any(|e| e.data() == what);
        Ok(Woke {
            inotify: is(INOTIFY),
            signals: is(SIGNALS),
            restarts: is(RESTARTS),
        })
    }
}

fn readable(data: u64) -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN, data)
}

/// At most one state write per this interval during a storm.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

pub struct Agent {
    config_path: PathBuf,
    settings: Settings,
    watcher: Watcher,
    /// What each watcher slot is: (watch, copy index for a destination).
    roles: Vec<(usize, Option<usize>)>,
    /// One per watch, in the order of `settings.watches`.
    trackers: Vec<Tracker>,
    /// Each watch's source as last read and acted on, still open.
    last_read: Vec<Option<reconcile::LastRead>>,
    /// Sources read before the last read, closed once the batch of reads
    /// that replaced them is acted on ([`Agent::batch_done`]): closing may
    /// free the replaced inode, which can wait on the disk.
    retired: Vec<reconcile::LastRead>,
    sched: Scheduler,
    worker: Worker,
    /// Held for the agent's life: one agent per state directory.
    lock: state::StateLock,
    state: State,
    dirty: bool,
    last_persist: Option<Instant>,
    notifier: Notifier,
    watchdog: Option<Duration>,
    next_watchdog: Option<Instant>,
    next_resync: Option<Instant>,
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(
    config_path: PathBuf,
    settings: Settings,
    manager: Box<dyn ServiceManager>,
) -> anyhow::Result<()> {
    // The handlers set a flag, then write to a socket the loop polls: no
    // signal mask, so the worker thread and the processes we start get the
    // usual one.
    let (sigfd, sigwake) = UnixStream::pair().context("creating the signal socket")?;
    sigfd
        .set_nonblocking(true)
        .context("creating the signal socket")?;
    let signals =
        [SIGTERM, SIGINT, SIGHUP, SIGUSR1].map(|sig| (sig, Arc::new(AtomicBool::new(false))));
    for (sig, flag) in &signals {
        signal_hook::flag::register(*sig, Arc::clone(flag))
            .and_then(|_| signal_hook::low_level::pipe::register(*sig, sigwake.try_clone()?))
            .with_context(|| format!("handling signal {sig}"))?;
    }
    let worker = Worker::spawn(manager).context("starting the restart worker")?;
    let mut agent = Agent::new(config_path, settings, worker)?;
    agent.start()?;
    let result = agent.event_loop(&sigfd, &signals);
    agent.notifier.send("STOPPING=1");
    agent.persist();
    result
}

impl Agent {
    fn new(config_path: PathBuf, settings: Settings, worker: Worker) -> anyhow::Result<Agent> {
        let lock = lock_state_dir(&settings)?;
        let state = state::load_or_fresh(&settings.agent.state_dir)?;
        let watcher = new_watcher(&settings)?;
        let watchdog = notify::watchdog_interval();
        Ok(Agent {
            config_path,
            trackers: trackers(&settings, &state),
            last_read: nothing_read(settings.watches.len()),
            retired: Vec::new(),
            roles: slot_roles(&settings),
            sched: Scheduler::new(settings.agent.settle),
            settings,
            watcher,
            worker,
            lock,
            state,
            dirty: true,
            last_persist: None,
            notifier: Notifier::from_env(),
            watchdog,
            next_watchdog: None,
            next_resync: None,
        })
    }

    fn start(&mut self) -> anyhow::Result<()> {
        self.state.version = 1;
        self.state.agent.pid = Some(std::process::id());
        self.state.agent.started_at_ms = Some(now_ms());
        self.remove_stale_temps();
        self.restore_restarts();
        self.arm_all()?;
        self.reconcile_all("start");
        self.check_units_in_sync();
        self.persist();
        let status = self.summary();
        self.notifier.send(&format!("READY=1\nSTATUS={status}"));
        // The first ping now: an agent with nothing to do would otherwise
        // never wake to send one, and systemd would kill it.
        if let Some(every) = self.watchdog {
            self.notifier.send("WATCHDOG=1");
            self.next_watchdog = Some(clock::later(Instant::now(), every / 2));
        }
        info!("ready: {status}");
        Ok(())
    }

    /// Temp files a killed predecessor left next to our outputs.
    fn remove_stale_temps(&self) {
        // A copy's directory, and its parent (where a directory being
        // created for it has its temp name); each directory once, however
        // many copies share it.
        let copy_dirs = self.settings.watches.iter().flat_map(|w| {
            w.copies.iter().flat_map(|c| {
                let dir = crate::config::split_file(&c.dest).0;
                std::iter::once(dir).chain(dir.parent())
            })
        });
        let dirs: std::collections::BTreeSet<&std::path::Path> =
            std::iter::once(self.settings.agent.state_dir.as_path())
                .chain(copy_dirs)
                .collect();
        for dir in dirs {
            let n = crate::fsutil::remove_stale_temps(dir);
            if n > 0 {
                info!(
                    "removed {n} temp file(s) or dir(s) left in {} by an interrupted write",
                    dir.display()
                );
            }
        }
    }

    /// Pending restarts and cooldowns survive an agent restart.
    fn restore_restarts(&mut self) {
        self.drop_unconfigured_restarts();
        let now = Instant::now();
        let now_wall = now_ms();
        for w in &self.settings.watches {
            let Some(r) = &w.restart else { continue };
            for unit in &r.units {
                let rec = self.state.units.get(unit).cloned().unwrap_or_default();
                let last_start = rec.last_restart_ms.and_then(|ms| {
                    let ago = clock::between_ms(ms, now_wall);
                    now.checked_sub(ago)
                });
                if rec.pending {
                    info!(
                        "{}: restart of {unit} was pending when the agent stopped; scheduling it",
                        w.name
                    );
                }
                self.sched
                    .restore(unit, plan(r), last_start, rec.pending, now);
            }
        }
    }

    /// A unit no longer configured (renamed, removed, a typo fixed) owes
    /// nothing any more: it is not retried, and the state forgets it.
    fn drop_unconfigured_restarts(&mut self) {
        let configured: std::collections::BTreeSet<&String> = self
            .settings
            .watches
            .iter()
            .flat_map(|w| w.restart.iter().flat_map(|r| &r.units))
            .collect();
        self.sched
            .retain(|unit| configured.contains(&unit.to_string()));
        for (unit, rec) in self.state.units.iter_mut() {
            if rec.pending && !configured.contains(unit) {
                info!("{unit} is no longer configured: its pending restart is dropped");
                rec.in_sync();
                self.dirty = true;
            }
        }
    }

    fn arm_all(&mut self) -> anyhow::Result<()> {
        for n in 0..self.watcher.len() {
            self.arm(n)?;
        }
        Ok(())
    }

    /// Arms watcher slot `n` (a source or a copy). A kernel limit is
    /// fatal: better to exit (and be restarted by systemd, loudly) than to
    /// run without watching.
    fn arm(&mut self, n: usize) -> anyhow::Result<()> {
        let name = &self.settings.watches[self.roles[n].0].name;
        match self.watcher.arm(n) {
            Ok(()) => debug!("{name}: {}", self.watcher.describe(n)),
            Err(e @ crate::fsutil::FsError::Limit { .. }) => {
                return Err(e).with_context(|| format!("watch {name:?}"))
            }
            Err(e) => error!("{name}: {e}; {}", self.watcher.describe(n)),
        }
        Ok(())
    }

    fn reconcile_all(&mut self, why: &str) {
        debug!("reconciling all watches ({why})");
        for n in 0..self.trackers.len() {
            self.process(n, true);
        }
        self.batch_done(&[]);
        self.state.agent.last_reconcile_ms = Some(now_ms());
        let problems: Vec<String> = self
            .settings
            .watches
            .iter()
            .filter_map(|w| {
                let rec = self.state.watches.get(&w.name)?;
                rec.problem().map(|p| format!("{}: {p}", w.name))
            })
            .collect();
        self.state.agent.last_reconcile_result = Some(if problems.is_empty() {
            "ok".into()
        } else {
            problems.join("; ")
        });
        self.dirty = true;
        if let Some(every) = nonzero(self.settings.agent.resync_interval) {
            self.next_resync = Some(clock::later(Instant::now(), every));
        }
    }

    /// Reads, validates and applies watch `n`'s source.
    fn process(&mut self, n: usize, complete: bool) {
        let now = Now::current();
        let w = &self.settings.watches[n];
        // Only what the read needs comes before it: the fix is the first
        // thing the agent does for an event.
        let known = self.state.watches.get(&w.name);
        let last = known.and_then(|rec| rec.applied());
        let none = BTreeMap::new();
        let ctx = Inputs {
            last: last.as_ref(),
            last_written: known.map_or(&none, |rec| &rec.copies),
            dry_run: false,
            rescue_dir: &self.settings.agent.state_dir,
        };
        let mut read = None;
        let result = reconcile::reconcile_seen(w, self.watcher.dir_fd(n), &ctx, &mut read);
        self.retired
            .extend(std::mem::replace(&mut self.last_read[n], read));
        let rec = self.state.watches.entry(w.name.clone()).or_default();
        let before = rec.clone();
        let effects = self.trackers[n].on_read(w, rec, result, complete, now);
        // Write the state only when this watch's record changed (or a
        // restart became owed): an event that finds everything in sync,
        // like the echo of our own fchmod, costs no write and no fsync.
        if *rec != before {
            self.dirty = true;
        }
        self.execute(n, effects, now);
    }

    /// Carries out what a tracker decided.
    fn execute(&mut self, n: usize, effects: Vec<Effect>, now: Now) {
        for effect in effects {
            match effect {
                Effect::Log(level, message) => log::log!(level, "{message}"),
                Effect::Status(status) => self.set_status(&status),
                Effect::Restart(units, need) => self.owe_restarts(n, &units, need, now),
                Effect::Reread => self.process(n, true),
                Effect::StartRefresh(unit) => self.start_refresh(n, unit),
                Effect::Alert(why) => self.alert(n, why),
            }
        }
    }

    /// Units owe a restart for `need`. A must is recorded (it survives an
    /// agent restart); a check only asks the worker to compare the unit's
    /// start time with when the credential was written.
    fn owe_restarts(&mut self, n: usize, units: &[String], need: Need, now: Now) {
        let Some(r) = &self.settings.watches[n].restart else {
            return;
        };
        for unit in units {
            self.sched.request(unit, plan(r), need, now.at);
            if need.must {
                let rec = self.state.units.entry(unit.clone()).or_default();
                rec.owe(now.wall_ms);
                info!("restart of {unit} {}", self.sched.when(unit, now.at));
                self.dirty = true;
            } else {
                debug!("{unit}: restart only if it started before the credential was written");
            }
        }
    }

    /// Restarts follow state: after a start or a reload, every unit is
    /// checked against the credential it should use (a change made while
    /// the agent was down, a unit added or fixed by a reload, a bridge
    /// older than the current token); the worker restarts only those
    /// started before it was written.
    fn check_units_in_sync(&mut self) {
        let now = Now::current();
        for n in 0..self.trackers.len() {
            let w = &self.settings.watches[n];
            let (Some(r), Some(written)) = (
                &w.restart,
                self.state
                    .watches
                    .get(&w.name)
                    .and_then(|rec| rec.written_ms),
            ) else {
                continue;
            };
            let units: Vec<String> = r
                .units
                .iter()
                .filter(|u| !self.sched.is_pending(u))
                .cloned()
                .collect();
            let need = Need {
                written_ms: Some(written),
                must: false,
            };
            self.owe_restarts(n, &units, need, now);
        }
    }

    fn start_refresh(&mut self, n: usize, unit: String) {
        let Some(r) = &self.settings.watches[n].refresh else {
            return;
        };
        let plan = Plan {
            action: config::RestartAction::Start,
            timeout: r.timeout,
            min_interval: Duration::ZERO,
        };
        self.set_status(&format!(
            "{}: refreshing through {unit}",
            self.settings.watches[n].name
        ));
        self.worker.submit(vec![crate::schedule::Job {
            unit,
            plan,
            need: Need::default(),
        }]);
    }

    /// Starts `[agent] alert_unit` for watch `n` (`%i`: its escaped name).
    fn alert(&mut self, n: usize, why: &str) {
        let Some(template) = &self.settings.agent.alert_unit else {
            return;
        };
        let name = &self.settings.watches[n].name;
        let unit = template.replace("%i", &crate::systemd::escape(name));
        warn!("{name}: {why}: starting the alert unit {unit}");
        let plan = Plan {
            action: config::RestartAction::Start,
            timeout: Duration::from_secs(30),
            min_interval: Duration::ZERO,
        };
        self.worker.submit(vec![crate::schedule::Job {
            unit,
            plan,
            need: Need::default(),
        }]);
    }

    /// A refresh unit's start job finished: to the watch that started it.
    fn refresh_outcome(&mut self, unit: &str, result: Result<(), String>) {
        let now = Now::current();
        let Some(n) = self
            .settings
            .watches
            .iter()
            .position(|w| w.refresh.as_ref().is_some_and(|r| r.unit == unit))
        else {
            // An alert unit.
            if let Err(e) = result {
                error!("alert unit {unit}: {e}");
            }
            return;
        };
        let w = &self.settings.watches[n];
        let rec = self.state.watches.entry(w.name.clone()).or_default();
        let effects = self.trackers[n].on_refresh_outcome(w, rec, result, now);
        self.dirty = true;
        self.execute(n, effects, now);
    }

    fn check_timers(&mut self) {
        let now = Now::current();
        for n in 0..self.trackers.len() {
            let w = &self.settings.watches[n];
            // Only the watches with something due: no map lookup per
            // watch and loop (1,000 watches stay cheap).
            if self.trackers[n]
                .next_deadline(w, now)
                .is_none_or(|at| at > now.at)
            {
                continue;
            }
            let rec = self.state.watches.entry(w.name.clone()).or_default();
            let before = rec.clone();
            let effects = self.trackers[n].on_tick(w, rec, now);
            if *rec != before {
                self.dirty = true;
            }
            self.execute(n, effects, now);
        }
        // A retry reads the source again, outside any batch of events.
        self.batch_done(&[]);
        let jobs = self.sched.take_due(now.at);
        if !jobs.is_empty() {
            for job in &jobs {
                if job.need.must {
                    info!("restarting {} ({})", job.unit, job.plan.action.method());
                } else {
                    debug!(
                        "{}: restart if it started before the credential was written",
                        job.unit
                    );
                }
            }
            let units: Vec<&str> = jobs.iter().map(|j| j.unit.as_str()).collect();
            self.set_status(&format!("restarting {}", units.join(", ")));
            self.worker.submit(jobs);
        }
        if self.next_resync.is_some_and(|at| now.at >= at) {
            self.reconcile_all("resync_interval");
        }
        if let (Some(every), true) = (
            self.watchdog,
            self.next_watchdog.is_none_or(|at| now.at >= at),
        ) {
            self.notifier.send("WATCHDOG=1");
            self.next_watchdog = Some(clock::later(now.at, every / 2));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Now::current();
        let agent = [
            self.sched.next_deadline(),
            self.next_resync,
            self.next_watchdog,
            self.persist_due(),
        ];
        let watches = self
            .trackers
            .iter()
            .zip(&self.settings.watches)
            .map(|(t, w)| t.next_deadline(w, now));
        agent.into_iter().chain(watches).flatten().min()
    }

    fn restart_outcomes(&mut self) {
        let now = Now::current();
        for out in self.worker.finished() {
            if out.action == config::RestartAction::Start {
                self.refresh_outcome(&out.unit, out.result);
                continue;
            }
            if out.skipped {
                self.sched.skipped(&out.unit);
                if !self.sched.is_pending(&out.unit) {
                    self.state
                        .units
                        .entry(out.unit.clone())
                        .or_default()
                        .in_sync();
                }
                info!(
                    "{} started after the credential it reads was written: in sync, not restarted",
                    out.unit
                );
                self.dirty = true;
                continue;
            }
            let backoff = self.sched.finished(&out.unit, out.result.is_ok(), now.at);
            let still_owed = self.sched.is_pending(&out.unit);
            let failures = self.sched.failures(&out.unit);
            let rec = self.state.units.entry(out.unit.clone()).or_default();
            match out.result {
                Ok(()) => {
                    rec.restarted(now.wall_ms, still_owed);
                    info!("restarted {}", out.unit);
                    self.set_status(&format!("restarted {}", out.unit));
                }
                Err(e) => {
                    error!(
                        "restart of {} failed: {e}; retrying in {} (attempt {})",
                        out.unit,
                        config::format_duration(backoff.unwrap_or_default()),
                        failures.saturating_add(1)
                    );
                    rec.restart_failed(now.wall_ms, e, failures);
                    if failures >= 2 {
                        self.restart_failed_alerts(&out.unit, now);
                    }
                    self.set_status(&format!("restart of {} failed", out.unit));
                }
            }
            self.dirty = true;
        }
    }

    /// A unit's restart failed again after its first retry: each watch
    /// that restarts it raises its alert.
    fn restart_failed_alerts(&mut self, unit: &str, now: Now) {
        for n in 0..self.trackers.len() {
            let uses = self.settings.watches[n]
                .restart
                .as_ref()
                .is_some_and(|r| r.units.iter().any(|u| u == unit));
            if uses {
                let name = self.settings.watches[n].name.clone();
                let rec = self.state.watches.entry(name).or_default();
                let effects = self.trackers[n].on_restart_failed(rec);
                self.execute(n, effects, now);
            }
        }
    }

    fn reload(&mut self) {
        self.notifier.send("RELOADING=1");
        match self.prepare_reload() {
            Err(e) => error!("reload rejected, keeping the running configuration: {e:#}"),
            Ok(None) => info!("reload: configuration unchanged"),
            Ok(Some(Reloaded {
                settings: new,
                watcher,
                lock,
            })) => {
                crate::logging::set_level(new.agent.log_level.filter());
                self.sched.set_settle(new.agent.settle);
                self.trackers = trackers(&new, &self.state);
                self.last_read = nothing_read(new.watches.len());
                self.roles = slot_roles(&new);
                self.watcher = watcher;
                if let Some(lock) = lock {
                    self.lock = lock;
                }
                self.settings = new;
                self.next_resync = None;
                info!(
                    "reloaded configuration from {}",
                    self.settings
                        .files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.restore_restarts();
                if let Err(e) = self.arm_all() {
                    error!("reload: {e:#}");
                }
                self.reconcile_all("reload");
                self.check_units_in_sync();
            }
        }
        self.notifier
            .send(&format!("READY=1\nSTATUS={}", self.summary()));
    }

    /// Everything a reload needs that can fail, acquired before anything
    /// changes: the new settings, their watcher, and the lock of a new
    /// `state_dir`. `None` when the configuration is unchanged.
    fn prepare_reload(&self) -> anyhow::Result<Option<Reloaded>> {
        let new = config::load(&self.config_path)?;
        if new == self.settings {
            return Ok(None);
        }
        let watcher = new_watcher(&new)?;
        let lock = if new.agent.state_dir == self.lock.dir {
            None
        } else {
            Some(lock_state_dir(&new)?)
        };
        Ok(Some(Reloaded {
            settings: new,
            watcher,
            lock,
        }))
    }

    fn persist(&mut self) {
        if !self.dirty {
            return;
        }
        self.last_persist = Some(Instant::now());
        match state::save(&self.settings.agent.state_dir, &self.state) {
            Ok(()) => self.dirty = false,
            Err(e) => error!("cannot save state: {e}"),
        }
        if let Some(path) = &self.settings.agent.metrics_file {
            let text = metrics::render(&self.settings, &self.state, &|n| self.source_ok(n));
            if let Err(e) = metrics::write(path, &text) {
                error!("cannot write metrics: {e}");
            }
        }
    }

    /// Watch `n`'s source is present, valid and applied.
    fn source_ok(&self, n: usize) -> bool {
        let t = &self.trackers[n];
        let rec = self.state.watches.get(&self.settings.watches[n].name);
        !t.is_absent()
            && !t.is_refused()
            && rec.is_some_and(|r| r.fingerprint.is_some() && r.last_error.is_none())
    }

    /// When a coalesced state write is due. The first change after a quiet
    /// second is written at once; during a storm at most one write (and
    /// fsync) per second, so the state file's size never slows the events.
    fn persist_due(&self) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        Some(
            self.last_persist
                .map_or_else(Instant::now, |at| clock::later(at, PERSIST_EVERY)),
        )
    }

    fn summary(&self) -> String {
        let n = self.settings.watches.len();
        let refused = self.trackers.iter().filter(|t| t.is_refused()).count();
        let absent = self.trackers.iter().filter(|t| t.is_absent()).count();
        format!("watching {n} source(s), {absent} absent, {refused} refused")
    }

    /// The watches with a problem now, for the front of `STATUS=`.
    fn problems(&self) -> Vec<String> {
        self.trackers
            .iter()
            .zip(&self.settings.watches)
            .filter_map(|(t, w)| {
                let why = if t.is_refused() {
                    "source refused"
                } else if t.is_logged_out() {
                    "source absent past its grace"
                } else {
                    return None;
                };
                Some(format!("{}: {why}", w.name))
            })
            .collect()
    }

    /// `STATUS=`: current problems first, then what just happened.
    fn set_status(&self, what: &str) {
        let problems = self.problems();
        if problems.is_empty() {
            self.notifier.status(what);
        } else {
            self.notifier
                .status(&format!("PROBLEM {}; last: {what}", problems.join(", ")));
        }
    }

    fn event_loop(
        &mut self,
        sigfd: &UnixStream,
        signals: &[(i32, Arc<AtomicBool>)],
    ) -> anyhow::Result<()> {
        let mut waiter = Waiter::new(sigfd, &self.worker.wake)?;
        // The next deadline, kept while nothing changes: most wake-ups are
        // events next to the source that concern no watch (a CLI's history
        // appends), and they should cost a read and nothing more. Kept with
        // the wall clock's offset from the monotonic one at that time: some
        // deadlines come from wall-clock times (a token's refresh and
        // expiry), and a step of the clock (NTP at boot, a resume) moves them.
        let base = Instant::now();
        let offset = || now_ms().saturating_sub(clock::ms(base.elapsed()));
        let mut deadline = None;
        loop {
            let (next, at_offset) =
                *deadline.get_or_insert_with(|| (self.next_deadline(), offset()));
            let woke = waiter.wait(self.watcher.fd(), next)?;
            let mut changed = woke.signals || woke.restarts;
            if woke.signals && self.handle_signals(sigfd, signals) {
                return Ok(());
            }
            if woke.inotify {
                changed |= self.handle_inotify()?;
            }
            if woke.restarts {
                self.restart_outcomes();
            }
            let stepped = offset().abs_diff(at_offset) > CLOCK_STEP_MS;
            if !changed && !stepped && next.is_none_or(|at| Instant::now() < at) {
                continue;
            }
            deadline = None;
            self.check_timers();
            if self.persist_due().is_some_and(|at| Instant::now() >= at) {
                self.persist();
            }
        }
    }

    /// Acts on the signals that arrived; true to stop (SIGTERM/SIGINT).
    fn handle_signals(&mut self, sigfd: &UnixStream, signals: &[(i32, Arc<AtomicBool>)]) -> bool {
        // Drain first, then read the flags: a signal that comes in between
        // wakes the next poll.
        while matches!((&*sigfd).read(&mut [0; 64]), Ok(n) if n > 0) {}
        for (signo, flag) in signals {
            if !flag.swap(false, Ordering::Relaxed) {
                continue;
            }
            match *signo {
                SIGTERM | SIGINT => {
                    info!("stopping on signal {signo}");
                    return true;
                }
                SIGHUP => self.reload(),
                SIGUSR1 => {
                    info!("SIGUSR1: reconciling everything now");
                    self.reconcile_all("SIGUSR1");
                }
                _ => {}
            }
        }
        false
    }

    /// Reads and handles one batch of events; false when none concerned a
    /// watch (nothing changed, no deadline moved).
    fn handle_inotify(&mut self) -> anyhow::Result<bool> {
        let changes = self.watcher.read().context("reading inotify events")?;
        if changes.is_empty() {
            return Ok(false);
        }
        if changes.contains(&Change::Overflow) {
            warn!("inotify queue overflowed: re-scanning every watch");
            self.arm_all()?;
            self.reconcile_all("overflow");
            return Ok(true);
        }
        // Coalesce: each slot is re-armed and each watch processed at most
        // once per batch.
        let mut rearm = vec![false; self.watcher.len()];
        let mut touched: Vec<Option<bool>> = vec![None; self.trackers.len()];
        for c in changes {
            let (slot, complete) = match c {
                Change::Rearm(slot) => {
                    rearm[slot] = true;
                    (slot, true)
                }
                Change::File { slot, complete } => (slot, complete),
                Change::Overflow => continue,
            };
            let (n, copy) = self.roles[slot];
            // Our own copy writes come back as events: only a copy that is
            // not what we wrote brings the watch back.
            if let Some(c) = copy {
                if !rearm[slot] && self.copy_is_ours(slot, n, c) {
                    continue;
                }
            }
            let t = &mut touched[n];
            *t = Some(t.unwrap_or(false) || complete);
        }
        for slot in (0..rearm.len()).filter(|&s| rearm[s]) {
            self.arm(slot)?;
        }
        for (n, complete) in touched.iter().enumerate() {
            if let Some(complete) = *complete {
                self.process(n, complete);
            }
        }
        self.batch_done(&touched);
        Ok(true)
    }

    /// After a batch of reads (events, a reconcile of everything, or the
    /// retries due) is acted on: new inodes are followed, and the files
    /// read before are closed.
    fn batch_done(&mut self, touched: &[Option<bool>]) {
        self.follow_moved(touched);
        self.retired.clear();
    }

    /// A replaced (or newly armed) source is watched on its new inode only
    /// now, after the fix (off the path from the event to it); what changed
    /// since it was read had no event, so it is read once more. `touched`
    /// says which watches were read for an incomplete write. (Copies are
    /// watched through their directory, never followed: only sources come
    /// back, and a source's slot is its watch's index.)
    fn follow_moved(&mut self, touched: &[Option<bool>]) {
        for n in self.watcher.follow_moved() {
            if !self.unchanged_since_read(n) {
                self.process(n, touched.get(n).copied().flatten().unwrap_or(true));
            }
        }
    }

    /// Watch `n`'s source is still as its last read and the actions left it.
    fn unchanged_since_read(&self, n: usize) -> bool {
        let (Some(read), Some(dir)) = (&self.last_read[n], self.watcher.dir_fd(n)) else {
            return false;
        };
        let (dir_path, name) = self.settings.watches[n].source_dir_and_name();
        matches!(
            crate::fsutil::read_entry(dir, dir_path, name, crate::source::MAX_SIZE),
            Ok(Some((st, bytes))) if read.seen.matches(&st, &bytes)
        )
    }

    /// Copy `c` of watch `n` (watcher slot `slot`) holds what the agent
    /// last wrote there, with the configured owner, group and mode.
    fn copy_is_ours(&self, slot: usize, n: usize, c: usize) -> bool {
        let w = &self.settings.watches[n];
        let copy = &w.copies[c];
        let Some(dir) = self.watcher.dir_fd(slot) else {
            return false;
        };
        let Some(ours) = self
            .state
            .watches
            .get(&w.name)
            .and_then(|r| r.copies.get(&copy.dest.display().to_string()))
        else {
            return false;
        };
        let (dir_path, name) = config::split_file(&copy.dest);
        match crate::fsutil::read_entry(dir, dir_path, name, crate::source::MAX_SIZE) {
            Ok(Some((st, bytes))) => {
                crate::validate::Fingerprint::of(&bytes).hex() == *ours
                    && crate::apply::meta_matches(&st, copy)
            }
            _ => false,
        }
    }
}

/// No source read yet, for each of `watches`.
fn nothing_read(watches: usize) -> Vec<Option<reconcile::LastRead>> {
    std::iter::repeat_with(|| None).take(watches).collect()
}

/// Fresh per-watch trackers, continuing from what the state knows.
fn trackers(settings: &Settings, state: &State) -> Vec<Tracker> {
    settings
        .watches
        .iter()
        .map(|w| Tracker::new(state.watches.get(&w.name)))
        .collect()
}

/// A validated new configuration, ready to swap in.
struct Reloaded {
    settings: Settings,
    watcher: Watcher,
    lock: Option<state::StateLock>,
}

/// One agent per state directory: a second one would restart the same
/// units again and overwrite the first one's state.
fn lock_state_dir(settings: &Settings) -> anyhow::Result<state::StateLock> {
    let dir = &settings.agent.state_dir;
    match state::try_lock(dir)? {
        Some(lock) => Ok(lock),
        None => {
            let holder = state::load(dir)
                .ok()
                .and_then(|s| s.agent.running_pid())
                .map_or_else(
                    || "another process".to_string(),
                    |pid| format!("the cred-watch agent with PID {pid}"),
                );
            anyhow::bail!(
                "state_dir {} is in use: {holder} holds {}; one agent per state_dir (stop it first, or give this one its own [agent] state_dir)",
                dir.display(),
                dir.join(state::LOCK_FILE).display()
            )
        }
    }
}

/// The watcher's slots: each watch's source (slot `n` is watch `n`), then
/// every copy destination, so a copy changed by someone else is noticed.
fn new_watcher(settings: &Settings) -> anyhow::Result<Watcher> {
    let files: Vec<PathBuf> = slot_roles(settings)
        .into_iter()
        .map(|(n, copy)| {
            let w = &settings.watches[n];
            copy.map_or_else(|| w.source.clone(), |c| w.copies[c].dest.clone())
        })
        .collect();
    Watcher::new(&files, settings.watches.len())
        .context("creating the inotify instance (fs.inotify.max_user_instances reached?)")
}

/// What each watcher slot is: (watch, copy index for a destination).
fn slot_roles(settings: &Settings) -> Vec<(usize, Option<usize>)> {
    let sources = (0..settings.watches.len()).map(|n| (n, None));
    let copies = settings
        .watches
        .iter()
        .enumerate()
        .flat_map(|(n, w)| (0..w.copies.len()).map(move |c| (n, Some(c))));
    sources.chain(copies).collect()
}

fn plan(r: &config::RestartSettings) -> Plan {
    Plan {
        action: r.action,
        timeout: r.timeout,
        min_interval: r.min_interval,
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}
