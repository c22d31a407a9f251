//! What the writer reads of a tree.
//!
//! The writer needs little of a tree: each directory's stat and its entries in name order,
//! each leaf's stat and content. [`TreeView`] asks for exactly that, so that a program whose
//! tree is not a composefs `FileSystem` (one kept compactly, for images of millions of files)
//! gets the same bytes without first building composefs' tree beside its own. composefs'
//! `FileSystem` is one implementation.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;

use composefs::fsverity::FsVerityHashValue;
use composefs::tree::{Directory, FileSystem, Inode, LeafContent, RegularFile, Stat};

/// A leaf's content as the view hands it out: bytes borrowed from the tree or read for the
/// occasion, object ids by value, so that a view may keep its ids and inline data out of
/// memory (one id per external file: at a million files the largest table of a tree) and
/// read each when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a, ObjectID> {
    /// A regular file whose bytes are in the image.
    Inline(Cow<'a, [u8]>),
    /// A regular file in the repository: its object id and size.
    External(ObjectID, u64),
    /// As [`Content::External`], for an object without an fs-verity digest in its metacopy.
    ExternalNoVerity(ObjectID, u64),
    /// A regular file of this size with no data.
    Sparse(u64),
    /// A symbolic link and its target.
    Symlink(Cow<'a, [u8]>),
    /// A block device and its device number.
    BlockDevice(u64),
    /// A character device and its device number (0 is an overlay whiteout).
    CharacterDevice(u64),
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl<'a, ObjectID: FsVerityHashValue> Content<'a, ObjectID> {
    /// The view of composefs' leaf content.
    pub fn of(content: &'a LeafContent<ObjectID>) -> Self {
        match content {
            LeafContent::Regular(RegularFile::Inline(data)) => Content::Inline(Cow::Borrowed(data)),
            LeafContent::Regular(RegularFile::External(id, size)) => {
                Content::External(id.clone(), *size)
            }
            LeafContent::Regular(RegularFile::ExternalNoVerity(id, size)) => {
                Content::ExternalNoVerity(id.clone(), *size)
            }
            LeafContent::Regular(RegularFile::Sparse(size)) => Content::Sparse(*size),
            LeafContent::Symlink(target) => Content::Symlink(Cow::Borrowed(target.as_bytes())),
            LeafContent::BlockDevice(rdev) => Content::BlockDevice(*rdev),
            LeafContent::CharacterDevice(rdev) => Content::CharacterDevice(*rdev),
            LeafContent::Fifo => Content::Fifo,
            LeafContent::Socket => Content::Socket,
        }
    }
}

/// A directory entry: a subdirectory (by the view's handle) or a leaf (by number, below
/// [`TreeView::leaf_count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child<D> {
    /// A subdirectory.
    Dir(D),
    /// A leaf; several entries naming one leaf are hardlinks.
    Leaf(usize),
}

/// A filesystem tree as the writer reads it.
///
/// The image depends only on what these methods return, never on how the tree is stored:
/// two views that return the same directories, names, stats and contents give the same
/// bytes. Leaves no directory names (orphans) are left out of the image.
///
/// # Example
///
/// A view of a tree of one directory holding one empty file:
///
/// ```
/// use composefs::erofs::format::FormatVersion;
/// use composefs::fsverity::Sha256HashValue;
/// use composefs::tree::Stat;
/// use cstor_erofs::{Child, Content, TreeView};
///
/// struct OneFile {
///     root: Stat,
///     file: Stat,
/// }
///
/// impl TreeView for OneFile {
///     type ObjectID = Sha256HashValue;
///     type Dir<'a> = ();
///     fn root(&self) {}
///     fn dir_stat(&self, (): ()) -> &Stat {
///         &self.root
///     }
///     fn entries<'a>(&'a self, (): ()) -> impl Iterator<Item = (&'a [u8], Child<()>)> + 'a {
///         std::iter::once((&b"empty"[..], Child::Leaf(0)))
///     }
///     fn leaf_count(&self) -> usize {
///         1
///     }
///     fn leaf_stat(&self, _: usize) -> &Stat {
///         &self.file
///     }
///     fn leaf_content(&self, _: usize) -> Content<'_, Sha256HashValue> {
///         Content::Inline(b"".into())
///     }
/// }
///
/// let mut root = Stat::uninitialized();
/// root.st_mode = 0o755;
/// let mut file = Stat::uninitialized();
/// file.st_mode = 0o644;
/// let mut image = Vec::new();
/// cstor_erofs::write_view(&OneFile { root, file }, FormatVersion::V1, &mut image)?;
/// assert_eq!(image.len() % 4096, 0);
/// # Ok::<(), cstor_erofs::Error>(())
/// ```
pub trait TreeView {
    /// The object ids of external files.
    type ObjectID: FsVerityHashValue;
    /// A handle to one directory: equal handles name the same directory.
    type Dir<'a>: Copy + Eq + Hash
    where
        Self: 'a;

    /// The root directory.
    fn root(&self) -> Self::Dir<'_>;
    /// A directory's stat.
    fn dir_stat<'a>(&'a self, dir: Self::Dir<'a>) -> &'a Stat;
    /// A directory's entries in ascending byte order of their names, each name once and
    /// without `.` and `..`.
    fn entries<'a>(
        &'a self,
        dir: Self::Dir<'a>,
    ) -> impl Iterator<Item = (&'a [u8], Child<Self::Dir<'a>>)> + 'a;
    /// The number of leaves: leaf numbers are below it.
    fn leaf_count(&self) -> usize;
    /// A leaf's stat (`leaf` below [`TreeView::leaf_count`]).
    fn leaf_stat(&self, leaf: usize) -> &Stat;
    /// A leaf's content (`leaf` below [`TreeView::leaf_count`]).
    fn leaf_content(&self, leaf: usize) -> Content<'_, Self::ObjectID>;
    /// Called once, when the image is laid out and its bytes are about to be written: the
    /// writer has freed what it needed only to count (shared xattrs, for one), and keeps
    /// its layout tables until the end. A view that minds its process' memory may give the
    /// freed memory back to the system here; by default nothing is done.
    fn laid_out(&self) {}
}

/// A directory of a composefs tree, compared and hashed by address: two directories with the
/// same contents are still two directories.
#[derive(Debug)]
pub struct DirRef<'a, ObjectID: FsVerityHashValue>(&'a Directory<ObjectID>);

impl<ObjectID: FsVerityHashValue> Clone for DirRef<'_, ObjectID> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<ObjectID: FsVerityHashValue> Copy for DirRef<'_, ObjectID> {}

impl<ObjectID: FsVerityHashValue> PartialEq for DirRef<'_, ObjectID> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl<ObjectID: FsVerityHashValue> Eq for DirRef<'_, ObjectID> {}

impl<ObjectID: FsVerityHashValue> Hash for DirRef<'_, ObjectID> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(self.0, state)
    }
}

impl<ObjectID: FsVerityHashValue> TreeView for FileSystem<ObjectID> {
    type ObjectID = ObjectID;
    type Dir<'a> = DirRef<'a, ObjectID>;

    fn root(&self) -> DirRef<'_, ObjectID> {
        DirRef(&self.root)
    }

    fn dir_stat<'a>(&'a self, dir: DirRef<'a, ObjectID>) -> &'a Stat {
        &dir.0.stat
    }

    fn entries<'a>(
        &'a self,
        dir: DirRef<'a, ObjectID>,
    ) -> impl Iterator<Item = (&'a [u8], Child<DirRef<'a, ObjectID>>)> + 'a {
        dir.0.sorted_entries().map(|(name, inode)| {
            let child = match inode {
                Inode::Directory(d) => Child::Dir(DirRef(&**d)),
                Inode::Leaf(id, _) => Child::Leaf(id.0),
            };
            (OsStr::as_bytes(name), child)
        })
    }

    fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    fn leaf_stat(&self, leaf: usize) -> &Stat {
        &self.leaves[leaf].stat
    }

    fn leaf_content(&self, leaf: usize) -> Content<'_, ObjectID> {
        Content::of(&self.leaves[leaf].content)
    }
}
