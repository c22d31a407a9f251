//! A repository object written front to back, never held whole in memory: bytes go into an
//! anonymous tmpfile in the objects directory, and the object is linked under its id at the
//! end. In an insecure repository the id is computed on another thread as the bytes go by
//! (there is no fs-verity for the kernel to measure); otherwise composefs' finalize enables
//! fs-verity on the file and takes the kernel's measurement.
//!
//! The EROFS image and the layer splitstreams are written this way; both used to be built in
//! one buffer first, the largest allocations of an import of a big image.

use std::fs::File;
use std::io::{BufWriter, Write};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

use crate::error::{Error, Result, repo_err};

/// Bytes gathered before a write to the file (and, in an insecure repository, a copy handed
/// to the hasher). Small against the syscall it saves, and the EROFS image is written while
/// the image's tree and layout are all in memory: with 1 MiB and four queued copies, this
/// pipeline alone held 6-7 MB at that peak.
const BUFFER: usize = 256 << 10;

/// An object being written; [`ObjectFile::finish`] stores it.
pub(crate) struct ObjectFile<'r, ObjectID: FsVerityHashValue> {
    repo: &'r Repository<ObjectID>,
    out: BufWriter<HashingWriter<File, ObjectID>>,
    len: u64,
}

impl<'r, ObjectID: FsVerityHashValue> ObjectFile<'r, ObjectID> {
    /// A new, empty object file; `None` where the repository's filesystem has no `O_TMPFILE`
    /// (some FUSE filesystems), for the caller's in-memory fallback.
    pub(crate) fn create(repo: &'r Repository<ObjectID>) -> Result<Option<Self>> {
        let Ok(fd) = repo.create_object_tmpfile() else {
            return Ok(None);
        };
        let verity = if repo.is_insecure() {
            Some(BackgroundHasher::start().map_err(|e| Error::io("starting a hasher", e))?)
        } else {
            None
        };
        let inner = HashingWriter {
            inner: File::from(fd),
            verity,
        };
        Ok(Some(Self {
            repo,
            out: BufWriter::with_capacity(BUFFER, inner),
            len: 0,
        }))
    }

    /// Stores the object under its id (an existing object of that id wins) and returns the
    /// id; `what` names the object in errors.
    pub(crate) fn finish(self, what: &str) -> Result<ObjectID> {
        let mut hashing = self
            .out
            .into_inner()
            .map_err(|e| Error::io(format!("writing {what}"), e.into_error()))?;
        match hashing.verity.take() {
            Some(verity) => {
                let id: ObjectID = verity.finish(what)?;
                crate::objects::link_tmpfile(self.repo, &hashing.inner, &id)?;
                Ok(id)
            }
            None => Ok(self
                .repo
                .finalize_object_tmpfile(hashing.inner, self.len)
                .map_err(repo_err(format!("storing {what}")))?
                .0),
        }
    }
}

impl<ObjectID: FsVerityHashValue> Write for ObjectFile<'_, ObjectID> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Passes writes through to `inner`, feeding what was written to an fs-verity hasher.
struct HashingWriter<W, ObjectID> {
    inner: W,
    verity: Option<BackgroundHasher<ObjectID>>,
}

impl<W: Write, ObjectID: FsVerityHashValue> Write for HashingWriter<W, ObjectID> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(v) = &mut self.verity {
            v.update(buf.get(..n).unwrap_or(buf));
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An fs-verity hasher on a thread of its own, fed copies of the bytes (they pass through a
/// [`BUFFER`]-sized buffer: a copy per buffer, at most two queued). The copies' buffers go
/// back to the writer once hashed and are filled again: a new buffer per copy, allocated by
/// the writer and freed by the hasher, fragmented the writer's heap by 13 MB over the EROFS
/// image of a million files, at the import's peak.
struct BackgroundHasher<ObjectID> {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// Hashed buffers, for reuse.
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: std::thread::JoinHandle<ObjectID>,
}

impl<ObjectID: FsVerityHashValue> BackgroundHasher<ObjectID> {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (back_tx, back) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("cstor-hash".into())
            .spawn(move || {
                let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
                for chunk in rx {
                    verity.update(&chunk);
                    // The writer may be gone already (finishing): the buffer is dropped.
                    let _ = back_tx.send(chunk);
                }
                verity.finish()
            })?;
        Ok(Self { tx, back, thread })
    }

    fn update(&mut self, bytes: &[u8]) {
        let mut copy = self.back.try_recv().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(bytes);
        // A hasher thread that is gone shows in finish().
        let _ = self.tx.send(copy);
    }

    fn finish(self, what: &str) -> Result<ObjectID> {
        drop(self.tx);
        self.thread.join().map_err(|_| {
            Error::io(
                format!("hashing {what}"),
                std::io::Error::other("the hasher thread panicked"),
            )
        })
    }
}
