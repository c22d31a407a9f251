//! Writing an image's config and manifest streams, its EROFS image and its tag, once its
//! layers are in the repository.
//!
//! This follows what composefs-oci's own pull does, step by step, so that the result is what
//! `cfsctl oci pull` produces (see docs/dev/composefs-0.9.4-notes.md), with these deliberate
//! differences:
//! - images without `/usr` (a scratch image with one static binary) get an EROFS image too:
//!   upstream's `transform_for_oci` copies the root directory's metadata from `/usr` and
//!   fails without it; we keep the root entry of the tar instead, and apply the same xattr
//!   filtering and compaction. Images with `/usr` go through `transform_for_oci` unchanged;
//! - the final manifest stream lists layer references in config order; upstream uses hash
//!   map order, so its output varies between runs, and ours is always one of its outputs;
//! - upstream writes a config and a manifest stream before the EROFS image and both again
//!   after it (the first pair stays behind as unreferenced objects); a fresh import here
//!   writes only the final pair;
//! - the V1 EROFS image is streamed by `cstor-erofs` (same bytes, a fraction of the memory);
//! - layer streams are stored without a name and named here after a single `syncfs`, which
//!   runs while the EROFS image is built (upstream's `write_stream` syncs once per layer,
//!   and the last of those syncs delays everything after it);
//! - with `bootable`, the boot image is composefs-oci's own (`generate_boot_image`), made
//!   before the tag as upstream's pull makes it, and the manifest stream it rewrites is
//!   written once more, with the layers in config order as above.
//!
//! - `layer_naming`: naming the stored layer streams after one `syncfs`;
//! - `erofs_image`: the file tree and the EROFS image written from it;
//! - `oci_streams`: the config and manifest streams.

mod erofs_image;
mod layer_naming;
mod oci_streams;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::OciDigest;
use composefs_oci::oci_image::{OciImage, manifest_identifier, tag_image};

pub use layer_naming::{Unnamed, name_layers};
pub use oci_streams::{CONFIG_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, config_identifier};

use crate::error::{Error, Result, repo_err};
use crate::report::TreeSource;
use layer_naming::Naming;

/// What finalizing produced.
#[derive(Debug, Clone)]
pub struct Finalized<ObjectID> {
    /// Digest and final verity of the manifest stream.
    pub manifest: (OciDigest, ObjectID),
    /// Digest and final verity of the config stream.
    pub config: (OciDigest, ObjectID),
    /// The EROFS image of the repository's default format.
    pub erofs: ObjectID,
    /// Its boot variant, when asked for.
    pub boot: Option<ObjectID>,
    /// Whether the image was already complete (only the tag was written, and the boot
    /// variant if it was asked for and missing).
    pub already_complete: bool,
    /// Whether the image has a `/usr` directory (upstream's transform applied); `None`
    /// when the EROFS image already existed.
    pub has_usr: Option<bool>,
    /// Where the EROFS image's file tree came from; `None` when the image already existed.
    pub tree: Option<TreeSource>,
}

/// The image being finalized: what containers-storage has of it, and what the import made.
#[derive(Debug)]
pub struct Image<'a, ObjectID> {
    /// The manifest, as stored (its digest names the image).
    pub manifest_json: &'a [u8],
    /// The config, as stored.
    pub config_json: &'a [u8],
    /// Every layer's diff id and stream, in config `diff_ids` order.
    pub layers: &'a [(OciDigest, ObjectID)],
    /// The tag to write.
    pub tag: &'a str,
    /// Whether to write the boot variant of the EROFS image too.
    pub bootable: bool,
}

/// Writes the config and manifest streams, the EROFS image and the tag of an image whose
/// layers are stored, and names the layer streams this import stored (`unnamed`).
/// Idempotent.
///
/// The `syncfs` that must precede naming those layer streams runs in the background while
/// the EROFS image is built. `stop` (the import was cancelled) is looked at before the image
/// is built and before it is tagged: the layer streams are named either way (each is
/// complete and verified), the tag only if the import was not cancelled.
pub fn finalize<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    image: Image<'_, ObjectID>,
    unnamed: &[Unnamed<ObjectID>],
    tree: Option<crate::tree::Builder<ObjectID>>,
    stop: &AtomicBool,
) -> Result<Finalized<ObjectID>> {
    let Image {
        manifest_json,
        config_json,
        layers,
        tag,
        bootable,
    } = image;
    let mut naming = Naming::start(repo, unnamed)?;
    let cancelled = |naming: &mut Naming<'_, ObjectID>| -> Result<()> {
        if stop.load(Relaxed) {
            naming.finish()?;
            return Err(Error::Cancelled);
        }
        Ok(())
    };
    cancelled(&mut naming)?;
    let config_digest = composefs_oci::sha256_content_digest(config_json);
    let config_id = config_identifier(&config_digest);
    let manifest_digest = composefs_oci::sha256_content_digest(manifest_json);
    let manifest_id = manifest_identifier(&manifest_digest);

    let mut done = match complete(repo, &manifest_digest, &manifest_id, &config_id)? {
        Some((manifest_verity, config_verity, erofs)) => {
            naming.finish()?;
            Finalized {
                manifest: (manifest_digest, manifest_verity),
                config: (config_digest, config_verity),
                erofs,
                boot: None,
                already_complete: true,
                has_usr: None,
                tree: None,
            }
        }
        None => {
            let written = erofs_image::write_erofs(repo, layers, tree);
            // Named even when the build failed: a later import then skips those layers.
            naming.finish()?;
            let written = written?;
            cancelled(&mut naming)?;
            let version = repo.erofs_version();
            let erofs = match version {
                FormatVersion::V1 => written.images.get(&FormatVersion::V1),
                _ => written.images.get(&FormatVersion::V2),
            }
            .cloned()
            .ok_or_else(|| {
                Error::repository(
                    "writing the EROFS image",
                    anyhow::anyhow!(
                        "no image of the repository's default format {version:?} was produced"
                    ),
                )
            })?;
            let config_verity =
                oci_streams::write_config(repo, config_json, layers, &written.images)?;
            let manifest_verity = oci_streams::write_manifest(
                repo,
                manifest_json,
                &manifest_id,
                &config_digest,
                &config_verity,
                layers,
            )?;
            Finalized {
                manifest: (manifest_digest, manifest_verity),
                config: (config_digest, config_verity),
                erofs,
                boot: None,
                already_complete: false,
                has_usr: Some(written.has_usr),
                tree: Some(written.tree),
            }
        }
    };
    if bootable {
        // Before the tag, as upstream's pull: an image that cannot boot (no /boot, say)
        // fails the import without one.
        cancelled(&mut naming)?;
        done.add_boot_image(repo, manifest_json, &manifest_id, &config_id, layers)?;
    }
    cancelled(&mut naming)?;
    tag_image(repo, &done.manifest.0, tag).map_err(repo_err(format!("tagging {tag}")))?;
    Ok(done)
}

/// The manifest verity, config verity and EROFS image (of the repository's format) of an
/// image an earlier import got as far as its manifest stream with, if one did: then only
/// the tag is missing. (Upstream writes initial config and manifest streams before building
/// the image and rewrites both afterwards; a fresh import skips the initial pair, which
/// nothing ever reads: two stream objects and two syncfs less.)
fn complete<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    manifest_digest: &OciDigest,
    manifest_id: &str,
    config_id: &str,
) -> Result<Option<(ObjectID, ObjectID, ObjectID)>> {
    let Some(manifest_verity) = repo
        .has_stream(manifest_id)
        .map_err(repo_err("looking up the manifest stream"))?
    else {
        return Ok(None);
    };
    let Some(erofs) = OciImage::open(repo, manifest_digest, Some(&manifest_verity))
        .ok()
        .and_then(|img| img.image_ref(repo.erofs_version()).cloned())
    else {
        return Ok(None);
    };
    Ok(repo
        .has_stream(config_id)
        .map_err(repo_err("looking up the config stream"))?
        .map(|config_verity| (manifest_verity, config_verity, erofs)))
}

impl<ObjectID: FsVerityHashValue> Finalized<ObjectID> {
    /// Writes the boot variant of the image with composefs-oci's own code (as its pull with
    /// `bootable` does: the boot transform with its default options), unless the image has
    /// one. composefs-oci then rewrites the config stream to refer to it, and the manifest
    /// stream with the layers in hash map order: the manifest is written again in config
    /// order, so that an image always gets the same manifest stream.
    fn add_boot_image(
        &mut self,
        repo: &Arc<Repository<ObjectID>>,
        manifest_json: &[u8],
        manifest_id: &str,
        config_id: &str,
        layers: &[(OciDigest, ObjectID)],
    ) -> Result<()> {
        let boot = composefs_oci::boot::generate_boot_image(
            repo,
            &self.manifest.0,
            &composefs::generic_tree::OciTransformOptions::default(),
        )
        .map_err(repo_err("writing the boot EROFS image"))?;
        let reread = |id: &str| {
            repo.has_stream(id)
                .map_err(repo_err(format!("looking up {id}")))?
                .ok_or_else(|| {
                    Error::repository(
                        format!("looking up {id}"),
                        anyhow::anyhow!("gone after the boot image was written"),
                    )
                })
        };
        let config_verity = reread(config_id)?;
        if config_verity != self.config.1 {
            self.manifest.1 = oci_streams::write_manifest(
                repo,
                manifest_json,
                manifest_id,
                &self.config.0,
                &config_verity,
                layers,
            )?;
            self.config.1 = config_verity;
        }
        self.boot = Some(boot);
        Ok(())
    }
}
