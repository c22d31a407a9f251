//! Open layers ("sessions"): the producer thread, the queue of content fds, the lease, and
//! the locks that pin the layer until the client is done.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cstor_protocol::stream::StreamSummary;
use cstor_protocol::{ErrorCode, FetchFdsResult, LayerInfo, RpcError};
use tokio::sync::{mpsc, watch};

use super::producer::{CancellableWriter, FdSink, produce, stream_pipe};
use crate::error::{Error, Result};
use crate::lock::ReadLock;
use crate::storage::open_layer::OpenLayer;

/// Why a session ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `ReleaseLayer`, `Shutdown` or disconnect.
    Released,
    /// The lease ran out.
    Expired,
}

/// One open layer.
#[derive(Debug)]
pub struct Session {
    /// The handle the client names it by.
    pub handle: u64,
    /// The layer.
    pub info: LayerInfo,
    locks: Mutex<Option<Vec<ReadLock>>>,
    fds: Mutex<Option<mpsc::Receiver<OwnedFd>>>,
    delivered: AtomicU64,
    outcome: Mutex<Option<std::result::Result<StreamSummary, RpcError>>>,
    cancel: Arc<AtomicBool>,
    ended: watch::Sender<Option<EndReason>>,
    lease: Duration,
    deadline: Mutex<Instant>,
    /// A FetchFds is waiting: the client is active even if the wait is long.
    fetching: AtomicBool,
}

struct ChannelSink {
    tx: mpsc::Sender<OwnedFd>,
}

fn released() -> Error {
    Error::new(ErrorCode::Cancelled, "the layer was released")
}

impl FdSink for ChannelSink {
    fn try_push(&mut self, _index: u64, file: File) -> Result<Option<File>> {
        match self.tx.try_send(OwnedFd::from(file)) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(fd)) => Ok(Some(File::from(fd))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(released()),
        }
    }

    fn push_blocking(&mut self, _index: u64, file: File) -> Result<()> {
        self.tx
            .blocking_send(OwnedFd::from(file))
            .map_err(|_| released())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data inconsistent (they
    // hold plain values), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Starts streaming `layer`; returns the session and the read end of its stream pipe.
    pub fn start(
        handle: u64,
        layer: OpenLayer,
        lease: Duration,
        queue: usize,
    ) -> Result<(Arc<Self>, OwnedFd)> {
        let (read_end, write_end) =
            stream_pipe().map_err(|e| Error::io("creating the layer stream pipe", e))?;
        let cancel = Arc::new(AtomicBool::new(false));
        let writer = CancellableWriter::new(write_end, cancel.clone())
            .map_err(|e| Error::io("configuring the layer stream pipe", e))?;
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (ended, _) = watch::channel(None);
        let walker = layer.source.walk()?;
        let session = Arc::new(Self {
            handle,
            info: layer.info,
            locks: Mutex::new(Some(layer.locks)),
            fds: Mutex::new(Some(rx)),
            delivered: AtomicU64::new(0),
            outcome: Mutex::new(None),
            cancel: cancel.clone(),
            ended,
            lease,
            deadline: Mutex::new(Instant::now() + lease),
            fetching: AtomicBool::new(false),
        });
        let s = session.clone();
        std::thread::Builder::new()
            .name(format!("layer-{handle}"))
            .spawn(move || {
                let mut sink = ChannelSink { tx };
                let r = produce(walker, writer, &mut sink, None, &cancel);
                match &r {
                    Ok(sum) => tracing::debug!(handle, ?sum, "layer stream complete"),
                    Err(e) => tracing::info!(handle, "layer stream failed: {e}"),
                }
                *lock(&s.outcome) = Some(r.map_err(RpcError::from));
                // Dropping the sink closes the fd channel: FetchFds then reports the end.
                drop(sink);
            })
            .map_err(|e| Error::io("starting the layer producer thread", e))?;
        Ok((session, read_end))
    }

    /// Renews the lease; returns its length.
    pub fn renew(&self) -> Duration {
        *lock(&self.deadline) = Instant::now() + self.lease;
        self.lease
    }

    /// Whether the lease ran out at `now`. A session with a `FetchFds` waiting is never
    /// expired: the client is there, waiting for us.
    pub fn expired(&self, now: Instant) -> bool {
        !self.fetching.load(Ordering::Relaxed) && now >= *lock(&self.deadline)
    }

    /// Ends the session: stops the producer, closes queued fds and releases the locks.
    pub fn end(&self, why: EndReason) {
        self.cancel.store(true, Ordering::Relaxed);
        self.ended.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(why);
                true
            } else {
                false
            }
        });
        // Dropping the receiver closes the channel and every fd still queued in it, and
        // wakes a producer blocked on a full queue.
        drop(lock(&self.fds).take());
        if let Some(locks) = lock(&self.locks).take() {
            tracing::debug!(
                handle = self.handle,
                ?why,
                n = locks.len(),
                "releasing layer locks"
            );
        }
    }

    fn ended_error(&self, why: EndReason) -> RpcError {
        match why {
            EndReason::Released => RpcError::new(
                ErrorCode::UnknownHandle,
                format!("layer handle {} was released", self.handle),
            ),
            EndReason::Expired => RpcError::new(
                ErrorCode::LeaseExpired,
                format!(
                    "the lease of layer handle {} ran out ({:?} without a request naming it); the layer was released",
                    self.handle, self.lease
                ),
            ),
        }
    }

    /// Waits for at least one content fd (or the end of the stream) and returns up to `max`.
    pub async fn fetch(
        &self,
        max: u32,
    ) -> std::result::Result<(FetchFdsResult, Vec<OwnedFd>), RpcError> {
        let mut ended = self.ended.subscribe();
        if let Some(why) = *ended.borrow() {
            return Err(self.ended_error(why));
        }
        let Some(mut rx) = lock(&self.fds).take() else {
            return Err(RpcError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "another FetchFds on handle {} is still waiting",
                    self.handle
                ),
            ));
        };
        self.fetching.store(true, Ordering::Relaxed);
        let r = self.fetch_from(&mut rx, &mut ended, max).await;
        self.fetching.store(false, Ordering::Relaxed);
        // Put the receiver back unless the session ended meanwhile, so that a later call
        // reports the same outcome.
        if ended.borrow().is_none() {
            *lock(&self.fds) = Some(rx);
        }
        r
    }

    async fn fetch_from(
        &self,
        rx: &mut mpsc::Receiver<OwnedFd>,
        ended: &mut watch::Receiver<Option<EndReason>>,
        max: u32,
    ) -> std::result::Result<(FetchFdsResult, Vec<OwnedFd>), RpcError> {
        let first = tokio::select! {
            fd = rx.recv() => fd,
            why = ended.wait_for(|v| v.is_some()) => {
                let why = why.ok().and_then(|v| *v).unwrap_or(EndReason::Released);
                return Err(self.ended_error(why));
            }
        };
        let mut out = Vec::new();
        let mut done = false;
        match first {
            Some(fd) => {
                out.push(fd);
                while out.len() < max as usize {
                    match rx.try_recv() {
                        Ok(fd) => out.push(fd),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            done = true;
                            break;
                        }
                    }
                }
            }
            None => done = true,
        }
        if done && let Some(Err(e)) = lock(&self.outcome).clone() {
            if out.is_empty() {
                return Err(e);
            }
            // Deliver what was opened; the next call reports the failure.
            done = false;
        }
        let first_index = self
            .delivered
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok((
            FetchFdsResult {
                first: first_index,
                count: out.len() as u32,
                done,
            },
            out,
        ))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.end(EndReason::Released);
    }
}
