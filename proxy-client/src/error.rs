//! Errors of the client library: talking to the helper, and checking what it sent.

use std::path::PathBuf;

use cstor_protocol::assemble::AssembleError;
use cstor_protocol::stream::StreamError;
use cstor_protocol::{ErrorCode, RpcError};

/// Everything that can go wrong talking to a helper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No helper binary was found.
    #[error("cannot find cstor-helper: {0}")]
    HelperNotFound(String),
    /// The helper could not be started.
    #[error("starting {program}: {cause}")]
    Spawn {
        /// The program started.
        program: PathBuf,
        /// Why it failed.
        cause: std::io::Error,
    },
    /// The helper exited or closed the connection.
    #[error("cstor-helper died while {during}: {status}{}", fmt_stderr(stderr))]
    HelperDied {
        /// What the client was doing.
        during: String,
        /// Exit status, or why it is unknown.
        status: String,
        /// The last lines the helper wrote on stderr.
        stderr: String,
    },
    /// The helper answered with an error.
    #[error("{method}: {error}")]
    Remote {
        /// The method called.
        method: String,
        /// The helper's error.
        error: RpcError,
    },
    /// The helper stopped answering: it was killed (releasing its storage locks).
    #[error(
        "cstor-helper did not answer {what} within {seconds:.1} s and was killed (frozen or stopped?){}",
        fmt_stderr(stderr)
    )]
    HelperUnresponsive {
        /// The call that went unanswered.
        what: String,
        /// The deadline.
        seconds: f64,
        /// The last lines the helper wrote on stderr.
        stderr: String,
    },
    /// A helper this client did not start ([`crate::Client::connect`]) did not answer in
    /// time.
    #[error("{what}: no answer from cstor-helper within {seconds:.1} s")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The timeout.
        seconds: f64,
    },
    /// The helper speaks an incompatible protocol version.
    #[error("cstor-helper speaks protocol {helper}, this client needs {client}")]
    Version {
        /// The helper's version.
        helper: String,
        /// Ours.
        client: String,
    },
    /// A reply did not have the documented shape.
    #[error("unexpected reply to {method}: {detail}")]
    Protocol {
        /// The method called.
        method: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading a layer stream failed.
    #[error("layer {layer}: {cause}")]
    Stream {
        /// The layer id.
        layer: String,
        /// Why.
        cause: StreamError,
    },
    /// Rebuilding a layer's tar failed (CRC or size mismatch, unreadable content...).
    #[error("layer {layer}: {cause}")]
    Assemble {
        /// The layer id.
        layer: String,
        /// Why.
        cause: AssembleError,
    },
    /// The rebuilt tar does not have the layer's diff id or size.
    #[error("layer {layer}: rebuilt tar has {actual}, the layer's diff id is {expected}")]
    DigestMismatch {
        /// The layer id.
        layer: String,
        /// The recorded diff id (and size).
        expected: String,
        /// What was rebuilt.
        actual: String,
    },
    /// A local I/O error.
    #[error("{doing}: {cause}")]
    Io {
        /// What was being done.
        doing: String,
        /// The error.
        cause: std::io::Error,
    },
}

fn fmt_stderr(s: &str) -> String {
    if s.trim().is_empty() {
        String::new()
    } else {
        format!("; its stderr ended with:\n{}", s.trim_end())
    }
}

impl Error {
    /// The helper's error code, when the helper reported the error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote { error, .. } => error.error_code(),
            Error::Stream {
                cause: StreamError::Remote(e),
                ..
            } => e.error_code(),
            Error::Assemble {
                cause: AssembleError::Stream(StreamError::Remote(e)),
                ..
            } => e.error_code(),
            _ => None,
        }
    }

    /// Whether retrying later may succeed: the helper said so (a storage lock held by a
    /// writer, say), or it did not answer in time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Remote { error, .. } => error.retryable(),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }

    /// Whether the helper process is gone or could not be started: the caller may start a
    /// new one.
    pub fn is_helper_failure(&self) -> bool {
        matches!(
            self,
            Error::HelperNotFound(_)
                | Error::Spawn { .. }
                | Error::HelperDied { .. }
                | Error::HelperUnresponsive { .. }
        )
    }

    pub(crate) fn io(doing: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            doing: doing.into(),
            cause,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
