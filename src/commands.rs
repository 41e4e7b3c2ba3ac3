//! One-shot commands: `sync` (one reconcile pass, restarts included) and
//! `status` (what the agent last did, from the state file).

use crate::clock;
use crate::config::{format_duration, Settings, WatchSettings};
use crate::fsutil::{self, FsError};
use crate::reconcile::{reconcile, Inputs, Reconciled};
use crate::schedule::Need;
use crate::state::{self, now_ms, State};
use crate::systemd::ServiceManager;
use crate::tracker::{Effect, Now, Tracker};
use crate::validate::fmt_ms;
use anyhow::bail;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

/// One reconcile pass. Returns 0 when every watch is in sync or was
/// applied, 1 otherwise. The state is updated by the same tracker rules
/// as the agent's, so the two never disagree about what happened.
pub fn sync(
    settings: &Settings,
    dry_run: bool,
    only: Option<&str>,
    manager: Box<dyn ServiceManager>,
) -> anyhow::Result<i32> {
    if let Some(name) = only {
        if settings.watch(name).is_none() {
            // A usage error, like clap's own (exit 2).
            let names: Vec<&str> = settings.watches.iter().map(|w| w.name.as_str()).collect();
            eprintln!(
                "error: no watch named {name:?} in the configuration (watches: {})",
                names.join(", ")
            );
            return Ok(2);
        }
    }
    let dir = &settings.agent.state_dir;
    // Held until the pass ends. A running agent holds it for its whole
    // life: then it does the pass, so a unit is never restarted twice for
    // one change and neither overwrites the other's state.
    let _lock = if dry_run {
        None
    } else {
        match state::try_lock(dir)? {
            Some(lock) => Some(lock),
            None => return sync_by_agent(settings, only),
        }
    };
    let mut st = state::load_or_fresh(dir)?;
    let mut manager = (!dry_run).then_some(manager);
    let mut healthy = true;
    for w in settings
        .watches
        .iter()
        .filter(|w| only.is_none_or(|n| n == w.name))
    {
        let (ok, need) = sync_watch(w, &mut st, dry_run, dir);
        healthy &= ok;
        healthy &= sync_restarts(w, &mut st, need, &mut manager);
    }
    if !dry_run {
        st.agent.last_reconcile_ms = Some(now_ms());
        st.agent.last_reconcile_result = Some(if healthy {
            "ok (sync)".into()
        } else {
            "problems (sync)".into()
        });
        state::save(dir, &st)?;
    }
    Ok(if healthy { 0 } else { 1 })
}

/// Reconciles one watch and records it. Returns (healthy, restart owed).
fn sync_watch(w: &WatchSettings, st: &mut State, dry_run: bool, rescue_dir: &Path) -> (bool, Need) {
    let (dir_path, _) = w.source_dir_and_name();
    let rec = st.watches.entry(w.name.clone()).or_default();
    let last = rec.applied();
    let dir_fd = match fsutil::open_dir(dir_path) {
        Ok(fd) => Some(fd),
        Err(FsError::Missing(_)) => None,
        Err(e) => {
            println!("{}: {e}", w.name);
            return (false, Need::default());
        }
    };
    let dir = dir_fd.as_ref().map(|f| f.as_fd());
    let ctx = Inputs {
        last: last.as_ref(),
        last_written: &rec.copies,
        dry_run,
        rescue_dir,
    };
    let result = reconcile(w, dir, &ctx);
    let healthy = print_outcome(w, &result, dry_run);
    if dry_run {
        return (healthy, Need::default());
    }
    let mut tracker = Tracker::new(Some(rec));
    let effects = tracker.on_read(w, rec, result, true, Now::current());
    let need = effects.iter().fold(Need::default(), |acc, e| match e {
        Effect::Restart(_, need) => acc.merge(*need),
        _ => acc,
    });
    (healthy, need)
}

/// Says what one reconcile found; returns whether the watch is healthy.
fn print_outcome(w: &WatchSettings, result: &Result<Reconciled, FsError>, dry_run: bool) -> bool {
    let name = &w.name;
    let v = match result {
        Err(e) => {
            println!("{name}: {e}");
            return false;
        }
        Ok(Reconciled::Absent) => {
            println!("{name}: {} is absent; nothing to do", w.source.display());
            return false;
        }
        Ok(Reconciled::Busy(why)) => {
            println!(
                "{name}: {} {why}; try again when its writer is done",
                w.source.display()
            );
            return false;
        }
        Ok(Reconciled::Applied(v)) => v,
        Ok(refused) => {
            let why = refused.refusal(&w.source).unwrap_or_default();
            println!("{name}: {why}");
            return false;
        }
    };
    let expiry = v
        .expires_at
        .map(|e| format!(", expiresAt {}", fmt_ms(e)))
        .unwrap_or_default();
    for notice in &v.notices {
        println!("{name}: warning: {notice}");
    }
    for err in &v.errors {
        println!("{name}: error: {err}");
    }
    let fp = v.fingerprint.short();
    if !v.errors.is_empty() {
        return false;
    }
    if v.changes.is_empty() && !v.content_changed {
        println!("{name}: in sync ({fp}{expiry})");
    } else {
        let changes = if v.changes.is_empty() {
            "new credentials".into()
        } else {
            v.changes.join(", ")
        };
        let verb = if dry_run { "would apply" } else { "applied" };
        println!("{name}: {verb} {fp}{expiry}: {changes}");
    }
    true
}

/// Restarts the watch's units that are owed one (now, or still pending
/// from the agent). Returns false when one failed.
/// Restarts follow state, as in the agent: a unit is restarted when it
/// started before the credential it should use was written (or, where
/// that cannot be known, when a new credential or a pending restart owes
/// it one). So "in sync" means the units are too.
fn sync_restarts(
    w: &WatchSettings,
    st: &mut State,
    need: Need,
    manager: &mut Option<Box<dyn ServiceManager>>,
) -> bool {
    let Some(r) = &w.restart else { return true };
    let written = st.watches.get(&w.name).and_then(|rec| rec.written_ms);
    let mut healthy = true;
    for unit in &r.units {
        let pending = st.units.get(unit).is_some_and(|u| u.pending);
        let need = need.merge(Need {
            written_ms: written,
            must: pending,
        });
        let Some(manager) = manager.as_mut() else {
            if need.must {
                println!("{}: would restart {unit}", w.name);
            }
            continue;
        };
        let u = st.units.entry(unit.clone()).or_default();
        if !crate::systemd::restart_needed(manager.as_mut(), unit, need) {
            if need.must {
                println!(
                    "{}: {unit} started after the credential was written: in sync",
                    w.name
                );
            }
            u.in_sync();
            continue;
        }
        match manager.restart(unit, r.action, r.timeout) {
            Ok(()) => {
                println!("{}: restarted {unit}", w.name);
                u.restarted(now_ms(), false);
            }
            Err(e) => {
                println!("{}: restart of {unit} failed: {e:#}", w.name);
                u.restart_failed(now_ms(), format!("{e:#}"), u.failures.saturating_add(1));
                healthy = false;
            }
        }
    }
    healthy
}

/// `sync` while the agent runs: ask it for a full reconcile (SIGUSR1),
/// wait until its state file records one, and report from that.
fn sync_by_agent(settings: &Settings, only: Option<&str>) -> anyhow::Result<i32> {
    let st = ask_agent(&settings.agent.state_dir)?;
    let mut healthy = true;
    for w in settings
        .watches
        .iter()
        .filter(|w| only.is_none_or(|n| n == w.name))
    {
        let rec = st.watches.get(&w.name).cloned().unwrap_or_default();
        if std::fs::symlink_metadata(&w.source).is_err() {
            println!("{}: {} is absent", w.name, w.source.display());
            healthy = false;
        } else if let Some(problem) = rec.problem() {
            println!("{}: {problem}", w.name);
            healthy = false;
        } else {
            println!(
                "{}: in sync ({}); last action: {}",
                w.name,
                rec.short_fingerprint().unwrap_or("nothing applied"),
                rec.last_action.as_deref().unwrap_or("none")
            );
        }
        for unit in w.restart.iter().flat_map(|r| &r.units) {
            if st.units.get(unit).is_some_and(|u| u.pending) {
                println!("{}: restart of {unit} pending in the agent", w.name);
            }
        }
    }
    Ok(if healthy { 0 } else { 1 })
}

fn ago(ms: Option<i64>) -> String {
    match ms {
        Some(ms) => format!(
            "{} ({} ago)",
            fmt_ms(ms),
            format_duration(Duration::from_secs(
                clock::between_ms(ms, now_ms()).as_secs()
            ))
        ),
        None => "never".into(),
    }
}

/// Prints what the agent last did. Always exits 0.
pub fn status(settings: &Settings, json: bool) -> anyhow::Result<i32> {
    let st = state::load_or_fresh(&settings.agent.state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(0);
    }
    println!(
        "state: {}",
        state::state_path(&settings.agent.state_dir).display()
    );
    if state::agent_running(&settings.agent.state_dir) {
        println!(
            "agent: running, pid {}, started {}",
            st.agent.pid.map_or("-".into(), |p| p.to_string()),
            ago(st.agent.started_at_ms)
        );
    } else {
        println!(
            "agent: not running (last run: pid {}, started {})",
            st.agent.pid.map_or("-".into(), |p| p.to_string()),
            ago(st.agent.started_at_ms)
        );
    }
    println!(
        "last reconcile: {} — {}",
        ago(st.agent.last_reconcile_ms),
        st.agent.last_reconcile_result.as_deref().unwrap_or("-")
    );
    for w in &settings.watches {
        print_watch_status(w, &st);
    }
    Ok(0)
}

/// One watch's part of `status`.
fn print_watch_status(w: &WatchSettings, st: &State) {
    let rec = st.watches.get(&w.name).cloned().unwrap_or_default();
    println!("watch {}: {}", w.name, w.source.display());
    println!(
        "  applied: {} at {}",
        rec.short_fingerprint().unwrap_or("nothing yet"),
        ago(rec.applied_at_ms)
    );
    if let Some(exp) = rec.expires_at_ms {
        let left = exp.saturating_sub(now_ms());
        let when = if left > 0 {
            format!(
                "in {}",
                format_duration(Duration::from_secs((left / 1000) as u64))
            )
        } else {
            "EXPIRED".into()
        };
        println!("  token expires: {} ({when})", fmt_ms(exp));
    }
    println!(
        "  last action: {} at {}",
        rec.last_action.as_deref().unwrap_or("-"),
        ago(rec.last_action_at_ms)
    );
    if let Some(r) = &rec.last_refusal {
        println!("  last refusal: {r}");
    }
    if let Some(e) = &rec.last_error {
        println!("  last error: {e}");
    }
    print_keeper_status(w, &rec);
    for unit in w.restart.iter().flat_map(|r| &r.units) {
        let u = st.units.get(unit).cloned().unwrap_or_default();
        println!(
            "  unit {unit}: {}, last restart {} ({}), {} restarts",
            if u.pending {
                "restart PENDING"
            } else {
                "no restart pending"
            },
            ago(u.last_restart_ms),
            u.last_result.as_deref().unwrap_or("-"),
            u.restarts
        );
    }
}

/// The refresh keeper, alerts and rescued credentials of one watch.
fn print_keeper_status(w: &WatchSettings, rec: &crate::state::WatchRecord) {
    if let Some(why) = &rec.alerted {
        println!("  alert raised: {why}");
    }
    if rec.rescued > 0 {
        println!(
            "  RESCUED {} newer credential(s) from copies (a consumer refreshed): see the journal and state_dir/rescued-<watch>.json",
            rec.rescued
        );
    }
    if let (Some(r), Some(unit)) = (&rec.refresh, w.refresh.as_ref().map(|r| &r.unit)) {
        println!(
            "  refresh through {unit}: {} refreshes, last started {}, last refreshed {}",
            r.refreshes,
            ago(r.last_started_ms),
            ago(r.last_refreshed_ms)
        );
        if let Some(e) = &r.last_error {
            println!("  refresh FAILED ({} in a row): {e}", r.failures);
        }
    }
}

/// Sends the running agent SIGUSR1 and returns its state once it records
/// the reconcile that followed.
fn ask_agent(dir: &Path) -> anyhow::Result<State> {
    let load = || state::load_or_fresh(dir);
    // A starting agent holds the lock a moment before it records its PID.
    let mut pid = None;
    for _ in 0..40 {
        pid = load()?.agent.running_pid();
        if pid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        bail!(
            "{} is held by a process that is not a recorded cred-watch agent; not syncing",
            dir.join(state::LOCK_FILE).display()
        );
    };
    let asked = now_ms();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|e| anyhow::anyhow!("signalling the agent (PID {pid}): {e}"))?;
    println!("the agent (PID {pid}) is running: asked it to reconcile (SIGUSR1)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = load()?;
        if st.agent.last_reconcile_ms.is_some_and(|t| t >= asked) {
            return Ok(st);
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent (PID {pid}) did not record a reconcile within 10s; see `journalctl -u cred-watch`");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
