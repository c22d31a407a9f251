//! An image's manifest and config as `GetImage` serves them: the manifest a digested
//! reference selects (unless it is a list), checked to be an image manifest that names a
//! config, and the config checked against the digest the manifest gives it.

use cstor_protocol::{Blob, ErrorCode};
use sha2::{Digest, Sha256};

use super::Store;
use super::image_records::{self, ImageRecord};
use super::reference::ImageSpec;
use crate::error::{Error, Result};

/// Reads the manifest and config of `image` from `store`, as `GetImage` serves them.
pub(super) fn read_manifest_and_config(
    store: &Store,
    image: &ImageRecord,
    spec: &ImageSpec,
) -> Result<(Blob, Blob)> {
    let read = |key: &str| image_records::read_big_data(store.fd(), store.path(), &image.id, key);
    let missing = |what: &str| {
        Error::new(
            ErrorCode::ImageDataMissing,
            format!("image {} {what}", image.id),
        )
    };
    let corrupt = |what: &str| {
        Error::new(
            ErrorCode::CorruptMetadata,
            format!("the manifest of image {} {what}", image.id),
        )
    };
    // A digested reference selects that manifest, unless it is a list (then the
    // per-platform manifest stored as "manifest" is the image's).
    let mut manifest = None;
    if let ImageSpec::Digested { digest, .. } = spec
        && let Some(bytes) = read(&format!("manifest-{digest}"))?
        && !is_manifest_list(&bytes)
    {
        manifest = Some(bytes);
    }
    let manifest = match manifest {
        Some(m) => m,
        None => read("manifest")?.ok_or_else(|| missing("has no manifest"))?,
    };
    let parsed: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| corrupt(&format!("is not JSON: {e}")))?;
    if parsed.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
        return Err(missing(
            "has a Docker schema 1 manifest, which has no config",
        ));
    }
    if is_manifest_list(&manifest) {
        return Err(missing("stores a manifest list, not an image manifest"));
    }
    let config_digest = parsed
        .pointer("/config/digest")
        .and_then(|v| v.as_str())
        .ok_or_else(|| corrupt("names no config digest"))?
        .to_owned();
    let config_media_type = parsed
        .pointer("/config/mediaType")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let config =
        read(&config_digest)?.ok_or_else(|| missing(&format!("has no config {config_digest}")))?;
    let actual = sha256_digest(&config);
    if actual != config_digest {
        return Err(Error::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "the config of image {} has digest {actual}, the manifest says {config_digest}",
                image.id
            ),
        ));
    }
    let manifest_media_type = parsed
        .get("mediaType")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok((
        blob(manifest, manifest_media_type, "manifest", &image.id)?,
        blob(config, config_media_type, "config", &image.id)?,
    ))
}

fn blob(bytes: Vec<u8>, media_type: Option<String>, what: &str, id: &str) -> Result<Blob> {
    let digest = sha256_digest(&bytes);
    let size = bytes.len() as u64;
    let content = String::from_utf8(bytes).map_err(|_| {
        Error::new(
            ErrorCode::CorruptMetadata,
            format!("the {what} of image {id} is not UTF-8"),
        )
    })?;
    Ok(Blob {
        digest,
        media_type,
        size,
        content,
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn is_manifest_list(bytes: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    matches!(
        v.get("mediaType").and_then(|m| m.as_str()),
        Some("application/vnd.oci.image.index.v1+json")
            | Some("application/vnd.docker.distribution.manifest.list.v2+json")
    ) || (v.get("manifests").is_some() && v.get("layers").is_none())
}
