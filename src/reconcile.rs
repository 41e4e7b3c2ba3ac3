//! One reconcile of one watch: safe read, validation, then the actions.
//! Shared by the agent and `cred-watch sync`; what it means (logs, state,
//! restarts) is the tracker's.

use crate::apply;
use crate::config::{Format, WatchSettings};
use crate::fsutil::{self, DirChain, FsError};
use crate::source::{read_source, ReadOutcome, SourceFile};
use crate::validate::{self, Applied, Fingerprint, Refusal, Validated};
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// The result of one reconcile.
#[derive(Debug)]
pub enum Reconciled {
    Absent,
    /// Unsafe file (symlink, links, owner, size…): why.
    Unsafe(String),
    /// Read fine but invalid.
    Invalid(Refusal),
    /// A writer replaced or changed the file on every try; its next event
    /// brings it back.
    Busy(&'static str),
    Applied(Valid),
}

impl Reconciled {
    /// Why the source was refused, worded once for logs, `sync` and the state.
    pub fn refusal(&self, source: &Path) -> Option<String> {
        match self {
            Reconciled::Unsafe(why) => Some(format!("{}: refused: {why}", source.display())),
            Reconciled::Invalid(r) => Some(format!(
                "{}: refused: {r}; keeping the last good state",
                source.display()
            )),
            _ => None,
        }
    }
}

/// Something about an applied file worth a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// About the credential itself (e.g. a missing `subscriptionType`).
    Format(&'static str),
    /// A copy held bytes the agent did not write.
    CopyTampered { dest: String },
    /// A copy held a newer credential than the source (a consumer
    /// refreshed): saved before the copy was restored.
    CopyRescued {
        dest: String,
        saved: PathBuf,
        source: PathBuf,
        /// `saved` already held a newer one, found earlier: kept as it was.
        kept_earlier: bool,
    },
}

impl Notice {
    /// Said once per credential, not at every event.
    pub fn once_per_credential(&self) -> bool {
        matches!(self, Notice::Format(_))
    }

    /// A rescued credential needs a person: an error, not a warning.
    pub fn is_error(&self) -> bool {
        matches!(self, Notice::CopyRescued { .. })
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Format(what) => f.write_str(what),
            Notice::CopyTampered { dest } => write!(
                f,
                "{dest} was modified by another writer (a consumer must not refresh the token: it would rotate the single-use refresh token); restoring our copy"
            ),
            Notice::CopyRescued {
                dest,
                saved,
                source,
                kept_earlier,
            } => {
                let saved_how = if *kept_earlier {
                    "the newest one found, rescued earlier, stays in"
                } else {
                    "It was saved to"
                };
                write!(
                    f,
                    "{dest} held a newer credential than the source: a consumer refreshed it, which consumed the source's single-use refresh token. {saved_how} {} before the copy was restored. Recover now: install it as the source, as the source's owner (e.g. install -o OWNER -m 0600 {} {}), then stop that consumer from refreshing (cred-watch doctor names it)",
                    saved.display(),
                    saved.display(),
                    source.display()
                )
            }
        }
    }
}

/// A valid source and what the actions did.
#[derive(Debug)]
pub struct Valid {
    pub fingerprint: Fingerprint,
    pub expires_at: Option<i64>,
    /// Different from what was last applied (a restart is owed).
    pub content_changed: bool,
    /// When the source file was written (its change time, ms since the
    /// epoch): units started before then hold something older.
    pub written_ms: i64,
    pub changes: Vec<String>,
    pub notices: Vec<Notice>,
    /// Action failures; when non-empty the state must not advance.
    pub errors: Vec<FsError>,
    /// Fingerprints of the bytes now at each copy destination.
    pub written: BTreeMap<String, String>,
}

/// What one reconcile of a watch needs to know besides its settings.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// What was last applied (rollback check, "changed").
    pub last: Option<&'a Applied>,
    /// What was last written to each destination (another writer check).
    pub last_written: &'a BTreeMap<String, String>,
    pub dry_run: bool,
    /// Where a newer credential found in a copy is saved before the copy
    /// is restored (`state_dir`).
    pub rescue_dir: &'a Path,
}

/// The source as it was read and as the actions left it: a file that
/// differs later (its bytes, inode, size, mtime, mode or owner) changed
/// since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    mode: u32,
    owner: (u32, u32),
    content: Fingerprint,
}

/// The source as last read: what it looked like ([`Seen`]) and the
/// descriptor it was read through. The agent keeps it open until the next
/// read has been acted on: a CLI's rename then only unlinks the inode it
/// replaces, and freeing that inode (its blocks, a synchronous discard on a
/// `discard` mount, its inotify watch) happens in the agent after its fix,
/// not inside the CLI's rename. Never shared: only a regular file with one
/// link that the agent opened itself gets here.
#[derive(Debug)]
pub struct LastRead {
    pub seen: Seen,
    /// Never used for anything: only kept open, and closed when dropped.
    pub file: std::os::fd::OwnedFd,
}

impl LastRead {
    fn left(file: SourceFile, given: Option<u32>) -> LastRead {
        LastRead {
            seen: Seen::left(&file, given),
            file: file.fd,
        }
    }
}

impl Seen {
    fn of(st: &nix::sys::stat::FileStat, bytes: &[u8]) -> Seen {
        Seen {
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            mode: st.st_mode,
            owner: (st.st_uid, st.st_gid),
            content: Fingerprint::of(bytes),
        }
    }

    /// `file` as read and as the actions left it (`given` the mode it was
    /// given, if any).
    fn left(file: &SourceFile, given: Option<u32>) -> Seen {
        let mut seen = Seen::of(&file.stat, &file.bytes.0);
        if let Some(mode) = given {
            seen.mode = (seen.mode & !0o7777) | mode;
        }
        seen
    }

    /// Whether a file read now as `st` and `bytes` is the one seen.
    pub fn matches(&self, st: &nix::sys::stat::FileStat, bytes: &[u8]) -> bool {
        *self == Seen::of(st, bytes)
    }
}

/// Reconciles watch `w` whose directory is `dir`.
pub fn reconcile(
    w: &WatchSettings,
    dir: Option<BorrowedFd>,
    ctx: &Inputs,
) -> Result<Reconciled, FsError> {
    reconcile_seen(w, dir, ctx, &mut None)
}

/// [`reconcile`], also returning in `read` the file as it was read and as
/// the actions left it, still open (`None` when nothing was read).
pub fn reconcile_seen(
    w: &WatchSettings,
    dir: Option<BorrowedFd>,
    ctx: &Inputs,
    read: &mut Option<LastRead>,
) -> Result<Reconciled, FsError> {
    *read = None;
    let (last, dry_run) = (ctx.last, ctx.dry_run);
    let (dir_path, name) = w.source_dir_and_name();
    // With `traverse`, the source is read through a fresh walk whose
    // directory descriptors are the very ones that get the search bits.
    let chain = match w.permissions.as_ref().filter(|p| p.traverse) {
        Some(_) => match DirChain::open(dir_path) {
            Ok(chain) => Some(chain),
            Err(FsError::Missing(_)) => return Ok(Reconciled::Absent),
            Err(e) => return Err(e),
        },
        None => None,
    };
    let Some(dir) = chain.as_ref().map(DirChain::leaf).or(dir) else {
        return Ok(Reconciled::Absent);
    };
    let file = match read_source(dir, dir_path, name, w.source_owner.as_ref().map(|a| a.id))? {
        ReadOutcome::Absent => return Ok(Reconciled::Absent),
        ReadOutcome::Busy(why) => return Ok(Reconciled::Busy(why)),
        ReadOutcome::Refused(why) => return Ok(Reconciled::Unsafe(why)),
        ReadOutcome::Ok(file) => file,
    };
    let now = crate::state::now_ms();
    let v = match validate::validate(w.format, &file.bytes.0, now, last, w.policy()) {
        Ok(v) => v,
        Err(r) => {
            *read = Some(LastRead::left(file, None));
            return Ok(Reconciled::Invalid(r));
        }
    };
    // The mode first: it is what readers are waiting for; identity (a
    // canonical form and a hash) after it.
    let (mut changes, mut errors) = (Vec::new(), Vec::new());
    let given = apply_permissions(w, &file, chain.as_ref(), dry_run, &mut changes, &mut errors);
    let fingerprint = v.fingerprint();
    let mut out = Valid {
        fingerprint,
        expires_at: v.expires_at,
        content_changed: last.is_none_or(|l| l.fingerprint != fingerprint),
        written_ms: ctime_ms(&file.stat),
        changes,
        notices: v.warnings.iter().map(|s| Notice::Format(s)).collect(),
        errors,
        written: BTreeMap::new(),
    };
    apply_copies(w, &file, &v, ctx, &mut out);
    // After the actions: a hash of the bytes is not on their path.
    *read = Some(LastRead::left(file, given));
    Ok(Reconciled::Applied(out))
}

/// When the file was written (its change time), in ms since the epoch.
fn ctime_ms(st: &nix::sys::stat::FileStat) -> i64 {
    st.st_ctime
        .saturating_mul(1000)
        .saturating_add(st.st_ctime_nsec / 1_000_000)
}

/// Returns the mode the file was given, if it was changed.
fn apply_permissions(
    w: &WatchSettings,
    file: &SourceFile,
    chain: Option<&DirChain>,
    dry_run: bool,
    changes: &mut Vec<String>,
    errors: &mut Vec<FsError>,
) -> Option<u32> {
    let p = w.permissions.as_ref()?;
    let mut given = None;
    match apply::fix_mode(file, &w.source, p, dry_run) {
        Ok(change) => {
            given = change.is_some().then_some(p.file_mode);
            changes.extend(change)
        }
        Err(e) => errors.push(e),
    }
    if let Some(chain) = chain {
        match apply::add_traverse(chain, dry_run) {
            Ok(changed) => changes.extend(changed.into_iter().map(|c| format!("search bits {c}"))),
            Err(e) => errors.push(e),
        }
    }
    given
}

fn apply_copies(
    w: &WatchSettings,
    file: &SourceFile,
    v: &Validated,
    ctx: &Inputs,
    out: &mut Valid,
) {
    for copy in &w.copies {
        let payload = validate::copy_payload(&file.bytes.0, v, copy.shape(w.format));
        let ours = Fingerprint::of(&payload.0);
        let dest = copy.dest.display().to_string();
        let mut rescued = None;
        let mut before_overwrite = |current: &[u8]| {
            rescued = rescue_newer(w, v, current, ctx.rescue_dir)?;
            Ok(())
        };
        match apply::ensure_copy(copy, &payload, ctx.dry_run, &mut before_overwrite) {
            Ok(o) => {
                let tampered = o.change.is_some()
                    && o.previous.is_some_and(|prev| {
                        prev != ours
                            && ctx
                                .last_written
                                .get(&dest)
                                .is_some_and(|l| *l != prev.hex())
                    });
                if let Some((saved, kept_earlier)) = rescued {
                    out.notices.push(Notice::CopyRescued {
                        dest: dest.clone(),
                        saved,
                        source: w.source.clone(),
                        kept_earlier,
                    });
                } else if tampered {
                    out.notices
                        .push(Notice::CopyTampered { dest: dest.clone() });
                }
                out.changes.extend(o.change);
                out.written.insert(dest, ours.hex());
            }
            Err(e) => out.errors.push(e),
        }
    }
}

/// A copy about to be overwritten that holds a valid credential newer than
/// the source's, with a refresh token: a consumer refreshed, so that token
/// is the only live one (the source's was consumed). It is saved (0600)
/// under `dir` first, unless the file there already holds a newer one; the
/// path is returned, and whether that earlier one was kept. Nothing is
/// overwritten when the save fails.
fn rescue_newer(
    w: &WatchSettings,
    source: &Validated,
    current: &[u8],
    dir: &Path,
) -> Result<Option<(PathBuf, bool)>, FsError> {
    if w.format != Format::ClaudeOauth {
        return Ok(None);
    }
    let now = crate::state::now_ms();
    let Ok(theirs) = validate::validate(w.format, current, now, None, w.policy()) else {
        return Ok(None);
    };
    let newer =
        theirs.expires_at > source.expires_at && theirs.fingerprint() != source.fingerprint();
    if !newer || !theirs.has_refresh_token() {
        return Ok(None);
    }
    // One file per watch, holding the newest credential ever found: the
    // latest rotation is the live one, and a consumer writing forged
    // "newer" copies in a loop cannot fill `state_dir`.
    let name = format!("rescued-{}.json", w.name);
    let fd = fsutil::open_private_dir(dir, Some(0o700), false)?;
    let saved = fsutil::read_entry(fd.as_fd(), dir, name.as_ref(), crate::source::MAX_SIZE)?;
    let have_newer = saved.is_some_and(|(_, bytes)| {
        validate::validate(w.format, &bytes, now, None, w.policy())
            .is_ok_and(|kept| kept.expires_at >= theirs.expires_at)
    });
    if !have_newer {
        let meta = fsutil::FileMeta {
            owner: None,
            group: None,
            mode: 0o600,
        };
        fsutil::replace_file(fd.as_fd(), dir, name.as_ref(), current, meta)?;
    }
    Ok(Some((dir.join(name), have_newer)))
}
