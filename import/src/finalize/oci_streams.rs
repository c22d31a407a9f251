//! The image's config and manifest streams, as composefs-oci writes them: the config as
//! stored, with named references to its layer streams and EROFS images; the manifest as
//! stored, with named references to the config stream and the layer streams.

use std::collections::HashMap;
use std::sync::Arc;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::OciDigest;

use crate::error::{Result, repo_err};

/// `ociconfg` in a splitstream header (composefs-oci keeps the constant private).
pub const CONFIG_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ociconfg");
/// `ocimanif` in a splitstream header.
pub const MANIFEST_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ocimanif");

/// The stream name of a config.
pub fn config_identifier(digest: &OciDigest) -> String {
    format!("oci-config-{digest}")
}

/// Writes the config stream (`config_json` with references to `layers` and the EROFS
/// `images`) with composefs-oci's own writer; returns its verity.
pub(super) fn write_config<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    config_json: &[u8],
    layers: &[(OciDigest, ObjectID)],
    images: &HashMap<FormatVersion, ObjectID>,
) -> Result<ObjectID> {
    let refs: HashMap<Box<str>, ObjectID> = layers
        .iter()
        .map(|(d, v)| (Box::<str>::from(d.as_ref()), v.clone()))
        .collect();
    let (_, verity) = composefs_oci::write_config_raw(
        repo,
        config_json,
        refs,
        images.get(&FormatVersion::V2),
        images.get(&FormatVersion::V1),
        &HashMap::new(),
    )
    .map_err(repo_err(
        "rewriting the config stream with the EROFS reference",
    ))?;
    Ok(verity)
}

/// Writes the manifest stream `manifest_id` (`manifest_json` with references to the config
/// stream and to `layers`, in config order); returns its verity.
pub(super) fn write_manifest<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    manifest_json: &[u8],
    manifest_id: &str,
    config_digest: &OciDigest,
    config_verity: &ObjectID,
    layers: &[(OciDigest, ObjectID)],
) -> Result<ObjectID> {
    let mut w = repo
        .create_stream(MANIFEST_CONTENT_TYPE)
        .map_err(repo_err("creating the manifest stream"))?;
    w.add_named_stream_ref(&format!("config:{config_digest}"), config_verity);
    for (diff_id, verity) in layers {
        w.add_named_stream_ref(diff_id.as_ref(), verity);
    }
    w.write_external(manifest_json)
        .map_err(repo_err("storing the manifest"))?;
    repo.write_stream(w, manifest_id, None)
        .map_err(repo_err("committing the manifest stream"))
}
