//! Importing container images from containers-storage into composefs repositories, through
//! `cstor-helper`.
//!
//! Layers stream from the helper ([`cstor_proxy_client`]); every regular file above 64 bytes
//! becomes a repository object by reflink (or copy), smaller ones and all tar headers go
//! inline into the layer's splitstream, exactly as composefs-oci's tar import splits them.
//! Each layer's rebuilt tar is checked against its diff id before the layer stream is
//! stored; layer streams get their names after one `syncfs` at the end (also when another
//! layer failed, so that a retry skips them), and the image's config, manifest, EROFS image
//! and tag are written last, so an interrupted import leaves only unreferenced objects
//! behind, never a partial layer or image under a final name. What is written is what
//! upstream `cfsctl oci pull` writes for the same image: upstream's tools read it.
//!
//! - [`import_image`] with [`ImportOptions`], giving an [`ImportReport`];
//! - [`init_repository`], [`open_repository`], [`repository_algorithm`]: repositories the
//!   way `cfsctl` makes and opens them;
//! - progress through composefs' own reporter or a channel of [`ImportEvent`]s.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use cstor_import::{ImportOptions, import_image, open_repository};
//! use cstor_proxy_client::{Client, HelperConfig};
//! use composefs::fsverity::Sha512HashValue;
//!
//! let repo = open_repository::<Sha512HashValue>("/var/lib/composefs".as_ref())?;
//! let client = Client::spawn(&HelperConfig::default()).await?;
//! let report = import_image(&client, &repo, "localhost/myimage", &ImportOptions::new()).await?;
//! println!("{} reflinked, {} copied", report.stats().objects_reflinked, report.stats().objects_copied);
//! # Ok(()) }
//! ```
//!
//! The crate depends on `composefs` and `composefs-oci` at exactly one version (`=0.9.4`):
//! the bytes it writes (splitstreams, EROFS images, config and manifest streams) must be
//! those upstream writes, and a new upstream version may change them. A bump means running
//! the equivalence tests against the new version and reading its changes to those formats.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
#![forbid(unsafe_code)]

mod cancel;
mod copy;
mod error;
mod finalize;
mod image;
mod layer_import;
mod object_file;
mod objects;
mod options;
mod ostree;
mod progress;
mod push;
mod repo;
mod report;
mod spill;
mod splitstream;
mod stream_queue;
mod sys;
mod tree;
mod verity;

pub use copy::{Service as RepositoryService, copy_image, copy_image_from_service};
pub use error::{Error, Result};
pub use finalize::{CONFIG_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, config_identifier};
pub use image::import_image;
pub use options::{CopyPolicy, ImportOptions};
pub use ostree::{
    IMAGE_REF_KEY, OSTREE_COMMIT_CONTENT_TYPE, OstreeImportReport, commit_identifier,
    import_ostree_commit, ref_path,
};
pub use progress::ImportEvent;
pub use push::{PushReport, PushedLayer, import_image_via_service};
pub use repo::{
    InitOutcome, RepoAlgorithm, init_repository, open_repository, repository_algorithm,
};
pub use report::{ImportReport, LayerReport, ObjectStats, TreeSource};

/// Files up to this size are stored inline in a layer's splitstream, larger ones as
/// repository objects, as composefs-oci splits them (`INLINE_CONTENT_MAX_V0`): the layer
/// streams, and so the image ids, depend on it.
pub const INLINE_MAX: u64 = 64;

/// The stream name of a layer (`oci-layer-<diff id>`), as composefs-oci names it.
pub fn layer_identifier(diff_id: &str) -> String {
    format!("oci-layer-{diff_id}")
}
