//! Persisted state under `state_dir` (`state.json`): per watch what was last
//! applied, per unit pending restarts and results. Written atomically; holds
//! fingerprints and times only, never contents.

use crate::fsutil::{self, FileMeta, FsError};
use crate::validate::{Applied, Fingerprint};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const STATE_FILE: &str = "state.json";
/// Held (flock) by the running agent for its whole life, so a second agent
/// or a `sync` cannot act on the same state behind its back.
pub const LOCK_FILE: &str = "lock";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub version: u32,
    pub agent: AgentRecord,
    pub watches: BTreeMap<String, WatchRecord>,
    pub units: BTreeMap<String, UnitRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentRecord {
    pub pid: Option<u32>,
    pub started_at_ms: Option<i64>,
    pub last_reconcile_ms: Option<i64>,
    pub last_reconcile_result: Option<String>,
}

impl AgentRecord {
    /// The recorded agent's PID if that process is still a cred-watch (a
    /// PID alone may have been reused by anything since).
    pub fn running_pid(&self) -> Option<u32> {
        self.pid
            .filter(|pid| process_name(*pid).is_some_and(|c| c == "cred-watch"))
    }
}

/// A process's command name (`/proc/PID/comm`), if it exists.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchRecord {
    /// First 12 hex digits are shown; the full hash is kept to compare.
    pub fingerprint: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub applied_at_ms: Option<i64>,
    /// When the source with this fingerprint was written (its change
    /// time): restarts follow state, units started before owe a restart.
    pub written_ms: Option<i64>,
    pub last_action: Option<String>,
    pub last_action_at_ms: Option<i64>,
    pub last_refusal: Option<String>,
    pub last_error: Option<String>,
    /// SHA-256 of the bytes last written to each copy destination, to
    /// notice another writer.
    pub copies: BTreeMap<String, String>,
    /// Newer credentials found in a copy (a consumer refreshed) and saved
    /// to `state_dir` before the copy was restored.
    #[serde(skip_serializing_if = "is_zero")]
    pub rescued: u64,
    /// Refusals by reason (counted once per distinct refusal, not per
    /// re-read of the same file).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refusals: BTreeMap<String, u64>,
    /// The problem an alert was raised for (`[agent] alert_unit`), until
    /// the watch is healthy again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerted: Option<String>,
    /// `[watch.refresh]`, once it has started its unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshRecord>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What `[watch.refresh]` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshRecord {
    pub last_started_ms: Option<i64>,
    pub last_refreshed_ms: Option<i64>,
    /// Why the last refresh failed; cleared by a refresh that worked.
    pub last_error: Option<String>,
    /// Failures in a row.
    pub failures: u32,
    pub refreshes: u64,
    pub failed_total: u64,
}

impl WatchRecord {
    pub fn applied(&self) -> Option<Applied> {
        let hex = self.fingerprint.as_deref()?;
        let mut fp = [0u8; 32];
        if hex.len() != 64 {
            return None;
        }
        for (i, b) in fp.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Applied {
            fingerprint: Fingerprint(fp),
            expires_at: self.expires_at_ms,
        })
    }

    pub fn set_applied(&mut self, fp: Fingerprint, expires_at: Option<i64>, now_ms: i64) {
        self.fingerprint = Some(fp.hex());
        self.expires_at_ms = expires_at;
        self.applied_at_ms = Some(now_ms);
    }

    /// What is wrong with this watch now: the last error, else the last
    /// refusal (both are cleared when a file is applied).
    pub fn problem(&self) -> Option<&String> {
        self.last_error
            .as_ref()
            .or(self.last_refusal.as_ref())
            .or(self.refresh.as_ref().and_then(|r| r.last_error.as_ref()))
    }

    pub fn short_fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref().map(|f| &f[..12.min(f.len())])
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnitRecord {
    pub pending: bool,
    pub pending_since_ms: Option<i64>,
    pub last_restart_ms: Option<i64>,
    pub last_result: Option<String>,
    pub failures: u32,
    pub restarts: u64,
    pub failed_total: u64,
}

impl UnitRecord {
    /// A restart is owed (since `now_ms`, unless it already was).
    pub fn owe(&mut self, now_ms: i64) {
        if !self.pending {
            self.pending = true;
            self.pending_since_ms = Some(now_ms);
        }
    }

    /// The unit was found started after the credential it should use was
    /// written: in sync, nothing owed.
    pub fn in_sync(&mut self) {
        self.pending = false;
        self.pending_since_ms = None;
    }

    /// A restart job finished with `done`. `still_owed`: a change arrived
    /// while it ran, so one more restart is owed.
    pub fn restarted(&mut self, now_ms: i64, still_owed: bool) {
        self.last_restart_ms = Some(now_ms);
        self.restarts = self.restarts.saturating_add(1);
        self.failures = 0;
        self.last_result = Some("done".into());
        if !still_owed {
            self.pending = false;
            self.pending_since_ms = None;
        }
    }

    /// A restart failed for the `failures`-th time in a row: still owed.
    pub fn restart_failed(&mut self, now_ms: i64, why: String, failures: u32) {
        self.last_restart_ms = Some(now_ms);
        self.failures = failures;
        self.failed_total = self.failed_total.saturating_add(1);
        self.last_result = Some(why);
        self.owe(now_ms);
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Why the state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `state_dir` or `state.json` is not safe to use: a start-up error
    /// (exit 78), since whoever controls them could plant a state that
    /// blocks refreshes as "rollbacks".
    #[error("{0}; state_dir must be a directory owned by the agent's user and not writable by group or others, and state.json a regular file")]
    Unsafe(FsError),
    /// Unparsable: reported, then treated as empty (it only holds what can
    /// be re-learned).
    #[error("{path}: unreadable state ({why}); starting fresh")]
    Corrupt { path: PathBuf, why: String },
    /// Any other failure (e.g. a read-only file system).
    #[error(transparent)]
    Io(FsError),
}

impl From<FsError> for StateError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Refused { .. } => StateError::Unsafe(e),
            e => StateError::Io(e),
        }
    }
}

/// Opens `state_dir` without following links, checking that only the
/// agent's user can change it or swap it. `create`: make it (0700) when
/// missing.
fn open_state_dir(dir: &Path, create: bool) -> Result<std::os::fd::OwnedFd, FsError> {
    fsutil::open_private_dir(dir, create.then_some(0o700), false)
}

/// Loads the state; a missing directory or file is an empty state.
pub fn load(dir: &Path) -> Result<State, StateError> {
    let fd = match open_state_dir(dir, false) {
        Ok(fd) => fd,
        Err(FsError::Missing(_)) => return Ok(State::default()),
        Err(e) => return Err(e.into()),
    };
    // O_NOFOLLOW|O_NONBLOCK, regular files only: a FIFO or a symlink
    // planted as state.json is refused, never waited on or followed.
    let read = fsutil::read_entry(fd.as_fd(), dir, STATE_FILE.as_ref(), MAX_STATE_SIZE)?;
    let Some((_, bytes)) = read else {
        return Ok(State::default());
    };
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path: state_path(dir),
        why: format!(
            "line {} column {}: {:?}",
            e.line(),
            e.column(),
            e.classify()
        ),
    })
}

/// Loads the state for a command: an unsafe state directory is an error,
/// a corrupt state file a warning and a fresh start.
pub fn load_or_fresh(dir: &Path) -> Result<State, StateError> {
    match load(dir) {
        Err(e @ StateError::Corrupt { .. }) => {
            log::warn!("{e}");
            Ok(State::default())
        }
        other => other,
    }
}

/// Larger than any state a host could need (1,000 watches take ~500 KiB).
const MAX_STATE_SIZE: usize = 64 * 1024 * 1024;

/// The agent's exclusive hold on a state directory; released when dropped
/// (or when the process dies, however it dies).
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    pub dir: PathBuf,
}

/// Takes the state directory's lock without waiting (creating the directory
/// 0700 and the lock file 0600 if needed). `Ok(None)`: another process holds it.
pub fn try_lock(dir: &Path) -> Result<Option<StateLock>, StateError> {
    use nix::fcntl::{openat, Flock, FlockArg, OFlag};
    let dir_fd = open_state_dir(dir, true)?;
    let path = dir.join(LOCK_FILE);
    let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        dir_fd.as_fd(),
        LOCK_FILE,
        flags,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| FsError::io(&path, "open", e))?;
    match Flock::lock(std::fs::File::from(fd), FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(StateLock {
            _lock: lock,
            dir: dir.to_path_buf(),
        })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(FsError::io(&path, "flock", e).into()),
    }
}

/// An agent holds `state_dir`'s lock now. Looks without creating
/// anything: no directory or lock file means no agent.
pub fn agent_running(dir: &Path) -> bool {
    use nix::fcntl::{openat, Flock, FlockArg, OFlag};
    let Ok(dir_fd) = open_state_dir(dir, false) else {
        return false;
    };
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let Ok(fd) = openat(
        dir_fd.as_fd(),
        LOCK_FILE,
        flags,
        nix::sys::stat::Mode::empty(),
    ) else {
        return false;
    };
    match Flock::lock(std::fs::File::from(fd), FlockArg::LockSharedNonblock) {
        // Released when dropped: nobody held it.
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// Writes the state atomically (mode 0600), creating `dir` (0700) if needed.
pub fn save(dir: &Path, state: &State) -> Result<(), StateError> {
    let fd = open_state_dir(dir, true)?;
    let mut bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
    bytes.push(b'\n');
    fsutil::replace_file(
        fd.as_fd(),
        dir,
        STATE_FILE.as_ref(),
        &bytes,
        FileMeta {
            owner: None,
            group: None,
            mode: 0o600,
        },
    )?;
    Ok(())
}
