//! Safe reads of the source file: never through a symlink, only a regular
//! file with one link and the expected owner, size-capped, and stable (the
//! file did not change while it was read).

use crate::fsutil::{is_regular, kind_name, FsError};
use crate::validate::Secret;
use nix::errno::Errno;
use nix::sys::stat::{fstat, FileStat};
use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

/// Largest credentials file accepted.
pub const MAX_SIZE: usize = 64 * 1024;
const READ_TRIES: u32 = 20;

/// A source file that passed the safety checks, with its open descriptor
/// (for `fchmod`) and contents.
#[derive(Debug)]
pub struct SourceFile {
    pub fd: OwnedFd,
    pub stat: FileStat,
    pub bytes: Secret,
}

#[derive(Debug)]
pub enum ReadOutcome {
    Absent,
    /// Unsafe or unreadable; the reason names no contents.
    Refused(String),
    /// Replaced or written to on every try: a writer is at work, and its
    /// last rename or close brings another event. Not worth a warning.
    Busy(&'static str),
    Ok(SourceFile),
}

/// One try: a final outcome, or a reason to look again.
enum Attempt {
    Done(ReadOutcome),
    Again(&'static str),
}

/// Where a test may interfere with a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Looked at by name, not opened yet.
    Named,
    Read,
}

/// Reads `name` in the directory `dir` (already opened without following
/// symlinks). `owner`, when set, is the only uid accepted.
pub fn read_source(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    owner: Option<u32>,
) -> Result<ReadOutcome, FsError> {
    read_source_with(dir, dir_path, name, owner, &mut |_| {})
}

fn read_source_with(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    owner: Option<u32>,
    hook: &mut dyn FnMut(Step),
) -> Result<ReadOutcome, FsError> {
    let mut why = "";
    for _ in 0..READ_TRIES {
        match read_once(dir, dir_path, name, owner, hook)? {
            Attempt::Done(outcome) => return Ok(outcome),
            Attempt::Again(reason) => why = reason,
        }
        if why == CHANGING {
            // Someone is writing in place; give the write a moment.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(ReadOutcome::Busy(why))
}

const CHANGING: &str = "kept changing while being read";

/// The link count is checked before opening, after opening and after
/// reading (and the caller checks it again before `fchmod`): a second name
/// present at any of those points refuses the file.
fn read_once(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    owner: Option<u32>,
    hook: &mut dyn FnMut(Step),
) -> Result<Attempt, FsError> {
    use Attempt::{Again, Done};
    let path = dir_path.join(name);
    // Look before opening: opening a FIFO or a device can block or have side effects.
    let named = match crate::fsutil::stat_entry(dir, dir_path, name)? {
        None => return Ok(Done(ReadOutcome::Absent)),
        // Renamed over between the lookup and the stat.
        Some(st) if st.st_nlink == 0 => return Ok(Again("replaced while being opened")),
        Some(st) => st,
    };
    if let Some(why) = unsafe_reason(&named, owner) {
        return Ok(Done(ReadOutcome::Refused(why)));
    }
    hook(Step::Named);
    let Some((fd, before)) = crate::fsutil::open_regular(dir, dir_path, name, &named)? else {
        return Ok(Again("replaced while being opened"));
    };
    if before.st_nlink == 0 {
        return Ok(Again("replaced while being opened"));
    }
    if let Some(why) = unsafe_reason(&before, owner) {
        return Ok(Done(ReadOutcome::Refused(why)));
    }
    let bytes = read_all(&fd, &path, before.st_size.max(0) as usize)?;
    hook(Step::Read);
    let after = fstat(&fd).map_err(|e| FsError::io(&path, "fstat", e))?;
    if after.st_nlink == 0 {
        // Renamed over or deleted meanwhile: the newer file is what counts.
        return Ok(Again("replaced while being read"));
    }
    if let Some(why) = unsafe_reason(&after, owner) {
        return Ok(Done(ReadOutcome::Refused(why)));
    }
    let stable = before.st_size == after.st_size
        && before.st_mtime == after.st_mtime
        && before.st_mtime_nsec == after.st_mtime_nsec
        && i64::try_from(bytes.0.len()).is_ok_and(|n| n == after.st_size);
    if !stable {
        return Ok(Again(CHANGING));
    }
    Ok(Done(ReadOutcome::Ok(SourceFile {
        fd,
        stat: after,
        bytes,
    })))
}

fn unsafe_reason(st: &FileStat, owner: Option<u32>) -> Option<String> {
    if !is_regular(st) {
        return Some(format!(
            "is {}, not a regular file (never followed)",
            kind_name(st)
        ));
    }
    if st.st_nlink != 1 {
        return Some(format!(
            "has {} hard links (expected exactly 1)",
            st.st_nlink
        ));
    }
    if let Some(uid) = owner {
        if st.st_uid != uid {
            return Some(format!(
                "is owned by uid {}, expected uid {uid} (source_owner)",
                st.st_uid
            ));
        }
    }
    if usize::try_from(st.st_size).map_or(true, |n| n > MAX_SIZE) {
        return Some(format!("is larger than {MAX_SIZE} bytes"));
    }
    None
}

/// Reads up to one byte more than the `expected` size, so a file that grew
/// shows up as a length mismatch. A short read is the end of a regular file;
/// anything else the caller's size check catches.
fn read_all(fd: &OwnedFd, path: &Path, expected: usize) -> Result<Secret, FsError> {
    let mut buf = vec![0u8; expected.min(MAX_SIZE) + 1];
    let mut len = 0;
    while len < buf.len() {
        let want = buf.len() - len;
        match nix::sys::uio::pread(fd, &mut buf[len..], len as i64) {
            Ok(0) => break,
            Ok(n) if n < want => {
                len += n;
                break;
            }
            Ok(n) => len += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FsError::io(path, "read", e)),
        }
    }
    buf.truncate(len);
    Ok(Secret(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, OwnedFd) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let fd = OwnedFd::from(f.reopen().unwrap());
        (f, fd)
    }

    #[test]
    fn read_all_reads_to_the_end_and_shows_growth_as_one_extra_byte() {
        let (f, fd) = file_with(b"0123456789");
        let read = |expected| read_all(&fd, f.path(), expected).unwrap().0;
        assert_eq!(read(10), b"0123456789", "the size fstat gave");
        assert_eq!(read(20), b"0123456789", "shrunk: a short read is the end");
        // Grew since fstat: one byte more than expected, so the caller's
        // length check refuses this read and tries again.
        assert_eq!(read(5), b"012345");
        assert_eq!(read(0), b"0");
    }

    /// Item 4 of security round 2: a second name present at any point of
    /// the read refuses the file (the old code looked once, after opening).
    #[test]
    fn a_second_name_at_any_point_of_the_read_refuses_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (src, extra) = (dir.path().join("creds"), dir.path().join("extra"));
        std::fs::write(&src, b"{}").unwrap();
        let dfd = crate::fsutil::open_dir(dir.path()).unwrap();
        let read = |hook: &mut dyn FnMut(Step)| {
            read_source_with(dfd.as_fd(), dir.path(), OsStr::new("creds"), None, hook).unwrap()
        };
        let refused = |out: ReadOutcome| matches!(out, ReadOutcome::Refused(ref why) if why.contains("2 hard links"));
        // Present when looked at by name, gone before the open.
        std::fs::hard_link(&src, &extra).unwrap();
        assert!(refused(read(&mut |step| {
            if step == Step::Named {
                std::fs::remove_file(&extra).unwrap();
            }
        })));
        // Added while the file is being read.
        assert!(refused(read(&mut |step| {
            if step == Step::Read && !extra.exists() {
                std::fs::hard_link(&src, &extra).unwrap();
            }
        })));
        std::fs::remove_file(&extra).unwrap();
        // Renamed over while being read (0 links): read again, not refused.
        let next = dir.path().join("next");
        let mut swapped = false;
        let out = read(&mut |step| {
            if step == Step::Read && !swapped {
                swapped = true;
                std::fs::write(&next, b"[1]").unwrap();
                std::fs::rename(&next, &src).unwrap();
            }
        });
        assert!(
            matches!(out, ReadOutcome::Ok(ref f) if f.bytes.0 == b"[1]"),
            "{out:?}"
        );
    }
}
