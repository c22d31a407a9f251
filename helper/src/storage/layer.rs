//! Opening one layer for streaming, and walking its tar-split with content files resolved.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use cstor_protocol::{ErrorCode, LayerInfo};
use flate2::read::MultiGzDecoder;

use super::{Storage, layers};
use crate::confine;
use crate::error::{Error, Result};
use crate::lock::ReadLock;
use crate::tarsplit::{Entry, TarSplitReader};

/// A layer pinned for streaming: the layer stores stay read-locked until this is dropped.
#[derive(Debug)]
pub struct OpenLayer {
    /// The layer.
    pub info: LayerInfo,
    /// Held while the layer is in use, so c/storage cannot change or delete it.
    pub locks: Vec<ReadLock>,
    /// The files to read; moved into whoever walks the layer.
    pub source: LayerSource,
}

/// What a walk needs: the tar-split file and the directories content is looked up in.
#[derive(Debug)]
pub struct LayerSource {
    layer_id: String,
    tar_split: File,
    /// `diff` of the layer, then of each lower layer, nearest first.
    dirs: Vec<OwnedFd>,
}

impl Storage {
    /// Opens and pins a layer named by id (64 hex) or diff id (`sha256:` + 64 hex).
    ///
    /// Fails with [`ErrorCode::InvalidParams`] for another form, [`ErrorCode::LayerNotFound`]
    /// when no complete layer matches, [`ErrorCode::NoTarSplit`] when the layer has no
    /// tar-split, [`ErrorCode::Unsupported`] for composefs-flat and additional-layer-store
    /// layers, [`ErrorCode::LockTimeout`] when podman keeps the store locked.
    pub fn open_layer(&self, wanted: &str) -> Result<OpenLayer> {
        let by_diff_id = match wanted.strip_prefix("sha256:") {
            Some(hex) if layers::is_full_id(hex) => true,
            None if layers::is_full_id(wanted) => false,
            _ => {
                return Err(Error::new(
                    ErrorCode::InvalidParams,
                    format!(
                        "{wanted:?} is neither a layer id (64 hex digits) nor a diff id (sha256:...)"
                    ),
                ));
            }
        };
        let locks = self.lock_layers()?;
        let index = self.load_layers()?;
        let found = if by_diff_id {
            // Several layers can share content (same diff id, other parents); any complete
            // one with tar-split rebuilds the same bytes. Failing that, any match, so that the
            // error says what is wrong with it.
            let matching = || {
                index
                    .order
                    .iter()
                    .filter_map(|id| index.by_id.get(id))
                    .filter(|(_, r)| r.diff_id() == Some(wanted))
            };
            matching()
                .find(|(s, r)| !r.incomplete() && self.tar_split_store(*s, &r.id).is_some())
                .or_else(|| matching().find(|(_, r)| !r.incomplete()))
                .or_else(|| matching().next())
        } else {
            index.by_id.get(wanted)
        };
        let (store, rec) = match found {
            Some((s, r)) if !r.incomplete() => (*s, r),
            Some(_) => {
                return Err(Error::new(
                    ErrorCode::LayerNotFound,
                    format!("layer {wanted} is incomplete (being created or deleted)"),
                )
                .layer(wanted));
            }
            None => {
                return Err(
                    Error::new(ErrorCode::LayerNotFound, format!("no layer {wanted}"))
                        .layer(wanted),
                );
            }
        };
        let id = rec.id.clone();
        let info = self.layer_info(store, rec);
        let source = self.layer_source(store, &id).map_err(|e| e.layer(&id))?;
        Ok(OpenLayer {
            info,
            locks,
            source,
        })
    }

    fn layer_source(&self, store: usize, id: &str) -> Result<LayerSource> {
        let ts_store = self.tar_split_store(store, id).ok_or_else(|| {
            Error::new(
                ErrorCode::NoTarSplit,
                format!(
                    "layer {id} has no tar-split metadata, so it cannot be rebuilt bit-exactly"
                ),
            )
        })?;
        let st = &self.stores[ts_store];
        let rel = Self::tar_split_rel(id);
        let tar_split = confine::open_regular(st.fd(), &rel)
            .map_err(|e| Error::io(format!("opening {}", st.path().join(&rel).display()), e))?;

        let dir_store = self.layer_dir_store(store, id).ok_or_else(|| {
            Error::new(
                ErrorCode::CorruptMetadata,
                format!("layer {id} is in layers.json but overlay/{id} exists in no store"),
            )
        })?;
        let base = PathBuf::from(format!("overlay/{id}"));
        let dst = &self.stores[dir_store];
        for (marker, what) in [
            (
                "composefs-data/composefs.blob",
                "composefs-flat layers (use_composefs)",
            ),
            ("additionallayer", "layers of an additional layer store"),
        ] {
            if rustix::fs::statat(
                dst.fd(),
                base.join(marker),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok()
            {
                return Err(Error::new(
                    ErrorCode::Unsupported,
                    format!("layer {id}: {what} are not supported"),
                ));
            }
        }
        let mut dirs = vec![open_diff(dst, id)?];
        let store_fds: Vec<_> = self.stores.iter().map(|s| (s.fd(), s.path())).collect();
        for lower in layers::lower_chain(&store_fds, dst.fd(), id)? {
            let s = self.layer_dir_store(dir_store, &lower).ok_or_else(|| {
                Error::new(
                    ErrorCode::CorruptMetadata,
                    format!("lower layer {lower} of {id} has no directory"),
                )
            })?;
            dirs.push(open_diff(&self.stores[s], &lower)?);
        }
        Ok(LayerSource {
            layer_id: id.to_owned(),
            tar_split,
            dirs,
        })
    }
}

fn open_diff(store: &super::Store, id: &str) -> Result<OwnedFd> {
    let rel = PathBuf::from(format!("overlay/{id}/diff"));
    confine::open_dir(store.fd(), &rel)
        .map_err(|e| Error::io(format!("opening {}", store.path().join(&rel).display()), e))
}

/// One step of a layer walk.
#[derive(Debug)]
pub enum Item {
    /// Raw tar bytes.
    Segment(Vec<u8>),
    /// A tar entry.
    File(FileItem),
}

/// A tar entry with its content file, when it has content.
#[derive(Debug)]
pub struct FileItem {
    /// Raw name as recorded.
    pub name: Vec<u8>,
    /// Content bytes in the tar (0 for header-only entries even if tar-split recorded more).
    pub size: u64,
    /// CRC-64/GO-ISO of the content (0 without content).
    pub crc64: u64,
    /// The content, opened beneath the layer's directories; `Some` iff `size > 0`.
    pub content: Option<File>,
}

/// Tar typeflags whose entries never have data blocks, whatever their size field says.
fn header_only(typeflag: u8) -> bool {
    matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

/// Iterates a layer's tar-split, opening content files as it goes.
#[derive(Debug)]
pub struct Walker {
    source: LayerSource,
    reader: TarSplitReader<BufReader<MultiGzDecoder<BufReader<File>>>>,
    /// The last 512 raw bytes seen: the header of the entry that follows.
    tail: Vec<u8>,
    /// Whether the raw bytes since the previous entry hold a GNU sparse PAX record.
    sparse_pax: bool,
    failed: bool,
}

impl LayerSource {
    /// Starts walking.
    pub fn walk(self) -> Result<Walker> {
        let f = self
            .tar_split
            .try_clone()
            .map_err(|e| Error::io("duplicating the tar-split fd", e))?;
        let reader = TarSplitReader::new(BufReader::with_capacity(
            256 << 10,
            MultiGzDecoder::new(BufReader::with_capacity(64 << 10, f)),
        ));
        Ok(Walker {
            source: self,
            reader,
            tail: Vec::with_capacity(512),
            sparse_pax: false,
            failed: false,
        })
    }

    /// The layer id.
    pub fn layer_id(&self) -> &str {
        &self.layer_id
    }
}

impl Walker {
    fn corrupt(&self, msg: impl std::fmt::Display) -> Error {
        Error::new(ErrorCode::CorruptTarSplit, msg.to_string()).layer(&self.source.layer_id)
    }

    fn remember(&mut self, bytes: &[u8]) {
        // Every header passes through here: a vectorised search, not a compare per byte,
        // with its searcher built once.
        static SPARSE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"GNU.sparse."));
        if SPARSE.find(bytes).is_some() {
            self.sparse_pax = true;
        }
        if bytes.len() >= 512 {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - 512..]);
        } else {
            self.tail.extend_from_slice(bytes);
            let excess = self.tail.len().saturating_sub(512);
            self.tail.drain(..excess);
        }
    }

    fn file(&mut self, name: Vec<u8>, size: u64, crc64: Option<u64>) -> Result<FileItem> {
        // The name as errors show it; made only for an error (this runs once per file).
        let show = |name: &[u8]| String::from_utf8_lossy(name).into_owned();
        if size == 0 {
            self.sparse_pax = false;
            return Ok(FileItem {
                name,
                size: 0,
                crc64: 0,
                content: None,
            });
        }
        if self.tail.len() < 512 {
            let shown = show(&name);
            return Err(self
                .corrupt(format!("entry {shown:?} is not preceded by a tar header"))
                .path(shown));
        }
        let typeflag = self.tail[156];
        if header_only(typeflag) {
            // tar-split records the header's size field, but such entries carry no data.
            self.sparse_pax = false;
            return Ok(FileItem {
                name,
                size: 0,
                crc64: 0,
                content: None,
            });
        }
        if !matches!(typeflag, b'0' | 0 | b'7') {
            let shown = show(&name);
            return Err(Error::new(
                ErrorCode::Unsupported,
                format!(
                    "entry {shown:?} has tar type {:?} with data; only regular files carry data",
                    typeflag as char
                ),
            )
            .path(shown)
            .layer(&self.source.layer_id));
        }
        if std::mem::take(&mut self.sparse_pax) {
            let shown = show(&name);
            return Err(Error::new(
                ErrorCode::Unsupported,
                format!("entry {shown:?} is a sparse tar entry, which cannot be rebuilt from the extracted file"),
            )
            .path(shown)
            .layer(&self.source.layer_id));
        }
        let crc64 = crc64.unwrap_or(0);
        let rel = confine::clean_entry_name(&name)
            .map_err(|e| e.layer(&self.source.layer_id))?
            .ok_or_else(|| {
                let shown = show(&name);
                self.corrupt(format!("entry {shown:?} with content names the layer root"))
            })?;
        let (file, len) = self.open_content(&rel, &name)?;
        if len != size {
            let shown = show(&name);
            return Err(Error::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "{shown:?} changed on disk: tar-split records {size} bytes, the file has {len}"
                ),
            )
            .path(shown)
            .layer(&self.source.layer_id));
        }
        Ok(FileItem {
            name,
            size,
            crc64,
            content: Some(file),
        })
    }

    /// c/storage's getter tries the layer's diff, then each lower diff, first hit wins.
    fn open_content(&self, rel: &Path, name: &[u8]) -> Result<(File, u64)> {
        let shown = String::from_utf8_lossy(name);
        for dir in &self.source.dirs {
            match confine::open_regular_sized(dir.as_fd(), rel) {
                Ok(f) => return Ok(f),
                // Not in this directory: try the next lower one.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
                {
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                    return Err(Error::new(
                        ErrorCode::PathEscape,
                        format!("{shown:?} resolves outside the layer (through '..' or an absolute symlink)"),
                    )
                    .path(shown.into_owned())
                    .layer(&self.source.layer_id));
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::InvalidInput
                        || e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) =>
                {
                    return Err(Error::new(
                        ErrorCode::MissingFile,
                        format!("{shown:?} is not a regular file in the layer"),
                    )
                    .path(shown.into_owned())
                    .layer(&self.source.layer_id));
                }
                Err(e) => {
                    return Err(Error::io(format!("opening {shown:?}"), e)
                        .path(shown.into_owned())
                        .layer(&self.source.layer_id));
                }
            }
        }
        Err(Error::new(
            ErrorCode::MissingFile,
            format!("{shown:?} is named by tar-split but missing from the layer"),
        )
        .path(shown.into_owned())
        .layer(&self.source.layer_id))
    }
}

impl Iterator for Walker {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = loop {
            break match self.reader.next()? {
                // tar-split may record empty segments; they carry nothing.
                Ok(Entry::Segment(bytes)) if bytes.is_empty() => continue,
                Ok(Entry::Segment(bytes)) => {
                    self.remember(&bytes);
                    Ok(Item::Segment(bytes))
                }
                Ok(Entry::File { name, size, crc64 }) => {
                    self.file(name, size, crc64).map(Item::File)
                }
                Err(e) => Err(e.layer(&self.source.layer_id)),
            };
        };
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}
