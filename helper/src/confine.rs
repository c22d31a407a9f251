//! Confined, fd-relative opening.
//!
//! Every file the helper reads is opened relative to a directory fd with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel refuses `..` escapes,
//! absolute symlinks and `/proc` magic links, so neither storage metadata nor tar-split names
//! can make the helper open anything outside the root it was given. Names are also cleaned
//! and checked before they reach the kernel, so that an escape attempt is reported as such
//! instead of as a confusing errno.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use cstor_protocol::ErrorCode;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{Error, Result};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// How many times in a row `openat2` may answer `EAGAIN` before the open fails.
///
/// The kernel answers `EAGAIN` to a confined lookup that went through `..` while a rename or
/// mount happened anywhere on the system, because it can then no longer prove that `..`
/// stayed beneath the root. A retry normally succeeds; retrying forever could spin for as
/// long as something keeps renaming (podman pulling, say).
pub const OPENAT2_ATTEMPTS: u32 = 8;

/// Why a confined open failed, where the bare errno would not tell the user what to do.
///
/// It reaches callers inside an [`io::Error`] (see [`ConfineError::into_io`]), so that every
/// open keeps one error type; [`crate::Error::io`] keeps its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfineError {
    /// `openat2` answered `EAGAIN` [`OPENAT2_ATTEMPTS`] times in a row.
    #[error(
        "the path kept changing while it was looked up: openat2 returned EAGAIN {attempts} times \
         in a row, as it does while renames or mounts elsewhere on the system race with a \
         lookup through '..'; try again"
    )]
    KeptChanging {
        /// How many times it was tried.
        attempts: u32,
    },
    /// `openat2` does not exist here (`ENOSYS`).
    #[error(
        "the kernel does not provide openat2 (ENOSYS): cstor-helper confines every open with it \
         and needs Linux 5.6 or later (and no seccomp filter that hides openat2)"
    )]
    KernelTooOld,
}

impl ConfineError {
    /// The errno the kernel answered with.
    pub fn errno(self) -> i32 {
        match self {
            Self::KeptChanging { .. } => rustix::io::Errno::AGAIN.raw_os_error(),
            Self::KernelTooOld => rustix::io::Errno::NOSYS.raw_os_error(),
        }
    }

    /// Wraps the error in an [`io::Error`] of the matching kind: a path that kept changing is
    /// [`io::ErrorKind::WouldBlock`] (trying again later may work), a missing `openat2`
    /// [`io::ErrorKind::Unsupported`].
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            Self::KeptChanging { .. } => io::ErrorKind::WouldBlock,
            Self::KernelTooOld => io::ErrorKind::Unsupported,
        };
        io::Error::new(kind, self)
    }
}

/// Opens `rel` beneath `dir` with `flags` (plus `O_CLOEXEC`).
///
/// Fails with the OS error (`ENOENT`, `ENOTDIR`, `ELOOP`...) as an [`io::Error`]; `EXDEV`
/// means the path tried to escape `dir`. A [`ConfineError`] inside the [`io::Error`] says
/// that the path kept changing during the lookup, or that the kernel has no `openat2`.
pub fn openat_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    retry_openat2(|| rustix::fs::openat2(dir, rel, flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE))
}

/// Calls `attempt`, one `openat2`, again while a signal interrupts it, and at most
/// [`OPENAT2_ATTEMPTS`] times in all while it answers `EAGAIN`; turns `ENOSYS` into
/// [`ConfineError::KernelTooOld`].
fn retry_openat2<T>(mut attempt: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    let mut again = 0;
    loop {
        match attempt() {
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                again += 1;
                if again >= OPENAT2_ATTEMPTS {
                    return Err(ConfineError::KeptChanging { attempts: again }.into_io());
                }
            }
            Err(rustix::io::Errno::NOSYS) => return Err(ConfineError::KernelTooOld.into_io()),
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Whether `rel` names something beneath `dir`, a symlink as the last component counting
/// as itself (as `lstat` sees it). A name that cannot be looked up beneath `dir`, for any
/// reason (absent, escaping `dir`, a file where a directory should be), counts as absent.
pub fn exists(dir: BorrowedFd<'_>, rel: &Path) -> bool {
    // O_PATH opens without reading anything, and with O_NOFOLLOW a final symlink itself.
    openat_beneath(dir, rel, OFlags::PATH | OFlags::NOFOLLOW).is_ok()
}

/// Opens directory `rel` beneath `dir`.
pub fn open_dir(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    openat_beneath(dir, rel, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// Opens regular file `rel` beneath `dir` for reading; a symlink as the last component is
/// refused (`ELOOP`) and so is anything that is not a regular file (`EINVAL`).
pub fn open_regular(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<File> {
    let (fd, _) = open_regular_sized(dir, rel)?;
    // Clients read the fd with ordinary blocking semantics.
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    Ok(fd)
}

/// Set once the kernel refused `O_NOATIME` (the file's owner is not ours to act for).
static NOATIME_REFUSED: AtomicBool = AtomicBool::new(false);

/// Like [`open_regular`], also returning the size, and leaving `O_NONBLOCK` set (it has no
/// effect on regular files; layer streaming saves the extra `fcntl` per file).
///
/// Opened with `O_NOATIME` where the kernel allows it (root, or the files' owner in a user
/// namespace): reading a layer then writes nothing to podman's storage, not even access
/// times, and every read through the fd (the client's too) skips the atime check. Where it
/// is refused (`EPERM`), files are opened without it from then on.
pub fn open_regular_sized(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<(File, u64)> {
    // O_NONBLOCK: opening a FIFO planted under a file's name must not hang the helper.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK;
    let fd = if NOATIME_REFUSED.load(Ordering::Relaxed) {
        openat_beneath(dir, rel, flags)?
    } else {
        match openat_beneath(dir, rel, flags | OFlags::NOATIME) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                NOATIME_REFUSED.store(true, Ordering::Relaxed);
                openat_beneath(dir, rel, flags)?
            }
            other => other?,
        }
    };
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((File::from(fd), st.st_size as u64))
}

/// Reads a whole small file beneath `dir`, refusing files larger than `max`.
pub fn read_small(dir: BorrowedFd<'_>, rel: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_regular(dir, rel)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than the {max} accepted"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file grew past the {max} bytes accepted"),
        ));
    }
    Ok(buf)
}

/// Turns a tar entry name into a relative path usable with [`openat_beneath`].
///
/// Leading `/` and `./` are dropped and `.` components removed, like c/storage does before
/// extracting. Names with a `..` component or a NUL byte are refused with
/// [`ErrorCode::PathEscape`]; a name that cleans to nothing is returned as `None` (it names the
/// layer root).
///
/// ```
/// use cstor_helper::confine::clean_entry_name;
/// assert_eq!(clean_entry_name(b"./etc/hosts").unwrap().unwrap(), std::path::Path::new("etc/hosts"));
/// assert_eq!(clean_entry_name(b"//usr/./bin/").unwrap().unwrap(), std::path::Path::new("usr/bin"));
/// assert!(clean_entry_name(b"./").unwrap().is_none());
/// assert!(clean_entry_name(b"a/../../etc/shadow").is_err());
/// ```
pub fn clean_entry_name(raw: &[u8]) -> Result<Option<std::path::PathBuf>> {
    if raw.contains(&0) {
        return Err(
            Error::new(ErrorCode::PathEscape, "entry name contains a NUL byte")
                .path(String::from_utf8_lossy(raw)),
        );
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(
                    Error::new(ErrorCode::PathEscape, "entry name has a '..' component")
                        .path(String::from_utf8_lossy(raw)),
                );
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(OsStr::from_bytes(&out).into()))
}

/// A directory opened as a confinement root, remembered with its path for messages.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: std::path::PathBuf,
}

impl Root {
    /// Opens `path` (absolute, as configured) as a root.
    ///
    /// Also checks that confined opens work beneath it, so that a kernel without
    /// `openat2` is reported here, once, as [`ConfineError::KernelTooOld`].
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        openat_beneath(fd.as_fd(), Path::new("."), OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// The configured path (for messages and `Initialize`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn clean_names() {
        let c = |s: &[u8]| clean_entry_name(s).map(|p| p.map(|p| p.into_os_string()));
        assert_eq!(c(b"etc/").unwrap().unwrap(), "etc");
        assert_eq!(c(b"/abs/x").unwrap().unwrap(), "abs/x");
        assert_eq!(c(b"././a//b/.").unwrap().unwrap(), "a/b");
        assert_eq!(c(b"a..b/..c").unwrap().unwrap(), "a..b/..c");
        assert!(c(b"..").is_err());
        assert!(c(b"a/..").is_err());
        assert!(c(b"a\0b").is_err());
        assert!(c(b"").unwrap().is_none());
        assert_eq!(
            c(&[b'x', 0xff, 0xfe]).unwrap().unwrap().as_bytes(),
            &[b'x', 0xff, 0xfe]
        );
    }

    #[test]
    fn symlink_escapes_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/ok"), b"ok").unwrap();
        symlink(outside.path(), d.path().join("abs")).unwrap();
        symlink("../..", d.path().join("sub/up")).unwrap();
        symlink("ok", d.path().join("sub/rel")).unwrap();
        symlink("sub", d.path().join("subdir-link")).unwrap();
        let root = Root::open(d.path()).unwrap();
        assert!(open_regular(root.fd(), Path::new("sub/ok")).is_ok());
        // A relative symlink to a directory inside the root may be traversed.
        assert!(open_regular(root.fd(), Path::new("subdir-link/ok")).is_ok());
        let exdev = |p: &str| {
            open_regular(root.fd(), Path::new(p))
                .unwrap_err()
                .raw_os_error()
        };
        assert_eq!(exdev("abs/secret"), Some(18));
        assert_eq!(exdev("sub/up/etc/passwd"), Some(18));
        assert_eq!(exdev("/etc/passwd"), Some(18));
        assert_eq!(exdev("../x"), Some(18));
        // Last-component symlinks are not followed.
        assert_eq!(exdev("sub/rel"), Some(40));
        // Existence is decided beneath the root too: a name that escapes it is absent.
        assert!(exists(root.fd(), Path::new("sub/ok")));
        assert!(exists(root.fd(), Path::new("sub/rel")));
        assert!(exists(root.fd(), Path::new("subdir-link/ok")));
        assert!(!exists(root.fd(), Path::new("abs/secret")));
        assert!(!exists(root.fd(), Path::new("sub/up/etc/passwd")));
        assert!(!exists(root.fd(), Path::new("sub/none")));
    }

    #[test]
    fn fifos_and_dirs_are_not_regular_files() {
        let d = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let root = Root::open(d.path()).unwrap();
        let e = open_regular(root.fd(), Path::new("fifo")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(open_regular(root.fd(), Path::new(".")).is_err());
    }

    #[test]
    fn eagain_is_retried_a_few_times_then_reported() {
        let mut calls = 0;
        let e = retry_openat2::<()>(|| {
            calls += 1;
            Err(rustix::io::Errno::AGAIN)
        })
        .unwrap_err();
        assert_eq!(calls, OPENAT2_ATTEMPTS);
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<ConfineError>());
        assert_eq!(
            inner,
            Some(&ConfineError::KeptChanging {
                attempts: OPENAT2_ATTEMPTS
            })
        );
        assert!(e.to_string().contains("kept changing"), "{e}");
        let wrapped = crate::Error::io("opening a layer file", e);
        assert_eq!(
            wrapped.errno(),
            Some(rustix::io::Errno::AGAIN.raw_os_error())
        );

        // A lookup that succeeds on a later try is not an error, and signals do not count.
        let mut answers = [
            Err(rustix::io::Errno::AGAIN),
            Err(rustix::io::Errno::INTR),
            Err(rustix::io::Errno::AGAIN),
            Ok(7),
        ]
        .into_iter();
        assert_eq!(retry_openat2(|| answers.next().unwrap()).unwrap(), 7);
        let mut answers = (1..OPENAT2_ATTEMPTS)
            .map(|_| Err(rustix::io::Errno::AGAIN))
            .chain(std::iter::repeat_n(Err(rustix::io::Errno::INTR), 20))
            .chain([Ok(())]);
        assert!(retry_openat2(|| answers.next().unwrap()).is_ok());
    }

    #[test]
    fn missing_openat2_says_the_kernel_is_too_old() {
        let e = retry_openat2::<()>(|| Err(rustix::io::Errno::NOSYS)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("Linux 5.6 or later"), "{e}");
        let wrapped = crate::Error::io("opening the graph root", e);
        assert_eq!(
            wrapped.errno(),
            Some(rustix::io::Errno::NOSYS.raw_os_error())
        );
        // Other errors pass through as they are.
        let e = retry_openat2::<()>(|| Err(rustix::io::Errno::NOENT)).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::NOENT.raw_os_error())
        );
    }

    #[test]
    fn read_small_limits_size() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), vec![1u8; 100]).unwrap();
        let root = Root::open(d.path()).unwrap();
        assert_eq!(
            read_small(root.fd(), Path::new("f"), 100).unwrap().len(),
            100
        );
        assert!(read_small(root.fd(), Path::new("f"), 99).is_err());
    }
}
