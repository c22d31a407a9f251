//! Importing one layer: its stream becomes a composefs layer splitstream, its regular files
//! become objects, and nothing is committed until the rebuilt tar matched the diff id.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs::splitstream::SplitStreamWriter;
use cstor_protocol::LayerInfo;
use cstor_protocol::assemble::{
    AssembleError, CRC64, ContentSource, read_content, read_content_into,
};
use cstor_protocol::stream::{Record, StreamReader};
use sha2::{Digest, Sha256};

use crate::INLINE_MAX;
use crate::error::{Error, Result};
use crate::objects::{
    JobResult, Pool, Submission, assemble_error, check_crc, read_error, unless_stopped,
};
use crate::report::ObjectStats;
use crate::tree::Feed;
use cstor_proxy_client::Contents;

/// Files up to this size are read once, into memory, and the bytes go both into the layer's
/// sha256 and (in a worker) into the CRC and fs-verity digest. Larger files are queued
/// first and read twice, by the worker and here, at the same time: the worker need not wait
/// for this thread's sha256 over the file, a second read from the page cache is cheap, and
/// a larger bound only buffers more memory without being faster.
const BUFFERED_MAX: u64 = 64 << 10;

/// Bytes of buffered file contents a layer may have queued for the workers.
const INFLIGHT_BYTES: u64 = 8 << 20;

/// Returned buffers kept for reuse (recycling them avoids zeroing fresh memory per file),
/// and the largest buffer worth keeping: most files are a few KiB, and keeping every buffer
/// an occasional larger file grew would hold that much memory per layer for nothing.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX: usize = 64 << 10;

enum Op<ObjectID> {
    Inline(Vec<u8>),
    External {
        size: u64,
        /// Bytes buffered for the worker (0: it reads the file itself).
        buffered: u64,
        result: Receiver<JobResult<ObjectID>>,
        /// The result, once waited for out of order (see [`Queue::wait_below_limits`]).
        done: Option<JobResult<ObjectID>>,
    },
}

/// Operations waiting to go into the splitstream in tar order, and the buffers they hold.
struct Queue<ObjectID> {
    ops: VecDeque<Op<ObjectID>>,
    /// Objects queued for the workers, and the bytes buffered for them.
    externals: usize,
    inflight: u64,
    /// Above this many queued objects (or INFLIGHT_BYTES), the reader waits.
    lookahead: usize,
    /// Buffers handed back by the workers, for reuse.
    spare: Vec<Vec<u8>>,
}

impl<ObjectID: FsVerityHashValue> Queue<ObjectID> {
    fn over_limits(&self) -> bool {
        self.externals > self.lookahead || self.inflight > INFLIGHT_BYTES
    }

    /// Over its limits, the queue waits until it is back under half of them, not just for
    /// its oldest object: waking for nearly every object the workers finish cost a worker its
    /// time slice each time (a context switch per object), and the reader refilled the queue
    /// one job at a time.
    ///
    /// It waits for the result of the job at which the queue falls to half its limits (the
    /// workers take jobs roughly in order, so the older ones are done by then, and
    /// [`drain`](Self::drain) waits for any that are not).
    fn wait_below_limits(&mut self) {
        if !self.over_limits() {
            return;
        }
        let (low_jobs, low_bytes) = (self.lookahead / 2, INFLIGHT_BYTES / 2);
        let (mut externals, mut inflight) = (self.externals, self.inflight);
        for op in self.ops.iter_mut() {
            let Op::External {
                buffered,
                result,
                done,
                ..
            } = op
            else {
                continue;
            };
            externals = externals.saturating_sub(1);
            inflight = inflight.saturating_sub(*buffered);
            if externals <= low_jobs && inflight <= low_bytes {
                if done.is_none() {
                    // A closed channel is left for drain() to report.
                    *done = result.recv().ok();
                }
                return;
            }
        }
    }

    /// A buffer of `size` bytes, recycled where possible (only growth is zero-filled).
    fn buffer(&mut self, size: usize) -> Vec<u8> {
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(size, 0);
        data
    }

    fn push_external(&mut self, size: u64, buffered: u64, result: Receiver<JobResult<ObjectID>>) {
        self.ops.push_back(Op::External {
            size,
            buffered,
            result,
            done: None,
        });
        self.externals += 1;
        self.inflight += buffered;
    }

    /// Moves finished operations from the head of the queue into `writer`, in order. It
    /// waits for the head while the queue is over its limits (so the workers always have
    /// work queued while the reader reads ahead), and for everything with `all`.
    fn drain(
        &mut self,
        writer: &mut SplitStreamWriter<ObjectID>,
        mut feed: Option<&mut Feed<ObjectID>>,
        stats: &mut ObjectStats,
        layer: &str,
        all: bool,
    ) -> Result<()> {
        while let Some(op) = self.ops.front() {
            match op {
                Op::Inline(_) => {
                    if let Some(Op::Inline(b)) = self.ops.pop_front() {
                        writer.write_inline(&b);
                        if let Some(feed) = feed.as_deref_mut() {
                            feed.inline(b);
                        }
                    }
                }
                Op::External { result, done, .. } => {
                    let r = if done.is_some() {
                        match self.ops.front_mut() {
                            Some(Op::External { done, .. }) => done.take().ok_or(()),
                            _ => Err(()),
                        }
                    } else if all || self.over_limits() {
                        result.recv().map_err(|_| ())
                    } else {
                        match result.try_recv() {
                            Ok(r) => Ok(r),
                            Err(TryRecvError::Empty) => return Ok(()),
                            Err(TryRecvError::Disconnected) => Err(()),
                        }
                    };
                    let Some(Op::External { size, buffered, .. }) = self.ops.pop_front() else {
                        continue;
                    };
                    self.externals -= 1;
                    self.inflight -= buffered;
                    let (r, data) = r.map_err(|_| {
                        Error::io(
                            "storing an object",
                            std::io::Error::other("an object worker stopped"),
                        )
                    })?;
                    if let Some(data) = data
                        && self.spare.len() < SPARE_BUFFERS
                        && data.capacity() <= SPARE_MAX
                    {
                        self.spare.push(data);
                    }
                    let (obj, how) = r?;
                    stats.count(how, size);
                    writer.add_external_size(size);
                    if let Some(feed) = feed.as_deref_mut() {
                        feed.external(obj.clone());
                    }
                    writer.write_reference(obj).map_err(|cause| {
                        Error::repository(
                            format!("writing the splitstream of layer {layer}"),
                            cause,
                        )
                    })?;
                }
            }
        }
        Ok(())
    }
}

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
    let mut writer = repo
        .create_stream(composefs_oci::LAYER_CONTENT_TYPE)
        .map_err(|cause| {
            Error::repository(format!("creating the splitstream of layer {id}"), cause)
        })?;
    let mut sha = Sha256::new();
    let mut tar_size = 0u64;
    let mut stats = ObjectStats::default();
    let mut queue = Queue {
        ops: VecDeque::new(),
        externals: 0,
        inflight: 0,
        lookahead,
        spare: Vec::new(),
    };
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
                queue.ops.push_back(Op::Inline(bytes));
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
                    queue.ops.push_back(Op::Inline(small));
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
                            crc64: f.crc64,
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
                            crc64: f.crc64,
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
    let verity = writer.done().map_err(|cause| {
        Error::repository(format!("storing the splitstream of layer {id}"), cause)
    })?;
    Ok(Imported {
        verity,
        stats,
        tar_size,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;
    use std::time::Duration;

    use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};

    use super::*;
    use crate::objects::{JobResult, Stored};

    fn queue(lookahead: usize) -> Queue<Sha512HashValue> {
        Queue {
            ops: VecDeque::new(),
            externals: 0,
            inflight: 0,
            lookahead,
            spare: Vec::new(),
        }
    }

    fn finished() -> JobResult<Sha512HashValue> {
        (Ok((Sha512HashValue::EMPTY, Stored::Reflinked)), None)
    }

    /// Over its lookahead, the reader sleeps until the queue is down to half of it: it waits
    /// for that job, not for the oldest one, which would wake it once per finished object.
    #[test]
    fn over_its_limits_the_queue_waits_for_the_job_at_half_its_lookahead() {
        let mut q = queue(4);
        let mut senders = Vec::new();
        for _ in 0..6 {
            let (tx, rx) = sync_channel(1);
            q.push_external(1000, 0, rx);
            senders.push(tx);
        }
        assert!(q.over_limits());
        // The workers finish the jobs in order, slowly: the wait must last until the fourth
        // (6 queued, 2 = half the lookahead left behind it).
        let workers = std::thread::spawn(move || {
            for (i, tx) in senders.into_iter().enumerate() {
                std::thread::sleep(Duration::from_millis(20));
                tx.send(finished()).unwrap();
                if i == 3 {
                    // Later jobs stay unfinished while the reader goes on.
                    return;
                }
            }
        });
        q.wait_below_limits();
        let done: Vec<bool> = q
            .ops
            .iter()
            .map(|op| matches!(op, Op::External { done: Some(_), .. }))
            .collect();
        assert_eq!(done, [false, false, false, true, false, false]);
        workers.join().unwrap();
        // Under its limits it does not wait at all.
        let mut q = queue(4);
        let (_tx, rx) = sync_channel(1);
        q.push_external(1000, 0, rx);
        q.wait_below_limits();
    }
}
