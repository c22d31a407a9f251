//! The image's file tree in compact form (the memory plan in docs/dev/performance.md,
//! "Where memory still grows with the image"): what the import builds from the layers and
//! writes the EROFS image from, through its frozen form ([`Frozen`], a
//! `cstor_erofs::TreeView`).
//!
//! composefs' `FileSystem` costs about 250 bytes a file: a 128-byte leaf with the 64-byte
//! object id and an xattr map inline, a `BTreeMap` entry and a boxed name per directory
//! entry. Here a directory entry is a 20-byte record in one table for the whole tree
//! (parent, generation, name in one arena, child), found through a hash index of 4-byte
//! slots; a leaf is 16 bytes: the number of an interned stat (whose xattrs are the number of
//! an interned set) and its content packed, the object id as an index (the ids themselves
//! are in a file, [`IdTable`]). Directories are not maps: a
//! whiteout drops one index slot, and an opaque directory (or `/run` when canonicalized)
//! takes a new generation number, which the records made before no longer match, so
//! clearing it visits nothing. Records of directories cut off from the root are never
//! reached. The tables grow in chunks and are never copied.
//!
//! [`CompactTree::apply`] follows composefs-oci's `process_entry` rule for rule (root entry,
//! whiteouts, opaque directories, hardlinks, a directory merged over a directory), with the
//! same path handling as composefs' `Directory::split`, and the transform steps mirror
//! `FileSystem`'s. The tests apply random layers to both trees and compare their dumpfiles
//! and the EROFS images written from them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::{ImageError, LeafContent, LeafId};
use composefs::tree::{Directory, FileSystem, Inode, RegularFile, Stat};
use composefs_oci::tar::{TarEntry, TarItem};
use hashbrown::{DefaultHashBuilder, HashMap as FastMap, HashTable};

use super::tables::{Arena, Chunks, IdTable};
use crate::spill::{DataFile, SpillMaker};

type Xattrs = BTreeMap<Box<OsStr>, Box<[u8]>>;

/// A directory (top bit set) or a leaf, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Node(u32);

const DIR_BIT: u32 = 1 << 31;

impl Node {
    fn dir(i: u32) -> Self {
        Node(i | DIR_BIT)
    }
    fn as_dir(self) -> Option<u32> {
        (self.0 & DIR_BIT != 0).then_some(self.0 & !DIR_BIT)
    }
    fn as_leaf(self) -> Option<u32> {
        (self.0 & DIR_BIT == 0).then_some(self.0)
    }
}

/// A directory entry: 20 bytes.
#[derive(Debug, Clone, Copy)]
struct Record {
    parent: u32,
    /// The parent's generation when the entry was made; `u32::MAX` once removed.
    generation: u32,
    name_at: u32,
    name_len: u32,
    node: Node,
}

/// A stat without its xattr map: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_nsec: u32,
    mtime_sec: i64,
    /// An interned xattr set; 0 is the empty one.
    xattrs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Dir {
    meta: Meta,
    generation: u32,
}

#[derive(Debug, Clone, Copy)]
enum Content {
    /// Bytes in the data arena.
    Inline {
        at: u32,
        len: u32,
    },
    External {
        id: u32,
        size: u64,
    },
    ExternalNoVerity {
        id: u32,
        size: u64,
    },
    Sparse(u64),
    Symlink {
        at: u32,
        len: u32,
    },
    Block(u64),
    Char(u64),
    Fifo,
    Socket,
}

/// A leaf: 16 bytes, one per file. Its stat is the number of an interned [`Meta`]: the
/// files of a layer share a few owners, modes and mtimes (a build's files often all have one
/// mtime). Its [`Content`] is packed into three words: a 4-bit kind with the high 28 bits of
/// a size, then two 32-bit words (an object number or arena address, and a length or the
/// size's low bits); sizes up to 2^60 bytes, device numbers whole.
#[derive(Debug, Clone, Copy)]
struct Leaf {
    meta: u32,
    kind_hi: u32,
    a: u32,
    b: u32,
}

/// The high bits of a size a leaf keeps beside its 4-bit kind.
const SIZE_HI_BITS: u32 = 28;

impl Leaf {
    fn new(meta: u32, content: Content) -> Result<Self, ImageError> {
        let sized = |kind: u32, a: u32, size: u64| {
            let hi = size >> 32;
            if hi >> SIZE_HI_BITS != 0 {
                let what = format!("a file of {size} bytes");
                return Err(ImageError::InvalidFilename(OsStr::new(&what).into()));
            }
            Ok((kind << SIZE_HI_BITS | hi as u32, a, size as u32))
        };
        let (kind_hi, a, b) = match content {
            Content::Inline { at, len } => (0 << SIZE_HI_BITS, at, len),
            Content::External { id, size } => sized(1, id, size)?,
            Content::ExternalNoVerity { id, size } => sized(2, id, size)?,
            Content::Sparse(size) => sized(3, 0, size)?,
            Content::Symlink { at, len } => (4 << SIZE_HI_BITS, at, len),
            Content::Block(rdev) => (5 << SIZE_HI_BITS, (rdev >> 32) as u32, rdev as u32),
            Content::Char(rdev) => (6 << SIZE_HI_BITS, (rdev >> 32) as u32, rdev as u32),
            Content::Fifo => (7 << SIZE_HI_BITS, 0, 0),
            Content::Socket => (8 << SIZE_HI_BITS, 0, 0),
        };
        Ok(Leaf {
            meta,
            kind_hi,
            a,
            b,
        })
    }

    fn content(&self) -> Content {
        let size = (u64::from(self.kind_hi & ((1 << SIZE_HI_BITS) - 1)) << 32) | u64::from(self.b);
        let rdev = (u64::from(self.a) << 32) | u64::from(self.b);
        let (at, len, id) = (self.a, self.b, self.a);
        match self.kind_hi >> SIZE_HI_BITS {
            0 => Content::Inline { at, len },
            1 => Content::External { id, size },
            2 => Content::ExternalNoVerity { id, size },
            3 => Content::Sparse(size),
            4 => Content::Symlink { at, len },
            5 => Content::Block(rdev),
            6 => Content::Char(rdev),
            7 => Content::Fifo,
            // Only `new` makes leaves: 8 is the one kind left.
            _ => Content::Socket,
        }
    }
}

/// Xattr maps, each stored once: images repeat a few (SELinux labels, capabilities) over
/// and over.
#[derive(Debug)]
struct XattrSets {
    sets: Vec<Xattrs>,
    numbers: FastMap<Xattrs, u32>,
}

impl XattrSets {
    fn new() -> Self {
        XattrSets {
            sets: vec![Xattrs::new()],
            numbers: FastMap::from_iter([(Xattrs::new(), 0)]),
        }
    }

    fn intern(&mut self, xattrs: Xattrs) -> Result<u32, ImageError> {
        if let Some(&n) = self.numbers.get(&xattrs) {
            return Ok(n);
        }
        let n = too_many(self.sets.len(), "xattr sets")?;
        self.sets.push(xattrs.clone());
        self.numbers.insert(xattrs, n);
        Ok(n)
    }
}

fn too_many(n: usize, what: &str) -> Result<u32, ImageError> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n < DIR_BIT)
        .ok_or_else(|| ImageError::InvalidFilename(OsStr::new(&format!("{n} {what}")).into()))
}

/// The compact tree (see the module documentation).
#[derive(Debug)]
pub(crate) struct CompactTree<ObjectID> {
    names: Arena,
    records: Chunks<Record>,
    /// Live records, by (parent, generation, name).
    index: HashTable<u32>,
    /// foldhash, seeded per process: names come from the image, so not a fixed hash.
    hasher: DefaultHashBuilder,
    /// `dirs[0]` is the root.
    dirs: Vec<Dir>,
    leaves: Chunks<Leaf>,
    ids: IdTable<ObjectID>,
    data: DataFile,
    xattrs: XattrSets,
    /// The leaves' stats, each stored once.
    metas: Vec<Meta>,
    meta_numbers: FastMap<Meta, u32>,
}

impl<ObjectID: FsVerityHashValue> CompactTree<ObjectID> {
    /// An empty tree whose root has an uninitialized stat, as composefs' import starts.
    /// Its object ids stay in memory.
    #[cfg(test)]
    pub fn new() -> Self {
        Self::spilling(None)
    }

    /// An empty tree as composefs' import starts it, with its object ids and inline data in
    /// files from `spill` (see [`IdTable`], [`DataFile`]), or in memory without.
    pub fn spilling(spill: Option<SpillMaker>) -> Self {
        Self::with_tables(IdTable::new(spill.clone()), DataFile::new(spill))
    }

    fn with_tables(ids: IdTable<ObjectID>, data: DataFile) -> Self {
        let mut tree = CompactTree {
            names: Arena::default(),
            records: Chunks::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            dirs: Vec::new(),
            leaves: Chunks::new(),
            ids,
            data,
            xattrs: XattrSets::new(),
            metas: Vec::new(),
            meta_numbers: FastMap::default(),
        };
        tree.dirs.push(Dir {
            meta: Meta {
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_nsec: 0,
                mtime_sec: 0,
                xattrs: 0,
            },
            generation: 0,
        });
        tree
    }

    /// Applies one tar entry of a layer, as composefs-oci's `process_entry` does.
    pub fn apply(&mut self, entry: TarEntry<ObjectID>) -> anyhow::Result<()> {
        let path = entry.path.as_os_str();
        if Path::new(path).file_name().is_none() {
            if !matches!(entry.item, TarItem::Directory) {
                return Err(ImageError::IsNotRegular(path.into()).into());
            }
            self.dirs[0].meta = self.meta(entry.stat)?;
            return Ok(());
        }
        enum New {
            Dir(Meta),
            Leaf(Node),
        }
        let new = match entry.item {
            TarItem::Directory => New::Dir(self.meta(entry.stat)?),
            TarItem::Leaf(content) => New::Leaf(self.push_leaf(entry.stat, content)?),
            TarItem::Hardlink(target) => {
                let (dir, name) = self.split(&target)?;
                match self
                    .lookup(dir, name.as_bytes())
                    .map(|r| self.records[r].node)
                {
                    Some(node) if node.as_leaf().is_some() => New::Leaf(node),
                    Some(_) => return Err(ImageError::IsADirectory(name.into()).into()),
                    None => return Err(ImageError::NotFound(name.into()).into()),
                }
            }
        };
        let (dir, name) = self.split(path)?;
        let name = name.as_bytes();
        if let Some(whiteout) = name.strip_prefix(b".wh.") {
            if whiteout == b".wh..opq" {
                self.clear(dir)?;
            } else {
                self.remove(dir, whiteout);
            }
            return Ok(());
        }
        match new {
            New::Dir(meta) => {
                let existing = self.lookup(dir, name);
                match existing.and_then(|r| self.records[r].node.as_dir()) {
                    // A directory over a directory keeps the entries below it.
                    Some(old) => self.dirs[old as usize].meta = meta,
                    None => {
                        let d = too_many(self.dirs.len(), "directories")?;
                        self.dirs.push(Dir {
                            meta,
                            generation: 0,
                        });
                        self.insert(dir, name, Node::dir(d))?;
                    }
                }
            }
            New::Leaf(node) => self.insert(dir, name, node)?,
        }
        Ok(())
    }

    fn meta(&mut self, stat: Stat) -> Result<Meta, ImageError> {
        Ok(Meta {
            mode: stat.st_mode,
            uid: stat.st_uid,
            gid: stat.st_gid,
            mtime_nsec: stat.st_mtim_nsec,
            mtime_sec: stat.st_mtim_sec,
            xattrs: self.xattrs.intern(stat.xattrs)?,
        })
    }

    fn push_data(&mut self, bytes: &[u8]) -> anyhow::Result<(u32, u32)> {
        self.data
            .push(bytes)
            .map_err(|e| anyhow::anyhow!("spilling the tree's inline data: {e}"))?
            .ok_or_else(|| {
                let what = OsStr::new("more than 4 GiB of inline data and link targets");
                ImageError::InvalidFilename(what.into()).into()
            })
    }

    fn push_id(&mut self, id: ObjectID) -> anyhow::Result<u32> {
        let n = too_many(self.ids.len(), "objects")?;
        self.ids
            .push(id)
            .map_err(|e| anyhow::anyhow!("spilling the tree's object ids: {e}"))?;
        Ok(n)
    }

    /// The id of number `n`.
    fn id(&self, n: u32) -> std::io::Result<ObjectID> {
        self.ids.get(n as usize)
    }

    fn push_leaf(
        &mut self,
        stat: Stat,
        content: LeafContent<RegularFile<ObjectID>>,
    ) -> anyhow::Result<Node> {
        let meta = self.meta(stat)?;
        let meta = match self.meta_numbers.get(&meta) {
            Some(&n) => n,
            None => {
                let n = too_many(self.metas.len(), "distinct stats")?;
                self.metas.push(meta);
                self.meta_numbers.insert(meta, n);
                n
            }
        };
        let content = match content {
            LeafContent::Regular(RegularFile::Inline(bytes)) => {
                let (at, len) = self.push_data(&bytes)?;
                Content::Inline { at, len }
            }
            LeafContent::Regular(RegularFile::External(id, size)) => Content::External {
                id: self.push_id(id)?,
                size,
            },
            LeafContent::Regular(RegularFile::ExternalNoVerity(id, size)) => {
                Content::ExternalNoVerity {
                    id: self.push_id(id)?,
                    size,
                }
            }
            LeafContent::Regular(RegularFile::Sparse(size)) => Content::Sparse(size),
            LeafContent::Symlink(target) => {
                let (at, len) = self.push_data(target.as_bytes())?;
                Content::Symlink { at, len }
            }
            LeafContent::BlockDevice(rdev) => Content::Block(rdev),
            LeafContent::CharacterDevice(rdev) => Content::Char(rdev),
            LeafContent::Fifo => Content::Fifo,
            LeafContent::Socket => Content::Socket,
        };
        let n = too_many(self.leaves.len(), "files")?;
        self.leaves.push(Leaf::new(meta, content)?);
        Ok(Node(n))
    }

    fn name(&self, r: &Record) -> &[u8] {
        self.names.get(r.name_at, r.name_len)
    }

    fn hash(&self, parent: u32, generation: u32, name: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        (parent, generation).hash(&mut h);
        name.hash(&mut h);
        h.finish()
    }

    /// The live record named `name` in directory `dir`.
    fn lookup(&self, dir: u32, name: &[u8]) -> Option<usize> {
        let generation = self.dirs[dir as usize].generation;
        let hash = self.hash(dir, generation, name);
        self.index
            .find(hash, |&r| {
                let rec = &self.records[r as usize];
                rec.parent == dir && rec.generation == generation && self.name(rec) == name
            })
            .map(|&r| r as usize)
    }

    /// Names `node` `name` in `dir`, replacing what had that name.
    fn insert(&mut self, dir: u32, name: &[u8], node: Node) -> Result<(), ImageError> {
        if let Some(r) = self.lookup(dir, name) {
            self.records[r].node = node;
            return Ok(());
        }
        let r = too_many(self.records.len(), "directory entries")?;
        let (name_at, name_len) = self.names.push(name)?;
        let generation = self.dirs[dir as usize].generation;
        self.records.push(Record {
            parent: dir,
            generation,
            name_at,
            name_len,
            node,
        });
        let hash = self.hash(dir, generation, name);
        let CompactTree {
            index,
            records,
            names,
            hasher,
            ..
        } = self;
        index.insert_unique(hash, r, |&other| {
            let rec = &records[other as usize];
            let mut h = hasher.build_hasher();
            (rec.parent, rec.generation).hash(&mut h);
            names.get(rec.name_at, rec.name_len).hash(&mut h);
            h.finish()
        });
        Ok(())
    }

    fn remove(&mut self, dir: u32, name: &[u8]) {
        let generation = self.dirs[dir as usize].generation;
        let hash = self.hash(dir, generation, name);
        let CompactTree {
            index,
            records,
            names,
            ..
        } = self;
        if let Ok(slot) = index.find_entry(hash, |&r| {
            let rec = &records[r as usize];
            rec.parent == dir
                && rec.generation == generation
                && names.get(rec.name_at, rec.name_len) == name
        }) {
            let (r, _) = slot.remove();
            records[r as usize].generation = u32::MAX;
        }
    }

    /// Empties `dir`: the entries made before no longer match its generation. Their slots
    /// stay in the index, unreachable, until the tree is dropped.
    fn clear(&mut self, dir: u32) -> Result<(), ImageError> {
        let d = &mut self.dirs[dir as usize];
        // u32::MAX marks removed records; no layer holds four billion opaque markers.
        d.generation = d
            .generation
            .checked_add(1)
            .filter(|&g| g != u32::MAX)
            .ok_or_else(|| ImageError::InvalidFilename(OsStr::new(".wh..wh..opq").into()))?;
        Ok(())
    }

    /// The directory holding the last component of `path` and that component, as
    /// composefs' `Directory::split`.
    fn split<'p>(&self, path: &'p OsStr) -> Result<(u32, &'p OsStr), ImageError> {
        let p = Path::new(path);
        let Some(name) = p.file_name() else {
            return Err(ImageError::InvalidFilename(path.into()));
        };
        let mut dir = 0u32;
        if let Some(parent) = p.parent() {
            for component in parent.components() {
                match component {
                    Component::RootDir => {}
                    Component::Prefix(_) | Component::CurDir | Component::ParentDir => {
                        return Err(ImageError::InvalidFilename(parent.as_os_str().into()));
                    }
                    Component::Normal(c) => {
                        dir = match self.lookup(dir, c.as_bytes()).map(|r| self.records[r].node) {
                            Some(node) => node
                                .as_dir()
                                .ok_or_else(|| ImageError::NotADirectory(c.into()))?,
                            None => return Err(ImageError::NotFound(c.into())),
                        };
                    }
                }
            }
        }
        Ok((dir, name))
    }

    /// The directory named `name` in the root.
    fn top_dir(&self, name: &str) -> Result<Option<u32>, ImageError> {
        match self
            .lookup(0, name.as_bytes())
            .map(|r| self.records[r].node)
        {
            Some(node) => node
                .as_dir()
                .map(Some)
                .ok_or_else(|| ImageError::NotADirectory(OsStr::new(name).into())),
            None => Ok(None),
        }
    }

    /// composefs' `copy_root_metadata_from_usr`: the root takes `/usr`'s stat.
    pub fn copy_root_metadata_from_usr(&mut self) -> Result<(), ImageError> {
        let usr = self
            .top_dir("usr")?
            .ok_or_else(|| ImageError::NotFound(OsStr::new("usr").into()))?;
        self.dirs[0].meta = self.dirs[usr as usize].meta;
        Ok(())
    }

    /// composefs' `canonicalize_run`: `/run` emptied, with `/usr`'s mtime.
    pub fn canonicalize_run(&mut self) -> Result<(), ImageError> {
        if let Some(run) = self.top_dir("run")? {
            let usr = self
                .top_dir("usr")?
                .ok_or_else(|| ImageError::NotFound(OsStr::new("usr").into()))?;
            let usr = self.dirs[usr as usize].meta;
            let run_dir = &mut self.dirs[run as usize];
            run_dir.meta.mtime_sec = usr.mtime_sec;
            run_dir.meta.mtime_nsec = usr.mtime_nsec;
            self.clear(run)?;
        }
        Ok(())
    }

    /// composefs' `filter_xattrs`: each interned set is filtered once, whatever the number
    /// of files that carry it.
    pub fn filter_xattrs(&mut self, keep: impl Fn(&OsStr) -> bool) {
        for set in &mut self.xattrs.sets {
            set.retain(|name, _| keep(name));
        }
        // Sets that became equal stay distinct numbers: each still names the same map.
        self.xattrs.numbers.clear();
    }

    /// Sets the root's stat.
    pub fn set_root_stat(&mut self, stat: Stat) -> Result<(), ImageError> {
        self.dirs[0].meta = self.meta(stat)?;
        Ok(())
    }

    fn stat(&self, meta: &Meta) -> Stat {
        Stat {
            st_mode: meta.mode,
            st_uid: meta.uid,
            st_gid: meta.gid,
            st_mtim_sec: meta.mtime_sec,
            st_mtim_nsec: meta.mtime_nsec,
            xattrs: self.xattrs.sets[meta.xattrs as usize].clone(),
        }
    }

    /// Inline data or a link target, as [`CompactTree::push_data`] stored it.
    fn data(&self, at: u32, len: u32) -> std::io::Result<Cow<'_, [u8]>> {
        self.data.get(at, len)
    }

    /// Whether the root has a directory named `usr` (then the OCI transform applies).
    pub fn has_usr(&self) -> bool {
        matches!(self.top_dir("usr"), Ok(Some(_)))
    }

    /// Whether the root's stat was never set (no layer had a root entry).
    pub fn root_is_uninitialized(&self) -> bool {
        self.dirs[0].meta.mode == 0
    }

    /// Every record's number, the live ones first and sorted by (directory, name), and how
    /// many are live.
    fn entry_order(&self) -> Result<(Vec<u32>, usize), ImageError> {
        let count = too_many(self.records.len(), "directory entries")?;
        let mut order: Vec<u32> = (0..count).collect();
        let mut live = 0;
        for i in 0..order.len() {
            let rec = &self.records[order[i] as usize];
            if rec.generation == self.dirs[rec.parent as usize].generation {
                order.swap(live, i);
                live += 1;
            }
        }
        order[..live].sort_unstable_by(|&a, &b| {
            let (ra, rb) = (&self.records[a as usize], &self.records[b as usize]);
            ra.parent
                .cmp(&rb.parent)
                .then_with(|| self.name(ra).cmp(self.name(rb)))
        });
        Ok((order, live))
    }

    /// The live entries of every directory, sorted by (directory, name), and where each
    /// directory's run of them starts (`u32::MAX` for an empty directory).
    fn children(&self) -> Result<(Vec<u32>, Vec<u32>), ImageError> {
        let (mut live, count) = self.entry_order()?;
        live.truncate(count);
        live.shrink_to_fit();
        let mut start = vec![u32::MAX; self.dirs.len()];
        for (i, &r) in live.iter().enumerate().rev() {
            start[self.records[r as usize].parent as usize] = i as u32;
        }
        Ok((live, start))
    }

    /// The live entries of directory `dir`, in name order.
    fn run<'a>(
        &'a self,
        children: &'a [u32],
        start: &[u32],
        dir: u32,
    ) -> impl Iterator<Item = &'a Record> + 'a {
        let from = match start[dir as usize] {
            u32::MAX => children.len(),
            i => i as usize,
        };
        children[from..]
            .iter()
            .map(|&r| &self.records[r as usize])
            .take_while(move |rec| rec.parent == dir)
    }

    /// The same tree in composefs' types: leaves keep their numbers, so that hardlinks and
    /// orphans are where composefs' own import leaves them. Built with a stack of its own,
    /// not by recursion: a layer's paths can nest a few thousand directories deep.
    pub fn to_composefs(&self) -> anyhow::Result<FileSystem<ObjectID>> {
        let mut fs = FileSystem::new(self.stat(&self.dirs[0].meta));
        for leaf in self.leaves.iter() {
            let content = match leaf.content() {
                Content::Inline { at, len } => {
                    LeafContent::Regular(RegularFile::Inline(self.data(at, len)?.into()))
                }
                Content::External { id, size } => {
                    LeafContent::Regular(RegularFile::External(self.id(id)?, size))
                }
                Content::ExternalNoVerity { id, size } => {
                    LeafContent::Regular(RegularFile::ExternalNoVerity(self.id(id)?, size))
                }
                Content::Sparse(size) => LeafContent::Regular(RegularFile::Sparse(size)),
                Content::Symlink { at, len } => {
                    LeafContent::Symlink(OsStr::from_bytes(&self.data(at, len)?).into())
                }
                Content::Block(rdev) => LeafContent::BlockDevice(rdev),
                Content::Char(rdev) => LeafContent::CharacterDevice(rdev),
                Content::Fifo => LeafContent::Fifo,
                Content::Socket => LeafContent::Socket,
            };
            fs.push_leaf(self.stat(&self.metas[leaf.meta as usize]), content);
        }
        let (children, start) = self.children()?;
        // (name in the parent, directory being filled, its remaining entries)
        let root = Directory::new(self.stat(&self.dirs[0].meta));
        let mut stack = vec![(&b""[..], root, self.run(&children, &start, 0))];
        while let Some((_, dir, run)) = stack.last_mut() {
            match run.next() {
                Some(rec) => {
                    let name = self.name(rec);
                    match rec.node.as_dir() {
                        Some(d) => {
                            let sub = Directory::new(self.stat(&self.dirs[d as usize].meta));
                            stack.push((name, sub, self.run(&children, &start, d)));
                        }
                        None => {
                            let leaf = Inode::leaf(LeafId(rec.node.0 as usize));
                            dir.insert(OsStr::from_bytes(name), leaf);
                        }
                    }
                }
                None => {
                    let Some((name, done, _)) = stack.pop() else {
                        break;
                    };
                    match stack.last_mut() {
                        Some((_, parent, _)) => {
                            parent
                                .insert(OsStr::from_bytes(name), Inode::Directory(Box::new(done)));
                        }
                        None => fs.root = done,
                    }
                }
            }
        }
        Ok(fs)
    }

    /// The finished tree as the EROFS writer reads it. What only building needed (the name
    /// index, the interning maps, the records' parents and generations) is dropped, so that
    /// the writer's layout takes its place rather than adding to it.
    pub fn freeze(mut self) -> Result<Frozen<ObjectID>, ImageError> {
        self.index = HashTable::new();
        self.meta_numbers = FastMap::default();
        self.xattrs.numbers = FastMap::default();
        // The records are put in entry order where they are and become the entries chunk by
        // chunk: a sorted index of them and a second table beside them made freezing the
        // client's peak at 500 layers of 2,000 files.
        let (order, live) = self.entry_order()?;
        let mut records = std::mem::replace(&mut self.records, Chunks::new());
        records.permute(order).map_err(|()| {
            ImageError::InvalidFilename(OsStr::new("directory entries out of order").into())
        })?;
        let mut ends = vec![0u32; self.dirs.len()];
        let entries = records.convert(live, |rec| {
            ends[rec.parent as usize] += 1;
            Slot {
                name_at: rec.name_at,
                name_len: rec.name_len,
                node: rec.node,
            }
        });
        // Counts to cumulative ends: directory d's entries are entries[ends[d-1]..ends[d]].
        let mut total = 0u32;
        for end in &mut ends {
            total += *end;
            *end = total;
        }
        let dir_stats = self.dirs.iter().map(|d| self.stat(&d.meta)).collect();
        let leaf_stats = self.metas.iter().map(|m| self.stat(m)).collect();
        self.metas = Vec::new();
        Ok(Frozen {
            tree: self,
            error: Default::default(),
            entries,
            ends,
            dir_stats,
            leaf_stats,
        })
    }
}

/// A live directory entry of a frozen tree: 12 bytes (its directory is where it sits).
#[derive(Debug, Clone, Copy)]
struct Slot {
    name_at: u32,
    name_len: u32,
    node: Node,
}

/// A finished [`CompactTree`], read by `cstor_erofs::write_view`: every directory's live
/// entries in one table, sorted by (directory, name), and a composefs `Stat` for every
/// directory and every interned leaf stat (the writer borrows stats; there are as many as
/// distinct stats, not files).
#[derive(Debug)]
pub(crate) struct Frozen<ObjectID> {
    /// The leaves, ids, names and data; its records and index are gone.
    tree: CompactTree<ObjectID>,
    /// The first failure to read an object id back ([`IdTable`]): the writer's view cannot
    /// fail, so it hands out an empty id and the image is refused after the write
    /// ([`Frozen::check`]).
    error: std::cell::RefCell<Option<std::io::Error>>,
    entries: Chunks<Slot>,
    /// Where each directory's run of `entries` ends.
    ends: Vec<u32>,
    dir_stats: Vec<Stat>,
    leaf_stats: Vec<Stat>,
}

impl<ObjectID: FsVerityHashValue> Frozen<ObjectID> {
    fn id(&self, n: u32) -> ObjectID {
        self.tree.id(n).unwrap_or_else(|e| {
            self.error.borrow_mut().get_or_insert(e);
            ObjectID::EMPTY
        })
    }

    /// [`Frozen::id`] for inline data and link targets.
    fn data(&self, at: u32, len: u32) -> Cow<'_, [u8]> {
        self.tree.data(at, len).unwrap_or_else(|e| {
            self.error.borrow_mut().get_or_insert(e);
            Cow::Borrowed(&[])
        })
    }

    /// Fails if an object id or inline data could not be read back while the image was
    /// written: that image is wrong and must not be stored.
    pub fn check(&self) -> std::io::Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<ObjectID: FsVerityHashValue> cstor_erofs::TreeView for Frozen<ObjectID> {
    type ObjectID = ObjectID;
    type Dir<'a> = u32;

    fn root(&self) -> u32 {
        0
    }

    fn dir_stat(&self, dir: u32) -> &Stat {
        &self.dir_stats[dir as usize]
    }

    fn entries<'a>(
        &'a self,
        dir: u32,
    ) -> impl Iterator<Item = (&'a [u8], cstor_erofs::Child<u32>)> + 'a {
        let d = dir as usize;
        let start = match d {
            0 => 0,
            _ => self.ends[d - 1] as usize,
        };
        (start..self.ends[d] as usize)
            .map(|i| &self.entries[i])
            .map(|slot| {
                let child = match slot.node.as_dir() {
                    Some(d) => cstor_erofs::Child::Dir(d),
                    None => cstor_erofs::Child::Leaf(slot.node.0 as usize),
                };
                (self.tree.names.get(slot.name_at, slot.name_len), child)
            })
    }

    fn leaf_count(&self) -> usize {
        self.tree.leaves.len()
    }

    fn leaf_stat(&self, leaf: usize) -> &Stat {
        &self.leaf_stats[self.tree.leaves[leaf].meta as usize]
    }

    fn leaf_content(&self, leaf: usize) -> cstor_erofs::Content<'_, ObjectID> {
        use cstor_erofs::Content as C;
        let t = &self.tree;
        match t.leaves[leaf].content() {
            Content::Inline { at, len } => C::Inline(self.data(at, len)),
            Content::External { id, size } => C::External(self.id(id), size),
            Content::ExternalNoVerity { id, size } => C::ExternalNoVerity(self.id(id), size),
            Content::Sparse(size) => C::Sparse(size),
            Content::Symlink { at, len } => C::Symlink(self.data(at, len)),
            Content::Block(rdev) => C::BlockDevice(rdev),
            Content::Char(rdev) => C::CharacterDevice(rdev),
            Content::Fifo => C::Fifo,
            Content::Socket => C::Socket,
        }
    }

    /// The writer's counting tables lie in the heap between the tree's and its layout's
    /// (arena blocks, below the mmap threshold): freed, they would stay resident through the
    /// whole write, at its peak.
    fn laid_out(&self) {
        cstor_sys::memory::release_free_memory();
        crate::sys::log_memory("image laid out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::dump;
    use composefs::erofs::format::FormatVersion;
    use composefs::fsverity::Sha256HashValue;
    use std::path::PathBuf;
    use zerocopy::IntoBytes;

    type Id = Sha256HashValue;

    /// splitmix64, seeded: the same layers on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
            &of[(self.next() % of.len() as u64) as usize]
        }
    }

    fn stat(rng: &mut Rng, mode: u32) -> Stat {
        let mut xattrs = Xattrs::new();
        match rng.next() % 4 {
            0 => {
                xattrs.insert(
                    OsStr::new("security.selinux").into(),
                    b"system_u:x".as_slice().into(),
                );
            }
            1 => {
                xattrs.insert(OsStr::new("user.note").into(), b"n".as_slice().into());
                xattrs.insert(
                    OsStr::new("security.capability").into(),
                    b"\x01\x02".as_slice().into(),
                );
            }
            _ => {}
        }
        Stat {
            st_mode: mode | (rng.next() % 0o777) as u32,
            st_uid: (rng.next() % 3) as u32,
            st_gid: (rng.next() % 3) as u32,
            st_mtim_sec: (rng.next() % 5) as i64,
            st_mtim_nsec: 0,
            xattrs,
        }
    }

    /// A random entry over a small namespace, so that names collide, directories are
    /// replaced by files and back, whiteouts hit, and hardlinks find (or miss) targets.
    fn entry(rng: &mut Rng) -> TarEntry<Id> {
        const DIRS: &[&str] = &["/", "/a", "/a/b", "/c", "/usr", "/run", "/a/b/d"];
        const NAMES: &[&str] = &[
            "a",
            "b",
            "c",
            "d",
            "x",
            "y",
            "usr",
            "run",
            ".wh.x",
            ".wh.a",
            ".wh.b",
            ".wh..wh..opq",
        ];
        let dir = *rng.pick(DIRS);
        let name = *rng.pick(NAMES);
        let path = if rng.next().is_multiple_of(40) {
            PathBuf::from("/")
        } else {
            PathBuf::from(format!("{}/{name}", dir.trim_end_matches('/')))
        };
        let item = match rng.next() % 10 {
            0..=3 => TarItem::Directory,
            4 => TarItem::Leaf(LeafContent::Regular(RegularFile::Inline(
                vec![rng.next() as u8; (rng.next() % 5) as usize].into(),
            ))),
            5 => {
                // Few distinct ids, some differing only past their first 8 bytes: shared
                // xattrs, and ids the writer's fingerprints cannot tell apart.
                let mut id = Id::EMPTY;
                id.as_mut_bytes()[0] = (rng.next() % 8) as u8;
                if let Some(last) = id.as_mut_bytes().last_mut() {
                    *last = (rng.next() % 3) as u8;
                }
                TarItem::Leaf(LeafContent::Regular(RegularFile::External(
                    id,
                    rng.next() % 9000,
                )))
            }
            6 => TarItem::Leaf(LeafContent::Symlink(OsStr::new(*rng.pick(NAMES)).into())),
            7 => TarItem::Leaf(
                rng.pick(&[
                    LeafContent::CharacterDevice(0),
                    LeafContent::Fifo,
                    LeafContent::BlockDevice(7),
                ])
                .clone(),
            ),
            _ => TarItem::Hardlink(
                format!(
                    "{}/{}",
                    rng.pick(DIRS).trim_end_matches('/'),
                    rng.pick(NAMES)
                )
                .into(),
            ),
        };
        let mode = match item {
            TarItem::Directory => 0o040000,
            _ => 0o100000,
        };
        TarEntry {
            stat: stat(rng, mode),
            path,
            item,
        }
    }

    #[test]
    fn random_layers_give_the_tree_composefs_builds() {
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let mut expected: FileSystem<Id> = FileSystem::new(Stat::uninitialized());
            // Odd seeds keep their ids and data in files: ids spilled every 3 and read 4
            // at a time, data every 5 bytes.
            let mut tree = match seed % 2 {
                0 => CompactTree::<Id>::new(),
                _ => CompactTree::with_tables(
                    IdTable::small(std::sync::Arc::new(tempfile::tempfile), 3, 4),
                    DataFile::with_batch(Some(std::sync::Arc::new(tempfile::tempfile)), 5),
                ),
            };
            for _ in 0..(rng.next() % 120) {
                let e = entry(&mut rng);
                let again = TarEntry {
                    path: e.path.clone(),
                    stat: e.stat.clone(),
                    item: match &e.item {
                        TarItem::Directory => TarItem::Directory,
                        TarItem::Leaf(c) => TarItem::Leaf(c.clone()),
                        TarItem::Hardlink(t) => TarItem::Hardlink(t.clone()),
                    },
                };
                let theirs = composefs_oci::image::process_entry(&mut expected, e).is_ok();
                let ours = tree.apply(again).is_ok();
                assert_eq!(ours, theirs, "seed {seed}: entry applied by one tree only");
            }
            if expected.root.stat.st_mode == 0 {
                // An uninitialized root cannot be dumped; both set it alike.
                let mut s = Stat::uninitialized();
                s.st_mode = 0o40755;
                expected.set_root_stat(s.clone());
                tree.set_root_stat(s).unwrap();
            }
            assert_eq!(
                dump(&tree.to_composefs().unwrap()),
                dump(&expected),
                "seed {seed}"
            );

            let theirs = expected
                .copy_root_metadata_from_usr()
                .and_then(|()| expected.canonicalize_run());
            let ours = tree
                .copy_root_metadata_from_usr()
                .and_then(|()| tree.canonicalize_run());
            assert_eq!(ours.is_ok(), theirs.is_ok(), "seed {seed}: transform");
            let keep = |n: &OsStr| n.as_bytes().starts_with(b"security.");
            expected.filter_xattrs(keep);
            tree.filter_xattrs(keep);
            assert_eq!(
                dump(&tree.to_composefs().unwrap()),
                dump(&expected),
                "seed {seed}, transformed"
            );

            // The EROFS writer reads the frozen tree directly: the same bytes as from
            // composefs' tree (whose orphans composefs drops before writing).
            if expected.nlinks().contains(&0) {
                expected.compact();
            }
            let mut theirs = Vec::new();
            let theirs =
                cstor_erofs::write_image(&expected, FormatVersion::V1, &mut theirs).map(|_| theirs);
            let mut ours = Vec::new();
            let frozen = tree.freeze().unwrap();
            let ours = cstor_erofs::write_view(&frozen, FormatVersion::V1, &mut ours).map(|_| ours);
            frozen.check().unwrap();
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) => assert!(ours == theirs, "seed {seed}: image bytes"),
                (Err(_), Err(_)) => {}
                (ours, theirs) => panic!(
                    "seed {seed}: written {:?} from the frozen tree, {:?} from composefs'",
                    ours.map(|_| ()),
                    theirs.map(|_| ())
                ),
            }
        }
    }

    #[test]
    fn a_leaf_gives_back_its_content_at_the_edges() {
        let max = (1u64 << 60) - 1;
        for c in [
            Content::Inline {
                at: u32::MAX,
                len: 64,
            },
            Content::External { id: 7, size: max },
            Content::ExternalNoVerity {
                id: u32::MAX,
                size: 1 << 32,
            },
            Content::Sparse(0),
            Content::Symlink {
                at: 3,
                len: u32::MAX,
            },
            Content::Block(u64::MAX),
            Content::Char(0),
            Content::Fifo,
            Content::Socket,
        ] {
            let back = Leaf::new(9, c).unwrap();
            assert_eq!(back.meta, 9);
            assert_eq!(format!("{:?}", back.content()), format!("{c:?}"));
        }
        assert!(
            Leaf::new(
                0,
                Content::External {
                    id: 0,
                    size: max + 1
                }
            )
            .is_err()
        );
        assert!(Leaf::new(0, Content::Sparse(u64::MAX)).is_err());
    }

    #[test]
    fn a_record_and_a_leaf_stay_small() {
        assert_eq!(size_of::<Record>(), 20);
        assert_eq!(size_of::<Leaf>(), 16);
    }
}

/// A measurement, not a check: the resident memory of a real layer's tree, compact or
/// composefs', from a repository on this machine:
/// `PROBE_REPO=DIR PROBE_VERITY=HEX PROBE_TREE=compact|composefs cargo test --release -p
/// cstor-import --lib tree_memory_probe -- --ignored --nocapture` (a SHA-512 repository; the
/// layer stream's verity is the object its `streams/oci-layer-…` link names).
#[cfg(test)]
mod probe {
    use super::*;
    use composefs::fsverity::Sha512HashValue;
    use composefs::repository::Repository;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    #[ignore = "a measurement on a repository of this machine (PROBE_REPO, PROBE_VERITY)"]
    fn tree_memory_probe() {
        let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("set {k}"));
        let verity = Sha512HashValue::from_hex(env("PROBE_VERITY")).unwrap();
        let dir = rustix::fs::open(
            env("PROBE_REPO").as_str(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let repo = Repository::<Sha512HashValue>::open_path(dir, ".").unwrap();
        let before = rss_kib();
        let started = std::time::Instant::now();
        let mut stream = repo
            .open_stream("", Some(&verity), Some(composefs_oci::LAYER_CONTENT_TYPE))
            .unwrap();
        let mut compact = CompactTree::<Sha512HashValue>::new();
        let mut theirs = FileSystem::<Sha512HashValue>::new(Stat::uninitialized());
        let ours = env("PROBE_TREE") == "compact";
        while let Some(e) = composefs_oci::tar::get_entry(&mut stream).unwrap() {
            if ours {
                compact.apply(e).unwrap();
            } else {
                composefs_oci::image::process_entry(&mut theirs, e).unwrap();
            }
        }
        drop(stream);
        println!(
            "{} tree: {:?}, +{} KiB resident",
            env("PROBE_TREE"),
            started.elapsed(),
            rss_kib() - before
        );
        if ours {
            let t = &compact;
            let bytes = t.records.capacity() * size_of::<Record>()
                + t.leaves.capacity() * size_of::<Leaf>()
                + t.names.capacity()
                + t.data.len() as usize
                + t.index.capacity() * 5;
            println!(
                "{} records, {} leaves, {} ids (in a file), {} B of names, {} B of data, {} metas: \
                 {} KiB allocated for them",
                t.records.len(),
                t.leaves.len(),
                t.ids.len(),
                t.names.len(),
                t.data.len(),
                t.metas.len(),
                bytes >> 10
            );
        }
    }
}
