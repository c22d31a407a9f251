//! A file to store as it was handed over (a layer file from the helper, an object of another
//! repository), and the checks that it holds what its source recorded, in the read that
//! computes its object id: tar-split's length and CRC-64 (a mismatch is the helper's
//! [`AssembleError`]), or the object id it had in the repository it is copied from (a
//! mismatch is [`Error::SourceObject`]); then the object's length and fs-verity digest after
//! it is stored (a mismatch means the file changed meanwhile: [`Error::ContentChanged`]).

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::fsverity::FsVerityHashValue;
use cstor_protocol::assemble::{AssembleError, CRC64, read_content};

use crate::error::{Error, Result};

/// What a file's bytes must match, besides its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The CRC-64 tar-split recorded for a layer file.
    Crc64(u64),
    /// The object id the file has in the repository it is copied from: the fs-verity digest
    /// of `algorithm` (the source's, which may not be the destination's).
    Object {
        /// The source repository's hash.
        algorithm: cstor_verity::Algorithm,
        /// The digest.
        id: Box<[u8]>,
    },
    /// Nothing more: the caller checked the bytes in its own read (an ostree file, whose
    /// checksum it computes in the read that computes the object id).
    CheckedByCaller,
}

/// One file to store: the file and what its source recorded for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The layer file, as the helper opened it.
    pub file: &'a File,
    /// Its bytes when the caller already read them (the importer reads each file once, for
    /// the layer's sha256, and hands the bytes over); else they are read from `file`.
    pub data: Option<&'a [u8]>,
    /// Length recorded in tar-split (or the source repository).
    pub size: u64,
    /// What its bytes must match.
    pub expected: &'a Expected,
    /// Entry name, for errors and the report.
    pub name: &'a str,
    /// Layer id, for errors.
    pub layer: &'a str,
}

impl Source<'_> {
    /// Checks the file's bytes against what its source recorded (and, read here, its
    /// length) and computes its object id; `buf` is scratch space for reading the file.
    /// Reading stops at the next chunk once `stop` is set ([`Error::Cancelled`]).
    pub fn digest<ObjectID: FsVerityHashValue>(
        &self,
        buf: &mut [u8],
        stop: &AtomicBool,
    ) -> Result<ObjectID> {
        let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
        if let Some(bytes) = self.data {
            self.check_data::<ObjectID>(bytes)?;
            verity.update(bytes);
            let id = verity.finish();
            self.check_id(&id)?;
            return Ok(id);
        }
        let mut crc = CRC64.digest();
        // A source object of another hash is digested twice in the same read.
        let mut other = self
            .other_algorithm::<ObjectID>()
            .map(cstor_verity::Hasher::new);
        read_content(self.file, self.size, self.name, 0, buf, |chunk| {
            unless_stopped(stop)?;
            match self.expected {
                Expected::Crc64(_) => crc.update(chunk),
                Expected::Object { .. } => {
                    if let Some(h) = other.as_mut() {
                        h.update(chunk)
                    }
                }
                Expected::CheckedByCaller => {}
            }
            verity.update(chunk);
            Ok(())
        })
        .map_err(|cause| read_error(self.layer, cause, stop))?;
        match self.expected {
            Expected::Crc64(expected) => {
                check_crc(self.layer, self.name, *expected, crc.finalize())?
            }
            Expected::Object { id, .. } => {
                if let Some(h) = other {
                    self.check_object(id, h.finish().as_bytes())?;
                }
            }
            Expected::CheckedByCaller => {}
        }
        let id = verity.finish();
        self.check_id(&id)?;
        Ok(id)
    }

    /// The source's hash, when it is an object of a repository with another hash than
    /// `ObjectID`'s.
    fn other_algorithm<ObjectID: FsVerityHashValue>(&self) -> Option<cstor_verity::Algorithm> {
        match self.expected {
            Expected::Object { algorithm, .. }
                if *algorithm != crate::verity::algorithm::<ObjectID>() =>
            {
                Some(*algorithm)
            }
            _ => None,
        }
    }

    /// Checks bytes read for this file against its recorded length and, for a CRC-64 or a
    /// source object of another hash, against that; the object id of the destination's hash
    /// is checked by [`Source::check_id`] once computed.
    pub fn check_data<ObjectID: FsVerityHashValue>(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.size {
            if let Expected::Object { id, .. } = self.expected {
                return self.object_error(
                    id,
                    format!("{} bytes expected, {} read", self.size, bytes.len()),
                );
            }
            return Err(assemble_error(
                self.layer,
                AssembleError::Size {
                    name: self.name.to_owned(),
                    expected: self.size,
                    actual: bytes.len() as u64,
                },
            ));
        }
        match self.expected {
            Expected::Crc64(expected) => {
                check_crc(self.layer, self.name, *expected, CRC64.checksum(bytes))
            }
            Expected::Object { id, .. } => match self.other_algorithm::<ObjectID>() {
                Some(algorithm) => self.check_object(
                    id,
                    cstor_verity::Hasher::digest(algorithm, bytes).as_bytes(),
                ),
                None => Ok(()),
            },
            Expected::CheckedByCaller => Ok(()),
        }
    }

    /// Checks the object id computed with the destination's hash against the source
    /// object's, when both repositories use that hash.
    pub fn check_id<ObjectID: FsVerityHashValue>(&self, computed: &ObjectID) -> Result<()> {
        match self.expected {
            Expected::Object { id, .. } if self.other_algorithm::<ObjectID>().is_none() => {
                self.check_object(id, computed.as_bytes())
            }
            _ => Ok(()),
        }
    }

    fn check_object(&self, expected: &[u8], actual: &[u8]) -> Result<()> {
        if expected == actual {
            return Ok(());
        }
        self.object_error(
            expected,
            format!("its content has fs-verity digest {}", hex::encode(actual)),
        )
    }

    fn object_error(&self, id: &[u8], detail: String) -> Result<()> {
        Err(Error::SourceObject {
            object: format!("object {} ({})", hex::encode(id), self.layer),
            detail,
        })
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
