//! The image's EROFS image: its file tree (built while the layers streamed, or read back
//! from the stored layer streams), transformed as composefs-oci transforms it, and written
//! as a repository object named `images/<id>`; the V1 format streamed by `cstor-erofs`
//! while another thread computes its object id.

use std::collections::HashMap;
use std::sync::Arc;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::{Stat, is_allowed_container_xattr};
use composefs::repository::Repository;
use composefs_oci::OciDigest;

use crate::error::{Error, Result, repo_err};
use crate::object_file::ObjectFile;
use crate::report::TreeSource;
use crate::tree::{CompactTree, Frozen};

/// The EROFS image(s) written for an image, and what went into them.
#[derive(Debug)]
pub(super) struct Written<ObjectID> {
    /// Each format's image.
    pub images: HashMap<FormatVersion, ObjectID>,
    /// Whether the tree has `/usr` (upstream's transform applied).
    pub has_usr: bool,
    /// Where the tree came from.
    pub tree: TreeSource,
}

/// Builds the image's filesystem from its layer streams and writes its EROFS image(s).
/// The tree comes from the tree thread when there is one (built while the layers streamed),
/// else, or if that failed, from the stored layer streams.
pub(super) fn write_erofs<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    layers: &[(OciDigest, ObjectID)],
    tree: Option<crate::tree::Builder<ObjectID>>,
) -> Result<Written<ObjectID>> {
    let prebuilt = match tree.map(crate::tree::Builder::finish) {
        Some(Ok(Some(fs))) => Some(fs),
        Some(Ok(None)) => {
            tracing::debug!("the tree thread gave up: reading the layer streams");
            None
        }
        Some(Err(e)) => {
            tracing::warn!(
                "building the tree while streaming failed ({e:#}); reading the layer streams \
                 instead"
            );
            None
        }
        None => None,
    };
    let source = match prebuilt {
        Some(_) => TreeSource::Streamed,
        None => TreeSource::ReadBack,
    };
    let mut tree = match prebuilt {
        Some(tree) => tree,
        None => {
            let mut tree = CompactTree::spilling(Some(crate::spill::spill_maker(repo)));
            for (diff_id, verity) in layers {
                crate::tree::apply_stored(repo, verity, |e| tree.apply(e))
                    .map_err(repo_err(format!("applying layer {diff_id}")))?;
            }
            tree
        }
    };
    crate::sys::log_memory("tree built");
    let has_usr = tree.has_usr();
    let transform_err = |e: composefs::generic_tree::ImageError| {
        repo_err("transforming the image for OCI")(e.into())
    };
    // composefs-oci's `transform_for_oci` with its default options, step by step (its last
    // step, `compact`, renumbers leaves to drop orphans; the writer skips orphans instead).
    if has_usr {
        tree.copy_root_metadata_from_usr().map_err(transform_err)?;
        tree.canonicalize_run().map_err(transform_err)?;
    } else if tree.root_is_uninitialized() {
        // No /usr to take the root's metadata from: keep the root entry of the layers, or a
        // plain 0755 root:root directory when no layer had one.
        let mut stat = Stat::uninitialized();
        stat.st_mode = 0o755;
        tree.set_root_stat(stat).map_err(transform_err)?;
    }
    tree.filter_xattrs(is_allowed_container_xattr);
    crate::sys::log_memory("tree transformed");
    let versions: Vec<FormatVersion> = repo.format_config().versions().collect();
    let images = if versions == [FormatVersion::V1] {
        let frozen = tree.freeze().map_err(transform_err)?;
        // What freezing dropped (the name index, the records) lies in blocks the layout's
        // large tables cannot reuse: give it back before they are allocated.
        cstor_sys::memory::release_free_memory();
        crate::sys::log_memory("tree frozen");
        let id = write_v1_image(repo, &frozen)?;
        HashMap::from([(FormatVersion::V1, id)])
    } else {
        // Other formats (legacy V2, or V1 plus V2) are rare enough to leave to composefs,
        // which writes them from its own tree.
        let mut fs = tree
            .to_composefs()
            .map_err(repo_err("transforming the image for OCI"))?;
        drop(tree);
        if fs.nlinks().contains(&0) {
            fs.compact();
        }
        fs.commit_images(repo, None)
            .map_err(repo_err("writing the EROFS image"))?
    };
    Ok(Written {
        images,
        has_usr,
        tree: source,
    })
}

/// An error of `cstor_erofs::write_image`, named once: its `Io` variant both says "writing
/// the EROFS image: <error>" and has the I/O error as its source, so wrapping it whole gave
/// "writing the EROFS image: writing the EROFS image: No space left on device (os error 28):
/// No space left on device (os error 28)". The I/O error is reported like every other one.
fn erofs_write_error(e: cstor_erofs::Error) -> Error {
    match e {
        cstor_erofs::Error::Io(cause) => Error::io("writing the EROFS image", cause),
        other => repo_err("writing the EROFS image")(other.into()),
    }
}

/// Streams the V1 EROFS image of `tree` into a repository object and names it `images/<id>`,
/// as `commit_images` does, without holding the image (or composefs' per-file xattr copies)
/// in memory: this is where an import used to reach its peak memory.
fn write_v1_image<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    tree: &Frozen<ObjectID>,
) -> Result<ObjectID> {
    let checked = || {
        tree.check()
            .map_err(|e| Error::io("reading the tree's object ids back", e))
    };
    let Some(mut object) = ObjectFile::create(repo)? else {
        // No O_TMPFILE here (some FUSE filesystems): build the image in memory instead.
        let mut image = Vec::new();
        cstor_erofs::write_view(tree, FormatVersion::V1, &mut image).map_err(erofs_write_error)?;
        checked()?;
        return repo
            .write_image(None, &image)
            .map_err(repo_err("storing the EROFS image"));
    };
    cstor_erofs::write_view(tree, FormatVersion::V1, &mut object).map_err(erofs_write_error)?;
    checked()?;
    let id = object.finish("the EROFS image")?;
    crate::sys::log_memory("image written");
    repo.symlink(
        format!("images/{}", id.to_hex()),
        format!("objects/{}", id.to_object_pathname()),
    )
    .map_err(repo_err("naming the EROFS image"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_of_the_erofs_image_is_named_once() {
        let e = erofs_write_error(cstor_erofs::Error::Io(std::io::Error::from_raw_os_error(
            28,
        )));
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            shown.matches("writing the EROFS image").count(),
            1,
            "{shown}"
        );
        assert_eq!(shown.matches("os error 28").count(), 1, "{shown}");
        let e = erofs_write_error(cstor_erofs::Error::InvalidTree("a dangling leaf".into()));
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            shown,
            "writing the EROFS image: invalid filesystem tree: a dangling leaf"
        );
    }
}
