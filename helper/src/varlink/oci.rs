//! The `org.composefs.Oci` interface as a containers-storage source serves it: `GetInfo`,
//! `HasLayer` and `GetLayer`, with the parameter, reply and error shapes of composefs-oci
//! 0.9.4's `varlink_types`, and the layer handed over as a splitdirfdstream plus directory
//! fds and a lifetime fd that keeps the layer pinned.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cstor_protocol::ErrorCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::stream::{Reachability, produce};
use crate::error::Error;
use crate::server::Helper;
use crate::server::producer::{CancellableWriter, stream_pipe};

/// The interface name.
pub const INTERFACE: &str = "org.composefs.Oci";
/// The description `org.varlink.service.GetInterfaceDescription` gives of [`INTERFACE`]:
/// the part of composefs' interface a read-only containers-storage source serves, with the
/// errors it answers. Methods a repository service has besides (`PutLayer`,
/// `FinalizeImage`...) are left out, as they answer `MethodNotFound` here.
pub const DESCRIPTION: &str = "\
# The OCI interface of composefs, as cstor-helper serves it: a read-only source of the
# layers of containers-storage stores. A layer leaves as a splitdirfdstream with the
# directories its content is named beneath, and a lifetime fd that keeps it pinned.
interface org.composefs.Oci

# Where a layer is in a containers-storage store.
type StorageLocator (storage_path: string, layer_id: string)

# What names the layer wanted: its diff id, its place in a store, or both.
type GetLayerParams (
  diff_id: ?string,
  storage: ?StorageLocator,
  consumer_has_cap_dac_override: ?bool
)

# The features of this source: splitdirfdstream-v0, source-containers-storage, read-only.
method GetInfo() -> (features: []string)

# Whether a complete layer with this diff id can be served. There is no repository here,
# so layer_verity is always null. The handle is required and ignored.
method HasLayer(handle: int, diff_id: string) -> (present: bool, layer_verity: ?string)

# A layer. The fds of all replies, in order: the stream (a pipe), dir_count directories
# (O_PATH), the lifetime fd. With more, at most 240 fds per reply.
method GetLayer(handle: int, params: GetLayerParams) -> (dir_count: int)

error NoSuchLayer (diff_id: string)
error InvalidRequest (message: string)
error InvalidDigest (message: string)
error RepoNotFound (message: string)
error InternalError (message: string)
error FdLimitExceeded (fd_count: int, max_per_frame: int)
";

/// The stream format we produce, as `GetInfo` names it.
pub const FEATURE_STREAM: &str = "splitdirfdstream-v0";
/// The most fds one reply carries (the kernel passes at most 253 per message).
pub const MAX_FDS_PER_FRAME: usize = 240;

/// Where a layer is in a containers-storage store (`StorageLocator`).
#[derive(Debug, Clone, Deserialize)]
pub struct StorageLocator {
    /// The store's root directory, as the consumer found it.
    pub storage_path: String,
    /// The layer id (64 hex digits).
    pub layer_id: String,
}

/// `GetLayerParams`. Fields we do not know are ignored, as upstream's serde types do: the
/// struct is meant to grow new locators.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetLayerParams {
    /// The layer's diff id (`sha256:` + 64 hex).
    #[serde(default)]
    pub diff_id: Option<String>,
    /// The layer's place in a store.
    #[serde(default)]
    pub storage: Option<StorageLocator>,
    /// The consumer can open any file (root, or `CAP_DAC_OVERRIDE`).
    #[serde(default)]
    pub consumer_has_cap_dac_override: bool,
}

/// An `org.composefs.Oci` error: its name (without the interface) and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct OciError {
    /// `NoSuchLayer`, `InvalidRequest`...
    pub name: &'static str,
    /// The error's parameters, as upstream's `OciError` variant has them.
    pub parameters: Value,
}

impl OciError {
    fn message(name: &'static str, message: impl Into<String>) -> Self {
        Self {
            name,
            parameters: json!({ "message": message.into() }),
        }
    }

    /// `InvalidRequest { message }`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::message("InvalidRequest", message)
    }

    /// `InvalidDigest { message }`.
    pub fn invalid_digest(message: impl Into<String>) -> Self {
        Self::message("InvalidDigest", message)
    }

    /// `InternalError { message }`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::message("InternalError", message)
    }

    /// `RepoNotFound { message }`: upstream's name for a store that cannot be served.
    pub fn repo_not_found(message: impl Into<String>) -> Self {
        Self::message("RepoNotFound", message)
    }

    /// `NoSuchLayer { diff_id }`; carries whatever named the layer (a diff id or layer id).
    pub fn no_such_layer(wanted: &str) -> Self {
        Self {
            name: "NoSuchLayer",
            parameters: json!({ "diff_id": wanted }),
        }
    }

    /// `FdLimitExceeded { fd_count, max_per_frame }`.
    pub fn fd_limit(fd_count: usize) -> Self {
        Self {
            name: "FdLimitExceeded",
            parameters: json!({ "fd_count": fd_count, "max_per_frame": MAX_FDS_PER_FRAME }),
        }
    }

    /// The storage layer's error, under the closest upstream name.
    fn from_storage(e: Error, wanted: &str) -> Self {
        match e.code() {
            ErrorCode::LayerNotFound => Self::no_such_layer(wanted),
            ErrorCode::InvalidParams => Self::invalid_request(e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

/// `GetInfo`'s reply: the features of a read-only containers-storage source.
pub fn get_info() -> Value {
    json!({ "features": [FEATURE_STREAM, "source-containers-storage", "read-only"] })
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a diff id's form: `sha256:` and 64 lowercase hex digits (the only diff ids
/// containers-storage records, and the only ones upstream's verified drain accepts).
pub fn check_diff_id(d: &str) -> Result<(), OciError> {
    match d.split_once(':') {
        Some(("sha256", hex)) if is_hex64(hex) => Ok(()),
        Some((alg, _)) if alg != "sha256" => Err(OciError::invalid_digest(format!(
            "{d:?}: only sha256 diff ids are stored in containers-storage"
        ))),
        _ => Err(OciError::invalid_digest(format!(
            "{d:?} is not a digest (sha256: followed by 64 lowercase hex digits)"
        ))),
    }
}

/// `HasLayer(handle, diff_id)`: whether a complete layer with this diff id, with tar-split,
/// can be served. There is no repository here, so `layer_verity` is always null.
pub async fn has_layer(helper: Arc<Helper>, diff_id: String) -> Result<Value, OciError> {
    check_diff_id(&diff_id)?;
    let wanted = diff_id.clone();
    let r = tokio::task::spawn_blocking(move || helper.storage.open_layer(&wanted).map(|_| ()))
        .await
        .map_err(|e| OciError::internal(format!("a helper task failed: {e}")))?;
    match r {
        Ok(()) => Ok(json!({ "present": true, "layer_verity": null })),
        Err(e) if matches!(e.code(), ErrorCode::LayerNotFound | ErrorCode::NoTarSplit) => {
            Ok(json!({ "present": false, "layer_verity": null }))
        }
        Err(e) => Err(OciError::from_storage(e, &diff_id)),
    }
}

/// Layers being served (their lifetime fd not yet closed), across connections.
#[derive(Debug, Default)]
pub struct Served {
    open: AtomicUsize,
}

/// Counts one served layer until dropped.
struct ServedSlot(Arc<Served>);

impl Drop for ServedSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A layer handed over: the fd batch of each reply, to be sent in order, and the
/// `dir_count` every reply reports.
#[derive(Debug)]
pub struct LayerFrames {
    /// The `dir_count` every frame reports.
    pub dir_count: u32,
    /// The fd batches, one per reply.
    pub frames: Vec<Vec<OwnedFd>>,
}

/// `GetLayer(handle, params)`: opens and pins the layer, starts its producer, and returns
/// the fds to pass: the stream pipe, the directory fds, the lifetime fd.
///
/// With `more`, they are spread over several replies (the pipe, the directories in batches,
/// the lifetime fd), as a consumer concatenating batches expects; without it, one reply must
/// carry all of them.
pub async fn get_layer(
    helper: Arc<Helper>,
    served: Arc<Served>,
    p: GetLayerParams,
    more: bool,
) -> Result<LayerFrames, OciError> {
    let (wanted, store) = match (&p.storage, &p.diff_id) {
        (Some(loc), diff_id) => {
            if !is_hex64(&loc.layer_id) {
                return Err(OciError::invalid_request(format!(
                    "layer id {:?} is not 64 lowercase hex digits",
                    loc.layer_id
                )));
            }
            if let Some(d) = diff_id {
                check_diff_id(d)?;
            }
            (loc.layer_id.clone(), Some(loc.storage_path.clone()))
        }
        (None, Some(d)) => {
            check_diff_id(d)?;
            (d.clone(), None)
        }
        (None, None) => {
            return Err(OciError::invalid_request(
                "GetLayer needs params.storage (a store and layer id) or params.diff_id",
            ));
        }
    };
    if let Some(path) = &store {
        let served_here = helper
            .storage
            .stores()
            .iter()
            .any(|s| same_path(s.path(), path));
        if !served_here {
            return Err(OciError::repo_not_found(format!(
                "this helper serves no store at {path:?} (it serves {})",
                helper
                    .storage
                    .stores()
                    .iter()
                    .map(|s| format!("{:?}", s.path().display().to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }

    let max = helper.config.max_open_layers as usize;
    if served.open.fetch_add(1, Ordering::Relaxed) >= max {
        served.open.fetch_sub(1, Ordering::Relaxed);
        return Err(OciError::internal(format!(
            "{max} layers are being served; close a lifetime fd first"
        )));
    }
    let slot = ServedSlot(served);

    let h = helper.clone();
    let w = wanted.clone();
    let mut open = tokio::task::spawn_blocking(move || h.storage.open_layer(&w))
        .await
        .map_err(|e| OciError::internal(format!("a helper task failed: {e}")))?
        .map_err(|e| OciError::from_storage(e, &wanted))?;
    if let Some(path) = &store
        && !same_path(Path::new(&open.info.store), path)
    {
        return Err(OciError::no_such_layer(&wanted));
    }
    if let (Some(asked), Some(_)) = (&p.diff_id, &p.storage)
        && open.info.diff_id.as_deref() != Some(asked.as_str())
    {
        return Err(OciError::invalid_request(format!(
            "layer {} has diff id {}, not {asked}",
            open.info.id,
            open.info.diff_id.as_deref().unwrap_or("(none recorded)")
        )));
    }

    let internal = |what: &str, e: std::io::Error| OciError::internal(format!("{what}: {e}"));
    let dirs = open
        .source
        .dir_fds()
        .map_err(|e| OciError::internal(e.to_string()))?;
    // The producer checks reachability through its own handles on the same directories.
    let producer_dirs = dirs
        .iter()
        .map(|d| d.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| internal("duplicating a directory fd", e))?;
    let (read_end, write_end) = stream_pipe().map_err(|e| internal("creating a pipe", e))?;
    let (life_read, life_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| internal("creating the lifetime pipe", e.into()))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let writer = CancellableWriter::new(write_end, cancel.clone())
        .map_err(|e| internal("configuring the stream pipe", e))?;
    let walker = open
        .source
        .walk()
        .map_err(|e| OciError::internal(e.to_string()))?;

    let dir_count =
        u32::try_from(dirs.len()).map_err(|_| OciError::internal("too many layer directories"))?;
    let total = dirs.len() + 2;
    let frames = if more {
        let mut frames = vec![vec![read_end]];
        let mut dirs = dirs.into_iter().peekable();
        while dirs.peek().is_some() {
            frames.push(dirs.by_ref().take(MAX_FDS_PER_FRAME).collect());
        }
        frames.push(vec![life_write]);
        frames
    } else if total <= MAX_FDS_PER_FRAME {
        let mut all = vec![read_end];
        all.extend(dirs);
        all.push(life_write);
        vec![all]
    } else {
        return Err(OciError::fd_limit(total));
    };

    let layer_id = open.info.id.clone();
    let locks = open.locks;
    let trusted = p.consumer_has_cap_dac_override;
    let watcher_cancel = cancel.clone();
    // The lifetime: the consumer holds the write end; its closing (explicit, or by exiting)
    // is EOF here. Until then the layer stays locked, even after the stream ended.
    let watcher = std::thread::Builder::new()
        .name("layer-lifetime".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match rustix::io::read(&life_read, &mut buf) {
                    Ok(0) => break,
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::warn!("reading the lifetime pipe: {e}; releasing the layer");
                        break;
                    }
                }
            }
            watcher_cancel.store(true, Ordering::Relaxed);
        })
        .map_err(|e| internal("starting the lifetime thread", e))?;
    std::thread::Builder::new()
        .name("layer-producer".into())
        .spawn(move || {
            let _slot = slot;
            let mut reach = Reachability::new(trusted);
            match produce(walker, &producer_dirs, &mut reach, writer, &cancel) {
                Ok(done) => tracing::info!(
                    layer = %layer_id,
                    by_name = done.file_backed,
                    inline = done.inline,
                    inline_bytes = done.inline_bytes,
                    "layer stream complete"
                ),
                Err(e) => tracing::info!(layer = %layer_id, "layer stream failed: {e}"),
            }
            drop(producer_dirs);
            // Files named in the stream are opened by the consumer after we wrote them: the
            // locks stay until it says it is done.
            let _ = watcher.join();
            tracing::debug!(layer = %layer_id, n = locks.len(), "lifetime fd closed; releasing layer locks");
            drop(locks);
        })
        .map_err(|e| internal("starting the layer producer", e))?;
    Ok(LayerFrames { dir_count, frames })
}

/// Whether two spellings name the same store path (trailing slashes aside). Paths are
/// compared as strings, never looked up: the consumer's path is not opened.
fn same_path(ours: &Path, theirs: &str) -> bool {
    let t = theirs.trim_end_matches('/');
    let o = ours.to_string_lossy();
    let o = o.trim_end_matches('/');
    !t.is_empty() && o == t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_ids_are_checked_like_upstream_names_them() {
        assert!(check_diff_id(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in [
            "sha256:abc".to_owned(),
            format!("sha256:{}", "A".repeat(64)),
            "nonsense".to_owned(),
            String::new(),
        ] {
            assert_eq!(
                check_diff_id(&bad).unwrap_err().name,
                "InvalidDigest",
                "{bad}"
            );
        }
        assert_eq!(
            check_diff_id(&format!("sha512:{}", "a".repeat(128)))
                .unwrap_err()
                .name,
            "InvalidDigest"
        );
    }

    #[test]
    fn store_paths_compare_as_spelled() {
        assert!(same_path(Path::new("/var/lib/x"), "/var/lib/x/"));
        assert!(!same_path(Path::new("/var/lib/x"), "/var/lib/y"));
        assert!(!same_path(Path::new("/"), ""));
    }
}
