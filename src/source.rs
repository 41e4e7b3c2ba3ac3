//! Safe reads of the source file: never through a symlink, only a regular
//! file with one link and the expected owner, size-capped, and stable (the
//! file did not change while it was read).

use crate::fsutil::{is_regular, kind_name, FsError};
use crate::validate::Secret;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode};
use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

/// Largest credentials file accepted.
pub const MAX_SIZE: usize = 64 * 1024;
const STABLE_READ_TRIES: u32 = 20;

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
    Ok(SourceFile),
}

/// Reads `name` in the directory `dir` (already opened without following
/// symlinks). `owner`, when set, is the only uid accepted.
pub fn read_source(
    dir: BorrowedFd,
    dir_path: &Path,
    name: &OsStr,
    owner: Option<u32>,
) -> Result<ReadOutcome, FsError> {
    let path = dir_path.join(name);
    // Look before opening: opening a FIFO or a device can block or have side effects.
    match crate::fsutil::stat_entry(dir, dir_path, name)? {
        None => return Ok(ReadOutcome::Absent),
        Some(st) if !is_regular(&st) => {
            return Ok(ReadOutcome::Refused(format!(
                "is {}, not a regular file (never followed)",
                kind_name(&st)
            )))
        }
        Some(_) => {}
    }
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(ReadOutcome::Absent),
        Err(Errno::ELOOP) => {
            return Ok(ReadOutcome::Refused("is a symlink (never followed)".into()))
        }
        Err(e) => return Err(FsError::io(&path, "open", e)),
    };
    for _ in 0..STABLE_READ_TRIES {
        let before = fstat(&fd).map_err(|e| FsError::io(&path, "fstat", e))?;
        if let Some(why) = unsafe_reason(&before, owner) {
            return Ok(ReadOutcome::Refused(why));
        }
        let bytes = read_all(&fd, &path, before.st_size.max(0) as usize)?;
        let after = fstat(&fd).map_err(|e| FsError::io(&path, "fstat", e))?;
        let stable = before.st_size == after.st_size
            && before.st_mtime == after.st_mtime
            && before.st_mtime_nsec == after.st_mtime_nsec
            && bytes.0.len() as i64 == after.st_size;
        if stable {
            if bytes.0.len() > MAX_SIZE {
                return Ok(ReadOutcome::Refused(format!(
                    "is larger than {MAX_SIZE} bytes"
                )));
            }
            return Ok(ReadOutcome::Ok(SourceFile {
                fd,
                stat: after,
                bytes,
            }));
        }
        // Someone is writing in place; the close will send another event.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(ReadOutcome::Refused(
        "kept changing while being read".into(),
    ))
}

fn unsafe_reason(st: &FileStat, owner: Option<u32>) -> Option<String> {
    if !is_regular(st) {
        return Some(format!("is {}, not a regular file", kind_name(st)));
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
    if st.st_size as usize > MAX_SIZE {
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
}
