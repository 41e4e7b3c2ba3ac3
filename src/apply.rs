//! Actions: the source's mode through its descriptor, search bits on its
//! ancestors, and atomic copies to destinations. Each returns what it changed
//! (or would change, in a dry run) so callers can report it.

use crate::config::{CopySettings, PermissionSettings};
use crate::fsutil::{self, perm_bits, FileMeta, FsError};
use crate::source::SourceFile;
use crate::validate::{Fingerprint, Secret};
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{Gid, Uid};
use std::os::fd::AsFd;
use std::path::Path;

/// Sets the source's mode through the descriptor it was read from, so a
/// symlink swapped in meanwhile cannot redirect it. Only when different:
/// our own change must not cause endless IN_ATTRIB events.
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
        fchmod(&src.fd, Mode::from_bits_truncate(p.file_mode))
            .map_err(|e| FsError::io(path, "fchmod", e))?;
    }
    Ok(Some(format!("mode {current:04o} -> {:04o}", p.file_mode)))
}

/// Adds g+x and o+x to every ancestor directory of `dir` (inclusive) that
/// lacks them, never removing bits. Directories are opened one by one
/// without following symlinks and changed through their descriptors.
pub fn add_traverse(dir: &Path, dry_run: bool) -> Result<Vec<String>, FsError> {
    let mut changed = Vec::new();
    fsutil::walk_dirs(dir, |path, fd, st| {
        let mode = perm_bits(st);
        let wanted = mode | 0o011;
        if wanted != mode {
            if !dry_run {
                fchmod(fd, Mode::from_bits_truncate(wanted))
                    .map_err(|e| FsError::io(path, "fchmod", e))?;
            }
            changed.push(format!("{} {mode:04o} -> {wanted:04o}", path.display()));
        }
        Ok(())
    })?;
    Ok(changed)
}

/// Directory mode for a destination directory we create: x wherever the
/// file mode has r, so the readers of the file can reach it.
pub fn dir_mode_for(file_mode: u32) -> u32 {
    let r = file_mode & 0o444;
    (file_mode & 0o666) | (r >> 2) | 0o700
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
/// and mode. Writes (atomically) only when bytes or metadata differ.
pub fn ensure_copy(
    copy: &CopySettings,
    payload: &Secret,
    dry_run: bool,
) -> Result<CopyOutcome, FsError> {
    let (dir_path, name) = crate::config::split_file(&copy.dest);
    let owner = copy.owner.as_ref().map(|a| Uid::from_raw(a.id));
    let group = copy.group.as_ref().map(|a| Gid::from_raw(a.id));
    let dir = match fsutil::open_dir(dir_path) {
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
        Err(FsError::Missing(_)) => {
            fsutil::ensure_dir(dir_path, dir_mode_for(copy.mode), owner, group)?
        }
        Err(e) => return Err(e),
    };
    let current = fsutil::read_entry(dir.as_fd(), dir_path, name, crate::source::MAX_SIZE)?;
    let previous = current.as_ref().map(|(_, bytes)| Fingerprint::of(bytes));
    let reason = match &current {
        None => "created",
        Some((st, bytes)) => {
            if bytes != &payload.0 {
                "content updated"
            } else if perm_bits(st) != copy.mode
                || owner.is_some_and(|u| u.as_raw() != st.st_uid)
                || group.is_some_and(|g| g.as_raw() != st.st_gid)
            {
                "owner/mode restored"
            } else {
                return Ok(CopyOutcome {
                    change: None,
                    previous,
                });
            }
        }
    };
    if !dry_run {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_mode_follows_file_readers() {
        assert_eq!(dir_mode_for(0o640), 0o750);
        assert_eq!(dir_mode_for(0o644), 0o755);
        assert_eq!(dir_mode_for(0o600), 0o700);
    }
}
