//! The agent: one synchronous event loop over inotify, signals and restart
//! completions, with deadlines for settle, deletion grace, expiry warnings,
//! retries and resync. Nothing wakes it while idle.

use crate::clock;
use crate::config::{self, Settings};
use crate::notify::{self, Notifier};
use crate::reconcile::{reconcile, Reconciled, Valid};
use crate::schedule::{Plan, Scheduler};
use crate::state::{self, now_ms, State};
use crate::systemd::{ServiceManager, Worker};
use crate::watch::{Change, Watcher};
use anyhow::Context;
use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// At most one state write per this interval during a storm.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Per-watch memory that does not need to survive a restart.
#[derive(Debug, Default)]
struct Runtime {
    absent_since: Option<Instant>,
    logout_warned: bool,
    last_refusal: Option<String>,
    retry_at: Option<Instant>,
    retries: u32,
    warned_fp: Option<String>,
    expiry_warned: Option<i64>,
    expiry_errored: Option<i64>,
    /// `expiresAt` last applied (mirrors the state record), kept here so
    /// the per-iteration timer scan does no map lookups: with 1,000 watches
    /// those string compares were most of an event's cost.
    expires_at: Option<i64>,
}

pub struct Agent {
    config_path: PathBuf,
    settings: Settings,
    watcher: Watcher,
    rt: Vec<Runtime>,
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
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        mask.add(s);
    }
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals arrive only through the signalfd.
    mask.thread_block().context("blocking signals")?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating signalfd")?;
    let worker = Worker::spawn(manager).context("starting the restart worker")?;
    let mut agent = Agent::new(config_path, settings, worker)?;
    agent.start()?;
    let result = agent.event_loop(&sigfd);
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
            rt: runtimes(&settings, &state),
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
        self.persist();
        let status = self.summary();
        self.notifier.send(&format!("READY=1\nSTATUS={status}"));
        info!("ready: {status}");
        Ok(())
    }

    /// Temp files a killed predecessor left next to our outputs.
    fn remove_stale_temps(&self) {
        let dirs = std::iter::once(self.settings.agent.state_dir.clone()).chain(
            self.settings.watches.iter().flat_map(|w| {
                w.copies
                    .iter()
                    .map(|c| crate::config::split_file(&c.dest).0.to_path_buf())
            }),
        );
        for dir in dirs {
            let n = crate::fsutil::remove_stale_temps(&dir);
            if n > 0 {
                info!(
                    "removed {n} temp file(s) left in {} by an interrupted write",
                    dir.display()
                );
            }
        }
    }

    /// Pending restarts and cooldowns survive an agent restart.
    fn restore_restarts(&mut self) {
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

    fn arm_all(&mut self) -> anyhow::Result<()> {
        for n in 0..self.watcher.len() {
            self.arm(n)?;
        }
        Ok(())
    }

    /// Arms watch `n`. A kernel limit is fatal: better to exit (and be
    /// restarted by systemd, loudly) than to run without watching.
    fn arm(&mut self, n: usize) -> anyhow::Result<()> {
        let name = &self.settings.watches[n].name;
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
        for n in 0..self.watcher.len() {
            self.process(n, true);
        }
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
        let now = Instant::now();
        let w = &self.settings.watches[n];
        let rec = self.state.watches.entry(w.name.clone()).or_default();
        let before = rec.clone();
        let units_before = self.state.units.clone();
        let last = rec.applied();
        let result = reconcile(w, self.watcher.dir_fd(n), last.as_ref(), &rec.copies, false);
        let name = w.name.clone();
        self.handle(n, complete, now, result);
        // Write the state only when this watch's record (or the set of
        // owed restarts) changed: an event that finds everything in sync,
        // like the echo of our own fchmod, costs no write and no fsync.
        if self.state.watches.get(&name) != Some(&before) || self.state.units != units_before {
            self.dirty = true;
        }
    }

    fn handle(
        &mut self,
        n: usize,
        complete: bool,
        now: Instant,
        result: Result<Reconciled, crate::fsutil::FsError>,
    ) {
        let w = &self.settings.watches[n];
        match result {
            Err(e) => {
                let msg = e.to_string();
                self.fail(n, msg);
            }
            Ok(Reconciled::Absent) => self.source_absent(n, now),
            Ok(Reconciled::Busy(why)) => debug!(
                "{}: {} {why}; its writer's next event brings it back",
                w.name,
                w.source.display()
            ),
            Ok(Reconciled::Unsafe(msg)) => self.refuse(n, msg),
            Ok(Reconciled::Invalid(r)) if r.maybe_partial() && !complete => {
                debug!(
                    "{}: {} not complete yet ({r}); waiting for the write to finish",
                    w.name,
                    w.source.display()
                );
            }
            Ok(Reconciled::Invalid(r)) => {
                let msg = format!(
                    "{}: refused: {r}; keeping the last good state",
                    w.source.display()
                );
                self.refuse(n, msg);
            }
            Ok(Reconciled::Applied(v)) => self.applied(n, v, now),
        }
    }

    fn refuse(&mut self, n: usize, msg: String) {
        let w = &self.settings.watches[n];
        let rt = &mut self.rt[n];
        rt.absent_since = None;
        if rt.last_refusal.as_deref() != Some(msg.as_str()) {
            warn!("{}: {msg}", w.name);
            self.notifier
                .status(&format!("{}: refused a source file", w.name));
        } else {
            debug!("{}: {msg} (again)", w.name);
        }
        rt.last_refusal = Some(msg.clone());
        self.state
            .watches
            .entry(w.name.clone())
            .or_default()
            .last_refusal = Some(msg);
    }

    fn fail(&mut self, n: usize, msg: String) {
        let w = &self.settings.watches[n];
        let rt = &mut self.rt[n];
        rt.retries += 1;
        let backoff = Duration::from_millis(500)
            .saturating_mul(1 << rt.retries.min(10))
            .min(Duration::from_secs(60));
        rt.retry_at = Some(clock::later(Instant::now(), backoff));
        error!(
            "{}: {msg}; retrying in {}",
            w.name,
            config::format_duration(backoff)
        );
        self.state
            .watches
            .entry(w.name.clone())
            .or_default()
            .last_error = Some(msg);
    }

    fn source_absent(&mut self, n: usize, now: Instant) {
        let w = &self.settings.watches[n];
        let rt = &mut self.rt[n];
        if rt.absent_since.is_none() {
            rt.absent_since = Some(now);
            rt.logout_warned = false;
            info!(
                "{}: {} is absent ({}); nothing downstream is removed",
                w.name,
                w.source.display(),
                self.watcher.describe(n)
            );
        }
        rt.last_refusal = None;
    }

    fn applied(&mut self, n: usize, v: Valid, now: Instant) {
        let w = &self.settings.watches[n];
        let rt = &mut self.rt[n];
        if rt.absent_since.take().is_some() {
            info!("{}: {} is back", w.name, w.source.display());
        }
        rt.last_refusal = None;
        let fp = v.fingerprint.short();
        if rt.warned_fp.as_deref() != Some(fp.as_str()) {
            for msg in &v.warnings {
                warn!("{}: {msg} (fingerprint {fp})", w.name);
            }
            rt.warned_fp = Some(fp.clone());
        }
        let rec = self.state.watches.entry(w.name.clone()).or_default();
        rec.copies.extend(v.written.clone());
        if !v.errors.is_empty() {
            let msg = v.errors.join("; ");
            self.fail(n, msg);
            return;
        }
        rt.retries = 0;
        rt.retry_at = None;
        rec.last_error = None;
        rec.last_refusal = None;
        let expiry = v
            .expires_at
            .map(|e| format!(", expiresAt {}", crate::validate::fmt_ms(e)))
            .unwrap_or_default();
        let changes = if v.changes.is_empty() {
            "nothing to change".to_string()
        } else {
            v.changes.join(", ")
        };
        if v.content_changed {
            let first = rec.fingerprint.is_none();
            rec.set_applied(v.fingerprint, v.expires_at);
            rt.expires_at = v.expires_at;
            rt.expiry_warned = None;
            rt.expiry_errored = None;
            let action = format!("applied {fp}{expiry}: {changes}");
            rec.last_action = Some(action.clone());
            rec.last_action_at_ms = Some(now_ms());
            match &w.restart {
                Some(_) if first => info!(
                    "{}: {action}; first credentials seen, adopted without a restart",
                    w.name
                ),
                Some(r) => {
                    for unit in &r.units {
                        self.sched.request(unit, plan(r), now);
                        let u = self.state.units.entry(unit.clone()).or_default();
                        if !u.pending {
                            u.pending = true;
                            u.pending_since_ms = Some(now_ms());
                        }
                    }
                    info!(
                        "{}: {action}; restart of {} scheduled after {} quiet",
                        w.name,
                        r.units.join(", "),
                        config::format_duration(self.settings.agent.settle)
                    );
                }
                None => info!("{}: {action}", w.name),
            }
            self.notifier.status(&format!("{}: applied {fp}", w.name));
        } else if !v.changes.is_empty() {
            let action = format!("{fp} unchanged{expiry}: {changes}");
            info!("{}: {action}", w.name);
            rec.last_action = Some(action);
            rec.last_action_at_ms = Some(now_ms());
        } else {
            debug!("{}: {fp} in sync", w.name);
        }
        for msg in &v.warnings {
            if msg.contains("modified by another writer") {
                warn!("{}: {msg}", w.name);
            }
        }
    }

    /// Expiry of the token last applied, as (deadline for warning, for error).
    fn expiry_deadlines(&self, n: usize) -> Option<(i64, i64)> {
        let exp = self.rt[n].expires_at?;
        Some((
            exp.saturating_sub(clock::ms(self.settings.watches[n].expiry_warning)),
            exp,
        ))
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        let wall = now_ms();
        for n in 0..self.watcher.len() {
            let w = &self.settings.watches[n];
            let rt = &mut self.rt[n];
            if let Some(since) = rt.absent_since {
                if !rt.logout_warned && now >= clock::later(since, w.deletion_grace) {
                    rt.logout_warned = true;
                    warn!(
                        "{}: {} has been absent for {}: this looks like a logout, not a login; nothing downstream was removed",
                        w.name,
                        w.source.display(),
                        config::format_duration(w.deletion_grace)
                    );
                }
            }
            if let Some((warn_at, exp)) = self.expiry_deadlines(n) {
                let rt = &mut self.rt[n];
                if wall >= exp && rt.expiry_errored != Some(exp) {
                    rt.expiry_errored = Some(exp);
                    error!(
                        "{}: the token last applied expired at {} and no newer file arrived: nothing is refreshing it (run the CLI or /login as its user)",
                        w.name,
                        crate::validate::fmt_ms(exp)
                    );
                } else if wall >= warn_at && wall < exp && rt.expiry_warned != Some(exp) {
                    rt.expiry_warned = Some(exp);
                    warn!(
                        "{}: the token last applied expires at {} (in {}) and no newer file has arrived: is anything refreshing it?",
                        w.name,
                        crate::validate::fmt_ms(exp),
                        config::format_duration(Duration::from_secs(clock::between_ms(wall, exp).as_secs()))
                    );
                }
            }
            if self.rt[n].retry_at.is_some_and(|at| now >= at) {
                self.rt[n].retry_at = None;
                self.process(n, true);
            }
        }
        let jobs = self.sched.take_due(now);
        if !jobs.is_empty() {
            for job in &jobs {
                info!("restarting {} ({})", job.unit, job.plan.action.method());
            }
            self.notifier.status(&format!(
                "restarting {}",
                jobs.iter()
                    .map(|j| j.unit.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            self.worker.submit(jobs);
        }
        if self.next_resync.is_some_and(|at| now >= at) {
            self.reconcile_all("resync_interval");
        }
        if let (Some(every), true) = (self.watchdog, self.next_watchdog.is_none_or(|at| now >= at))
        {
            self.notifier.send("WATCHDOG=1");
            self.next_watchdog = Some(clock::later(now, every / 2));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let wall = now_ms();
        let mut next: Option<Instant> = None;
        let mut push = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        for at in [
            self.sched.next_deadline(),
            self.next_resync,
            self.next_watchdog,
            self.persist_due(),
        ]
        .into_iter()
        .flatten()
        {
            push(at);
        }
        for (n, rt) in self.rt.iter().enumerate() {
            let w = &self.settings.watches[n];
            if let (Some(since), false) = (rt.absent_since, rt.logout_warned) {
                push(clock::later(since, w.deletion_grace));
            }
            if let Some(at) = rt.retry_at {
                push(at);
            }
            if let Some((warn_at, exp)) = self.expiry_deadlines(n) {
                let at = if rt.expiry_warned != Some(exp) && wall < warn_at {
                    Some(warn_at)
                } else if rt.expiry_errored != Some(exp) {
                    Some(exp.max(warn_at))
                } else {
                    None
                };
                if let Some(at) = at {
                    push(clock::later(now, clock::between_ms(wall, at)));
                }
            }
        }
        next
    }

    fn restart_outcomes(&mut self) {
        let now = Instant::now();
        for out in self.worker.finished() {
            let ok = out.result.is_ok();
            let backoff = self.sched.finished(&out.unit, ok, now);
            let rec = self.state.units.entry(out.unit.clone()).or_default();
            rec.last_restart_ms = Some(now_ms());
            match &out.result {
                Ok(()) => {
                    rec.restarts += 1;
                    rec.failures = 0;
                    rec.last_result = Some("done".into());
                    if !self.sched.is_pending(&out.unit) {
                        rec.pending = false;
                        rec.pending_since_ms = None;
                    }
                    info!("restarted {}", out.unit);
                    self.notifier.status(&format!("restarted {}", out.unit));
                }
                Err(e) => {
                    rec.failures = self.sched.failures(&out.unit);
                    rec.last_result = Some(e.clone());
                    rec.pending = true;
                    error!(
                        "restart of {} failed: {e}; retrying in {} (attempt {})",
                        out.unit,
                        config::format_duration(backoff.unwrap_or_default()),
                        rec.failures + 1
                    );
                    self.notifier
                        .status(&format!("restart of {} failed", out.unit));
                }
            }
            self.dirty = true;
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
                self.rt = runtimes(&new, &self.state);
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
        let refused = self.rt.iter().filter(|r| r.last_refusal.is_some()).count();
        let absent = self.rt.iter().filter(|r| r.absent_since.is_some()).count();
        format!("watching {n} source(s), {absent} absent, {refused} refused")
    }

    fn event_loop(&mut self, sigfd: &SignalFd) -> anyhow::Result<()> {
        loop {
            let timeout = match self.next_deadline() {
                None => PollTimeout::NONE,
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis();
                    // Round up so a deadline is never polled for early in a busy loop.
                    PollTimeout::try_from(ms.saturating_add(1).min(i32::MAX as u128))
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let (ino, sig, done) = {
                let mut fds = [
                    PollFd::new(self.watcher.fd(), PollFlags::POLLIN),
                    PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.worker.wake.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("poll"),
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
            };
            if sig {
                while let Ok(Some(info)) = sigfd.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGTERM | Signal::SIGINT) => {
                            info!("stopping on signal {}", info.ssi_signo);
                            return Ok(());
                        }
                        Ok(Signal::SIGHUP) => self.reload(),
                        Ok(Signal::SIGUSR1) => {
                            info!("SIGUSR1: reconciling everything now");
                            self.reconcile_all("SIGUSR1");
                        }
                        _ => {}
                    }
                }
            }
            if ino {
                self.handle_inotify()?;
            }
            if done {
                self.restart_outcomes();
            }
            self.check_timers();
            if self.persist_due().is_some_and(|at| Instant::now() >= at) {
                self.persist();
            }
        }
    }

    fn handle_inotify(&mut self) -> anyhow::Result<()> {
        let changes = self.watcher.read().context("reading inotify events")?;
        if changes.contains(&Change::Overflow) {
            warn!("inotify queue overflowed: re-scanning every watch");
            self.arm_all()?;
            self.reconcile_all("overflow");
            return Ok(());
        }
        // Coalesce: each watch is re-armed and processed at most once per batch.
        let mut rearm = vec![false; self.watcher.len()];
        let mut touched: Vec<Option<bool>> = vec![None; self.watcher.len()];
        for c in changes {
            match c {
                Change::Rearm(n) => rearm[n] = true,
                Change::Source { watch, complete } => {
                    let t = &mut touched[watch];
                    *t = Some(t.unwrap_or(false) || complete);
                }
                Change::Overflow => {}
            }
        }
        for n in 0..self.watcher.len() {
            if rearm[n] {
                self.arm(n)?;
                self.process(n, true);
            } else if let Some(complete) = touched[n] {
                self.process(n, complete);
            }
        }
        Ok(())
    }
}

/// Fresh per-watch memory, seeded with what the state knows.
fn runtimes(settings: &Settings, state: &State) -> Vec<Runtime> {
    settings
        .watches
        .iter()
        .map(|w| Runtime {
            expires_at: state.watches.get(&w.name).and_then(|r| r.expires_at_ms),
            ..Runtime::default()
        })
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

fn new_watcher(settings: &Settings) -> anyhow::Result<Watcher> {
    let sources: Vec<PathBuf> = settings.watches.iter().map(|w| w.source.clone()).collect();
    Watcher::new(&sources)
        .context("creating the inotify instance (fs.inotify.max_user_instances reached?)")
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
