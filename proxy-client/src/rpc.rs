//! JSON-RPC calls over the jsonrpc-fdpass transport: request ids are matched to replies by a
//! reader task, so any number of calls may be in flight at once.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cstor_protocol::{ErrorData, RpcError};
use jsonrpc_fdpass::{JsonRpcMessage, JsonRpcRequest, MessageWithFds, UnixSocketTransport};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

/// The largest reply accepted. Replies are small but for `GetImage`, which carries the
/// manifest and config (a config lists every layer and history entry); far above any real
/// image, far below what would hurt.
const MAX_REPLY: usize = 64 << 20;

type Waiter = oneshot::Sender<std::result::Result<(Value, Vec<OwnedFd>), RpcError>>;

/// Why a call failed below the application level.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The helper replied with an error.
    Remote(RpcError),
    /// The connection is gone (the reason is the reader's last observation).
    Closed(String),
    /// No reply in time.
    Timeout,
    /// Sending failed.
    Send(String),
}

/// A connection to a helper.
pub(crate) struct Rpc {
    sender: tokio::sync::Mutex<jsonrpc_fdpass::Sender>,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    closed: watch::Receiver<Option<String>>,
    reader: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn from_wire(e: &jsonrpc_fdpass::JsonRpcError<'static>) -> RpcError {
    let data = e
        .data()
        .and_then(|raw| serde_json::from_str::<ErrorData>(raw.get()).ok())
        .map(Box::new);
    RpcError {
        code: e.code(),
        message: e.message().to_owned(),
        data,
    }
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("next_id", &self.next_id)
            .field("closed", &*self.closed.borrow())
            .finish_non_exhaustive()
    }
}

impl Rpc {
    /// Wraps a connected socket; must be called inside a tokio runtime.
    pub(crate) fn new(sock: OwnedFd) -> std::io::Result<Self> {
        let std_sock = std::os::unix::net::UnixStream::from(sock);
        std_sock.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std_sock)?;
        let (mut sender, mut receiver) = UnixSocketTransport::new(stream).split();
        if let Some(n) = NonZeroUsize::new(240) {
            sender.set_max_fds_per_sendmsg(n);
        }
        receiver.set_max_message_size(MAX_REPLY);
        let pending: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let (closed_tx, closed) = watch::channel(None);
        let p = pending.clone();
        let reader = tokio::spawn(async move {
            let reason = loop {
                match receiver.receive().await {
                    Ok(MessageWithFds {
                        message: JsonRpcMessage::Response(r),
                        file_descriptors,
                    }) => {
                        let Some(id) = r.id.as_u64() else {
                            // id null: the helper could not attribute an error to a request.
                            if let Some(e) = &r.error {
                                tracing::warn!("helper reported: {}", from_wire(e));
                            }
                            continue;
                        };
                        let Some(w) = lock(&p).remove(&id) else {
                            tracing::warn!(id, "reply to no pending request");
                            continue;
                        };
                        let out = match (&r.error, r.result) {
                            (Some(e), _) => Err(from_wire(e)),
                            (None, Some(v)) => Ok((v, file_descriptors)),
                            (None, None) => Ok((Value::Null, file_descriptors)),
                        };
                        let _ = w.send(out);
                    }
                    Ok(other) => {
                        tracing::warn!("unexpected message from the helper: {:?}", other.message);
                    }
                    Err(jsonrpc_fdpass::Error::ConnectionClosed) => {
                        break "the helper closed the connection".to_owned();
                    }
                    Err(e) => break format!("reading from the helper: {e}"),
                }
            };
            tracing::debug!("rpc reader stopped: {reason}");
            let _ = closed_tx.send(Some(reason));
            // Dropping the waiters wakes every pending call.
            lock(&p).clear();
        });
        Ok(Self {
            sender: tokio::sync::Mutex::new(sender),
            pending,
            next_id: AtomicU64::new(1),
            closed,
            reader,
        })
    }

    fn closed_reason(&self) -> String {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "the connection closed".into())
    }

    /// Calls `method` and waits for its reply.
    pub(crate) async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Option<Duration>,
    ) -> std::result::Result<(Value, Vec<OwnedFd>), CallError> {
        if self.closed.borrow().is_some() {
            return Err(CallError::Closed(self.closed_reason()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let req = JsonRpcRequest::new(method.to_owned(), Some(params), Value::from(id));
        let sent = self
            .sender
            .lock()
            .await
            .send(MessageWithFds::new(
                JsonRpcMessage::Request(req),
                Vec::new(),
            ))
            .await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(match e {
                jsonrpc_fdpass::Error::Io(_) | jsonrpc_fdpass::Error::ConnectionClosed => {
                    CallError::Closed(format!("sending {method}: {e}"))
                }
                other => CallError::Send(other.to_string()),
            });
        }
        let reply = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(r) => r,
                Err(_) => {
                    lock(&self.pending).remove(&id);
                    return Err(CallError::Timeout);
                }
            },
            None => rx.await,
        };
        match reply {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Remote(e)),
            Err(_) => Err(CallError::Closed(self.closed_reason())),
        }
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
