//! Storing file contents as repository objects: reflink (FICLONE) where the filesystem
//! allows, a kernel-side copy otherwise, and a hardlink to the source only when the caller
//! opted into [`CopyPolicy::ReflinkOrHardlink`].
//!
//! The source fd belongs to containers-storage. By default we clone or copy its bytes into
//! an `O_TMPFILE` of the repository and link that under the object's name, so the object
//! never shares an inode (mode, owner, SELinux label, fs-verity state) with the layer file.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::{ObjectStoreMethod, Repository};
use cstor_protocol::assemble::{AssembleError, CRC64, read_content};

use crate::error::{Error, Result};
use crate::job_queue::GroupQueue;

/// How file contents get into the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyPolicy {
    /// Reflink where possible, copy otherwise (and report why in the import report).
    #[default]
    ReflinkOrCopy,
    /// Reflink or fail: for callers that must not duplicate data, or whose security labels
    /// differ between stores so that a silent copy would be wrong.
    ReflinkOnly,
    /// Always copy (e.g. to measure, or to decouple the repository from podman's disk).
    CopyOnly,
    /// Reflink where possible; where not (ext4), **hardlink** the layer file itself into
    /// the repository, and copy only what cannot be linked.
    ///
    /// Zero-copy without reflinks, as upstream composefs does by default as root, but an
    /// explicit opt-in here because the object *is* the layer file: one inode, so its mode,
    /// owner, timestamps, xattrs and SELinux label are podman's, a later change to either
    /// side (chmod, relabel, an in-place write by a misbehaving tool) shows on both, and
    /// disk space stays in use until both the image and the object are gone. Needs a
    /// privileged caller (the kernel's `fs.protected_hardlinks` rule: owner or
    /// CAP_FOWNER) and an insecure repository (enabling fs-verity would change podman's
    /// file). Files with setuid/setgid bits or writable by group or others are copied, not
    /// linked: linking would make them reachable through the repository's object store.
    ReflinkOrHardlink,
}

/// How one object was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Cloned with FICLONE: no data written.
    Reflinked,
    /// Copied with copy_file_range.
    Copied,
    /// The layer file itself, hardlinked ([`CopyPolicy::ReflinkOrHardlink`]).
    Hardlinked,
    /// The repository already had it.
    AlreadyPresent,
}

/// What the object workers of one import share: what they learnt about the filesystem, and
/// which objects are already stored.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// The first reason reflinking failed, so the report can say why data was copied.
    first_fallback: Mutex<Option<String>>,
    /// Once FICLONE failed with EXDEV/EOPNOTSUPP, later files skip the attempt.
    unsupported: std::sync::atomic::AtomicBool,
    /// Whether `linkat(fd, "", AT_EMPTY_PATH)` works here (0 not tried, 1 yes, 2 no): it
    /// needs CAP_DAC_READ_SEARCH or a kernel that allows it for the file's opener; the
    /// fallback goes through /proc/self/fd, a path lookup more per object.
    flink: std::sync::atomic::AtomicU8,
    /// Objects known to be in the repository: stored by this import or found there.
    /// Only completed objects go in, so a layer never references one still in flight
    /// elsewhere.
    present: Mutex<std::collections::HashSet<Box<[u8]>>>,
    /// Consecutive lookups of objects in the repository that found nothing. Importing into
    /// an empty or unrelated repository, every lookup misses; after [`PROBE_MISSES`] of them
    /// only one object in [`PROBE_MISSES`] is looked up, and an object that turns out to
    /// exist (its link fails with EEXIST) resets the count.
    misses: std::sync::atomic::AtomicU32,
}

/// See [`WorkerState::misses`]: a lookup costs a stat (about 7 µs on XFS); storing an object
/// that was there already costs a tmpfile and a clone thrown away (about 60 µs).
const PROBE_MISSES: u32 = 64;

impl WorkerState {
    fn is_present(&self, id: &[u8]) -> bool {
        self.present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Drops the set of stored objects (about 100 bytes each) once no worker needs it.
    pub fn forget_objects(&self) {
        *self.present.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    }

    fn set_present(&self, id: &[u8]) {
        self.present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.into());
    }

    /// Whether to look the next object up in the repository before storing it.
    fn probe(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.misses.load(Relaxed) < PROBE_MISSES {
            return true;
        }
        // Skipped objects count too, so that one in PROBE_MISSES is still looked up.
        let n = self.misses.fetch_add(1, Relaxed).wrapping_add(1);
        n.is_multiple_of(PROBE_MISSES)
    }

    fn found(&self, present: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if present {
            self.misses.store(0, Relaxed);
        } else {
            self.misses.fetch_add(1, Relaxed);
        }
    }

    /// The first reason a reflink fell back to a copy.
    pub fn first_fallback(&self) -> Option<String> {
        self.first_fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn note(&self, why: String) {
        let mut f = self
            .first_fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }
}

fn repo_err(doing: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
    let doing = doing.into();
    move |cause| Error::Repository { doing, cause }
}

/// Copies `size` bytes of `src` (from offset 0) to `dst` inside the kernel.
fn copy_range(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    while off_in < size {
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
                return copy_userspace(src, dst, size);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_userspace(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
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

/// One file to store: the layer file and what tar-split recorded for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The layer file, as the helper opened it.
    pub file: &'a File,
    /// Its bytes when the caller already read them (the importer reads each file once, for
    /// the layer's sha256, and hands the bytes over); else they are read from `file`.
    pub data: Option<&'a [u8]>,
    /// Length recorded in tar-split.
    pub size: u64,
    /// CRC-64 recorded in tar-split.
    pub crc64: u64,
    /// Entry name, for errors and the report.
    pub name: &'a str,
    /// Layer id, for errors.
    pub layer: &'a str,
}

/// Checks a file's bytes against its tar-split CRC-64 and computes its object id.
fn digest_source<ObjectID: FsVerityHashValue>(
    source: &Source<'_>,
    buf: &mut [u8],
) -> Result<ObjectID> {
    let mut verity = super::verity::Hasher::for_id::<ObjectID>();
    if let Some(bytes) = source.data {
        check_data(source, bytes)?;
        verity.update(bytes);
        return Ok(verity.finish());
    }
    let mut crc = CRC64.digest();
    read_content(source.file, source.size, source.name, 0, buf, |chunk| {
        crc.update(chunk);
        verity.update(chunk);
        Ok(())
    })
    .map_err(|cause| bad_source(source, cause))?;
    check_crc(source, crc.finalize())?;
    Ok(verity.finish())
}

fn bad_source(source: &Source<'_>, cause: AssembleError) -> Error {
    cstor_proxy_client::Error::Assemble {
        layer: source.layer.to_owned(),
        cause,
    }
    .into()
}

fn check_crc(source: &Source<'_>, actual: u64) -> Result<()> {
    if actual != source.crc64 {
        return Err(bad_source(
            source,
            AssembleError::Crc {
                name: source.name.to_owned(),
                expected: source.crc64,
                actual,
            },
        ));
    }
    Ok(())
}

/// Checks bytes read for `source` against its tar-split length and CRC-64.
fn check_data(source: &Source<'_>, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != source.size {
        return Err(bad_source(
            source,
            AssembleError::Size {
                name: source.name.to_owned(),
                expected: source.size,
                actual: bytes.len() as u64,
            },
        ));
    }
    check_crc(source, CRC64.checksum(bytes))
}

/// Gives a finished tmpfile its name in the object store, `id`; an existing object wins.
///
/// `linkat(tmp, "", AT_EMPTY_PATH)` where the kernel allows it, else through
/// /proc/self/fd as composefs does for its own tmpfiles.
///
/// With `proc_only` it always goes through /proc/self/fd: for files this process did not
/// create, where AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH but the /proc route only the
/// `fs.protected_hardlinks` rules.
fn link_object<ObjectID: FsVerityHashValue>(
    objects: &std::os::fd::OwnedFd,
    tmp: &File,
    id: &ObjectID,
    state: &WorkerState,
    proc_only: bool,
) -> Result<bool> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let rel = object_path(id);
    let mut made_dir = false;
    loop {
        let flink = if proc_only {
            2
        } else {
            state.flink.load(Ordering::Relaxed)
        };
        let r = if flink != 2 {
            let r = rustix::fs::linkat(tmp, "", objects, &rel, rustix::fs::AtFlags::EMPTY_PATH);
            match r {
                // Refused for lack of privilege (ENOENT is what older kernels say).
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) if flink == 0 => {
                    // Tell "not allowed" from "no objects/XX directory yet".
                    match rustix::fs::statat(objects, object_dir(id), rustix::fs::AtFlags::empty())
                    {
                        Ok(_) => {
                            state.flink.store(2, Ordering::Relaxed);
                            continue;
                        }
                        Err(_) => r,
                    }
                }
                Ok(()) => {
                    state.flink.store(1, Ordering::Relaxed);
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
/// cannot make, [`Error::Assemble`] for a CRC or size mismatch, or [`Error::Repository`] /
/// [`Error::Io`] for repository and I/O failures.
pub fn store<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    source: &Source<'_>,
    policy: CopyPolicy,
    state: &WorkerState,
    tmp_dir: Option<&str>,
    buf: &mut [u8],
) -> Result<(ObjectID, Stored)> {
    let id: ObjectID = digest_source(source, buf)?;
    store_as(repo, id, source, policy, state, tmp_dir)
}

/// [`store`] for a source already checked and digested (as `id`).
fn store_as<ObjectID: FsVerityHashValue>(
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
    // Objects seen before cost a set lookup (duplicates within the image) or a stat (in the
    // repository already) instead of a tmpfile, a clone and an inode to free again.
    if state.is_present(id.as_bytes()) {
        return Ok((id, Stored::AlreadyPresent));
    }
    let objects_dir = repo
        .objects_dir()
        .map_err(|e| Error::io("opening the objects directory", e.into()))?;
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
    if policy == CopyPolicy::ReflinkOrHardlink
        && state.unsupported.load(std::sync::atomic::Ordering::Relaxed)
    {
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
            copy_range(src, &tmp, size).map_err(|e| Error::io(format!("copying {name}"), e))?;
            false
        }
    };
    // FICLONE clones the whole file; a source that grew since it was hashed must not slip
    // through.
    let len = tmp
        .metadata()
        .map_err(|e| Error::io(format!("stat of the object for {name}"), e))?
        .len();
    if len != size {
        return Err(Error::ContentChanged {
            file: name.to_owned(),
            detail: format!("expected {size} bytes, the file has {len}"),
        });
    }
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
            let (measured, method) = repo
                .finalize_object_tmpfile(tmp, size)
                .map_err(repo_err(format!("storing the object for {name}")))?;
            if measured != id {
                return Err(Error::ContentChanged {
                    file: name.to_owned(),
                    detail: format!(
                        "fs-verity measured {} but the content read has {}",
                        measured.to_hex(),
                        id.to_hex()
                    ),
                });
            }
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

/// `XX/rest-in-hex`, an object's path under `objects/` (composefs' `to_object_pathname`,
/// without its per-character iterator: this runs several times per object).
fn object_path<ObjectID: FsVerityHashValue>(id: &ObjectID) -> String {
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
fn object_dir<ObjectID: FsVerityHashValue>(id: &ObjectID) -> String {
    hex::encode(&id.as_bytes()[..1])
}

/// An `O_TMPFILE` in `objects/<dir>` (created if missing): the worker's own directory
/// (see [`super::placement`]) or the one that will hold the object.
///
/// Not in `objects/` itself: XFS allocates a file's inode in the allocation group of its
/// directory and takes that group's AGI lock to create a tmpfile and again to link it, so with
/// every tmpfile in `objects/` all object workers queue on one lock (profiled: about a fifth of
/// each worker's time).
fn object_tmpfile(objects: &std::os::fd::OwnedFd, dir: &str) -> Result<File> {
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

/// Hardlinks the layer file `src` into the object store as `id`, if it may be linked: in an
/// insecure repository, not setuid/setgid, not writable by group or others. Says how the
/// object got there (hardlinked, or already present), or `None` when the file must be
/// copied instead (the first reason is noted for the report).
fn hardlink<ObjectID: FsVerityHashValue>(
    objects: Option<&std::os::fd::OwnedFd>,
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

/// Fills `tmp` from `src`: FICLONE where allowed and possible, else a kernel copy.
/// Returns whether it reflinked, or `None` (nothing written) when the filesystem has no
/// reflinks and the policy prefers a hardlink.
fn clone_or_copy(
    src: &File,
    tmp: &File,
    size: u64,
    name: &str,
    policy: CopyPolicy,
    state: &WorkerState,
) -> Result<Option<bool>> {
    let try_reflink = policy != CopyPolicy::CopyOnly
        && !state.unsupported.load(std::sync::atomic::Ordering::Relaxed);
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
                    state
                        .unsupported
                        .store(true, std::sync::atomic::Ordering::Relaxed);
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
        // link, as the files after it will be (it used to be copied, one file in some runs).
        return Ok(None);
    }
    copy_range(src, tmp, size).map_err(|e| Error::io(format!("copying {name}"), e))?;
    Ok(Some(false))
}

/// A fixed pool of threads storing objects in parallel.
pub struct Pool<ObjectID: FsVerityHashValue> {
    queue: Arc<GroupQueue<Job<ObjectID>>>,
    /// The repository filesystem's XFS allocation groups, to tag jobs with their source's.
    groups: Option<super::placement::Groups>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What a worker hands back: the object (or why not), and the job's buffer for reuse.
pub type JobResult<ObjectID> = (Result<(ObjectID, Stored)>, Option<Vec<u8>>);

struct Job<ObjectID> {
    src: File,
    data: Option<Vec<u8>>,
    size: u64,
    crc64: u64,
    name: String,
    layer: Arc<str>,
    reply: std::sync::mpsc::SyncSender<JobResult<ObjectID>>,
}

impl<ObjectID> Job<ObjectID> {
    fn source(&self) -> Source<'_> {
        Source {
            file: &self.src,
            data: self.data.as_deref(),
            size: self.size,
            crc64: self.crc64,
            name: &self.name,
            layer: &self.layer,
        }
    }
}

/// How much lower than the rest of the import the object workers run (nice increment).
///
/// The workers are the last stage of the pipeline (helper -> layer reader -> workers) and the
/// only one with a deep queue: when they take turns with the layer readers and the helper on
/// equal terms, a reader woken for its next fds waits for a worker's time slice while the
/// queue runs dry, and both cores idle for moments (about 7% of an import of the reference
/// image on two cores). Below them the stages that feed them go first; the workers still get
/// every cycle the feeders do not use. Measured on the reference image (two cores, interleaved
/// runs): +10 took 5% off the wall time, +3 2%; the full +19 (capped there) another 3% (10
/// rounds each, tighter spread; ext4 copies unchanged within their noise): a woken feeder
/// then waits less for a worker to leave the CPU. Nice values weigh threads against the
/// others of the same scheduling group (a session's autogroup, or a cgroup), so this does not
/// hand the machine's other sessions or services a larger share; it does mean that a busy
/// thread of a program that imports, in the same group, gets ahead of the workers.
const WORKER_NICE: i32 = 19;

/// Jobs a worker takes at once, when that many are queued: their object ids are computed
/// together (see [`digest_batch`]).
const BATCH: usize = 16;

/// The object ids of the jobs whose bytes are in memory (checked against their CRC-64
/// first), computed in one go so that the multi-buffer SHA-512 hashes small files eight at
/// a time instead of one by one (one-block files are most of an image's files). `None` for
/// jobs the worker must read itself.
fn digest_batch<ObjectID: FsVerityHashValue>(
    batch: &[(Option<u64>, Job<ObjectID>)],
) -> Vec<Option<Result<ObjectID>>> {
    let mut out: Vec<Option<Result<ObjectID>>> = Vec::with_capacity(batch.len());
    let mut files: Vec<&[u8]> = Vec::with_capacity(batch.len());
    for (_, job) in batch {
        out.push(job.data.as_deref().map(|data| {
            check_data(&job.source(), data)?;
            files.push(data);
            Ok(ObjectID::EMPTY)
        }));
    }
    // One id per file, in order: they go to the checked jobs in order.
    let ids = super::verity::ids::<ObjectID>(&files);
    for (id, slot) in ids.into_iter().zip(out.iter_mut().flatten().flatten()) {
        *slot = id;
    }
    out
}

impl<ObjectID: FsVerityHashValue> std::fmt::Debug for Pool<ObjectID> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl<ObjectID: FsVerityHashValue> Pool<ObjectID> {
    /// Starts `n` workers storing into `repo`.
    pub fn new(
        repo: Arc<Repository<ObjectID>>,
        n: usize,
        policy: CopyPolicy,
        state: Arc<WorkerState>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let n = n.max(1);
        let queue = Arc::new(GroupQueue::<Job<ObjectID>>::new(n));
        let (mut tmp_dirs, groups) = match repo.objects_dir() {
            Ok(objects) => {
                let groups = super::placement::groups_of_dir(objects.as_fd()).filter(|_| n > 1);
                (
                    super::placement::worker_dirs(objects.as_fd(), groups, n),
                    groups,
                )
            }
            Err(_) => (vec![None; n], None),
        };
        let mut threads = Vec::new();
        for i in 0..n {
            let queue = queue.clone();
            let repo = repo.clone();
            let state = state.clone();
            let stop = stop.clone();
            let tmp_dir = tmp_dirs.get_mut(i).and_then(Option::take);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("cstor-objects-{i}"))
                    .spawn(move || {
                        crate::sys::lower_thread_priority(WORKER_NICE);
                        let mut buf = vec![0u8; 1 << 20];
                        let mut batch = Vec::with_capacity(BATCH);
                        while queue.pop_batch(i, BATCH, &mut batch) {
                            let ids = digest_batch(&batch);
                            let mut todo: Vec<_> = batch.drain(..).zip(ids).collect();
                            while !todo.is_empty() {
                                // Clone first from a group the other worker is not cloning
                                // from (see `jobs`), whatever the order in the batch.
                                let k = queue.choose(i, todo.iter().map(|((g, _), _)| *g));
                                let ((_, job), id) = todo.remove(k.min(todo.len() - 1));
                                if stop.load(Relaxed) {
                                    // Cancelled: what is queued is answered, not stored.
                                    let _ = job.reply.send((Err(Error::Cancelled), job.data));
                                    continue;
                                }
                                let source = job.source();
                                let tmp_dir = tmp_dir.as_deref();
                                let r = match id {
                                    Some(Ok(id)) => {
                                        store_as(&repo, id, &source, policy, &state, tmp_dir)
                                    }
                                    Some(Err(e)) => Err(e),
                                    None => {
                                        store(&repo, &source, policy, &state, tmp_dir, &mut buf)
                                    }
                                };
                                let _ = job.reply.send((r, job.data));
                            }
                        }
                    })
                    .map_err(|e| Error::io("starting an object worker", e))?,
            );
        }
        Ok(Self {
            queue,
            groups,
            threads,
        })
    }

    /// Queues `src` (checked against `crc64`) for storing; the receiver yields the result.
    /// `data`, if given, must hold the `size` bytes just read from `src`: the worker then
    /// hashes them instead of reading the file again, and hands the buffer back.
    pub fn submit(
        &self,
        src: File,
        data: Option<Vec<u8>>,
        size: u64,
        crc64: u64,
        name: String,
        layer: Arc<str>,
    ) -> Result<std::sync::mpsc::Receiver<JobResult<ObjectID>>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        // The source's inode group stands for its data's: XFS puts a file's extents in its
        // inode's group while that has room.
        let group = self
            .groups
            .and_then(|g| rustix::fs::fstat(&src).ok().map(|st| g.of(st.st_ino)));
        self.queue
            .push(
                group,
                Job {
                    src,
                    data,
                    size,
                    crc64,
                    name,
                    layer,
                    reply,
                },
            )
            .map_err(|_| {
                Error::io(
                    "queueing an object",
                    std::io::Error::other("the object workers stopped"),
                )
            })?;
        Ok(rx)
    }
}

impl<ObjectID: FsVerityHashValue> Drop for Pool<ObjectID> {
    fn drop(&mut self) {
        self.queue.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::Ordering;
    use std::sync::atomic::Ordering::Relaxed;

    use composefs::fsverity::{Algorithm, Sha512HashValue};
    use composefs::repository::RepositoryConfig;
    use cstor_protocol::assemble::CRC64;

    use super::*;

    fn insecure_repo(dir: &std::path::Path) -> Repository<Sha512HashValue> {
        let config = RepositoryConfig::new(Algorithm::SHA512).set_insecure();
        Repository::init_path(rustix::fs::CWD, dir, config)
            .expect("a repository in a temp dir")
            .0
    }

    fn source(dir: &std::path::Path, name: &str, content: &[u8], mode: u32) -> File {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        File::open(&path).unwrap()
    }

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
        state.unsupported.store(true, Ordering::Relaxed);
        let mut buf = vec![0u8; 1 << 16];
        let mut store_file = |name: &str, content: &[u8], mode: u32| {
            let src = source(tmp.path(), name, content, mode);
            let source = Source {
                file: &src,
                data: Some(content),
                size: content.len() as u64,
                crc64: CRC64.checksum(content),
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

    /// Once a worker has found that reflinks are unsupported, a file already past that
    /// check in another worker is linked, not copied, under the hardlink policy; under the
    /// default policy it is copied.
    #[test]
    fn a_file_that_missed_the_news_of_no_reflinks_is_linked_under_the_hardlink_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let src = source(tmp.path(), "plain", b"some bytes", 0o644);
        let state = WorkerState::default();
        state.unsupported.store(true, Ordering::Relaxed);
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
            crc64: CRC64.checksum(&content) ^ 1,
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

    /// A batch's ids are each file's own; a file failing its CRC fails alone; files the
    /// worker must read itself are left to it.
    #[test]
    fn a_batch_digests_each_job_and_fails_only_the_bad_one() {
        use composefs::fsverity::FsVerityHasher;
        let tmp = tempfile::tempdir().unwrap();
        let contents: [&[u8]; 4] = [b"first file", &[9u8; 9000], b"corrupted", b"unread"];
        let batch: Vec<(Option<u64>, Job<Sha512HashValue>)> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = format!("f{i}");
                let crc = CRC64.checksum(c) ^ u64::from(i == 2);
                let job = Job {
                    src: source(tmp.path(), &name, c, 0o644),
                    data: (i != 3).then(|| c.to_vec()),
                    size: c.len() as u64,
                    crc64: crc,
                    name,
                    layer: Arc::from("test-layer"),
                    reply: std::sync::mpsc::sync_channel(1).0,
                };
                (None, job)
            })
            .collect();
        let ids = digest_batch(&batch);
        for i in [0, 1] {
            assert_eq!(
                *ids[i].as_ref().unwrap().as_ref().unwrap(),
                FsVerityHasher::<Sha512HashValue>::hash(contents[i])
            );
        }
        assert!(matches!(
            ids[2],
            Some(Err(Error::Helper(
                cstor_proxy_client::Error::Assemble { .. }
            )))
        ));
        assert!(ids[3].is_none());
    }

    #[test]
    fn object_paths_are_composefs_paths() {
        let id = Sha512HashValue::from_hex("0123456789abcdef".repeat(8)).unwrap();
        assert_eq!(object_path(&id), id.to_object_pathname());
        assert_eq!(object_dir(&id), id.to_object_dir());
    }

    #[test]
    fn lookups_thin_out_after_a_run_of_misses_and_resume_on_a_hit() {
        let state = WorkerState::default();
        for _ in 0..PROBE_MISSES {
            assert!(state.probe());
            state.found(false);
        }
        let probed = (0..10 * PROBE_MISSES).filter(|_| state.probe()).count();
        assert_eq!(
            probed, 10,
            "one lookup in {PROBE_MISSES} once every lookup missed"
        );
        state.found(true);
        assert_eq!(state.misses.load(Relaxed), 0);
        assert!((0..PROBE_MISSES).all(|_| state.probe()));
    }
}
