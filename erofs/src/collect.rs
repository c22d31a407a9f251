//! Inode order and directory contents.
//!
//! V1 numbers inodes breadth-first (a directory's children get their numbers when the
//! directory is visited), adds the 256 overlay whiteout stubs `00`..`ff` to the root, and
//! escapes user whiteouts (character devices 0/0) into regular files carrying overlay
//! xattrs. A file with several links gets its inode at the link that comes first in a
//! depth-first walk in name order, which is where C mkcomposefs meets it in a dumpfile.
//!
//! The tree is read through a [`TreeView`] and nothing of it is copied: a node names its
//! stat and its leaf, and directory entries are not kept at all. A directory's visit makes
//! the nodes of its children in the order it lists them, so the emitter, listing it again,
//! finds each entry's inode by position ([`Tree::dirents`]); only the further links of
//! multi-link files are looked up. At a million files every byte here is a MB.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::ops::Range;

use composefs::erofs::format::{BLOCK_SIZE, FileType};
use composefs::tree::Stat;

use crate::Error;
use crate::view::{Child, Content, TreeView};

const BLOCK: usize = BLOCK_SIZE as usize;
/// Size of an on-disk directory entry header.
pub(crate) const DIRENT_SIZE: usize = 12;
/// Directory entries beyond this much tail data go to a block of their own.
const MAX_INLINE_DIR_TAIL: usize = BLOCK / 2;

/// One EROFS inode.
#[derive(Debug)]
pub(crate) struct Node {
    /// What the inode is; its stat is the view's (see [`Tree::stat`]), not copied here.
    pub kind: Kind,
    /// Directory entries that point at this inode (for directories: 2 + subdirectories).
    pub nlink: u32,
    /// Whole data blocks after the inode table (inline files, promoted symlinks and chunk
    /// indexes).
    pub data_blocks: u32,
    /// Bytes stored right after the inode (file tail, symlink target, chunk indexes).
    pub tail: u32,
    /// The bytes of the inode's own xattr area (set by the emitter's layout decisions, like
    /// the two fields above after it promotes a tail to a block) in the low 26 bits, the
    /// file type in 3 bits above them and three flags on top: see the accessors. Kept in the
    /// node rather than in tables beside it, and packed: at a million files every byte per
    /// node is a MB.
    packed: u32,
}

const ESCAPED_WHITEOUT: u32 = 1 << 31;
const HOLDS_WHITEOUTS: u32 = 1 << 30;
const COMPACT: u32 = 1 << 29;
const TYPE_SHIFT: u32 = 26;
const TYPE: u32 = 7 << TYPE_SHIFT;
/// 64 MiB, far beyond the 256 KiB an inode's 16-bit xattr count can describe.
const XATTR_SIZE: u32 = (1 << TYPE_SHIFT) - 1;

impl Node {
    /// A user whiteout written as a regular file with `overlay.whiteout` xattrs.
    pub fn escaped_whiteout(&self) -> bool {
        self.packed & ESCAPED_WHITEOUT != 0
    }

    pub fn set_escaped_whiteout(&mut self) {
        self.packed |= ESCAPED_WHITEOUT;
    }

    /// A directory holding escaped whiteouts: it gets the `whiteouts`/`opaque` xattrs.
    pub fn holds_whiteouts(&self) -> bool {
        self.packed & HOLDS_WHITEOUTS != 0
    }

    pub fn set_holds_whiteouts(&mut self) {
        self.packed |= HOLDS_WHITEOUTS;
    }

    /// Whether the inode fits the 32-byte compact header.
    pub fn compact(&self) -> bool {
        self.packed & COMPACT != 0
    }

    pub fn set_compact(&mut self, compact: bool) {
        self.packed = (self.packed & !COMPACT) | if compact { COMPACT } else { 0 };
    }

    /// Bytes of the inode's own xattr area.
    pub fn xattr_size(&self) -> usize {
        (self.packed & XATTR_SIZE) as usize
    }

    /// Fails above 2^26 - 1 bytes, far beyond what an inode's 16-bit xattr count allows.
    pub fn set_xattr_size(&mut self, size: usize) -> Result<(), Error> {
        let size = u32::try_from(size)
            .ok()
            .filter(|&n| n <= XATTR_SIZE)
            .ok_or_else(|| Error::Unrepresentable(format!("{size} bytes of xattrs")))?;
        self.packed = (self.packed & !XATTR_SIZE) | size;
        Ok(())
    }

    /// The type the image gives the inode: a whiteout escaped into a regular file is one.
    /// Kept rather than derived from the content, which a view may have to read from a file.
    pub fn file_type(&self) -> FileType {
        if self.escaped_whiteout() {
            return FileType::RegularFile;
        }
        match (self.packed & TYPE) >> TYPE_SHIFT {
            1 => FileType::RegularFile,
            2 => FileType::Directory,
            3 => FileType::CharacterDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => FileType::Unknown,
        }
    }

    fn new(kind: Kind, nlink: u32, file_type: FileType) -> Self {
        let bits = match file_type {
            FileType::Unknown => 0,
            FileType::RegularFile => 1,
            FileType::Directory => 2,
            FileType::CharacterDevice => 3,
            FileType::BlockDevice => 4,
            FileType::Fifo => 5,
            FileType::Socket => 6,
            FileType::Symlink => 7,
        };
        Node {
            kind,
            nlink,
            data_blocks: 0,
            tail: 0,
            packed: bits << TYPE_SHIFT,
        }
    }
}

/// What an inode is, in 4 bytes (a node is per file): two tag bits and a 30-bit number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kind(u32);

/// [`Kind`] unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KindOf {
    /// A directory, by its index in [`Tree::dirs`] (directories are few: their layouts are
    /// kept beside the nodes, not in them).
    Dir(usize),
    /// A leaf of the view, by number (its content is asked for when needed, not copied).
    Leaf(usize),
    /// One of the root's whiteout stubs `00`..`ff`.
    Stub,
}

const KIND_SHIFT: u32 = 30;
const KIND_NUMBER: u32 = (1 << KIND_SHIFT) - 1;

impl Kind {
    const STUB: Kind = Kind(2 << KIND_SHIFT);

    fn tagged(tag: u32, number: usize, what: &str) -> Result<Self, Error> {
        match u32::try_from(number) {
            Ok(n) if n <= KIND_NUMBER => Ok(Kind(tag << KIND_SHIFT | n)),
            _ => Err(Error::Unrepresentable(format!("more than 2^30 {what}"))),
        }
    }

    fn dir(number: usize) -> Result<Self, Error> {
        Self::tagged(0, number, "directories")
    }

    fn leaf(number: usize) -> Result<Self, Error> {
        Self::tagged(1, number, "files")
    }

    pub fn get(self) -> KindOf {
        let number = (self.0 & KIND_NUMBER) as usize;
        match self.0 >> KIND_SHIFT {
            0 => KindOf::Dir(number),
            1 => KindOf::Leaf(number),
            _ => KindOf::Stub,
        }
    }
}

/// A directory's entries as [`listing`] gives them (`.` and `..` included), where its
/// children's nodes are, and how the entries split into full blocks and an inline tail.
#[derive(Debug, Default)]
pub(crate) struct DirLayout {
    /// The node of the first child this directory's visit made: the nodes of its
    /// subdirectories, whiteout stubs and of the files whose inode it owns follow one another
    /// from there in the order of the listing.
    pub first_child: u32,
    /// How many nodes the visit made.
    pub children: u32,
    /// The parent's node (the root's own for the root).
    pub parent: u32,
    /// Entries in the listing.
    pub len: u32,
    /// Exclusive end (index into the listing) of each block written after the inode table.
    pub block_ends: Box<[u32]>,
    /// Bytes of the entries stored inline after the inode.
    pub inline_bytes: u32,
}

impl DirLayout {
    pub fn size(&self) -> u64 {
        (BLOCK * self.block_ends.len()) as u64 + u64::from(self.inline_bytes)
    }

    /// The entry ranges of the full blocks (indexes into the listing).
    pub fn blocks(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut start = 0;
        self.block_ends.iter().map(move |&end| {
            let r = start..end as usize;
            start = end as usize;
            r
        })
    }

    /// The entry range of the inline tail.
    pub fn inline(&self) -> Range<usize> {
        let start = self.block_ends.last().copied().unwrap_or(0);
        start as usize..self.len as usize
    }
}

/// Splits a directory's entries, fed in listing order, into full blocks and an inline tail
/// of at most half a block.
#[derive(Default)]
struct Split {
    block_ends: Vec<u32>,
    bytes: usize,
    len: u32,
}

impl Split {
    fn push(&mut self, name_len: usize) -> Result<(), Error> {
        let size = DIRENT_SIZE + name_len;
        if size > BLOCK {
            return Err(Error::Unrepresentable(format!(
                "a name of {name_len} bytes"
            )));
        }
        self.bytes += size;
        if self.bytes > BLOCK {
            self.block_ends.push(self.len);
            self.bytes = size;
        }
        self.len = self.len.checked_add(1).ok_or_else(|| {
            Error::Unrepresentable("more than 2^32 entries in a directory".into())
        })?;
        Ok(())
    }

    /// The block ends, the inline bytes and the number of entries.
    fn finish(mut self) -> (Vec<u32>, u32, u32) {
        if self.bytes > MAX_INLINE_DIR_TAIL {
            self.block_ends.push(self.len);
            self.bytes = 0;
        }
        // The tail is at most half a block here: the cast cannot truncate.
        (self.block_ends, self.bytes as u32, self.len)
    }
}

/// One entry of a directory as the emitter writes it.
#[derive(Debug)]
pub(crate) struct Dirent<'a> {
    pub name: &'a [u8],
    /// The target's node.
    pub node: u32,
    pub file_type: FileType,
}

#[derive(Debug)]
pub(crate) struct Tree<'a, V: TreeView> {
    pub view: &'a V,
    pub nodes: Vec<Node>,
    /// The node of each file with several links, by leaf: its links other than the one whose
    /// directory made the node find it here.
    pub linked: HashMap<usize, u32>,
    /// Each directory's layout, in the order of their nodes.
    pub dirs: Vec<DirLayout>,
    /// Each directory of the view, in the same order.
    pub handles: Vec<V::Dir<'a>>,
    /// The stat of the root's whiteout stubs.
    pub stub: &'a Stat,
    /// Inodes of files in the repository (external content): what the shared xattrs count.
    pub externals: usize,
}

impl<'a, V: TreeView> Tree<'a, V> {
    /// An inode's stat, the view's own.
    pub fn stat(&self, node: &Node) -> &'a Stat {
        match node.kind.get() {
            KindOf::Dir(d) => match self.handles.get(d) {
                Some(&handle) => self.view.dir_stat(handle),
                // Every directory node has a handle (they are pushed together).
                None => self.stub,
            },
            KindOf::Leaf(leaf) => self.view.leaf_stat(leaf),
            KindOf::Stub => self.stub,
        }
    }

    /// A leaf's content; `None` for a directory.
    pub fn content(&self, node: &Node) -> Option<Content<'a, V::ObjectID>> {
        content(self.view, node)
    }

    /// A directory's layout; `None` for a leaf.
    pub fn dir(&self, node: &Node) -> Option<&DirLayout> {
        match node.kind.get() {
            KindOf::Dir(d) => self.dirs.get(d),
            _ => None,
        }
    }

    /// The entries of directory node `me` in the order of its layout, each with its target's
    /// node, for the emit pass. The nodes of the directory's children are found by position
    /// (see [`DirLayout::first_child`]); the listing must split into blocks as it did when the
    /// layout was made.
    pub fn dirents(&self, me: u32) -> Result<Vec<Dirent<'a>>, Error> {
        let node = self
            .nodes
            .get(me as usize)
            .ok_or_else(|| Error::Internal(format!("no inode {me}")))?;
        let KindOf::Dir(d) = node.kind.get() else {
            return Err(Error::Internal("entries asked of a leaf".into()));
        };
        let (Some(&handle), Some(layout)) = (self.handles.get(d), self.dirs.get(d)) else {
            return Err(Error::Internal(format!("directory {d} has no handle")));
        };
        let mut listed = Vec::new();
        listing(self.view, handle, d == 0, &mut listed);
        let mut next = layout.first_child as usize;
        let end = next + layout.children as usize;
        let mut split = Split::default();
        let mut out = Vec::with_capacity(listed.len());
        for (name, slot) in listed {
            split.push(name.len())?;
            let made = (next < end)
                .then(|| &self.nodes[next])
                .map(|n| n.kind.get());
            let target = match (slot, made) {
                (Slot::Dot, _) => me,
                (Slot::DotDot, _) => layout.parent,
                (Slot::Child(Child::Dir(sub)), Some(KindOf::Dir(k)))
                    if self.handles.get(k) == Some(&sub) =>
                {
                    next += 1;
                    (next - 1) as u32
                }
                (Slot::Stub, Some(KindOf::Stub)) => {
                    next += 1;
                    (next - 1) as u32
                }
                (Slot::Child(Child::Leaf(id)), Some(KindOf::Leaf(made))) if made == id => {
                    next += 1;
                    (next - 1) as u32
                }
                (Slot::Child(Child::Leaf(id)), _) => *self.linked.get(&id).ok_or_else(|| {
                    Error::Internal(format!("leaf {id} listed where it has no inode"))
                })?,
                _ => {
                    return Err(Error::Internal(
                        "a directory listed other entries in the emit pass".into(),
                    ));
                }
            };
            let file_type = self
                .nodes
                .get(target as usize)
                .ok_or_else(|| Error::Internal(format!("no inode {target}")))?
                .file_type();
            out.push(Dirent {
                name,
                node: target,
                file_type,
            });
        }
        let (block_ends, inline_bytes, len) = split.finish();
        if next != end
            || len != layout.len
            || inline_bytes != layout.inline_bytes
            || *block_ends != *layout.block_ends
        {
            return Err(Error::Internal(
                "a directory listed other entries in the emit pass".into(),
            ));
        }
        Ok(out)
    }
}

/// A directory's entries as the image lists them: `.`, `..`, the view's entries and, in the
/// root, the whiteout stubs the view does not shadow, in byte order of their names. The
/// layout pass and the emitter both list directories with this, so they see one order.
pub(crate) fn listing<'a, V: TreeView>(
    view: &'a V,
    dir: V::Dir<'a>,
    root: bool,
    out: &mut Vec<(&'a [u8], Slot<V::Dir<'a>>)>,
) {
    out.clear();
    out.push((b".", Slot::Dot));
    out.push((b"..", Slot::DotDot));
    out.extend(
        view.entries(dir)
            .map(|(name, child)| (name, Slot::Child(child))),
    );
    if root {
        let existing: HashSet<&[u8]> = out.iter().map(|(n, _)| *n).collect();
        for name in &STUB_NAMES {
            if !existing.contains(&name[..]) {
                out.push((&name[..], Slot::Stub));
            }
        }
    }
    // Stable, and nearly sorted already (the view's entries are): about one pass.
    out.sort_by(|a, b| a.0.cmp(b.0));
}

fn content<'a, V: TreeView>(view: &'a V, node: &Node) -> Option<Content<'a, V::ObjectID>> {
    match node.kind.get() {
        KindOf::Dir(_) => None,
        KindOf::Leaf(leaf) => Some(view.leaf_content(leaf)),
        KindOf::Stub => Some(Content::CharacterDevice(0)),
    }
}

/// The type of a leaf's content.
fn type_of<ObjectID>(content: &Content<'_, ObjectID>) -> FileType {
    match content {
        Content::Inline(_)
        | Content::External(..)
        | Content::ExternalNoVerity(..)
        | Content::Sparse(_) => FileType::RegularFile,
        Content::CharacterDevice(_) => FileType::CharacterDevice,
        Content::BlockDevice(_) => FileType::BlockDevice,
        Content::Fifo => FileType::Fifo,
        Content::Socket => FileType::Socket,
        Content::Symlink(_) => FileType::Symlink,
    }
}

/// The stat of the leaf the V1 format puts at `/00`..`/ff` unless the root already has that
/// name: a whiteout with the root's owner and mtime, mode 0644 and only the root's SELinux
/// label.
pub(crate) fn whiteout_stub(root: &Stat) -> Stat {
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
    stat
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

pub(crate) enum Slot<D> {
    Dot,
    DotDot,
    Child(Child<D>),
    Stub,
}

struct Collector<'a, V: TreeView + 'a> {
    view: &'a V,
    nlinks: Vec<u32>,
    /// For files with several links: the directory of the link that owns the inode.
    canonical: HashMap<usize, V::Dir<'a>>,
    /// Inodes already given to files with several links.
    linked: HashMap<usize, u32>,
    nodes: Vec<Node>,
    /// The view's directories, in the order of their nodes.
    handles: Vec<V::Dir<'a>>,
    /// Inodes of files in the repository.
    externals: usize,
}

/// What one walk of the whole tree finds out before the inodes are numbered.
struct Census<'a, V: TreeView + 'a> {
    /// Links to each leaf (0 for an orphan, which the image leaves out).
    nlinks: Vec<u32>,
    dirs: usize,
    canonical: HashMap<usize, V::Dir<'a>>,
}

/// Depth first, in name order (where C mkcomposefs meets a file's links in a dumpfile):
/// link counts, sizes, and the directory of the first link of every multi-link leaf. A
/// loop instead of recursion: a tree can be as deep as the paths in a tar stream allow.
fn census<'a, V: TreeView>(view: &'a V) -> Result<Census<'a, V>, Error> {
    let leaf_count = view.leaf_count();
    let mut nlinks = vec![0u32; leaf_count];
    let mut dirs = 1usize;
    let mut seen = HashSet::new();
    let root = view.root();
    seen.insert(root);
    let mut stack = vec![view.entries(root)];
    while let Some(entries) = stack.last_mut() {
        match entries.next() {
            None => {
                stack.pop();
            }
            Some((_, Child::Dir(d))) => {
                if !seen.insert(d) {
                    return Err(Error::InvalidTree("a directory is reached twice".into()));
                }
                dirs += 1;
                stack.push(view.entries(d));
            }
            Some((_, Child::Leaf(id))) => {
                let n = nlinks
                    .get_mut(id)
                    .ok_or_else(|| Error::InvalidTree(format!("dangling leaf {id}")))?;
                *n = n.saturating_add(1);
            }
        }
    }
    drop(seen);
    let mut canonical = HashMap::new();
    if nlinks.iter().any(|&n| n > 1) {
        let mut stack = vec![(root, view.entries(root))];
        while let Some((dir, entries)) = stack.last_mut() {
            let dir = *dir;
            match entries.next() {
                None => {
                    stack.pop();
                }
                Some((_, Child::Dir(d))) => stack.push((d, view.entries(d))),
                Some((_, Child::Leaf(id))) => {
                    if nlinks[id] > 1 {
                        canonical.entry(id).or_insert(dir);
                    }
                }
            }
        }
    }
    Ok(Census {
        nlinks,
        dirs,
        canonical,
    })
}

pub(crate) fn collect<'a, V: TreeView>(view: &'a V, stub: &'a Stat) -> Result<Tree<'a, V>, Error> {
    let census = census(view)?;
    for (leaf, &n) in census.nlinks.iter().enumerate() {
        if n > 1 && matches!(view.leaf_content(leaf), Content::CharacterDevice(0)) {
            return Err(Error::InvalidTree(
                "a whiteout has more than one link".into(),
            ));
        }
    }
    let Census {
        nlinks,
        dirs,
        canonical,
    } = census;
    let files = nlinks.iter().filter(|&&n| n > 0).count();
    // The node table is allocated at its final size: grown by doubling, it held up to twice
    // what it needs, at the moment the image's tree and layout are all in memory.
    let mut c = Collector {
        view,
        nlinks,
        canonical,
        linked: HashMap::new(),
        nodes: Vec::with_capacity(dirs + files + STUB_NAMES.len()),
        handles: Vec::with_capacity(dirs),
        externals: 0,
    };
    let mut layouts: Vec<DirLayout> = Vec::with_capacity(dirs);
    // Further links met before the link that makes their file's node.
    let mut deferred = Vec::new();
    let mut queue = VecDeque::new();
    let root_dir = view.root();
    let root_stat = view.dir_stat(root_dir);
    let root = c.push_dir(root_dir)?;
    queue.push_back((root_dir, root, root));
    let mut children: Vec<(&'a [u8], Slot<V::Dir<'a>>)> = Vec::new();

    // Breadth first: directories leave the queue in the order their nodes were made, which
    // is the order of their layouts.
    while let Some((dir, parent, me)) = queue.pop_front() {
        if c.nodes[me as usize].kind.get() != KindOf::Dir(layouts.len()) {
            return Err(Error::Internal("directories laid out out of order".into()));
        }
        let first_child = c.nodes.len();
        listing(view, dir, me == root, &mut children);
        let mut holds_whiteouts = false;
        let mut split = Split::default();
        let mut nlink = 0u32;
        for (name, child) in children.drain(..) {
            split.push(name.len())?;
            match child {
                Slot::Dot | Slot::DotDot => nlink += 1,
                Slot::Child(Child::Dir(sub)) => {
                    let idx = c.push_dir(sub)?;
                    queue.push_back((sub, me, idx));
                    nlink += 1;
                }
                Slot::Stub => {
                    c.nodes
                        .push(Node::new(Kind::STUB, 1, FileType::CharacterDevice));
                }
                Slot::Child(Child::Leaf(id)) => {
                    let (target, escaped) = c.link(dir, me == root, name, id, root_stat)?;
                    holds_whiteouts |= escaped;
                    if target.is_none() {
                        deferred.push(id);
                    }
                }
            }
        }
        let (block_ends, inline_bytes, len) = split.finish();
        let node = &mut c.nodes[me as usize];
        if holds_whiteouts {
            node.set_holds_whiteouts();
        }
        node.nlink = nlink;
        layouts.push(DirLayout {
            first_child: u32::try_from(first_child)
                .map_err(|_| Error::Unrepresentable("more than 2^32 inodes".into()))?,
            children: (c.nodes.len() - first_child) as u32,
            parent,
            len,
            block_ends: block_ends.into_boxed_slice(),
            inline_bytes,
        });
    }
    if let Some(id) = deferred.into_iter().find(|id| !c.linked.contains_key(id)) {
        return Err(Error::InvalidTree(format!(
            "leaf {id} has no canonical link"
        )));
    }
    if u32::try_from(c.nodes.len()).is_err() {
        return Err(Error::Unrepresentable("more than 2^32 inodes".into()));
    }
    Ok(Tree {
        view,
        nodes: c.nodes,
        linked: c.linked,
        dirs: layouts,
        handles: c.handles,
        stub,
        externals: c.externals,
    })
}

impl<'a, V: TreeView> Collector<'a, V> {
    fn push(&mut self, node: Node) -> u32 {
        self.nodes.push(node);
        // Checked against 2^32 when the walk ends; a leaf's number fits 30 bits anyway.
        (self.nodes.len() - 1) as u32
    }

    fn push_dir(&mut self, handle: V::Dir<'a>) -> Result<u32, Error> {
        let kind = Kind::dir(self.handles.len())?;
        self.handles.push(handle);
        Ok(self.push(Node::new(kind, 0, FileType::Directory)))
    }

    fn push_leaf(
        &mut self,
        id: usize,
        nlink: u32,
        content: &Content<'_, V::ObjectID>,
    ) -> Result<u32, Error> {
        let (data_blocks, tail) = match content {
            Content::Inline(data) if !data.is_empty() => {
                let (blocks, tail) = (data.len() / BLOCK, data.len() % BLOCK);
                // A tail over half a block is cheaper as a block of its own.
                if tail > BLOCK / 2 {
                    (blocks + 1, 0)
                } else {
                    (blocks, tail)
                }
            }
            Content::Symlink(target) => (0, target.len()),
            Content::External(_, size) | Content::ExternalNoVerity(_, size) => {
                self.externals += 1;
                (0, chunk_count(*size) as usize * 4)
            }
            Content::Sparse(size) => (0, chunk_count(*size) as usize * 4),
            _ => (0, 0),
        };
        let idx = self.push(Node::new(Kind::leaf(id)?, nlink, type_of(content)));
        let node = &mut self.nodes[idx as usize];
        node.data_blocks = u32::try_from(data_blocks)
            .map_err(|_| Error::Unrepresentable("a file of more than 2^32 blocks".into()))?;
        node.tail = u32::try_from(tail)
            .map_err(|_| Error::Unrepresentable(format!("{tail} bytes after one inode")))?;
        Ok(idx)
    }

    /// The node of one link to leaf `id` found in `dir` (`None` for a further link met before
    /// the one that makes the node), and whether it escaped a whiteout.
    fn link(
        &mut self,
        dir: V::Dir<'a>,
        in_root: bool,
        name: &[u8],
        id: usize,
        root: &Stat,
    ) -> Result<(Option<u32>, bool), Error> {
        // The census counted every link, so a leaf met here has a count of at least one.
        let nlink = self.nlinks.get(id).copied().unwrap_or(1);
        let canonical = nlink <= 1 || self.canonical.get(&id) == Some(&dir);
        if !canonical {
            return Ok((self.linked.get(&id).copied(), false));
        }
        // Asked once: a view may read it from a file (ids, inline data).
        let content = self.view.leaf_content(id);
        let idx = match self.linked.get(&id) {
            Some(&idx) if nlink > 1 => idx,
            _ => {
                let idx = self.push_leaf(id, nlink, &content)?;
                if nlink > 1 {
                    self.linked.insert(id, idx);
                }
                idx
            }
        };
        let whiteout = matches!(content, Content::CharacterDevice(0));
        let node = &mut self.nodes[idx as usize];
        let escape = whiteout
            && !node.escaped_whiteout()
            && !(in_root && looks_like_stub(name, self.view.leaf_stat(id), root));
        if escape {
            node.set_escaped_whiteout();
        }
        Ok((Some(idx), escape))
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
    assert!(size_of::<Node>() == 20);
};
