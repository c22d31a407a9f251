//! Importing one layer: its stream becomes a composefs layer splitstream, its regular files
//! become objects, and nothing is committed until the rebuilt tar matched the diff id.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use cstor_protocol::LayerInfo;
use cstor_protocol::assemble::{
    AssembleError, CRC64, ContentSource, read_content, read_content_into,
};
use cstor_protocol::stream::{Record, StreamReader};
use sha2::{Digest, Sha256};

use crate::INLINE_MAX;
use crate::error::{Error, Result};
use crate::objects::{
    Expected, Pool, Submission, assemble_error, check_crc, read_error, unless_stopped,
};
use crate::report::ObjectStats;
use crate::stream_queue::{BUFFERED_MAX, Queue};
use crate::tree::Feed;
use cstor_proxy_client::Contents;

/// What importing a layer produced.
#[derive(Debug)]
pub struct Imported<ObjectID> {
    /// The layer splitstream's fs-verity id (an object, not yet named as a stream).
    pub verity: ObjectID,
    /// How its objects were stored.
    pub stats: ObjectStats,
    /// Length of the tar rebuilt (and checked).
    pub tar_size: u64,
}

/// Content fd `fd` (entry `name`) could not be had or duplicated.
fn content_err(layer: &str, name: &str, fd: u64, cause: std::io::Error) -> Error {
    assemble_error(
        layer,
        AssembleError::Content {
            name: name.to_owned(),
            fd,
            cause,
        },
    )
}

/// Where a layer's import sends what it produces besides its splitstream.
pub struct Outputs<'a, ObjectID: FsVerityHashValue> {
    /// The object workers, which store its files.
    pub pool: &'a Pool<ObjectID>,
    /// The tree thread, which gets the splitstream's contents as they are written.
    pub tree: Option<Feed<ObjectID>>,
    /// Set when the import is cancelled: the layer stops at its next record.
    pub stop: &'a AtomicBool,
}

/// Imports one layer on the calling (blocking) thread, handing objects to the pool of
/// `outputs` (and the splitstream's pieces to its tree thread, if any).
/// `progress` is called with the bytes done so far.
pub fn import_blocking<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    outputs: Outputs<'_, ObjectID>,
    info: &LayerInfo,
    mut stream: StreamReader<BufReader<File>>,
    contents: &mut Contents,
    mut progress: impl FnMut(u64),
    lookahead: usize,
) -> Result<Imported<ObjectID>> {
    let Outputs {
        pool,
        tree: mut feed,
        stop,
    } = outputs;
    let id = info.id.as_str();
    let diff_id =
        info.diff_id
            .as_deref()
            .ok_or_else(|| cstor_proxy_client::Error::DigestMismatch {
                layer: id.to_owned(),
                expected: "no diff id recorded".into(),
                actual: "not imported: nothing to check the layer against".into(),
            })?;
    let mut writer = crate::splitstream::StreamWriter::new(
        repo,
        composefs_oci::LAYER_CONTENT_TYPE,
        format!("the splitstream of layer {id}"),
    )?;
    let mut sha = Sha256::new();
    let mut tar_size = 0u64;
    let mut stats = ObjectStats::default();
    let mut queue = Queue::new(lookahead);
    let mut buf = vec![0u8; 1 << 20];
    let mut last_report = 0u64;
    let layer_name: Arc<str> = Arc::from(id);
    // Where the time goes: waiting for the helper's fds, or for the object workers.
    let started = std::time::Instant::now();
    let mut wait_fds = std::time::Duration::ZERO;
    let mut wait_objects = std::time::Duration::ZERO;
    let mut wait_stream = std::time::Duration::ZERO;

    loop {
        let t_rec = std::time::Instant::now();
        let rec = stream.next_record();
        wait_stream += t_rec.elapsed();
        let rec = rec.map_err(|cause| cstor_proxy_client::Error::Stream {
            layer: id.to_owned(),
            cause,
        })?;
        if stop.load(Relaxed) {
            // The writer is dropped unwritten, the queued objects become unreferenced.
            return Err(Error::Cancelled);
        }
        match rec {
            Some(Record::Segment(bytes)) => {
                sha.update(&bytes);
                tar_size += bytes.len() as u64;
                stats.bytes_inlined += bytes.len() as u64;
                queue.push_inline(bytes);
            }
            Some(Record::File(f)) => {
                let Some(fd) = f.fd else { continue };
                // The record's bytes become the name without a copy (almost every name is
                // UTF-8).
                let name = String::from_utf8(f.name)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                let t_fd = std::time::Instant::now();
                let file = contents.content(fd);
                wait_fds += t_fd.elapsed();
                let file = file.map_err(|cause| content_err(id, &name, fd, cause))?;
                // Every byte goes through the layer's sha256 here, in tar order. Files up to
                // BUFFERED_MAX are read once, into a buffer the worker then CRC-checks and
                // hashes; larger ones are queued, then streamed here while the worker reads
                // them too; tiny ones are checked here and stored inline.
                tar_size += f.size;
                if f.size <= INLINE_MAX {
                    let mut crc = CRC64.digest();
                    let mut small = Vec::new();
                    read_content(&file, f.size, &name, fd, &mut buf, |chunk| {
                        sha.update(chunk);
                        crc.update(chunk);
                        small.extend_from_slice(chunk);
                        Ok(())
                    })
                    .map_err(|cause| assemble_error(id, cause))?;
                    check_crc(id, &name, f.crc64, crc.finalize())?;
                    stats.inlined += 1;
                    stats.bytes_inlined += f.size;
                    queue.push_inline(small);
                } else {
                    if f.size <= BUFFERED_MAX {
                        let mut data = queue.buffer(f.size as usize);
                        read_content_into(&file, &name, fd, &mut data, |chunk| {
                            sha.update(chunk);
                            Ok(())
                        })
                        .map_err(|cause| assemble_error(id, cause))?;
                        let buffered = data.len() as u64;
                        let result = pool.submit(Submission {
                            file,
                            data: Some(data),
                            size: f.size,
                            expected: Expected::Crc64(f.crc64),
                            name,
                            layer: layer_name.clone(),
                        })?;
                        queue.push_external(f.size, buffered, result);
                    } else {
                        // The worker reads a larger file itself: queue it first, so that
                        // it clones and hashes the file while this thread runs the sha256
                        // over it (else a large file holds every later job back).
                        let own = file
                            .try_clone()
                            .map_err(|cause| content_err(id, &name, fd, cause))?;
                        let result = pool.submit(Submission {
                            file,
                            data: None,
                            size: f.size,
                            expected: Expected::Crc64(f.crc64),
                            name: name.clone(),
                            layer: layer_name.clone(),
                        })?;
                        queue.push_external(f.size, 0, result);
                        // A large file is read a chunk at a time: the import may stop
                        // between two.
                        read_content(&own, f.size, &name, fd, &mut buf, |chunk| {
                            unless_stopped(stop)?;
                            sha.update(chunk);
                            Ok(())
                        })
                        .map_err(|cause| read_error(id, cause, stop))?;
                    }
                }
                if tar_size - last_report >= 4 << 20 {
                    last_report = tar_size;
                    progress(tar_size);
                }
            }
            Some(Record::End(_)) | None => break,
        }
        let block = queue.over_limits();
        let t_drain = std::time::Instant::now();
        queue.wait_below_limits();
        queue.drain(&mut writer, feed.as_mut(), &mut stats, id, false)?;
        if block {
            wait_objects += t_drain.elapsed();
        }
    }
    let t_drain = std::time::Instant::now();
    queue.drain(&mut writer, feed.as_mut(), &mut stats, id, true)?;
    wait_objects += t_drain.elapsed();
    tracing::debug!(
        layer = id,
        elapsed = ?started.elapsed(),
        ?wait_fds,
        ?wait_objects,
        ?wait_stream,
        "layer streamed"
    );
    progress(tar_size);

    let digest = format!("sha256:{}", hex::encode(sha.finalize()));
    let size_ok = info.diff_size.is_none_or(|s| s == tar_size);
    if digest != diff_id || !size_ok {
        // The writer is dropped unwritten: no stream exists under the layer's name.
        return Err(cstor_proxy_client::Error::DigestMismatch {
            layer: id.to_owned(),
            expected: match info.diff_size {
                Some(s) => format!("{diff_id} ({s} bytes)"),
                None => diff_id.to_owned(),
            },
            actual: format!("{digest} ({tar_size} bytes)"),
        }
        .into());
    }
    // Stored, but not named yet: the stream gets its name under streams/ once a syncfs has
    // made it and its objects durable (finalize::name_layers), so that one syncfs serves
    // every layer and runs while the EROFS image is being built.
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
