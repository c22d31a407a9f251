//! `cstor-helper`: a small, read-only server of containers-storage (overlay driver).
//!
//! The helper is spawned by a client (root, or inside the user's namespace with
//! `podman unshare`) with one end of a socketpair on fd 0. It resolves images, reads their
//! manifests, configs and layer chains, and streams each layer as tar-split metadata plus
//! file descriptors opened by the helper itself, so an unprivileged client can reflink files
//! it could not open by name. The wire protocol is the [`cstor_protocol`] crate;
//! `docs/protocol.md` is its prose specification.
//!
//! The library is organised by concept:
//! - [`storage`]: storage.conf discovery, images, layers, references, opening layers;
//! - [`tarsplit`]: the tar-split reader; [`lock`]: read locks that interoperate with
//!   c/storage; [`confine`]: fd-relative opens that cannot escape a root;
//! - [`server`]: the JSON-RPC dispatcher, the socket transport and the `--stdio` transport;
//! - [`varlink`]: the `org.composefs.Oci` varlink producer (`--varlink`) that composefs'
//!   own consumers read layers from.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cstor_helper::server::{Helper, ServerConfig};
//! use cstor_helper::storage::{Storage, config::{ConfigEnv, StorageOptions}};
//!
//! let options = StorageOptions::load(&ConfigEnv::from_process())?;
//! let storage = Storage::open(options, Duration::from_secs(30))?;
//! for image in storage.list_images()? {
//!     println!("{} {:?}", image.id, image.names);
//! }
//! let _helper = Arc::new(Helper { storage, config: ServerConfig::default() });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod confine;
pub mod error;
pub mod lock;
pub mod ostree;
pub mod server;
pub mod storage;
pub mod tarsplit;
pub mod varlink;

pub use error::{Error, Result};
