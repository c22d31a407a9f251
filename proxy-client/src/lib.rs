//! Client of `cstor-helper`: spawn it (directly as root, through `podman unshare` when
//! rootless), drive it over JSON-RPC with fd passing, and read images and layers from
//! containers-storage without copying them.
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
//! let config = HelperConfig {
//!     storage: StorageSelection { graphroot: Some("/var/lib/containers/storage".into()), ..Default::default() },
//!     ..Default::default()
//! };
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
// One audited exception: the XFS geometry ioctl (import/placement.rs), which has no safe
// wrapper.
#![deny(unsafe_code)]

mod client;
mod error;
pub mod import;
mod layer;
mod rpc;
pub mod spawn;

pub use client::Client;
pub use cstor_protocol as protocol;
pub use error::{Error, Result};
pub use layer::{Contents, Layer, check_against, reserve_fd_table};
pub use spawn::{HelperConfig, Privilege, StorageSelection};
