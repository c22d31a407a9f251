//! The varlink server: the helper as an `org.composefs.Oci` producer for composefs
//! consumers (`cstor-helper --varlink SOCKET`, or a socket systemd passes).
//!
//! Varlink messages are JSON objects, each followed by a NUL byte, on a Unix stream socket.
//! A call is answered in order; a call made with `"more": true` may be answered by several
//! replies, all but the last with `"continues": true`. File descriptors ride on a reply's
//! bytes with `SCM_RIGHTS`, one batch per reply, which is how zlink (upstream's varlink
//! crate) reads them back. The interface served is in [`oci`]; the layer stream in
//! [`stream`]. Besides `org.composefs.Oci`, `org.varlink.service.GetInfo` and
//! `GetInterfaceDescription` answer, so that generic varlink tools can name the service and
//! show what it serves.

pub mod oci;
pub mod stream;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde_json::{Map, Value, json};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use crate::server::Helper;
use oci::{GetLayerParams, OciError, Served};

/// The interface of varlink's own service methods and errors.
const SERVICE: &str = "org.varlink.service";

/// The description of [`SERVICE`], as much of it as this server answers.
const SERVICE_DESCRIPTION: &str = "\
# The varlink service interface: what any varlink service says about itself.
interface org.varlink.service

# The service's vendor, product, version, home page and the interfaces it serves.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# The description of one of the interfaces served, in the varlink interface language.
method GetInterfaceDescription(interface: string) -> (description: string)

error InterfaceNotFound (interface: string)
error MethodNotFound (method: string)
error MethodNotImplemented (method: string)
error InvalidParameter (parameter: string)
error PermissionDenied ()
error ExpectedMore ()
";

/// Serves varlink connections accepted on `listener` until the process ends.
pub async fn serve(helper: Arc<Helper>, listener: UnixListener) -> std::io::Result<()> {
    let served = Arc::new(Served::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of fds, or a connection reset before accept: the listener is still fine.
            Err(e) => {
                tracing::warn!("accepting a varlink connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(why) = peer_allowed(&stream) {
            tracing::warn!("refusing a varlink connection: {why}");
            continue;
        }
        let helper = helper.clone();
        let served = served.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(helper, served, stream).await {
                tracing::info!("varlink connection ended: {e}");
            }
        });
    }
}

/// Serves the one varlink connection on `stream`, a socket the process that started the
/// helper passed (`--varlink-stdin`: how cstor brokers layers to a repository service), until
/// the peer closes it.
pub async fn serve_connected(helper: Arc<Helper>, stream: UnixStream) -> std::io::Result<()> {
    peer_allowed(&stream).map_err(std::io::Error::other)?;
    connection(helper, Arc::new(Served::default()), stream).await
}

/// Only a peer with the helper's own effective uid is served. The helper reads files the
/// peer may not be able to (it sends those inline), so a root helper must not serve other
/// users. Inside `podman unshare` the user that started it appears as uid 0, like the helper;
/// other users appear as the overflow uid and are refused.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    let me = rustix::process::geteuid();
    if cred.uid != me {
        return Err(format!(
            "peer uid {} (pid {}) is not the helper's uid {}",
            cred.uid.as_raw(),
            cred.pid.as_raw_nonzero(),
            me.as_raw()
        ));
    }
    Ok(())
}

/// One varlink call, as parsed from the wire.
#[derive(Debug)]
struct Call {
    method: String,
    parameters: Value,
    more: bool,
    oneway: bool,
}

/// One reply: its JSON and the fds it carries.
#[derive(Debug)]
struct Reply {
    body: Value,
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn ok(parameters: Value, continues: bool) -> Self {
        let mut body = Map::new();
        body.insert("parameters".into(), parameters);
        if continues {
            body.insert("continues".into(), Value::Bool(true));
        }
        Self {
            body: Value::Object(body),
            fds: Vec::new(),
        }
    }

    fn error(interface: &str, name: &str, parameters: Value) -> Self {
        Self {
            body: json!({ "error": format!("{interface}.{name}"), "parameters": parameters }),
            fds: Vec::new(),
        }
    }

    fn oci_error(e: OciError) -> Self {
        Self::error(oci::INTERFACE, e.name, e.parameters)
    }

    fn invalid_parameter(parameter: &str) -> Self {
        Self::error(
            SERVICE,
            "InvalidParameter",
            json!({ "parameter": parameter }),
        )
    }
}

async fn connection(
    helper: Arc<Helper>,
    served: Arc<Served>,
    stream: UnixStream,
) -> std::io::Result<()> {
    let max = helper.config.max_request_bytes as usize;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let Some(end) = buf.iter().position(|&b| b == 0) else {
            if buf.len() > max {
                tracing::warn!("a varlink message is larger than {max} bytes; closing");
                return Ok(());
            }
            if !receive(&stream, &mut buf).await? {
                return Ok(());
            }
            continue;
        };
        let message: Vec<u8> = buf.drain(..=end).take(end).collect();
        let call = match parse_call(&message) {
            Ok(call) => call,
            Err(Unreadable::Answer(r)) => {
                send(&stream, &r).await?;
                continue;
            }
            Err(Unreadable::Close(why)) => {
                // Not a JSON object: nothing to answer, and nothing suggests that what
                // follows is better. Other connections are not affected.
                tracing::warn!("closing a varlink connection: {why}");
                return Ok(());
            }
        };
        tracing::debug!(method = %call.method, more = call.more, "varlink call");
        let replies = dispatch(
            &helper,
            &served,
            call.method.clone(),
            call.parameters,
            call.more,
        )
        .await;
        if call.oneway {
            continue;
        }
        for r in replies {
            send(&stream, &r).await?;
        }
    }
}

/// Why a message is not a call.
#[derive(Debug)]
enum Unreadable {
    /// A JSON object without a usable `method` or `parameters`: answered, and the
    /// connection goes on.
    Answer(Reply),
    /// Not a JSON object at all.
    Close(String),
}

fn parse_call(message: &[u8]) -> Result<Call, Unreadable> {
    let v: Value =
        serde_json::from_slice(message).map_err(|e| Unreadable::Close(format!("not JSON: {e}")))?;
    let Value::Object(mut o) = v else {
        return Err(Unreadable::Close("a call must be a JSON object".into()));
    };
    let Some(Value::String(method)) = o.remove("method") else {
        return Err(Unreadable::Answer(Reply::invalid_parameter("method")));
    };
    let flag = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
    let more = flag(&o, "more");
    let oneway = flag(&o, "oneway");
    let parameters = match o.remove("parameters") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err(Unreadable::Answer(Reply::invalid_parameter("parameters"))),
    };
    Ok(Call {
        method,
        parameters,
        more,
        oneway,
    })
}

/// Takes parameter `name` of a call, deserialized; a missing or ill-typed one is varlink's
/// `InvalidParameter` naming it.
fn param<T: serde::de::DeserializeOwned>(p: &Value, name: &str) -> Result<T, Reply> {
    let v = p.get(name).cloned().unwrap_or(Value::Null);
    serde_json::from_value(v).map_err(|e| {
        tracing::info!("invalid varlink parameter {name}: {e}");
        Reply::invalid_parameter(name)
    })
}

async fn dispatch(
    helper: &Arc<Helper>,
    served: &Arc<Served>,
    method: String,
    p: Value,
    more: bool,
) -> Vec<Reply> {
    let r: Result<Vec<Reply>, Reply> = async {
        match method.as_str() {
            "org.composefs.Oci.GetInfo" => Ok(vec![Reply::ok(oci::get_info(), false)]),
            "org.composefs.Oci.HasLayer" => {
                let _handle: u64 = param(&p, "handle")?;
                let diff_id: String = param(&p, "diff_id")?;
                let v = oci::has_layer(helper.clone(), diff_id)
                    .await
                    .map_err(Reply::oci_error)?;
                Ok(vec![Reply::ok(v, false)])
            }
            "org.composefs.Oci.GetLayer" => {
                // The handle names a repository in the repository service; a store has one.
                let _handle: u64 = param(&p, "handle")?;
                let params: GetLayerParams = param(&p, "params")?;
                let layer = oci::get_layer(helper.clone(), served.clone(), params, more)
                    .await
                    .map_err(Reply::oci_error)?;
                let n = layer.frames.len();
                Ok(layer
                    .frames
                    .into_iter()
                    .enumerate()
                    .map(|(i, fds)| {
                        let mut r =
                            Reply::ok(json!({ "dir_count": layer.dir_count }), more && i + 1 < n);
                        r.fds = fds;
                        r
                    })
                    .collect())
            }
            "org.varlink.service.GetInfo" => Ok(vec![Reply::ok(
                json!({
                    "vendor": "cstor-proxy",
                    "product": "cstor-helper",
                    "version": env!("CARGO_PKG_VERSION"),
                    "url": "https://github.com/cstor-proxy/cstor-proxy",
                    "interfaces": [SERVICE, oci::INTERFACE],
                }),
                false,
            )]),
            "org.varlink.service.GetInterfaceDescription" => {
                let interface: String = param(&p, "interface")?;
                let description = match interface.as_str() {
                    SERVICE => SERVICE_DESCRIPTION,
                    oci::INTERFACE => oci::DESCRIPTION,
                    _ => {
                        return Err(Reply::error(
                            SERVICE,
                            "InterfaceNotFound",
                            json!({ "interface": interface }),
                        ));
                    }
                };
                Ok(vec![Reply::ok(
                    json!({ "description": description }),
                    false,
                )])
            }
            // PutLayer, FinalizeImage...: a read-only source has no repository to write to.
            m if m.starts_with("org.composefs.Oci.") || m.starts_with("org.varlink.service.") => {
                Err(Reply::error(
                    SERVICE,
                    "MethodNotFound",
                    json!({ "method": m }),
                ))
            }
            m => {
                let interface = m.rsplit_once('.').map(|(i, _)| i).unwrap_or(m);
                Err(Reply::error(
                    SERVICE,
                    "InterfaceNotFound",
                    json!({ "interface": interface }),
                ))
            }
        }
    }
    .await;
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(%method, error = %e.body, "varlink error");
            vec![e]
        }
    }
}

/// Reads what is available into `buf`; false at end of stream. Fds a peer attaches are
/// closed: no method served takes any.
async fn receive(stream: &UnixStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 8192];
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(253))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let got = rustix::net::recvmsg(
                stream.as_fd(),
                &mut iov,
                &mut anc,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )?;
            let mut dropped = 0usize;
            for m in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = m {
                    dropped += fds.count();
                }
            }
            if dropped > 0 {
                tracing::info!(dropped, "closed fds attached to a varlink call");
            }
            Ok(got.bytes)
        });
        match r {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Sends one reply, its fds attached to its first bytes.
async fn send(stream: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(&reply.body).map_err(std::io::Error::other)?;
    bytes.push(0);
    let mut pos = 0;
    while pos < bytes.len() {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            let borrowed: Vec<_> = if pos == 0 {
                reply.fds.iter().map(|f| f.as_fd()).collect()
            } else {
                Vec::new()
            };
            let mut space =
                vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            if !borrowed.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                return Err(std::io::Error::other("fd batch too large for one message"));
            }
            Ok(rustix::net::sendmsg(
                stream.as_fd(),
                &[IoSlice::new(&bytes[pos..])],
                &mut anc,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            )?)
        });
        match r {
            Ok(n) => pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The listening socket systemd passed (`LISTEN_FDS`, `LISTEN_PID`), if any: fd 3.
///
/// The fd is taken by duplicating it through a pidfd of this very process (Linux 5.6), which
/// needs no unsafe code; the original fd 3 stays open, unused. The variables stay set
/// (removing them needs `unsafe` in edition 2024); the helper starts no processes that could
/// mistake the socket for their own, and `LISTEN_PID` names only this process.
pub fn activation_listener() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let me = rustix::process::getpid().as_raw_nonzero().get();
    if pid.trim().parse::<i32>().ok() != Some(me) {
        return Ok(None);
    }
    let n: u32 = fds.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS={fds:?} is not a number"),
        )
    })?;
    if n != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("systemd passed {n} sockets; the helper serves exactly one"),
        ));
    }
    let pidfd = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )?;
    let fd = rustix::process::pidfd_getfd(&pidfd, 3, rustix::process::PidfdGetfdFlags::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "fd 3 (LISTEN_FDS) is not a socket",
        ));
    }
    Ok(Some(std::os::unix::net::UnixListener::from(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(r: Result<Call, Unreadable>) -> Value {
        match r {
            Err(Unreadable::Answer(reply)) => reply.body,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn calls_are_parsed_as_varlink_frames_them() {
        let c = parse_call(br#"{"method":"a.b.C","parameters":{"x":1},"more":true}"#).unwrap();
        assert_eq!(
            (c.method.as_str(), c.more, c.oneway),
            ("a.b.C", true, false)
        );
        assert_eq!(c.parameters, json!({"x": 1}));
        // Absent or null parameters are an empty object; flags of the wrong type are off.
        let c = parse_call(br#"{"method":"a.b.C","parameters":null,"more":"yes"}"#).unwrap();
        assert_eq!((c.parameters, c.more), (json!({}), false));
        assert_eq!(
            answer(parse_call(br#"{"parameters":{}}"#))["parameters"]["parameter"],
            "method"
        );
        assert_eq!(
            answer(parse_call(br#"{"method":"a.b.C","parameters":[1]}"#))["error"],
            "org.varlink.service.InvalidParameter"
        );
        for closing in [&b"[1]"[..], b"\xff", b"", b"{\"method\":"] {
            assert!(matches!(parse_call(closing), Err(Unreadable::Close(_))));
        }
    }

    #[test]
    fn replies_continue_only_when_asked() {
        assert_eq!(Reply::ok(json!({}), false).body, json!({"parameters": {}}));
        assert_eq!(
            Reply::ok(json!({}), true).body,
            json!({"parameters": {}, "continues": true})
        );
        let e = Reply::oci_error(OciError::no_such_layer("x"));
        assert_eq!(
            e.body,
            json!({"error": "org.composefs.Oci.NoSuchLayer", "parameters": {"diff_id": "x"}})
        );
    }
}
