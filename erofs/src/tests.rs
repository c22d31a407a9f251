//! Byte equality with composefs' writer, on trees built to hit every layout rule.

use std::ffi::OsStr;

use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use composefs::fsverity::Sha512HashValue;
use composefs::tree::{Directory, FileSystem, Inode, LeafContent, RegularFile, Stat};
use zerocopy::FromBytes;

type Fs = FileSystem<Sha512HashValue>;

fn stat(mode: u32, uid: u32, mtime: i64, xattrs: &[(&str, &[u8])]) -> Stat {
    Stat {
        st_mode: mode,
        st_uid: uid,
        st_gid: uid,
        st_mtim_sec: mtime,
        st_mtim_nsec: 0,
        xattrs: xattrs
            .iter()
            .map(|(k, v)| (Box::from(OsStr::new(k)), Box::from(*v)))
            .collect(),
    }
}

fn id(n: u8) -> Sha512HashValue {
    Sha512HashValue::read_from_bytes(&[n; 64][..]).unwrap()
}

fn dir<'f>(fs: &'f mut Fs, path: &str) -> &'f mut Directory<Sha512HashValue> {
    if path.is_empty() {
        &mut fs.root
    } else {
        fs.root.get_directory_mut(OsStr::new(path)).unwrap()
    }
}

fn mkdir(fs: &mut Fs, parent: &str, name: &str, st: Stat) {
    dir(fs, parent).insert(
        OsStr::new(name),
        Inode::Directory(Box::new(Directory::new(st))),
    );
}

fn add(
    fs: &mut Fs,
    parent: &str,
    name: &str,
    st: Stat,
    content: LeafContent<Sha512HashValue>,
) -> composefs::generic_tree::LeafId {
    let leaf = fs.push_leaf(st, content);
    dir(fs, parent).insert(OsStr::new(name), Inode::leaf(leaf));
    leaf
}

fn link(fs: &mut Fs, parent: &str, name: &str, leaf: composefs::generic_tree::LeafId) {
    dir(fs, parent).insert(OsStr::new(name), Inode::leaf(leaf));
}

fn file(data: &[u8]) -> LeafContent<Sha512HashValue> {
    LeafContent::Regular(RegularFile::Inline(data.into()))
}

fn ext(n: u8, size: u64) -> LeafContent<Sha512HashValue> {
    LeafContent::Regular(RegularFile::External(id(n), size))
}

#[track_caller]
fn assert_same(fs: &Fs) {
    let theirs = mkfs_erofs_versioned(
        &ValidatedFileSystem::new(fs.clone()).unwrap(),
        FormatVersion::V1,
    );
    let mut ours = Vec::new();
    let len = crate::write_image(fs, FormatVersion::V1, &mut ours).unwrap();
    assert_eq!(len, ours.len() as u64);
    if let Some(at) = ours.iter().zip(theirs.iter()).position(|(a, b)| a != b) {
        panic!(
            "images differ first at byte {at} (block {}, offset {}); lengths {} and {}",
            at / 4096,
            at % 4096,
            ours.len(),
            theirs.len()
        );
    }
    assert_eq!(ours.len(), theirs.len(), "same prefix, different lengths");
}

#[test]
fn an_empty_root() {
    assert_same(&Fs::new(stat(0o755, 0, 100, &[])));
}

#[test]
fn every_kind_of_inode_and_xattr() {
    let label: &[u8] = b"system_u:object_r:usr_t:s0";
    let mut fs = Fs::new(stat(0o755, 0, 100, &[("security.selinux", label)]));
    mkdir(
        &mut fs,
        "",
        "usr",
        stat(0o755, 0, 200, &[("security.selinux", label)]),
    );
    mkdir(&mut fs, "usr", "bin", stat(0o755, 0, 100, &[]));
    mkdir(
        &mut fs,
        "",
        "etc",
        stat(
            0o700,
            70000,
            300,
            &[("user.a", b"1"), ("trusted.overlay.opaque", b"y")],
        ),
    );
    for (i, size) in [
        0usize, 1, 64, 2048, 2049, 4095, 4096, 4097, 6143, 6145, 12288, 13000,
    ]
    .iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..*size).map(|j| (j * 7 + i) as u8).collect();
        add(
            &mut fs,
            "etc",
            &format!("inline-{size}"),
            stat(0o644, 0, 100 + i as i64, &[]),
            file(&data),
        );
    }
    for (i, size) in [
        0u64,
        1,
        4096,
        4097,
        1 << 20,
        (1 << 20) + 1,
        5 << 30,
        1 << 44,
        u64::from(u32::MAX) + 1,
    ]
    .iter()
    .enumerate()
    {
        add(
            &mut fs,
            "usr/bin",
            &format!("ext-{size}"),
            stat(0o755, 0, 100, &[("security.selinux", label)]),
            ext(i as u8, *size),
        );
    }
    // the same object twice: metacopy and redirect become shared
    add(&mut fs, "usr", "dup-a", stat(0o644, 0, 100, &[]), ext(1, 1));
    add(&mut fs, "usr", "dup-b", stat(0o644, 0, 100, &[]), ext(1, 1));
    add(
        &mut fs,
        "usr",
        "noverity",
        stat(0o644, 0, 100, &[]),
        LeafContent::Regular(RegularFile::ExternalNoVerity(id(9), 10)),
    );
    add(
        &mut fs,
        "usr",
        "sparse",
        stat(0o644, 0, 100, &[]),
        LeafContent::Regular(RegularFile::Sparse(1 << 30)),
    );
    add(
        &mut fs,
        "",
        "null",
        stat(0o666, 0, 100, &[]),
        LeafContent::CharacterDevice(0x103),
    );
    add(
        &mut fs,
        "",
        "sda",
        stat(0o660, 6, 100, &[]),
        LeafContent::BlockDevice(0x800),
    );
    add(
        &mut fs,
        "",
        "fifo",
        stat(0o600, 0, 100, &[]),
        LeafContent::Fifo,
    );
    add(
        &mut fs,
        "",
        "sock",
        stat(0o600, 0, 100, &[]),
        LeafContent::Socket,
    );
    add(
        &mut fs,
        "",
        "-first",
        stat(0o644, 0, 100, &[]),
        file(b"sorts before the dot"),
    );
    for len in [1usize, 100, 1000, 3900, 4000, 4050, 4095] {
        let target = "t".repeat(len);
        add(
            &mut fs,
            "usr",
            &format!("link-{len}"),
            stat(0o777, 0, 100, &[]),
            LeafContent::Symlink(OsStr::new(&target).into()),
        );
    }
    add(
        &mut fs,
        "etc",
        "acl",
        stat(
            0o644,
            0,
            100,
            &[
                ("system.posix_acl_access", b"\x02\0\0\0"),
                ("lustre.x", b"l"),
                ("user.big", &[7u8; 3000]),
            ],
        ),
        file(b"x"),
    );
    // whiteouts: escaped in a subdirectory, a stub look-alike kept at the root
    add(
        &mut fs,
        "etc",
        "gone",
        stat(0o644, 0, 100, &[]),
        LeafContent::CharacterDevice(0),
    );
    add(
        &mut fs,
        "",
        "0a",
        stat(0o644, 0, 100, &[("security.selinux", label)]),
        LeafContent::CharacterDevice(0),
    );
    add(
        &mut fs,
        "",
        "0b",
        stat(0o600, 0, 100, &[]),
        LeafContent::CharacterDevice(0),
    );
    add(
        &mut fs,
        "",
        "ff",
        stat(0o644, 0, 100, &[]),
        file(b"not a whiteout"),
    );
    assert_same(&fs);
}

#[test]
fn hardlinks_whose_first_link_is_deeper_than_another() {
    let mut fs = Fs::new(stat(0o755, 0, 100, &[]));
    mkdir(&mut fs, "", "a", stat(0o755, 0, 100, &[]));
    mkdir(&mut fs, "a", "deep", stat(0o755, 0, 100, &[]));
    mkdir(&mut fs, "", "b", stat(0o755, 0, 100, &[]));
    let x = add(
        &mut fs,
        "a/deep",
        "x",
        stat(0o644, 0, 100, &[]),
        ext(3, 100),
    );
    link(&mut fs, "b", "y", x);
    link(&mut fs, "", "z", x);
    link(&mut fs, "a/deep", "x2", x);
    let s = add(&mut fs, "b", "s", stat(0o644, 0, 100, &[]), file(b"small"));
    link(&mut fs, "a", "s", s);
    assert_same(&fs);
}

#[test]
fn directories_spanning_blocks() {
    let mut fs = Fs::new(stat(0o755, 0, 100, &[]));
    for (d, count, len) in [
        ("few", 3usize, 8usize),
        ("many", 700, 20),
        ("long", 40, 200),
        ("edge", 150, 15),
    ] {
        mkdir(&mut fs, "", d, stat(0o755, 0, 100, &[]));
        for i in 0..count {
            // Some names sort before `.` and `..`, which are listed by name like the rest.
            let lead = ["", "-", " ", "!"][i % 4];
            let name = format!("{lead}{i:0len$}");
            add(
                &mut fs,
                d,
                &name,
                stat(0o644, 0, 100, &[]),
                ext((i % 5) as u8, 10),
            );
        }
    }
    // inline tails of exactly half a block and one byte more
    for (d, last) in [("tail2048", 31usize), ("tail2049", 32)] {
        mkdir(&mut fs, "", d, stat(0o755, 0, 100, &[]));
        for i in 0..46 {
            add(
                &mut fs,
                d,
                &format!("{i:031}"),
                stat(0o644, 0, 100, &[]),
                file(b"x"),
            );
        }
        add(
            &mut fs,
            d,
            &format!("{:0last$}", 99),
            stat(0o644, 0, 100, &[]),
            file(b"x"),
        );
    }
    add(&mut fs, "", "+root", stat(0o644, 0, 100, &[]), file(b"y"));
    assert_same(&fs);
}

/// xorshift: enough randomness for layouts, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_trees() {
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut fs = Fs::new(stat(0o755, 0, 1000, &[]));
        let mut dirs = vec![String::new()];
        let mut leaves = Vec::new();
        let n = 20 + rng.below(300);
        for i in 0..n {
            let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
            let name = format!("{}{i}", "n".repeat(rng.below(60) as usize));
            let mtime = 1000 + rng.below(3) as i64;
            let xattrs: Vec<(String, Vec<u8>)> = (0..rng.below(4))
                .map(|k| {
                    let prefix = ["user.", "trusted.", "security.", "trusted.overlay."]
                        [rng.below(4) as usize];
                    (
                        format!("{prefix}k{}", rng.below(3) + k),
                        vec![b'v'; rng.below(300) as usize],
                    )
                })
                .collect();
            let xr: Vec<(&str, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let st = stat(
                0o644,
                if rng.below(10) == 0 { 100_000 } else { 0 },
                mtime,
                &xr,
            );
            match rng.below(8) {
                0 => {
                    mkdir(&mut fs, &parent, &name, st);
                    dirs.push(if parent.is_empty() {
                        name
                    } else {
                        format!("{parent}/{name}")
                    });
                }
                1 if !leaves.is_empty() => {
                    let l = leaves[rng.below(leaves.len() as u64) as usize];
                    link(&mut fs, &parent, &name, l);
                }
                2 => {
                    let len = rng.below(4096) as usize + 1;
                    leaves.push(add(
                        &mut fs,
                        &parent,
                        &name,
                        st,
                        LeafContent::Symlink(OsStr::new(&"s".repeat(len)).into()),
                    ));
                }
                3 => {
                    let size = rng.below(10_000) as usize;
                    leaves.push(add(&mut fs, &parent, &name, st, file(&vec![1u8; size])));
                }
                4 => {
                    add(&mut fs, &parent, &name, st, LeafContent::CharacterDevice(0));
                }
                _ => {
                    let size = rng.next() >> rng.below(64);
                    // Half of them among ids that differ only in their last byte: the
                    // writer finds repeated objects by a prefix of the id first.
                    let content = match rng.below(2) {
                        0 => ext(rng.below(20) as u8, size),
                        _ => {
                            let mut bytes = [0xab; 64];
                            bytes[63] = rng.below(5) as u8;
                            let id = Sha512HashValue::read_from_bytes(&bytes[..]).unwrap();
                            LeafContent::Regular(RegularFile::External(id, size))
                        }
                    };
                    leaves.push(add(&mut fs, &parent, &name, st, content));
                }
            }
        }
        let r = std::panic::catch_unwind(|| assert_same(&fs));
        assert!(r.is_ok(), "seed {seed} differs");
    }
}

#[test]
fn hardlinked_whiteouts_and_other_versions_are_refused() {
    let mut fs = Fs::new(stat(0o755, 0, 100, &[]));
    let w = add(
        &mut fs,
        "",
        "w",
        stat(0o644, 0, 100, &[]),
        LeafContent::CharacterDevice(0),
    );
    assert!(matches!(
        crate::write_image(&fs, FormatVersion::V2, Vec::new()),
        Err(crate::Error::UnsupportedVersion(FormatVersion::V2))
    ));
    link(&mut fs, "", "w2", w);
    assert!(matches!(
        crate::write_image(&fs, FormatVersion::V1, Vec::new()),
        Err(crate::Error::InvalidTree(_))
    ));
}

#[test]
fn device_numbers_over_32_bits_are_an_error_not_a_truncation() {
    let mut fs = Fs::new(stat(0o755, 0, 100, &[]));
    add(
        &mut fs,
        "",
        "dev",
        stat(0o600, 0, 100, &[]),
        LeafContent::CharacterDevice(1 << 40),
    );
    assert!(matches!(
        crate::write_image(&fs, FormatVersion::V1, Vec::new()),
        Err(crate::Error::Unrepresentable(_))
    ));
}

/// A view need not be tidy: leaves no entry names are left out (composefs' tree must drop
/// them first, as `write_image` refuses them), and an entry naming a leaf that does not
/// exist is an invalid tree, not a panic.
#[test]
fn a_view_skips_orphans_and_refuses_dangling_leaves() {
    let mut fs = Fs::new(stat(0o755, 0, 1000, &[]));
    let _orphan = fs.push_leaf(stat(0o644, 0, 1000, &[]), file(b"nobody names me"));
    add(&mut fs, "", "kept", stat(0o644, 0, 1000, &[]), ext(1, 5000));
    assert!(matches!(
        crate::write_image(&fs, FormatVersion::V1, Vec::new()),
        Err(crate::Error::InvalidTree(_))
    ));
    let mut from_view = Vec::new();
    crate::write_view(&fs, FormatVersion::V1, &mut from_view).unwrap();
    let mut tidy = fs.clone();
    tidy.compact();
    let mut expected = Vec::new();
    crate::write_image(&tidy, FormatVersion::V1, &mut expected).unwrap();
    assert!(from_view == expected, "orphan left out");

    link(&mut fs, "", "dangling", composefs::generic_tree::LeafId(7));
    let e = crate::write_view(&fs, FormatVersion::V1, Vec::new()).unwrap_err();
    assert!(
        matches!(&e, crate::Error::InvalidTree(m) if m.contains("dangling leaf 7")),
        "{e}"
    );
}

/// A view that lists a directory differently once the image is laid out: dropping an entry or
/// naming another file where the layout put one. The writer must notice and fail, not write an
/// image whose entries point at the wrong inodes.
#[test]
fn a_view_that_changes_its_listing_after_the_layout_is_an_error() {
    use std::cell::Cell;

    use crate::view::{Child, Content, DirRef, TreeView};

    struct Fickle<'f> {
        fs: &'f Fs,
        changed: Cell<bool>,
        drop_last: bool,
    }

    impl TreeView for Fickle<'_> {
        type ObjectID = Sha512HashValue;
        type Dir<'a>
            = DirRef<'a, Sha512HashValue>
        where
            Self: 'a;
        fn root(&self) -> Self::Dir<'_> {
            self.fs.root()
        }
        fn dir_stat<'a>(&'a self, dir: Self::Dir<'a>) -> &'a Stat {
            self.fs.dir_stat(dir)
        }
        fn entries<'a>(
            &'a self,
            dir: Self::Dir<'a>,
        ) -> impl Iterator<Item = (&'a [u8], Child<Self::Dir<'a>>)> + 'a {
            let mut entries: Vec<_> = self.fs.entries(dir).collect();
            if self.changed.get() && dir == self.fs.root() {
                if self.drop_last {
                    entries.pop();
                } else {
                    for (_, child) in &mut entries {
                        if let Child::Leaf(id) = child {
                            *id ^= 1;
                        }
                    }
                }
            }
            entries.into_iter()
        }
        fn leaf_count(&self) -> usize {
            self.fs.leaf_count()
        }
        fn leaf_stat(&self, leaf: usize) -> &Stat {
            self.fs.leaf_stat(leaf)
        }
        fn leaf_content(&self, leaf: usize) -> Content<'_, Sha512HashValue> {
            self.fs.leaf_content(leaf)
        }
        fn laid_out(&self) {
            self.changed.set(true);
        }
    }

    let mut fs = Fs::new(stat(0o755, 0, 1000, &[]));
    add(&mut fs, "", "a", stat(0o644, 0, 1000, &[]), file(b"a"));
    add(&mut fs, "", "b", stat(0o644, 0, 1000, &[]), ext(1, 5000));
    for drop_last in [true, false] {
        let view = Fickle {
            fs: &fs,
            changed: Cell::new(false),
            drop_last,
        };
        let e = crate::write_view(&view, FormatVersion::V1, Vec::new()).unwrap_err();
        assert!(
            matches!(&e, crate::Error::Internal(m) if m.contains("listed")),
            "drop_last {drop_last}: {e}"
        );
    }
    // Left alone, the tree writes composefs' bytes.
    assert_same(&fs);
}
