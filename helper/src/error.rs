//! The helper's error type: every failure carries the protocol [`ErrorCode`] it is reported
//! with, so the server never has to guess a code from a message.

use std::fmt;
use std::io;

use cstor_protocol::{ErrorCode, RpcError};

use crate::confine::ConfineError;

/// Details attached to an [`Error`]; they become fields of the JSON-RPC error's `data`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details {
    /// Image reference involved.
    pub reference: Option<String>,
    /// Image id involved.
    pub image: Option<String>,
    /// Layer id involved.
    pub layer: Option<String>,
    /// Path (relative to a storage root) or tar entry name involved.
    pub path: Option<String>,
    /// Candidates of an ambiguous id prefix.
    pub candidates: Vec<String>,
}

/// A failure of the helper, with its protocol code, errno and cause chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(Box<Inner>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Inner {
    code: ErrorCode,
    message: String,
    errno: Option<i32>,
    retryable: bool,
    causes: Vec<String>,
    details: Details,
}

/// Result alias of the helper library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            code,
            message: message.into(),
            errno: None,
            retryable: code.retryable(),
            causes: Vec::new(),
            details: Details::default(),
        }))
    }

    /// An I/O error while `doing` something; keeps the errno and maps well-known errnos to
    /// more precise codes (ENOENT while opening content is decided by the caller).
    pub fn io(doing: impl fmt::Display, err: io::Error) -> Self {
        let errno = err.raw_os_error().or_else(|| {
            err.get_ref()
                .and_then(|inner| inner.downcast_ref::<ConfineError>())
                .map(|c| c.errno())
        });
        let code = if errno == Some(libc_exdev()) {
            ErrorCode::PathEscape
        } else {
            ErrorCode::Io
        };
        let retryable = matches!(
            err.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        );
        let mut e = Self::new(code, format!("{doing}: {err}"));
        e.0.errno = errno;
        e.0.retryable = retryable;
        e
    }

    /// The protocol code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }

    /// The message (without causes).
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The errno, if an OS call failed.
    pub fn errno(&self) -> Option<i32> {
        self.0.errno
    }

    /// Details attached so far.
    pub fn details(&self) -> &Details {
        &self.0.details
    }

    /// Replaces the code (e.g. an I/O ENOENT that means "missing file").
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        self.0.code = code;
        self.0.retryable = code.retryable();
        self
    }

    /// Wraps the error in an outer context: the context becomes the message, the old
    /// message the first cause.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        let inner = std::mem::replace(&mut self.0.message, ctx.to_string());
        self.0.causes.insert(0, inner);
        self
    }

    /// Records the reference involved.
    pub fn reference(mut self, r: impl Into<String>) -> Self {
        self.0.details.reference = Some(r.into());
        self
    }

    /// Records the image involved.
    pub fn image(mut self, id: impl Into<String>) -> Self {
        self.0.details.image = Some(id.into());
        self
    }

    /// Records the layer involved.
    pub fn layer(mut self, id: impl Into<String>) -> Self {
        self.0.details.layer = Some(id.into());
        self
    }

    /// Records the path or entry name involved.
    pub fn path(mut self, p: impl Into<String>) -> Self {
        self.0.details.path = Some(p.into());
        self
    }

    /// Records candidates of an ambiguous prefix.
    pub fn candidates(mut self, c: Vec<String>) -> Self {
        self.0.details.candidates = c;
        self
    }
}

fn libc_exdev() -> i32 {
    rustix::io::Errno::XDEV.raw_os_error()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        for c in &self.0.causes {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        let e = *e.0;
        let mut r = RpcError::new(e.code, e.message)
            .with_errno(e.errno)
            .with_retryable(e.retryable);
        for c in e.causes {
            r = r.with_cause(c);
        }
        let d = e.details;
        if let Some(v) = d.reference {
            r = r.with_reference(v);
        }
        if let Some(v) = d.image {
            r = r.with_image(v);
        }
        if let Some(v) = d.layer {
            r = r.with_layer(v);
        }
        if let Some(v) = d.path {
            r = r.with_path(v);
        }
        if !d.candidates.is_empty() {
            r = r.with_candidates(d.candidates);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_builds_a_cause_chain() {
        let e = Error::io(
            "opening overlay-layers/layers.json",
            io::Error::from_raw_os_error(13),
        )
        .context("listing images")
        .layer("abc");
        assert_eq!(e.code(), ErrorCode::Io);
        assert_eq!(e.errno(), Some(13));
        let r: RpcError = e.into();
        assert_eq!(r.message, "listing images");
        let d = r.data.unwrap();
        assert_eq!(d.errno, Some(13));
        assert!(d.causes[0].starts_with("opening overlay-layers/layers.json"));
        assert_eq!(d.layer.as_deref(), Some("abc"));
    }

    #[test]
    fn exdev_means_escape() {
        let e = Error::io("opening x", io::Error::from_raw_os_error(18));
        assert_eq!(e.code(), ErrorCode::PathEscape);
    }
}
