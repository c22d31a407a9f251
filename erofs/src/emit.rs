//! Layout and bytes.
//!
//! The image is produced twice by the same code: a layout pass that only counts bytes and
//! records where every inode, shared xattr and data block lands, and an emit pass that writes
//! the bytes, filling in node ids and block addresses from the first pass. Sizes never depend
//! on those values, so both passes lay out identically (and the emit pass checks it).

use std::io::Write;

use composefs::erofs::format::{
    self, BLOCK_SIZE, CompactInodeHeader, ComposefsHeader, DataLayout, DirectoryEntryHeader,
    ExtendedInodeHeader, FileType, FormatVersion, InodeLayout, InodeXAttrHeader, Superblock,
    XAttrHeader,
};
use composefs::fsverity::FsVerityHashValue;
use composefs::tree::Stat;
use zerocopy::IntoBytes;

use crate::Error;
use crate::collect::{DIRENT_SIZE, DirLayout, Dirent, KindOf, Node, Tree, chunk_bits};
use crate::view::{Content, TreeView};
use crate::xattr::{InodeXAttrs, Shared, XAttr};

const BLOCK: u64 = BLOCK_SIZE as u64;
const SLOT: u64 = 32;
const COMPOSEFS_HEADER_AREA: u64 = 1024;
const COMPACT_SIZE: usize = size_of::<CompactInodeHeader>();
const EXTENDED_SIZE: usize = size_of::<ExtendedInodeHeader>();
/// The chunk index of a hole: external files point nowhere inside the image.
const NULL_CHUNK: [u8; 4] = [0xff; 4];

/// Where things land, recorded by the layout pass.
#[derive(Debug, Default)]
struct Layout {
    /// Each inode's number (its offset in 32-byte slots): 4 bytes a file, not 8.
    inodes: Vec<u32>,
    inodes_end: u64,
    xattrs: Vec<u64>,
    /// The first data block of each inode that has any, as (inode, block), in inode order:
    /// most inodes have none (their tail is inline), so a table of every inode's block
    /// would mostly repeat its neighbour's.
    blocks: Vec<(u32, u32)>,
    /// The block after the last inode's data.
    blocks_end: u32,
    end: u64,
}

impl Layout {
    /// Inode `idx`'s first data block: for an inode without data blocks, where the next
    /// inode's data starts (the data area is written in inode order, each inode's data
    /// block-aligned), as composefs' writer records it.
    fn block(&self, idx: usize) -> u32 {
        let at = self.blocks.partition_point(|&(i, _)| (i as usize) < idx);
        self.blocks
            .get(at)
            .map_or(self.blocks_end, |&(_, block)| block)
    }
}

trait Sink {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error>;
    fn pos(&self) -> u64;

    fn zeros(&mut self, mut n: u64) -> Result<(), Error> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64);
            self.put(&ZEROS[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    fn pad(&mut self, align: u64) -> Result<(), Error> {
        let pos = self.pos();
        self.zeros(pos.next_multiple_of(align) - pos)
    }
}

struct Counter(u64);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.0 += bytes.len() as u64;
        Ok(())
    }
    fn pos(&self) -> u64 {
        self.0
    }
}

struct Out<W: Write> {
    w: W,
    pos: u64,
}

impl<W: Write> Sink for Out<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.w.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
    fn pos(&self) -> u64 {
        self.pos
    }
}

/// Bytes from `pos` to the end of its block, or `None` on a block boundary.
fn to_block_end(pos: u64) -> Option<u64> {
    match pos % BLOCK {
        0 => None,
        off => Some(BLOCK - off),
    }
}

pub(crate) fn write<'a, V: TreeView>(
    tree: &mut Tree<'a, V>,
    shared: &Shared<'a, V::ObjectID>,
    out: impl Write,
) -> Result<u64, Error> {
    let min_mtime = tree
        .nodes
        .iter()
        .map(|n| {
            let st = tree.stat(n);
            (st.st_mtim_sec as u64, st.st_mtim_nsec)
        })
        .min()
        .unwrap_or((0, 0));
    for idx in 0..tree.nodes.len() {
        let xattr_size = InodeXAttrs::new(tree, shared, idx).size();
        let content = tree.content(&tree.nodes[idx]);
        let stat = tree.stat(&tree.nodes[idx]);
        let node = &mut tree.nodes[idx];
        node.set_xattr_size(xattr_size)?;
        let tail = node.tail as usize;
        // Symlinks whose inode would not fit a block, and chunk indexes that would cross one,
        // move to a data block of their own.
        if tail > 0 {
            if let Some(Content::Symlink(_)) = content {
                let header = if fits_compact(stat, min_mtime, tail as u64, node.nlink) {
                    COMPACT_SIZE
                } else {
                    EXTENDED_SIZE
                };
                if header + xattr_size + tail >= BLOCK as usize {
                    node.data_blocks += 1;
                    node.tail = 0;
                }
            } else if is_chunked(content.as_ref())
                && tail + xattr_size % SLOT as usize > BLOCK as usize
            {
                node.data_blocks = 1;
                node.tail = 0;
            }
        }
        let dir = match node.kind.get() {
            KindOf::Dir(d) => tree.dirs.get(d),
            _ => None,
        };
        let (size, nlink) = size_nlink(node, dir, content.as_ref());
        node.set_compact(fits_compact(stat, min_mtime, size, nlink));
    }
    let ctx = Ctx {
        tree,
        shared,
        min_mtime,
    };
    let mut layout = Layout {
        inodes: Vec::with_capacity(tree.nodes.len()),
        ..Layout::default()
    };
    ctx.emit(&mut Counter(0), &mut layout, true)?;
    let mut sink = Out { w: out, pos: 0 };
    ctx.emit(&mut sink, &mut layout, false)?;
    sink.w.flush()?;
    Ok(sink.pos)
}

fn is_chunked<ObjectID>(content: Option<&Content<'_, ObjectID>>) -> bool {
    matches!(
        content,
        Some(Content::External(..) | Content::ExternalNoVerity(..) | Content::Sparse(_))
    )
}

/// The inode's `size` and `nlink` fields (`dir` and `content` are the node's: its layout if
/// it is a directory, else its content).
fn size_nlink<ObjectID>(
    node: &Node,
    dir: Option<&DirLayout>,
    content: Option<&Content<'_, ObjectID>>,
) -> (u64, u32) {
    let size = match (dir, content) {
        (Some(d), _) => d.size(),
        (_, Some(Content::Inline(data))) => data.len() as u64,
        (
            _,
            Some(
                Content::External(_, size)
                | Content::ExternalNoVerity(_, size)
                | Content::Sparse(size),
            ),
        ) => *size,
        (_, Some(Content::Symlink(target))) => target.len() as u64,
        _ => 0,
    };
    (size, node.nlink)
}

/// A compact (32-byte) inode has no mtime of its own (it uses the superblock's build time)
/// and 16/32-bit owner, link count and size fields.
fn fits_compact(stat: &Stat, min_mtime: (u64, u32), size: u64, nlink: u32) -> bool {
    (stat.st_mtim_sec as u64, stat.st_mtim_nsec) == min_mtime
        && nlink <= u32::from(u16::MAX)
        && stat.st_uid <= u32::from(u16::MAX)
        && stat.st_gid <= u32::from(u16::MAX)
        && size <= u64::from(u32::MAX)
}

struct Ctx<'t, 'a, V: TreeView> {
    tree: &'t Tree<'a, V>,
    shared: &'t Shared<'a, V::ObjectID>,
    min_mtime: (u64, u32),
}

impl<V: TreeView> Ctx<'_, '_, V> {
    fn emit(&self, s: &mut impl Sink, layout: &mut Layout, first: bool) -> Result<(), Error> {
        let nodes = &self.tree.nodes;
        let header = ComposefsHeader {
            magic: format::COMPOSEFS_MAGIC,
            version: format::VERSION,
            flags: if self.shared.has_acl {
                format::COMPOSEFS_FLAGS_HAS_ACL
            } else {
                0.into()
            },
            composefs_version: FormatVersion::V1.composefs_version(),
            ..Default::default()
        };
        s.put(header.as_bytes())?;
        s.pad(COMPOSEFS_HEADER_AREA)?;
        let root_nid = if first { 0 } else { layout.inodes[0] };
        let superblock = Superblock {
            magic: format::MAGIC_V1,
            blkszbits: format::BLOCK_BITS,
            feature_compat: (format::FEATURE_COMPAT_MTIME | format::FEATURE_COMPAT_XATTR_FILTER)
                .into(),
            root_nid: u16::try_from(root_nid)
                .map_err(|_| Error::Internal("root inode beyond nid 65535".into()))?
                .into(),
            inos: (nodes.len() as u64).into(),
            blocks: to_u32(layout.end / BLOCK, "block count")?.into(),
            build_time: self.min_mtime.0.into(),
            build_time_nsec: self.min_mtime.1.into(),
            xattr_blkaddr: to_u32(layout.inodes_end / BLOCK, "xattr block")?.into(),
            ..Default::default()
        };
        s.put(superblock.as_bytes())?;

        for idx in 0..nodes.len() {
            self.inode(s, layout, first, idx)?;
        }
        s.pad(SLOT)?;
        record(s, first, &mut layout.inodes_end, "end of inodes")?;
        for (i, x) in self.shared.table().enumerate() {
            record_at(s, first, &mut layout.xattrs, i, "shared xattr")?;
            write_xattr(s, &x)?;
        }
        s.pad(BLOCK)?;
        for idx in 0..nodes.len() {
            let start = s.pos();
            if !start.is_multiple_of(BLOCK) {
                return Err(Error::Internal(format!(
                    "data of inode {idx} at {start}, not a multiple of {BLOCK}"
                )));
            }
            let block = to_u32(start / BLOCK, "data block")?;
            if !first && layout.block(idx) != block {
                return Err(Error::Internal(format!(
                    "data block of inode {idx} moved between the layout and emit passes"
                )));
            }
            self.blocks(s, layout, first, idx)?;
            if first && s.pos() != start {
                let inode = to_u32(idx as u64, "inode")?;
                layout.blocks.push((inode, block));
            }
        }
        let end = to_u32(s.pos().div_ceil(BLOCK), "data block")?;
        if first {
            layout.blocks_end = end;
        } else if layout.blocks_end != end {
            return Err(Error::Internal(
                "the data area's end moved between the layout and emit passes".into(),
            ));
        }
        record(s, first, &mut layout.end, "end of image")
    }

    fn inode(
        &self,
        s: &mut impl Sink,
        layout: &mut Layout,
        first: bool,
        idx: usize,
    ) -> Result<(), Error> {
        let node = &self.tree.nodes[idx];
        let content = self.tree.content(node);
        let (compact, xattr_size) = (node.compact(), node.xattr_size());
        let (data_blocks, tail) = (node.data_blocks, node.tail as usize);
        let blkaddr = if first { 0 } else { layout.block(idx) };
        let (data_layout, u) =
            self.data_layout(node, content.as_ref(), data_blocks, tail, blkaddr)?;
        let (size, nlink) = size_nlink(node, self.tree.dir(node), content.as_ref());
        let header = (if compact { COMPACT_SIZE } else { EXTENDED_SIZE }) as u64;
        let meta = header + xattr_size as u64;
        let file_type = node.file_type();
        let is_symlink = matches!(file_type, FileType::Symlink);

        s.pad(SLOT)?;
        let pos = s.pos();
        let chunked = data_layout == DataLayout::ChunkBased;
        if is_symlink && data_layout == DataLayout::FlatPlain {
            // A symlink moved to a data block still starts its inode on a fresh block when
            // inode and target would have crossed one.
            if pos / BLOCK != (pos + meta + size - 1) / BLOCK
                && let Some(pad) = to_block_end(pos)
            {
                s.zeros(pad)?;
            }
        } else if chunked && tail == 0 && data_blocks > 0 {
            if let Some(pad) = to_block_end(pos) {
                s.zeros(pad)?;
            }
        } else if chunked && tail > 0 {
            self.pad_tail(s, meta, tail as u64)?;
        } else if data_layout == DataLayout::FlatInline {
            let inline = size % BLOCK;
            if is_symlink {
                // Old kernels refuse a symlink whose inode and target cross a block.
                if pos % BLOCK + meta + inline > BLOCK
                    && let Some(pad) = to_block_end(pos)
                {
                    s.zeros(pad)?;
                }
            } else {
                self.pad_tail(s, meta, inline)?;
            }
        }
        record_unit(s, first, &mut layout.inodes, idx, SLOT, "inode")?;

        let xattr_icount = match xattr_size {
            0 => 0,
            n => 1 + (n - crate::xattr::IBODY_HEADER_SIZE) / 4,
        };
        let xattr_icount = u16::try_from(xattr_icount)
            .map_err(|_| Error::Unrepresentable("xattrs of more than 256 KiB".into()))?;
        let stat = self.tree.stat(node);
        let mode = file_type | stat.st_mode;
        if compact {
            s.put(
                CompactInodeHeader {
                    format: InodeLayout::Compact | data_layout,
                    xattr_icount: xattr_icount.into(),
                    mode,
                    nlink: (nlink as u16).into(),
                    size: (size as u32).into(),
                    u: u.into(),
                    ino: (idx as u32).into(),
                    uid: (stat.st_uid as u16).into(),
                    gid: (stat.st_gid as u16).into(),
                    ..Default::default()
                }
                .as_bytes(),
            )?;
        } else {
            s.put(
                ExtendedInodeHeader {
                    format: InodeLayout::Extended | data_layout,
                    xattr_icount: xattr_icount.into(),
                    mode,
                    size: size.into(),
                    u: u.into(),
                    ino: (idx as u32).into(),
                    uid: stat.st_uid.into(),
                    gid: stat.st_gid.into(),
                    mtime: (stat.st_mtim_sec as u64).into(),
                    mtime_nsec: stat.st_mtim_nsec.into(),
                    nlink: nlink.into(),
                    ..Default::default()
                }
                .as_bytes(),
            )?;
        }

        if first {
            // Only the size matters here, and it is known.
            s.zeros(xattr_size as u64)?;
        } else if xattr_size > 0 {
            let xattrs = InodeXAttrs::new(self.tree, self.shared, idx);
            if xattrs.size() != xattr_size {
                return Err(Error::Internal("xattr size changed between passes".into()));
            }
            s.put(
                InodeXAttrHeader {
                    name_filter: (!xattrs.filter).into(),
                    shared_count: u8::try_from(xattrs.shared.len()).map_err(|_| {
                        Error::Unrepresentable("more than 255 shared xattrs on one inode".into())
                    })?,
                    ..Default::default()
                }
                .as_bytes(),
            )?;
            for &i in &xattrs.shared {
                // Counted in 4-byte words from the start of the block holding the end of the
                // inode table.
                let at = layout.xattrs[i as usize];
                let base = layout.inodes_end - layout.inodes_end % BLOCK;
                let reference = to_u32((at - base) / 4, "shared xattr reference")?;
                s.put(&reference.to_le_bytes())?;
            }
            for x in &xattrs.local {
                write_xattr(s, x)?;
            }
        }

        match (self.tree.dir(node), content) {
            // The layout pass needs only the entries' size, which the layout knows.
            (Some(d), _) if first => s.zeros(u64::from(d.inline_bytes))?,
            (Some(d), _) => {
                let dirents = self.tree.dirents(idx as u32)?;
                self.dirents(s, layout, dirents.get(d.inline()))?
            }
            (_, Some(Content::Inline(data))) => s.put(&data[data.len() - tail..])?,
            (_, Some(Content::Symlink(target))) if data_blocks == 0 => s.put(&target)?,
            _ if chunked => {
                for _ in 0..tail / 4 {
                    s.put(&NULL_CHUNK)?;
                }
            }
            _ => {}
        }
        s.pad(SLOT)
    }

    /// Pads so that `tail` bytes after an inode of `meta` bytes do not cross a block, in whole
    /// inode slots.
    fn pad_tail(&self, s: &mut impl Sink, meta: u64, tail: u64) -> Result<(), Error> {
        if let Some(room) = to_block_end(s.pos() + meta)
            && room < tail
        {
            s.zeros(room.next_multiple_of(SLOT))?;
        }
        Ok(())
    }

    /// The inode's data layout and its `u` field.
    fn data_layout(
        &self,
        node: &Node,
        content: Option<&Content<'_, V::ObjectID>>,
        data_blocks: u32,
        tail: usize,
        blkaddr: u32,
    ) -> Result<(DataLayout, u32), Error> {
        let Some(content) = content else {
            let Some(d) = self.tree.dir(node) else {
                return Err(Error::Internal("a leaf without content".into()));
            };
            return Ok(if d.inline().is_empty() {
                (DataLayout::FlatPlain, blkaddr)
            } else if !d.block_ends.is_empty() {
                (DataLayout::FlatInline, blkaddr)
            } else {
                (DataLayout::FlatInline, 0)
            });
        };
        Ok(match content {
            Content::Inline(data) => {
                if data.is_empty() {
                    (DataLayout::FlatPlain, 0)
                } else if data_blocks > 0 {
                    let l = if tail > 0 {
                        DataLayout::FlatInline
                    } else {
                        DataLayout::FlatPlain
                    };
                    (l, blkaddr)
                } else {
                    (DataLayout::FlatInline, 0)
                }
            }
            Content::External(_, size)
            | Content::ExternalNoVerity(_, size)
            | Content::Sparse(size) => {
                let chunk_format = chunk_bits(*size) - u32::from(format::BLOCK_BITS);
                let u = if data_blocks > 0 {
                    (blkaddr & 0xFFFF_0000) | chunk_format
                } else {
                    chunk_format
                };
                (DataLayout::ChunkBased, u)
            }
            Content::CharacterDevice(rdev) | Content::BlockDevice(rdev) => (
                DataLayout::FlatPlain,
                u32::try_from(*rdev)
                    .map_err(|_| Error::Unrepresentable(format!("device number {rdev:#x}")))?,
            ),
            Content::Fifo | Content::Socket => (DataLayout::FlatPlain, 0),
            Content::Symlink(_) => {
                if data_blocks > 0 {
                    (DataLayout::FlatPlain, blkaddr)
                } else {
                    (DataLayout::FlatInline, 0)
                }
            }
        })
    }

    fn blocks(
        &self,
        s: &mut impl Sink,
        layout: &Layout,
        first: bool,
        idx: usize,
    ) -> Result<(), Error> {
        let node = &self.tree.nodes[idx];
        let data_blocks = node.data_blocks;
        if let Some(d) = self.tree.dir(node) {
            if first {
                return s.zeros(BLOCK * d.block_ends.len() as u64);
            }
            if d.block_ends.is_empty() {
                return Ok(());
            }
            let dirents = self.tree.dirents(idx as u32)?;
            for block in d.blocks() {
                self.dirents(s, layout, dirents.get(block))?;
                s.pad(BLOCK)?;
            }
            return Ok(());
        }
        if data_blocks == 0 {
            return Ok(());
        }
        match self.tree.content(node) {
            Some(Content::Inline(data)) => {
                for chunk in data.chunks(BLOCK as usize).take(data_blocks as usize) {
                    s.put(chunk)?;
                    s.pad(BLOCK)?;
                }
            }
            Some(Content::Symlink(target)) => {
                s.put(&target[..target.len().min(BLOCK as usize)])?;
                s.pad(BLOCK)?;
            }
            content if is_chunked(content.as_ref()) => {
                for _ in 0..BLOCK / 4 {
                    s.put(&NULL_CHUNK)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes a run of a directory's entries (`None` if the directory listed fewer).
    fn dirents(
        &self,
        s: &mut impl Sink,
        layout: &Layout,
        entries: Option<&[Dirent<'_>]>,
    ) -> Result<(), Error> {
        let entries =
            entries.ok_or_else(|| Error::Internal("a directory listed fewer entries".into()))?;
        // Below a block: the layout's split checked the names' lengths.
        let mut name_offset = DIRENT_SIZE * entries.len();
        for e in entries {
            let nid = layout
                .inodes
                .get(e.node as usize)
                .ok_or_else(|| Error::Internal(format!("no inode {}", e.node)))?;
            s.put(
                DirectoryEntryHeader {
                    inode_offset: u64::from(*nid).into(),
                    name_offset: (name_offset as u16).into(),
                    file_type: e.file_type.into(),
                    reserved: 0,
                }
                .as_bytes(),
            )?;
            name_offset += e.name.len();
        }
        entries.iter().try_for_each(|e| s.put(e.name))
    }
}

fn write_xattr<ObjectID: FsVerityHashValue>(
    s: &mut impl Sink,
    x: &XAttr<'_, ObjectID>,
) -> Result<(), Error> {
    x.check()?;
    let (prefix, suffix) = x.split();
    s.put(
        XAttrHeader {
            name_len: suffix.len() as u8,
            name_index: prefix,
            value_size: (x.value.len() as u16).into(),
        }
        .as_bytes(),
    )?;
    s.put(suffix)?;
    x.value.with_bytes(|value| s.put(value))?;
    s.pad(4)
}

fn to_u32(v: u64, what: &str) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Unrepresentable(format!("{what} {v} over 32 bits")))
}

/// In the layout pass, remembers where `what` starts; in the emit pass, checks it.
fn record(s: &impl Sink, first: bool, slot: &mut u64, what: &str) -> Result<(), Error> {
    if first {
        *slot = s.pos();
    } else if *slot != s.pos() {
        return Err(Error::Internal(format!(
            "{what} at {} in the emit pass, {} in the layout pass",
            s.pos(),
            slot
        )));
    }
    Ok(())
}

fn record_at(
    s: &impl Sink,
    first: bool,
    slots: &mut Vec<u64>,
    i: usize,
    what: &str,
) -> Result<(), Error> {
    if first {
        slots.push(s.pos());
        return Ok(());
    }
    match slots.get(i) {
        Some(&p) if p == s.pos() => Ok(()),
        _ => Err(Error::Internal(format!(
            "{what} {i} moved between the layout and emit passes"
        ))),
    }
}

/// [`record_at`] for positions kept in `unit`s (inode slots, blocks) in 32 bits: the layout
/// pass checks that each is aligned and fits.
fn record_unit(
    s: &impl Sink,
    first: bool,
    slots: &mut Vec<u32>,
    i: usize,
    unit: u64,
    what: &str,
) -> Result<(), Error> {
    let pos = s.pos();
    if first {
        if !pos.is_multiple_of(unit) {
            return Err(Error::Internal(format!(
                "{what} {i} at {pos}, not a multiple of {unit}"
            )));
        }
        slots.push(to_u32(pos / unit, what)?);
        return Ok(());
    }
    match slots.get(i) {
        Some(&p) if u64::from(p) * unit == pos => Ok(()),
        _ => Err(Error::Internal(format!(
            "{what} {i} moved between the layout and emit passes"
        ))),
    }
}
