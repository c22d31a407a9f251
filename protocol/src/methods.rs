//! Method names and the params/result types of every method of protocol 1.x.
//!
//! Every type here serializes to the JSON documented in `docs/protocol.md`. Unknown fields are
//! ignored when deserializing, so a newer peer may add optional fields in a minor version.

use serde::{Deserialize, Serialize};

use crate::Version;

/// Method names.
pub mod method {
    /// Handshake; must be the first request on a connection.
    pub const INITIALIZE: &str = "Initialize";
    /// List the images of every image store.
    pub const LIST_IMAGES: &str = "ListImages";
    /// Resolve a reference and return its manifest, config and layer chain.
    pub const GET_IMAGE: &str = "GetImage";
    /// Open a layer: pin it, and return a handle and its layer stream.
    pub const GET_LAYER: &str = "GetLayer";
    /// Receive the next file-content fds of an open layer.
    pub const FETCH_FDS: &str = "FetchFds";
    /// Renew the lease of an open layer.
    pub const KEEP_ALIVE: &str = "KeepAlive";
    /// End of use: unpin an open layer and free its handle.
    pub const RELEASE_LAYER: &str = "ReleaseLayer";
    /// Release everything and exit after replying.
    pub const SHUTDOWN: &str = "Shutdown";

    /// Every method of protocol 1.0.
    pub const ALL: &[&str] = &[
        INITIALIZE,
        LIST_IMAGES,
        GET_IMAGE,
        GET_LAYER,
        FETCH_FDS,
        KEEP_ALIVE,
        RELEASE_LAYER,
        SHUTDOWN,
    ];
}

/// Params of `Initialize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeParams {
    /// The highest protocol version the client speaks. The major must equal the helper's.
    pub protocol_version: Version,
    /// Free-form client name and version, for logs (e.g. `"cstor/0.1.0"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Since 1.1: ask for a pidfd of the helper process with the reply
    /// ([`InitializeResult::pidfd`]). A client that started the helper through a wrapper
    /// (`podman unshare`) knows only the wrapper's pid; with the helper's own pidfd it can
    /// kill a helper that stopped answering, which releases its storage locks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub helper_pidfd: bool,
}

/// Result of `Initialize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeResult {
    /// The helper's protocol version (same major as the client's).
    pub protocol_version: Version,
    /// The helper's package version.
    pub helper_version: String,
    /// Capability tokens (see [`crate::capability`]); ignore unknown ones.
    pub capabilities: Vec<String>,
    /// The storage the helper serves.
    pub storage: StorageInfo,
    /// Limits the client must respect.
    pub limits: Limits,
    /// Since 1.1, when [`InitializeParams::helper_pidfd`] asked for it: the index of the
    /// reply's fd that is a pidfd of the helper process (capability `helper-pidfd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pidfd: Option<u32>,
}

/// The storage a helper serves, as resolved from storage.conf, environment and flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageInfo {
    /// Always `"overlay"` in protocol 1.x.
    pub driver: String,
    /// The primary storage root.
    pub graphroot: String,
    /// The run root (informational; the helper does not read it).
    pub runroot: String,
    /// A separate image store root, when storage.conf sets `imagestore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imagestore: Option<String>,
    /// Read-only additional image stores, searched after the primary store.
    #[serde(default)]
    pub additional_image_stores: Vec<String>,
    /// True when the storage belongs to a rootless user (the helper runs in that user's
    /// namespace).
    pub rootless: bool,
    /// storage.conf files that were read, in order.
    #[serde(default)]
    pub config_files: Vec<String>,
}

/// Limits announced by the helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The most fds one reply carries (`FetchFds.max` is clamped to it).
    pub max_fds_per_message: u32,
    /// The most content fds the helper opens ahead of the client for one layer.
    pub max_fds_queued: u32,
    /// A layer handle is released when no request names it for this long.
    pub lease_timeout_ms: u64,
    /// The most layer handles open at once on one connection.
    pub max_open_layers: u32,
    /// Since 1.1: the largest request the helper reads, in bytes (a socket message or a
    /// `--stdio` line); a larger one is refused (and on the socket, the connection closed).
    /// Absent from 1.0 helpers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u32>,
    /// Since 1.1: the most requests the helper handles at once on one connection; it reads
    /// no further request until one is answered. Absent from 1.0 helpers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_in_flight: Option<u32>,
}

/// Params of `ListImages` (none; `{}` or absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListImagesParams {}

/// Result of `ListImages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListImagesResult {
    /// Images of the primary store first, then of each additional store.
    pub images: Vec<ImageSummary>,
}

/// One image in `ListImages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// 64 hex digits.
    pub id: String,
    /// Full references, e.g. `docker.io/library/busybox:latest`.
    pub names: Vec<String>,
    /// The image's primary manifest digest, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Creation time (RFC 3339), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The top layer's id; absent for an image with no layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_layer: Option<String>,
    /// The root of the image store that holds the image.
    pub store: String,
}

/// Params of `GetImage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetImageParams {
    /// Any reference form of `docs/protocol.md` ("Image references").
    pub reference: String,
}

/// Result of `GetImage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetImageResult {
    /// 64 hex digits.
    pub id: String,
    /// Full references.
    pub names: Vec<String>,
    /// The root of the image store that holds the image.
    pub store: String,
    /// The image manifest, byte-exact.
    pub manifest: Blob,
    /// The image config, byte-exact.
    pub config: Blob,
    /// The layer chain, base layer first.
    pub layers: Vec<LayerInfo>,
}

/// A JSON document stored with an image, carried byte-exact as a JSON string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// `sha256:` digest of `content`'s bytes.
    pub digest: String,
    /// The media type declared for it (manifest: its `mediaType`; config: the manifest's
    /// `config.mediaType`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Length of `content` in bytes.
    pub size: u64,
    /// The exact bytes (always UTF-8 JSON).
    pub content: String,
}

/// A layer of an image's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// The storage layer id (64 hex; not the OCI chain id).
    pub id: String,
    /// The parent layer's id; absent for the base layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// `sha256:` digest of the uncompressed tar (the OCI diff id): the layer's
    /// `diff-digest`, or for a layer pulled by TOC without one, its (untrusted)
    /// `expected-layer-diffid`. Absent when neither is recorded. Clients verify the rebuilt
    /// tar against it either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
    /// Length of the uncompressed tar, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_size: Option<u64>,
    /// Digest of the blob the layer was created from (often compressed), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_digest: Option<String>,
    /// Size of that blob, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_size: Option<u64>,
    /// Whether tar-split metadata exists, i.e. whether `GetLayer` can serve it.
    pub tar_split: bool,
    /// The root of the store that holds the layer.
    pub store: String,
}

/// Params of `GetLayer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetLayerParams {
    /// A layer id (64 hex digits) or a diff id (`sha256:` + 64 hex digits).
    pub layer: String,
}

/// Result of `GetLayer`. The reply carries one fd: the read end of the layer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetLayerResult {
    /// Names the open layer in `FetchFds`, `KeepAlive` and `ReleaseLayer`.
    pub handle: u64,
    /// The layer.
    pub layer: LayerInfo,
    /// How to read the layer stream.
    pub stream: StreamInfo,
    /// Only in `--stdio` mode, where no fd can be passed: what the stream holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub described: Option<DescribedLayer>,
}

/// Where a layer stream is and what format it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Always `"cstor-layer-stream"`.
    pub format: String,
    /// Format version; `1` in protocol 1.0.
    pub version: u32,
    /// Index of the stream fd among the reply's fds.
    pub fd: u32,
}

/// Params of `FetchFds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFdsParams {
    /// The layer handle.
    pub handle: u64,
    /// The most fds wanted; clamped to `limits.max_fds_per_message`.
    pub max: u32,
}

/// Result of `FetchFds`; the reply carries `count` fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFdsResult {
    /// The stream `fd` index of the first fd in this reply.
    pub first: u64,
    /// How many fds the reply carries (at least 1 unless `done`).
    pub count: u32,
    /// True once every content fd of the layer has been delivered.
    pub done: bool,
}

/// Params of `KeepAlive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAliveParams {
    /// The layer handle.
    pub handle: u64,
}

/// Result of `KeepAlive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAliveResult {
    /// The renewed lease, in milliseconds from now.
    pub lease_ms: u64,
}

/// Params of `ReleaseLayer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseLayerParams {
    /// The layer handle.
    pub handle: u64,
}

/// Result of `ReleaseLayer` and `Shutdown` (an empty object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `--stdio` mode: what would have been passed as fds, described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdDescription {
    /// Position among the fds the reply would have carried.
    pub index: u64,
    /// `"regular"`, `"pipe"`...
    #[serde(rename = "type")]
    pub kind: String,
    /// The tar entry name (lossy UTF-8) for a content fd, or the role of a pipe.
    pub name: String,
    /// Size in bytes, for a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// `--stdio` mode: the decoded layer stream of a `GetLayer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribedLayer {
    /// Entries of the stream, in order, up to the helper's `--describe-limit`.
    pub entries: Vec<DescribedEntry>,
    /// True when `entries` was cut at the limit.
    pub truncated: bool,
    /// Totals of the whole stream.
    pub summary: crate::stream::StreamSummary,
    /// Set when the helper was started with `--dump-tar DIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar: Option<DumpedTar>,
}

/// One decoded stream record in `--stdio` mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum DescribedEntry {
    /// Raw tar bytes (headers, padding).
    Segment {
        /// Length in bytes.
        len: u64,
    },
    /// A tar entry; content entries name the fd that would carry the content.
    File {
        /// Entry name (lossy UTF-8; see `name_base64` for the exact bytes).
        name: String,
        /// Exact name bytes, only when the name is not UTF-8.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name_base64: Option<String>,
        /// Content length.
        size: u64,
        /// CRC-64/GO-ISO of the content, 16 hex digits, when `size > 0`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        crc64: Option<String>,
        /// The content fd that would have been passed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd: Option<FdDescription>,
    },
}

/// `--stdio` mode with `--dump-tar`: the tar the helper rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpedTar {
    /// Where it was written.
    pub path: String,
    /// Its length.
    pub size: u64,
    /// `sha256:` digest of its bytes.
    pub digest: String,
    /// Whether `digest` equals the layer's diff id.
    pub matches_diff_id: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_ignore_unknown_fields() {
        let p: GetImageParams =
            serde_json::from_str(r#"{"reference":"busybox","future":1}"#).unwrap();
        assert_eq!(p.reference, "busybox");
        let _: ListImagesParams = serde_json::from_str("{}").unwrap();
    }

    #[test]
    fn described_entry_shape() {
        let e = DescribedEntry::Segment { len: 512 };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"record": "segment", "len": 512})
        );
    }
}
