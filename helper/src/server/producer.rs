//! The layer stream producer: walks a layer and writes its stream, handing content files to
//! a sink as it goes. Runs on a blocking thread; the same code serves the socket and the
//! `--stdio` dump.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cstor_protocol::stream::{StreamSummary, StreamWriter};
use cstor_protocol::{ErrorCode, RpcError};

use crate::error::{Error, Result};
use crate::storage::layer_walk::{FileItem, Item, Walker};

/// Where content files go.
pub trait FdSink {
    /// Takes the content of stream fd `index` if there is room now. Returns the file back
    /// when the sink is full: the caller then flushes the stream and calls
    /// [`FdSink::push_blocking`].
    fn try_push(&mut self, index: u64, file: File) -> Result<Option<File>>;
    /// Takes the content, waiting for room.
    fn push_blocking(&mut self, index: u64, file: File) -> Result<()>;
}

/// Sees every item before it is written (for `--stdio` descriptions).
pub type Observer<'a> = &'a mut dyn FnMut(&Item, Option<u64>);

/// Writes the stream of `walker` to `out`, giving content files to `sink`.
///
/// On failure an `ERROR` record is written (best effort) and the error returned.
pub fn produce<W: Write>(
    walker: Walker,
    out: W,
    sink: &mut dyn FdSink,
    mut observer: Option<Observer<'_>>,
    cancel: &AtomicBool,
) -> Result<StreamSummary> {
    let buffered = BufWriter::with_capacity(256 << 10, out);
    let mut w = StreamWriter::new(buffered).map_err(|e| write_err(e, cancel))?;
    let r = (|| {
        for item in walker {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::new(ErrorCode::Cancelled, "the layer was released"));
            }
            let item = item?;
            match &item {
                Item::Segment(bytes) => {
                    if let Some(o) = observer.as_mut() {
                        o(&item, None);
                    }
                    w.segment(bytes).map_err(|e| write_err(e, cancel))?;
                }
                Item::File(FileItem {
                    name, size, crc64, ..
                }) => {
                    let idx = w
                        .file(name, *size, *crc64)
                        .map_err(|e| write_err(e, cancel))?;
                    if let Some(o) = observer.as_mut() {
                        o(&item, idx);
                    }
                    let Item::File(FileItem { content, .. }) = item else {
                        continue;
                    };
                    if let (Some(idx), Some(file)) = (idx, content)
                        && let Some(file) = sink.try_push(idx, file)?
                    {
                        // The client only fetches fds whose records it has read: make every
                        // record so far visible before waiting for it to make room.
                        w_flush(&mut w, cancel)?;
                        sink.push_blocking(idx, file)?;
                    }
                }
            }
        }
        Ok(())
    })();
    match r {
        Ok(()) => w.finish().map_err(|e| write_err(e, cancel)),
        Err(e) => {
            let rpc: RpcError = e.clone().into();
            // Best effort: the reader may be gone.
            let _ = w.fail(&rpc);
            Err(e)
        }
    }
}

fn w_flush<W: Write>(w: &mut StreamWriter<BufWriter<W>>, cancel: &AtomicBool) -> Result<()> {
    w.flush().map_err(|e| write_err(e, cancel))
}

fn write_err(e: io::Error, cancel: &AtomicBool) -> Error {
    if cancel.load(Ordering::Relaxed) {
        return Error::new(ErrorCode::Cancelled, "the layer was released");
    }
    if e.kind() == io::ErrorKind::BrokenPipe {
        return Error::new(
            ErrorCode::Cancelled,
            "the client closed the layer stream before its end",
        );
    }
    Error::io("writing the layer stream", e)
}

/// A pipe writer whose blocking writes give up when `cancel` is set, so a released layer's
/// producer never stays stuck on a client that stopped reading.
#[derive(Debug)]
pub struct CancellableWriter {
    fd: OwnedFd,
    cancel: Arc<AtomicBool>,
}

impl CancellableWriter {
    /// Wraps a pipe write end, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd, cancel: Arc<AtomicBool>) -> io::Result<Self> {
        rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK)?;
        Ok(Self { fd, cancel })
    }
}

impl Write for CancellableWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                // Not Interrupted: BufWriter and write_all would retry that forever.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "cancelled",
                ));
            }
            match rustix::io::write(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::AGAIN) => {
                    let mut pfd = [rustix::event::PollFd::new(
                        &self.fd,
                        rustix::event::PollFlags::OUT,
                    )];
                    let t = rustix::event::Timespec::try_from(Duration::from_millis(200))
                        .unwrap_or(rustix::event::Timespec {
                            tv_sec: 0,
                            tv_nsec: 200_000_000,
                        });
                    match rustix::event::poll(&mut pfd, Some(&t)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for CancellableWriter {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Creates the stream pipe: (read end for the client, write end for the producer). The pipe
/// is enlarged so that the producer rarely waits on the client.
pub fn stream_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // 1 MiB is the default unprivileged maximum; a failure only costs throughput.
    let _ = rustix::pipe::fcntl_setpipe_size(&w, 1 << 20);
    Ok((r, w))
}
