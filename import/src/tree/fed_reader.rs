//! Reading tar entries back from a layer's splitstream pieces as they arrive, the way
//! composefs-oci reads them from the stored stream.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;

use anyhow::{Context, bail, ensure};
use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::Stat;
use composefs::tree::{LeafContent, RegularFile};
use composefs_oci::tar::{TarEntry, TarItem};
use tar_core::EntryType;
use tar_core::parse::{ParseEvent, Parser};

use super::Stop;
use super::feed::{Backlog, Piece};
use super::stored::StoredPieces;
use crate::INLINE_MAX;

/// The largest contents of one entry taken from inline bytes. composefs stores a file of more
/// than [`INLINE_MAX`] bytes as an object, so a stream it wrote never comes near; the margin
/// leaves room for a writer with a larger inline size.
const INLINE_CONTENT_LIMIT: usize = 1 << 20;

/// `return Err(Stop::Failed(anyhow!(...)))`.
macro_rules! fail {
    ($($t:tt)*) => {
        return Err(Stop::Failed(anyhow::anyhow!($($t)*)))
    };
}

/// [`fail!`] unless the condition holds.
macro_rules! check {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            fail!($($t)*);
        }
    };
}

/// Where a [`FedReader`]'s pieces come from.
pub(super) enum Input<ObjectID> {
    /// Batches sent by the layer's importer as it writes the stream (inline bytes counted
    /// in the shared backlog).
    Fed(Receiver<Vec<Piece<ObjectID>>>),
    /// The stream as stored, read back.
    Stored(StoredPieces<ObjectID>),
}

/// Reads tar entries from a layer's pieces the way composefs' `SplitStreamReader` and
/// `get_entry` read them from the stored stream: headers come from inline bytes 512 at a
/// time (consecutive inline pieces form one chunk, as the stream writer merges them); a
/// file's contents are either the next object reference (followed by its padding, inline) or
/// inline bytes.
pub(super) struct FedReader<'a, ObjectID> {
    input: Input<ObjectID>,
    backlog: &'a Backlog,
    /// Pieces received, not taken yet.
    received: std::vec::IntoIter<Piece<ObjectID>>,
    /// Inline bytes not consumed yet, front first.
    inline: VecDeque<Vec<u8>>,
    /// Consumed bytes of `inline`'s front.
    offset: usize,
    /// A reference taken from the channel while looking for inline bytes.
    external: Option<ObjectID>,
    done: bool,
}

impl<'a, ObjectID: FsVerityHashValue> FedReader<'a, ObjectID> {
    pub(super) fn new(input: Input<ObjectID>, backlog: &'a Backlog) -> Self {
        Self {
            input,
            backlog,
            received: Vec::new().into_iter(),
            inline: VecDeque::new(),
            offset: 0,
            external: None,
            done: false,
        }
    }

    /// Takes the next piece into `inline`/`external`; false at the end of the layer.
    fn pull(&mut self) -> Result<bool, Stop> {
        if self.done || self.external.is_some() {
            return Ok(false);
        }
        let piece = loop {
            if let Some(p) = self.received.next() {
                break p;
            }
            let batch = match &mut self.input {
                Input::Fed(rx) => rx.recv().map_err(|_| {
                    Stop::Failed(anyhow::anyhow!("the layer's import stopped before its end"))
                })?,
                Input::Stored(stored) => stored.next_batch()?,
            };
            self.received = batch.into_iter();
        };
        match piece {
            Piece::Inline(bytes) => {
                if let Input::Fed(_) = self.input {
                    self.backlog.bytes.fetch_sub(bytes.len(), Relaxed);
                }
                self.inline.push_back(bytes);
                Ok(true)
            }
            Piece::GaveUp => Err(Stop::GaveUp),
            Piece::External(id) => {
                self.external = Some(id);
                Ok(false)
            }
            Piece::Done => {
                self.done = true;
                Ok(false)
            }
        }
    }

    fn inline_available(&self) -> usize {
        self.inline.iter().map(Vec::len).sum::<usize>() - self.offset
    }

    /// Exactly `buf.len()` inline bytes; false if the stream ends first (with none read).
    fn read_inline(&mut self, buf: &mut [u8]) -> Result<bool, Stop> {
        while self.inline_available() < buf.len() {
            if !self.pull()? {
                if self.external.is_some() {
                    fail!("unexpected external reference in the splitstream");
                }
                if self.inline_available() == 0 {
                    return Ok(false);
                }
                fail!("the splitstream ends inside an inline chunk");
            }
        }
        let mut filled = 0;
        while filled < buf.len() {
            let Some(front) = self.inline.front() else {
                fail!("inline bytes went missing");
            };
            let take = (front.len() - self.offset).min(buf.len() - filled);
            buf[filled..filled + take].copy_from_slice(&front[self.offset..self.offset + take]);
            filled += take;
            self.offset += take;
            if self.offset == front.len() {
                self.inline.pop_front();
                self.offset = 0;
            }
        }
        Ok(true)
    }

    /// A file's contents of `size` bytes stored in `stored` (`size` rounded up to 512).
    fn read_content(&mut self, size: usize, stored: usize) -> Result<Content<ObjectID>, Stop> {
        if self.inline_available() == 0 && self.external.is_none() {
            self.pull()?;
        }
        if self.inline_available() == 0
            && let Some(id) = self.external.take()
        {
            let mut pad = [0u8; 512];
            let pad_len = stored - size;
            check!(pad_len < 512, "padding of {pad_len} bytes");
            if pad_len > 0 && !self.read_inline(&mut pad[..pad_len])? {
                fail!("unexpected end of the splitstream in a file's padding");
            }
            return Ok(Content::External(id));
        }
        // The header's size is not trusted with an allocation: a stream from another
        // repository may claim any size for contents it stores inline.
        check!(
            stored <= INLINE_CONTENT_LIMIT,
            "a {size} byte entry with its contents inline (more than {INLINE_CONTENT_LIMIT} bytes)"
        );
        let mut content = vec![0u8; stored];
        if stored > 0 && !self.read_inline(&mut content)? {
            fail!("unexpected end of the splitstream in a file's contents");
        }
        content.truncate(size);
        Ok(Content::Inline(content))
    }

    /// Skips what follows the tar's end (nothing, normally) up to the layer's completion;
    /// fails if the layer's import stopped instead.
    pub(super) fn finish(mut self) -> Result<(), Stop> {
        while !self.done {
            self.external = None;
            self.pull()?;
            self.inline.clear();
            self.offset = 0;
        }
        Ok(())
    }

    /// The next entry, or `None` at the end of the tar.
    pub(super) fn next_entry(&mut self) -> Result<Option<TarEntry<ObjectID>>, Stop> {
        let mut parser = Parser::with_defaults();
        let mut header: Vec<u8> = Vec::new();
        let mut block = [0u8; 512];
        loop {
            if !self.read_inline(&mut block)? {
                return Ok(None);
            }
            header.extend_from_slice(&block);
            loop {
                match parser.parse(&header)? {
                    ParseEvent::NeedData { .. } => break,
                    ParseEvent::GlobalExtensions { consumed, .. } => {
                        header.drain(..consumed.min(header.len()));
                    }
                    ParseEvent::End { .. } => return Ok(None),
                    ParseEvent::SparseEntry { .. } => {
                        fail!("sparse tar entries are not supported")
                    }
                    ParseEvent::Entry { entry, .. } => {
                        let size = usize::try_from(entry.size).context("entry size")?;
                        let stored = size.checked_next_multiple_of(512).context("entry size")?;
                        let item = match self.read_content(size, stored)? {
                            Content::External(id) => match entry.entry_type {
                                EntryType::Regular | EntryType::Continuous => {
                                    check!(
                                        entry.size > INLINE_MAX,
                                        "a {size} byte file is stored as an object"
                                    );
                                    TarItem::Leaf(LeafContent::Regular(RegularFile::External(
                                        id, entry.size,
                                    )))
                                }
                                other => fail!("an object for a {other:?} entry"),
                            },
                            Content::Inline(content) => {
                                inline_item(&entry, content.into_boxed_slice())?
                            }
                        };
                        let xattrs: BTreeMap<Box<OsStr>, Box<[u8]>> = entry
                            .xattrs
                            .iter()
                            .map(|(k, v)| (Box::from(OsStr::from_bytes(k)), Box::from(&v[..])))
                            .collect();
                        return Ok(Some(TarEntry {
                            path: absolute(&entry.path),
                            stat: Stat {
                                st_uid: entry.uid as u32,
                                st_gid: entry.gid as u32,
                                st_mode: entry.mode,
                                st_mtim_sec: entry.mtime as i64,
                                st_mtim_nsec: entry.pax.map_or(0, mtime_nsec),
                                xattrs,
                            },
                            item,
                        }));
                    }
                }
            }
        }
    }
}

enum Content<ObjectID> {
    Inline(Vec<u8>),
    External(ObjectID),
}

/// The item of an entry whose contents were inline.
fn inline_item<ObjectID: FsVerityHashValue>(
    entry: &tar_core::parse::ParsedEntry<'_>,
    content: Box<[u8]>,
) -> anyhow::Result<TarItem<ObjectID>> {
    let device = || match (entry.dev_major, entry.dev_minor) {
        (Some(major), Some(minor)) => Ok(rustix::fs::makedev(major, minor)),
        _ => bail!("a device entry without device numbers"),
    };
    let target = || entry.link_target.as_deref().unwrap_or_default();
    Ok(match entry.entry_type {
        EntryType::Directory => TarItem::Directory,
        EntryType::Regular | EntryType::Continuous => {
            ensure!(
                content.len() as u64 <= INLINE_MAX,
                "a {} byte file is stored inline",
                content.len()
            );
            TarItem::Leaf(LeafContent::Regular(RegularFile::Inline(content)))
        }
        EntryType::Link => TarItem::Hardlink(absolute(target()).into_os_string()),
        EntryType::Symlink => {
            TarItem::Leaf(LeafContent::Symlink(Box::from(OsStr::from_bytes(target()))))
        }
        EntryType::Block => TarItem::Leaf(LeafContent::BlockDevice(device()?)),
        EntryType::Char => TarItem::Leaf(LeafContent::CharacterDevice(device()?)),
        EntryType::Fifo => TarItem::Leaf(LeafContent::Fifo),
        other => bail!("unsupported tar entry type {other:?}"),
    })
}

/// `/` + the tar path without leading or trailing slashes; the root is the empty path
/// (composefs' convention for root entries).
fn absolute(tar_path: &[u8]) -> PathBuf {
    let mut path = tar_path.strip_prefix(b"/").unwrap_or(tar_path);
    while let [rest @ .., b'/'] = path {
        path = rest;
    }
    if path.is_empty() {
        return PathBuf::new();
    }
    let mut out = Vec::with_capacity(path.len() + 1);
    out.push(b'/');
    out.extend_from_slice(path);
    PathBuf::from(OsString::from_vec(out))
}

/// Nanoseconds of the PAX `mtime` record ("secs.frac"): the fraction's first nine digits,
/// a shorter fraction scaled up ("5" is half a second), 0 when absent or not a number.
fn mtime_nsec(pax: &[u8]) -> u32 {
    let Some(value) = tar_core::PaxExtensions::new(pax)
        .flatten()
        .find(|e| e.key_bytes() == b"mtime")
    else {
        return 0;
    };
    let Some((_, frac)) = value.value().ok().and_then(|v| v.split_once('.')) else {
        return 0;
    };
    if frac.len() >= 9 {
        frac.get(..9).and_then(|f| f.parse().ok()).unwrap_or(0)
    } else {
        frac.parse::<u32>()
            .ok()
            .map_or(0, |v| v * 10u32.pow(9 - frac.len() as u32))
    }
}
