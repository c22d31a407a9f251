//! An object file's way into the repository: it starts as an `O_TMPFILE` in an
//! `objects/XX` directory, is filled, and gets its name, `objects/XX/<rest of the digest>`,
//! from `linkat` once its digest is known; an object already there wins.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

use super::worker_state::{LinkByFd, WorkerState};
use crate::error::{Error, Result};

/// `XX/rest-in-hex`, an object's path under `objects/` (composefs' `to_object_pathname`,
/// without its per-character iterator: this runs several times per object).
pub(super) fn object_path<ObjectID: FsVerityHashValue>(id: &ObjectID) -> String {
    let bytes = id.as_bytes();
    let mut out = vec![0u8; 2 * bytes.len() + 1];
    let (dir, rest) = out.split_at_mut(2);
    // Lengths match by construction: 2 hex digits per byte.
    let _ = hex::encode_to_slice(&bytes[..1], dir);
    rest[0] = b'/';
    let _ = hex::encode_to_slice(&bytes[1..], &mut rest[1..]);
    String::from_utf8(out).unwrap_or_default()
}

/// `XX`, the directory of an object under `objects/`.
pub(super) fn object_dir<ObjectID: FsVerityHashValue>(id: &ObjectID) -> String {
    hex::encode(&id.as_bytes()[..1])
}

/// An `O_TMPFILE` in `objects/<dir>` (created if missing): the worker's own directory
/// (see `placement`) or the one that will hold the object.
///
/// Not in `objects/` itself: XFS allocates a file's inode in the allocation group of its
/// directory and takes that group's AGI lock to create a tmpfile and again to link it, so
/// with every tmpfile in `objects/` all object workers would queue on one lock.
pub(super) fn object_tmpfile(objects: &OwnedFd, dir: &str) -> Result<File> {
    let open = || {
        rustix::fs::openat(
            objects,
            dir,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
    };
    let fd = match open() {
        Err(rustix::io::Errno::NOENT) => {
            match rustix::fs::mkdirat(objects, dir, rustix::fs::Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => open(),
                Err(e) => Err(e),
            }
        }
        r => r,
    }
    .map_err(|e| {
        Error::io(
            format!("creating an object tmpfile in objects/{dir}"),
            e.into(),
        )
    })?;
    Ok(File::from(fd))
}

/// Gives a finished tmpfile its name in the object store, `id`; an existing object wins.
/// Returns whether the object is new.
///
/// `linkat(tmp, "", AT_EMPTY_PATH)` where the kernel allows it, else through
/// /proc/self/fd as composefs does for its own tmpfiles.
///
/// `foreign` says the file was opened by another process (the helper): AT_EMPTY_PATH then
/// needs CAP_DAC_READ_SEARCH (root has it; it saves the /proc lookup, a sixth of
/// `linkat`'s cost) where the /proc route needs only the `fs.protected_hardlinks` rules, so
/// whether it works is learnt apart from this process's own tmpfiles.
pub(super) fn link_object<ObjectID: FsVerityHashValue>(
    objects: &OwnedFd,
    tmp: &File,
    id: &ObjectID,
    state: &WorkerState,
    foreign: bool,
) -> Result<bool> {
    let rel = object_path(id);
    let mut made_dir = false;
    loop {
        let how = state.link_by_fd(foreign);
        let r = if how != LinkByFd::Refused {
            let r = rustix::fs::linkat(tmp, "", objects, &rel, rustix::fs::AtFlags::EMPTY_PATH);
            match r {
                // Refused for lack of privilege (ENOENT is what older kernels say).
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM)
                    if how == LinkByFd::Untried =>
                {
                    // Tell "not allowed" from "no objects/XX directory yet".
                    match rustix::fs::statat(objects, object_dir(id), rustix::fs::AtFlags::empty())
                    {
                        Ok(_) => {
                            state.set_link_by_fd(foreign, false);
                            continue;
                        }
                        Err(_) => r,
                    }
                }
                Ok(()) => {
                    state.set_link_by_fd(foreign, true);
                    r
                }
                other => other,
            }
        } else {
            let proc = format!("/proc/self/fd/{}", tmp.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                &proc,
                objects,
                &rel,
                rustix::fs::AtFlags::SYMLINK_FOLLOW,
            )
        };
        match r {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::EXIST) => return Ok(false),
            Err(rustix::io::Errno::NOENT) if !made_dir => {
                made_dir = true;
                match rustix::fs::mkdirat(
                    objects,
                    object_dir(id),
                    rustix::fs::Mode::from_raw_mode(0o755),
                ) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => {
                        return Err(Error::io(
                            format!("creating objects/{}", object_dir(id)),
                            e.into(),
                        ));
                    }
                }
            }
            Err(e) => return Err(Error::io(format!("linking objects/{rel}"), e.into())),
        }
    }
}

/// Names `tmp`, a finished tmpfile of `repo` whose bytes have the fs-verity digest `id`, as
/// that object, the way the workers name theirs in an insecure repository (no fs-verity to
/// enable, so nothing for the kernel to measure). Returns whether the object is new; an
/// existing one wins.
pub(crate) fn link_tmpfile<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    tmp: &File,
    id: &ObjectID,
) -> Result<bool> {
    let objects = repo
        .objects_dir()
        .map_err(|e| Error::io("opening the objects directory", e.into()))?;
    link_object(objects, tmp, id, &WorkerState::default(), false)
}

#[cfg(test)]
mod tests {
    use composefs::fsverity::Sha512HashValue;

    use super::*;

    #[test]
    fn object_paths_are_composefs_paths() {
        let id = Sha512HashValue::from_hex("0123456789abcdef".repeat(8)).unwrap();
        assert_eq!(object_path(&id), id.to_object_pathname());
        assert_eq!(object_dir(&id), id.to_object_dir());
    }
}
