//! Story: an imported image mounts (composefs: EROFS metadata over the object store) and
//! shows exactly the files of the image: odd names, owners, modes, links, devices and big
//! contents; whiteouts and opaque directories applied; and an image without /usr (a scratch
//! image with one binary), which upstream composefs-oci cannot finalize, mounts too.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
use cstor_import::{self as import, ImportOptions};
use cstor_tests::session::{client_for, runtime};
use cstor_tests::{FeatureManifest, PodmanStore, skip, standard_images_or_skip};

/// A mounted image, unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.dir.path(), rustix::mount::UnmountFlags::DETACH);
    }
}

/// Imports `image` from `store` into a fresh repository and mounts its EROFS image.
fn import_and_mount(
    store: &PodmanStore,
    image: &str,
    work: &Path,
) -> (Mounted, import::ImportReport<Sha512HashValue>) {
    let repo_dir = work.join("repo");
    import::init_repository(&repo_dir).unwrap();
    let repo = import::open_repository::<Sha512HashValue>(&repo_dir).unwrap();
    let report = runtime().block_on(async {
        let client = client_for(store).await.unwrap();
        let r = import::import_image(&client, &repo, image, &ImportOptions::default())
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        r
    });
    let dir = tempfile::tempdir().unwrap();
    repo.mount_at(
        &report.erofs_image.to_hex(),
        dir.path(),
        &composefs::mount::MountOptions::default(),
    )
    .unwrap_or_else(|e| panic!("mounting {image}: {e:#}"));
    (Mounted { dir }, report)
}

fn can_mount(test: &str) -> bool {
    skip::require_root(test) && skip::require_tools(test, &["podman"])
}

#[test]
fn the_feature_image_mounts_with_every_file_intact() {
    let test = "the_feature_image_mounts_with_every_file_intact";
    if !can_mount(test) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (m, report) = import_and_mount(&images.store, &images.features.name, work.path());
    assert_eq!(report.has_usr, Some(true));
    // The image's tree was built while the layers streamed, not read back afterwards.
    assert_eq!(report.tree, Some(import::TreeSource::Streamed));
    let f = FeatureManifest::standard();
    let src = |p: &Path| images.features_rootfs.join(p);

    for name in &f.non_utf8_names {
        assert!(name.as_os_str().as_bytes().iter().any(|b| *b >= 0x80));
        assert_eq!(
            std::fs::read(m.path(name)).unwrap(),
            std::fs::read(src(name)).unwrap()
        );
    }
    for p in [
        &f.big_file,
        &f.sparse_file,
        &f.long_name,
        &f.long_path,
        &f.very_long_path,
        &f.empty_file,
    ] {
        assert_eq!(
            std::fs::read(m.path(p)).unwrap(),
            std::fs::read(src(p)).unwrap(),
            "{p:?}"
        );
    }
    let md = |p: &Path| std::fs::symlink_metadata(m.path(p)).unwrap();
    assert_eq!(md(&f.private_file).mode() & 0o7777, 0o600);
    assert_eq!(
        (md(&f.private_file).uid(), md(&f.private_file).gid()),
        (1000, 1000)
    );
    assert_eq!(md(&f.private_dir).mode() & 0o7777, 0o700);
    assert_eq!(md(&f.setuid).mode() & 0o7777, 0o4755);
    assert_eq!(md(&f.setgid).mode() & 0o7777, 0o2755);
    assert_eq!(
        (md(&f.owned_file).uid(), md(&f.owned_file).gid()),
        f.other_owner
    );
    assert_eq!(
        std::fs::read_link(m.path(&f.symlink_relative.0)).unwrap(),
        f.symlink_relative.1
    );
    assert_eq!(
        std::fs::read_link(m.path(&f.symlink_absolute.0)).unwrap(),
        f.symlink_absolute.1
    );
    assert!(md(&f.fifo).file_type().is_fifo());
    assert!(md(&f.char_device).file_type().is_char_device());
    assert_eq!(md(&f.char_device).rdev(), rustix::fs::makedev(1, 3) as u64);
    assert!(md(&f.block_device).file_type().is_block_device());
    let inos: Vec<u64> = f.hardlinks.iter().map(|h| md(h).ino()).collect();
    assert!(
        inos.windows(2).all(|w| w[0] == w[1]),
        "hardlinks share an inode: {inos:?}"
    );
    assert_eq!(
        cstor_tests::read_xattr(&m.path(&f.security_xattr_file), "security.capability").unwrap(),
        Some(cstor_tests::rootfs::NET_RAW_CAPABILITY.to_vec())
    );
    assert_eq!(
        std::fs::read_dir(m.path(&f.many_files_dir))
            .unwrap()
            .count(),
        cstor_tests::rootfs::MANY_FILES
    );
}

#[test]
fn the_commit_image_mounts_with_its_whiteouts_applied() {
    let test = "the_commit_image_mounts_with_its_whiteouts_applied";
    if !can_mount(test) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (m, _) = import_and_mount(&images.store, &images.commit.name, work.path());
    let c = &images.commit_changes;
    for gone in c.deleted_files.iter().chain(&c.deleted_dirs) {
        assert!(
            std::fs::symlink_metadata(m.path(gone)).is_err(),
            "{gone:?} still there"
        );
    }
    let mut listed: Vec<PathBuf> = walk(&m.path(&c.opaque_dir))
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| p.strip_prefix(m.dir.path()).unwrap().to_owned())
        .collect();
    listed.sort();
    let mut want = c.opaque_dir_files.clone();
    want.sort();
    assert_eq!(
        listed, want,
        "the opaque directory shows only its new content"
    );
    for added in &c.added_files {
        assert!(m.path(added).exists(), "{added:?}");
    }
    assert_eq!(
        std::fs::read(m.path(&c.replaced_file.0)).unwrap(),
        c.replaced_file.1
    );
    let md = std::fs::symlink_metadata(m.path(&c.chmod_file.0)).unwrap();
    assert_eq!(md.mode() & 0o7777, c.chmod_file.1);
    let md = std::fs::symlink_metadata(m.path(&c.chown_file.0)).unwrap();
    assert_eq!((md.uid(), md.gid()), (c.chown_file.1, c.chown_file.2));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_scratch_image_without_usr_imports_and_mounts() {
    let test = "a_scratch_image_without_usr_imports_and_mounts";
    if !can_mount(test) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::copy("/bin/true", rootfs.join("app")).unwrap();
    std::fs::write(rootfs.join("data/config.json"), br#"{"scratch": true}"#).unwrap();
    let tar = work.path().join("scratch.tar");
    cstor_tests::tar_rootfs(&rootfs, &tar).unwrap();
    let store = PodmanStore::new(&work.path().join("store")).unwrap();
    store.import_tar(&tar, "localhost/scratch:latest").unwrap();

    let (m, report) = import_and_mount(&store, "localhost/scratch", work.path());
    assert_eq!(report.has_usr, Some(false));
    assert_eq!(
        std::fs::read(m.path("app")).unwrap(),
        std::fs::read("/bin/true").unwrap()
    );
    assert_eq!(
        std::fs::symlink_metadata(m.path("app")).unwrap().mode() & 0o111,
        0o111
    );
    assert_eq!(
        std::fs::read(m.path("data/config.json")).unwrap(),
        br#"{"scratch": true}"#
    );
    // The root keeps the tar's own root entry.
    let root = std::fs::metadata(m.dir.path()).unwrap();
    assert_eq!(
        root.mode() & 0o7777,
        std::fs::metadata(&rootfs).unwrap().mode() & 0o7777
    );
    drop(m);
    store.destroy().unwrap();
}
