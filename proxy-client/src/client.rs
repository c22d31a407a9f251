//! The typed client.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use cstor_protocol::{
    Empty, GetImageParams, GetImageResult, GetLayerParams, GetLayerResult, ImageSummary,
    InitializeParams, InitializeResult, ListImagesResult, PROTOCOL_VERSION, method,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::rpc::{CallError, Rpc};
use crate::spawn::{HelperConfig, HelperProcess};

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) rpc: Rpc,
    pub(crate) process: Option<HelperProcess>,
    pub(crate) info: InitializeResult,
    pub(crate) deadlines: Deadlines,
}

/// How long the helper may take to answer, and how often an open layer pings it (see
/// [`HelperConfig::reply_timeout`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub(crate) reply: Duration,
    pub(crate) keepalive: Duration,
}

/// A connection to a `cstor-helper`, cheap to clone and usable from many tasks at once.
///
/// Works on any tokio runtime, including `current_thread`. Blocking work (reading layer
/// streams, copying content) is done by the caller on blocking threads.
///
/// ```no_run
/// # async fn f() -> Result<(), cstor_proxy_client::Error> {
/// use cstor_proxy_client::{Client, HelperConfig};
/// let client = Client::spawn(&HelperConfig::default()).await?;
/// for image in client.list_images().await? {
///     println!("{} {:?}", image.id, image.names);
/// }
/// let image = client.get_image("busybox").await?;
/// println!("{} layers", image.layers.len());
/// client.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl Client {
    /// Starts a helper as `config` says and performs the `Initialize` handshake.
    ///
    /// Fails with [`Error::HelperNotFound`], [`Error::Spawn`], [`Error::HelperDied`] (with
    /// its exit status and stderr) when it exits during the handshake,
    /// [`Error::HelperUnresponsive`] when it does not answer within
    /// `config.handshake_timeout` (it is killed), or [`Error::Version`].
    pub async fn spawn(config: &HelperConfig) -> Result<Self> {
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| Error::io("creating the helper socketpair", e.into()))?;
        let process = HelperProcess::start(config, theirs)?;
        Self::handshake(
            ours,
            Some(process),
            config.handshake_timeout,
            Deadlines {
                reply: config.reply_timeout,
                keepalive: config.keepalive_interval,
            },
        )
        .await
    }

    /// Talks to a helper already connected to `sock` (e.g. started by a test harness).
    /// Such a helper is not killed when it stops answering; calls fail with
    /// [`Error::Timeout`] after the default reply timeout instead.
    pub async fn connect(sock: OwnedFd, handshake_timeout: Duration) -> Result<Self> {
        let defaults = HelperConfig::default();
        Self::handshake(
            sock,
            None,
            handshake_timeout,
            Deadlines {
                reply: defaults.reply_timeout,
                keepalive: defaults.keepalive_interval,
            },
        )
        .await
    }

    async fn handshake(
        sock: OwnedFd,
        process: Option<HelperProcess>,
        timeout: Duration,
        deadlines: Deadlines,
    ) -> Result<Self> {
        let rpc = Rpc::new(sock).map_err(|e| Error::io("setting up the helper connection", e))?;
        let params = InitializeParams {
            protocol_version: PROTOCOL_VERSION,
            client: Some(concat!("cstor-proxy-client/", env!("CARGO_PKG_VERSION")).to_owned()),
            // Under `podman unshare` our child is podman: only the helper's own pidfd lets
            // us kill a helper that stopped answering (and with it, its storage locks).
            helper_pidfd: process.is_some(),
        };
        let p = serde_json::to_value(&params).map_err(|e| Error::Protocol {
            method: method::INITIALIZE.into(),
            detail: e.to_string(),
        })?;
        let r = rpc.call(method::INITIALIZE, p, Some(timeout)).await;
        let (value, fds) = match r {
            Ok(r) => r,
            Err(e) => {
                return Err(map_call_error(
                    method::INITIALIZE,
                    e,
                    process.as_ref(),
                    timeout,
                ));
            }
        };
        let info: InitializeResult = decode(method::INITIALIZE, value)?;
        if let (Some(p), Some(i)) = (&process, info.pidfd) {
            match fds.into_iter().nth(i as usize) {
                Some(fd) => p.set_helper_pidfd(fd),
                None => {
                    return Err(Error::Protocol {
                        method: method::INITIALIZE.into(),
                        detail: format!("the reply names pidfd {i} but carries no such fd"),
                    });
                }
            }
        }
        if !info
            .protocol_version
            .supports(cstor_protocol::Version::new(PROTOCOL_VERSION.major, 0))
        {
            return Err(Error::Version {
                helper: info.protocol_version.to_string(),
                client: PROTOCOL_VERSION.to_string(),
            });
        }
        tracing::debug!(
            helper = %info.helper_version,
            protocol = %info.protocol_version,
            graphroot = %info.storage.graphroot,
            "connected to cstor-helper"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                rpc,
                process,
                info,
                deadlines,
            }),
        })
    }

    /// What the helper said at `Initialize`: versions, capabilities, storage, limits.
    pub fn info(&self) -> &InitializeResult {
        &self.inner.info
    }

    /// The pid of the helper process this client started (of `podman` when started through
    /// `podman unshare`); `None` for [`Client::connect`].
    pub fn helper_pid(&self) -> Option<u32> {
        self.inner.process.as_ref().map(|p| p.pid())
    }

    /// Turns a stream that ended early into the reason it did: when the helper has exited,
    /// [`Error::HelperDied`] with its exit status and the end of its stderr (and `during`,
    /// what the caller was doing), instead of only "truncated". Any other error is returned
    /// as it is.
    ///
    /// [`Layer::write_tar`] does this itself; a caller that reads a layer's stream and
    /// contents on its own (as an importer does) calls it on the errors it gets.
    pub fn explain(&self, e: Error, during: &str) -> Error {
        use cstor_protocol::assemble::AssembleError;
        use cstor_protocol::stream::StreamError;
        let truncated = matches!(
            &e,
            Error::Stream {
                cause: StreamError::Truncated { .. },
                ..
            } | Error::Assemble {
                cause: AssembleError::Stream(StreamError::Truncated { .. })
                    | AssembleError::Content { .. },
                ..
            }
        );
        match &self.inner.process {
            Some(p) if truncated && p.exit_status(Duration::from_millis(500)).is_some() => {
                p.died(during)
            }
            _ => e,
        }
    }

    /// Whether the helper offers a capability token (see `cstor_protocol::capability`).
    pub fn has_capability(&self, token: &str) -> bool {
        self.inner.info.capabilities.iter().any(|c| c == token)
    }

    /// Calls any method; the typed methods below are built on this.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<(R, Vec<OwnedFd>)> {
        let p = serde_json::to_value(params).map_err(|e| Error::Protocol {
            method: method.into(),
            detail: format!("serializing params: {e}"),
        })?;
        // FetchFds waits for the layer's next files, which a slow disk may hold up for
        // long: the layer's keepalive pings tell a frozen helper from a slow one instead.
        let timeout = (method != method::FETCH_FDS).then_some(self.inner.deadlines.reply);
        match self.inner.rpc.call(method, p, timeout).await {
            Ok((v, fds)) => Ok((decode(method, v)?, fds)),
            Err(e) => Err(map_call_error(
                method,
                e,
                self.inner.process.as_ref(),
                timeout.unwrap_or_default(),
            )),
        }
    }

    /// Every image of the helper's storage.
    pub async fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let (r, _): (ListImagesResult, _) = self.call(method::LIST_IMAGES, &Empty {}).await?;
        Ok(r.images)
    }

    /// Resolves `reference` (any form of `docs/protocol.md`) to an image with its manifest,
    /// config and layers. Fails with [`Error::Remote`] carrying
    /// `ErrorCode::ImageNotFound`, `AmbiguousReference`, `InvalidReference`...
    pub async fn get_image(&self, reference: &str) -> Result<GetImageResult> {
        let (r, _) = self
            .call(
                method::GET_IMAGE,
                &GetImageParams {
                    reference: reference.to_owned(),
                },
            )
            .await?;
        Ok(r)
    }

    /// Opens a layer by id or diff id; it stays pinned until [`Layer::release`] or drop.
    ///
    /// The layer receives up to 456 content fds ahead of its reader, fewer when the
    /// process's soft `RLIMIT_NOFILE` leaves less than twice that; open several layers at
    /// once with [`Client::open_layer_with_prefetch`] to share a low limit.
    pub async fn open_layer(&self, layer: &str) -> Result<Layer> {
        let prefetch = crate::layer::DEFAULT_PREFETCH.min(crate::layer::fd_budget() / 2);
        self.open_layer_with_prefetch(layer, prefetch).await
    }

    /// Like [`Client::open_layer`], holding at most `prefetch` content fds (at least 2)
    /// ahead of the layer's reader.
    pub async fn open_layer_with_prefetch(&self, layer: &str, prefetch: usize) -> Result<Layer> {
        let (r, fds): (GetLayerResult, _) = self
            .call(
                method::GET_LAYER,
                &GetLayerParams {
                    layer: layer.to_owned(),
                },
            )
            .await?;
        let stream = fds
            .into_iter()
            .nth(r.stream.fd as usize)
            .ok_or_else(|| Error::Protocol {
                method: method::GET_LAYER.into(),
                detail: "the reply carries no stream fd".into(),
            })?;
        Ok(Layer::new(self.clone(), r, stream, prefetch.max(2)))
    }

    /// Asks the helper to release everything and exit, then waits for it.
    pub async fn shutdown(self) -> Result<()> {
        let r: Result<(Empty, _)> = self.call(method::SHUTDOWN, &Empty {}).await;
        r?;
        if let Some(p) = &self.inner.process {
            let p_status = {
                let inner = self.inner.clone();
                tokio::task::spawn_blocking(move || {
                    inner
                        .process
                        .as_ref()
                        .and_then(|p| p.exit_status(Duration::from_secs(5)))
                })
                .await
                .ok()
                .flatten()
            };
            match p_status {
                Some(s) if s.success() => {}
                Some(s) => {
                    return Err(Error::HelperDied {
                        during: "shutting down".into(),
                        status: s.to_string(),
                        stderr: p.stderr_tail(),
                    });
                }
                None => tracing::warn!("the helper did not exit after Shutdown"),
            }
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(method: &str, v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Protocol {
        method: method.into(),
        detail: e.to_string(),
    })
}

fn map_call_error(
    method: &str,
    e: CallError,
    process: Option<&HelperProcess>,
    timeout: Duration,
) -> Error {
    match e {
        CallError::Remote(error) => Error::Remote {
            method: method.into(),
            error,
        },
        CallError::Timeout => match process {
            Some(p) => p.kill_unresponsive(method, timeout),
            None => Error::Timeout {
                what: method.into(),
                seconds: timeout.as_secs_f64(),
            },
        },
        CallError::Closed(reason) | CallError::Send(reason) => match process {
            Some(p) => p.broke(&format!("answering {method}"), &reason),
            None => Error::HelperDied {
                during: format!("answering {method}"),
                status: reason,
                stderr: String::new(),
            },
        },
    }
}
