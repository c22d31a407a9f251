//! An open layer: its stream, its content fds, its lease.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cstor_protocol::assemble::{AssembledTar, ContentSource, assemble};
use cstor_protocol::stream::StreamReader;
use cstor_protocol::{
    Empty, FetchFdsParams, FetchFdsResult, GetLayerResult, KeepAliveParams, KeepAliveResult,
    LayerInfo, ReleaseLayerParams, method,
};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{Error, Result};

/// Content fds a layer holds ahead of its reader by default: a queue of 256 and a batch of
/// up to 200 being received. Less when the process's fd limit is low, see [`fd_budget`].
pub const DEFAULT_PREFETCH: usize = 456;

/// How many more fds this process may hold (its soft `RLIMIT_NOFILE` less a reserve), or
/// `usize::MAX` without a limit.
///
/// Content fds arrive by `SCM_RIGHTS`; a receiver at its fd limit gets the message with its
/// fds silently dropped, so every consumer of content fds sizes its queues from this: pass
/// a share of it to [`Client::open_layer_with_prefetch`] when several layers are open at
/// once.
///
/// ```
/// let per_layer = cstor_proxy_client::fd_budget() / 4;
/// assert!(per_layer > 0);
/// ```
pub fn fd_budget() -> usize {
    cstor_protocol::fds::budget()
}

/// Grows this process's fd table so that it holds `n` fds (capped at the soft
/// `RLIMIT_NOFILE`) without growing again.
///
/// The kernel doubles a process's fd table as fds arrive, and in a process with several
/// threads each doubling waits for an RCU grace period, while the layers start. Done while
/// the process still has one thread it costs an allocation only; later it waits for one
/// grace period at most. An import calls it with what it will hold; a program that imports
/// can call it first thing in `main`, as `cstor` does.
///
/// Best effort: it never fails, and a table already that large is left alone.
///
/// ```
/// cstor_proxy_client::reserve_fd_table(1024);
/// ```
pub fn reserve_fd_table(n: usize) {
    cstor_protocol::fds::reserve_table(n);
}

/// Bytes of each prefetched content file the kernel is asked to read ahead.
const READAHEAD: u64 = 4 << 20;

/// Content fds passed to the reader's channel at once, when it has room for that many.
const HANDOFF: usize = 32;

/// Asks the kernel to start reading a content file the reader will read in full, if its
/// start is not in the page cache: with a cold cache, the files queued ahead of the reader
/// are then read in parallel instead of one at a time. The probe (a one-byte `RWF_NOWAIT`
/// read) costs far less than `posix_fadvise` on a cached file, which walks its pages.
pub fn read_ahead(fd: &OwnedFd) {
    let mut probe = [0u8; 1];
    let cached = rustix::io::preadv2(
        fd,
        &mut [std::io::IoSliceMut::new(&mut probe)],
        0,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    if matches!(cached, Err(rustix::io::Errno::AGAIN)) {
        let _ = rustix::fs::fadvise(
            fd,
            0,
            std::num::NonZeroU64::new(READAHEAD),
            rustix::fs::Advice::WillNeed,
        );
    }
}

/// A layer opened with [`Client::open_layer`]. The helper keeps it pinned (read-locked)
/// until [`Layer::release`] is called or the `Layer` is dropped.
///
/// The stream and the content fds are consumed on a blocking thread:
/// [`Layer::take_reader`] gives the stream, [`Layer::take_contents`] a
/// [`ContentSource`] that yields the content files in order. [`Layer::write_tar`] does both
/// and checks the result against the layer's diff id.
#[derive(Debug)]
pub struct Layer {
    client: Client,
    handle: u64,
    info: LayerInfo,
    stream: Option<File>,
    contents: Option<Contents>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    released: bool,
}

/// The content fds of a layer, in stream order. Blocking: use it on a blocking thread.
#[derive(Debug)]
pub struct Contents {
    rx: mpsc::Receiver<(u64, OwnedFd)>,
    failure: Arc<Mutex<Option<Error>>>,
    layer: String,
}

impl ContentSource for Contents {
    fn content(&mut self, fd: u64) -> std::io::Result<File> {
        match self.rx.blocking_recv() {
            Some((i, f)) if i == fd => Ok(File::from(f)),
            Some((i, _)) => Err(std::io::Error::other(format!(
                "layer {}: received content fd {i} where {fd} was expected",
                self.layer
            ))),
            None => {
                let why = self
                    .failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "the helper sent no more content fds".into());
                Err(std::io::Error::other(why))
            }
        }
    }
}

impl Layer {
    /// `prefetch`: the most content fds held ahead of the reader (half queued, half in the
    /// batch being received).
    pub(crate) fn new(client: Client, r: GetLayerResult, stream: OwnedFd, prefetch: usize) -> Self {
        let handle = r.handle;
        let half = (prefetch / 2).max(1);
        let (tx, rx) = mpsc::channel(half);
        let failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let max = client
            .info()
            .limits
            .max_fds_per_message
            .min(u32::try_from(half).unwrap_or(u32::MAX));
        let prefetch = {
            let client = client.clone();
            let failure = failure.clone();
            tokio::spawn(async move {
                loop {
                    let r: Result<(FetchFdsResult, Vec<OwnedFd>)> = client
                        .call(method::FETCH_FDS, &FetchFdsParams { handle, max })
                        .await;
                    match r {
                        Ok((res, fds)) => {
                            if fds.len() != res.count as usize {
                                *failure.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(Error::Protocol {
                                        method: method::FETCH_FDS.into(),
                                        detail: format!(
                                            "reply announces {} fds but carries {}",
                                            res.count,
                                            fds.len()
                                        ),
                                    });
                                return;
                            }
                            // Handed over HANDOFF at a time: a send per fd into the full
                            // channel would wake this task (and the runtime's thread) for
                            // every fd the reader takes, ~50k wakeups for the reference image.
                            let total = fds.len();
                            let mut fds = fds.into_iter().enumerate();
                            let mut sent = 0;
                            while sent < total {
                                let n = (total - sent).min(HANDOFF).min(tx.max_capacity());
                                let Ok(permits) = tx.reserve_many(n).await else {
                                    return;
                                };
                                for (permit, (i, fd)) in permits.zip(fds.by_ref()) {
                                    read_ahead(&fd);
                                    permit.send((res.first + i as u64, fd));
                                }
                                sent += n;
                            }
                            if res.done {
                                return;
                            }
                        }
                        Err(e) => {
                            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return;
                        }
                    }
                }
            })
        };
        // FetchFds renews the lease, but a reader busy with one huge file fetches nothing
        // for a while: renew explicitly, at a third of the lease at most. The same pings
        // tell a frozen helper (no answer: killed, see Client::call) from one whose reads
        // are slow (it answers).
        let lease = Duration::from_millis(client.info().limits.lease_timeout_ms.max(300));
        let every = (lease / 3).min(client.inner.deadlines.keepalive);
        let keepalive = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    let r: Result<(KeepAliveResult, _)> = client
                        .call(method::KEEP_ALIVE, &KeepAliveParams { handle })
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(handle, "keepalive stopped: {e}");
                        return;
                    }
                }
            })
        };
        Self {
            handle,
            info: r.layer,
            stream: Some(File::from(stream)),
            contents: Some(Contents {
                rx,
                failure,
                layer: client_layer_name(handle),
            }),
            client,
            tasks: vec![prefetch, keepalive],
            released: false,
        }
    }

    /// The layer.
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    /// The handle the helper knows it by.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// The layer stream. Taking it reads nothing (the helper may be frozen before its first
    /// byte, and an async task blocked in a read would stop the timers that detect that);
    /// reading blocks: do it on a blocking thread. Returns `None` the second time.
    pub fn take_reader(&mut self) -> Option<StreamReader<BufReader<File>>> {
        let f = self.stream.take()?;
        Some(StreamReader::deferred(BufReader::with_capacity(
            256 << 10,
            f,
        )))
    }

    /// The content fds, in order. Returns `None` the second time.
    pub fn take_contents(&mut self) -> Option<Contents> {
        self.contents.take().map(|mut c| {
            c.layer = self.info.id.clone();
            c
        })
    }

    /// Rebuilds the layer's tar into `out` on a blocking thread, checking every file's
    /// CRC-64 and the whole tar's sha256 and size against the layer's diff id; then releases
    /// the layer.
    ///
    /// Fails with [`Error::Assemble`] (CRC/size mismatch, helper-side stream error) or
    /// [`Error::DigestMismatch`].
    pub async fn write_tar<W: Write + Send + 'static>(
        mut self,
        out: W,
    ) -> Result<(AssembledTar, W)> {
        let during = format!("streaming layer {}", self.info.id);
        let reader = self.take_reader().ok_or_else(|| Error::Protocol {
            method: method::GET_LAYER.into(),
            detail: "the stream was already taken".into(),
        })?;
        let mut contents = self.take_contents().ok_or_else(|| Error::Protocol {
            method: method::GET_LAYER.into(),
            detail: "the contents were already taken".into(),
        })?;
        let id = self.info.id.clone();
        let expected = self.info.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut out = out;
            let r = assemble(reader, &mut contents, &mut out);
            r.map(|a| (a, out))
        })
        .await
        .map_err(|e| Error::io("joining the tar writer", std::io::Error::other(e)))?;
        let result = joined
            .map_err(|cause| Error::Assemble {
                layer: id.clone(),
                cause,
            })
            .map_err(|e| self.client.explain(e, &during));
        let release = self.release().await;
        let (assembled, out) = result?;
        release?;
        check_against(&expected, &assembled)?;
        Ok((assembled, out))
    }

    /// End of use: the helper unpins the layer. Idempotent.
    pub async fn release(&mut self) -> Result<()> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if std::mem::replace(&mut self.released, true) {
            return Ok(());
        }
        let r: Result<(Empty, _)> = self
            .client
            .call(
                method::RELEASE_LAYER,
                &ReleaseLayerParams {
                    handle: self.handle,
                },
            )
            .await;
        r.map(|_| ())
    }
}

fn client_layer_name(handle: u64) -> String {
    format!("handle {handle}")
}

/// Checks a rebuilt tar against the layer record: the digest must equal the diff id and the
/// length the recorded size (when known). A layer without a diff id cannot be verified, which
/// is an error too: nothing else vouches for the bytes.
pub fn check_against(info: &LayerInfo, a: &AssembledTar) -> Result<()> {
    let size_ok = info.diff_size.is_none_or(|s| s == a.size);
    match &info.diff_id {
        Some(d) if *d == a.digest && size_ok => Ok(()),
        Some(d) => Err(Error::DigestMismatch {
            layer: info.id.clone(),
            expected: match info.diff_size {
                Some(s) => format!("{d} ({s} bytes)"),
                None => d.clone(),
            },
            actual: format!("{} ({} bytes)", a.digest, a.size),
        }),
        None => Err(Error::DigestMismatch {
            layer: info.id.clone(),
            expected: "no diff id recorded".into(),
            actual: format!("{} ({} bytes)", a.digest, a.size),
        }),
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if !self.released
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let client = self.client.clone();
            let handle = self.handle;
            rt.spawn(async move {
                let _: Result<(Empty, _)> = client
                    .call(method::RELEASE_LAYER, &ReleaseLayerParams { handle })
                    .await;
            });
        }
    }
}
