//! The contract between `cstor-helper` and its clients, protocol version 1.
//!
//! The helper serves [JSON-RPC 2.0] over an `AF_UNIX` `SOCK_STREAM` socket with file
//! descriptors passed as `SCM_RIGHTS` ancillary data, framed as the `jsonrpc-fdpass` crate
//! specifies (messages are JSON objects back to back; a message carrying fds has a top-level
//! `"fds": N`). This crate holds everything both sides must agree on:
//!
//! - [`Version`] and the [`capability`] tokens negotiated by `Initialize`;
//! - the [`method`] names with their params and result types ([`methods`]);
//! - [`ErrorCode`], the stable error codes, and [`RpcError`], the error object on the wire;
//! - the [`stream`] format a layer is described in, and [`assemble`], which rebuilds a tar
//!   from it and checks it;
//! - [`fds`]: how each side keeps its file descriptors within its limit, so that `SCM_RIGHTS`
//!   never drops one.
//!
//! The prose specification, with an example exchange for every method, is `docs/protocol.md`
//! in the repository.
//!
//! [JSON-RPC 2.0]: https://www.jsonrpc.org/specification
//!
//! ```
//! use cstor_protocol::{method, GetImageParams, PROTOCOL_VERSION};
//! let req = serde_json::json!({
//!     "jsonrpc": "2.0", "id": 1, "method": method::GET_IMAGE,
//!     "params": GetImageParams { reference: "busybox".into() },
//! });
//! assert_eq!(req["params"]["reference"], "busybox");
//! assert_eq!(PROTOCOL_VERSION.to_string(), "1.1");
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod assemble;
mod error;
pub mod fds;
pub mod methods;
pub mod ostree;
pub mod reference;
pub mod stream;
mod version;

pub use error::{ErrorCode, ErrorData, RpcError};
pub use methods::*;
pub use version::{PROTOCOL_VERSION, ParseVersionError, Version, capability};
