//! Extended attributes: which an inode carries, which are shared, and how they are encoded.
//!
//! Every external file carries `trusted.overlay.metacopy` (with its fs-verity digest) and
//! `trusted.overlay.redirect` (its object path). Both are derived from the object id, so they
//! are represented by the id and only turned into bytes when written; counting them needs one
//! map entry per object, not two heap copies per file. An attribute (name and value) used by
//! more than one inode goes to the shared table, in descending order of name, then value
//! length, then value, which is the order C mkcomposefs writes.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;

use composefs::erofs::composefs::OverlayMetacopy;
use composefs::erofs::format::{
    XATTR_FILTER_SEED, XATTR_INDEX_LUSTRE, XATTR_INDEX_POSIX_ACL_ACCESS,
    XATTR_INDEX_POSIX_ACL_DEFAULT, XATTR_OVERLAY_ESCAPED_PREFIX, XATTR_OVERLAY_METACOPY,
    XATTR_OVERLAY_OPAQUE, XATTR_OVERLAY_OPAQUE_ROOT, XATTR_OVERLAY_PREFIX, XATTR_OVERLAY_REDIRECT,
    XATTR_OVERLAY_WHITEOUT, XATTR_OVERLAY_WHITEOUTS, XATTR_PREFIXES, XATTR_USERXATTR_OPAQUE,
    XATTR_USERXATTR_WHITEOUT, XATTR_USERXATTR_WHITEOUTS,
};
use composefs::fsverity::FsVerityHashValue;
use zerocopy::IntoBytes;

use crate::Error;
use crate::collect::{Node, Tree};
use crate::view::{Content, TreeView};

/// On-disk size of an inode's xattr header (filter, shared count, reserved).
pub(crate) const IBODY_HEADER_SIZE: usize = 12;
/// On-disk size of an xattr entry header (name length, prefix index, value size).
pub(crate) const ENTRY_HEADER_SIZE: usize = 4;

/// An attribute's value. Object-derived values hold the id itself: a view may hand ids out
/// by value (see `Content`), so there is nothing to borrow them from.
#[derive(Debug, Clone)]
pub(crate) enum Value<'a, ObjectID: FsVerityHashValue> {
    Bytes(&'a [u8]),
    Metacopy(ObjectID),
    Redirect(ObjectID),
}

impl<ObjectID: FsVerityHashValue> Value<'_, ObjectID> {
    pub fn len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Metacopy(_) => size_of::<OverlayMetacopy<ObjectID>>(),
            // "/" + 2 hex digits + "/" + the remaining bytes in hex
            Value::Redirect(_) => 2 * size_of::<ObjectID>() + 2,
        }
    }

    /// Calls `f` with the value's bytes, built on the stack for object-derived values (this
    /// runs for every external file of the image).
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Value::Bytes(b) => f(b),
            Value::Metacopy(id) => f(OverlayMetacopy::new(id).as_bytes()),
            Value::Redirect(id) => {
                let mut buf = [0u8; 2 * 64 + 2];
                match redirect(id, &mut buf) {
                    Some(n) => f(&buf[..n]),
                    None => f(&redirect_vec(id)),
                }
            }
        }
    }

    /// Byte order of two values of equal length (C mkcomposefs' order).
    ///
    /// Two metacopy values differ only in their digests, and two redirects are the hex of
    /// their ids, which sorts as the ids do: compared without building either.
    fn cmp_bytes(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Metacopy(a), Value::Metacopy(b)) | (Value::Redirect(a), Value::Redirect(b)) => {
                a.as_bytes().cmp(b.as_bytes())
            }
            _ => self.with_bytes(|a| other.with_bytes(|b| a.cmp(b))),
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `/XX/rest`, the object's path below the repository's `objects/` (what composefs'
/// `to_object_pathname` gives, without going through a char iterator per digit), into
/// `out`; its length, or `None` if `out` is too small.
fn redirect<ObjectID: FsVerityHashValue>(id: &ObjectID, out: &mut [u8]) -> Option<usize> {
    let bytes = id.as_bytes();
    let len = 2 * bytes.len() + 2;
    let out = out.get_mut(..len)?;
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if i < 2 {
            out[at] = b'/';
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 15)];
        at += 2;
    }
    Some(len)
}

fn redirect_vec<ObjectID: FsVerityHashValue>(id: &ObjectID) -> Vec<u8> {
    let mut out = vec![0u8; 2 * id.as_bytes().len() + 2];
    let n = redirect(id, &mut out).unwrap_or(0);
    out.truncate(n);
    out
}

#[derive(Debug)]
pub(crate) struct XAttr<'a, ObjectID: FsVerityHashValue> {
    /// The full name, `trusted.overlay.*` of the tree already escaped.
    pub name: Cow<'a, [u8]>,
    pub value: Value<'a, ObjectID>,
}

impl<ObjectID: FsVerityHashValue> XAttr<'_, ObjectID> {
    /// Name, then value length, then value: C mkcomposefs' order.
    fn cmp(&self, other: &Self) -> Ordering {
        self.name
            .cmp(&other.name)
            .then_with(|| self.value.len().cmp(&other.value.len()))
            .then_with(|| self.value.cmp_bytes(&other.value))
    }

    /// The prefix index and the rest of the name. V1 does not know the lustre prefix.
    pub fn split(&self) -> (u8, &[u8]) {
        for (idx, prefix) in XATTR_PREFIXES.iter().enumerate().rev() {
            if idx == usize::from(XATTR_INDEX_LUSTRE) {
                continue;
            }
            if let Some(suffix) = self.name.strip_prefix(*prefix) {
                return (idx as u8, suffix);
            }
        }
        (0, &self.name)
    }

    /// Bytes of the entry, padded to 4.
    pub fn entry_size(&self) -> usize {
        (ENTRY_HEADER_SIZE + self.split().1.len() + self.value.len()).next_multiple_of(4)
    }

    pub fn filter_bit(&self) -> u32 {
        let (idx, suffix) = self.split();
        1 << (xxhash_rust::xxh32::xxh32(suffix, XATTR_FILTER_SEED + u32::from(idx)) % 32)
    }

    /// Checks the limits of the on-disk entry header.
    pub fn check(&self) -> Result<(), Error> {
        if self.split().1.len() > usize::from(u8::MAX) || self.value.len() > usize::from(u16::MAX) {
            return Err(Error::Unrepresentable(format!(
                "xattr {} with a {}-byte value",
                String::from_utf8_lossy(&self.name),
                self.value.len()
            )));
        }
        Ok(())
    }
}

impl<'a, ObjectID: FsVerityHashValue> XAttr<'a, ObjectID> {
    fn key(&self) -> Key<'_, 'a, ObjectID> {
        match &self.value {
            Value::Bytes(b) => Key::Bytes(self.name.clone(), b),
            Value::Metacopy(id) => Key::Object(id, 0),
            Value::Redirect(id) => Key::Object(id, 1),
        }
    }
}

/// What the shared table is looked up by: an attribute of bytes (of the tree, `'a`), or an
/// object-derived one by its id (held by the attribute, `'s`) and which of the two it is.
enum Key<'s, 'a, ObjectID: FsVerityHashValue> {
    Bytes(Cow<'a, [u8]>, &'a [u8]),
    Object(&'s ObjectID, usize),
}

/// The first 8 bytes of an id: object ids are digests, so equal fingerprints almost always
/// mean equal ids, and sorting 8 bytes per file is far cheaper than sorting (or holding)
/// the ids. Where fingerprints meet, the ids are compared.
fn fingerprint<ObjectID: FsVerityHashValue>(id: &ObjectID) -> u64 {
    let mut word = [0u8; 8];
    let bytes = id.as_bytes();
    let n = bytes.len().min(8);
    word[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(word)
}

/// The xattrs of inode `idx`, sorted as they are written.
pub(crate) fn of<'a, V: TreeView>(tree: &Tree<'a, V>, idx: usize) -> Vec<XAttr<'a, V::ObjectID>> {
    let node: &Node = &tree.nodes[idx];
    let mut out = Vec::new();
    let mut push = |name: &'a [u8], value: Value<'a, V::ObjectID>| {
        out.push(XAttr {
            name: Cow::Borrowed(name),
            value,
        })
    };
    match tree.content(node) {
        Some(Content::External(id, _)) => {
            push(XATTR_OVERLAY_METACOPY, Value::Metacopy(id.clone()));
            push(XATTR_OVERLAY_REDIRECT, Value::Redirect(id));
        }
        Some(Content::ExternalNoVerity(id, _)) => {
            push(XATTR_OVERLAY_METACOPY, Value::Bytes(b""));
            push(XATTR_OVERLAY_REDIRECT, Value::Redirect(id));
        }
        Some(Content::Sparse(_)) => push(XATTR_OVERLAY_METACOPY, Value::Bytes(b"")),
        _ => {}
    }
    for (name, value) in &tree.stat(node).xattrs {
        let name = name.as_bytes();
        // The tree's own overlay xattrs must not steer the overlay mount: escape them.
        let name = match name.strip_prefix(XATTR_OVERLAY_PREFIX) {
            Some(rest) => Cow::Owned([XATTR_OVERLAY_ESCAPED_PREFIX, rest].concat()),
            None => Cow::Borrowed(name),
        };
        out.push(XAttr {
            name,
            value: Value::Bytes(value),
        });
    }
    let mut push = |name: &'a [u8], value: &'a [u8]| {
        out.push(XAttr {
            name: Cow::Borrowed(name),
            value: Value::Bytes(value),
        })
    };
    if node.escaped_whiteout() {
        push(XATTR_OVERLAY_WHITEOUT, b"");
        push(XATTR_USERXATTR_WHITEOUT, b"");
    }
    if node.holds_whiteouts() {
        push(XATTR_OVERLAY_WHITEOUTS, b"");
        push(XATTR_USERXATTR_WHITEOUTS, b"");
        push(XATTR_OVERLAY_OPAQUE, b"x");
        push(XATTR_USERXATTR_OPAQUE, b"x");
    }
    if idx == 0 {
        push(XATTR_OVERLAY_OPAQUE_ROOT, b"y");
    }
    out.sort_by(|a, b| a.cmp(b));
    out
}

const NOT_SHARED: u32 = u32::MAX;

/// One attribute of the shared table, 8 bytes (a large image's table has an entry or two
/// per repeated object): bytes of the tree by their place in [`Shared::repeated`], or an
/// object-derived value by its object's place in [`Shared::objects`] (metacopy 0, redirect
/// 1), so that each repeated id is held once, not in every value made from it.
#[derive(Debug, Clone, Copy)]
enum TableEntry {
    Bytes(u32),
    Object(u32, u8),
}

/// The shared xattr table and, for every attribute, its index in it.
#[derive(Debug)]
pub(crate) struct Shared<'a, ObjectID: FsVerityHashValue> {
    /// Count while counting, then the index in `table` or [`NOT_SHARED`].
    bytes: HashMap<(Cow<'a, [u8]>, &'a [u8]), u32>,
    /// The objects used by more than one inode, sorted by id, with the table index of their
    /// metacopy and redirect ([`NOT_SHARED`] for one used once). An object not in it is not
    /// shared.
    objects: Vec<(ObjectID, [u32; 2])>,
    /// In on-disk order.
    table: Vec<TableEntry>,
    /// The byte attributes used by more than one inode.
    repeated: Vec<(Cow<'a, [u8]>, &'a [u8])>,
    /// Some inode has a POSIX ACL (the image header says so).
    pub has_acl: bool,
}

impl<'a, ObjectID: FsVerityHashValue> Shared<'a, ObjectID> {
    pub fn count<V: TreeView<ObjectID = ObjectID>>(tree: &Tree<'a, V>) -> Result<Self, Error> {
        let mut this = Shared {
            bytes: HashMap::new(),
            objects: Vec::new(),
            table: Vec::new(),
            repeated: Vec::new(),
            has_acl: false,
        };
        // Object-derived values are counted by sorting fingerprints of their ids, and only
        // the repeated objects are kept: a map of every object of the image cost ~20 bytes a
        // file for the whole emit, where most objects are used once, and the ids themselves
        // need not be in memory at all (the view hands them out one at a time). One word per
        // external file, as there may be millions: the fingerprint's high 32 bits, the
        // inode (31 bits) and whether it has a metacopy with the digest. Fingerprints that
        // merely share 32 bits cost a comparison of the ids, no more.
        let mut prints: Vec<u64> = Vec::with_capacity(tree.externals);
        for idx in 0..tree.nodes.len() {
            let mut metacopy = false;
            let mut redirect = None;
            for x in of(tree, idx) {
                let (prefix, _) = x.split();
                this.has_acl |= prefix == XATTR_INDEX_POSIX_ACL_ACCESS
                    || prefix == XATTR_INDEX_POSIX_ACL_DEFAULT;
                match x.value {
                    Value::Bytes(b) => *this.bytes.entry((x.name, b)).or_default() += 1,
                    Value::Metacopy(_) => metacopy = true,
                    Value::Redirect(id) => redirect = Some(fingerprint(&id)),
                }
            }
            // Every object-derived value comes with a redirect (see `of`).
            if let Some(print) = redirect {
                let inode = u32::try_from(idx)
                    .ok()
                    .filter(|&i| i < 1 << 31)
                    .ok_or_else(|| Error::Unrepresentable("more than 2^31 inodes".into()))?;
                prints.push(
                    (print & !u64::from(u32::MAX)) | u64::from(inode) << 1 | u64::from(metacopy),
                );
            }
        }
        prints.sort_unstable();
        // Sized up front, like the table below: doubling these (tens of thousands of
        // repeated objects in a large image) left the old buffer resident beside the new
        // one at the write's peak.
        let runs = prints
            .chunk_by(|a, b| a >> 32 == b >> 32)
            .filter(|run| run.len() > 1)
            .count();
        this.objects.reserve_exact(runs);
        for run in prints.chunk_by(|a, b| a >> 32 == b >> 32) {
            if run.len() < 2 {
                continue;
            }
            let mut ids: Vec<(ObjectID, bool)> = run
                .iter()
                .filter_map(|&word| {
                    let (idx, metacopy) = ((word as u32 >> 1) as usize, word & 1 == 1);
                    match tree.content(&tree.nodes[idx])? {
                        Content::External(id, _) | Content::ExternalNoVerity(id, _) => {
                            Some((id, metacopy))
                        }
                        _ => None,
                    }
                })
                .collect();
            ids.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            for same in ids.chunk_by(|a, b| a.0.as_bytes() == b.0.as_bytes()) {
                let metacopies = same.iter().filter(|(_, m)| *m).count() as u32;
                let redirects = same.len() as u32;
                if redirects > 1 {
                    this.objects
                        .push((same[0].0.clone(), [metacopies, redirects]));
                }
            }
        }
        drop(prints);
        this.objects
            .sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));

        let entries = this.bytes.values().filter(|&&n| n > 1).count()
            + this
                .objects
                .iter()
                .flat_map(|(_, counts)| counts)
                .filter(|&&n| n > 1)
                .count();
        let mut shared: Vec<TableEntry> = Vec::with_capacity(entries);
        for ((name, value), count) in &this.bytes {
            if *count > 1 {
                shared.push(TableEntry::Bytes(this.repeated.len() as u32));
                this.repeated.push((name.clone(), value));
            }
        }
        for (at, (_, counts)) in this.objects.iter().enumerate() {
            for (which, &count) in (0u8..).zip(counts) {
                if count > 1 {
                    shared.push(TableEntry::Object(at as u32, which));
                }
            }
        }
        // No two entries are equal (distinct attributes, distinct objects), so an unstable
        // sort gives the one order, without a stable sort's scratch copy of the table.
        shared.sort_unstable_by(|a, b| this.xattr(b).cmp(&this.xattr(a)));
        this.bytes.values_mut().for_each(|v| *v = NOT_SHARED);
        this.objects
            .iter_mut()
            .for_each(|(_, v)| *v = [NOT_SHARED; 2]);
        for (i, x) in shared.iter().enumerate() {
            let i = i as u32;
            match *x {
                TableEntry::Bytes(at) => {
                    if let Some(key) = this.repeated.get(at as usize)
                        && let Some(v) = this.bytes.get_mut(key)
                    {
                        *v = i;
                    }
                }
                TableEntry::Object(at, which) => {
                    if let Some((_, v)) = this.objects.get_mut(at as usize) {
                        v[usize::from(which)] = i;
                    }
                }
            }
        }
        this.table = shared;
        Ok(this)
    }

    /// The attribute of a table entry.
    fn xattr(&self, entry: &TableEntry) -> XAttr<'a, ObjectID> {
        match *entry {
            TableEntry::Bytes(at) => {
                // `at` indexes `repeated` by construction: no empty attribute is reached.
                let (name, value) = self
                    .repeated
                    .get(at as usize)
                    .map_or((Cow::Borrowed(&b""[..]), &b""[..]), |(n, v)| {
                        (n.clone(), *v)
                    });
                XAttr {
                    name,
                    value: Value::Bytes(value),
                }
            }
            TableEntry::Object(at, which) => {
                // `at` indexes `objects` by construction; an empty id cannot be reached.
                let id = self
                    .objects
                    .get(at as usize)
                    .map_or(ObjectID::EMPTY, |(id, _)| id.clone());
                match which {
                    0 => XAttr {
                        name: Cow::Borrowed(XATTR_OVERLAY_METACOPY),
                        value: Value::Metacopy(id),
                    },
                    _ => XAttr {
                        name: Cow::Borrowed(XATTR_OVERLAY_REDIRECT),
                        value: Value::Redirect(id),
                    },
                }
            }
        }
    }

    /// The shared table's attributes, in on-disk order.
    pub fn table(&self) -> impl Iterator<Item = XAttr<'a, ObjectID>> + '_ {
        self.table.iter().map(|e| self.xattr(e))
    }

    /// The index of `x` in the shared table, if it is shared.
    pub fn index(&self, x: &XAttr<'a, ObjectID>) -> Option<u32> {
        let i = match x.key() {
            Key::Bytes(name, value) => *self.bytes.get(&(name, value))?,
            Key::Object(id, which) => {
                let at = self
                    .objects
                    .binary_search_by(|(o, _)| o.as_bytes().cmp(id.as_bytes()))
                    .ok()?;
                self.objects[at].1[which]
            }
        };
        (i != NOT_SHARED).then_some(i)
    }
}

/// How inode `idx`'s xattrs are laid out: shared references (in order), local entries.
#[derive(Debug)]
pub(crate) struct InodeXAttrs<'a, ObjectID: FsVerityHashValue> {
    pub shared: Vec<u32>,
    pub local: Vec<XAttr<'a, ObjectID>>,
    pub filter: u32,
}

impl<'a, ObjectID: FsVerityHashValue> InodeXAttrs<'a, ObjectID> {
    pub fn new<V: TreeView<ObjectID = ObjectID>>(
        tree: &Tree<'a, V>,
        shared: &Shared<'a, ObjectID>,
        idx: usize,
    ) -> Self {
        let mut this = InodeXAttrs {
            shared: Vec::new(),
            local: Vec::new(),
            filter: 0,
        };
        for x in of(tree, idx) {
            this.filter |= x.filter_bit();
            match shared.index(&x) {
                Some(i) => this.shared.push(i),
                None => this.local.push(x),
            }
        }
        this
    }

    /// Bytes after the inode header: 0 without xattrs.
    pub fn size(&self) -> usize {
        if self.filter == 0 {
            return 0;
        }
        IBODY_HEADER_SIZE
            + 4 * self.shared.len()
            + self.local.iter().map(XAttr::entry_size).sum::<usize>()
    }
}
