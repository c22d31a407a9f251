//! Client of `cstor-helper`: spawn it (directly as root, through `podman unshare` when
//! rootless), drive it over JSON-RPC with fd passing, and read images and layers from
//! containers-storage without copying them.
//!
//! This crate only talks to the helper: it has no composefs, OpenSSL or command-line
//! dependencies. Importing into composefs repositories is the `cstor-import` crate's job,
//! the `cstor` command the `cstor-cli` crate's.
//!
//! - [`Client`]: the typed async API (`list_images`, `get_image`, `open_layer`...), usable
//!   on a `current_thread` tokio runtime;
//! - [`Layer`]: an open layer: its stream of tar metadata and the content fds the helper
//!   opened, plus [`Layer::write_tar`] to rebuild and verify the tar bit for bit;
//! - [`HelperConfig`]: which helper, which storage, which privilege mode.
//!
//! ```no_run
//! # async fn f() -> Result<(), cstor_proxy_client::Error> {
//! use cstor_proxy_client::{Client, HelperConfig, StorageSelection};
//! let config = HelperConfig::default()
//!     .storage(StorageSelection::default().graphroot("/var/lib/containers/storage"));
//! let client = Client::spawn(&config).await?;
//! let image = client.get_image("localhost/myimage").await?;
//! for l in &image.layers {
//!     let layer = client.open_layer(&l.id).await?;
//!     let (tar, _) = layer.write_tar(std::io::sink()).await?; // checks CRCs and the diff id
//!     println!("{} {} bytes", tar.digest, tar.size);
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod client;
mod error;
mod layer;
mod rpc;
pub mod spawn;

pub use client::Client;
pub use cstor_protocol as protocol;
pub use error::{Error, Result};
pub use layer::{
    Contents, DEFAULT_PREFETCH, Layer, check_against, fd_budget, read_ahead, reserve_fd_table,
};
pub use spawn::{HelperConfig, Privilege, StorageSelection};
