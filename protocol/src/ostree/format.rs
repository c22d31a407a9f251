//! The ostree objects a client walks, decoded: commits, dirtrees, dirmetas, and the file
//! header both sides need (archive objects start with one; clients hash one to check a
//! file object's checksum).
//!
//! Layouts are ostree's (documented in `docs/dev/composefs-ostree-0.9.4-notes.md`, §5);
//! integers inside these GVariants are big-endian. Checksums are SHA-256 of the exact
//! object bytes for metadata, and of [`file_checksum_header`] plus the content for files.

use sha2::{Digest, Sha256};

use super::gvariant::{self as gv, DecodeError, U32, U64, VAR1, VAR8};

/// A SHA-256 object checksum.
pub type Checksum = [u8; 32];

/// A decoded commit object `(a{sv}aya(say)sstayay)`. Only what a walk needs is decoded; the
/// metadata dictionary and related objects are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The parent commit, when there is one.
    pub parent: Option<Checksum>,
    /// One-line subject.
    pub subject: String,
    /// Seconds since the epoch.
    pub timestamp: u64,
    /// The root dirtree.
    pub root_tree: Checksum,
    /// The root dirmeta.
    pub root_meta: Checksum,
}

impl Commit {
    /// Decodes commit object bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const W: &str = "commit";
        let m = gv::tuple(W, bytes, &[VAR8, VAR1, VAR1, VAR1, VAR1, U64, VAR1, VAR1])?;
        let parent = match m[1] {
            [] => None,
            p => Some(gv::checksum("commit parent", p)?),
        };
        Ok(Self {
            parent,
            subject: gv::string("commit subject", m[3])?.to_owned(),
            timestamp: gv::be_u64("commit timestamp", m[5])?,
            root_tree: gv::checksum("commit root tree", m[6])?,
            root_meta: gv::checksum("commit root dirmeta", m[7])?,
        })
    }
}

/// A decoded dirtree object `(a(say)a(sayay))`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirTree {
    /// Files (regular files and symlinks): name and file object checksum.
    pub files: Vec<(String, Checksum)>,
    /// Subdirectories: name, dirtree checksum, dirmeta checksum.
    pub dirs: Vec<(String, Checksum, Checksum)>,
}

/// Refuses names ostree would never write into a dirtree: they would make a client create
/// `..`, a path with `/`, or an empty name.
fn entry_name<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    let name = gv::string(what, bytes)?;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(DecodeError {
            what,
            why: format!("{name:?} is not a directory entry name"),
        });
    }
    Ok(name)
}

impl DirTree {
    /// Decodes dirtree object bytes. Names must be UTF-8 (GVariant strings), not `.`, `..`
    /// or contain `/`, and each list must be sorted and free of duplicates as ostree writes it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m = gv::tuple("dirtree", bytes, &[VAR1, VAR1])?;
        let mut t = DirTree::default();
        for e in gv::array("dirtree files", m[0], 1)? {
            let f = gv::tuple("dirtree file entry", e, &[VAR1, VAR1])?;
            t.files.push((
                entry_name("dirtree file name", f[0])?.to_owned(),
                gv::checksum("dirtree file checksum", f[1])?,
            ));
        }
        for e in gv::array("dirtree dirs", m[1], 1)? {
            let d = gv::tuple("dirtree dir entry", e, &[VAR1, VAR1, VAR1])?;
            t.dirs.push((
                entry_name("dirtree dir name", d[0])?.to_owned(),
                gv::checksum("dirtree dir tree", d[1])?,
                gv::checksum("dirtree dir meta", d[2])?,
            ));
        }
        let sorted = |names: Vec<&str>| names.windows(2).all(|w| w[0] < w[1]);
        if !sorted(t.files.iter().map(|f| f.0.as_str()).collect())
            || !sorted(t.dirs.iter().map(|d| d.0.as_str()).collect())
        {
            return Err(DecodeError {
                what: "dirtree",
                why: "entries are not sorted by name, or a name repeats".into(),
            });
        }
        Ok(t)
    }
}

/// Owner, mode and xattrs: a dirmeta `(uuua(ayay))`, and also bare-user's
/// `user.ostreemeta` xattr, which has the same type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// `st_mode`, file type bits included.
    pub mode: u32,
    /// Extended attributes as ostree stores them: names end with a NUL.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// Decodes dirmeta (or `user.ostreemeta`) bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m = gv::tuple("dirmeta", bytes, &[U32, U32, U32, VAR1])?;
        Ok(Self {
            uid: gv::be_u32("dirmeta uid", m[0])?,
            gid: gv::be_u32("dirmeta gid", m[1])?,
            mode: gv::be_u32("dirmeta mode", m[2])?,
            xattrs: gv::read_xattrs("dirmeta xattrs", m[3])?,
        })
    }
}

/// The header of an archive-mode `.filez` object: `(tuuuusa(ayay))` after an 8-byte size
/// prefix, followed by the raw-deflate content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveHeader {
    /// Uncompressed content size.
    pub size: u64,
    /// Owner, mode and xattrs.
    pub meta: Meta,
    /// Symlink target; empty for other files.
    pub symlink_target: String,
    /// Where the compressed content starts in the object.
    pub content_offset: u64,
}

impl ArchiveHeader {
    /// Reads the header from the start of a `.filez` object. `prefix` must hold at least
    /// the header; more bytes are ignored.
    pub fn decode(prefix: &[u8]) -> Result<Self, DecodeError> {
        let len = Self::variant_len(prefix)?;
        let body = prefix.get(8..8 + len).ok_or_else(|| DecodeError {
            what: "archive file header",
            why: format!("{len} bytes announced, fewer read"),
        })?;
        let m = gv::tuple(
            "archive file header",
            body,
            &[U64, U32, U32, U32, U32, VAR1, VAR1],
        )?;
        Ok(Self {
            size: gv::be_u64("file size", m[0])?,
            meta: Meta {
                uid: gv::be_u32("file uid", m[1])?,
                gid: gv::be_u32("file gid", m[2])?,
                mode: gv::be_u32("file mode", m[3])?,
                xattrs: gv::read_xattrs("file xattrs", m[6])?,
            },
            symlink_target: gv::string("symlink target", m[5])?.to_owned(),
            content_offset: 8 + len as u64,
        })
    }

    /// The length of the header variant announced by the first 8 bytes.
    pub fn variant_len(prefix: &[u8]) -> Result<usize, DecodeError> {
        let size: [u8; 4] = prefix
            .get(..4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| DecodeError {
                what: "archive file header",
                why: "shorter than its 8-byte size prefix".into(),
            })?;
        Ok(u32::from_be_bytes(size) as usize)
    }
}

/// The bytes ostree hashes before a file's content: an 8-byte prefix (big-endian length,
/// 4 zero bytes) and `(uuuusa(ayay))` of uid, gid, mode, rdev 0, symlink target, xattrs
/// (names with their trailing NUL, sorted as ostree sorts them).
pub fn file_checksum_header(meta: &Meta, symlink_target: &str) -> Vec<u8> {
    sized_file_variant(None, meta, symlink_target)
}

/// An archive-mode file header: the 8-byte prefix and `(tuuuusa(ayay))`, the checksum
/// header's fields preceded by the content size. composefs-ostree stores file objects in
/// its commit splitstreams with this header.
pub fn archive_file_header(size: u64, meta: &Meta, symlink_target: &str) -> Vec<u8> {
    sized_file_variant(Some(size), meta, symlink_target)
}

fn sized_file_variant(size: Option<u64>, meta: &Meta, symlink_target: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    if let Some(size) = size {
        v.extend_from_slice(&size.to_be_bytes());
    }
    for x in [meta.uid, meta.gid, meta.mode, 0] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(symlink_target.as_bytes());
    v.push(0);
    let target_end = v.len();
    gv::write_xattrs(&mut v, &meta.xattrs);
    // One framing offset: the end of the target string, the only non-last variable member.
    let body = v.len();
    let mut w = 1;
    while gv_width(body + w) != w {
        w *= 2;
    }
    v.extend_from_slice(&(target_end as u64).to_le_bytes()[..w]);
    let mut out = Vec::with_capacity(8 + v.len());
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&v);
    out
}

fn gv_width(size: usize) -> usize {
    match size {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

/// A running ostree file checksum: feed the content, then [`FileHasher::finish`].
#[derive(Debug, Clone)]
pub struct FileHasher(Sha256);

impl FileHasher {
    /// Starts a checksum for a file with this metadata.
    pub fn new(meta: &Meta, symlink_target: &str) -> Self {
        let mut h = Sha256::new();
        h.update(file_checksum_header(meta, symlink_target));
        Self(h)
    }

    /// Adds content bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum.
    pub fn finish(self) -> Checksum {
        self.0.finalize().into()
    }
}

/// SHA-256 of a metadata object's bytes, which is its name.
pub fn metadata_checksum(bytes: &[u8]) -> Checksum {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ostreemeta_as_ostree_wrote_it() {
        // user.ostreemeta of a 0644 root-owned file with user.foo=bar (ostree 2022.7).
        let b = b"\0\0\0\0\0\0\0\0\0\0\x81\xa4user.foo\0bar\x09\x0d";
        let m = Meta::decode(b).unwrap();
        assert_eq!((m.uid, m.gid, m.mode), (0, 0, 0o100644));
        assert_eq!(m.xattrs, vec![(b"user.foo\0".to_vec(), b"bar".to_vec())]);
    }

    #[test]
    fn bad_entry_names_are_refused() {
        for bad in [&b"..\0"[..], b"a/b\0", b"\0"] {
            assert!(entry_name("n", bad).is_err(), "{bad:?}");
        }
        assert_eq!(entry_name("n", b"ok\0").unwrap(), "ok");
    }

    #[test]
    fn file_checksums_equal_ostree_s() {
        // Checksums `ostree commit` (2022.7) gave these files.
        let hash = |mode, xattrs: Vec<(Vec<u8>, Vec<u8>)>, target: &str, content: &[u8]| {
            let meta = Meta {
                uid: 0,
                gid: 0,
                mode,
                xattrs,
            };
            let mut h = FileHasher::new(&meta, target);
            h.update(content);
            hex::encode(h.finish())
        };
        let foo = vec![(b"user.foo\0".to_vec(), b"bar".to_vec())];
        assert_eq!(
            hash(0o100644, foo, "", b"hello\n"),
            "28af666cd8036303fcab1a13f2ef7f9c9e92b6a392206017d50b932c8ff4daf9"
        );
        assert_eq!(
            hash(0o100644, vec![], "", b""),
            "cc700d46f407c6c5ab2d5dde474366a928b7398277e61162e7f8ec06f469f07e"
        );
        assert_eq!(
            hash(0o120777, vec![], "a", b""),
            "438802d990f25270d36f902bc9ce9d0737b88f9ae0b41ed59ec9e47c28523e0a"
        );
    }

    #[test]
    fn archive_headers_round_trip() {
        let meta = Meta {
            uid: 1,
            gid: 2,
            mode: 0o100600,
            xattrs: vec![(b"user.x\0".to_vec(), b"y".to_vec())],
        };
        let h = archive_file_header(1234, &meta, "");
        let d = ArchiveHeader::decode(&h).unwrap();
        assert_eq!(
            (d.size, &d.meta, d.content_offset),
            (1234, &meta, h.len() as u64)
        );
    }

    /// Objects from disk may be anything: mutated and truncated versions of valid objects,
    /// and random bytes, decode to an error or a value, never a panic.
    #[test]
    fn garbage_never_panics() {
        let meta = Meta {
            uid: 1,
            gid: 2,
            mode: 0o100644,
            xattrs: vec![
                (b"user.a\0".to_vec(), b"1".to_vec()),
                (b"user.b\0".to_vec(), vec![0; 300]),
            ],
        };
        let header = archive_file_header(99, &meta, "target");
        let mut dirmeta = Vec::new();
        for x in [1u32, 2, 0o40755] {
            dirmeta.extend_from_slice(&x.to_be_bytes());
        }
        gv::write_xattrs(&mut dirmeta, &meta.xattrs);
        let seeds: [&[u8]; 3] = [&header, &dirmeta, b"a\0\x01\x02\x03\x04\x05\x06\x07\x08"];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let seed = seeds[round % seeds.len()];
            let mut b = seed.to_vec();
            match next() % 3 {
                0 => b.truncate((next() as usize) % (seed.len() + 1)),
                1 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % b.len();
                        b[i] = next() as u8;
                    }
                }
                _ => b = (0..next() % 64).map(|_| next() as u8).collect(),
            }
            let _ = Commit::decode(&b);
            let _ = DirTree::decode(&b);
            let _ = Meta::decode(&b);
            let _ = ArchiveHeader::decode(&b);
            let _ = gv::read_xattrs("x", &b);
        }
    }

    #[test]
    fn empty_dirtree() {
        // Two empty arrays: no bytes for either, one framing offset (0) for the first.
        let t = DirTree::decode(b"\0").unwrap();
        assert!(t.files.is_empty() && t.dirs.is_empty());
    }
}
