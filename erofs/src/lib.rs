//! Streaming writer of composefs EROFS images.
//!
//! composefs repositories name an image by the fs-verity digest of its EROFS bytes, so an
//! importer that wants its images to be found by upstream tools (`cfsctl`, bootc) has to
//! produce exactly the bytes that composefs' own writer produces for the same tree. This crate
//! does that for the repository default, [`FormatVersion::V1`] (the layout of C
//! `mkcomposefs --min-version=1`), with two differences that matter for big images:
//!
//! - **Memory**: composefs 0.9.4 clones the tree, keeps every inode's extended attributes as
//!   separate heap allocations (two per file for the overlay metacopy and redirect), counts
//!   them in an ordered map of clones, and builds the image in one buffer: about 1.6 KiB per
//!   file on top of the tree. Here a file costs a few dozen bytes of layout; the overlay
//!   attributes are computed from the object id when they are written, and only attributes
//!   that really repeat are materialised.
//! - **Streaming**: the image is written to any [`Write`] (a repository tmpfile, say) in a
//!   layout pass and an emit pass; nothing the size of the image is held in memory.
//! - **Any tree**: [`write_view`] reads the tree through [`TreeView`], so a program that
//!   keeps its tree compactly does not have to build composefs' `FileSystem` (about 250
//!   bytes a file) to get the image; [`write_image`] is the same for composefs' tree.
//!
//! Equality with composefs is not a claim but a test: the unit tests build trees covering every
//! layout rule (hardlinks across directories, whiteouts, shared and escaped xattrs, inline and
//! block-sized files, long symlinks, large directories, device nodes) and compare the bytes
//! with `composefs::erofs::writer::mkfs_erofs_versioned`; the integration tests compare image
//! ids of real imports with composefs-oci's own import.
//!
//! # Example
//!
//! ```
//! use composefs::erofs::format::FormatVersion;
//! use composefs::fsverity::Sha512HashValue;
//! use composefs::tree::{FileSystem, Stat};
//!
//! let mut root = Stat::uninitialized();
//! root.st_mode = 0o755;
//! let fs = FileSystem::<Sha512HashValue>::new(root);
//! let mut image = Vec::new();
//! let len = cstor_erofs::write_image(&fs, FormatVersion::V1, &mut image)?;
//! assert_eq!(len, image.len() as u64);
//! assert_eq!(len % 4096, 0);
//! # Ok::<(), cstor_erofs::Error>(())
//! ```

#![forbid(unsafe_code)]

use std::io::Write;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::FsVerityHashValue;
use composefs::tree::FileSystem;

mod collect;
mod emit;
mod view;
mod xattr;

pub use view::{Child, Content, DirRef, TreeView};

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The writer only produces [`FormatVersion::V1`]; use composefs' writer for the others.
    #[error("EROFS format {0:?} is not produced by this writer (only V1 is)")]
    UnsupportedVersion(FormatVersion),
    /// The tree is inconsistent (dangling or orphaned leaves, a hardlinked whiteout).
    #[error("invalid filesystem tree: {0}")]
    InvalidTree(String),
    /// Something in the tree cannot be represented in EROFS (a device number over 32 bits, a
    /// name or xattr longer than the format allows, more than 2^32 blocks).
    #[error("cannot be represented in EROFS: {0}")]
    Unrepresentable(String),
    /// Writing to the output failed.
    #[error("writing the EROFS image: {0}")]
    Io(#[from] std::io::Error),
    /// The emit pass did not reproduce the layout of the layout pass: a bug in this crate.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Writes the EROFS image of `fs` in format `version` to `out` and returns its length.
///
/// The bytes are identical to what composefs' `mkfs_erofs_versioned(fs, version)` returns for
/// the same tree (so the image's fs-verity digest, its name in a repository, is too). `out`
/// receives sequential writes only; wrap unbuffered files in a `BufWriter`.
///
/// # Errors
///
/// [`Error::UnsupportedVersion`] for anything but V1, [`Error::InvalidTree`] when
/// `fs.fsck()` fails or a whiteout is hardlinked, [`Error::Unrepresentable`] for values the
/// format cannot hold, [`Error::Io`] when `out` fails. On error `out` may hold a partial image.
pub fn write_image<ObjectID: FsVerityHashValue>(
    fs: &FileSystem<ObjectID>,
    version: FormatVersion,
    out: impl Write,
) -> Result<u64, Error> {
    if version != FormatVersion::V1 {
        return Err(Error::UnsupportedVersion(version));
    }
    fs.fsck().map_err(|e| Error::InvalidTree(e.to_string()))?;
    write_view(fs, version, out)
}

/// Writes the EROFS image of the tree `view` presents, as [`write_image`] does for a
/// composefs tree: the same bytes for the same directories, names, stats and contents.
///
/// Leaves that no directory names are left out (where [`write_image`] refuses a tree that
/// has any, as composefs' `fsck` does).
///
/// # Errors
///
/// As [`write_image`]; [`Error::InvalidTree`] when an entry names a leaf beyond
/// [`TreeView::leaf_count`] or a directory is reached twice.
pub fn write_view<V: TreeView>(
    view: &V,
    version: FormatVersion,
    out: impl Write,
) -> Result<u64, Error> {
    if version != FormatVersion::V1 {
        return Err(Error::UnsupportedVersion(version));
    }
    let stub = collect::whiteout_stub(view.dir_stat(view.root()));
    let mut tree = collect::collect(view, &stub)?;
    let shared = xattr::Shared::count(&tree)?;
    view.laid_out();
    emit::write(&mut tree, &shared, out)
}

#[cfg(test)]
mod tests;
