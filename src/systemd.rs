//! The service manager behind a small trait, a worker thread that runs
//! restart jobs off the event loop, and a recording test double.

use crate::config::RestartAction;
use crate::schedule::Job;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use zbus::OwnedObjectPath;

/// Environment variable that swaps systemd for a recorder appending one JSON
/// line per restart to the named file (for tests and demos without systemd).
pub const RECORD_ENV: &str = "CRED_WATCH_TEST_RESTART_LOG";
/// With the recorder: comma-separated units whose restarts fail.
pub const RECORD_FAIL_ENV: &str = "CRED_WATCH_TEST_RESTART_FAIL";

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
}

/// The service manager selected by the environment.
pub fn from_env() -> Box<dyn ServiceManager> {
    match std::env::var_os(RECORD_ENV) {
        Some(path) => Box::new(Recorder {
            path: PathBuf::from(path),
            fail: std::env::var(RECORD_FAIL_ENV)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        }),
        None => Box::new(Systemd),
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
}

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

/// "org.freedesktop.systemd1.NoSuchUnit: Unit x.service not found." style.
fn dbus_error(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{}: {msg}", name.as_str()),
        other => other.to_string(),
    }
}

/// Test double: records restarts instead of performing them.
pub struct Recorder {
    pub path: PathBuf,
    pub fail: Vec<String>,
}

impl ServiceManager for Recorder {
    fn restart(&mut self, unit: &str, action: RestartAction, _: Duration) -> anyhow::Result<()> {
        let failed = self.fail.iter().any(|u| u == unit);
        let line = serde_json::json!({
            "unit": unit,
            "method": action.method(),
            "at_ms": crate::state::now_ms(),
            "result": if failed { "failed" } else { "done" },
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{line}")?;
        if failed {
            anyhow::bail!("job for {unit} finished with result \"failed\"");
        }
        Ok(())
    }
}

/// The result of one restart job.
#[derive(Debug)]
pub struct Outcome {
    pub unit: String,
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
                        let result = manager
                            .restart(&job.unit, job.plan.action, job.plan.timeout)
                            .map_err(|e| format!("{e:#}"));
                        if out_tx
                            .send(Outcome {
                                unit: job.unit,
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
