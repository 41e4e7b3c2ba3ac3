//! Actions: the source's mode through its descriptor, search bits on its
//! ancestors, and atomic copies to destinations. Each returns what it changed
//! (or would change, in a dry run) so callers can report it.

use crate::config::{CopySettings, PermissionSettings};
use crate::fsutil::{self, perm_bits, DirChain, FileMeta, FsError};
use crate::source::SourceFile;
use crate::validate::{Fingerprint, Secret};
use nix::sys::stat::{fchmod, fstat, FileStat, Mode};
use nix::unistd::{Gid, Uid};
use std::os::fd::AsFd;
use std::path::Path;

/// Sets the source's mode through the descriptor it was read from, so a
/// symlink swapped in meanwhile cannot redirect it. Only when different:
/// our own change must not cause endless IN_ATTRIB events. The link count
/// is checked once more right before: a name added since the read could
/// expose another file's inode.
pub fn fix_mode(
    src: &SourceFile,
    path: &Path,
    p: &PermissionSettings,
    dry_run: bool,
) -> Result<Option<String>, FsError> {
    let current = perm_bits(&src.stat);
    if current == p.file_mode {
        return Ok(None);
    }
    if !dry_run {
        let now = fstat(&src.fd).map_err(|e| FsError::io(path, "fstat", e))?;
        if now.st_nlink == 0 {
            // Renamed over since the read: the newer file's event fixes it.
            return Ok(None);
        }
        if now.st_nlink != 1 {
            return Err(FsError::refused(
                path,
                format!(
                    "has {} hard links (expected exactly 1); mode not changed",
                    now.st_nlink
                ),
            ));
        }
        fchmod(&src.fd, Mode::from_bits_truncate(p.file_mode))
            .map_err(|e| FsError::io(path, "fchmod", e))?;
    }
    Ok(Some(format!("mode {current:04o} -> {:04o}", p.file_mode)))
}

/// Adds g+x and o+x to each directory of `chain` (the walk that led to the
/// source that was read) that lacks them, never removing bits, through the
/// descriptors of that walk: a directory renamed in meanwhile is never
/// touched.
pub fn add_traverse(chain: &DirChain, dry_run: bool) -> Result<Vec<String>, FsError> {
    let mut changed = Vec::new();
    for (path, fd) in chain.iter() {
        let st = fstat(fd).map_err(|e| FsError::io(path, "fstat", e))?;
        let mode = perm_bits(&st);
        let wanted = mode | 0o011;
        if wanted != mode {
            if !dry_run {
                fchmod(fd, Mode::from_bits_truncate(wanted))
                    .map_err(|e| FsError::io(path, "fchmod", e))?;
            }
            changed.push(format!("{} {mode:04o} -> {wanted:04o}", path.display()));
        }
    }
    Ok(changed)
}

/// What [`ensure_copy`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    /// What changed (or would), if anything.
    pub change: Option<String>,
    /// Fingerprint of the bytes that were there before, to notice another writer.
    pub previous: Option<Fingerprint>,
}

/// Makes `copy.dest` hold exactly `payload` with the configured owner, group
/// and mode. Writes (atomically) only when bytes or metadata differ; before
/// other bytes are overwritten, `before_overwrite` sees them (and may stop
/// the write with an error).
pub fn ensure_copy(
    copy: &CopySettings,
    payload: &Secret,
    dry_run: bool,
    before_overwrite: &mut dyn FnMut(&[u8]) -> Result<(), FsError>,
) -> Result<CopyOutcome, FsError> {
    let (dir_path, name) = crate::config::split_file(&copy.dest);
    let owner = copy.owner.as_ref().map(|a| Uid::from_raw(a.id));
    let group = copy.group.as_ref().map(|a| Gid::from_raw(a.id));
    let dir = match fsutil::open_private_dir(dir_path, None, true) {
        Ok(fd) => fd,
        Err(FsError::Missing(_)) if dry_run => {
            let change = Some(format!(
                "would create {} and write {}",
                dir_path.display(),
                copy.dest.display()
            ));
            return Ok(CopyOutcome {
                change,
                previous: None,
            });
        }
        // Created by and for the agent (root, dir_mode), never the copy's
        // owner: whoever owns the directory can replace the copy.
        Err(FsError::Missing(_)) => fsutil::open_private_dir(dir_path, Some(copy.dir_mode), true)?,
        Err(e) => return Err(e),
    };
    let current = fsutil::read_entry(dir.as_fd(), dir_path, name, crate::source::MAX_SIZE)?;
    let previous = current.as_ref().map(|(_, bytes)| Fingerprint::of(bytes));
    let Some(reason) = difference(current.as_ref(), payload, copy) else {
        return Ok(CopyOutcome {
            change: None,
            previous,
        });
    };
    if !dry_run {
        if let Some((_, bytes)) = current.as_ref().filter(|(_, b)| b != &payload.0) {
            before_overwrite(bytes)?;
        }
        fsutil::replace_file(
            dir.as_fd(),
            dir_path,
            name,
            &payload.0,
            FileMeta {
                owner,
                group,
                mode: copy.mode,
            },
        )?;
    }
    Ok(CopyOutcome {
        change: Some(format!("copy {} {reason}", copy.dest.display())),
        previous,
    })
}

/// Why the destination must be written, if it must.
fn difference(
    current: Option<&(FileStat, Vec<u8>)>,
    payload: &Secret,
    copy: &CopySettings,
) -> Option<&'static str> {
    let Some((st, bytes)) = current else {
        return Some("created");
    };
    if bytes != &payload.0 {
        Some("content updated")
    } else if !meta_matches(st, copy) {
        Some("owner/mode restored")
    } else {
        None
    }
}

/// The file has the copy's configured mode, and owner and group where set.
pub fn meta_matches(st: &FileStat, copy: &CopySettings) -> bool {
    perm_bits(st) == copy.mode
        && copy.owner.as_ref().is_none_or(|u| u.id == st.st_uid)
        && copy.group.as_ref().is_none_or(|g| g.id == st.st_gid)
}
