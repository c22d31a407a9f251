//! Inode order and directory contents.
//!
//! V1 numbers inodes breadth-first (a directory's children get their numbers when the
//! directory is visited), adds the 256 overlay whiteout stubs `00`..`ff` to the root, and
//! escapes user whiteouts (character devices 0/0) into regular files carrying overlay
//! xattrs. A file with several links gets its inode at the link that comes first in a
//! depth-first walk in name order, which is where C mkcomposefs meets it in a dumpfile.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;

use composefs::erofs::format::{BLOCK_SIZE, FileType};
use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::LeafId;
use composefs::tree::{Directory, FileSystem, Inode, Leaf, LeafContent, RegularFile, Stat};

use crate::Error;

const BLOCK: usize = BLOCK_SIZE as usize;
/// Size of an on-disk directory entry header.
pub(crate) const DIRENT_SIZE: usize = 12;
/// Directory entries beyond this much tail data go to a block of their own.
const MAX_INLINE_DIR_TAIL: usize = BLOCK / 2;

/// One EROFS inode.
#[derive(Debug)]
pub(crate) struct Node<'a, ObjectID: FsVerityHashValue> {
    pub stat: &'a Stat,
    pub kind: Kind<'a, ObjectID>,
    /// Directory entries that point at this inode (for directories: 2 + subdirectories).
    pub nlink: u32,
    /// A user whiteout written as a regular file with `overlay.whiteout` xattrs.
    pub escaped_whiteout: bool,
    /// A directory holding escaped whiteouts: it gets the `whiteouts`/`opaque` xattrs.
    pub holds_whiteouts: bool,
    /// Whole data blocks after the inode table (inline files, promoted symlinks and chunk
    /// indexes).
    pub data_blocks: u32,
    /// Bytes stored right after the inode (file tail, symlink target, chunk indexes).
    pub tail: u32,
    /// Bytes of the inode's own xattr area (set by the emitter's layout decisions, like the
    /// two fields above after it promotes a tail to a block, and `compact`). Kept in the node
    /// rather than in tables beside it: at a million files every byte per node is a MB.
    pub xattr_size: u32,
    /// Whether the inode fits the 32-byte compact header.
    pub compact: bool,
}

#[derive(Debug)]
pub(crate) enum Kind<'a, ObjectID: FsVerityHashValue> {
    /// Boxed: directories are few, and an unboxed layout made every node 24 bytes longer.
    Dir(Box<DirLayout>),
    Leaf(&'a LeafContent<ObjectID>),
}

/// A directory's entries (a range of [`Tree::entries`], sorted by name, `.` and `..`
/// included) split into full blocks and an inline tail.
#[derive(Debug, Default)]
pub(crate) struct DirLayout {
    pub entries: Range<usize>,
    /// Exclusive end (index into `entries`) of each block written after the inode table.
    pub block_ends: Box<[usize]>,
    /// Bytes of the entries stored inline after the inode.
    pub inline_bytes: usize,
}

impl DirLayout {
    pub fn size(&self) -> u64 {
        (BLOCK * self.block_ends.len() + self.inline_bytes) as u64
    }

    /// The entry ranges of the full blocks, then of the inline tail.
    pub fn blocks(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut start = self.entries.start;
        self.block_ends.iter().map(move |&end| {
            let r = start..end;
            start = end;
            r
        })
    }

    pub fn inline(&self) -> Range<usize> {
        let start = self
            .block_ends
            .last()
            .copied()
            .unwrap_or(self.entries.start);
        start..self.entries.end
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Known(u32),
    /// A further link of a file whose inode comes from a directory visited later (the leaf's
    /// index, kept to 32 bits as every entry carries one).
    Deferred(u32),
}

/// One directory entry: 24 bytes, as there is one per file ([`Target`] is unpacked into a
/// number and a flag, which saves a quarter).
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub name: &'a [u8],
    target: u32,
    deferred: bool,
    pub file_type: FileType,
}

impl<'a> Entry<'a> {
    pub fn new(name: &'a [u8], target: Target, file_type: FileType) -> Self {
        let (target, deferred) = match target {
            Target::Known(i) => (i, false),
            Target::Deferred(id) => (id, true),
        };
        Entry {
            name,
            target,
            deferred,
            file_type,
        }
    }

    pub fn target(&self) -> Target {
        if self.deferred {
            Target::Deferred(self.target)
        } else {
            Target::Known(self.target)
        }
    }

    pub fn inode(&self) -> Result<usize, Error> {
        match self.target() {
            Target::Known(i) => Ok(i as usize),
            Target::Deferred(_) => Err(Error::Internal("unresolved hardlink".into())),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Tree<'a, ObjectID: FsVerityHashValue> {
    pub nodes: Vec<Node<'a, ObjectID>>,
    pub entries: Vec<Entry<'a>>,
}

impl<ObjectID: FsVerityHashValue> Node<'_, ObjectID> {
    pub fn file_type(&self) -> FileType {
        if self.escaped_whiteout {
            return FileType::RegularFile;
        }
        match self.kind {
            Kind::Dir(_) => FileType::Directory,
            Kind::Leaf(content) => match content {
                LeafContent::Regular(_) => FileType::RegularFile,
                LeafContent::CharacterDevice(_) => FileType::CharacterDevice,
                LeafContent::BlockDevice(_) => FileType::BlockDevice,
                LeafContent::Fifo => FileType::Fifo,
                LeafContent::Socket => FileType::Socket,
                LeafContent::Symlink(_) => FileType::Symlink,
            },
        }
    }
}

/// The leaf the V1 format puts at `/00`..`/ff` unless the root already has that name: a
/// whiteout with the root's owner and mtime, mode 0644 and only the root's SELinux label.
pub(crate) fn whiteout_stub<ObjectID: FsVerityHashValue>(
    fs: &FileSystem<ObjectID>,
) -> Leaf<ObjectID> {
    let root = &fs.root.stat;
    let mut stat = Stat {
        st_mode: 0o644,
        st_uid: root.st_uid,
        st_gid: root.st_gid,
        st_mtim_sec: root.st_mtim_sec,
        st_mtim_nsec: root.st_mtim_nsec,
        xattrs: Default::default(),
    };
    let selinux = OsStr::new("security.selinux");
    if let Some(label) = root.xattrs.get(selinux) {
        stat.xattrs.insert(Box::from(selinux), label.clone());
    }
    Leaf {
        stat,
        content: LeafContent::CharacterDevice(0),
    }
}

/// `00`..`ff`.
static STUB_NAMES: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut names = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        names[i] = [HEX[i >> 4], HEX[i & 15]];
        i += 1;
    }
    names
};

enum Child<'a, ObjectID: FsVerityHashValue> {
    Dir(&'a Directory<ObjectID>),
    Leaf(LeafId),
    Stub,
}

struct Collector<'a, ObjectID: FsVerityHashValue> {
    fs: &'a FileSystem<ObjectID>,
    stub: &'a Leaf<ObjectID>,
    nlinks: Vec<u32>,
    /// For files with several links: the directory of the link that owns the inode.
    canonical: HashMap<usize, *const Directory<ObjectID>>,
    /// Inodes already given to files with several links.
    linked: HashMap<usize, u32>,
    nodes: Vec<Node<'a, ObjectID>>,
}

pub(crate) fn collect<'a, ObjectID: FsVerityHashValue>(
    fs: &'a FileSystem<ObjectID>,
    stub: &'a Leaf<ObjectID>,
) -> Result<Tree<'a, ObjectID>, Error> {
    let nlinks = fs.nlinks();
    for (leaf, n) in fs.leaves.iter().zip(&nlinks) {
        if matches!(leaf.content, LeafContent::CharacterDevice(0)) && *n > 1 {
            return Err(Error::InvalidTree(
                "a whiteout has more than one link".into(),
            ));
        }
    }
    let mut canonical = HashMap::new();
    find_canonical(&fs.root, &nlinks, &mut canonical);
    // Both tables are allocated at their final size: grown by doubling, they held up to twice
    // what they need, at the moment the image's tree and layout are all in memory.
    let (dirs, links) = count(&fs.root);
    let mut c = Collector {
        fs,
        stub,
        nlinks,
        canonical,
        linked: HashMap::new(),
        nodes: Vec::with_capacity(dirs + fs.leaves.len() + STUB_NAMES.len()),
    };
    let mut entries: Vec<Entry<'a>> =
        Vec::with_capacity(2 * dirs + links + dirs.saturating_sub(1) + STUB_NAMES.len());
    let mut dirs: Vec<(u32, Range<usize>)> = Vec::new();
    let mut queue = VecDeque::new();
    let root = c.push(&fs.root.stat, Kind::Dir(Box::default()), 0);
    queue.push_back((&fs.root, root, root));
    let mut children = Vec::new();

    while let Some((dir, parent, me)) = queue.pop_front() {
        let start = entries.len();
        entries.push(Entry::new(b".", Target::Known(me), FileType::Directory));
        entries.push(Entry::new(
            b"..",
            Target::Known(parent),
            FileType::Directory,
        ));
        children.clear();
        children.extend(dir.sorted_entries().map(|(name, inode)| {
            let child = match inode {
                Inode::Directory(d) => Child::Dir(&**d),
                Inode::Leaf(id, _) => Child::Leaf(*id),
            };
            (name.as_bytes(), child)
        }));
        if me == root {
            let existing: std::collections::HashSet<&[u8]> =
                children.iter().map(|(n, _)| *n).collect();
            for name in &STUB_NAMES {
                if !existing.contains(&name[..]) {
                    children.push((&name[..], Child::Stub));
                }
            }
            children.sort_by(|a, b| a.0.cmp(b.0));
        }
        let mut holds_whiteouts = false;
        for (name, child) in children.drain(..) {
            let entry = match child {
                Child::Dir(sub) => {
                    let idx = c.push(&sub.stat, Kind::Dir(Box::default()), 0);
                    queue.push_back((sub, me, idx));
                    Entry::new(name, Target::Known(idx), FileType::Directory)
                }
                Child::Stub => {
                    let idx = c.push_leaf(c.stub, 1)?;
                    Entry::new(name, Target::Known(idx), FileType::CharacterDevice)
                }
                Child::Leaf(id) => {
                    let (target, escaped) = c.link(dir, me == root, name, id)?;
                    holds_whiteouts |= escaped;
                    let file_type = match target {
                        Target::Known(i) => c.nodes[i as usize].file_type(),
                        Target::Deferred(_) => FileType::RegularFile,
                    };
                    Entry::new(name, target, file_type)
                }
            };
            entries.push(entry);
        }
        let span = start..entries.len();
        entries[span.clone()].sort_unstable_by(|a, b| a.name.cmp(b.name));
        c.nodes[me as usize].holds_whiteouts = holds_whiteouts;
        dirs.push((me, span));
    }

    for entry in &mut entries {
        if let Target::Deferred(id) = entry.target() {
            let idx = *c
                .linked
                .get(&(id as usize))
                .ok_or_else(|| Error::InvalidTree(format!("leaf {id} has no canonical link")))?;
            *entry = Entry::new(
                entry.name,
                Target::Known(idx),
                c.nodes[idx as usize].file_type(),
            );
        }
    }
    for (me, span) in dirs {
        let (layout, nlink) = split_dir(&entries[span.clone()], span)?;
        let node = &mut c.nodes[me as usize];
        node.kind = Kind::Dir(Box::new(layout));
        node.nlink = nlink;
    }
    Ok(Tree {
        nodes: c.nodes,
        entries,
    })
}

impl<'a, ObjectID: FsVerityHashValue> Collector<'a, ObjectID> {
    fn push(&mut self, stat: &'a Stat, kind: Kind<'a, ObjectID>, nlink: u32) -> u32 {
        self.nodes.push(Node {
            stat,
            kind,
            nlink,
            escaped_whiteout: false,
            holds_whiteouts: false,
            data_blocks: 0,
            tail: 0,
            xattr_size: 0,
            compact: false,
        });
        (self.nodes.len() - 1) as u32
    }

    fn push_leaf(&mut self, leaf: &'a Leaf<ObjectID>, nlink: u32) -> Result<u32, Error> {
        let (data_blocks, tail) = match &leaf.content {
            LeafContent::Regular(RegularFile::Inline(data)) if !data.is_empty() => {
                let (blocks, tail) = (data.len() / BLOCK, data.len() % BLOCK);
                // A tail over half a block is cheaper as a block of its own.
                if tail > BLOCK / 2 {
                    (blocks + 1, 0)
                } else {
                    (blocks, tail)
                }
            }
            LeafContent::Symlink(target) => (0, target.len()),
            LeafContent::Regular(
                RegularFile::External(_, size)
                | RegularFile::ExternalNoVerity(_, size)
                | RegularFile::Sparse(size),
            ) if *size > 0 => (0, chunk_count(*size) as usize * 4),
            _ => (0, 0),
        };
        let idx = self.push(&leaf.stat, Kind::Leaf(&leaf.content), nlink);
        let node = &mut self.nodes[idx as usize];
        node.data_blocks = u32::try_from(data_blocks)
            .map_err(|_| Error::Unrepresentable("a file of more than 2^32 blocks".into()))?;
        node.tail = u32::try_from(tail)
            .map_err(|_| Error::Unrepresentable(format!("{tail} bytes after one inode")))?;
        Ok(idx)
    }

    /// The target of one link to leaf `id` found in `dir`, and whether it escaped a whiteout.
    fn link(
        &mut self,
        dir: &Directory<ObjectID>,
        in_root: bool,
        name: &[u8],
        id: LeafId,
    ) -> Result<(Target, bool), Error> {
        let fs = self.fs;
        let leaf = fs
            .leaves
            .get(id.0)
            .ok_or_else(|| Error::InvalidTree(format!("dangling leaf {}", id.0)))?;
        let nlink = self.nlinks.get(id.0).copied().unwrap_or(1);
        let canonical = nlink <= 1
            || self
                .canonical
                .get(&id.0)
                .is_some_and(|&d| std::ptr::eq(d, dir));
        if !canonical {
            return Ok((
                match self.linked.get(&id.0) {
                    Some(&idx) => Target::Known(idx),
                    None => Target::Deferred(u32::try_from(id.0).map_err(|_| {
                        Error::Unrepresentable(format!("more than 2^32 files (leaf {})", id.0))
                    })?),
                },
                false,
            ));
        }
        let idx = match self.linked.get(&id.0) {
            Some(&idx) if nlink > 1 => idx,
            _ => {
                let idx = self.push_leaf(leaf, nlink)?;
                if nlink > 1 {
                    self.linked.insert(id.0, idx);
                }
                idx
            }
        };
        let node = &mut self.nodes[idx as usize];
        let escape = matches!(leaf.content, LeafContent::CharacterDevice(0))
            && !node.escaped_whiteout
            && !(in_root && looks_like_stub(name, &leaf.stat, &fs.root.stat));
        if escape {
            node.escaped_whiteout = true;
        }
        Ok((Target::Known(idx), escape))
    }
}

/// Whether a root entry is indistinguishable from a whiteout stub (then it is not escaped,
/// exactly as if the stub had been added by the writer).
fn looks_like_stub(name: &[u8], leaf: &Stat, root: &Stat) -> bool {
    let selinux = OsStr::new("security.selinux");
    let label = root.xattrs.get(selinux);
    let xattrs_match = leaf.xattrs.len() == usize::from(label.is_some())
        && (label.is_none() || leaf.xattrs.get(selinux) == label);
    name.len() == 2
        && name
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && leaf.st_mode == 0o644
        && leaf.st_uid == root.st_uid
        && leaf.st_gid == root.st_gid
        && leaf.st_mtim_sec == root.st_mtim_sec
        && leaf.st_mtim_nsec == root.st_mtim_nsec
        && xattrs_match
}

/// The directories under and including `dir`, and the entries that are not directories.
fn count<ObjectID: FsVerityHashValue>(dir: &Directory<ObjectID>) -> (usize, usize) {
    let (mut dirs, mut links) = (1, 0);
    for (_, inode) in dir.entries() {
        match inode {
            Inode::Directory(sub) => {
                let (d, l) = count(sub);
                dirs += d;
                links += l;
            }
            Inode::Leaf(..) => links += 1,
        }
    }
    (dirs, links)
}

/// Depth-first in name order: the directory of the first link of every multi-link leaf.
fn find_canonical<ObjectID: FsVerityHashValue>(
    dir: &Directory<ObjectID>,
    nlinks: &[u32],
    out: &mut HashMap<usize, *const Directory<ObjectID>>,
) {
    for (_, inode) in dir.sorted_entries() {
        match inode {
            Inode::Directory(sub) => find_canonical(sub, nlinks, out),
            Inode::Leaf(id, _) => {
                if nlinks.get(id.0).is_some_and(|&n| n > 1) {
                    out.entry(id.0).or_insert(dir as *const _);
                }
            }
        }
    }
}

/// Splits sorted entries into full blocks and an inline tail (at most half a block).
fn split_dir(entries: &[Entry<'_>], span: Range<usize>) -> Result<(DirLayout, u32), Error> {
    let mut block_ends = Vec::new();
    let mut bytes = 0usize;
    let mut nlink = 0u32;
    for (i, entry) in entries.iter().enumerate() {
        let size = DIRENT_SIZE + entry.name.len();
        if size > BLOCK {
            return Err(Error::Unrepresentable(format!(
                "a name of {} bytes",
                entry.name.len()
            )));
        }
        if matches!(entry.file_type, FileType::Directory) {
            nlink += 1;
        }
        bytes += size;
        if bytes > BLOCK {
            block_ends.push(span.start + i);
            bytes = size;
        }
    }
    if bytes > MAX_INLINE_DIR_TAIL {
        block_ends.push(span.end);
        bytes = 0;
    }
    Ok((
        DirLayout {
            entries: span,
            block_ends: block_ends.into_boxed_slice(),
            inline_bytes: bytes,
        },
        nlink,
    ))
}

/// log2 of the chunk size of an external file: the smallest power of two covering the file,
/// at least a block, at most 2^31 blocks.
pub(crate) fn chunk_bits(size: u64) -> u32 {
    let block_bits = BLOCK.trailing_zeros();
    let bits = if size > 1 {
        64 - (size - 1).leading_zeros()
    } else {
        1
    };
    bits.clamp(block_bits, block_bits + 31)
}

pub(crate) fn chunk_count(size: u64) -> u64 {
    size.div_ceil(1u64 << chunk_bits(size))
}

// What a file costs in the layout: checked, as a field added carelessly costs a MB per
// million files.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<Entry<'static>>() == 24);
    assert!(size_of::<Node<'static, composefs::fsverity::Sha512HashValue>>() == 48);
};
