//! The JSON-RPC server: one [`Connection`] per client, a dispatcher shared by the socket
//! transport and the `--stdio` debug transport.

pub mod ostree;
pub mod producer;
pub mod session;
pub mod socket;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cstor_protocol::{
    Empty, ErrorCode, FetchFdsParams, GetImageParams, GetLayerParams, GetLayerResult,
    InitializeParams, InitializeResult, KeepAliveParams, KeepAliveResult, Limits, ListImagesResult,
    PROTOCOL_VERSION, ReleaseLayerParams, RpcError, StreamInfo, capability, method, stream,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::storage::Storage;
use session::{EndReason, Session};

/// Settings of a serving helper.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A layer handle is released after this long without a request naming it.
    pub lease: Duration,
    /// Layer handles open at once per connection.
    pub max_open_layers: u32,
    /// Most fds per `FetchFds` reply (kept below the kernel's SCM_RIGHTS limit of 253).
    pub max_fds_per_message: u32,
    /// Content fds opened ahead of the client, per layer.
    pub max_fds_queued: u32,
    /// `--stdio`: write each layer's rebuilt tar here.
    pub dump_tar: Option<PathBuf>,
    /// `--stdio`: most stream entries described per `GetLayer`.
    pub describe_limit: usize,
    /// The largest request read (a socket message or a `--stdio` line). Requests are a few
    /// hundred bytes; the bound keeps a peer from making the helper buffer and parse
    /// megabytes (a JSON array parses into about 70 bytes per element).
    pub max_request_bytes: u32,
    /// Requests handled at once per connection; the next one is read when one is answered,
    /// so a peer that pipelines requests without reading replies stops being read instead of
    /// growing the helper.
    pub max_requests_in_flight: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(120),
            max_open_layers: 64,
            max_fds_per_message: 200,
            max_fds_queued: 512,
            dump_tar: None,
            describe_limit: 100_000,
            max_request_bytes: 64 << 10,
            max_requests_in_flight: 64,
        }
    }
}

impl ServerConfig {
    /// Layers a client is expected to stream at once; fds are sized for that many.
    pub const LAYERS_AT_ONCE: usize = 4;

    /// Shrinks the per-layer fd queue (and with it the most fds per reply) to a share of
    /// `budget`, the fds this process may still open (see [`cstor_protocol::fds::budget`]),
    /// so that [`Self::LAYERS_AT_ONCE`] layers streaming at once fit: a helper at its fd
    /// limit fails the layer it is opening a file for. The queue keeps at least 8 fds.
    ///
    /// A layer holds its queue and the reply being sent (taken off the queue) at once, so
    /// the two share the layer's part of the budget.
    ///
    /// ```
    /// use cstor_helper::server::ServerConfig;
    /// let c = ServerConfig::default().fit_fd_budget(1024 - 64);
    /// assert_eq!((c.max_fds_queued, c.max_fds_per_message), (120, 120));
    /// assert!(c.fds_held() <= 1024);
    /// ```
    pub fn fit_fd_budget(mut self, budget: usize) -> Self {
        let per_layer = u32::try_from(budget / Self::LAYERS_AT_ONCE).unwrap_or(u32::MAX);
        if self.max_fds_queued.saturating_add(self.max_fds_per_message) > per_layer {
            self.max_fds_per_message = self.max_fds_per_message.min(per_layer / 2).max(4);
            self.max_fds_queued = per_layer
                .saturating_sub(self.max_fds_per_message)
                .min(self.max_fds_queued)
                .max(4);
        }
        self.max_fds_per_message = self.max_fds_per_message.min(self.max_fds_queued);
        self
    }

    /// The most fds the helper holds with [`Self::LAYERS_AT_ONCE`] layers streaming: each
    /// layer's queue and a reply being sent, plus [`cstor_protocol::fds::RESERVE`].
    pub fn fds_held(&self) -> usize {
        Self::LAYERS_AT_ONCE * (self.max_fds_queued as usize + self.max_fds_per_message as usize)
            + cstor_protocol::fds::RESERVE
    }
}

/// How replies reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket with fd passing.
    Socket,
    /// JSON lines on stdin/stdout; fds are described instead of passed.
    Stdio,
}

/// A successful reply: the result and the fds it carries.
#[derive(Debug)]
pub struct Reply {
    /// The JSON-RPC `result`.
    pub result: Value,
    /// Fds attached in order.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn of<T: Serialize>(v: &T) -> Result<Self, RpcError> {
        Ok(Self {
            result: to_value(v)?,
            fds: Vec::new(),
        })
    }
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v)
        .map_err(|e| RpcError::new(ErrorCode::Internal, format!("serializing the reply: {e}")))
}

fn params<T: DeserializeOwned>(method: &str, p: Option<Value>) -> Result<T, RpcError> {
    // Absent params mean an empty object, so `{"method":"ListImages"}` works.
    let v = match p {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v) => v,
    };
    serde_json::from_value(v).map_err(|e| {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params for {method}: {e}"),
        )
    })
}

/// What the helper serves: its storage and settings.
#[derive(Debug)]
pub struct Helper {
    /// The storage.
    pub storage: Storage,
    /// Settings.
    pub config: ServerConfig,
}

/// One client's state.
#[derive(Debug)]
pub struct Connection {
    helper: Arc<Helper>,
    transport: Transport,
    initialized: AtomicBool,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// `GetLayer` calls between their check against `max_open_layers` and the insertion of
    /// their session: counted with the sessions, so that concurrent calls cannot all pass
    /// the check. Changed only under the `sessions` lock.
    opening: AtomicUsize,
    expired: Mutex<HashSet<u64>>,
    next_handle: AtomicU64,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Open ostree repositories (capability `ostree`).
    ostree: ostree::OstreeRepos,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking storage work off the async threads; a panic becomes an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, RpcError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(RpcError::from),
        Err(e) => Err(RpcError::new(
            ErrorCode::Internal,
            format!("a helper task failed: {e}"),
        )),
    }
}

impl Connection {
    /// A new connection. In `--stdio` mode no `Initialize` is required.
    pub fn new(helper: Arc<Helper>, transport: Transport) -> Arc<Self> {
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Arc::new(Self {
            helper,
            transport,
            initialized: AtomicBool::new(transport == Transport::Stdio),
            sessions: Mutex::new(HashMap::new()),
            opening: AtomicUsize::new(0),
            expired: Mutex::new(HashSet::new()),
            next_handle: AtomicU64::new(1),
            shutdown,
            ostree: Default::default(),
        })
    }

    /// Resolves once `Shutdown` was handled.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Releases every open layer (disconnect, shutdown).
    pub fn release_all(&self) {
        let all: Vec<_> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in all {
            s.end(EndReason::Released);
        }
        self.ostree.clear();
    }

    /// Ends the sessions whose lease ran out; returns how many.
    pub fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let gone: Vec<Arc<Session>> = {
            let mut map = lock(&self.sessions);
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, s)| s.expired(now))
                .map(|(h, _)| *h)
                .collect();
            ids.iter().filter_map(|h| map.remove(h)).collect()
        };
        for s in &gone {
            tracing::warn!(
                handle = s.handle,
                layer = %s.info.id,
                "lease expired; releasing the layer"
            );
            let mut expired = lock(&self.expired);
            // Remembered only to tell "expired" from "unknown"; old entries are not needed.
            if expired.len() >= 4096 {
                expired.clear();
            }
            expired.insert(s.handle);
            s.end(EndReason::Expired);
        }
        gone.len()
    }

    fn session(&self, handle: u64) -> Result<Arc<Session>, RpcError> {
        if let Some(s) = lock(&self.sessions).get(&handle) {
            return Ok(s.clone());
        }
        if lock(&self.expired).contains(&handle) {
            return Err(RpcError::new(
                ErrorCode::LeaseExpired,
                format!("the lease of layer handle {handle} ran out; the layer was released"),
            ));
        }
        Err(RpcError::new(
            ErrorCode::UnknownHandle,
            format!("no open layer has handle {handle}"),
        ))
    }

    /// Handles one request. `fds_in` is how many fds arrived with it (none are accepted).
    pub async fn dispatch(
        self: &Arc<Self>,
        method: &str,
        p: Option<Value>,
        fds_in: usize,
    ) -> Result<Reply, RpcError> {
        if fds_in > 0 {
            let what = match self.transport {
                Transport::Socket => format!("{fds_in} were attached (they were closed)"),
                Transport::Stdio => format!("the request announces {fds_in}"),
            };
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                format!("{method} takes no file descriptors, but {what}"),
            ));
        }
        if method != method::INITIALIZE && !self.initialized.load(Ordering::Acquire) {
            if !method::ALL.contains(&method)
                && !cstor_protocol::ostree::method::ALL.contains(&method)
            {
                return Err(method_not_found(method));
            }
            return Err(RpcError::new(
                ErrorCode::NotInitialized,
                format!("call Initialize before {method}"),
            ));
        }
        match method {
            method::INITIALIZE => self.initialize(params(method, p)?),
            method::LIST_IMAGES => {
                let h = self.helper.clone();
                let images = blocking(move || h.storage.list_images()).await?;
                Reply::of(&ListImagesResult { images })
            }
            method::GET_IMAGE => {
                let GetImageParams { reference } = params(method, p)?;
                let h = self.helper.clone();
                let image = blocking(move || h.storage.get_image(&reference)).await?;
                Reply::of(&image)
            }
            method::GET_LAYER => self.get_layer(params(method, p)?).await,
            method::FETCH_FDS => {
                let FetchFdsParams { handle, max } = params(method, p)?;
                if self.transport == Transport::Stdio {
                    return Err(stdio_unavailable(method));
                }
                let s = self.session(handle)?;
                s.renew();
                let max = max.clamp(1, self.helper.config.max_fds_per_message);
                let (r, fds) = s.fetch(max).await?;
                s.renew();
                Ok(Reply {
                    result: to_value(&r)?,
                    fds,
                })
            }
            method::KEEP_ALIVE => {
                let KeepAliveParams { handle } = params(method, p)?;
                let lease = self.session(handle)?.renew();
                Reply::of(&KeepAliveResult {
                    lease_ms: lease.as_millis() as u64,
                })
            }
            method::RELEASE_LAYER => {
                let ReleaseLayerParams { handle } = params(method, p)?;
                let s = lock(&self.sessions).remove(&handle);
                match s {
                    Some(s) => {
                        s.end(EndReason::Released);
                        Reply::of(&Empty {})
                    }
                    None => Err(self.session(handle).err().unwrap_or_else(|| {
                        RpcError::new(ErrorCode::UnknownHandle, "no such handle")
                    })),
                }
            }
            method::SHUTDOWN => {
                let _: Empty = params(method, p)?;
                self.release_all();
                self.shutdown.send_replace(true);
                Reply::of(&Empty {})
            }
            m if cstor_protocol::ostree::method::ALL.contains(&m) => {
                self.dispatch_ostree(m, p).await
            }
            other => Err(method_not_found(other)),
        }
    }

    fn initialize(&self, p: InitializeParams) -> Result<Reply, RpcError> {
        let pidfd = if p.helper_pidfd && self.transport == Transport::Socket {
            Some(
                rustix::process::pidfd_open(
                    rustix::process::getpid(),
                    rustix::process::PidfdFlags::empty(),
                )
                .map_err(|e| {
                    RpcError::new(
                        ErrorCode::Internal,
                        format!("opening a pidfd of the helper (Linux 5.3 or later): {e}"),
                    )
                })?,
            )
        } else {
            None
        };
        if p.protocol_version.major != PROTOCOL_VERSION.major {
            return Err(RpcError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this helper speaks protocol {PROTOCOL_VERSION}; the client asked for {}",
                    p.protocol_version
                ),
            ));
        }
        tracing::debug!(client = ?p.client, version = %p.protocol_version, "initialized");
        self.initialized.store(true, Ordering::Release);
        let c = &self.helper.config;
        let mut reply = Reply::of(&InitializeResult {
            protocol_version: PROTOCOL_VERSION,
            helper_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: capability::ALL.iter().map(|s| s.to_string()).collect(),
            storage: self.helper.storage.info(),
            limits: Limits {
                max_fds_per_message: c.max_fds_per_message,
                max_fds_queued: c.max_fds_queued,
                lease_timeout_ms: c.lease.as_millis() as u64,
                max_open_layers: c.max_open_layers,
                max_request_bytes: Some(c.max_request_bytes),
                max_requests_in_flight: Some(c.max_requests_in_flight),
            },
            pidfd: pidfd.as_ref().map(|_| 0),
        })?;
        reply.fds.extend(pidfd);
        Ok(reply)
    }

    /// Counts a `GetLayer` against `max_open_layers` before the layer is opened (which
    /// awaits): the slot is held until the session is inserted or the call fails.
    fn reserve_layer_slot(&self) -> Result<LayerSlot<'_>, RpcError> {
        let sessions = lock(&self.sessions);
        let max = self.helper.config.max_open_layers as usize;
        if sessions.len() + self.opening.load(Ordering::Relaxed) >= max {
            return Err(RpcError::new(
                ErrorCode::TooManyHandles,
                format!("{max} layers are open on this connection; release one first"),
            ));
        }
        self.opening.fetch_add(1, Ordering::Relaxed);
        Ok(LayerSlot { conn: Some(self) })
    }

    async fn get_layer(self: &Arc<Self>, p: GetLayerParams) -> Result<Reply, RpcError> {
        if self.transport == Transport::Stdio {
            return stdio::describe_layer(self.helper.clone(), p.layer).await;
        }
        let slot = self.reserve_layer_slot()?;
        let h = self.helper.clone();
        let wanted = p.layer.clone();
        let open = blocking(move || h.storage.open_layer(&wanted)).await?;
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let c = &self.helper.config;
        let (session, pipe) = Session::start(handle, open, c.lease, c.max_fds_queued as usize)
            .map_err(RpcError::from)?;
        let info = session.info.clone();
        slot.fill(handle, session);
        Ok(Reply {
            result: to_value(&GetLayerResult {
                handle,
                layer: info,
                stream: StreamInfo {
                    format: stream::FORMAT_NAME.into(),
                    version: stream::FORMAT_VERSION,
                    fd: 0,
                },
                described: None,
            })?,
            fds: vec![pipe],
        })
    }
}

/// A `GetLayer` counted against `max_open_layers` while its layer is being opened.
struct LayerSlot<'a> {
    /// `None` once the slot became a session.
    conn: Option<&'a Connection>,
}

impl LayerSlot<'_> {
    /// The layer is open: its session takes the slot's place, atomically for
    /// [`Connection::reserve_layer_slot`].
    fn fill(mut self, handle: u64, session: Arc<Session>) {
        if let Some(conn) = self.conn.take() {
            let mut sessions = lock(&conn.sessions);
            sessions.insert(handle, session);
            conn.opening.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for LayerSlot<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn {
            let _sessions = lock(&conn.sessions);
            conn.opening.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why `id` cannot be echoed, if it cannot: the reply must carry the request's id
/// unchanged, and a number that does not fit 64 bits (or has a fraction) would come back
/// rounded. Such a request is refused, answered with id null, rather than answered under an
/// id the client never sent. Every other JSON value is echoed as it came.
pub fn id_problem(id: &Value) -> Option<RpcError> {
    match id {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => Some(RpcError::new(
            ErrorCode::InvalidRequest,
            format!(
                "request id {n} cannot be echoed exactly: use a string, or an integer of at \
                 most 64 bits"
            ),
        )),
        _ => None,
    }
}

fn method_not_found(m: &str) -> RpcError {
    RpcError::new(
        ErrorCode::MethodNotFound,
        format!("no method {m:?}; methods are {}", method::ALL.join(", ")),
    )
}

fn stdio_unavailable(m: &str) -> RpcError {
    RpcError::new(
        ErrorCode::UnavailableInStdio,
        format!(
            "{m} passes file descriptors, which --stdio cannot; GetLayer in --stdio mode already describes every file"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_queues_fit_the_budget() {
        let d = ServerConfig::default();
        assert_eq!(d.clone().fit_fd_budget(usize::MAX).max_fds_queued, 512);
        // A hard limit of 1024: a quarter of what is left after the reserve, per layer.
        let c = d.clone().fit_fd_budget(1024 - cstor_protocol::fds::RESERVE);
        assert_eq!((c.max_fds_queued, c.max_fds_per_message), (120, 120));
        // Whatever the limit, four layers streaming stay within it (queue and reply both
        // held), down to a working minimum.
        for limit in [128usize, 256, 512, 1024, 1500, 4096, 65536] {
            let c = d
                .clone()
                .fit_fd_budget(limit - cstor_protocol::fds::RESERVE);
            assert!(c.fds_held() <= limit, "{limit}: {c:?}");
            assert!(c.max_fds_per_message <= c.max_fds_queued);
        }
        let c = d.fit_fd_budget(0);
        assert_eq!((c.max_fds_queued, c.max_fds_per_message), (4, 4));
        assert_eq!(ServerConfig::default().fds_held(), 4 * (512 + 200) + 64);
    }
}
