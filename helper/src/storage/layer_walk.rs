//! Walking an opened layer: its tar-split records in order, each entry with content paired
//! with the file opened beneath the layer's directories and checked against the recorded
//! size.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use cstor_protocol::ErrorCode;
use flate2::read::MultiGzDecoder;

use super::open_layer::Lowers;
use crate::confine;
use crate::error::{Error, Result};
use crate::tarsplit::{Entry, TarSplitReader};

/// What a walk needs: the tar-split file and the directories content is looked up in.
#[derive(Debug)]
pub struct LayerSource {
    layer_id: String,
    tar_split: File,
    /// `diff` of the layer, then of the lower layers opened so far, nearest first.
    dirs: Vec<OwnedFd>,
    /// The lower layers not opened yet (opened when a file is not found above them).
    lowers: Lowers,
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
    /// Where the content was found, when there is content: which of
    /// [`LayerSource::dir_fds`] (0 is the layer's own `diff`) and the cleaned path beneath
    /// it. A consumer that opens files itself (the varlink producer) names them by this.
    pub found: Option<(usize, PathBuf)>,
}

impl FileItem {
    fn without_content(name: Vec<u8>) -> Self {
        Self {
            name,
            size: 0,
            crc64: 0,
            content: None,
            found: None,
        }
    }
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
    /// What a walk of layer `layer_id` reads: its tar-split file, and the directories its
    /// content is looked up in, nearest first.
    pub(super) fn new(
        layer_id: String,
        tar_split: File,
        dirs: Vec<OwnedFd>,
        lowers: Lowers,
    ) -> Self {
        Self {
            layer_id,
            tar_split,
            dirs,
            lowers,
        }
    }

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

    /// The directories content is looked up in (the layer's `diff`, then its lower layers'
    /// `diff`, nearest first), reopened as `O_PATH` descriptors: a process they are passed to
    /// can open files beneath them with its own permissions, but cannot list or read the
    /// directories through them.
    pub fn dir_fds(&mut self) -> Result<Vec<OwnedFd>> {
        while let Some(dir) = self.lowers.next()? {
            self.dirs.push(dir);
        }
        self.dirs
            .iter()
            .map(|d| {
                confine::openat_beneath(
                    d.as_fd(),
                    Path::new("."),
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
                )
                .map_err(|e| Error::io("reopening a layer directory", e).layer(&self.layer_id))
            })
            .collect()
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
            return Ok(FileItem::without_content(name));
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
            return Ok(FileItem::without_content(name));
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
        let (file, len, dir) = self.open_content(&rel, &name)?;
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
            found: Some((dir, rel)),
        })
    }

    /// c/storage's getter tries the layer's diff, then each lower diff, first hit wins.
    fn open_content(&mut self, rel: &Path, name: &[u8]) -> Result<(File, u64, usize)> {
        let shown = String::from_utf8_lossy(name);
        for i in 0.. {
            if i == self.source.dirs.len() {
                match self.source.lowers.next()? {
                    Some(dir) => self.source.dirs.push(dir),
                    None => break,
                }
            }
            let Some(dir) = self.source.dirs.get(i) else {
                break;
            };
            match confine::open_regular_sized(dir.as_fd(), rel) {
                Ok((f, len)) => return Ok((f, len, i)),
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
