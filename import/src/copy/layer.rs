//! Copying one layer stream: the source's splitstream is read piece by piece, its objects
//! go to the object workers (reflinked or copied, each checked against its name in the
//! source as it is read), and a new splitstream is written with the destination's object
//! ids; the rebuilt tar must match the diff id before the stream is stored.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs::splitstream::{SplitStreamData, SplitStreamReader};
use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};

use crate::INLINE_MAX;
use crate::error::{Error, Result};
use crate::layer_import::Imported;
use crate::objects::{Expected, Pool, Submission, unless_stopped};
use crate::report::ObjectStats;
use crate::stream_queue::{BUFFERED_MAX, Queue};
use crate::tree::Feed;

/// Opens object `id` of `repo` for reading, confined to its `objects/` directory: a
/// symlink there is refused rather than followed out of the repository.
pub(super) fn open_object<ObjectID: FsVerityHashValue>(
    repo: &Repository<ObjectID>,
    id: &ObjectID,
) -> std::io::Result<File> {
    let objects = repo.objects_dir()?;
    let hex = id.to_hex();
    let path = format!("{}/{}", &hex[..2], &hex[2..]);
    let fd = rustix::fs::openat(
        objects,
        path.as_str(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// The fs-verity digest of all of `file`, read with `pread` so that its offset stays at 0.
pub(super) fn digest_file<ObjectID: FsVerityHashValue>(file: &File) -> std::io::Result<ObjectID> {
    let mut hasher = crate::verity::Hasher::for_id::<ObjectID>();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
}

/// The layer stream `verity` of `source`, checked against its name (the layer's stream
/// names the object, so a stream whose bytes changed is refused before anything is read
/// from it).
pub(super) fn open_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    verity: &S,
    diff_id: &str,
) -> Result<SplitStreamReader<S>> {
    read_stream(source, verity, diff_id, true)
}

/// The uncompressed size of layer stream `verity` of `source`, from its header alone: for
/// progress totals before the copy starts. The stream is not checked here (that would read it
/// all a second time); [`open_stream`] checks it before anything is copied from it.
pub(super) fn stream_size<S: FsVerityHashValue>(
    source: &Repository<S>,
    verity: &S,
    diff_id: &str,
) -> Result<u64> {
    Ok(read_stream(source, verity, diff_id, false)?.total_size)
}

/// Opens layer stream `verity` of `source` and reads its header; `check`: first its whole
/// content against its name.
fn read_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    verity: &S,
    diff_id: &str,
    check: bool,
) -> Result<SplitStreamReader<S>> {
    let corrupt = |detail: String| Error::SourceObject {
        object: format!("layer stream {} of {diff_id}", verity.to_hex()),
        detail,
    };
    let file = open_object(source, verity).map_err(|e| corrupt(format!("cannot open it: {e}")))?;
    if check {
        let actual: S = digest_file(&file).map_err(|e| corrupt(format!("cannot read it: {e}")))?;
        if actual != *verity {
            return Err(corrupt(format!(
                "its content has fs-verity digest {}",
                actual.to_hex()
            )));
        }
    }
    SplitStreamReader::new(file, Some(composefs_oci::LAYER_CONTENT_TYPE))
        .map_err(|e| corrupt(format!("not a layer splitstream: {e:#}")))
}

/// What a layer's copy needs besides its source.
pub(super) struct Target<'a, D: FsVerityHashValue> {
    pub repo: &'a Arc<Repository<D>>,
    pub pool: &'a Pool<D>,
    /// The tree thread's feed for this layer, if it has one.
    pub tree: Option<Feed<D>>,
    pub stop: &'a AtomicBool,
    pub lookahead: usize,
}

/// One piece of a layer, in stream order, as a source hands it over.
pub(super) enum Piece {
    /// Tar headers, padding and small files, kept as they are.
    Inline(Vec<u8>),
    /// A file's contents sent in the stream itself (a repository service does for files the
    /// consumer may not be able to open): stored as an object above the inline size.
    Data(Vec<u8>),
    /// A file's contents to store as an object: the source's file, its length, and what its
    /// bytes must match.
    Object {
        file: File,
        size: u64,
        expected: Expected,
        /// For errors and the report: `object <id>`.
        name: String,
    },
}

/// What a walk over a layer's pieces calls for each piece, in stream order.
pub(super) type Each<'a> = &'a mut dyn FnMut(Piece) -> Result<()>;

/// Walks layer stream `reader` of `source`, handing `each` its pieces: inline bytes, and
/// every referenced object opened in the source's `objects/` with its name to check.
pub(super) fn walk_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    reader: &mut SplitStreamReader<S>,
    diff_id: &str,
    each: Each<'_>,
) -> Result<()> {
    let algorithm = crate::verity::algorithm::<S>();
    // composefs' walk takes a callback returning its own error type: ours waits here.
    let mut failed: Option<Error> = None;
    let walked = reader.for_each_chunk(|chunk| {
        let piece = match chunk {
            SplitStreamData::Inline(bytes) => Ok(Piece::Inline(bytes.into_vec())),
            SplitStreamData::External(id) => {
                let name = format!("object {}", id.to_hex());
                open_object(source, &id)
                    .and_then(|file| Ok((file.metadata()?.len(), file)))
                    .map(|(size, file)| Piece::Object {
                        file,
                        size,
                        expected: Expected::Object {
                            algorithm,
                            id: id.as_bytes().into(),
                        },
                        name: name.clone(),
                    })
                    .map_err(|e| Error::SourceObject {
                        object: format!("{name} ({diff_id})"),
                        detail: format!("cannot open it: {e}"),
                    })
            }
        };
        piece.and_then(&mut *each).map_err(|e| {
            failed = Some(e);
            anyhow::anyhow!("stopped")
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(|e| Error::SourceObject {
        object: format!("the layer stream of {diff_id}"),
        detail: format!("{e:#}"),
    })
}

/// Copies the layer `diff_id`, whose pieces `walk` hands over in stream order, into the
/// target's repository; `progress` gets the tar bytes done so far.
pub(super) fn copy_blocking<D: FsVerityHashValue>(
    walk: impl FnOnce(Each<'_>) -> Result<()>,
    diff_id: &str,
    target: Target<'_, D>,
    mut progress: impl FnMut(u64),
) -> Result<Imported<D>> {
    let Target {
        repo,
        pool,
        tree: mut feed,
        stop,
        lookahead,
    } = target;
    let mut writer = crate::splitstream::StreamWriter::new(
        repo,
        composefs_oci::LAYER_CONTENT_TYPE,
        format!("the splitstream of layer {diff_id}"),
    )?;
    let mut sha = Sha256::new();
    let mut tar_size = 0u64;
    let mut last_report = 0u64;
    let mut stats = ObjectStats::default();
    let mut queue = Queue::new(lookahead);
    let mut buf = vec![0u8; 1 << 20];
    let layer: Arc<str> = Arc::from(diff_id);
    walk(&mut |piece| {
        if stop.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        match piece {
            Piece::Inline(bytes) => {
                sha.update(&bytes);
                tar_size += bytes.len() as u64;
                stats.bytes_inlined += bytes.len() as u64;
                queue.push_inline(bytes);
            }
            Piece::Data(bytes) => {
                sha.update(&bytes);
                let size = bytes.len() as u64;
                tar_size += size;
                if size <= INLINE_MAX {
                    stats.inlined += 1;
                    stats.bytes_inlined += size;
                    queue.push_inline(bytes);
                } else {
                    // Rare (a service sends only what the consumer could not open): stored
                    // here, by composefs, as a copy.
                    let id = repo.ensure_object(&bytes).map_err(|cause| {
                        Error::repository(format!("storing a file of layer {diff_id}"), cause)
                    })?;
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    let _ = tx.send((Ok((id, crate::objects::Stored::Copied)), None));
                    queue.push_external(size, 0, rx);
                }
            }
            Piece::Object {
                file,
                size,
                expected,
                name,
            } => {
                let corrupt = |detail: String| Error::SourceObject {
                    object: format!("{name} ({diff_id})"),
                    detail,
                };
                tar_size += size;
                if size <= BUFFERED_MAX {
                    // Read once: the bytes go into the layer's sha256 here, and to the
                    // worker, which checks them against the source's name and stores them;
                    // a file of the inline size goes inline, as composefs splits.
                    let mut data = queue.buffer(size as usize);
                    (&file)
                        .read_exact(&mut data)
                        .map_err(|e| corrupt(format!("reading {size} bytes: {e}")))?;
                    sha.update(&data);
                    if size <= INLINE_MAX {
                        check_small(&data, &expected, &corrupt)?;
                        stats.inlined += 1;
                        stats.bytes_inlined += size;
                        queue.push_inline(data);
                    } else {
                        let result = pool.submit(Submission {
                            file,
                            data: Some(data),
                            size,
                            expected,
                            name,
                            layer: layer.clone(),
                        })?;
                        queue.push_external(size, size, result);
                    }
                } else {
                    // Queued first, so that a worker clones and digests it while this
                    // thread runs the sha256 over it.
                    let own = file
                        .try_clone()
                        .map_err(|e| Error::io(format!("duplicating the fd of {name}"), e))?;
                    let result = pool.submit(Submission {
                        file,
                        data: None,
                        size,
                        expected,
                        name: name.clone(),
                        layer: layer.clone(),
                    })?;
                    queue.push_external(size, 0, result);
                    let mut at = 0u64;
                    while at < size {
                        unless_stopped(stop).map_err(|_| Error::Cancelled)?;
                        let want = buf.len().min((size - at) as usize);
                        let n = own
                            .read_at(&mut buf[..want], at)
                            .map_err(|e| corrupt(format!("reading it: {e}")))?;
                        if n == 0 {
                            return Err(corrupt(format!(
                                "{size} bytes expected, {at} read (it shrank)"
                            )));
                        }
                        sha.update(&buf[..n]);
                        at += n as u64;
                    }
                }
            }
        }
        if tar_size - last_report >= 4 << 20 {
            last_report = tar_size;
            progress(tar_size);
        }
        queue.wait_below_limits();
        queue.drain(&mut writer, feed.as_mut(), &mut stats, diff_id, false)
    })?;
    queue.drain(&mut writer, feed.as_mut(), &mut stats, diff_id, true)?;
    progress(tar_size);
    let digest = format!("sha256:{}", hex::encode(sha.finalize()));
    if digest != diff_id {
        // The writer is dropped unwritten: nothing is stored under the layer's name.
        return Err(Error::SourceObject {
            object: format!("layer {diff_id}"),
            detail: format!("its stream rebuilds to {digest} ({tar_size} bytes)"),
        });
    }
    if let Some(feed) = feed {
        feed.done();
    }
    let verity = writer.done()?;
    Ok(Imported {
        verity,
        stats,
        tar_size,
    })
}

/// Checks a file small enough to go inline against its name in the source (no worker sees
/// it).
fn check_small(data: &[u8], expected: &Expected, corrupt: &impl Fn(String) -> Error) -> Result<()> {
    let Expected::Object { id, algorithm } = expected else {
        return Ok(());
    };
    let actual = cstor_verity::Hasher::digest(*algorithm, data);
    if actual.as_bytes() != &id[..] {
        return Err(corrupt(format!(
            "its content has fs-verity digest {}",
            actual.to_hex()
        )));
    }
    Ok(())
}
