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
/// Environment variable naming a JSON file that answers [`UnitQuery`]:
/// `{"units": {"x.service": {...UnitInfo}}, "path_units": {"old.path": ["/p"]}}`,
/// a unit as `{"load_state": "loaded", "active_state": "active", "user": "bot",
/// "group": "claude", "environment": ["K=V"], "environment_files":
/// [["/etc/x.env", true]], "pids": [7]}` (every key optional).
pub const UNITS_FIXTURE_ENV: &str = "CRED_WATCH_TEST_UNITS";

/// Records restarts instead of performing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorder {
    pub path: PathBuf,
    /// Units whose restarts are recorded as failed.
    pub fail: Vec<String>,
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
        })
    }
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
                "user": "bot", "group": "claude", "environment": ["A=1", "B=2"],
                "environment_files": [["/etc/a.env", true], ["/etc/b.env", false]],
                "pids": [7]}}, "path_units": {"old.path": ["/p"]}}"#,
        )
        .unwrap();
        let mut f = FixtureUnits { path };
        let a = f.unit("a.service").unwrap();
        assert_eq!((a.user.as_str(), a.pids.as_slice()), ("bot", &[7][..]));
        assert_eq!(a.group, "claude");
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
