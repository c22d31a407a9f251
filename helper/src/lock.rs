//! Read locks on containers-storage lock files, interoperable with c/storage.
//!
//! c/storage guards `layers.json`, tar-split files and layer directories with POSIX record
//! locks (`fcntl(F_SETLKW)`) on `overlay-layers/layers.lock`, and image metadata with
//! `overlay-images/images.lock`. `flock(2)` locks do not conflict with those, so they would
//! not keep `podman rmi` out. We take open-file-description locks (`F_OFD_SETLK`, whole file,
//! `F_RDLCK`): they conflict with c/storage's classic locks, and unlike classic locks they
//! are not dropped when another fd of the same file is closed elsewhere in this process.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use cstor_protocol::ErrorCode;
use nix::fcntl::{FcntlArg, fcntl};
use rustix::fs::OFlags;

use crate::confine;
use crate::error::{Error, Result};

/// A held shared lock; released when dropped.
#[derive(Debug)]
pub struct ReadLock {
    fd: OwnedFd,
    what: String,
}

impl ReadLock {
    /// Takes a shared lock on lock file `rel` beneath `dir`, waiting up to `timeout` for a
    /// writer to finish.
    ///
    /// Returns `Ok(None)` when the lock file does not exist: a store that was never written
    /// has nothing to protect, and a read-only helper must not create files. Fails with
    /// [`ErrorCode::LockTimeout`] (retryable) when the timeout passes, or
    /// [`ErrorCode::Io`] when the file cannot be opened or locked.
    pub fn acquire(
        dir: std::os::fd::BorrowedFd<'_>,
        rel: &Path,
        what: &str,
        timeout: Duration,
    ) -> Result<Option<Self>> {
        // Read locks only need a read-only fd; c/storage opens read-only stores' lock files
        // O_RDONLY too.
        let fd = match confine::openat_beneath(dir, rel, OFlags::RDONLY | OFlags::NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening lock file {what}"), e)),
        };
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            match set_lock(&fd, libc_rdlck()) {
                Ok(()) => {
                    tracing::trace!(lock = what, "read lock taken");
                    return Ok(Some(Self {
                        fd,
                        what: what.to_owned(),
                    }));
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::new(
                            ErrorCode::LockTimeout,
                            format!(
                                "{what} stayed locked for writing for more than {:?}; \
                                 another podman/buildah command is changing the storage",
                                timeout
                            ),
                        ));
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("locking {what}"),
                        std::io::Error::from_raw_os_error(e as i32),
                    ));
                }
            }
        }
    }

    /// What this lock protects (for logs).
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Reads the lock file's last-writer token (up to 64 bytes; empty if never written).
    /// It changes whenever c/storage writes the store it protects.
    pub fn token(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 64];
        let n = rustix::io::pread(&self.fd, &mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    }
}

impl Drop for ReadLock {
    fn drop(&mut self) {
        // Closing the only fd of the open file description releases the lock anyway; the
        // explicit unlock makes the release visible in strace and independent of dup()s.
        if let Err(e) = set_lock(&self.fd, libc_unlck()) {
            tracing::warn!(lock = %self.what, "unlocking failed: {e}");
        }
        tracing::trace!(lock = %self.what, "read lock released");
    }
}

fn libc_rdlck() -> i16 {
    nix::libc::F_RDLCK as i16
}

fn libc_unlck() -> i16 {
    nix::libc::F_UNLCK as i16
}

fn set_lock(fd: &OwnedFd, kind: i16) -> nix::Result<()> {
    let fl = nix::libc::flock {
        l_type: kind,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    fcntl(fd.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::Root;

    /// Takes a classic POSIX write lock the way c/storage does, in a child process (record
    /// locks of the same process never conflict with each other's classic locks).
    fn with_foreign_write_lock(path: &Path, f: impl FnOnce()) {
        use std::io::{BufRead, BufReader};
        let script = "import fcntl,sys,time\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('locked',flush=True)\nsys.stdin.read()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        f();
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    #[test]
    fn conflicts_with_classic_posix_write_locks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("layers.lock"), b"").unwrap();
        let root = Root::open(d.path()).unwrap();
        with_foreign_write_lock(&d.path().join("layers.lock"), || {
            let e = ReadLock::acquire(
                root.fd(),
                Path::new("layers.lock"),
                "layers.lock",
                Duration::from_millis(200),
            )
            .unwrap_err();
            assert_eq!(e.code(), ErrorCode::LockTimeout);
        });
        let l = ReadLock::acquire(
            root.fd(),
            Path::new("layers.lock"),
            "layers.lock",
            Duration::from_millis(200),
        )
        .unwrap()
        .unwrap();
        assert_eq!(l.token().unwrap(), b"");
    }

    #[test]
    fn keeps_classic_posix_writers_out() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("layers.lock");
        std::fs::write(&path, b"").unwrap();
        let root = Root::open(d.path()).unwrap();
        let try_write = || {
            let script = "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n  fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n  print('got')\nexcept OSError:\n  print('busy')\n";
            let out = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(&path)
                .output()
                .expect("python3 is needed for this test");
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let lock = ReadLock::acquire(
            root.fd(),
            Path::new("layers.lock"),
            "layers.lock",
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(try_write(), "busy");
        drop(lock);
        assert_eq!(try_write(), "got");
    }

    #[test]
    fn shared_locks_coexist_and_missing_files_are_none() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("l"), b"tok").unwrap();
        let root = Root::open(d.path()).unwrap();
        let t = Duration::from_millis(100);
        let a = ReadLock::acquire(root.fd(), Path::new("l"), "l", t).unwrap();
        let b = ReadLock::acquire(root.fd(), Path::new("l"), "l", t).unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(a.unwrap().token().unwrap(), b"tok");
        assert!(
            ReadLock::acquire(root.fd(), Path::new("none"), "none", t)
                .unwrap()
                .is_none()
        );
    }
}
