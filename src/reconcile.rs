//! One reconcile of one watch: safe read, validation, then the actions.
//! Shared by the agent and `cred-watch sync`; logging and state are the
//! caller's.

use crate::apply;
use crate::config::WatchSettings;
use crate::fsutil::{DirChain, FsError};
use crate::source::{read_source, ReadOutcome};
use crate::validate::{self, Applied, Fingerprint, Refusal};
use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

/// The result of one reconcile.
#[derive(Debug)]
pub enum Reconciled {
    Absent,
    /// Unsafe file (symlink, links, owner, size…) or unreadable directory.
    Unsafe(String),
    /// Read fine but invalid; `partial` when it may still be being written.
    Invalid(Refusal),
    /// A writer replaced or changed the file on every try; its next event
    /// brings it back.
    Busy(&'static str),
    Applied(Valid),
}

/// A valid source and what the actions did.
#[derive(Debug)]
pub struct Valid {
    pub fingerprint: Fingerprint,
    pub expires_at: Option<i64>,
    /// Different from what was last applied (a restart is owed).
    pub content_changed: bool,
    pub changes: Vec<String>,
    pub warnings: Vec<String>,
    /// Action failures; when non-empty the state must not advance.
    pub errors: Vec<String>,
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
        ReadOutcome::Refused(why) => {
            return Ok(Reconciled::Unsafe(format!(
                "{}: refused: {why}",
                w.source.display()
            )))
        }
        ReadOutcome::Ok(file) => file,
    };
    let v = match validate::validate(
        w.format,
        &file.bytes.0,
        crate::state::now_ms(),
        last,
        w.policy(),
    ) {
        Ok(v) => v,
        Err(r) => return Ok(Reconciled::Invalid(r)),
    };
    let mut out = Valid {
        fingerprint: v.fingerprint,
        expires_at: v.expires_at,
        content_changed: last.is_none_or(|l| l.fingerprint != v.fingerprint),
        changes: Vec::new(),
        warnings: v.warnings.iter().map(|s| s.to_string()).collect(),
        errors: Vec::new(),
        written: BTreeMap::new(),
    };
    if let Some(p) = &w.permissions {
        // The mode first: it is what readers are waiting for.
        match apply::fix_mode(&file, &w.source, p, dry_run) {
            Ok(change) => out.changes.extend(change),
            Err(e) => out.errors.push(e.to_string()),
        }
        if let Some(chain) = &chain {
            match apply::add_traverse(chain, dry_run) {
                Ok(changed) => out
                    .changes
                    .extend(changed.into_iter().map(|c| format!("search bits {c}"))),
                Err(e) => out.errors.push(e.to_string()),
            }
        }
    }
    for copy in &w.copies {
        let payload = validate::copy_payload(&file.bytes.0, &v, &copy.drop_keys);
        let dest = copy.dest.display().to_string();
        match apply::ensure_copy(copy, &payload, dry_run) {
            Ok(o) => {
                if let (Some(prev), Some(ours)) = (o.previous, last_written.get(&dest)) {
                    if o.change.is_some()
                        && &prev.hex() != ours
                        && prev != Fingerprint::of(&payload.0)
                    {
                        out.warnings.push(format!(
                            "{dest} was modified by another writer (a consumer must not refresh the token: it would rotate the single-use refresh token); restoring our copy"
                        ));
                    }
                }
                out.changes.extend(o.change);
                out.written.insert(dest, Fingerprint::of(&payload.0).hex());
            }
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    Ok(Reconciled::Applied(out))
}
