//! Story: an image imported with cstor is the image composefs-oci itself makes from
//! skopeo's export of the same image: the same layer streams (fs-verity ids), the same
//! config, the same EROFS image id; asked for a bootable image, the same boot EROFS image
//! too, and the same refusal, without a tag, of an image that cannot boot.

use std::path::Path;
use std::sync::Arc;

use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
use composefs::repository::Repository;
use composefs_oci::oci_image::OciImage;
use cstor_import::{self as import, ImportOptions, layer_identifier};
use cstor_tests::session::{client_for, runtime};
use cstor_tests::{ImageRef, PodmanStore, StandardImages, skip, standard_images_or_skip};

type Repo = Arc<Repository<Sha512HashValue>>;

fn new_repo(dir: &Path) -> Repo {
    import::init_repository(dir).unwrap();
    import::open_repository::<Sha512HashValue>(dir).unwrap()
}

/// skopeo 1.9 exports podman-loaded gzip layers as plain tar but keeps the gzip media type
/// in the manifest; trust the bytes, as composefs-oci would otherwise gunzip a plain tar.
fn fix_media_types(export: &cstor_tests::OciExport) {
    let manifest_path = export.blob_path(&export.manifest_digest).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let mut changed = false;
    for l in manifest["layers"].as_array_mut().unwrap() {
        let mt = l["mediaType"].as_str().unwrap_or_default().to_owned();
        let path = export.blob_path(l["digest"].as_str().unwrap()).unwrap();
        let head = std::fs::read(&path).unwrap();
        if mt.ends_with("+gzip") && !head.starts_with(&[0x1f, 0x8b]) {
            l["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
            changed = true;
        }
    }
    if !changed {
        return;
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    std::fs::write(export.dir.join("blobs/sha256").join(&digest), &bytes).unwrap();
    let index = serde_json::json!({"schemaVersion":2,"manifests":[{
        "mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{digest}"), "size": bytes.len()}]});
    std::fs::write(
        export.dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn equivalent(images: &StandardImages, image: &ImageRef) {
    let work = tempfile::tempdir().unwrap();
    let ours = new_repo(&work.path().join("ours"));
    let theirs = new_repo(&work.path().join("theirs"));
    let export = images
        .store
        .skopeo_export(&image.name, &work.path().join("oci"))
        .unwrap();
    images.store.settle();
    fix_media_types(&export);

    runtime().block_on(async {
        let client = client_for(&images.store).await.unwrap();
        let report = import::import_image(&client, &ours, &image.name, &ImportOptions::default())
            .await
            .unwrap();
        client.shutdown().await.unwrap();

        let upstream = composefs_oci::pull(
            &theirs,
            &format!("oci:{}", export.dir.display()),
            Some("upstream"),
            Default::default(),
        )
        .await
        .unwrap();

        assert_eq!(
            report.pull.config_digest, upstream.config_digest,
            "config digest"
        );
        for l in &report.layers {
            let mine = ours.has_stream(&layer_identifier(&l.diff_id)).unwrap();
            let theirs_v = theirs.has_stream(&layer_identifier(&l.diff_id)).unwrap();
            assert_eq!(mine.as_ref(), Some(&l.verity));
            assert_eq!(
                mine.map(|v| v.to_hex()),
                theirs_v.map(|v| v.to_hex()),
                "layer {} of {}",
                l.diff_id,
                image.name
            );
        }
        let their_image = OciImage::open_ref(&theirs, "upstream").unwrap();
        let version = theirs.erofs_version();
        let their_erofs = their_image.image_ref(version).cloned().unwrap();
        assert_eq!(
            report.erofs_image.to_hex(),
            their_erofs.to_hex(),
            "EROFS image id of {}",
            image.name
        );
        // The config streams hold the same refs, so they are the same object.
        assert_eq!(
            report.pull.config_verity.to_hex(),
            their_image.config_verity().to_hex(),
            "config stream of {}",
            image.name
        );
        // Our own tag resolves in upstream's reader too.
        let mine = OciImage::open_ref(&ours, &report.tag).unwrap();
        assert_eq!(mine.config_digest(), &report.pull.config_digest);
    });
}

#[test]
fn the_feature_image_equals_composefs_oci_import_of_skopeo_export() {
    let Some(images) =
        standard_images_or_skip("the_feature_image_equals_composefs_oci_import_of_skopeo_export")
    else {
        return;
    };
    equivalent(images, &images.features);
}

#[test]
fn the_commit_image_equals_composefs_oci_import_of_skopeo_export() {
    let Some(images) =
        standard_images_or_skip("the_commit_image_equals_composefs_oci_import_of_skopeo_export")
    else {
        return;
    };
    equivalent(images, &images.commit);
}

#[test]
fn the_loaded_image_equals_composefs_oci_import_of_skopeo_export() {
    let Some(images) =
        standard_images_or_skip("the_loaded_image_equals_composefs_oci_import_of_skopeo_export")
    else {
        return;
    };
    equivalent(images, &images.loaded);
}

/// A two-layer image a host could boot: `/usr` with a kernel under `/usr/lib/modules`, and
/// `/boot` and `/sysroot` with content, which the boot transform empties (the upper layer
/// adds to `/boot`, replaces a file of `/usr` and labels one for SELinux).
fn bootable_image(work: &Path) -> (PodmanStore, ImageRef) {
    let write = |root: &Path, rel: &str, content: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    };
    let rootfs = work.join("bootable-rootfs");
    let kernel: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
    write(&rootfs, "usr/lib/modules/6.1.0-cstor/vmlinuz", &kernel);
    write(
        &rootfs,
        "usr/lib/modules/6.1.0-cstor/initramfs.img",
        &kernel[..9000],
    );
    write(
        &rootfs,
        "usr/lib/os-release",
        b"NAME=cstor\nID=cstor\nVERSION_ID=1\n",
    );
    write(
        &rootfs,
        "usr/bin/tool",
        "a tool that is longer than the inline limit "
            .repeat(4)
            .as_bytes(),
    );
    write(&rootfs, "etc/os-release", b"NAME=cstor\n");
    write(
        &rootfs,
        "boot/grub2/grub.cfg",
        "set default=0\n".repeat(10).as_bytes(),
    );
    std::fs::create_dir_all(rootfs.join("sysroot/ostree")).unwrap();
    let tar = work.join("bootable.tar");
    cstor_tests::tar_rootfs(&rootfs, &tar).unwrap();
    let store = PodmanStore::new(&work.join("store")).unwrap();
    let base = "localhost/cstor-test/bootable-base:latest";
    store.import_tar(&tar, base).unwrap();
    let name = "localhost/cstor-test/bootable:latest";
    let id = store
        .commit_with(base, name, |root| {
            write(root, "boot/loader/random-seed", &[7u8; 512]);
            write(
                root,
                "usr/bin/tool",
                "the tool, replaced in the upper layer "
                    .repeat(4)
                    .as_bytes(),
            );
            // Labels are for the boot image to set (or, without a policy, drop).
            rustix::fs::setxattr(
                root.join("usr/bin/tool"),
                "security.selinux",
                b"system_u:object_r:bin_t:s0",
                rustix::fs::XattrFlags::empty(),
            )?;
            Ok(())
        })
        .unwrap();
    (
        store,
        ImageRef {
            name: name.into(),
            id,
        },
    )
}

/// Imports `image` with `bootable` into a fresh repository in `dir`.
async fn import_bootable(
    store: &PodmanStore,
    image: &str,
    dir: &Path,
) -> (
    Repo,
    Result<import::ImportReport<Sha512HashValue>, import::Error>,
) {
    let repo = new_repo(dir);
    let client = client_for(store).await.unwrap();
    let r = import::import_image(&client, &repo, image, &ImportOptions::new().bootable(true)).await;
    client.shutdown().await.unwrap();
    (repo, r)
}

/// composefs-oci's own pull of `export` with `bootable`, tagged `upstream`.
async fn upstream_bootable_pull(
    repo: &Repo,
    export: &cstor_tests::OciExport,
) -> anyhow::Result<composefs_oci::PullResult<Sha512HashValue>> {
    composefs_oci::pull(
        repo,
        &format!("oci:{}", export.dir.display()),
        Some("upstream"),
        composefs_oci::PullOptions {
            bootable: true,
            ..Default::default()
        },
    )
    .await
}

fn tags(repo_dir: &Path) -> usize {
    std::fs::read_dir(repo_dir.join("streams/refs/oci"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_bootable_import_equals_composefs_oci_bootable_pull() {
    let test = "a_bootable_import_equals_composefs_oci_bootable_pull";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "skopeo", "tar"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (store, image) = bootable_image(work.path());
    let export = store
        .skopeo_export(&image.name, &work.path().join("oci"))
        .unwrap();
    store.settle();
    runtime().block_on(async {
        let (ours, report) = import_bootable(&store, &image.name, &work.path().join("ours")).await;
        let report = report.unwrap();
        let theirs = new_repo(&work.path().join("theirs"));
        let upstream = upstream_bootable_pull(&theirs, &export).await.unwrap();

        let their_image = OciImage::open_ref(&theirs, "upstream").unwrap();
        let version = theirs.erofs_version();
        let their_boot = composefs_oci::boot_image(&theirs, &upstream.manifest_digest)
            .unwrap()
            .expect("upstream wrote a boot image");
        let our_boot = report.boot_image.clone().expect("a boot image");
        assert_eq!(our_boot.to_hex(), their_boot.to_hex(), "boot EROFS image");
        assert_eq!(
            report.erofs_image.to_hex(),
            their_image.image_ref(version).unwrap().to_hex(),
            "EROFS image"
        );
        // The boot transform did something: /boot and /sysroot are emptied.
        assert_ne!(our_boot, report.erofs_image);
        // The config stream refers to both images, as upstream's does. (Upstream's pull
        // result has the verity of the config stream it wrote first, before the EROFS
        // images: the tag leads to the final one.)
        assert_eq!(
            report.pull.config_verity.to_hex(),
            their_image.config_verity().to_hex(),
            "config stream"
        );
        assert_eq!(report.pull.config_digest, upstream.config_digest);
        // Our tag leads upstream's reader to the boot image, and the report's streams are
        // the ones in the repository.
        let mine = OciImage::open_ref(&ours, &report.tag).unwrap();
        assert_eq!(mine.manifest_verity(), &report.pull.manifest_verity);
        assert_eq!(mine.config_verity(), &report.pull.config_verity);
        assert_eq!(
            composefs_oci::boot_image(&ours, &report.pull.manifest_digest).unwrap(),
            Some(our_boot.clone())
        );
        let fsck = ours.fsck().await.unwrap();
        assert!(fsck.is_ok(), "{fsck:?}");

        // Importing again finds the image complete, boot image and all; importing into
        // another fresh repository writes the very same streams (layer order is the
        // config's, not a hash map's).
        let client = client_for(&store).await.unwrap();
        let again = import::import_image(
            &client,
            &ours,
            &image.name,
            &ImportOptions::new().bootable(true),
        )
        .await
        .unwrap();
        client.shutdown().await.unwrap();
        assert!(again.already_complete);
        assert_eq!(again.boot_image, Some(our_boot));
        assert_eq!(again.pull.manifest_verity, report.pull.manifest_verity);
        let (_, other) = import_bootable(&store, &image.name, &work.path().join("other")).await;
        let other = other.unwrap();
        assert_eq!(other.pull.manifest_verity, report.pull.manifest_verity);
        assert_eq!(other.pull.config_verity, report.pull.config_verity);
    });
    store.destroy().unwrap();
}

/// An image without `/boot` cannot be made bootable: the import fails as upstream's pull
/// does, and neither leaves a tag behind.
#[test]
fn an_image_that_cannot_boot_fails_a_bootable_import_without_a_tag() {
    let test = "an_image_that_cannot_boot_fails_a_bootable_import_without_a_tag";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let export = images
        .store
        .skopeo_export(&images.features.name, &work.path().join("oci"))
        .unwrap();
    images.store.settle();
    runtime().block_on(async {
        let ours_dir = work.path().join("ours");
        let (_, r) = import_bootable(&images.store, &images.features.name, &ours_dir).await;
        let e = r.unwrap_err();
        assert!(format!("{e}").contains("boot"), "{e}");
        assert_eq!(tags(&ours_dir), 0, "a failed import leaves no tag");

        let theirs_dir = work.path().join("theirs");
        let theirs = new_repo(&theirs_dir);
        assert!(upstream_bootable_pull(&theirs, &export).await.is_err());
        assert_eq!(tags(&theirs_dir), 0, "upstream leaves no tag either");
    });
}
