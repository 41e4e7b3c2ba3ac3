//! The service manager behind a small trait, a worker thread that runs
//! restart jobs off the event loop, and the unit queries of `doctor`, all
//! over D-Bus. The test doubles are in [`crate::doubles`].

use crate::config::RestartAction;
use crate::schedule::Job;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;
use zbus::OwnedObjectPath;

/// Restarts units and waits for the job's result.
pub trait ServiceManager: Send {
    /// Runs `action` on `unit`, waiting at most `timeout` for the job to
    /// finish. Any result but `done` is an error naming unit and result.
    fn restart(
        &mut self,
        unit: &str,
        action: RestartAction,
        timeout: Duration,
    ) -> anyhow::Result<()>;

    /// When `unit` was last started (ms since the epoch), if it is running
    /// and that can be known.
    fn started_at_ms(&mut self, _unit: &str) -> Option<i64> {
        None
    }

    /// How to tell, a moment after a `done` restart, that the unit is still
    /// running (none: cannot be told).
    fn running_check(&self) -> Option<RunningCheck> {
        None
    }
}

/// Checks that a unit is running (see [`ServiceManager::running_check`]).
pub type RunningCheck = fn(&str) -> anyhow::Result<()>;

/// Whether a restart owed for `need` is still needed: the unit was last
/// started before the credential it should use was written, or that is
/// not known and the need is a must.
pub fn restart_needed(
    manager: &mut dyn ServiceManager,
    unit: &str,
    need: crate::schedule::Need,
) -> bool {
    match (need.written_ms, manager.started_at_ms(unit)) {
        (Some(written), Some(started)) => started < written,
        _ => need.must,
    }
}

/// The subset of org.freedesktop.systemd1.Manager that cred-watch uses.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn try_restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reload_or_restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

/// systemd over the system D-Bus. Connects per restart, so a restarted
/// dbus-daemon or `systemctl daemon-reexec` in between is harmless.
pub struct Systemd;

impl ServiceManager for Systemd {
    fn restart(
        &mut self,
        unit: &str,
        action: RestartAction,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        zbus::block_on(restart_and_wait(unit, action, timeout))
    }

    fn running_check(&self) -> Option<RunningCheck> {
        Some(|unit| zbus::block_on(running_after_restart(unit)))
    }

    fn started_at_ms(&mut self, unit: &str) -> Option<i64> {
        match zbus::block_on(active_since_ms(unit)) {
            Ok(at) => at,
            Err(e) => {
                log::debug!(
                    "{unit}: start time unknown ({e:#}); restarting when a new credential says so"
                );
                None
            }
        }
    }
}

/// `ActiveEnterTimestamp` of a running unit, in ms since the epoch.
async fn active_since_ms(unit: &str) -> anyhow::Result<Option<i64>> {
    let conn = zbus::connection::Builder::system().build().await?;
    let manager = ManagerQueryProxy::new(&conn).await?;
    let path = manager.load_unit(unit).await?;
    let proxy: UnitProxy = property_proxy(&conn, &path).await?;
    if !matches!(proxy.active_state().await?.as_str(), "active" | "reloading") {
        return Ok(None);
    }
    let us = proxy.active_enter_timestamp().await?;
    Ok((us > 0).then(|| i64::try_from(us / 1000).unwrap_or(i64::MAX)))
}

/// `done` only says the job ran (systemd #22369): a process that exits at
/// once is still "active" right then. A moment later, on a thread of its
/// own (the worker goes on with the next job), the unit must still be
/// running; if not, a failed restart is reported after the `done`.
fn verify_later(
    running: RunningCheck,
    unit: &str,
    out_tx: &mpsc::Sender<Outcome>,
    wake_tx: &UnixStream,
) {
    let (unit, out_tx) = (unit.to_string(), out_tx.clone());
    let Ok(mut wake_tx) = wake_tx.try_clone() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("running-check".into())
        .spawn(move || {
            std::thread::sleep(RUNNING_CHECK_DELAY);
            if let Err(e) = running(&unit) {
                let failed = Outcome {
                    unit,
                    action: RestartAction::Restart,
                    skipped: false,
                    result: Err(format!("{e:#}")),
                };
                if out_tx.send(failed).is_ok() {
                    let _ = wake_tx.write_all(&[1]);
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot check that the restarted unit runs: {e}");
    }
}

/// How long after a `done` restart the unit must still be running.
const RUNNING_CHECK_DELAY: Duration = Duration::from_millis(500);

async fn restart_and_wait(
    unit: &str,
    action: RestartAction,
    timeout: Duration,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use zbus::export::futures_core::Stream;
    let conn = zbus::connection::Builder::system()
        .method_timeout(timeout)
        .build()
        .await
        .context("connecting to the system D-Bus")?;
    let manager = ManagerProxy::new(&conn)
        .await
        .context("creating the systemd manager proxy")?;
    // Subscribe to JobRemoved before the call: a fast job may finish before
    // the call even returns its path.
    let mut removed = manager
        .receive_job_removed()
        .await
        .context("subscribing to JobRemoved")?;
    if let Err(e) = manager.subscribe().await {
        log::debug!("systemd Subscribe failed (signals may still arrive): {e}");
    }
    let call = match action {
        RestartAction::Restart => manager.restart_unit(unit, "replace").await,
        RestartAction::TryRestart => manager.try_restart_unit(unit, "replace").await,
        RestartAction::ReloadOrRestart => manager.reload_or_restart_unit(unit, "replace").await,
        RestartAction::Start => manager.start_unit(unit, "replace").await,
    };
    let job =
        call.map_err(|e| anyhow::anyhow!("{} {unit}: {}", action.method(), dbus_error(&e)))?;
    log::debug!("{unit}: job {} queued", job.as_str());
    let wait = std::future::poll_fn(|cx| loop {
        match std::pin::Pin::new(&mut removed).poll_next(cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
            std::task::Poll::Ready(Some(signal)) => {
                if let Ok(args) = signal.args() {
                    if args.job == job {
                        return std::task::Poll::Ready(Some(args.result.clone()));
                    }
                }
            }
        }
    });
    let runtime = zruntime::SharedRuntime::current().context("D-Bus runtime")?;
    match runtime.timeout(timeout, wait).await {
        Err(_) => anyhow::bail!(
            "job for {unit} did not finish within {}",
            crate::config::format_duration(timeout)
        ),
        Ok(None) => anyhow::bail!("lost the system D-Bus while waiting for the job of {unit}"),
        Ok(Some(result)) if result == "done" => Ok(()),
        Ok(Some(result)) => anyhow::bail!("job for {unit} finished with result {result:?}"),
    }
}

/// Reads `ActiveState` once: a unit whose process exited is not running. (A
/// started oneshot, or a try-restart of a stopped unit, is rightly not
/// running afterwards: not asked for those.)
async fn running_after_restart(unit: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .context("connecting to the system D-Bus")?;
    let manager = ManagerQueryProxy::new(&conn).await?;
    let path = manager.load_unit(unit).await?;
    let proxy: UnitProxy = property_proxy(&conn, &path).await?;
    let state = proxy.active_state().await?;
    match state.as_str() {
        "active" | "activating" | "reloading" => Ok(()),
        other => anyhow::bail!("job for {unit} finished, but the unit is {other}, not running"),
    }
}

/// "org.freedesktop.systemd1.NoSuchUnit: Unit x.service not found." style.
fn dbus_error(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{}: {msg}", name.as_str()),
        other => other.to_string(),
    }
}

/// The result of one job.
#[derive(Debug)]
pub struct Outcome {
    pub unit: String,
    pub action: RestartAction,
    /// Not restarted: it was started after the credential it should use
    /// was written (already in sync).
    pub skipped: bool,
    pub result: Result<(), String>,
}

/// Runs restart jobs on a thread so that permission fixes and copies never
/// wait for a slow unit. Completion wakes the event loop through a socket.
pub struct Worker {
    jobs: mpsc::Sender<Vec<Job>>,
    outcomes: mpsc::Receiver<Outcome>,
    pub wake: UnixStream,
}

impl Worker {
    pub fn spawn(mut manager: Box<dyn ServiceManager>) -> std::io::Result<Worker> {
        let (wake, mut wake_tx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let (jobs, job_rx) = mpsc::channel::<Vec<Job>>();
        let (out_tx, outcomes) = mpsc::channel();
        std::thread::Builder::new()
            .name("restart".into())
            .spawn(move || {
                for batch in job_rx {
                    for job in batch {
                        let start = job.plan.action == RestartAction::Start;
                        let skipped =
                            !start && !restart_needed(manager.as_mut(), &job.unit, job.need);
                        let result = if skipped {
                            Ok(())
                        } else {
                            manager
                                .restart(&job.unit, job.plan.action, job.plan.timeout)
                                .map_err(|e| format!("{e:#}"))
                        };
                        let check = matches!(
                            job.plan.action,
                            RestartAction::Restart | RestartAction::ReloadOrRestart
                        ) && !skipped
                            && result.is_ok();
                        if let (true, Some(running)) = (check, manager.running_check()) {
                            verify_later(running, &job.unit, &out_tx, &wake_tx);
                        }
                        if out_tx
                            .send(Outcome {
                                unit: job.unit,
                                action: job.plan.action,
                                skipped,
                                result,
                            })
                            .is_err()
                        {
                            return;
                        }
                        let _ = wake_tx.write_all(&[1]);
                    }
                }
            })?;
        Ok(Worker {
            jobs,
            outcomes,
            wake,
        })
    }

    pub fn submit(&self, batch: Vec<Job>) {
        let _ = self.jobs.send(batch);
    }

    /// Finished jobs, after draining the wake-up bytes.
    pub fn finished(&self) -> Vec<Outcome> {
        use std::io::Read;
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.outcomes.try_iter().collect()
    }
}

/// What `doctor` needs to know about a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct UnitInfo {
    /// "loaded", "not-found", "masked", …
    pub load_state: String,
    /// "active", "inactive", "failed", …
    pub active_state: String,
    /// The service's `User=` (empty for root).
    pub user: String,
    /// The service's `Group=` (empty: the user's primary group).
    pub group: String,
    /// The service's `SupplementaryGroups=`, names (or numeric ids).
    pub supplementary_groups: Vec<String>,
    /// The service's `MainPID` (0: not running).
    pub main_pid: u32,
    /// The service's `Environment=`: "KEY=VALUE" entries, in order.
    pub environment: Vec<String>,
    /// The service's `EnvironmentFile=`: (path, errors ignored, i.e. "-").
    pub environment_files: Vec<(String, bool)>,
    /// Processes in the unit's cgroup.
    pub pids: Vec<u32>,
    /// When it entered the active state (ms since the epoch), if it runs.
    pub active_since_ms: Option<i64>,
}

/// Read-only questions to the service manager (for `doctor`).
pub trait UnitQuery {
    fn unit(&mut self, name: &str) -> anyhow::Result<UnitInfo>;
    /// Enabled `.path` units and the paths each watches.
    fn enabled_path_units(&mut self) -> anyhow::Result<Vec<(String, Vec<String>)>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait ManagerQuery {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_unit_processes(&self, name: &str) -> zbus::Result<Vec<(String, u32, String)>>;
    fn list_unit_files(&self) -> zbus::Result<Vec<(String, String)>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_enter_timestamp(&self) -> zbus::Result<u64>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait ServiceUnit {
    #[zbus(property)]
    fn user(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn group(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn supplementary_groups(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn environment(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn environment_files(&self) -> zbus::Result<Vec<(String, bool)>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Path",
    default_service = "org.freedesktop.systemd1"
)]
trait PathUnit {
    #[zbus(property)]
    fn paths(&self) -> zbus::Result<Vec<(String, String)>>;
}

/// [`UnitQuery`] over the system bus, connected on the first question.
#[derive(Default)]
pub struct SystemdQuery {
    conn: Option<zbus::Connection>,
}

impl SystemdQuery {
    async fn conn(&mut self) -> anyhow::Result<zbus::Connection> {
        use anyhow::Context;
        if self.conn.is_none() {
            self.conn = Some(
                zbus::Connection::system()
                    .await
                    .context("connecting to the system D-Bus")?,
            );
        }
        Ok(self.conn.clone().expect("set above"))
    }
}

async fn property_proxy<'a, P>(
    conn: &zbus::Connection,
    path: &'a OwnedObjectPath,
) -> zbus::Result<P>
where
    P: From<zbus::Proxy<'a>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(conn)
        .path(path.as_str())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

impl UnitQuery for SystemdQuery {
    fn unit(&mut self, name: &str) -> anyhow::Result<UnitInfo> {
        zbus::block_on(async {
            let conn = self.conn().await?;
            let manager = ManagerQueryProxy::new(&conn).await?;
            let path = manager
                .load_unit(name)
                .await
                .map_err(|e| anyhow::anyhow!("LoadUnit {name}: {}", dbus_error(&e)))?;
            let unit: UnitProxy = property_proxy(&conn, &path).await?;
            let load_state = unit.load_state().await?;
            let active_state = unit.active_state().await?;
            let mut info = UnitInfo::default();
            if matches!(active_state.as_str(), "active" | "reloading") {
                let us = unit.active_enter_timestamp().await.unwrap_or(0);
                info.active_since_ms =
                    (us > 0).then(|| i64::try_from(us / 1000).unwrap_or(i64::MAX));
            }
            if name.ends_with(".service") && load_state == "loaded" {
                let svc: ServiceUnitProxy = property_proxy(&conn, &path).await?;
                info.user = svc.user().await.unwrap_or_default();
                info.group = svc.group().await.unwrap_or_default();
                // What the unit's processes really get: doctor tests these.
                info.supplementary_groups = svc.supplementary_groups().await?;
                info.main_pid = svc.main_pid().await.unwrap_or_default();
                // The credentials path depends on these: no guessing.
                info.environment = svc.environment().await?;
                info.environment_files = svc.environment_files().await?;
            }
            let pids = if active_state == "inactive" {
                Vec::new()
            } else {
                manager
                    .get_unit_processes(name)
                    .await
                    .map(|v| v.into_iter().map(|(_, pid, _)| pid).collect())
                    .unwrap_or_default()
            };
            Ok(UnitInfo {
                load_state,
                active_state,
                pids,
                ..info
            })
        })
    }

    fn enabled_path_units(&mut self) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        zbus::block_on(async {
            let conn = self.conn().await?;
            let manager = ManagerQueryProxy::new(&conn).await?;
            let mut out = Vec::new();
            for (file, state) in manager.list_unit_files().await? {
                if !file.ends_with(".path")
                    || !matches!(state.as_str(), "enabled" | "enabled-runtime")
                {
                    continue;
                }
                let name = file.rsplit('/').next().unwrap_or(&file).to_string();
                let path = manager.load_unit(&name).await?;
                let unit: PathUnitProxy = property_proxy(&conn, &path).await?;
                let paths = unit
                    .paths()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(_, p)| p)
                    .collect();
                out.push((name, paths));
            }
            Ok(out)
        })
    }
}

/// A string as `systemd-escape` writes it for a unit instance: `[A-Za-z0-9_]`
/// (and `.` but not first) kept, `/` as `-`, every other byte `\xNN`.
pub fn escape(s: &str) -> String {
    let mut out = String::new();
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i > 0 => out.push('.'),
            b if b.is_ascii_alphanumeric() || b == b'_' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod escape_tests {
    #[test]
    fn escapes_like_systemd_escape() {
        assert_eq!(super::escape("claude-prod_1"), "claude\\x2dprod_1");
        assert_eq!(super::escape(".x"), "\\x2ex");
    }
}
