//! Image records (`overlay-images/images.json`) and image big data (manifests, configs).

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::layer_records::is_full_id;
use super::records_file;
use crate::confine;
use crate::error::{Error, Result};

/// Largest manifest or config accepted (a 500-layer image's config is well under 1 MiB).
pub const MAX_BIG_DATA: u64 = 64 << 20;

/// One entry of images.json (only the fields the helper uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageRecord {
    /// 64 hex digits.
    pub id: String,
    /// Primary manifest digest.
    #[serde(default)]
    pub digest: Option<String>,
    /// Full references.
    #[serde(default)]
    pub names: Vec<String>,
    /// Top layer id.
    #[serde(default, rename = "layer")]
    pub top_layer: Option<String>,
    /// Big-data digests by key; `manifest*` keys hold manifest digests.
    #[serde(default, rename = "big-data-digests")]
    pub big_data_digests: BTreeMap<String, String>,
    /// Big-data keys.
    #[serde(default, rename = "big-data-names")]
    pub big_data_names: Vec<String>,
    /// Creation time.
    #[serde(default)]
    pub created: Option<String>,
}

impl ImageRecord {
    /// The top layer, treating `""` as none.
    pub fn top_layer(&self) -> Option<&str> {
        self.top_layer.as_deref().filter(|l| !l.is_empty())
    }

    /// Every manifest digest the image is known by: the primary digest and the digest of
    /// every `manifest*` big-data item (what c/storage indexes for lookups by digest).
    pub fn manifest_digests(&self) -> impl Iterator<Item = &str> {
        self.digest.as_deref().into_iter().chain(
            self.big_data_digests
                .iter()
                .filter(|(k, _)| k.starts_with("manifest"))
                .map(|(_, v)| v.as_str()),
        )
    }
}

/// Reads images.json of one store; a store without it has no images.
///
/// Fails with [`ErrorCode::CorruptMetadata`] for malformed JSON, [`ErrorCode::Io`] when it
/// cannot be read.
///
/// [`ErrorCode::CorruptMetadata`]: cstor_protocol::ErrorCode::CorruptMetadata
/// [`ErrorCode::Io`]: cstor_protocol::ErrorCode::Io
pub fn load(store: BorrowedFd<'_>, store_path: &Path) -> Result<Vec<ImageRecord>> {
    let rel = Path::new("overlay-images/images.json");
    let records: Vec<ImageRecord> = records_file::read(store, store_path, rel)?;
    Ok(records
        .into_iter()
        .filter(|r| {
            let ok = is_full_id(&r.id);
            if !ok {
                tracing::warn!(id = %r.id, "ignoring image with a malformed id");
            }
            ok
        })
        .collect())
}

/// The file name c/storage stores big-data item `key` under: the key itself when it only
/// holds `[.0-9a-z]`, else `=` followed by standard padded base64 of the key.
///
/// ```
/// use cstor_helper::storage::image_records::big_data_file_name;
/// assert_eq!(big_data_file_name("manifest"), "manifest");
/// assert_eq!(big_data_file_name("sha256:ab"), "=c2hhMjU2OmFi");
/// ```
pub fn big_data_file_name(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| matches!(b, b'.' | b'0'..=b'9' | b'a'..=b'z'))
    {
        key.to_owned()
    } else {
        format!(
            "={}",
            base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
        )
    }
}

/// Reads big-data item `key` of image `id`; `Ok(None)` when absent.
pub fn read_big_data(
    store: BorrowedFd<'_>,
    store_path: &Path,
    id: &str,
    key: &str,
) -> Result<Option<Vec<u8>>> {
    let rel: PathBuf = ["overlay-images", id, &big_data_file_name(key)]
        .iter()
        .collect();
    match confine::read_small(store, &rel, MAX_BIG_DATA) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(
            format!("reading {} ({key})", store_path.join(&rel).display()),
            e,
        )
        .image(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::Root;

    #[test]
    fn big_data_names_match_the_documented_examples() {
        assert_eq!(big_data_file_name("signatures"), "signatures");
        assert_eq!(
            big_data_file_name("zstd-chunked-manifest"),
            "=enN0ZC1jaHVua2VkLW1hbmlmZXN0"
        );
        assert_eq!(
            big_data_file_name("chunked-manifest-cache"),
            "=Y2h1bmtlZC1tYW5pZmVzdC1jYWNoZQ=="
        );
        assert_eq!(big_data_file_name("Manifest"), "=TWFuaWZlc3Q=");
        assert_eq!(big_data_file_name(""), "=");
    }

    #[test]
    fn manifest_digests_include_big_data() {
        let r: ImageRecord = serde_json::from_str(
            r#"{"id":"x","digest":"sha256:a","big-data-digests":{"manifest-sha256:b":"sha256:b","sha256:c":"sha256:c","manifest":"sha256:a"}}"#,
        )
        .unwrap();
        let d: Vec<_> = r.manifest_digests().collect();
        assert!(d.contains(&"sha256:a") && d.contains(&"sha256:b"));
        assert!(!d.contains(&"sha256:c"));
    }

    #[test]
    fn big_data_stays_inside_the_store() {
        let d = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        std::fs::create_dir_all(d.path().join("overlay-images").join(&id)).unwrap();
        std::fs::write(
            d.path().join("overlay-images").join(&id).join("manifest"),
            b"{}",
        )
        .unwrap();
        let root = Root::open(d.path()).unwrap();
        assert_eq!(
            read_big_data(root.fd(), d.path(), &id, "manifest").unwrap(),
            Some(b"{}".to_vec())
        );
        assert_eq!(
            read_big_data(root.fd(), d.path(), &id, "sha256:none").unwrap(),
            None
        );
    }
}
