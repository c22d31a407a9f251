//! Errors on the wire: JSON-RPC error objects with stable codes and a structured `data`.
//!
//! Every error the helper returns is a JSON-RPC 2.0 error object:
//!
//! ```json
//! {"code": 1201, "message": "image not found: localhost/nope:latest",
//!  "data": {"kind": "image-not-found", "retryable": false,
//!           "causes": [], "reference": "localhost/nope:latest"}}
//! ```
//!
//! `code` and `data.kind` are stable: they never change meaning within a major protocol
//! version. `message` is for humans and may change. Clients should match on [`ErrorCode`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable error codes. The numeric values are part of the protocol.
///
/// ```
/// use cstor_protocol::ErrorCode;
/// assert_eq!(ErrorCode::ImageNotFound.code(), 1201);
/// assert_eq!(ErrorCode::from_code(1201), Some(ErrorCode::ImageNotFound));
/// assert_eq!(ErrorCode::ImageNotFound.kind(), "image-not-found");
/// assert!(ErrorCode::LockTimeout.retryable());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// -32700: the bytes are not JSON. On the socket the connection is closed afterwards,
    /// because the stream cannot be resynchronised.
    ParseError,
    /// -32600: JSON, but not a valid JSON-RPC 2.0 request.
    InvalidRequest,
    /// -32601: no such method.
    MethodNotFound,
    /// -32602: the params do not match the method.
    InvalidParams,
    /// -32603: a bug in the helper.
    Internal,
    /// -32050: fd framing error defined by jsonrpc-fdpass (a message announced more fds than
    /// arrived, or carried fds where none are accepted). Fatal: the connection is closed.
    FileDescriptorError,
    /// 1001: a method other than `Initialize` was called first.
    NotInitialized,
    /// 1002: the client's major protocol version is not served.
    UnsupportedVersion,
    /// 1100: storage.conf (or an override) could not be read or parsed. The helper reads
    /// its configuration at startup, so today this ends the helper (exit status 1, message
    /// on stderr) rather than reaching the wire; the code is reserved for that meaning.
    StorageConfig,
    /// 1101: the storage uses a graph driver other than overlay.
    UnsupportedDriver,
    /// 1102: a storage root does not exist or cannot be opened. Like 1100, detected at
    /// startup today (exit status 1); reserved for that meaning on the wire.
    StorageUnavailable,
    /// 1200: the image reference cannot be parsed.
    InvalidReference,
    /// 1201: no image matches the reference.
    ImageNotFound,
    /// 1202: a short id prefix matches more than one image.
    AmbiguousReference,
    /// 1203: no complete layer with that id or diff id.
    LayerNotFound,
    /// 1204: an image lacks its manifest or config.
    ImageDataMissing,
    /// 1300: layers.json, images.json, a manifest, config or `lower` file is malformed.
    CorruptMetadata,
    /// 1301: the layer's tar-split metadata is malformed.
    CorruptTarSplit,
    /// 1302: the layer has no tar-split metadata, so it cannot be rebuilt bit-exactly.
    NoTarSplit,
    /// 1303: content does not match its recorded CRC-64, size or digest.
    ChecksumMismatch,
    /// 1304: a file named by tar-split is not in the layer (or its lower layers).
    MissingFile,
    /// 1305: a name would resolve outside its layer or storage root.
    PathEscape,
    /// 1306: a valid but unsupported construct (sparse tar entries, composefs-flat layers...).
    Unsupported,
    /// 1400: a storage lock stayed held by another process past the timeout. Retryable.
    LockTimeout,
    /// 1401: an I/O error; `data.errno` holds the errno.
    Io,
    /// 1500: the layer handle is not open on this connection.
    UnknownHandle,
    /// 1501: the layer handle's lease ran out; the layer was released.
    LeaseExpired,
    /// 1502: too many layer handles are open on this connection. Retryable after a release.
    TooManyHandles,
    /// 1503: the work stopped because its consumer went away: in a layer stream's `ERROR`
    /// record when the client closed the stream early, or in `--stdio` when the tar being
    /// dumped could not be written.
    Cancelled,
    /// 1504: the method needs fd passing and the helper runs in `--stdio` mode.
    UnavailableInStdio,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: &'static [ErrorCode] = &[
        Self::ParseError,
        Self::InvalidRequest,
        Self::MethodNotFound,
        Self::InvalidParams,
        Self::Internal,
        Self::FileDescriptorError,
        Self::NotInitialized,
        Self::UnsupportedVersion,
        Self::StorageConfig,
        Self::UnsupportedDriver,
        Self::StorageUnavailable,
        Self::InvalidReference,
        Self::ImageNotFound,
        Self::AmbiguousReference,
        Self::LayerNotFound,
        Self::ImageDataMissing,
        Self::CorruptMetadata,
        Self::CorruptTarSplit,
        Self::NoTarSplit,
        Self::ChecksumMismatch,
        Self::MissingFile,
        Self::PathEscape,
        Self::Unsupported,
        Self::LockTimeout,
        Self::Io,
        Self::UnknownHandle,
        Self::LeaseExpired,
        Self::TooManyHandles,
        Self::Cancelled,
        Self::UnavailableInStdio,
    ];

    /// The numeric JSON-RPC code.
    pub const fn code(self) -> i32 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::Internal => -32603,
            Self::FileDescriptorError => -32050,
            Self::NotInitialized => 1001,
            Self::UnsupportedVersion => 1002,
            Self::StorageConfig => 1100,
            Self::UnsupportedDriver => 1101,
            Self::StorageUnavailable => 1102,
            Self::InvalidReference => 1200,
            Self::ImageNotFound => 1201,
            Self::AmbiguousReference => 1202,
            Self::LayerNotFound => 1203,
            Self::ImageDataMissing => 1204,
            Self::CorruptMetadata => 1300,
            Self::CorruptTarSplit => 1301,
            Self::NoTarSplit => 1302,
            Self::ChecksumMismatch => 1303,
            Self::MissingFile => 1304,
            Self::PathEscape => 1305,
            Self::Unsupported => 1306,
            Self::LockTimeout => 1400,
            Self::Io => 1401,
            Self::UnknownHandle => 1500,
            Self::LeaseExpired => 1501,
            Self::TooManyHandles => 1502,
            Self::Cancelled => 1503,
            Self::UnavailableInStdio => 1504,
        }
    }

    /// The code for a number, if it is one this crate knows.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.code() == code)
    }

    /// The stable `data.kind` string.
    pub const fn kind(self) -> &'static str {
        match self {
            Self::ParseError => "parse-error",
            Self::InvalidRequest => "invalid-request",
            Self::MethodNotFound => "method-not-found",
            Self::InvalidParams => "invalid-params",
            Self::Internal => "internal",
            Self::FileDescriptorError => "fd-error",
            Self::NotInitialized => "not-initialized",
            Self::UnsupportedVersion => "unsupported-version",
            Self::StorageConfig => "storage-config",
            Self::UnsupportedDriver => "unsupported-driver",
            Self::StorageUnavailable => "storage-unavailable",
            Self::InvalidReference => "invalid-reference",
            Self::ImageNotFound => "image-not-found",
            Self::AmbiguousReference => "ambiguous-reference",
            Self::LayerNotFound => "layer-not-found",
            Self::ImageDataMissing => "image-data-missing",
            Self::CorruptMetadata => "corrupt-metadata",
            Self::CorruptTarSplit => "corrupt-tar-split",
            Self::NoTarSplit => "no-tar-split",
            Self::ChecksumMismatch => "checksum-mismatch",
            Self::MissingFile => "missing-file",
            Self::PathEscape => "path-escape",
            Self::Unsupported => "unsupported",
            Self::LockTimeout => "lock-timeout",
            Self::Io => "io",
            Self::UnknownHandle => "unknown-handle",
            Self::LeaseExpired => "lease-expired",
            Self::TooManyHandles => "too-many-handles",
            Self::Cancelled => "cancelled",
            Self::UnavailableInStdio => "unavailable-in-stdio",
        }
    }

    /// Whether retrying the same request later can succeed without anything else changing.
    pub const fn retryable(self) -> bool {
        matches!(self, Self::LockTimeout | Self::TooManyHandles)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind(), self.code())
    }
}

/// The structured `data` member of every error the helper sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorData {
    /// [`ErrorCode::kind`] of the code.
    pub kind: String,
    /// [`ErrorCode::retryable`] of the code, or true for a transient I/O error.
    pub retryable: bool,
    /// The OS errno, when an operating-system call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// The chain of underlying causes, outermost first (excluding `message` itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    /// The image reference involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The image id involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The layer id involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// A path relative to a storage root, or a tar entry name, involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Image ids a prefix matched (for `ambiguous-reference`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
}

/// A JSON-RPC error object as sent by the helper.
///
/// ```
/// use cstor_protocol::{ErrorCode, RpcError};
/// let e = RpcError::new(ErrorCode::LayerNotFound, "layer not found: abc").with_layer("abc");
/// let json = serde_json::to_value(&e).unwrap();
/// assert_eq!(json["code"], 1203);
/// assert_eq!(json["data"]["kind"], "layer-not-found");
/// assert_eq!(json["data"]["layer"], "abc");
/// let back: RpcError = serde_json::from_value(json).unwrap();
/// assert_eq!(back.error_code(), Some(ErrorCode::LayerNotFound));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} [{}]", self.describe_code())]
pub struct RpcError {
    /// The numeric code (see [`ErrorCode`]).
    pub code: i32,
    /// A human-readable message.
    pub message: String,
    /// Structured details. Always present in errors from cstor-helper. (Boxed to keep
    /// `Result<_, RpcError>` small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<ErrorData>>,
}

impl RpcError {
    /// An error with `data` filled from the code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
            data: Some(Box::new(ErrorData {
                kind: code.kind().to_owned(),
                retryable: code.retryable(),
                ..ErrorData::default()
            })),
        }
    }

    /// The known code, if any.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(self.code)
    }

    /// Whether the request may succeed if retried.
    pub fn retryable(&self) -> bool {
        self.data.as_ref().map(|d| d.retryable).unwrap_or(false)
    }

    fn describe_code(&self) -> String {
        match self.error_code() {
            Some(c) => c.to_string(),
            None => format!("code {}", self.code),
        }
    }

    fn data_mut(&mut self) -> &mut ErrorData {
        self.data.get_or_insert_with(Default::default)
    }

    /// Records the errno of a failed system call.
    pub fn with_errno(mut self, errno: Option<i32>) -> Self {
        self.data_mut().errno = errno;
        self
    }

    /// Appends a cause (outermost first).
    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.data_mut().causes.push(cause.into());
        self
    }

    /// Records the image reference involved.
    pub fn with_reference(mut self, r: impl Into<String>) -> Self {
        self.data_mut().reference = Some(r.into());
        self
    }

    /// Records the image id involved.
    pub fn with_image(mut self, id: impl Into<String>) -> Self {
        self.data_mut().image = Some(id.into());
        self
    }

    /// Records the layer id involved.
    pub fn with_layer(mut self, id: impl Into<String>) -> Self {
        self.data_mut().layer = Some(id.into());
        self
    }

    /// Records the path or entry name involved.
    pub fn with_path(mut self, p: impl Into<String>) -> Self {
        self.data_mut().path = Some(p.into());
        self
    }

    /// Records the candidates of an ambiguous prefix.
    pub fn with_candidates(mut self, c: Vec<String>) -> Self {
        self.data_mut().candidates = c;
        self
    }

    /// Marks the error as retryable (e.g. EINTR/EAGAIN-like I/O failures).
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.data_mut().retryable = retryable;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_kinds_are_unique() {
        let codes: HashSet<_> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        let kinds: HashSet<_> = ErrorCode::ALL.iter().map(|c| c.kind()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        assert_eq!(kinds.len(), ErrorCode::ALL.len());
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(*c));
        }
    }

    #[test]
    fn unknown_code_still_displays() {
        let e = RpcError {
            code: 4242,
            message: "future error".into(),
            data: None,
        };
        assert_eq!(e.error_code(), None);
        assert!(!e.retryable());
        assert_eq!(e.to_string(), "future error [code 4242]");
    }
}
