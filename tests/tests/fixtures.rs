//! Tests of the fixtures themselves: that the storage podman wrote looks the
//! way the integration tests assume.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use cstor_tests as fixtures;
use cstor_tests::rootfs::{self, FeatureManifest, NET_RAW_CAPABILITY};
use cstor_tests::rootless::{
    ROOTLESS_PRIVATE_DIR, ROOTLESS_PRIVATE_FILE, ROOTLESS_PUBLIC_IN_PRIVATE, ROOTLESS_SECRET,
};
use cstor_tests::{read_xattr, run_command_bytes};

fn meta(path: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

fn major_minor(rdev: u64) -> (u64, u64) {
    (
        ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
        ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
    )
}

fn gunzip(path: &Path) -> Vec<u8> {
    run_command_bytes(Command::new("gzip").arg("-dc").arg(path), "gunzip").unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn standard_images_exist_with_expected_layers() {
    let Some(img) = fixtures::standard_images_or_skip("standard_images_exist_with_expected_layers")
    else {
        return;
    };
    let s = &img.store;
    for r in [&img.features, &img.commit, &img.loaded, &img.small] {
        assert_eq!(s.image_id(&r.name).unwrap(), r.id, "{}", r.name);
    }
    let features = s.image_layers(&img.features.name).unwrap();
    let commit = s.image_layers(&img.commit.name).unwrap();
    let loaded = s.image_layers(&img.loaded.name).unwrap();
    let small = s.image_layers(&img.small.name).unwrap();
    assert_eq!(features.len(), 1);
    assert_eq!(commit.len(), 2);
    assert_eq!(commit[0], features[0], "commit is built on features");
    assert_eq!(loaded.len(), 1);
    assert_eq!(small.len(), 1);
    for layer in features.iter().chain(&commit).chain(&loaded).chain(&small) {
        assert!(s.layer_diff_dir(layer).is_dir(), "diff dir of {layer}");
        assert!(s.tar_split_path(layer).is_file(), "tar-split of {layer}");
    }
}

#[test]
fn feature_tar_holds_the_odd_names() {
    let Some(img) = fixtures::standard_images_or_skip("feature_tar_holds_the_odd_names") else {
        return;
    };
    let listing = run_command_bytes(
        Command::new("tar")
            .args(["--list", "--quoting-style=literal", "-f"])
            .arg(&img.features_tar),
        "listing the feature tar",
    )
    .unwrap();
    let m = &img.feature_manifest;
    let mut wanted = m.non_utf8_names.clone();
    wanted.extend([
        m.long_name.clone(),
        m.long_path.clone(),
        m.very_long_path.clone(),
    ]);
    for name in wanted {
        let mut line = b"./".to_vec();
        line.extend(FeatureManifest::bytes(&name));
        line.push(b'\n');
        assert!(contains(&listing, &line), "{:?} not in the tar", name);
    }
    assert!(contains(&listing, b"./names/caf\xe9.txt\n"));
    // The sparse file is stored expanded, the big file whole.
    let size = std::fs::metadata(&img.features_tar).unwrap().len();
    assert!(
        size > rootfs::BIG_FILE_SIZE + rootfs::SPARSE_FILE_SIZE,
        "{size}"
    );
}

#[test]
fn gnu_format_tar_uses_longlink() {
    let Some(img) = fixtures::standard_images_or_skip("gnu_format_tar_uses_longlink") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gnu.tar");
    rootfs::tar_rootfs_gnu(&img.features_rootfs, &out).unwrap();
    let gnu = header_types(&out);
    assert!(gnu.contains(&b'L') && !gnu.contains(&b'x'), "{gnu:?}");
    let pax = header_types(&img.features_tar);
    assert!(
        pax.contains(&b'x') && !pax.contains(&b'L'),
        "the --xattrs tar is PAX only"
    );
}

/// The distinct type flags of the headers of a tar file (walking headers by
/// their size fields, without reading the data).
fn header_types(tar: &Path) -> std::collections::BTreeSet<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(tar).unwrap();
    let mut types = std::collections::BTreeSet::new();
    let mut header = [0u8; 512];
    while f.read_exact(&mut header).is_ok() && header.iter().any(|b| *b != 0) {
        types.insert(header[156]);
        let size = std::str::from_utf8(&header[124..136])
            .unwrap()
            .trim_matches(|c: char| c == '\0' || c == ' ');
        let size = u64::from_str_radix(size, 8).unwrap();
        f.seek(SeekFrom::Current(size.div_ceil(512) as i64 * 512))
            .unwrap();
    }
    types
}

#[test]
fn feature_layer_keeps_every_feature() {
    let Some(img) = fixtures::standard_images_or_skip("feature_layer_keeps_every_feature") else {
        return;
    };
    let s = &img.store;
    let layer = &s.image_layers(&img.features.id).unwrap()[0];
    let diff = s.layer_diff_dir(layer);
    let m = &img.feature_manifest;
    let at = |p: &Path| diff.join(p);

    assert_eq!(meta(&at(&m.setuid)).mode() & 0o7777, 0o4755);
    let sgid = meta(&at(&m.setgid));
    assert_eq!((sgid.mode() & 0o7777, sgid.gid()), (0o2755, 42));
    for p in [&m.owned_dir, &m.owned_file] {
        let md = meta(&at(p));
        assert_eq!((md.uid(), md.gid()), m.other_owner, "{}", p.display());
    }
    let ino = meta(&at(&m.hardlinks[0])).ino();
    for link in &m.hardlinks {
        let md = meta(&at(link));
        assert_eq!((md.ino(), md.nlink()), (ino, 3), "{}", link.display());
    }
    for (link, target) in [
        &m.symlink_relative,
        &m.symlink_absolute,
        &m.symlink_dangling,
    ] {
        assert_eq!(&std::fs::read_link(at(link)).unwrap(), target);
    }
    assert!(meta(&at(&m.fifo)).file_type().is_fifo());
    let c = meta(&at(&m.char_device));
    assert!(c.file_type().is_char_device());
    assert_eq!(major_minor(c.rdev()), (1, 3));
    let b = meta(&at(&m.block_device));
    assert!(b.file_type().is_block_device());
    assert_eq!(major_minor(b.rdev()), (7, 0));
    assert!(at(&m.empty_dir).is_dir());
    assert_eq!(meta(&at(&m.empty_file)).len(), 0);
    for (name, value) in &m.user_xattrs {
        assert_eq!(
            read_xattr(&at(&m.user_xattr_file), name).unwrap().as_ref(),
            Some(value)
        );
    }
    // podman import drops an xattr with an empty value (the tar has it).
    assert_eq!(
        read_xattr(&at(&m.user_xattr_file), &m.empty_user_xattr).unwrap(),
        None
    );
    assert_eq!(
        read_xattr(
            &img.features_rootfs.join(&m.user_xattr_file),
            &m.empty_user_xattr
        )
        .unwrap(),
        Some(Vec::new())
    );
    for (name, value) in &m.user_xattrs_dir {
        assert_eq!(
            read_xattr(&at(&m.user_xattr_dir), name).unwrap().as_ref(),
            Some(value)
        );
    }
    assert_eq!(
        read_xattr(&at(&m.security_xattr_file), "security.capability").unwrap(),
        Some(NET_RAW_CAPABILITY.to_vec())
    );
    for p in [&m.long_name, &m.long_path, &m.very_long_path] {
        assert!(at(p).is_file(), "{}", p.display());
    }
    for p in &m.non_utf8_names {
        assert!(at(p).is_file(), "{:?}", p.as_os_str().as_bytes());
    }
    let pd = meta(&at(&m.private_dir));
    assert_eq!(
        (pd.mode() & 0o7777, pd.uid(), pd.gid()),
        (0o700, 1000, 1000)
    );
    let pf = meta(&at(&m.private_file));
    assert_eq!(
        (pf.mode() & 0o7777, pf.uid(), pf.gid()),
        (0o600, 1000, 1000)
    );
    assert_eq!(meta(&at(&m.private_dir_public_file)).mode() & 0o7777, 0o644);
    assert_eq!(meta(&at(&m.big_file)).len(), rootfs::BIG_FILE_SIZE);
    assert_eq!(meta(&at(&m.sparse_file)).len(), rootfs::SPARSE_FILE_SIZE);
    let sparse = std::fs::read(at(&m.sparse_file)).unwrap();
    assert!(
        sparse == FeatureManifest::sparse_file_content(),
        "sparse file content"
    );
    let many = std::fs::read_dir(at(&m.many_files_dir)).unwrap().count();
    assert_eq!(many, rootfs::MANY_FILES);
}

#[test]
fn commit_layer_has_whiteouts_and_opaque_dir() {
    let Some(img) = fixtures::standard_images_or_skip("commit_layer_has_whiteouts_and_opaque_dir")
    else {
        return;
    };
    let s = &img.store;
    let top = s.image_layers(&img.commit.id).unwrap().pop().unwrap();
    let diff = s.layer_diff_dir(&top);
    let ch = &img.commit_changes;
    for deleted in ch.deleted_files.iter().chain(&ch.deleted_dirs) {
        let md = meta(&diff.join(deleted));
        assert!(
            md.file_type().is_char_device(),
            "whiteout {}",
            deleted.display()
        );
        assert_eq!(major_minor(md.rdev()), (0, 0), "{}", deleted.display());
        assert_eq!((md.uid(), md.gid()), (0, 0), "{}", deleted.display());
    }
    let opaque = diff.join(&ch.opaque_dir);
    assert_eq!(
        read_xattr(&opaque, "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    for f in &ch.opaque_dir_files {
        assert!(diff.join(f).is_file(), "{}", f.display());
    }
    assert!(!diff.join(&ch.opaque_dir).join("old-a").exists());
    let (f, uid, gid) = &ch.chown_file;
    let md = meta(&diff.join(f));
    assert_eq!((md.uid(), md.gid()), (*uid, *gid));
    let (f, mode) = &ch.chmod_file;
    assert_eq!(meta(&diff.join(f)).permissions().mode() & 0o7777, *mode);

    // tar-split keeps the whiteout names.
    let ts = gunzip(&s.tar_split_path(&top));
    assert!(
        contains(&ts, b".wh.hostname"),
        "tar-split lacks .wh.hostname"
    );
    assert!(
        contains(&ts, b"srv/replaced/.wh..wh..opq"),
        "tar-split lacks the opaque marker"
    );
}

#[test]
fn loaded_layer_has_a_distinct_compressed_digest() {
    let Some(img) =
        fixtures::standard_images_or_skip("loaded_layer_has_a_distinct_compressed_digest")
    else {
        return;
    };
    let s = &img.store;
    let layer = &s.image_layers(&img.loaded.id).unwrap()[0];
    let rec = s.layer_record(layer).unwrap();
    let compressed = rec["compressed-diff-digest"].as_str().unwrap();
    let diff = rec["diff-digest"].as_str().unwrap();
    assert_ne!(compressed, diff, "{rec:#}");
    assert_eq!(rec["compression"].as_u64(), Some(2), "gzip: {rec:#}");

    let small_layer = &s.image_layers(&img.small.id).unwrap()[0];
    let rec = s.layer_record(small_layer).unwrap();
    assert_eq!(rec["compressed-diff-digest"], rec["diff-digest"], "{rec:#}");
}

#[test]
fn skopeo_export_matches_diff_digests_and_settles() {
    let Some(img) =
        fixtures::standard_images_or_skip("skopeo_export_matches_diff_digests_and_settles")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (store, small) = fixtures::small_private_store(tmp.path()).unwrap();
    let export = store
        .skopeo_export(&small.name, &tmp.path().join("oci"))
        .unwrap();
    assert!(
        !store.overlay_bind_mounted().unwrap(),
        "settle left the bind mount"
    );
    let layers = store.image_layers(&small.id).unwrap();
    assert_eq!(export.layers.len(), layers.len());
    let rec = store.layer_record(&layers[0]).unwrap();
    assert_eq!(
        export.layer_digests[0],
        rec["diff-digest"].as_str().unwrap()
    );
    assert_eq!(export.config_digest, format!("sha256:{}", small.id));

    // The gzip-loaded image: blobs come back as plain tar (digest = diff id).
    let export = img
        .store
        .skopeo_export(&img.loaded.id, &tmp.path().join("loaded"))
        .unwrap();
    // No bind-mount check here: other tests run podman and skopeo on the
    // shared store at the same time, so its mount state at any instant is
    // theirs too. The private store above covers settling.
    let layer = &img.store.image_layers(&img.loaded.id).unwrap()[0];
    let rec = img.store.layer_record(layer).unwrap();
    assert_eq!(
        export.layer_digests[0],
        rec["diff-digest"].as_str().unwrap()
    );
    let blob = std::fs::read(&export.layers[0]).unwrap();
    assert_eq!(&blob[257..262], b"ustar", "plain tar blob");
    eprintln!("loaded export media types: {:?}", export.layer_media_types);
    store.destroy().unwrap();
}

#[test]
fn small_private_store_is_fast() {
    if !fixtures::skip::require_root("small_private_store_is_fast")
        || !fixtures::skip::require_tools("small_private_store_is_fast", &["podman", "tar"])
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (store, small) = fixtures::small_private_store(tmp.path()).unwrap();
    let took = t.elapsed();
    eprintln!("small_private_store took {:.2}s", took.as_secs_f64());
    assert!(took.as_secs_f64() < 10.0, "{took:?}");
    assert_eq!(store.image_layers(&small.name).unwrap().len(), 1);
    store.rmi(&small.name).unwrap();
    assert!(!store.image_exists(&small.name).unwrap());
    let runroot = store.runroot.clone();
    store.destroy().unwrap();
    assert!(!runroot.exists() && !store.dir.exists());
}

#[test]
fn rootless_user_cannot_read_private_file_directly() {
    let test = "rootless_user_cannot_read_private_file_directly";
    let Some(user) = fixtures::rootless_user_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let image = fixtures::rootless_feature_image(&user, work.path()).unwrap();
    let layer = user.top_layer(&image.name).unwrap();
    let diff = user.layer_diff_dir(&layer);
    let secret = diff.join(ROOTLESS_PRIVATE_FILE);

    let md = meta(&secret);
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_ne!(md.uid(), user.uid, "container uid 1000 maps to a subuid");

    let direct = user.command("cat").arg(&secret).output().unwrap();
    assert!(
        !direct.status.success(),
        "the user read the 0600 file directly"
    );
    let direct_dir = user
        .command("ls")
        .arg(diff.join(ROOTLESS_PRIVATE_DIR))
        .output()
        .unwrap();
    assert!(
        !direct_dir.status.success(),
        "the user listed the 0700 dir directly"
    );

    let unshared = user.unshare("cat", [&secret]).output().unwrap();
    assert!(
        unshared.status.success(),
        "{}",
        String::from_utf8_lossy(&unshared.stderr)
    );
    assert_eq!(unshared.stdout, ROOTLESS_SECRET.as_bytes());
    let public = user
        .unshare("cat", [diff.join(ROOTLESS_PUBLIC_IN_PRIVATE)])
        .output()
        .unwrap();
    assert!(public.status.success());
}

#[test]
fn xfs_reflink_probe() {
    let Some(xfs) = fixtures::loop_xfs_or_skip("xfs_reflink_probe", 1 << 30) else {
        return;
    };
    assert!(fixtures::reflink_supported(&xfs.mountpoint));
    let ext = tempfile::tempdir_in(fixtures::target_dir()).unwrap();
    let on_target = fixtures::reflink_supported(ext.path());
    eprintln!("reflinks in the target dir: {on_target}");
    let dev = xfs.loop_dev.clone();
    let mnt = xfs.mountpoint.clone();
    drop(xfs);
    assert!(fixtures::mounts_under(&mnt).unwrap().is_empty());
    let list = run_command_bytes(Command::new("losetup").arg("-a"), "losetup -a").unwrap();
    let needle = format!("{}:", dev.display());
    assert!(
        !contains(&list, needle.as_bytes()),
        "{} still attached",
        dev.display()
    );
}

#[test]
fn helper_binary_error_is_helpful() {
    match fixtures::helper_binary() {
        Ok(path) => assert!(path.is_file()),
        Err(e) => assert!(format!("{e:#}").contains("cargo build --workspace --bins")),
    }
}
