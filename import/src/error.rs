//! Errors of an import: the helper's and the layer streams' (wrapped), and what can go wrong
//! on the repository's side.

use cstor_protocol::ErrorCode;

/// Everything that can make an import fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Talking to the helper, or checking what it sent, failed: it died, answered with an
    /// error, a layer stream was cut short, a CRC or the diff id did not match.
    #[error(transparent)]
    Helper(#[from] cstor_proxy_client::Error),
    /// A composefs repository operation failed.
    #[error("{doing}: {cause:#}")]
    Repository {
        /// What was being done.
        doing: String,
        /// The composefs error.
        cause: anyhow::Error,
    },
    /// [`crate::CopyPolicy::ReflinkOnly`] was asked, and a file could not be reflinked.
    #[error("{file} cannot be reflinked and copying was not allowed: {reason}")]
    ReflinkRequired {
        /// The tar entry.
        file: String,
        /// Why the reflink failed.
        reason: String,
    },
    /// A file changed while it was being imported.
    #[error("{file} changed during the import: {detail}")]
    ContentChanged {
        /// The tar entry.
        file: String,
        /// What differed.
        detail: String,
    },
    /// The image's config and its layer chain disagree, or another inconsistency.
    #[error("{0}")]
    ImageMismatch(String),
    /// An ostree object (named: `file <checksum>`, `dirtree <checksum>`...) does not hold
    /// what its checksum says, or could not be decoded.
    #[error("ostree {object} is corrupt: {detail}")]
    OstreeObject {
        /// The object's type and checksum.
        object: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The repository an image is copied from has no such tag or image.
    #[error("{0}")]
    NotFound(String),
    /// An object of the repository an image is copied from does not hold what its name
    /// says (its fs-verity digest), or a stream or the image is not what it is named by.
    #[error("{object} in the source repository is corrupt: {detail}")]
    SourceObject {
        /// The object (`object <id> (<layer or stream>)`) or stream.
        object: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The import was cancelled (see [`crate::ImportOptions::cancel`]).
    #[error("the import was cancelled")]
    Cancelled,
    /// A local I/O error.
    #[error("{doing}: {cause}")]
    Io {
        /// What was being done.
        doing: String,
        /// The error.
        cause: std::io::Error,
    },
}

impl Error {
    /// The helper's error code, when the helper reported the error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Helper(e) => e.code(),
            _ => None,
        }
    }

    /// Whether retrying later may succeed (a storage lock held by a writer, a helper that
    /// did not answer in time).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Helper(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The helper's error, when that is what failed.
    pub fn helper_error(&self) -> Option<&cstor_proxy_client::Error> {
        match self {
            Error::Helper(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn io(doing: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            doing: doing.into(),
            cause,
        }
    }

    pub(crate) fn repository(doing: impl Into<String>, cause: anyhow::Error) -> Self {
        Error::Repository {
            doing: doing.into(),
            cause,
        }
    }
}

/// For `map_err` on composefs' results: an [`Error::Repository`] saying what was being
/// done. `doing` is built before the call; where that would cost an allocation per file,
/// call [`Error::repository`] in a closure instead.
pub(crate) fn repo_err(doing: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
    let doing = doing.into();
    move |cause| Error::Repository { doing, cause }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
