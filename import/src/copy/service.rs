//! A source repository reached through a composefs repository service (upstream's
//! `cfsctl varlink`: `org.composefs.Repository` and `org.composefs.Oci`), for a repository
//! the caller cannot read itself (a root-owned `/sysroot/composefs` served by a system
//! service). The service resolves the image (`Inspect`) and hands each layer over as a
//! splitdirfdstream (`GetLayer`: a pipe of tar metadata and references into the object
//! directories it passes as fds); the copy checks what it gets as strictly as a copy from a
//! path: every object against the id its name carries, every layer against its diff id.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use composefs_oci::varlink_types::{GetLayerParams, OciError, OciProxy as _};
use composefs_splitdirfdstream::{Chunk, SplitdirfdstreamReader, open_beneath};
use serde::{Deserialize, Serialize};

use super::layer::{Each, Piece};
use crate::error::{Error, Result};
use crate::objects::Expected;

/// The `org.composefs.Repository` call a copy or a push makes (composefs-ctl 0.9.4's
/// interface).
#[zlink::proxy(interface = "org.composefs.Repository")]
pub(crate) trait RepositoryProxy {
    async fn open_repository(
        &mut self,
        path: Option<&str>,
        user: Option<bool>,
        system: Option<bool>,
    ) -> zlink::Result<Result<OpenRepositoryReply, RepositoryError>>;
}

/// The `org.composefs.Oci` call composefs-oci's own proxy does not have.
#[zlink::proxy(interface = "org.composefs.Oci")]
trait InspectProxy {
    async fn inspect(
        &mut self,
        handle: u64,
        image: &str,
    ) -> zlink::Result<Result<InspectReply, OciError>>;
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OpenRepositoryReply {
    pub handle: u64,
    #[serde(default)]
    hash_algorithm: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct InspectReply {
    manifest: String,
    config: String,
}

/// The errors of `org.composefs.Repository`, by upstream's names.
#[derive(Debug, zlink::ReplyError)]
#[zlink(interface = "org.composefs.Repository")]
pub(crate) enum RepositoryError {
    RepoNotFound { message: String },
    InvalidHandle { handle: u64 },
    InvalidSpec { message: String },
    NoSuchRef { reference: String },
    InternalError { message: String },
}

fn transport(socket: &str, doing: &str, e: impl std::fmt::Debug) -> Error {
    Error::io(
        format!("{doing} through the repository service at {socket}"),
        std::io::Error::other(format!("{e:?}")),
    )
}

fn oci_error(socket: &str, doing: &str, e: OciError) -> Error {
    match e {
        OciError::NoSuchImage { image } => {
            Error::NotFound(format!("the repository service has no image {image}"))
        }
        OciError::NoSuchLayer { diff_id } => {
            Error::NotFound(format!("the repository service has no layer {diff_id}"))
        }
        e => transport(socket, doing, e),
    }
}

/// A connection to a repository service, with the source repository opened.
///
/// zlink's replies streams are not `Send`: the connection lives on a thread of its own (with
/// a single-threaded runtime), which runs the calls this handle sends it, one at a time, so
/// that the copy's futures stay `Send`.
pub struct Service {
    socket: String,
    calls: tokio::sync::mpsc::UnboundedSender<Call>,
}

enum Call {
    Inspect(
        String,
        tokio::sync::oneshot::Sender<Result<(Vec<u8>, Vec<u8>)>>,
    ),
    GetLayer(String, tokio::sync::oneshot::Sender<Result<Fetched>>),
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("socket", &self.socket)
            .finish()
    }
}

/// What `GetLayer` handed over: the stream's pipe, the directories it refers into, and the
/// fds that hold the service's locks until the layer is read.
pub(super) struct Fetched {
    pub pipe: File,
    pub dirs: Vec<OwnedFd>,
    pub _lifetime: Vec<OwnedFd>,
}

/// The connection, on its own thread.
struct Connection {
    socket: String,
    conn: zlink::tokio::unix::Connection,
    handle: u64,
}

impl Service {
    /// Connects to the service at `socket` and opens the repository at `path` there (the
    /// service's system repository when `None`).
    pub async fn connect(socket: &std::path::Path, path: Option<&str>) -> Result<Self> {
        let name = socket.display().to_string();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let (calls, mut rx) = tokio::sync::mpsc::unbounded_channel::<Call>();
        let (socket, path) = (socket.to_owned(), path.map(str::to_owned));
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name("cstor-repo-service".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = opened_tx.send(Err(Error::io("starting the service thread", e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut conn = match Connection::open(&thread_name, &socket, path).await {
                        Ok(c) => {
                            let _ = opened_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = opened_tx.send(Err(e));
                            return;
                        }
                    };
                    while let Some(call) = rx.recv().await {
                        match call {
                            Call::Inspect(image, reply) => {
                                let _ = reply.send(conn.inspect(&image).await);
                            }
                            Call::GetLayer(diff_id, reply) => {
                                let _ = reply.send(conn.get_layer(&diff_id).await);
                            }
                        }
                    }
                });
            })
            .map_err(|e| Error::io("starting the service thread", e))?;
        opened
            .await
            .map_err(|_| transport(&name, "connecting", "the service thread stopped"))??;
        Ok(Service {
            socket: name,
            calls,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> Call,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls
            .send(make(tx))
            .map_err(|_| transport(&self.socket, "calling", "the service thread stopped"))?;
        rx.await
            .map_err(|_| transport(&self.socket, "calling", "the service thread stopped"))?
    }

    /// The manifest and config of `image` (a tag or `@sha256:...`), as the service has them.
    pub(super) async fn inspect(&self, image: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        self.call(|tx| Call::Inspect(image.to_owned(), tx)).await
    }

    /// Layer `diff_id`: its stream's pipe and fds.
    pub(super) async fn get_layer(&self, diff_id: &str) -> Result<Fetched> {
        self.call(|tx| Call::GetLayer(diff_id.to_owned(), tx)).await
    }
}

impl Connection {
    async fn open(name: &str, socket: &std::path::Path, path: Option<String>) -> Result<Self> {
        let mut conn = zlink::tokio::unix::connect(socket)
            .await
            .map_err(|e| transport(name, "connecting", e))?;
        let system = path.is_none().then_some(true);
        let reply = conn
            .open_repository(path.as_deref(), None, system)
            .await
            .map_err(|e| transport(name, "opening the repository", e))?
            .map_err(|e| match e {
                RepositoryError::RepoNotFound { message } => Error::NotFound(format!(
                    "the repository service at {name} cannot open the repository: {message}"
                )),
                e => transport(name, "opening the repository", e),
            })?;
        tracing::debug!(socket = %name, ?reply, "repository service");
        Ok(Connection {
            socket: name.to_owned(),
            conn,
            handle: reply.handle,
        })
    }

    async fn inspect(&mut self, image: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let reply = self
            .conn
            .inspect(self.handle, image)
            .await
            .map_err(|e| transport(&self.socket, "inspecting the image", e))?
            .map_err(|e| oci_error(&self.socket, "inspecting the image", e))?;
        Ok((reply.manifest.into_bytes(), reply.config.into_bytes()))
    }

    /// Asks for layer `diff_id` and collects every reply's fds.
    async fn get_layer(&mut self, diff_id: &str) -> Result<Fetched> {
        use zlink::futures_util::StreamExt as _;
        let doing = format!("reading layer {diff_id}");
        let params = GetLayerParams {
            diff_id: Some(diff_id.to_owned()),
            ..Default::default()
        };
        let stream = self
            .conn
            .get_layer(self.handle, params)
            .await
            .map_err(|e| transport(&self.socket, &doing, e))?;
        let mut stream = std::pin::pin!(stream);
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut dir_count = None;
        while let Some(item) = stream.next().await {
            let (reply, batch) = item.map_err(|e| transport(&self.socket, &doing, e))?;
            // zlink receives fds without close-on-exec: a process this one starts must not
            // inherit the lifetime fds (and with them the service's locks).
            for fd in &batch {
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)
                    .map_err(|e| Error::io("marking a received fd close-on-exec", e.into()))?;
            }
            let reply = reply.map_err(|e| oci_error(&self.socket, &doing, e))?;
            dir_count = Some(reply.dir_count as usize);
            fds.extend(batch);
        }
        let dir_count =
            dir_count.ok_or_else(|| transport(&self.socket, &doing, "GetLayer gave no reply"))?;
        if fds.len() < 1 + dir_count {
            return Err(transport(
                &self.socket,
                &doing,
                format!("{} fds for a pipe and {dir_count} directories", fds.len()),
            ));
        }
        let mut it = fds.into_iter();
        let pipe = it
            .next()
            .map(File::from)
            .ok_or_else(|| transport(&self.socket, &doing, "no pipe"))?;
        let dirs = it.by_ref().take(dir_count).collect();
        Ok(Fetched {
            pipe,
            dirs,
            _lifetime: it.collect(),
        })
    }
}

/// The object id a repository service's reference names (`ab/cdef...`: the object's path
/// under `objects/`), as [`Expected`]; a reference of another shape is checked only through
/// the layer's diff id.
fn expected_of(name: &[u8]) -> Expected {
    let hex: Vec<u8> = name.iter().copied().filter(|&b| b != b'/').collect();
    let id = std::str::from_utf8(&hex)
        .ok()
        .and_then(|h| hex::decode(h).ok());
    match id {
        Some(id) if name.get(2) == Some(&b'/') && (id.len() == 32 || id.len() == 64) => {
            Expected::Object {
                algorithm: if id.len() == 32 {
                    cstor_verity::Algorithm::Sha256
                } else {
                    cstor_verity::Algorithm::Sha512
                },
                id: id.into(),
            }
        }
        _ => Expected::CheckedByCaller,
    }
}

/// Walks a layer's splitdirfdstream, handing `each` its pieces in stream order. The stream
/// has no end marker: its end is the pipe's end, and a cut-short stream is caught by the
/// diff id check after the walk.
pub(super) fn walk(fetched: &Fetched, diff_id: &str, each: Each<'_>) -> Result<()> {
    let corrupt = |detail: String| Error::SourceObject {
        object: format!("the stream of layer {diff_id} from the repository service"),
        detail,
    };
    let mut reader = SplitdirfdstreamReader::new(&fetched.pipe);
    while let Some(chunk) = reader.next_chunk().map_err(|e| corrupt(e.to_string()))? {
        match chunk {
            Chunk::Metadata(bytes) => each(Piece::Inline(bytes.to_vec()))?,
            Chunk::InlineData(bytes) => each(Piece::Data(bytes.to_vec()))?,
            Chunk::FileBackedData {
                dirfd_index,
                length,
                filename,
            } => {
                let dir = fetched
                    .dirs
                    .get(dirfd_index as usize)
                    .ok_or_else(|| corrupt(format!("no directory {dirfd_index}")))?;
                let name = String::from_utf8_lossy(filename).into_owned();
                let fd = open_beneath(dir.as_fd(), filename)
                    .map_err(|e| corrupt(format!("opening {name}: {e}")))?;
                each(Piece::Object {
                    file: File::from(fd),
                    size: length,
                    expected: expected_of(filename),
                    name: format!("object {}", name.replace('/', "")),
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_name_the_id_they_are_checked_against() {
        let sha512 = format!("ab/{}", "cd".repeat(63));
        match expected_of(sha512.as_bytes()) {
            Expected::Object { algorithm, id } => {
                assert_eq!(algorithm, cstor_verity::Algorithm::Sha512);
                assert_eq!(id.len(), 64);
                assert_eq!(id[0], 0xab);
            }
            e => panic!("{e:?}"),
        }
        let sha256 = format!("01/{}", "ef".repeat(31));
        assert!(matches!(
            expected_of(sha256.as_bytes()),
            Expected::Object {
                algorithm: cstor_verity::Algorithm::Sha256,
                ..
            }
        ));
        for other in ["file", "ab/xyz", "abc/def", "", "ab/cd/ef"] {
            assert_eq!(
                expected_of(other.as_bytes()),
                Expected::CheckedByCaller,
                "{other}"
            );
        }
    }
}
