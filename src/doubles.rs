//! Test doubles for the service manager, chosen by environment variables
//! (for tests and demos without systemd): a recorder that appends one JSON
//! line per restart to a file instead of restarting, and a JSON fixture that
//! answers the unit queries of `doctor`. `cli` chooses them once, at start,
//! and logs a warning when one replaces systemd.

use crate::config::RestartAction;
use crate::systemd::{ServiceManager, UnitInfo, UnitQuery};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable that swaps systemd for a [`Recorder`] appending one
/// JSON line per restart to the named file.
pub const RECORD_ENV: &str = "CRED_WATCH_TEST_RESTART_LOG";
/// With the recorder: comma-separated units whose restarts fail.
pub const RECORD_FAIL_ENV: &str = "CRED_WATCH_TEST_RESTART_FAIL";
/// With the recorder: a file of `unit start-ms` lines, when units were
/// started before any recorded restart (read on each question).
pub const RECORD_STARTED_ENV: &str = "CRED_WATCH_TEST_STARTED_AT";
/// Environment variable naming a JSON file that answers [`UnitQuery`]:
/// `{"units": {"x.service": {...UnitInfo}}, "path_units": {"old.path": ["/p"]}}`,
/// a unit as `{"load_state": "loaded", "active_state": "active", "user": "bot",
/// "group": "claude", "supplementary_groups": ["claude-credentials"],
/// "main_pid": 7, "environment": ["K=V"], "environment_files":
/// [["/etc/x.env", true]], "pids": [7, 8]}` (every key optional; doctor reads
/// the real `/proc/PID/status` of `main_pid` and `pids`).
pub const UNITS_FIXTURE_ENV: &str = "CRED_WATCH_TEST_UNITS";

/// Records restarts instead of performing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorder {
    pub path: PathBuf,
    /// Units whose restarts are recorded as failed.
    pub fail: Vec<String>,
    /// [`RECORD_STARTED_ENV`]: start times of units before this run.
    pub started: Option<PathBuf>,
}

impl Recorder {
    /// The recorder asked for by [`RECORD_ENV`] and [`RECORD_FAIL_ENV`], if any.
    pub fn from_env() -> Option<Recorder> {
        let path = std::env::var_os(RECORD_ENV)?;
        let fail = std::env::var(RECORD_FAIL_ENV).unwrap_or_default();
        Some(Recorder {
            path: PathBuf::from(path),
            fail: fail
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            started: std::env::var_os(RECORD_STARTED_ENV).map(PathBuf::from),
        })
    }
}

impl Recorder {
    /// The last time the recorder restarted `unit`, from its own log.
    fn last_restart_ms(&self, unit: &str) -> Option<i64> {
        let log = std::fs::read_to_string(&self.path).ok()?;
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["unit"] == unit && v["result"] == "done" && v["method"] != "StartUnit")
            .filter_map(|v| v["at_ms"].as_i64())
            .max()
    }
}

impl ServiceManager for Recorder {
    /// A unit restarted by the recorder started then; before that, what
    /// [`RECORD_STARTED_ENV`] says; else unknown.
    fn started_at_ms(&mut self, unit: &str) -> Option<i64> {
        self.last_restart_ms(unit).or_else(|| {
            let text = std::fs::read_to_string(self.started.as_ref()?).ok()?;
            text.lines().find_map(|l| {
                let (u, ms) = l.split_once(' ')?;
                (u == unit).then(|| ms.trim().parse().ok()).flatten()
            })
        })
    }

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
        // One O_APPEND write per line: a concurrent reader never sees half of one.
        f.write_all(format!("{line}\n").as_bytes())?;
        if failed {
            anyhow::bail!("job for {unit} finished with result \"failed\"");
        }
        Ok(())
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Fixture {
    units: BTreeMap<String, UnitInfo>,
    path_units: BTreeMap<String, Vec<String>>,
}

/// Answers [`UnitQuery`] from a JSON file, read on each question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureUnits {
    pub path: PathBuf,
}

impl FixtureUnits {
    /// The fixture named by [`UNITS_FIXTURE_ENV`], if any.
    pub fn from_env() -> Option<FixtureUnits> {
        let path = std::env::var_os(UNITS_FIXTURE_ENV)?;
        Some(FixtureUnits {
            path: PathBuf::from(path),
        })
    }

    fn load(&self) -> anyhow::Result<Fixture> {
        Ok(serde_json::from_slice(&std::fs::read(&self.path)?)?)
    }
}

impl UnitQuery for FixtureUnits {
    fn unit(&mut self, name: &str) -> anyhow::Result<UnitInfo> {
        Ok(self.load()?.units.remove(name).unwrap_or_else(|| UnitInfo {
            load_state: "not-found".into(),
            active_state: "inactive".into(),
            ..Default::default()
        }))
    }

    fn enabled_path_units(&mut self) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        Ok(self.load()?.path_units.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_appends_lines_and_fails_the_named_units() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder {
            path: dir.path().join("restarts.log"),
            fail: vec!["bad.service".into()],
            started: None,
        };
        let timeout = Duration::from_secs(1);
        r.restart("ok.service", RestartAction::Restart, timeout)
            .unwrap();
        let err = r
            .restart("bad.service", RestartAction::TryRestart, timeout)
            .unwrap_err();
        assert!(err.to_string().contains("\"failed\""), "{err}");
        let log = std::fs::read_to_string(&r.path).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert_eq!(
            (&lines[0]["unit"], &lines[0]["method"], &lines[0]["result"]),
            (&"ok.service".into(), &"RestartUnit".into(), &"done".into())
        );
        assert_eq!(
            (&lines[1]["method"], &lines[1]["result"]),
            (&"TryRestartUnit".into(), &"failed".into())
        );
    }

    #[test]
    fn fixture_answers_units_and_path_units() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("units.json");
        std::fs::write(
            &path,
            r#"{"units": {"a.service": {"load_state": "loaded", "active_state": "active",
                "user": "bot", "group": "claude", "supplementary_groups": ["c1", "c2"],
                "main_pid": 7, "environment": ["A=1", "B=2"],
                "environment_files": [["/etc/a.env", true], ["/etc/b.env", false]],
                "pids": [7]}}, "path_units": {"old.path": ["/p"]}}"#,
        )
        .unwrap();
        let mut f = FixtureUnits { path };
        let a = f.unit("a.service").unwrap();
        assert_eq!((a.user.as_str(), a.pids.as_slice()), ("bot", &[7][..]));
        assert_eq!(a.group, "claude");
        assert_eq!(a.supplementary_groups, ["c1", "c2"]);
        assert_eq!(a.main_pid, 7);
        assert_eq!(a.environment, ["A=1", "B=2"]);
        assert_eq!(
            a.environment_files,
            [("/etc/a.env".into(), true), ("/etc/b.env".into(), false)]
        );
        assert_eq!(f.unit("b.service").unwrap().load_state, "not-found");
        assert_eq!(
            f.enabled_path_units().unwrap(),
            vec![("old.path".to_string(), vec!["/p".to_string()])]
        );
    }
}
