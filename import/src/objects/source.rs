//! A layer file as the helper handed it over, and the checks that it holds what tar-split
//! recorded: its length and CRC-64 before it is stored (a mismatch is the helper's
//! [`AssembleError`]), and the object's length and fs-verity digest after (a mismatch means
//! the file changed while it was imported: [`Error::ContentChanged`]).

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::fsverity::FsVerityHashValue;
use cstor_protocol::assemble::{AssembleError, CRC64, read_content};

use crate::error::{Error, Result};

/// One file to store: the layer file and what tar-split recorded for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The layer file, as the helper opened it.
    pub file: &'a File,
    /// Its bytes when the caller already read them (the importer reads each file once, for
    /// the layer's sha256, and hands the bytes over); else they are read from `file`.
    pub data: Option<&'a [u8]>,
    /// Length recorded in tar-split.
    pub size: u64,
    /// CRC-64 recorded in tar-split.
    pub crc64: u64,
    /// Entry name, for errors and the report.
    pub name: &'a str,
    /// Layer id, for errors.
    pub layer: &'a str,
}

impl Source<'_> {
    /// Checks the file's bytes against its tar-split CRC-64 (and, read here, its length)
    /// and computes its object id; `buf` is scratch space for reading the file. Reading
    /// stops at the next chunk once `stop` is set ([`Error::Cancelled`]).
    pub fn digest<ObjectID: FsVerityHashValue>(
        &self,
        buf: &mut [u8],
        stop: &AtomicBool,
    ) -> Result<ObjectID> {
        let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
        if let Some(bytes) = self.data {
            self.check_data(bytes)?;
            verity.update(bytes);
            return Ok(verity.finish());
        }
        let mut crc = CRC64.digest();
        read_content(self.file, self.size, self.name, 0, buf, |chunk| {
            unless_stopped(stop)?;
            crc.update(chunk);
            verity.update(chunk);
            Ok(())
        })
        .map_err(|cause| read_error(self.layer, cause, stop))?;
        check_crc(self.layer, self.name, self.crc64, crc.finalize())?;
        Ok(verity.finish())
    }

    /// Checks bytes read for this file against its tar-split length and CRC-64.
    pub fn check_data(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.size {
            return Err(assemble_error(
                self.layer,
                AssembleError::Size {
                    name: self.name.to_owned(),
                    expected: self.size,
                    actual: bytes.len() as u64,
                },
            ));
        }
        check_crc(self.layer, self.name, self.crc64, CRC64.checksum(bytes))
    }

    /// Checks the length of the object made from this file: FICLONE clones the whole file,
    /// so a file that grew since it was hashed must not slip through.
    pub fn check_object_len(&self, len: u64) -> Result<()> {
        if len != self.size {
            return Err(Error::ContentChanged {
                file: self.name.to_owned(),
                detail: format!("expected {} bytes, the file has {len}", self.size),
            });
        }
        Ok(())
    }

    /// Checks the digest the kernel measured on the object against the one computed from
    /// the bytes read.
    pub fn check_measured<ObjectID: FsVerityHashValue>(
        &self,
        measured: &ObjectID,
        read: &ObjectID,
    ) -> Result<()> {
        if measured != read {
            return Err(Error::ContentChanged {
                file: self.name.to_owned(),
                detail: format!(
                    "fs-verity measured {} but the content read has {}",
                    measured.to_hex(),
                    read.to_hex()
                ),
            });
        }
        Ok(())
    }
}

/// For the callback of a read: fails once `stop` is set, so that the read ends at the
/// chunk it is at (see [`read_error`]).
pub fn unless_stopped(stop: &AtomicBool) -> Result<(), AssembleError> {
    if stop.load(Relaxed) {
        return Err(AssembleError::Write(std::io::ErrorKind::Interrupted.into()));
    }
    Ok(())
}

/// The error of a read of a file of `layer` that failed with `cause`: [`Error::Cancelled`]
/// if the import was stopped meanwhile (see [`unless_stopped`]).
pub fn read_error(layer: &str, cause: AssembleError, stop: &AtomicBool) -> Error {
    if stop.load(Relaxed) {
        return Error::Cancelled;
    }
    assemble_error(layer, cause)
}

/// A file of `layer` that is not what its tar-split says, as the helper's client reports it.
pub fn assemble_error(layer: &str, cause: AssembleError) -> Error {
    cstor_proxy_client::Error::Assemble {
        layer: layer.to_owned(),
        cause,
    }
    .into()
}

/// Checks the CRC-64 of entry `name` of `layer`, `actual`, against the one tar-split
/// recorded, `expected`.
pub fn check_crc(layer: &str, name: &str, expected: u64, actual: u64) -> Result<()> {
    if actual != expected {
        return Err(assemble_error(
            layer,
            AssembleError::Crc {
                name: name.to_owned(),
                expected,
                actual,
            },
        ));
    }
    Ok(())
}
