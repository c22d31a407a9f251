//! The operations of a layer's splitstream waiting for their turn, in stream order: inline
//! bytes, and files handed to the object workers whose object ids are not back yet. The
//! reader (a containers-storage layer, another repository's layer stream) reads ahead while
//! the workers store; the queue bounds how far, and writes what is done into the stream.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};

use composefs::fsverity::FsVerityHashValue;

use crate::error::{Error, Result};
use crate::objects::JobResult;
use crate::report::ObjectStats;
use crate::tree::Feed;

/// Files up to this size are read once, into memory, and the bytes go both into the layer's
/// sha256 and (in a worker) into the CRC and fs-verity digest. Larger files are queued
/// first and read twice, by the worker and here, at the same time: the worker need not wait
/// for this thread's sha256 over the file, a second read from the page cache is cheap, and
/// a larger bound only buffers more memory without being faster.
pub(crate) const BUFFERED_MAX: u64 = 64 << 10;

/// Bytes of buffered file contents a layer may have queued for the workers.
const INFLIGHT_BYTES: u64 = 8 << 20;

/// Returned buffers kept for reuse (recycling them avoids zeroing fresh memory per file),
/// and the largest buffer worth keeping: most files are a few KiB, and keeping every buffer
/// an occasional larger file grew would hold that much memory per layer for nothing.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX: usize = 64 << 10;

pub(crate) enum Op<ObjectID> {
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
pub(crate) struct Queue<ObjectID> {
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
    /// An empty queue that lets the reader get `lookahead` objects ahead of the workers.
    pub(crate) fn new(lookahead: usize) -> Self {
        Queue {
            ops: VecDeque::new(),
            externals: 0,
            inflight: 0,
            lookahead,
            spare: Vec::new(),
        }
    }

    /// Whether the reader must wait for the workers before it reads on.
    pub(crate) fn over_limits(&self) -> bool {
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
    pub(crate) fn wait_below_limits(&mut self) {
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
    pub(crate) fn buffer(&mut self, size: usize) -> Vec<u8> {
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(size, 0);
        data
    }

    /// Inline bytes, after everything queued before them.
    pub(crate) fn push_inline(&mut self, bytes: Vec<u8>) {
        self.ops.push_back(Op::Inline(bytes));
    }

    /// A file handed to the workers, `buffered` of its `size` bytes held in memory for them.
    pub(crate) fn push_external(
        &mut self,
        size: u64,
        buffered: u64,
        result: Receiver<JobResult<ObjectID>>,
    ) {
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
    pub(crate) fn drain(
        &mut self,
        writer: &mut crate::splitstream::StreamWriter<ObjectID>,
        mut feed: Option<&mut Feed<ObjectID>>,
        stats: &mut ObjectStats,
        layer: &str,
        all: bool,
    ) -> Result<()> {
        while let Some(op) = self.ops.front() {
            match op {
                Op::Inline(_) => {
                    if let Some(Op::Inline(b)) = self.ops.pop_front() {
                        writer.write_inline(&b).map_err(|e| {
                            Error::io(format!("writing the splitstream of layer {layer}"), e)
                        })?;
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
                    writer.write_reference(obj).map_err(|e| {
                        Error::io(format!("writing the splitstream of layer {layer}"), e)
                    })?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;
    use std::time::Duration;

    use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};

    use super::*;
    use crate::objects::{JobResult, Stored};

    fn queue(lookahead: usize) -> Queue<Sha512HashValue> {
        Queue::new(lookahead)
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
