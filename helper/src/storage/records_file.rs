//! Reading one of containers-storage's JSON record files (`images.json`, `layers.json`,
//! `volatile-layers.json`): beneath the store root, bounded in size, and an absent or blank
//! file holding no records, as c/storage treats a store that was never written.

use std::os::fd::BorrowedFd;
use std::path::Path;

use cstor_protocol::ErrorCode;
use serde::de::DeserializeOwned;

use crate::confine;
use crate::error::{Error, Result};

/// Largest record file accepted (a store with tens of thousands of layers stays far below).
const MAX_RECORDS_FILE: u64 = 256 << 20;

/// Reads the records of file `rel` beneath `store` (whose path `store_path` is only for
/// messages).
///
/// Fails with [`ErrorCode::CorruptMetadata`] when the file is not a JSON array of such
/// records, or [`ErrorCode::Io`] when it cannot be read.
pub(super) fn read<T: DeserializeOwned>(
    store: BorrowedFd<'_>,
    store_path: &Path,
    rel: &Path,
) -> Result<Vec<T>> {
    let bytes = match confine::read_small(store, rel, MAX_RECORDS_FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::io(
                format!("reading {}", store_path.join(rel).display()),
                e,
            ));
        }
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorCode::CorruptMetadata,
            format!("{} is not valid: {e}", store_path.join(rel).display()),
        )
    })
}
