//! Serving a connection over an `AF_UNIX` `SOCK_STREAM` socket with fd passing, framed as
//! jsonrpc-fdpass specifies. We use the crate's transport only: its `Server` would turn every
//! handler error into -32050, so requests are dispatched and matched here.

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use cstor_protocol::{ErrorCode, RpcError};
use jsonrpc_fdpass::{
    JsonRpcError, JsonRpcMessage, JsonRpcResponse, MessageWithFds, UnixSocketTransport,
};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Connection, Helper, Transport};

/// The crate's default batch of 500 fds exceeds Linux's SCM_MAX_FD (253) and costs a failed
/// sendmsg per connection; our replies never carry more than this anyway.
const FDS_PER_SENDMSG: usize = 240;

fn to_wire(e: RpcError) -> JsonRpcError<'static> {
    JsonRpcError::owned(e.code, e.message, e.data)
}

fn error_response(e: RpcError, id: Value) -> MessageWithFds {
    MessageWithFds::new(
        JsonRpcMessage::Response(JsonRpcResponse::error(to_wire(e), id)),
        Vec::new(),
    )
}

/// How a receive error is handled.
enum Verdict {
    /// Reply with this error (id null) and keep going.
    Continue(RpcError),
    /// Reply with this error (id null) and close: the byte stream cannot be trusted.
    Close(RpcError),
    /// The peer went away.
    Gone,
}

fn classify(e: jsonrpc_fdpass::Error) -> Verdict {
    use jsonrpc_fdpass::Error as E;
    match e {
        E::ConnectionClosed => Verdict::Gone,
        // A complete JSON value that is not a valid JSON-RPC message: the framing is intact.
        E::Json(j) if j.is_data() => Verdict::Continue(RpcError::new(
            ErrorCode::InvalidRequest,
            format!("not a JSON-RPC 2.0 message: {j}"),
        )),
        E::InvalidMessage(m) => Verdict::Continue(RpcError::new(
            ErrorCode::InvalidRequest,
            format!("not a JSON-RPC 2.0 message: {m}"),
        )),
        E::Json(j) => Verdict::Close(RpcError::new(
            ErrorCode::ParseError,
            format!("the bytes received are not JSON ({j}); closing the connection"),
        )),
        E::MismatchedCount { expected, found } => Verdict::Close(RpcError::new(
            ErrorCode::FileDescriptorError,
            format!(
                "a message announced {expected} fds but {found} arrived before the next message; closing the connection"
            ),
        )),
        E::MessageTooLarge { limit } => Verdict::Close(RpcError::new(
            ErrorCode::InvalidRequest,
            format!("a request is larger than {limit} bytes; closing the connection"),
        )),
        E::FramingError => Verdict::Close(RpcError::new(
            ErrorCode::ParseError,
            "framing error; closing the connection",
        )),
        E::Io(io) => {
            tracing::warn!("socket error: {io}");
            Verdict::Gone
        }
        other => Verdict::Close(RpcError::new(
            ErrorCode::FileDescriptorError,
            format!("{other}; closing the connection"),
        )),
    }
}

/// Serves one client on `sock` until it disconnects or sends `Shutdown`. Every layer it left
/// open is released before returning.
pub async fn serve(helper: Arc<Helper>, sock: OwnedFd) -> std::io::Result<()> {
    let std_sock = std::os::unix::net::UnixStream::from(sock);
    std_sock.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_sock)?;
    let (mut sender, mut receiver) = UnixSocketTransport::new(stream).split();
    if let Some(n) = NonZeroUsize::new(FDS_PER_SENDMSG) {
        sender.set_max_fds_per_sendmsg(n);
    }
    receiver.set_max_message_size(helper.config.max_request_bytes as usize);
    // A permit per request being handled: the next message is read only with one in hand.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        helper.config.max_requests_in_flight.max(1) as usize,
    ));
    let (tx, mut rx) = mpsc::channel::<MessageWithFds>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Err(e) = sender.send(m).await {
                tracing::info!("client went away while sending a reply: {e}");
                break;
            }
        }
    });

    let conn = Connection::new(helper.clone(), Transport::Socket);
    let reaper = {
        let conn = conn.clone();
        let tick =
            (helper.config.lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut t = tokio::time::interval(tick);
            loop {
                t.tick().await;
                conn.expire_leases();
            }
        })
    };

    loop {
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => p,
            _ = conn.shutdown_requested() => break,
        };
        let Ok(permit) = permit else { break };
        let msg = tokio::select! {
            m = receiver.receive() => m,
            _ = conn.shutdown_requested() => break,
        };
        match msg {
            Ok(MessageWithFds {
                message,
                file_descriptors,
            }) => match message {
                JsonRpcMessage::Request(req) => {
                    let conn = conn.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let nfds = file_descriptors.len();
                        // Whatever was attached is closed here: we accept no fds.
                        drop(file_descriptors);
                        if let Some(e) = super::id_problem(&req.id) {
                            let _ = tx.send(error_response(e, Value::Null)).await;
                            return;
                        }
                        if req.jsonrpc != "2.0" {
                            let e = RpcError::new(
                                ErrorCode::InvalidRequest,
                                format!("jsonrpc must be \"2.0\", not {:?}", req.jsonrpc),
                            );
                            let _ = tx.send(error_response(e, req.id)).await;
                            return;
                        }
                        tracing::debug!(method = %req.method, id = %req.id, "request");
                        let reply = conn.dispatch(&req.method, req.params, nfds).await;
                        let out = match reply {
                            Ok(r) => MessageWithFds::new(
                                JsonRpcMessage::Response(JsonRpcResponse::success(
                                    r.result, req.id,
                                )),
                                r.fds,
                            ),
                            Err(e) => {
                                tracing::debug!(method = %req.method, "error: {e}");
                                error_response(e, req.id)
                            }
                        };
                        let _ = tx.send(out).await;
                    });
                }
                JsonRpcMessage::Notification(n) => {
                    // JSON-RPC: executed, never answered. The protocol defines none, so a
                    // client sending one only learns of failures from the log.
                    let conn = conn.clone();
                    let nfds = file_descriptors.len();
                    drop(file_descriptors);
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = conn.dispatch(&n.method, n.params, nfds).await {
                            tracing::warn!(method = %n.method, "notification failed: {e}");
                        }
                    });
                }
                JsonRpcMessage::Response(_) => {
                    tracing::warn!("ignoring a response: the helper sends no requests");
                }
            },
            Err(e) => match classify(e) {
                Verdict::Gone => break,
                Verdict::Continue(err) => {
                    tracing::info!("bad message: {err}");
                    let _ = tx.send(error_response(err, Value::Null)).await;
                }
                Verdict::Close(err) => {
                    tracing::warn!("closing the connection: {err}");
                    let _ = tx.send(error_response(err, Value::Null)).await;
                    break;
                }
            },
        }
    }
    reaper.abort();
    conn.release_all();
    // Let in-flight handlers finish their replies, then let the writer drain.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(())
}
