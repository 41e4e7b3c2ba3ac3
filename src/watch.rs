//! Inotify watches on each source's directory, filtered by file name. When
//! the directory (or an ancestor) is missing, the deepest existing ancestor
//! is watched for the next component instead, so deletion and re-creation of
//! the whole tree is followed. Directories are opened without following
//! symlinks and watched through their descriptors; the file itself is
//! watched on its inode, for writes in place and mode changes.

use crate::fsutil::{self, FsError};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a directory on the way to a source is watched for while its next
/// component exists: only what can change the path (that entry deleted or
/// moved away, another moved over it; the directory itself deleted or
/// moved). An existing name cannot be created again, so creations are
/// watched for only while the component is missing ([`WAITING`]): temp
/// files (a CLI's own, `~/.claude.json.tmp.*`, files in `/tmp`) never wake
/// the agent. Writes and mode changes of the source come through a watch on
/// its inode ([`Watcher::follow`]), so a CLI appending to `history.jsonl`
/// next to its credentials costs nothing either.
fn dir_mask() -> WatchMask {
    WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// Added to a directory's watch while the component it leads to is missing.
const WAITING: WatchMask = WatchMask::CREATE;

/// Added to the source's directory while the file is missing: its
/// creation, and the end of a write that may come before its inode is
/// watched.
fn waiting_for_file() -> WatchMask {
    WAITING | WatchMask::CLOSE_WRITE
}

/// What the file's inode is watched for: writes in place and mode changes.
fn inode_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::ATTRIB | WatchMask::DONT_FOLLOW
}

/// Added to the source's directory when the file cannot be watched on its
/// inode (no `/proc`, or no watch left): every file's writes and mode changes.
fn wide() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::ATTRIB
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
    /// What this slot needs from the directory; the kernel keeps one mask
    /// per directory, the union of its links' masks.
    mask: WatchMask,
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
    /// inode watch (see [`wide`]).
    wide: bool,
    /// Always watched through its directory (a copy).
    by_dir: bool,
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
    /// watched until [`arm`](Self::arm). The first `by_inode` files (the
    /// sources, in a CLI's busy directory) are watched on their inodes; the
    /// others (copies, in quiet directories where only the agent writes)
    /// through their directory's watch, which costs the agent's own
    /// replacements nothing more.
    pub fn new(files: &[PathBuf], by_inode: usize) -> std::io::Result<Watcher> {
        let slots = files
            .iter()
            .enumerate()
            .map(|(n, s)| {
                let (dir, file) = crate::config::split_file(s);
                Slot {
                    dir: dir.to_path_buf(),
                    file: file.to_os_string(),
                    links: Vec::new(),
                    fd: None,
                    inode: None,
                    moved: false,
                    wide: false,
                    by_dir: n >= by_inode,
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
        // The kernel keeps one mask per inode: a directory that is one
        // watch's ancestor and another's leaf gets both (MASK_ADD).
        let wd = self.watch_dir(fd, path, mask | WatchMask::MASK_ADD)?;
        let users = self.wds.entry(wd.clone()).or_default();
        if !users.contains(&n) {
            users.push(n);
        }
        self.slots[n].links.push(Link {
            wd,
            child: child.to_os_string(),
            mask,
        });
        Ok(())
    }

    /// Adds to (or, without MASK_ADD, sets) the watch on the directory
    /// opened as `fd`: the very inode opened, not whatever `path` names now
    /// (unless there is no `/proc`).
    fn watch_dir(
        &self,
        fd: BorrowedFd,
        path: &Path,
        mask: WatchMask,
    ) -> Result<WatchDescriptor, FsError> {
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let target = if self.proc_fds {
            proc_path.as_path()
        } else {
            path
        };
        self.inotify
            .watches()
            .add(target, mask | WatchMask::ONLYDIR)
            .map_err(|e| watch_error(path, e))
    }

    /// Adds `extra` to what slot `n`'s last directory is watched for; `fd`
    /// is that directory (the slot's own when `None`).
    fn amend_last(
        &mut self,
        n: usize,
        fd: Option<(BorrowedFd, &Path)>,
        extra: WatchMask,
    ) -> Result<(), FsError> {
        let slot = &self.slots[n];
        let dir = match (fd, &slot.fd) {
            (Some(dir), _) => dir,
            (None, Some(fd)) => (fd.as_fd(), slot.dir.as_path()),
            (None, None) => return Ok(()),
        };
        self.watch_dir(dir.0, dir.1, extra | WatchMask::MASK_ADD)?;
        if let Some(link) = self.slots[n].links.last_mut() {
            link.mask |= extra;
        }
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
            self.add(n, walk.fd(), walk.path(), part, dir_mask())?;
            match walk.descend() {
                Ok(_) => continue,
                Err(FsError::Missing(_)) => {}
                Err(e) => return Err(e),
            }
            // Missing: watch for its creation, then look once more (it may
            // have been created meanwhile, without an event).
            self.amend_last(n, Some((walk.fd(), walk.path())), WAITING)?;
            match walk.descend() {
                Ok(_) => {}
                Err(FsError::Missing(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let wide = !self.proc_fds || self.slots[n].by_dir;
        let mask = if wide {
            dir_mask() | self::wide()
        } else {
            dir_mask()
        };
        self.add(n, walk.fd(), walk.path(), &file, mask)?;
        self.slots[n].fd = Some(walk.into_fd());
        self.slots[n].wide = wide;
        // The file is followed with the others' ([`follow_moved`]): every
        // slot's directories come first when watches are scarce.
        self.slots[n].moved = true;
        Ok(())
    }

    /// Watches the inode slot `n`'s name denotes now, for writes in place
    /// and mode changes; while the name is missing, its directory is
    /// watched for creations. Only a hint: what is read is always opened
    /// again from the directory. When the inode cannot be watched, the
    /// directory's watch is widened to every file's writes. Returns whether
    /// a file is there, watched on its inode: a write to it that ended
    /// before this call had no event.
    fn follow(&mut self, n: usize) -> bool {
        self.slots[n].moved = false;
        if self.slots[n].fd.is_none() {
            self.unfollow(n);
            return false;
        }
        // Twice at most: a name found missing is looked for again once its
        // creation is watched for.
        for _ in 0..2 {
            match self.watch_file(n) {
                Some(true) => {
                    self.stop_waiting(n);
                    return !self.slots[n].wide;
                }
                Some(false) if self.is_waiting(n) => return false,
                Some(false) => self.wait_for_file(n),
                None => self.widen(n),
            }
        }
        false
    }

    /// Follows every name that was created or moved since the last call
    /// ([`follow`](Self::follow)). The agent calls this after it has acted
    /// on the batch, so that watching the new inode is not on the path
    /// from an event to its fix; it returns the slots whose file must be
    /// read once more, since a write between that read and now had no event
    /// (only slots watched on their inodes: never a copy).
    pub fn follow_moved(&mut self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&n| self.slots[n].moved && self.follow(n))
            .collect()
    }

    /// Whether slot `n`'s file is there (watched on its inode unless the
    /// slot is wide); `None` when its inode cannot be watched.
    fn watch_file(&mut self, n: usize) -> Option<bool> {
        let slot = &self.slots[n];
        let dir = slot.fd.as_ref()?;
        if slot.wide {
            return Some(fstatat(dir, slot.file.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok());
        }
        // The name inside the directory we opened, not following a link
        // there; the path never goes through the directory's own path.
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&slot.file);
        // The old inode's watch goes first: at the watch limit, the new one
        // takes its place.
        self.unfollow(n);
        let mut watches = self.inotify.watches();
        // A new inode (the common case: a rename) in one system call.
        let added = match watches.add(&path, inode_mask() | WatchMask::MASK_CREATE) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                watches.add(&path, inode_mask() | WatchMask::MASK_ADD)
            }
            other => other,
        };
        match added {
            // A directory another slot watches: not a file to follow.
            Ok(wd) if self.wds.contains_key(&wd) => {}
            Ok(wd) => {
                self.inodes.entry(wd.clone()).or_default().push(n);
                self.slots[n].inode = Some(wd);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Some(false),
            Err(e) => {
                log::debug!(
                    "{}: cannot watch the file itself ({e}); watching its directory for writes",
                    self.slots[n].dir.display()
                );
                return None;
            }
        }
        Some(true)
    }

    fn is_waiting(&self, n: usize) -> bool {
        self.slots[n]
            .links
            .last()
            .is_some_and(|l| l.mask.contains(WAITING))
    }

    /// Slot `n`'s file is missing: its directory is watched for creations.
    fn wait_for_file(&mut self, n: usize) {
        if let Err(e) = self.amend_last(n, None, waiting_for_file()) {
            log::warn!("{e}; the file's creation is noticed at the next resync");
        }
    }

    /// Slot `n`'s file is there: its directory stops waking the agent for
    /// creations, unless another slot still waits on it.
    fn stop_waiting(&mut self, n: usize) {
        if !self.is_waiting(n) || self.slots[n].wide {
            return;
        }
        let Some(link) = self.slots[n].links.last_mut() else {
            return;
        };
        link.mask.remove(waiting_for_file());
        let wd = link.wd.clone();
        let union = self
            .slots
            .iter()
            .flat_map(|s| &s.links)
            .filter(|l| l.wd == wd)
            .fold(WatchMask::empty(), |m, l| m | l.mask);
        let slot = &self.slots[n];
        if let Some(dir) = slot.fd.as_ref() {
            // Without MASK_ADD: the mask is replaced by the union.
            if let Err(e) = self.watch_dir(dir.as_fd(), &slot.dir, union) {
                log::debug!("{e}");
            }
        }
    }

    /// The directory's watch reports every file's writes and mode changes.
    fn widen(&mut self, n: usize) {
        self.unfollow(n);
        self.slots[n].wide = true;
        // The directory is watched already: this adds no watch, only events.
        if let Err(e) = self.amend_last(n, None, wide()) {
            log::warn!("{e}; writes in place are noticed at the next change of the name or resync");
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

    /// A watcher on `TMP/home/.claude/.credentials.json`.
    struct Fixture {
        tmp: tempfile::TempDir,
        source: PathBuf,
        w: Watcher,
    }

    /// Armed with the file there; without `/proc` (`by_inode` false) the
    /// file's writes come through its directory's watch.
    fn armed(by_inode: bool) -> Fixture {
        let f = unarmed(true);
        fs::write(&f.source, "{}").unwrap();
        fs::write(f.source.with_file_name("history.jsonl"), "").unwrap();
        arm(f, by_inode)
    }

    fn unarmed(with_dir: bool) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("home/.claude").join(NAME);
        let dir = source.parent().unwrap();
        fs::create_dir_all(if with_dir { dir } else { dir.parent().unwrap() }).unwrap();
        let w = Watcher::new(std::slice::from_ref(&source), 1).unwrap();
        Fixture { tmp, source, w }
    }

    fn arm(mut f: Fixture, by_inode: bool) -> Fixture {
        f.w.proc_fds = by_inode;
        f.w.arm(0).unwrap();
        f.w.follow_moved();
        assert_eq!(f.w.slots[0].inode.is_some(), by_inode && f.source.exists());
        f.drain();
        f
    }

    impl Fixture {
        /// Reads every queued event; keeps those of the watches inside the
        /// temp directory (those further up, in the shared `/tmp`, are
        /// other processes'). Inotify queues an event within the system
        /// call that causes it: what is not queued now never will be.
        fn drain(&mut self) -> Vec<EventMask> {
            let first = self.tmp.path().components().count() - 1;
            let ours: Vec<WatchDescriptor> = self.w.slots[0].links[first..]
                .iter()
                .map(|l| l.wd.clone())
                .collect();
            let mut buf = [0u8; 4096];
            let mut out = Vec::new();
            while let Ok(events) = self.w.inotify.read_events(&mut buf) {
                let mut any = false;
                for e in events {
                    any = true;
                    if ours.contains(&e.wd) || self.w.inodes.contains_key(&e.wd) {
                        out.push(e.mask);
                    }
                }
                if !any {
                    break;
                }
            }
            out
        }

        /// What the agent gets from a batch: the changes, and then the
        /// names followed to their new inode.
        fn changes(&mut self) -> Vec<Change> {
            let changes = self.w.read().unwrap();
            self.w.follow_moved();
            changes
        }

        fn dir(&self) -> &Path {
            self.source.parent().unwrap()
        }
    }

    const WRITTEN: Change = Change::File {
        slot: 0,
        complete: true,
    };

    const CREATED: Change = Change::File {
        slot: 0,
        complete: false,
    };

    /// A CLI's atomic write of another file: temp file, then rename.
    fn rewrite(path: &Path) {
        let tmp = path.with_extension("tmp.1");
        fs::write(&tmp, "{}").unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn writes_and_temp_files_next_to_the_source_queue_no_event() {
        let mut f = armed(true);
        let history = f.dir().join("history.jsonl");
        for _ in 0..20 {
            let mut h = fs::OpenOptions::new().append(true).open(&history).unwrap();
            h.write_all(b"{\"display\":\"noise\"}\n").unwrap();
        }
        fs::set_permissions(&history, fs::Permissions::from_mode(0o600)).unwrap();
        // The source's own temp file, before its rename.
        fs::write(f.source.with_extension("json.tmp.1"), "{}").unwrap();
        assert_eq!(
            f.drain(),
            vec![],
            "writes and temp files next to the source"
        );
        // `~/.claude.json` rewritten in the parent; a file created further up.
        let home = f.dir().parent().unwrap().to_path_buf();
        fs::write(home.join(".claude.json"), "{}").unwrap();
        fs::write(f.tmp.path().join("other"), "").unwrap();
        assert_eq!(f.drain(), vec![], "files created in the ancestors");
        rewrite(&home.join(".claude.json"));
        assert_eq!(
            f.changes(),
            vec![],
            "a rename of another file in the parent"
        );
    }

    #[test]
    fn writes_in_place_and_mode_changes_of_the_source_are_changes() {
        for by_inode in [true, false] {
            let mut f = armed(by_inode);
            fs::write(&f.source, "{\"a\":1}").unwrap();
            assert!(f.changes().contains(&WRITTEN), "a write in place");
            fs::set_permissions(&f.source, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(f.changes().contains(&WRITTEN), "a chmod");
        }
    }

    #[test]
    fn a_replaced_source_is_followed_to_its_new_inode() {
        for by_inode in [true, false] {
            let mut f = armed(by_inode);
            let mut old = fs::OpenOptions::new().write(true).open(&f.source).unwrap();
            rewrite(&f.source);
            assert!(f.changes().contains(&WRITTEN), "the rename");
            // The replaced inode, still open, is no longer the source.
            old.write_all(b"stale").unwrap();
            drop(old);
            assert_eq!(f.drain(), vec![], "a write to the replaced file");
            fs::write(&f.source, "{\"c\":3}").unwrap();
            assert!(
                f.changes().contains(&WRITTEN),
                "a write in place to the new file"
            );
        }
    }

    #[test]
    fn a_write_between_the_read_and_the_follow_is_read_again() {
        let mut f = armed(true);
        rewrite(&f.source);
        assert!(f.w.read().unwrap().contains(&WRITTEN), "the rename");
        // The agent reads and fixes the new file here; then it is written
        // in place before its inode is watched: no event for that write.
        fs::write(&f.source, "{\"e\":5}").unwrap();
        assert_eq!(f.w.follow_moved(), vec![0], "read once more");
        assert_eq!(f.w.follow_moved(), Vec::<usize>::new(), "once");
        fs::write(&f.source, "{\"f\":6}").unwrap();
        assert_eq!(f.changes(), vec![WRITTEN], "watched from then on");
    }

    #[test]
    fn a_deleted_source_is_waited_for_and_followed_when_created() {
        for by_inode in [true, false] {
            let mut f = armed(by_inode);
            fs::remove_file(&f.source).unwrap();
            assert!(f.changes().contains(&WRITTEN), "the deletion");
            assert!(f.w.slots[0].inode.is_none());
            let mut file = fs::File::create(&f.source).unwrap();
            assert_eq!(f.changes(), vec![CREATED]);
            file.write_all(b"{\"d\":4}").unwrap();
            drop(file);
            assert_eq!(f.changes(), vec![WRITTEN], "the end of the write");
            if by_inode {
                // There again: creations next to it are not watched for.
                fs::write(f.source.with_extension("json.tmp.2"), "{}").unwrap();
                assert_eq!(f.drain(), vec![], "a temp file once the source is back");
            }
        }
    }

    #[test]
    fn a_file_created_and_closed_before_it_is_followed_is_complete() {
        let mut f = armed(true);
        fs::remove_file(&f.source).unwrap();
        f.changes();
        // Created, written and closed before the agent reads the creation:
        // the end of the write must be an event too.
        fs::write(&f.source, "{\"claudeAiOauth\":{").unwrap();
        assert!(f.changes().contains(&WRITTEN), "the close");
        fs::write(f.source.with_extension("json.tmp.3"), "{}").unwrap();
        assert_eq!(f.drain(), vec![], "followed: no longer waiting");
    }

    #[test]
    fn a_missing_directory_is_waited_for() {
        let mut f = arm(unarmed(false), true);
        fs::create_dir(f.dir()).unwrap();
        assert_eq!(f.changes(), vec![Change::Rearm(0)]);
        f.w.arm(0).unwrap();
        assert_eq!(f.w.follow_moved(), Vec::<usize>::new(), "no file yet");
        fs::write(&f.source, "{}").unwrap();
        assert!(f.changes().contains(&CREATED), "{:?}", f.w.describe(0));
    }
}
