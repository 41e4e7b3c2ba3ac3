//! Inotify watches on each source's directory, filtered by file name. When
//! the directory (or an ancestor) is missing, the deepest existing ancestor
//! is watched for the next component instead, so deletion and re-creation of
//! the whole tree is followed. Directories are opened without following
//! symlinks and watched through their descriptors.

use crate::fsutil::{self, FsError};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a directory on the way to a source is watched for: only what can
/// change the path (an entry created, deleted or moved; the directory
/// itself deleted or moved). Writes and attribute changes of unrelated
/// files there (`~/.bash_history`, files in `/tmp`) never wake the agent.
fn ancestor_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// The source's own directory: also writes in place and mode changes.
fn leaf_mask() -> WatchMask {
    ancestor_mask() | WatchMask::CLOSE_WRITE | WatchMask::ATTRIB
}

/// What happened, for the agent to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The file of slot `n` (a source or a copy) may have changed.
    /// `complete` is false when the only event was a creation (a write may
    /// still be under way).
    File { slot: usize, complete: bool },
    /// A watched directory of slot `n` went away or appeared: re-arm.
    Rearm(usize),
    /// Events were lost: everything must be re-scanned.
    Overflow,
}

/// A watched directory on the way to a source, and the entry in it that
/// matters: the next path component, or the source file for the leaf.
struct Link {
    wd: WatchDescriptor,
    child: OsString,
}

struct Slot {
    dir: PathBuf,
    file: OsString,
    /// Every existing directory from `/` down, each watched for its child.
    /// The last one is the leaf; it holds the source when `fd` is set.
    links: Vec<Link>,
    /// The source's directory, opened without following symlinks.
    fd: Option<OwnedFd>,
}

pub struct Watcher {
    inotify: Inotify,
    wds: HashMap<WatchDescriptor, Vec<usize>>,
    slots: Vec<Slot>,
    buf: Vec<u8>,
}

impl Watcher {
    /// One slot per absolute file path (sources, then copies); nothing is
    /// watched until [`arm`](Self::arm).
    pub fn new(files: &[PathBuf]) -> std::io::Result<Watcher> {
        let slots = files
            .iter()
            .map(|s| {
                let (dir, file) = crate::config::split_file(s);
                Slot {
                    dir: dir.to_path_buf(),
                    file: file.to_os_string(),
                    links: Vec::new(),
                    fd: None,
                }
            })
            .collect();
        Ok(Watcher {
            inotify: Inotify::init()?,
            wds: HashMap::new(),
            slots,
            buf: vec![0; 64 * 1024],
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// The directory of slot `n`'s file, when it exists and is watched.
    pub fn dir_fd(&self, n: usize) -> Option<BorrowedFd<'_>> {
        self.slots[n].fd.as_ref().map(|fd| fd.as_fd())
    }

    fn disarm(&mut self, n: usize) {
        self.slots[n].fd = None;
        for link in std::mem::take(&mut self.slots[n].links) {
            if let Some(users) = self.wds.get_mut(&link.wd) {
                users.retain(|&u| u != n);
                if users.is_empty() {
                    self.wds.remove(&link.wd);
                    // May already be gone with its directory: nothing to do then.
                    let _ = self.inotify.watches().remove(link.wd);
                }
            }
        }
    }

    fn add(
        &mut self,
        n: usize,
        fd: BorrowedFd,
        path: &Path,
        child: &OsStr,
        mask: WatchMask,
    ) -> Result<(), FsError> {
        // Watch the very inode we opened, not whatever the path names now.
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let target = if proc_path.exists() {
            proc_path.as_path()
        } else {
            path
        };
        let wd = self
            .inotify
            .watches()
            // The kernel keeps one mask per inode: a directory that is one
            // watch's ancestor and another's leaf gets both (MASK_ADD).
            .add(target, mask | WatchMask::MASK_ADD)
            .map_err(|e| watch_error(path, e))?;
        let users = self.wds.entry(wd.clone()).or_default();
        if !users.contains(&n) {
            users.push(n);
        }
        self.slots[n].links.push(Link {
            wd,
            child: child.to_os_string(),
        });
        Ok(())
    }

    /// (Re-)arms watch `n`: every existing directory from `/` to the source's
    /// is watched for its next component, so deleting, moving or creating
    /// any of them is noticed (an open descriptor would otherwise delay
    /// IN_DELETE_SELF). Returns an error when a component is refused (e.g. a
    /// symlink); its directory stays watched so that a fix is noticed.
    pub fn arm(&mut self, n: usize) -> Result<(), FsError> {
        self.disarm(n);
        let dir = self.slots[n].dir.clone();
        let file = self.slots[n].file.clone();
        let mut walk = fsutil::Walk::start(&dir)?;
        while let Some(part) = walk.next_name() {
            self.add(n, walk.fd(), walk.path(), part, ancestor_mask())?;
            match walk.descend() {
                Ok(_) => {}
                Err(FsError::Missing(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.add(n, walk.fd(), walk.path(), &file, leaf_mask())?;
        self.slots[n].fd = Some(walk.into_fd());
        Ok(())
    }

    /// Where watch `n` is currently watching (for logs).
    pub fn describe(&self, n: usize) -> String {
        let slot = &self.slots[n];
        match (&slot.fd, slot.links.last()) {
            (Some(_), _) => format!("watching {}", slot.dir.display()),
            (None, Some(link)) => format!(
                "{} is missing; waiting for {:?} to appear",
                slot.dir.display(),
                link.child
            ),
            (None, None) => "not watched".into(),
        }
    }

    /// Reads one buffer of pending events (non-blocking) and maps them to
    /// changes. One read per call: whatever is left keeps the fd readable
    /// for the next poll, and the common single event costs no extra
    /// read that only returns EAGAIN.
    pub fn read(&mut self) -> std::io::Result<Vec<Change>> {
        let mut changes = Vec::new();
        let events = match self.inotify.read_events(&mut self.buf) {
            Ok(events) => events,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(changes),
            Err(e) => return Err(e),
        };
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                changes.push(Change::Overflow);
                continue;
            }
            let Some(users) = self.wds.get(&ev.wd) else {
                continue;
            };
            if ev.mask.contains(EventMask::IGNORED) {
                // The kernel dropped this watch (directory deleted).
                let users = self.wds.remove(&ev.wd).unwrap_or_default();
                changes.extend(users.into_iter().map(Change::Rearm));
                continue;
            }
            for &n in users {
                changes.extend(classify(&self.slots[n], n, &ev.wd, ev.mask, ev.name));
            }
        }
        Ok(changes)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

fn classify(
    slot: &Slot,
    n: usize,
    wd: &WatchDescriptor,
    mask: EventMask,
    name: Option<&OsStr>,
) -> Option<Change> {
    if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
        return Some(Change::Rearm(n));
    }
    let name = name?;
    let last = slot.links.len().checked_sub(1)?;
    // The same directory can be a link twice only for different children.
    let (i, _) = slot
        .links
        .iter()
        .enumerate()
        .find(|(_, l)| &l.wd == wd && l.child == name)?;
    if i == last && slot.fd.is_some() {
        let complete = !mask.contains(EventMask::CREATE) || mask.intersects(EventMask::ISDIR);
        Some(Change::File { slot: n, complete })
    } else if mask.intersects(
        EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO,
    ) {
        Some(Change::Rearm(n))
    } else {
        None
    }
}

fn watch_error(path: &Path, e: std::io::Error) -> FsError {
    let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    if errno == nix::errno::Errno::ENOSPC {
        FsError::Limit {
            path: path.to_path_buf(),
            what: "cannot add an inotify watch: the limit fs.inotify.max_user_watches is reached (raise it: sysctl fs.inotify.max_user_watches=…)".into(),
        }
    } else {
        FsError::io(path, "inotify_add_watch", errno)
    }
}
