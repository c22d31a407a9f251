//! Layer records: what `overlay-layers/layers.json` and `volatile-layers.json` say about
//! each layer of a store.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::path::Path;

use serde::Deserialize;

use super::records_file;
use crate::error::Result;

/// One entry of layers.json (only the fields the helper uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LayerRecord {
    /// 64 hex digits.
    pub id: String,
    /// Parent layer id.
    #[serde(default)]
    pub parent: Option<String>,
    /// Digest of the blob the layer was created from.
    #[serde(default, rename = "compressed-diff-digest")]
    pub compressed_digest: Option<String>,
    /// Size of that blob.
    #[serde(default, rename = "compressed-size")]
    pub compressed_size: Option<i64>,
    /// Digest of the uncompressed tar.
    #[serde(default, rename = "diff-digest")]
    pub diff_digest: Option<String>,
    /// Length of the uncompressed tar; -1 when unknown.
    #[serde(default, rename = "diff-size")]
    pub diff_size: Option<i64>,
    /// Free-form flags; `incomplete` and `expected-layer-diffid` matter here.
    #[serde(default)]
    pub flags: BTreeMap<String, serde_json::Value>,
}

impl LayerRecord {
    /// Being created or deleted: must be ignored.
    pub fn incomplete(&self) -> bool {
        self.flags
            .get("incomplete")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// The diff id: `diff-digest`, else the untrusted `expected-layer-diffid` flag of layers
    /// pulled by TOC.
    pub fn diff_id(&self) -> Option<&str> {
        self.diff_digest
            .as_deref()
            .filter(|d| !d.is_empty())
            .or_else(|| {
                self.flags
                    .get("expected-layer-diffid")
                    .and_then(|v| v.as_str())
            })
    }

    /// Uncompressed length, when known.
    pub fn diff_size(&self) -> Option<u64> {
        self.diff_size.and_then(|s| u64::try_from(s).ok())
    }

    /// Parent id, treating `""` as none.
    pub fn parent(&self) -> Option<&str> {
        self.parent.as_deref().filter(|p| !p.is_empty())
    }
}

/// True for a 64-digit lowercase hex id, the only form c/storage generates.
pub fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads the layer records of one store: `layers.json` then `volatile-layers.json`, first
/// occurrence of an id wins. Records with malformed ids are dropped with a warning, since
/// they cannot name a directory safely. A store without layers.json has no layers.
///
/// Fails with [`ErrorCode::CorruptMetadata`] when a file is not the expected JSON, or
/// [`ErrorCode::Io`] when it cannot be read.
///
/// [`ErrorCode::CorruptMetadata`]: cstor_protocol::ErrorCode::CorruptMetadata
/// [`ErrorCode::Io`]: cstor_protocol::ErrorCode::Io
pub fn load(store: BorrowedFd<'_>, store_path: &Path) -> Result<Vec<LayerRecord>> {
    let mut out: Vec<LayerRecord> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for file in ["layers.json", "volatile-layers.json"] {
        let rel = Path::new("overlay-layers").join(file);
        let records: Vec<LayerRecord> = records_file::read(store, store_path, &rel)?;
        for r in records {
            if !is_full_id(&r.id) {
                tracing::warn!(id = %r.id, file = %rel.display(), "ignoring layer with a malformed id");
                continue;
            }
            if seen.insert(r.id.clone()) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::Root;
    use cstor_protocol::ErrorCode;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn loads_both_files_first_wins_and_skips_bad_ids() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("overlay-layers")).unwrap();
        std::fs::write(
            d.path().join("overlay-layers/layers.json"),
            format!(
                r#"[{{"id":"{A}","diff-digest":"sha256:x","diff-size":-1,"flags":{{"incomplete":true}}}},
                   {{"id":"../../etc"}}, {{"id":"{B}","parent":"{A}","unknown":{{}}}}]"#
            ),
        )
        .unwrap();
        std::fs::write(
            d.path().join("overlay-layers/volatile-layers.json"),
            format!(r#"[{{"id":"{A}","diff-digest":"sha256:other"}}]"#),
        )
        .unwrap();
        let root = Root::open(d.path()).unwrap();
        let l = load(root.fd(), d.path()).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[0].incomplete());
        assert_eq!(l[0].diff_id(), Some("sha256:x"));
        assert_eq!(l[0].diff_size(), None);
        assert_eq!(l[1].parent(), Some(A));
    }

    #[test]
    fn corrupt_json_is_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("overlay-layers")).unwrap();
        std::fs::write(d.path().join("overlay-layers/layers.json"), "[{").unwrap();
        let root = Root::open(d.path()).unwrap();
        let e = load(root.fd(), d.path()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::CorruptMetadata);
        assert!(e.to_string().contains("layers.json"));
    }

    #[test]
    fn expected_diffid_flag_is_a_fallback() {
        let r: LayerRecord = serde_json::from_str(&format!(
            r#"{{"id":"{A}","flags":{{"expected-layer-diffid":"sha256:e"}}}}"#
        ))
        .unwrap();
        assert_eq!(r.diff_id(), Some("sha256:e"));
    }
}
