//! Path walking through directory file descriptors and atomic replacement.
//!
//! Every directory on the way is opened with `O_NOFOLLOW`, so a symlink that
//! someone planted anywhere in a configured path is refused rather than
//! followed. Callers then act on the returned descriptors only.

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, AtFlags, OFlag, RenameFlags};
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

/// The one walk down a configured path: from `/`, one component at a
/// time, each directory opened through its parent's descriptor with
/// `O_NOFOLLOW`. Callers act on [`Walk::fd`] at each step (watch it, check
/// it, create the next component), never on a path resolved again.
pub struct Walk<'a> {
    parts: std::vec::IntoIter<&'a OsStr>,
    next: Option<&'a OsStr>,
    path: PathBuf,
    fd: OwnedFd,
}

impl<'a> Walk<'a> {
    /// Starts at `/` (the path must be absolute, without `..`).
    pub fn start(path: &'a Path) -> Result<Walk<'a>, FsError> {
        let mut parts = components(path)?.into_iter();
        let root = PathBuf::from("/");
        let fd = nix::fcntl::open(&root, DIR_FLAGS, Mode::empty())
            .map_err(|e| FsError::io(&root, "open", e))?;
        Ok(Walk {
            next: parts.next(),
            parts,
            path: root,
            fd,
        })
    }

    /// Where the walk is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The component the next step opens; `None` at the end.
    pub fn next_name(&self) -> Option<&'a OsStr> {
        self.next
    }

    /// Opens the next component and moves there; returns the directory
    /// left behind. [`FsError::Missing`] leaves the walk where it was.
    pub fn descend(&mut self) -> Result<(PathBuf, OwnedFd), FsError> {
        let name = self
            .next
            .ok_or_else(|| FsError::refused(&self.path, "the walk is at its end"))?;
        let child = open_subdir(self.fd.as_fd(), &self.path, name)?;
        Ok(self.enter(name, child))
    }

    /// Moves into `child`, the descriptor of the next component that the
    /// caller opened (e.g. just created).
    fn enter(&mut self, name: &OsStr, child: OwnedFd) -> (PathBuf, OwnedFd) {
        let parent = std::mem::replace(&mut self.fd, child);
        let parent_path = self.path.clone();
        self.path.push(name);
        self.next = self.parts.next();
        (parent_path, parent)
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// The directories from `/` down to one path from one [`Walk`]: acting on
/// these descriptors acts on exactly the directories that led to whatever
/// is opened below the last one, whatever is renamed meanwhile.
#[derive(Debug)]
pub struct DirChain {
    dirs: Vec<(PathBuf, OwnedFd)>,
}

impl DirChain {
    /// Walks an absolute directory path from `/` without following a
    /// symlink anywhere.
    pub fn open(path: &Path) -> Result<DirChain, FsError> {
        let mut walk = Walk::start(path)?;
        let mut dirs = Vec::new();
        while walk.next_name().is_some() {
            dirs.push(walk.descend()?);
        }
        let leaf_path = walk.path().to_path_buf();
        dirs.push((leaf_path, walk.into_fd()));
        Ok(DirChain { dirs })
    }

    /// Each directory, `/` first, with the path it had when it was opened.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, BorrowedFd<'_>)> {
        self.dirs.iter().map(|(p, fd)| (p.as_path(), fd.as_fd()))
    }

    /// The last directory (the one the path names).
    pub fn leaf(&self) -> BorrowedFd<'_> {
        self.dirs
            .last()
            .expect("a chain holds at least /")
            .1
            .as_fd()
    }

    pub fn into_leaf(mut self) -> OwnedFd {
        self.dirs.pop().expect("a chain holds at least /").1
    }
}

/// Opens an absolute directory path without following symlinks anywhere.
pub fn open_dir(path: &Path) -> Result<OwnedFd, FsError> {
    DirChain::open(path).map(DirChain::into_leaf)
}

/// Random hex digits for names nobody can guess in advance.
pub fn random_hex() -> String {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // No entropy source (very old kernel): still unique per process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        buf = (t.as_nanos() as u64 ^ TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)).to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens a directory the agent writes into (a copy's or the state's),
/// refusing one that someone else could tamper with: every ancestor must
/// belong to root or the agent and be writable by nobody else unless
/// sticky (else its owner could swap the directories below it), and the
/// directory itself must pass [`unsafe_dir_reason`]. With `create`, missing
/// directories are made with that mode (see [`create_dir`]).
pub fn open_private_dir(
    path: &Path,
    create: Option<u32>,
    sticky_ok: bool,
) -> Result<OwnedFd, FsError> {
    let mut walk = Walk::start(path)?;
    while let Some(name) = walk.next_name() {
        check_ancestor(walk.fd(), walk.path())?;
        match (walk.descend(), create) {
            (Ok(_), _) => {}
            (Err(FsError::Missing(p)), Some(mode)) => {
                let new = create_dir(walk.fd(), &p, name, mode)?;
                walk.enter(name, new);
            }
            (Err(e), _) => return Err(e),
        }
    }
    let st = fstat(walk.fd()).map_err(|e| FsError::io(walk.path(), "fstat", e))?;
    match unsafe_dir_reason(&st, sticky_ok) {
        Some(why) => Err(FsError::refused(walk.path(), why)),
        None => Ok(walk.into_fd()),
    }
}

fn check_ancestor(fd: BorrowedFd, path: &Path) -> Result<(), FsError> {
    let st = fstat(fd).map_err(|e| FsError::io(path, "fstat", e))?;
    let euid = nix::unistd::geteuid().as_raw();
    let why = if st.st_uid != 0 && st.st_uid != euid {
        format!("is owned by uid {}", st.st_uid)
    } else if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
        format!(
            "is writable by group or others without the sticky bit (mode {:04o})",
            perm_bits(&st)
        )
    } else {
        return Ok(());
    };
    Err(FsError::refused(
        path,
        format!("{why}: whoever can write it could swap the directories below it, so the agent writes nothing there"),
    ))
}

/// Makes directory `name` below `parent`: under a random name first,
/// checked through the descriptor opened afterwards (ours, empty, same
/// device as its parent), given its mode, and only then renamed into place
/// without replacing anything. A directory an attacker slips in under
/// either name is never changed or used.
fn create_dir(
    parent: BorrowedFd,
    path: &Path,
    name: &OsStr,
    mode: u32,
) -> Result<OwnedFd, FsError> {
    let tmp = format!(
        ".{}{TEMP_MARK}{}-{}.dir",
        name.to_string_lossy(),
        std::process::id(),
        random_hex()
    );
    mkdirat(parent, tmp.as_str(), Mode::from_bits_truncate(0o700))
        .map_err(|e| FsError::io(path, "mkdir", e))?;
    let discard = |e: FsError| {
        // Only our own (still empty) directory: unlinkat refuses anything else.
        let _ = unlinkat(parent, tmp.as_str(), UnlinkatFlags::RemoveDir);
        e
    };
    let new = open_subdir(parent, path, OsStr::new(&tmp)).map_err(discard)?;
    verify_created(parent, &new, path).map_err(discard)?;
    fchmod(&new, Mode::from_bits_truncate(mode & 0o777))
        .map_err(|e| discard(FsError::io(path, "fchmod", e)))?;
    renameat2(
        parent,
        tmp.as_str(),
        parent,
        name,
        RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| {
        discard(match e {
            Errno::EEXIST => {
                FsError::refused(path, "appeared while it was being created; not used")
            }
            e => FsError::io(path, "rename", e),
        })
    })?;
    Ok(new)
}

/// The directory behind `new` is the one we just made: owned by us, on the
/// parent's device, holding nothing.
fn verify_created(parent: BorrowedFd, new: &OwnedFd, path: &Path) -> Result<(), FsError> {
    let st = fstat(new).map_err(|e| FsError::io(path, "fstat", e))?;
    let parent_st = fstat(parent).map_err(|e| FsError::io(path, "fstat", e))?;
    let ours = st.st_uid == nix::unistd::geteuid().as_raw() && st.st_dev == parent_st.st_dev;
    if !ours || st.st_nlink != 2 || !is_empty_dir(new) {
        return Err(FsError::refused(
            path,
            "the directory opened after mkdir is not the one created (replaced meanwhile); not used",
        ));
    }
    Ok(())
}

fn is_empty_dir(fd: &OwnedFd) -> bool {
    let Ok(dup) = fd.try_clone() else {
        return false;
    };
    let Ok(mut dir) = nix::dir::Dir::from_fd(dup) else {
        return false;
    };
    let empty = dir
        .iter()
        .filter_map(Result::ok)
        .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
    empty
}

/// Why a directory that holds what we write is unsafe: owned by another
/// user, or writable by others (who could then replace our files).
/// `sticky_ok`: a sticky directory protects our entries from other users.
pub fn unsafe_dir_reason(st: &FileStat, sticky_ok: bool) -> Option<String> {
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != euid {
        return Some(format!(
            "is owned by uid {}, not by uid {euid} (the agent): its owner could replace what the agent writes there",
            st.st_uid
        ));
    }
    let sticky = st.st_mode & 0o1000 != 0;
    if st.st_mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Some(format!(
            "is writable by group or others (mode {:04o}): they could replace what the agent writes there",
            perm_bits(st)
        ));
    }
    None
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
/// At most this many entries of a directory are looked at for leftovers.
const STALE_SCAN_MAX: usize = 10_000;
const TEMP_MARK: &str = ".cred-watch-";

/// Removes what a previous run killed mid-write left in `dir`: temp files
/// of [`replace_file`] (`.NAME.cred-watch-PID-N.tmp`) and empty directories
/// of [`create_dir`] (`.NAME.cred-watch-PID-HEX.dir`; `unlinkat` refuses a
/// directory that is not empty). Returns how many.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(fd) = open_dir(dir) else { return 0 };
    let names: Vec<std::ffi::OsString> = match fd.try_clone().map(nix::dir::Dir::from_fd) {
        // Bounded: a directory others can fill (a sticky one above a copy)
        // must not hold the start back.
        Ok(Ok(mut listing)) => listing
            .iter()
            .take(STALE_SCAN_MAX)
            .filter_map(Result::ok)
            .map(|e| std::os::unix::ffi::OsStringExt::from_vec(e.file_name().to_bytes().to_vec()))
            .collect(),
        _ => return 0,
    };
    let mut removed = 0;
    for name in names {
        let text = name.to_string_lossy();
        let is_dir = text.ends_with(".dir");
        let ours =
            text.starts_with('.') && (text.ends_with(".tmp") || is_dir) && text.contains(TEMP_MARK);
        let pid = text
            .rsplit(TEMP_MARK)
            .next()
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        // Never another live writer's temp file (e.g. a concurrent `sync`).
        let alive = pid
            .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        let how = if is_dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        if ours && !alive && unlinkat(fd.as_fd(), name.as_os_str(), how).is_ok() {
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
    let (tmp_name, fd) = create_temp(dir, dir_path, name)?;
    let tmp_path = dir_path.join(&tmp_name);
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

/// Creates a temp file next to `name` under a random name (`O_EXCL`,
/// mode 0600), trying new names while one is taken: nobody can block our
/// writes by creating the names in advance.
fn create_temp(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
) -> Result<(String, OwnedFd), FsError> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        let tmp_name = format!(
            ".{}{TEMP_MARK}{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            random_hex()
        );
        match openat(
            dir,
            tmp_name.as_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((tmp_name, fd)),
            Err(Errno::EEXIST) => last = Errno::EEXIST,
            Err(e) => return Err(FsError::io(&dir_path.join(&tmp_name), "create", e)),
        }
    }
    Err(FsError::io(
        &dir_path.join(name),
        "create a temp file",
        last,
    ))
}

/// Opens `name` below `dir`, whose no-follow stat was `named` (a regular
/// file), without following a link and without blocking. `None` when the
/// name no longer leads to that file (renamed over or removed meanwhile).
/// Returns the descriptor and its own stat.
pub fn open_regular(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    named: &FileStat,
) -> Result<Option<(OwnedFd, FileStat)>, FsError> {
    let path = dir_path.join(name);
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP) => return Ok(None),
        Err(e) => return Err(FsError::io(&path, "open", e)),
    };
    let st = fstat(&fd).map_err(|e| FsError::io(&path, "fstat", e))?;
    if (st.st_dev, st.st_ino) != (named.st_dev, named.st_ino) {
        return Ok(None);
    }
    Ok(Some((fd, st)))
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
    let named = match stat_entry(dir, dir_path, name)? {
        None => return Ok(None),
        Some(st) if !is_regular(&st) => {
            return Err(FsError::refused(
                &path,
                format!("is {}, not a regular file", kind_name(&st)),
            ))
        }
        Some(st) => st,
    };
    let Some((fd, st)) = open_regular(dir, dir_path, name, &named)? else {
        return Err(FsError::refused(&path, "was replaced while being opened"));
    };
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
