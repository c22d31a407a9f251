//! Filling an object's tmpfile from the layer file: FICLONE where the policy and the
//! filesystem allow, else a copy inside the kernel (`copy_file_range`), else through a
//! buffer for filesystem pairs that refuse even that.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use super::policy::CopyPolicy;
use super::worker_state::WorkerState;
use crate::error::{Error, Result};

/// Fills `tmp` from `src`: FICLONE where allowed and possible, else a kernel copy.
/// Returns whether it reflinked, or `None` (nothing written) when the filesystem has no
/// reflinks and the policy prefers a hardlink.
pub(super) fn clone_or_copy(
    src: &File,
    tmp: &File,
    size: u64,
    name: &str,
    policy: CopyPolicy,
    state: &WorkerState,
) -> Result<Option<bool>> {
    let try_reflink = policy != CopyPolicy::CopyOnly && !state.reflinks_unsupported();
    if try_reflink {
        match rustix::fs::ioctl_ficlone(tmp, src.as_fd()) {
            Ok(()) => return Ok(Some(true)),
            Err(e) => {
                let why = match e {
                    rustix::io::Errno::XDEV => {
                        "the repository and the storage are on different filesystems (EXDEV)".into()
                    }
                    rustix::io::Errno::OPNOTSUPP => {
                        "the filesystem does not support reflinks (EOPNOTSUPP)".into()
                    }
                    other => format!("FICLONE failed: {other}"),
                };
                if matches!(e, rustix::io::Errno::XDEV | rustix::io::Errno::OPNOTSUPP) {
                    state.set_reflinks_unsupported();
                    if policy == CopyPolicy::ReflinkOrHardlink {
                        return Ok(None);
                    }
                }
                if policy == CopyPolicy::ReflinkOnly {
                    return Err(Error::ReflinkRequired {
                        file: name.to_owned(),
                        reason: why,
                    });
                }
                state.note(format!("{name}: {why}"));
            }
        }
    } else if policy == CopyPolicy::ReflinkOnly {
        return Err(Error::ReflinkRequired {
            file: name.to_owned(),
            reason: state
                .first_fallback()
                .unwrap_or_else(|| "reflinks are not supported here".into()),
        });
    } else if policy == CopyPolicy::ReflinkOrHardlink {
        // Another worker found out that reflinks are unsupported after this one checked:
        // link, as the files after it will be, rather than copy this one file.
        return Ok(None);
    }
    copy(src, tmp, size, name, state.stop())?;
    Ok(Some(false))
}

/// Copies the `size` bytes of `src` (entry `name`) to `dst`; stops between chunks once
/// `stop` is set ([`Error::Cancelled`]).
pub(super) fn copy(src: &File, dst: &File, size: u64, name: &str, stop: &AtomicBool) -> Result<()> {
    copy_range(src, dst, size, stop).map_err(|e| {
        if stop.load(Relaxed) {
            return Error::Cancelled;
        }
        Error::io(format!("copying {name}"), e)
    })
}

/// Copies `size` bytes of `src` (from offset 0) to `dst` inside the kernel, a chunk at a
/// time until `stop` is set.
fn copy_range(src: &File, dst: &File, size: u64, stop: &AtomicBool) -> std::io::Result<()> {
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    while off_in < size {
        if stop.load(Relaxed) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let want = usize::try_from(size - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("source ended after {off_in} of {size} bytes"),
                ));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            // Some filesystem pairs refuse copy_file_range; fall back to pread/write.
            Err(
                rustix::io::Errno::XDEV | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL,
            ) if off_in == 0 => {
                return copy_userspace(src, dst, size, stop);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_userspace(src: &File, dst: &File, size: u64, stop: &AtomicBool) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        if stop.load(Relaxed) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let want = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("source ended after {off} of {size} bytes"),
            ));
        }
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::test_files::source;

    /// Once a worker has found that reflinks are unsupported, a file already past that
    /// check in another worker is linked, not copied, under the hardlink policy; under the
    /// default policy it is copied.
    #[test]
    fn a_file_that_missed_the_news_of_no_reflinks_is_linked_under_the_hardlink_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let src = source(tmp.path(), "plain", b"some bytes", 0o644);
        let state = WorkerState::default();
        state.set_reflinks_unsupported();
        let dst = tempfile::tempfile_in(tmp.path()).unwrap();
        let linked = clone_or_copy(
            &src,
            &dst,
            10,
            "plain",
            CopyPolicy::ReflinkOrHardlink,
            &state,
        );
        assert_eq!(linked.unwrap(), None);
        assert_eq!(dst.metadata().unwrap().len(), 0, "nothing copied");
        let copied = clone_or_copy(&src, &dst, 10, "plain", CopyPolicy::ReflinkOrCopy, &state);
        assert_eq!(copied.unwrap(), Some(false));
        assert_eq!(
            std::fs::read(tmp.path().join("plain")).unwrap(),
            b"some bytes"
        );
        assert_eq!(dst.metadata().unwrap().len(), 10);
    }
}
