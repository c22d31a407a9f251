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
use crate::tree::{Feed, Piece as StoredPiece, StoredPieces};

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

/// A source's layer stream being read: by [`StoredPieces`] (the reference table left in the
/// file, long inline runs in bounded pieces, no length trusted with an allocation), or by
/// composefs' reader for a stream of a shape ours does not know.
pub(super) enum SourceStream<S: FsVerityHashValue> {
    Ours(StoredPieces<S>),
    Theirs(SplitStreamReader<S>),
}

impl<S: FsVerityHashValue> SourceStream<S> {
    fn total_size(&self) -> u64 {
        match self {
            SourceStream::Ours(s) => s.total_size(),
            SourceStream::Theirs(r) => r.total_size,
        }
    }
}

/// The layer stream `verity` of `source`, checked against its name (the layer's stream
/// names the object, so a stream whose bytes changed is refused before anything is read
/// from it).
pub(super) fn open_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    verity: &S,
    diff_id: &str,
) -> Result<SourceStream<S>> {
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
    Ok(read_stream(source, verity, diff_id, false)?.total_size())
}

/// Opens layer stream `verity` of `source` and reads its header; `check`: first its whole
/// content against its name.
fn read_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    verity: &S,
    diff_id: &str,
    check: bool,
) -> Result<SourceStream<S>> {
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
    let theirs = file
        .try_clone()
        .map_err(|e| corrupt(format!("cannot open it again: {e}")))?;
    match StoredPieces::from_file(file) {
        Ok(Some(ours)) => Ok(SourceStream::Ours(ours)),
        Ok(None) => SplitStreamReader::new(theirs, Some(composefs_oci::LAYER_CONTENT_TYPE))
            .map(SourceStream::Theirs)
            .map_err(|e| corrupt(format!("not a layer splitstream: {e:#}"))),
        Err(e) => Err(corrupt(format!("{e:#}"))),
    }
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

/// Walks layer stream `stream` of `source`, handing `each` its pieces: inline bytes, and
/// every referenced object opened in the source's `objects/` with its name to check.
pub(super) fn walk_stream<S: FsVerityHashValue>(
    source: &Repository<S>,
    stream: &mut SourceStream<S>,
    diff_id: &str,
    each: Each<'_>,
) -> Result<()> {
    let unreadable = |e: anyhow::Error| Error::SourceObject {
        object: format!("the layer stream of {diff_id}"),
        detail: format!("{e:#}"),
    };
    let reader = match stream {
        SourceStream::Theirs(reader) => reader,
        SourceStream::Ours(pieces) => loop {
            for piece in pieces.next_batch().map_err(unreadable)? {
                match piece {
                    StoredPiece::Inline(bytes) => each(Piece::Inline(bytes))?,
                    StoredPiece::External(id) => each(object_piece(source, &id, diff_id)?)?,
                    StoredPiece::Done => return Ok(()),
                    StoredPiece::GaveUp => {
                        // Only a feed gives up; a stored stream's reader does not.
                        return Err(unreadable(anyhow::anyhow!("its reader gave up")));
                    }
                }
            }
        },
    };
    // composefs' walk takes a callback returning its own error type: ours waits here.
    let mut failed: Option<Error> = None;
    let walked = reader.for_each_chunk(|chunk| {
        let piece = match chunk {
            SplitStreamData::Inline(bytes) => Ok(Piece::Inline(bytes.into_vec())),
            SplitStreamData::External(id) => object_piece(source, &id, diff_id),
        };
        piece.and_then(&mut *each).map_err(|e| {
            failed = Some(e);
            anyhow::anyhow!("stopped")
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(unreadable)
}

/// Object `id` of `source`, opened in its `objects/`, with its name to check.
fn object_piece<S: FsVerityHashValue>(
    source: &Repository<S>,
    id: &S,
    diff_id: &str,
) -> Result<Piece> {
    let name = format!("object {}", id.to_hex());
    open_object(source, id)
        .and_then(|file| Ok((file.metadata()?.len(), file)))
        .map(|(size, file)| Piece::Object {
            file,
            size,
            expected: Expected::Object {
                algorithm: crate::verity::algorithm::<S>(),
                id: id.as_bytes().into(),
            },
            name: name.clone(),
        })
        .map_err(|e| Error::SourceObject {
            object: format!("{name} ({diff_id})"),
            detail: format!("cannot open it: {e}"),
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

#[cfg(test)]
mod tests {
    use composefs::fsverity::{Algorithm, Sha256HashValue};
    use composefs::repository::RepositoryConfig;

    use super::*;
    use crate::splitstream::{HEADER_LEN, INFO_LEN, MAGIC};

    type Id = Sha256HashValue;

    /// A layer stream in composefs' layout, without references, whose decompressed body is
    /// `body` (the instructions, as a hostile or broken writer may have made them).
    fn stream_of(body: &[u8]) -> Vec<u8> {
        let body = zstd::stream::encode_all(body, 0).unwrap();
        let named = zstd::stream::encode_all(&[][..], 0).unwrap();
        let start = HEADER_LEN + INFO_LEN;
        let named_at = start..start + named.len() as u64;
        let body_at = named_at.end..named_at.end + body.len() as u64;
        let mut s = MAGIC.to_vec();
        s.push(0);
        s.extend_from_slice(&0u16.to_le_bytes());
        s.push(Id::ALGORITHM.kernel_id());
        s.push(12);
        for r in [
            HEADER_LEN..start,
            start..start,
            start..start,
            body_at,
            named_at,
        ] {
            s.extend_from_slice(&r.start.to_le_bytes());
            s.extend_from_slice(&r.end.to_le_bytes());
        }
        s.extend_from_slice(&composefs_oci::LAYER_CONTENT_TYPE.to_le_bytes());
        s.extend_from_slice(&5u64.to_le_bytes());
        s.extend_from_slice(&named);
        s.extend_from_slice(&body);
        s
    }

    /// Walks the stream `body` makes, stored in a fresh repository: the inline bytes it gave,
    /// and how the walk ended.
    fn walk(body: &[u8]) -> (Vec<u8>, Result<()>) {
        let tmp = tempfile::tempdir().unwrap();
        let config = RepositoryConfig::new(Algorithm::SHA256).set_insecure();
        let repo = Repository::<Id>::init_path(rustix::fs::CWD, tmp.path(), config)
            .unwrap()
            .0;
        let verity = repo.ensure_object(&stream_of(body)).unwrap();
        let mut stream = open_stream(&repo, &verity, "sha256:test").unwrap();
        assert!(matches!(stream, SourceStream::Ours(_)));
        assert_eq!(stream.total_size(), 5);
        let mut inline = Vec::new();
        let ended = walk_stream(&repo, &mut stream, "sha256:test", &mut |piece| {
            match piece {
                Piece::Inline(bytes) => inline.extend_from_slice(&bytes),
                _ => panic!("no objects in this stream"),
            }
            Ok(())
        });
        (inline, ended)
    }

    #[test]
    fn a_source_stream_that_claims_an_exabyte_of_inline_bytes_fails_without_asking_for_it() {
        // The same stream with an honest length reads back: the layout above is right.
        let mut honest = (-5i64).to_le_bytes().to_vec();
        honest.extend_from_slice(b"hello");
        let (inline, ended) = walk(&honest);
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(inline, b"hello");

        // composefs' reader allocates the claimed length at once: the process would abort.
        let mut lying = (-(1i64 << 60)).to_le_bytes().to_vec();
        lying.extend_from_slice(b"hello");
        let (_, ended) = walk(&lying);
        match ended {
            Err(Error::SourceObject { object, detail }) => {
                assert!(object.contains("sha256:test"), "{object}");
                assert!(detail.contains("ends inside"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }
}
