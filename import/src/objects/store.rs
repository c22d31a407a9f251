//! Storing one layer file as an object: skip it if the repository has it, else reflink,
//! copy or hardlink it as the policy allows, check what was made, and name it.

use std::fs::File;
use std::os::fd::OwnedFd;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::{ObjectStoreMethod, Repository};

use super::naming::{link_object, object_dir, object_path, object_tmpfile};
use super::policy::{CopyPolicy, Stored};
use super::reflink_or_copy::{clone_or_copy, copy};
use super::source::Source;
use super::worker_state::WorkerState;
use crate::error::{Error, Result};

/// Stores `source` (checked against its tar-split length and CRC-64) as an object, by
/// reflink, copy or hardlink as `policy` allows.
///
/// The source is read once, from podman's (warm) page cache, to check its CRC and compute
/// its fs-verity digest. In an insecure repository (no fs-verity) the object is then named
/// from that digest and linked like composefs links its own tmpfiles, so composefs never
/// re-reads the clone, whose page cache is empty (reading it would go to disk). With
/// fs-verity, the kernel measures the object and composefs links it; both digests must
/// agree. The bytes hashed are the bytes cloned: layer files do not change while the helper
/// holds the storage's read lock, and the clone's length is checked.
///
/// Without [`Source::data`] the file is read here, into `buf`, scratch space reused across
/// calls (zeroing a fresh megabyte per file would cost more than hashing most files).
///
/// Fails with [`Error::ReflinkRequired`] when the policy demands a reflink the filesystem
/// cannot make, the helper's `Assemble` error for a CRC or size mismatch,
/// [`Error::ContentChanged`] when the file changed while it was stored, or
/// [`Error::Repository`] / [`Error::Io`] for repository and I/O failures.
pub fn store<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    source: &Source<'_>,
    policy: CopyPolicy,
    state: &WorkerState,
    tmp_dir: Option<&str>,
    buf: &mut [u8],
) -> Result<(ObjectID, Stored)> {
    let id: ObjectID = source.digest(buf, state.stop())?;
    store_as(repo, id, source, policy, state, tmp_dir)
}

/// [`store`] for a source already checked and digested (as `id`).
pub(crate) fn store_as<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    id: ObjectID,
    source: &Source<'_>,
    policy: CopyPolicy,
    state: &WorkerState,
    tmp_dir: Option<&str>,
) -> Result<(ObjectID, Stored)> {
    let Source {
        file: src,
        size,
        name,
        ..
    } = *source;
    let objects_dir = repo
        .objects_dir()
        .map_err(|e| Error::io("opening the objects directory", e.into()))?;
    // Objects seen before cost a set lookup and a stat (duplicates within the image) or a
    // stat (in the repository already) instead of a tmpfile, a clone and an inode to free
    // again.
    if seen_and_stored(objects_dir, &id, state) {
        return Ok((id, Stored::AlreadyPresent));
    }
    if state.probe() {
        let present = rustix::fs::statat(
            objects_dir,
            object_path(&id),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok();
        state.found(present);
        if present {
            state.set_present(id.as_bytes());
            return Ok((id, Stored::AlreadyPresent));
        }
    }
    // In an insecure repository we name and link the object ourselves (see above); there
    // an existing object simply makes linkat fail with EEXIST.
    let objects = repo.is_insecure().then_some(objects_dir);
    let mut policy = policy;
    if policy == CopyPolicy::ReflinkOrHardlink && state.reflinks_unsupported() {
        // Not linkable (None): copied below, and the report says why.
        if let Some(how) = hardlink(objects, src, &id, name, state)? {
            return Ok((id, how));
        }
        // No reflinks, no link: nothing left to try but a copy.
        policy = CopyPolicy::CopyOnly;
    }
    // With fs-verity too: composefs' finalize_object_tmpfile takes a tmpfile from anywhere
    // in the repository's filesystem.
    let tmp = match tmp_dir {
        Some(dir) => object_tmpfile(objects_dir, dir)?,
        None => object_tmpfile(objects_dir, &object_dir(&id))?,
    };
    let reflinked = match clone_or_copy(src, &tmp, size, name, policy, state)? {
        Some(reflinked) => reflinked,
        None => {
            if let Some(how) = hardlink(objects, src, &id, name, state)? {
                return Ok((id, how));
            }
            copy(src, &tmp, size, name, state.stop())?;
            false
        }
    };
    let len = tmp
        .metadata()
        .map_err(|e| Error::io(format!("stat of the object for {name}"), e))?
        .len();
    source.check_object_len(len)?;
    let how = if reflinked {
        Stored::Reflinked
    } else {
        Stored::Copied
    };
    match objects {
        Some(objects) => {
            let new = link_object(objects, &tmp, &id, state, false)?;
            if !new {
                state.found(true);
            }
            state.set_present(id.as_bytes());
            Ok((id, if new { how } else { Stored::AlreadyPresent }))
        }
        None => {
            let (measured, method) = repo.finalize_object_tmpfile(tmp, size).map_err(|cause| {
                Error::repository(format!("storing the object for {name}"), cause)
            })?;
            source.check_measured(&measured, &id)?;
            state.set_present(id.as_bytes());
            if method == ObjectStoreMethod::AlreadyPresent {
                state.found(true);
            }
            Ok((
                id,
                match method {
                    ObjectStoreMethod::AlreadyPresent => Stored::AlreadyPresent,
                    _ => how,
                },
            ))
        }
    }
}

/// Whether this import stored or found `id` already. The workers' set holds id prefixes
/// only, so a hit is confirmed by the object's name: two ids sharing a prefix (a layer can
/// be made so) must not make the second object look stored.
fn seen_and_stored<ObjectID: FsVerityHashValue>(
    objects: &OwnedFd,
    id: &ObjectID,
    state: &WorkerState,
) -> bool {
    state.maybe_present(id.as_bytes())
        && rustix::fs::statat(
            objects,
            object_path(id),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok()
}

/// A new, empty `O_TMPFILE` of `repo` in `objects/<dir>`, for a content the importer
/// produces itself (an inflated archive-mode file) and names with [`store_filled`].
pub(crate) fn object_tmpfile_in<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    dir: &str,
) -> Result<File> {
    let objects = repo
        .objects_dir()
        .map_err(|e| Error::io("opening the objects directory", e.into()))?;
    object_tmpfile(objects, dir)
}

/// Names `tmp`, a tmpfile from [`object_tmpfile_in`] holding `size` bytes whose object id,
/// computed as they were written, is `id`, as that object. The bytes are the importer's
/// own copy, so the object counts as copied (or already present: an existing object wins).
///
/// In an insecure repository the tmpfile is linked under `id` directly, as [`store_as`]
/// does, rather than read back by composefs; with fs-verity the kernel's measurement must
/// equal `id` ([`Error::ContentChanged`] naming `name` otherwise).
pub(crate) fn store_filled<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    id: ObjectID,
    tmp: File,
    size: u64,
    name: &str,
    state: &WorkerState,
) -> Result<(ObjectID, Stored)> {
    let objects = repo
        .objects_dir()
        .map_err(|e| Error::io("opening the objects directory", e.into()))?;
    if seen_and_stored(objects, &id, state) {
        return Ok((id, Stored::AlreadyPresent));
    }
    let new = if repo.is_insecure() {
        link_object(objects, &tmp, &id, state, false)?
    } else {
        let (measured, method) = repo
            .finalize_object_tmpfile(tmp, size)
            .map_err(|cause| Error::repository(format!("storing the object for {name}"), cause))?;
        if measured != id {
            return Err(Error::ContentChanged {
                file: name.to_owned(),
                detail: format!(
                    "fs-verity measured {} but the content written has {}",
                    measured.to_hex(),
                    id.to_hex()
                ),
            });
        }
        method != ObjectStoreMethod::AlreadyPresent
    };
    state.set_present(id.as_bytes());
    Ok((
        id,
        if new {
            Stored::Copied
        } else {
            Stored::AlreadyPresent
        },
    ))
}

/// Hardlinks the layer file `src` into the object store as `id`, if it may be linked: in an
/// insecure repository, not setuid/setgid, not writable by group or others. Says how the
/// object got there (hardlinked, or already present), or `None` when the file must be
/// copied instead (the first reason is noted for the report).
fn hardlink<ObjectID: FsVerityHashValue>(
    objects: Option<&OwnedFd>,
    src: &File,
    id: &ObjectID,
    name: &str,
    state: &WorkerState,
) -> Result<Option<Stored>> {
    let Some(objects) = objects else {
        state.note(format!(
            "{name}: not hardlinked: the repository uses fs-verity, which would have to be \
             enabled on podman's own file"
        ));
        return Ok(None);
    };
    let mode = rustix::fs::fstat(src)
        .map_err(|e| Error::io(format!("stat of {name}"), e.into()))?
        .st_mode;
    if mode & 0o6022 != 0 {
        state.note(format!(
            "{name}: not hardlinked: mode {:o} (setuid/setgid or writable by others)",
            mode & 0o7777
        ));
        return Ok(None);
    }
    match link_object(objects, src, id, state, true) {
        Ok(new) => {
            state.set_present(id.as_bytes());
            Ok(Some(if new {
                Stored::Hardlinked
            } else {
                Stored::AlreadyPresent
            }))
        }
        Err(Error::Io { cause, .. })
            if [rustix::io::Errno::PERM, rustix::io::Errno::XDEV]
                .iter()
                .any(|e| cause.raw_os_error() == Some(e.raw_os_error())) =>
        {
            state.note(format!("{name}: not hardlinked: {cause}"));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
    use cstor_protocol::assemble::CRC64;
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;
    use crate::objects::source::Expected;
    use crate::objects::test_files::{insecure_repo, source};

    /// With reflinks known to be unavailable, the hardlink policy links plain files and
    /// copies what must not become reachable through the object store.
    #[test]
    fn hardlink_policy_links_plain_files_and_copies_setuid_ones() {
        if !rustix::process::geteuid().is_root() {
            let why = "hardlinking another's file needs root (fs.protected_hardlinks)";
            // CI sets CSTOR_TEST_NO_SKIP: there a skip would hide a missing test.
            assert!(std::env::var_os("CSTOR_TEST_NO_SKIP").is_none(), "{why}");
            eprintln!("SKIP hardlink_policy_links_plain_files_and_copies_setuid_ones: {why}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let repo = insecure_repo(&tmp.path().join("repo"));
        let state = WorkerState::default();
        state.set_reflinks_unsupported();
        let mut buf = vec![0u8; 1 << 16];
        let mut store_file = |name: &str, content: &[u8], mode: u32| {
            let src = source(tmp.path(), name, content, mode);
            let source = Source {
                file: &src,
                data: Some(content),
                size: content.len() as u64,
                expected: &Expected::Crc64(CRC64.checksum(content)),
                name,
                layer: "test-layer",
            };
            let (id, how) = store(
                &repo,
                &source,
                CopyPolicy::ReflinkOrHardlink,
                &state,
                // Copies start as tmpfiles in another directory than their own.
                Some("00"),
                &mut buf,
            )
            .unwrap();
            let object = tmp
                .path()
                .join("repo/objects")
                .join(id.to_object_pathname());
            (how, object, src)
        };

        let (how, object, src) = store_file("plain", &[7u8; 5000], 0o644);
        assert_eq!(how, Stored::Hardlinked);
        assert_eq!(
            std::fs::metadata(&object).unwrap().ino(),
            src.metadata().unwrap().ino()
        );

        for (name, mode) in [("setuid", 0o4755), ("setgid", 0o2755), ("writable", 0o666)] {
            let content = format!("{name} content, long enough to be an object").repeat(10);
            let (how, object, src) = store_file(name, content.as_bytes(), mode);
            assert_eq!(how, Stored::Copied, "{name}");
            let md = std::fs::metadata(&object).unwrap();
            assert_ne!(md.ino(), src.metadata().unwrap().ino(), "{name}");
            assert_eq!(md.mode() & 0o7777, 0o644, "{name}");
            assert_eq!(std::fs::read(&object).unwrap(), content.as_bytes());
        }
        let why = state.first_fallback().unwrap_or_default();
        assert!(
            why.contains("setuid") && why.contains("not hardlinked"),
            "{why}"
        );

        // The same content again is found, not stored twice.
        let (how, _, _) = store_file("again", &[7u8; 5000], 0o644);
        assert_eq!(how, Stored::AlreadyPresent);
    }

    /// The workers remember stored objects by id prefix; a second object whose id shares
    /// the first one's prefix is still stored, not taken for the first.
    #[test]
    fn an_id_sharing_a_stored_ids_prefix_is_stored_too() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = insecure_repo(&tmp.path().join("repo"));
        let state = WorkerState::default();
        let content = [5u8; 3000];
        let src = source(tmp.path(), "first", &content, 0o644);
        let first = Source {
            file: &src,
            data: Some(&content),
            size: content.len() as u64,
            expected: &Expected::Crc64(CRC64.checksum(&content)),
            name: "first",
            layer: "test-layer",
        };
        let (id, how) = store(
            &repo,
            &first,
            CopyPolicy::CopyOnly,
            &state,
            None,
            &mut [0u8; 4096],
        )
        .unwrap();
        assert_eq!(how, Stored::Copied);
        let (_, how) = store_as(
            &repo,
            id.clone(),
            &first,
            CopyPolicy::CopyOnly,
            &state,
            None,
        )
        .unwrap();
        assert_eq!(how, Stored::AlreadyPresent, "the same id is found");

        let mut bytes = id.as_bytes().to_vec();
        *bytes.last_mut().unwrap() ^= 0xff;
        let twin = Sha512HashValue::read_from_bytes(&bytes).unwrap();
        assert!(state.maybe_present(twin.as_bytes()), "the prefix is known");
        let (_, how) = store_as(
            &repo,
            twin.clone(),
            &first,
            CopyPolicy::CopyOnly,
            &state,
            None,
        )
        .unwrap();
        assert_eq!(how, Stored::Copied, "an id sharing the prefix is stored");
        let object = tmp
            .path()
            .join("repo/objects")
            .join(twin.to_object_pathname());
        assert_eq!(std::fs::read(object).unwrap(), content);
    }

    /// Once the import is stopped, a file the worker reads itself (a large one) ends
    /// cancelled instead of being read to its end and stored.
    #[test]
    fn a_stopped_import_stores_no_more() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = insecure_repo(&tmp.path().join("repo"));
        let content = vec![3u8; 3 << 20];
        let src = source(tmp.path(), "large", &content, 0o644);
        let source = Source {
            file: &src,
            data: None,
            size: content.len() as u64,
            expected: &Expected::Crc64(CRC64.checksum(&content)),
            name: "large",
            layer: "test-layer",
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let state = WorkerState::new(stop);
        let e = store(
            &repo,
            &source,
            CopyPolicy::CopyOnly,
            &state,
            None,
            &mut [0u8; 1 << 20],
        )
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e}");
        // Nor is a copy made of a file already read.
        let dst = tempfile::tempfile_in(tmp.path()).unwrap();
        let e = copy(&src, &dst, content.len() as u64, "large", state.stop()).unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e}");
    }

    #[test]
    fn a_wrong_crc_stores_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = insecure_repo(&tmp.path().join("repo"));
        let content = [1u8; 300];
        let src = source(tmp.path(), "f", &content, 0o644);
        let source = Source {
            file: &src,
            data: Some(&content),
            size: 300,
            expected: &Expected::Crc64(CRC64.checksum(&content) ^ 1),
            name: "f",
            layer: "test-layer",
        };
        let e = store(
            &repo,
            &source,
            CopyPolicy::ReflinkOrCopy,
            &WorkerState::default(),
            None,
            &mut [0u8; 4096],
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Helper(cstor_proxy_client::Error::Assemble { .. })),
            "{e}"
        );
        // objects/ appears with the first object.
        let objects: usize = std::fs::read_dir(tmp.path().join("repo/objects"))
            .into_iter()
            .flatten()
            .filter_map(|d| d.ok())
            .filter(|d| d.path().is_dir())
            .map(|d| std::fs::read_dir(d.path()).unwrap().count())
            .sum();
        assert_eq!(objects, 0);
    }
}
