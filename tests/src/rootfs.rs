//! A root file system that exercises every tar feature.
//!
//! [`write_feature_rootfs`] writes it (as root: it needs `mknod`, `chown`
//! and `security.*` xattrs), [`tar_rootfs`] packs it with GNU tar the way
//! the images are built, and [`FeatureManifest`] tells tests where each
//! feature lives. The layout is fixed: [`FeatureManifest::standard`] returns
//! the same manifest without touching the disk.
//!
//! All manifest paths are relative to the root file system, without a
//! leading `./` (a tar member is named `./` + path). Names that are not
//! UTF-8 are stored as raw bytes in [`PathBuf`]s; use
//! [`FeatureManifest::bytes`] to get them as `Vec<u8>`.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use rustix::fs::{CWD, FileType, Mode, XattrFlags};

use crate::run_command;

/// `security.capability` value for `cap_net_raw+ep`, as `setcap
/// cap_net_raw+ep` writes it: a `vfs_cap_data` revision 2 (magic
/// `0x02000000 | VFS_CAP_FLAGS_EFFECTIVE`, permitted = `1 << CAP_NET_RAW
/// (13)`, inheritable = 0, both 32-bit words little-endian).
pub const NET_RAW_CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc
    0x00, 0x20, 0x00, 0x00, // permitted[0]
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

/// Size of the pseudo-random big file: 50 MiB.
pub const BIG_FILE_SIZE: u64 = 50 * 1024 * 1024;
/// Seed of the big file's content (see [`XorShift`]).
pub const BIG_FILE_SEED: u64 = 0x00c5_7012_7e57_f11e;
/// Apparent size of the sparse file: 32 MiB.
pub const SPARSE_FILE_SIZE: u64 = 32 * 1024 * 1024;
/// Offsets of the two 4 KiB data blocks of the sparse file: 1 MiB and the
/// last 4 KiB. Everything else reads as zeros.
pub const SPARSE_DATA_OFFSETS: [u64; 2] = [1024 * 1024, SPARSE_FILE_SIZE - 4096];
/// Size of each data block of the sparse file.
pub const SPARSE_BLOCK: usize = 4096;
/// Seed of the sparse file's data blocks (block `i` uses seed + `i`).
pub const SPARSE_SEED: u64 = 0x5ba2_5e00;
/// Number of files in [`FeatureManifest::many_files_dir`].
pub const MANY_FILES: usize = 1000;

/// Where each feature of the feature root file system lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureManifest {
    /// Ordinary text files (in `etc/` and `usr/bin/`).
    pub text_files: Vec<PathBuf>,
    /// An executable shell script (0755).
    pub script: PathBuf,
    /// A setuid binary-like file, 04755 root:root.
    pub setuid: PathBuf,
    /// A setgid binary-like file, 02755 root:42.
    pub setgid: PathBuf,
    /// A directory owned by [`Self::other_owner`], mode 0750.
    pub owned_dir: PathBuf,
    /// A file owned by [`Self::other_owner`], mode 0640, in `owned_dir`.
    pub owned_file: PathBuf,
    /// The uid:gid of `owned_dir` / `owned_file`: 1234:5678.
    pub other_owner: (u32, u32),
    /// Hard links to one inode: the first two in one directory, the third
    /// in another directory.
    pub hardlinks: Vec<PathBuf>,
    /// A relative symlink and its target.
    pub symlink_relative: (PathBuf, PathBuf),
    /// An absolute symlink and its target.
    pub symlink_absolute: (PathBuf, PathBuf),
    /// A dangling (relative) symlink and its target.
    pub symlink_dangling: (PathBuf, PathBuf),
    /// A fifo (0644).
    pub fifo: PathBuf,
    /// A character device 1:3 (0666).
    pub char_device: PathBuf,
    /// A block device 7:0 (0660).
    pub block_device: PathBuf,
    /// An empty directory.
    pub empty_dir: PathBuf,
    /// An empty regular file.
    pub empty_file: PathBuf,
    /// A file carrying [`Self::user_xattrs`].
    pub user_xattr_file: PathBuf,
    /// `user.*` xattrs of `user_xattr_file` (names and values).
    pub user_xattrs: Vec<(String, Vec<u8>)>,
    /// A `user.*` xattr with an empty value, also on `user_xattr_file`. GNU
    /// tar stores it (an empty `SCHILY.xattr.` PAX record, kept in
    /// tar-split), but `podman import` drops it: it is absent from the
    /// layer's diff directory.
    pub empty_user_xattr: String,
    /// A directory carrying [`Self::user_xattrs_dir`].
    pub user_xattr_dir: PathBuf,
    /// `user.*` xattrs of `user_xattr_dir`.
    pub user_xattrs_dir: Vec<(String, Vec<u8>)>,
    /// A file (0755) with `security.capability` = [`NET_RAW_CAPABILITY`].
    pub security_xattr_file: PathBuf,
    /// A file whose own name is longer than 100 bytes.
    pub long_name: PathBuf,
    /// A path longer than 100 bytes whose components are all shorter than
    /// 100 bytes.
    pub long_path: PathBuf,
    /// A path longer than 255 bytes in total.
    pub very_long_path: PathBuf,
    /// Files whose names are not UTF-8: `caf\xe9.txt` and `\xff\xfe`.
    pub non_utf8_names: Vec<PathBuf>,
    /// A 0700 directory owned by 1000:1000.
    pub private_dir: PathBuf,
    /// A 0600 file owned by 1000:1000 inside `private_dir`.
    pub private_file: PathBuf,
    /// A 0644 file owned by 1000:1000 inside `private_dir`.
    pub private_dir_public_file: PathBuf,
    /// A [`BIG_FILE_SIZE`] file of [`XorShift`] output seeded with
    /// [`BIG_FILE_SEED`].
    pub big_file: PathBuf,
    /// A sparse file, see [`SPARSE_FILE_SIZE`] and [`SPARSE_DATA_OFFSETS`].
    /// It is stored expanded in tar (no `--sparse`).
    pub sparse_file: PathBuf,
    /// A directory holding [`MANY_FILES`] small files.
    pub many_files_dir: PathBuf,
    /// A directory with content (`old-a`, `old-b`, `sub/old-c`) that the
    /// commit image deletes and recreates (an opaque directory there).
    pub replaced_dir: PathBuf,
    /// A directory with content that the commit image deletes.
    pub removed_dir: PathBuf,
}

impl FeatureManifest {
    /// The manifest of the feature root file system (pure; what
    /// [`write_feature_rootfs`] creates).
    pub fn standard() -> Self {
        let p = PathBuf::from;
        let long_path = format!("names/deep/{}/{}/file.txt", "a".repeat(60), "b".repeat(60));
        let very_long_path = format!(
            "names/very/{}/{}/{}/{}",
            "c".repeat(90),
            "d".repeat(90),
            "e".repeat(90),
            "f".repeat(80)
        );
        FeatureManifest {
            text_files: vec![
                p("etc/hostname"),
                p("etc/os-release"),
                p("etc/passwd"),
                p("etc/group"),
                p("usr/bin/README"),
            ],
            script: p("usr/bin/hello.sh"),
            setuid: p("usr/bin/suid-tool"),
            setgid: p("usr/bin/sgid-tool"),
            owned_dir: p("srv/owned"),
            owned_file: p("srv/owned/data.txt"),
            other_owner: (1234, 5678),
            hardlinks: vec![
                p("usr/share/links/original"),
                p("usr/share/links/second"),
                p("opt/other-links/third"),
            ],
            symlink_relative: (p("usr/lib/rel-link"), p("../bin/hello.sh")),
            symlink_absolute: (p("usr/lib/abs-link"), p("/etc/os-release")),
            symlink_dangling: (p("usr/lib/dangling"), p("../does/not/exist")),
            fifo: p("var/fifo"),
            char_device: p("dev/char-1-3"),
            block_device: p("dev/block-7-0"),
            empty_dir: p("var/empty"),
            empty_file: p("var/empty-file"),
            user_xattr_file: p("xattr/file"),
            user_xattrs: vec![
                ("user.cstor.text".into(), b"hello".to_vec()),
                ("user.cstor.binary".into(), vec![0, 1, 0xff, 0, b'z']),
            ],
            empty_user_xattr: "user.cstor.empty".into(),
            user_xattr_dir: p("xattr/dir"),
            user_xattrs_dir: vec![("user.cstor.dir".into(), b"dir-value".to_vec())],
            security_xattr_file: p("usr/bin/cap-tool"),
            long_name: p(&format!("names/{}", "n".repeat(150))),
            long_path: p(&long_path),
            very_long_path: p(&very_long_path),
            non_utf8_names: vec![
                PathBuf::from(OsString::from_vec(b"names/caf\xe9.txt".to_vec())),
                PathBuf::from(OsString::from_vec(b"names/\xff\xfe".to_vec())),
            ],
            private_dir: p("home/user"),
            private_file: p("home/user/secret.txt"),
            private_dir_public_file: p("home/user/public.txt"),
            big_file: p("opt/big/random.bin"),
            sparse_file: p("opt/big/sparse.img"),
            many_files_dir: p("usr/share/many"),
            replaced_dir: p("srv/replaced"),
            removed_dir: p("opt/removed-dir"),
        }
    }

    /// The raw bytes of a manifest path.
    pub fn bytes(path: &Path) -> Vec<u8> {
        path.as_os_str().as_bytes().to_vec()
    }

    /// The name of the `i`-th file in [`Self::many_files_dir`].
    pub fn many_file(&self, i: usize) -> PathBuf {
        self.many_files_dir.join(format!("file-{i:04}"))
    }

    /// The expected content of [`Self::big_file`].
    pub fn big_file_content() -> Vec<u8> {
        let mut buf = vec![0u8; BIG_FILE_SIZE as usize];
        XorShift::new(BIG_FILE_SEED).fill(&mut buf);
        buf
    }

    /// The expected content of [`Self::sparse_file`] (32 MiB, mostly zeros).
    pub fn sparse_file_content() -> Vec<u8> {
        let mut buf = vec![0u8; SPARSE_FILE_SIZE as usize];
        for (i, off) in SPARSE_DATA_OFFSETS.iter().enumerate() {
            let off = *off as usize;
            XorShift::new(SPARSE_SEED + i as u64).fill(&mut buf[off..off + SPARSE_BLOCK]);
        }
        buf
    }
}

/// A tiny deterministic pseudo-random generator (xorshift64*), enough for
/// incompressible test content.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` (0 is replaced by a fixed constant).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes (8 at a time, little-endian; a
    /// tail shorter than 8 bytes consumes one more value). Filling in pieces
    /// whose lengths are multiples of 8 gives the same stream as one call.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&last[..n]);
        }
    }
}

/// Writes `content` to the new file `path` and sets owner and mode (in that
/// order, so `chown` does not clear setuid bits).
fn write_owned(
    root: &Path,
    rel: &Path,
    content: &[u8],
    mode: u32,
    owner: (u32, u32),
) -> Result<PathBuf> {
    let path = root.join(rel);
    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    own(&path, mode, owner)?;
    Ok(path)
}

/// Creates the directory `path` (and missing parents) with owner and mode.
fn mkdir_owned(root: &Path, rel: &Path, mode: u32, owner: (u32, u32)) -> Result<PathBuf> {
    let path = root.join(rel);
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    own(&path, mode, owner)?;
    Ok(path)
}

fn own(path: &Path, mode: u32, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {uid}:{gid} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn mknod(path: &Path, kind: FileType, mode: u32, major: u32, minor: u32) -> Result<()> {
    rustix::fs::mknodat(
        CWD,
        path,
        kind,
        Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("mknod {} ({kind:?} {major}:{minor})", path.display()))?;
    // mknod applies the umask: set the exact mode.
    own(path, mode, (0, 0))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .map_err(std::io::Error::from)
        .with_context(|| format!("setting xattr {name} on {}", path.display()))
}

/// Writes the feature root file system into `dir` (created if missing; it
/// must be empty) and returns its manifest. Needs root.
pub fn write_feature_rootfs(dir: &Path) -> Result<FeatureManifest> {
    if !crate::skip::have_root() {
        bail!(
            "writing the feature rootfs into {} needs root (mknod, chown)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_some()
    {
        bail!("feature rootfs directory {} is not empty", dir.display());
    }
    let m = FeatureManifest::standard();
    let root = dir;
    let p = Path::new;
    let r = (0, 0);
    own(root, 0o755, r)?;
    for d in [
        "etc",
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/share",
        "usr/share/links",
        "opt",
        "opt/other-links",
        "opt/big",
        "srv",
        "var",
        "dev",
        "xattr",
        "names",
        "home",
    ] {
        mkdir_owned(root, p(d), 0o755, r)?;
    }

    // Ordinary text files.
    write_owned(root, p("etc/hostname"), b"cstor-features\n", 0o644, r)?;
    write_owned(
        root,
        p("etc/os-release"),
        b"NAME=\"cstor test\"\nID=cstor\nVERSION_ID=1\n",
        0o644,
        r,
    )?;
    write_owned(
        root,
        p("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nother:x:1234:5678::/srv/owned:/bin/sh\n",
        0o644,
        r,
    )?;
    write_owned(
        root,
        p("etc/group"),
        b"root:x:0:\nuser:x:1000:\nshadow:x:42:\nother:x:5678:\n",
        0o644,
        r,
    )?;
    write_owned(
        root,
        p("usr/bin/README"),
        b"binaries of the cstor feature image\n",
        0o644,
        r,
    )?;
    write_owned(
        root,
        &m.script,
        b"#!/bin/sh\necho hello from cstor\n",
        0o755,
        r,
    )?;

    // setuid / setgid.
    let mut elf_like = b"\x7fELF\x02\x01\x01\0".to_vec();
    elf_like.extend_from_slice(&[0u8; 56]);
    elf_like.extend_from_slice(b"setuid tool\n");
    write_owned(root, &m.setuid, &elf_like, 0o4755, r)?;
    write_owned(root, &m.setgid, &elf_like, 0o2755, (0, 42))?;

    // Other owners.
    mkdir_owned(root, &m.owned_dir, 0o750, m.other_owner)?;
    write_owned(
        root,
        &m.owned_file,
        b"owned by 1234:5678\n",
        0o640,
        m.other_owner,
    )?;

    // Hard links: two in one directory, one in another.
    let original = write_owned(root, &m.hardlinks[0], b"one inode, three names\n", 0o644, r)?;
    for link in &m.hardlinks[1..] {
        let link = root.join(link);
        std::fs::hard_link(&original, &link)
            .with_context(|| format!("hardlinking {} to {}", link.display(), original.display()))?;
    }

    // Symlinks.
    for (link, target) in [
        &m.symlink_relative,
        &m.symlink_absolute,
        &m.symlink_dangling,
    ] {
        let link = root.join(link);
        std::os::unix::fs::symlink(target, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), target.display()))?;
    }

    // Special files.
    mknod(&root.join(&m.fifo), FileType::Fifo, 0o644, 0, 0)?;
    mknod(
        &root.join(&m.char_device),
        FileType::CharacterDevice,
        0o666,
        1,
        3,
    )?;
    mknod(
        &root.join(&m.block_device),
        FileType::BlockDevice,
        0o660,
        7,
        0,
    )?;
    mkdir_owned(root, &m.empty_dir, 0o755, r)?;
    write_owned(root, &m.empty_file, b"", 0o644, r)?;

    // Xattrs.
    let xf = write_owned(
        root,
        &m.user_xattr_file,
        b"file with user xattrs\n",
        0o644,
        r,
    )?;
    for (name, value) in &m.user_xattrs {
        set_xattr(&xf, name, value)?;
    }
    set_xattr(&xf, &m.empty_user_xattr, b"")?;
    let xd = mkdir_owned(root, &m.user_xattr_dir, 0o755, r)?;
    write_owned(
        root,
        &m.user_xattr_dir.join("inside"),
        b"inside a dir with xattrs\n",
        0o644,
        r,
    )?;
    for (name, value) in &m.user_xattrs_dir {
        set_xattr(&xd, name, value)?;
    }
    // After chown/chmod: chown clears security.capability.
    let cap = write_owned(root, &m.security_xattr_file, &elf_like, 0o755, r)?;
    set_xattr(&cap, "security.capability", &NET_RAW_CAPABILITY)?;

    // Long and odd names.
    write_owned(
        root,
        &m.long_name,
        b"a file name longer than 100 bytes\n",
        0o644,
        r,
    )?;
    for path in [&m.long_path, &m.very_long_path] {
        if let Some(parent) = path.parent() {
            mkdir_owned(root, parent, 0o755, r)?;
        }
        write_owned(root, path, b"deep\n", 0o644, r)?;
    }
    for (i, name) in m.non_utf8_names.iter().enumerate() {
        write_owned(root, name, format!("not UTF-8 #{i}\n").as_bytes(), 0o644, r)?;
    }

    // A private directory of uid 1000 with a private and a public file.
    mkdir_owned(root, &m.private_dir, 0o755, (1000, 1000))?;
    write_owned(
        root,
        &m.private_file,
        b"secret of uid 1000\n",
        0o600,
        (1000, 1000),
    )?;
    write_owned(
        root,
        &m.private_dir_public_file,
        b"world-readable, in a 0700 dir\n",
        0o644,
        (1000, 1000),
    )?;
    own(&root.join(&m.private_dir), 0o700, (1000, 1000))?;

    // Big pseudo-random file, written in chunks.
    {
        let path = root.join(&m.big_file);
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut rng = XorShift::new(BIG_FILE_SEED);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = BIG_FILE_SIZE as usize;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])
                .with_context(|| format!("writing {}", path.display()))?;
            left -= n;
        }
        // Chunk sizes are multiples of 8: the stream equals one `fill`.
        drop(f);
        own(&path, 0o644, r)?;
    }

    // Sparse file.
    {
        let path = root.join(&m.sparse_file);
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(SPARSE_FILE_SIZE)
            .with_context(|| format!("truncating {}", path.display()))?;
        for (i, off) in SPARSE_DATA_OFFSETS.iter().enumerate() {
            let mut block = vec![0u8; SPARSE_BLOCK];
            XorShift::new(SPARSE_SEED + i as u64).fill(&mut block);
            f.write_all_at(&block, *off)
                .with_context(|| format!("writing {} at {off}", path.display()))?;
        }
        drop(f);
        own(&path, 0o644, r)?;
    }

    // Many small files.
    mkdir_owned(root, &m.many_files_dir, 0o755, r)?;
    for i in 0..MANY_FILES {
        write_owned(
            root,
            &m.many_file(i),
            format!("small file {i}\n").as_bytes(),
            0o644,
            r,
        )?;
    }

    // Content the commit image removes or replaces.
    mkdir_owned(root, &m.replaced_dir.join("sub"), 0o755, r)?;
    write_owned(root, &m.replaced_dir.join("old-a"), b"old a\n", 0o644, r)?;
    write_owned(root, &m.replaced_dir.join("old-b"), b"old b\n", 0o644, r)?;
    write_owned(
        root,
        &m.replaced_dir.join("sub/old-c"),
        b"old c\n",
        0o644,
        r,
    )?;
    mkdir_owned(root, &m.removed_dir, 0o755, r)?;
    write_owned(root, &m.removed_dir.join("x"), b"x\n", 0o644, r)?;
    write_owned(root, &m.removed_dir.join("y"), b"y\n", 0o644, r)?;

    Ok(m)
}

/// Packs `dir` into the tar file `out_tar` with GNU tar:
/// `tar --xattrs --xattrs-include='*' --numeric-owner --sort=name -C dir -cf
/// out_tar .`. No `--sparse`: sparse files are stored expanded. With
/// `--xattrs` GNU tar writes POSIX (PAX) format, so long names become PAX
/// `path`/`linkpath` records.
pub fn tar_rootfs(dir: &Path, out_tar: &Path) -> Result<()> {
    run_command(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--sort=name",
                "-C",
            ])
            .arg(dir)
            .arg("-cf")
            .arg(out_tar)
            .arg("."),
        &format!("packing {} into {}", dir.display(), out_tar.display()),
    )
    .map(drop)
}

/// Packs `dir` into `out_tar` in GNU format, without xattrs: `tar
/// --format=gnu --numeric-owner --sort=name -C dir -cf out_tar .`. Long
/// names become `././@LongLink` entries (type `L`/`K`) instead of PAX
/// records. (GNU tar silently switches to PAX when `--xattrs` is given, so
/// the two cannot be combined; xattrs are lost here.)
pub fn tar_rootfs_gnu(dir: &Path, out_tar: &Path) -> Result<()> {
    run_command(
        Command::new("tar")
            .args(["--format=gnu", "--numeric-owner", "--sort=name", "-C"])
            .arg(dir)
            .arg("-cf")
            .arg(out_tar)
            .arg("."),
        &format!(
            "packing {} into {} (GNU format)",
            dir.display(),
            out_tar.display()
        ),
    )
    .map(drop)
}

/// Writes a small root file system (a handful of files; owners 0:0) into
/// `dir`, each file's content mentioning `label` so that different labels
/// give different layers.
pub fn write_small_rootfs(dir: &Path, label: &str) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files: Vec<(PathBuf, Vec<u8>, u32)> = vec![
        (
            PathBuf::from("etc/hostname"),
            format!("{label}\n").into_bytes(),
            0o644,
        ),
        (
            PathBuf::from("etc/motd"),
            format!("this is the {label} image\n").into_bytes(),
            0o644,
        ),
        (
            PathBuf::from("usr/bin/run.sh"),
            format!("#!/bin/sh\necho {label}\n").into_bytes(),
            0o755,
        ),
        (
            PathBuf::from("usr/share/data.txt"),
            format!("{label}\n").repeat(200).into_bytes(),
            0o644,
        ),
        (PathBuf::from("var/lib/state"), Vec::new(), 0o600),
    ];
    let mut created = Vec::new();
    for (rel, content, mode) in files {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        created.push(rel);
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_shapes() {
        let m = FeatureManifest::standard();
        let name_len = m.long_name.file_name().unwrap().len();
        assert!(name_len > 100, "{name_len}");
        let long = m.long_path.as_os_str().len();
        assert!(long > 100 && m.long_path.components().all(|c| c.as_os_str().len() < 100));
        assert!(m.very_long_path.as_os_str().len() > 255);
        assert!(
            m.very_long_path
                .components()
                .all(|c| c.as_os_str().len() < 100)
        );
        assert!(m.non_utf8_names.iter().all(|n| n.to_str().is_none()));
    }

    #[test]
    fn xorshift_chunking_is_stable() {
        let mut whole = vec![0u8; 64];
        XorShift::new(7).fill(&mut whole);
        let mut parts = vec![0u8; 64];
        let mut rng = XorShift::new(7);
        rng.fill(&mut parts[..16]);
        rng.fill(&mut parts[16..]);
        assert_eq!(whole, parts);
    }
}
