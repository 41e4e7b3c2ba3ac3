//! Path walking through directory file descriptors and atomic replacement.
//!
//! Every directory on the way is opened with `O_NOFOLLOW`, so a symlink that
//! someone planted anywhere in a configured path is refused rather than
//! followed. Callers then act on the returned descriptors only.

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, fsync, unlinkat, Gid, Uid, UnlinkatFlags};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a filesystem step failed, always naming the path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{0}: does not exist")]
    Missing(PathBuf),
    #[error("{path}: refused: {why}")]
    Refused { path: PathBuf, why: String },
    /// A kernel limit that only an administrator can raise.
    #[error("{path}: {what}")]
    Limit { path: PathBuf, what: String },
    #[error("{path}: {op} failed: {err}")]
    Io {
        path: PathBuf,
        op: &'static str,
        err: Errno,
    },
}

impl FsError {
    pub fn io(path: &Path, op: &'static str, err: Errno) -> Self {
        FsError::Io {
            path: path.to_path_buf(),
            op,
            err,
        }
    }
    pub fn refused(path: &Path, why: impl Into<String>) -> Self {
        FsError::Refused {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }
}

pub const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A human name for the file type in `st_mode`.
pub fn kind_name(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        _ => "an unknown file type",
    }
}

pub fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

pub fn perm_bits(st: &FileStat) -> u32 {
    st.st_mode & 0o7777
}

/// Opens one directory entry below `parent` without following a symlink.
pub fn open_subdir(
    parent: BorrowedFd,
    parent_path: &Path,
    name: &OsStr,
) -> Result<OwnedFd, FsError> {
    let path = parent_path.join(name);
    match openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOENT) => Err(FsError::Missing(path)),
        Err(err @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Err(FsError::refused(
                    &path,
                    format!(
                        "is {}, not a directory (symlinks are never followed)",
                        kind_name(&st)
                    ),
                )),
                Err(_) => Err(FsError::io(&path, "open", err)),
            }
        }
        Err(err) => Err(FsError::io(&path, "open", err)),
    }
}

/// Splits an absolute path into its normal components, refusing `..`.
fn components(path: &Path) -> Result<Vec<&OsStr>, FsError> {
    if !path.is_absolute() {
        return Err(FsError::refused(path, "not an absolute path"));
    }
    path.components()
        .filter_map(|c| match c {
            Component::RootDir | Component::CurDir => None,
            Component::Normal(n) => Some(Ok(n)),
            _ => Some(Err(FsError::refused(path, "contains `..`"))),
        })
        .collect()
}

/// Walks an absolute directory path from `/`, calling `visit` with each
/// directory's path, descriptor and stat (root first), and returns the
/// descriptor of the last one.
pub fn walk_dirs(
    path: &Path,
    mut visit: impl FnMut(&Path, BorrowedFd, &FileStat) -> Result<(), FsError>,
) -> Result<OwnedFd, FsError> {
    let parts = components(path)?;
    let root = Path::new("/");
    let mut fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| FsError::io(root, "open", e))?;
    let mut cur = PathBuf::from("/");
    let st = fstat(&fd).map_err(|e| FsError::io(&cur, "fstat", e))?;
    visit(&cur, fd.as_fd(), &st)?;
    for name in parts {
        let next = open_subdir(fd.as_fd(), &cur, name)?;
        cur.push(name);
        let st = fstat(&next).map_err(|e| FsError::io(&cur, "fstat", e))?;
        visit(&cur, next.as_fd(), &st)?;
        fd = next;
    }
    Ok(fd)
}

/// Opens an absolute directory path without following symlinks anywhere.
pub fn open_dir(path: &Path) -> Result<OwnedFd, FsError> {
    walk_dirs(path, |_, _, _| Ok(()))
}

/// The components of an absolute path (for walkers such as the watcher).
pub fn path_components(path: &Path) -> Result<Vec<&OsStr>, FsError> {
    components(path)
}

/// Creates the directories of `path` that are missing (each with `mode`,
/// ownership as given) and returns the last one's descriptor.
pub fn ensure_dir(
    path: &Path,
    mode: u32,
    owner: Option<Uid>,
    group: Option<Gid>,
) -> Result<OwnedFd, FsError> {
    let parts = components(path)?;
    let mut cur = PathBuf::from("/");
    let mut fd = nix::fcntl::open(&cur, DIR_FLAGS, Mode::empty())
        .map_err(|e| FsError::io(&cur, "open", e))?;
    for name in parts {
        let next = match open_subdir(fd.as_fd(), &cur, name) {
            Err(FsError::Missing(p)) => {
                match mkdirat(fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(FsError::io(&p, "mkdir", e)),
                }
                let new = open_subdir(fd.as_fd(), &cur, name)?;
                // Ownership first, then the mode: the directory is private until both are right.
                if owner.is_some() || group.is_some() {
                    fchown(&new, owner, group).map_err(|e| FsError::io(&p, "fchown", e))?;
                }
                fchmod(&new, Mode::from_bits_truncate(mode))
                    .map_err(|e| FsError::io(&p, "fchmod", e))?;
                new
            }
            other => other?,
        };
        cur.push(name);
        fd = next;
    }
    Ok(fd)
}

/// What the file `name` in `dir` currently is, without following a symlink.
pub fn stat_entry(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
) -> Result<Option<FileStat>, FsError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(FsError::io(&dir_path.join(name), "stat", e)),
    }
}

/// Ownership and mode for a file written by [`replace_file`].
#[derive(Debug, Clone, Copy)]
pub struct FileMeta {
    pub owner: Option<Uid>,
    pub group: Option<Gid>,
    pub mode: u32,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
const TEMP_MARK: &str = ".cred-watch-";

/// Removes temp files that [`replace_file`] left in `dir` when a previous
/// run was killed mid-write (`.NAME.cred-watch-PID-N.tmp`). Returns how many.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(fd) = open_dir(dir) else { return 0 };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let ours = text.starts_with('.') && text.ends_with(".tmp") && text.contains(TEMP_MARK);
        let pid = text
            .rsplit(TEMP_MARK)
            .next()
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        // Never another live writer's temp file (e.g. a concurrent `sync`).
        let alive = pid
            .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        if ours
            && !alive
            && unlinkat(fd.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Atomically replaces `name` in `dir` with `bytes`: a temp file in the same
/// directory (created 0600), write, fsync, chown/chmod, rename, fsync of the
/// directory. A reader sees the old or the new file, never a partial one.
/// An existing entry that is not a regular file is refused and left alone.
pub fn replace_file(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    bytes: &[u8],
    meta: FileMeta,
) -> Result<(), FsError> {
    let path = dir_path.join(name);
    if let Some(st) = stat_entry(dir, dir_path, name)? {
        if !is_regular(&st) {
            return Err(FsError::refused(
                &path,
                format!("is {}, not a regular file", kind_name(&st)),
            ));
        }
    }
    let tmp_name = format!(
        ".{}{TEMP_MARK}{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp_path = dir_path.join(&tmp_name);
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        dir,
        tmp_name.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| FsError::io(&tmp_path, "create", e))?;
    let result = (|| {
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes).map_err(|e| {
            FsError::io(
                &tmp_path,
                "write",
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        fsync(&file).map_err(|e| FsError::io(&tmp_path, "fsync", e))?;
        if meta.owner.is_some() || meta.group.is_some() {
            fchown(&file, meta.owner, meta.group)
                .map_err(|e| FsError::io(&tmp_path, "fchown", e))?;
        }
        fchmod(&file, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| FsError::io(&tmp_path, "fchmod", e))?;
        renameat(dir, tmp_name.as_str(), dir, name).map_err(|e| FsError::io(&path, "rename", e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = unlinkat(dir, tmp_name.as_str(), UnlinkatFlags::NoRemoveDir);
        return result;
    }
    fsync(dir).map_err(|e| FsError::io(dir_path, "fsync", e))
}

/// Reads a small regular file below `dir` without following a symlink.
/// Returns `None` when absent; refuses anything but a regular file.
pub fn read_entry(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    limit: usize,
) -> Result<Option<(FileStat, Vec<u8>)>, FsError> {
    use std::io::Read;
    let path = dir_path.join(name);
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY;
    match stat_entry(dir, dir_path, name)? {
        None => return Ok(None),
        Some(st) if !is_regular(&st) => {
            return Err(FsError::refused(
                &path,
                format!("is {}, not a regular file", kind_name(&st)),
            ))
        }
        Some(_) => {}
    }
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => return Err(FsError::refused(&path, "is a symlink")),
        Err(e) => return Err(FsError::io(&path, "open", e)),
    };
    let st = fstat(&fd).map_err(|e| FsError::io(&path, "fstat", e))?;
    if !is_regular(&st) {
        return Err(FsError::refused(
            &path,
            format!("is {}, not a regular file", kind_name(&st)),
        ));
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            FsError::io(
                &path,
                "read",
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
    Ok(Some((st, buf)))
}
