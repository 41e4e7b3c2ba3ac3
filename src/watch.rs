//! Inotify watches on each source's directory, filtered by file name. When
//! the directory (or an ancestor) is missing, the deepest existing ancestor
//! is watched for the next component instead, so deletion and re-creation of
//! the whole tree is followed. Directories are opened without following
//! symlinks and watched through their descriptors; the file itself is
//! watched on its inode, for writes in place and mode changes.

use crate::fsutil::{self, FsError};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use nix::fcntl::AtFlags;
use nix::sys::stat::{fstatat, SFlag};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a directory on the way to a source is watched for: only what can
/// change the path (an entry created, deleted or moved; the directory
/// itself deleted or moved). Writes and attribute changes of unrelated
/// files there (`~/.bash_history`, files in `/tmp`) never wake the agent.
/// The source's own directory gets the same: the file's writes and mode
/// changes come through a watch on its inode (see [`Watcher::follow`]), so
/// a CLI appending to `history.jsonl` next to its credentials costs nothing.
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

/// What the file's inode is watched for: writes in place and mode changes.
fn inode_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::ATTRIB | WatchMask::DONT_FOLLOW | WatchMask::MASK_ADD
}

/// The source's directory when its file cannot be watched on its inode
/// (no `/proc`, or no watch left): every file's writes and mode changes.
fn wide_leaf_mask() -> WatchMask {
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
    /// The watch on the inode the file name denoted when last followed.
    inode: Option<WatchDescriptor>,
    /// The name was created, moved or deleted since: follow it again.
    moved: bool,
    /// The directory's watch reports the file's writes instead of an
    /// inode watch (see [`wide_leaf_mask`]).
    wide: bool,
}

pub struct Watcher {
    inotify: Inotify,
    /// Directory watches and the slots they serve.
    wds: HashMap<WatchDescriptor, Vec<usize>>,
    /// File inode watches and the slots they serve.
    inodes: HashMap<WatchDescriptor, Vec<usize>>,
    slots: Vec<Slot>,
    buf: Vec<u8>,
    /// `/proc/self/fd` is there: watches go through descriptors.
    proc_fds: bool,
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
                    inode: None,
                    moved: false,
                    wide: false,
                }
            })
            .collect();
        Ok(Watcher {
            inotify: Inotify::init()?,
            wds: HashMap::new(),
            inodes: HashMap::new(),
            slots,
            buf: vec![0; 64 * 1024],
            proc_fds: Path::new("/proc/self/fd").is_dir(),
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
        self.unfollow(n);
        self.slots[n].fd = None;
        self.slots[n].wide = false;
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
        let target = if self.proc_fds {
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
        let wide = !self.proc_fds;
        let mask = if wide {
            wide_leaf_mask()
        } else {
            ancestor_mask()
        };
        self.add(n, walk.fd(), walk.path(), &file, mask)?;
        self.slots[n].fd = Some(walk.into_fd());
        self.slots[n].wide = wide;
        self.follow(n);
        Ok(())
    }

    /// Watches the inode slot `n`'s name denotes now, for writes in place
    /// and mode changes. Called when the name was created or moved, before
    /// the file is read: a write that ends after the read is an event then.
    /// Only a hint: what is read is always opened again from the directory.
    /// When the inode cannot be watched, the directory's watch is widened.
    fn follow(&mut self, n: usize) {
        self.slots[n].moved = false;
        if self.slots[n].wide {
            return;
        }
        let Some(dir) = self.slots[n].fd.as_ref() else {
            return self.unfollow(n);
        };
        let name = self.slots[n].file.as_os_str();
        let regular = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
        });
        if !regular {
            // Missing or not a file: its next appearance is a directory event.
            return self.unfollow(n);
        }
        // The name inside the directory we opened, not following a link
        // there; the path never goes through the directory's own path.
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        match self.inotify.watches().add(&path, inode_mask()) {
            // Raced into a directory another slot watches: not ours to manage.
            Ok(wd) if self.wds.contains_key(&wd) => self.unfollow(n),
            Ok(wd) if self.slots[n].inode.as_ref() == Some(&wd) => {}
            Ok(wd) => {
                self.unfollow(n);
                self.inodes.entry(wd.clone()).or_default().push(n);
                self.slots[n].inode = Some(wd);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.unfollow(n),
            Err(e) => {
                log::debug!(
                    "{}: cannot watch the file itself ({e}); watching its directory for writes",
                    self.slots[n].dir.display()
                );
                self.widen(n);
            }
        }
    }

    /// The directory's watch reports every file's writes and mode changes.
    fn widen(&mut self, n: usize) {
        self.unfollow(n);
        let Some(dir) = self.slots[n].fd.as_ref() else {
            return;
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        // The directory is watched already: this adds no watch, only events.
        match self.inotify.watches().add(&path, wide_leaf_mask() | WatchMask::MASK_ADD) {
            Ok(_) => self.slots[n].wide = true,
            Err(e) => log::warn!(
                "{}: cannot watch for writes in place ({e}); they are noticed at the next change of the name or resync",
                self.slots[n].dir.display()
            ),
        }
    }

    /// Drops slot `n`'s inode watch, unless another slot shares it.
    fn unfollow(&mut self, n: usize) {
        let Some(wd) = self.slots[n].inode.take() else {
            return;
        };
        if let Some(users) = self.inodes.get_mut(&wd) {
            users.retain(|&u| u != n);
            if users.is_empty() {
                self.inodes.remove(&wd);
                if !self.wds.contains_key(&wd) {
                    // Gone already with its inode when the file was replaced.
                    let _ = self.inotify.watches().remove(wd);
                }
            }
        }
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
            if let Some(users) = self.inodes.get(&ev.wd) {
                if ev.mask.contains(EventMask::IGNORED) {
                    // The file was deleted (replaced): its watch is gone.
                    for n in self.inodes.remove(&ev.wd).unwrap_or_default() {
                        self.slots[n].inode = None;
                    }
                } else {
                    changes.extend(users.iter().map(|&slot| Change::File {
                        slot,
                        complete: true,
                    }));
                }
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
                let change = classify(&self.slots[n], n, &ev.wd, ev.mask, ev.name);
                if let Some(Change::File { .. }) = change {
                    self.slots[n].moved = true;
                }
                changes.extend(change);
            }
        }
        // Before anything is read: a name that now denotes another inode
        // is followed there.
        for n in 0..self.slots.len() {
            if self.slots[n].moved {
                self.follow(n);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const NAME: &str = ".credentials.json";

    /// A watcher armed on `TMP/home/.claude/.credentials.json`; without
    /// `/proc` (`by_inode` false) it falls back to the directory's watch.
    fn armed(by_inode: bool) -> (tempfile::TempDir, PathBuf, Watcher) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("home/.claude");
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join(NAME);
        fs::write(&source, "{}").unwrap();
        fs::write(dir.join("history.jsonl"), "").unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&source)).unwrap();
        w.proc_fds = by_inode;
        w.arm(0).unwrap();
        assert_eq!(w.slots[0].inode.is_some(), by_inode);
        drain(&mut w);
        (tmp, source, w)
    }

    /// Reads every queued event; keeps those of the source's directory and
    /// of the file's inode (events further up, in the shared temp
    /// directory, are other processes'). Inotify queues an event within the
    /// system call that causes it, so what is not queued now never will be.
    fn drain(w: &mut Watcher) -> Vec<EventMask> {
        let leaf = w.slots[0].links.last().unwrap().wd.clone();
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while let Ok(events) = w.inotify.read_events(&mut buf) {
            let mut any = false;
            for e in events {
                any = true;
                if e.wd == leaf || w.inodes.contains_key(&e.wd) {
                    out.push(e.mask);
                }
            }
            if !any {
                break;
            }
        }
        out
    }

    fn changes(w: &mut Watcher) -> Vec<Change> {
        w.read().unwrap()
    }

    const WRITTEN: Change = Change::File {
        slot: 0,
        complete: true,
    };

    #[test]
    fn writes_to_other_files_next_to_the_source_queue_no_event() {
        let (_tmp, source, mut w) = armed(true);
        let dir = source.parent().unwrap();
        for _ in 0..20 {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(dir.join("history.jsonl"))
                .unwrap();
            f.write_all(b"{\"display\":\"noise\"}\n").unwrap();
        }
        fs::set_permissions(dir.join("history.jsonl"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            drain(&mut w),
            vec![],
            "appends and a chmod of history.jsonl"
        );
    }

    #[test]
    fn writes_in_place_and_mode_changes_of_the_source_are_changes() {
        for by_inode in [true, false] {
            let (_tmp, source, mut w) = armed(by_inode);
            fs::write(&source, "{\"a\":1}").unwrap();
            assert!(changes(&mut w).contains(&WRITTEN), "a write in place");
            fs::set_permissions(&source, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(changes(&mut w).contains(&WRITTEN), "a chmod");
        }
    }

    #[test]
    fn a_replaced_source_is_followed_to_its_new_inode() {
        for by_inode in [true, false] {
            replaced_source_is_followed(by_inode);
        }
    }

    fn replaced_source_is_followed(by_inode: bool) {
        let (_tmp, source, mut w) = armed(by_inode);
        let mut old = fs::OpenOptions::new().write(true).open(&source).unwrap();
        let tmp = source.with_extension("tmp");
        fs::write(&tmp, "{\"b\":2}").unwrap();
        fs::rename(&tmp, &source).unwrap();
        assert!(changes(&mut w).contains(&WRITTEN), "the rename");
        // The replaced inode, still open, is no longer the source.
        old.write_all(b"stale").unwrap();
        drop(old);
        assert_eq!(drain(&mut w), vec![], "a write to the replaced file");
        fs::write(&source, "{\"c\":3}").unwrap();
        assert!(
            changes(&mut w).contains(&WRITTEN),
            "a write in place to the new file"
        );
    }

    #[test]
    fn a_created_source_is_followed_before_its_write_ends() {
        for by_inode in [true, false] {
            created_source_is_followed(by_inode);
        }
    }

    fn created_source_is_followed(by_inode: bool) {
        let (_tmp, source, mut w) = armed(by_inode);
        fs::remove_file(&source).unwrap();
        assert!(changes(&mut w).contains(&WRITTEN), "the deletion");
        assert!(w.slots[0].inode.is_none());
        let mut f = fs::File::create(&source).unwrap();
        let created = Change::File {
            slot: 0,
            complete: false,
        };
        assert_eq!(changes(&mut w), vec![created]);
        f.write_all(b"{\"d\":4}").unwrap();
        drop(f);
        assert_eq!(changes(&mut w), vec![WRITTEN], "the end of the write");
    }
}
