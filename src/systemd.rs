//! The service manager behind a small trait, a worker thread that runs
//! restart jobs off the event loop, and a recording test double.

use crate::config::RestartAction;
use crate::schedule::Job;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

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
        None => Box::new(NoDbus),
    }
}

/// Placeholder until the D-Bus client lands: every restart fails loudly,
/// so a missing restart is never silent.
struct NoDbus;

impl ServiceManager for NoDbus {
    fn restart(&mut self, unit: &str, _: RestartAction, _: Duration) -> anyhow::Result<()> {
        anyhow::bail!("cannot restart {unit}: this build has no D-Bus client")
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
