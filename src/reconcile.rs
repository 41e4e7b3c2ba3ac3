//! One reconcile of one watch: safe read, validation, then the actions.
//! Shared by the agent and `cred-watch sync`; what it means (logs, state,
//! restarts) is the tracker's.

use crate::apply;
use crate::config::WatchSettings;
use crate::fsutil::{DirChain, FsError};
use crate::source::{read_source, ReadOutcome, SourceFile};
use crate::validate::{self, Applied, Fingerprint, Refusal, Validated};
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::Path;

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
}

impl Notice {
    /// Said once per credential, not at every event.
    pub fn once_per_credential(&self) -> bool {
        matches!(self, Notice::Format(_))
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
    pub changes: Vec<String>,
    pub notices: Vec<Notice>,
    /// Action failures; when non-empty the state must not advance.
    pub errors: Vec<FsError>,
    /// Fingerprints of the bytes now at each copy destination.
    pub written: BTreeMap<String, String>,
}

/// Reconciles watch `w` whose directory is `dir`. `last` is what was last
/// applied; `last_written` what was last written to each destination.
pub fn reconcile(
    w: &WatchSettings,
    dir: Option<BorrowedFd>,
    last: Option<&Applied>,
    last_written: &BTreeMap<String, String>,
    dry_run: bool,
) -> Result<Reconciled, FsError> {
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
        Err(r) => return Ok(Reconciled::Invalid(r)),
    };
    let mut out = Valid {
        fingerprint: v.fingerprint,
        expires_at: v.expires_at,
        content_changed: last.is_none_or(|l| l.fingerprint != v.fingerprint),
        changes: Vec::new(),
        notices: v.warnings.iter().map(|s| Notice::Format(s)).collect(),
        errors: Vec::new(),
        written: BTreeMap::new(),
    };
    apply_permissions(w, &file, chain.as_ref(), dry_run, &mut out);
    apply_copies(w, &file, &v, last_written, dry_run, &mut out);
    Ok(Reconciled::Applied(out))
}

fn apply_permissions(
    w: &WatchSettings,
    file: &SourceFile,
    chain: Option<&DirChain>,
    dry_run: bool,
    out: &mut Valid,
) {
    let Some(p) = &w.permissions else { return };
    // The mode first: it is what readers are waiting for.
    match apply::fix_mode(file, &w.source, p, dry_run) {
        Ok(change) => out.changes.extend(change),
        Err(e) => out.errors.push(e),
    }
    if let Some(chain) = chain {
        match apply::add_traverse(chain, dry_run) {
            Ok(changed) => out
                .changes
                .extend(changed.into_iter().map(|c| format!("search bits {c}"))),
            Err(e) => out.errors.push(e),
        }
    }
}

fn apply_copies(
    w: &WatchSettings,
    file: &SourceFile,
    v: &Validated,
    last_written: &BTreeMap<String, String>,
    dry_run: bool,
    out: &mut Valid,
) {
    for copy in &w.copies {
        let payload = validate::copy_payload(&file.bytes.0, v, copy.shape(w.format));
        let ours = Fingerprint::of(&payload.0);
        let dest = copy.dest.display().to_string();
        match apply::ensure_copy(copy, &payload, dry_run) {
            Ok(o) => {
                let tampered = o.change.is_some()
                    && o.previous.is_some_and(|prev| {
                        prev != ours && last_written.get(&dest).is_some_and(|l| *l != prev.hex())
                    });
                if tampered {
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
