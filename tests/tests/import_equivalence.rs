//! Story: an image imported with cstor is the image composefs-oci itself makes from
//! skopeo's export of the same image: the same layer streams (fs-verity ids), the same
//! config, the same EROFS image id.

use std::path::Path;
use std::sync::Arc;

use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
use composefs::repository::Repository;
use composefs_oci::oci_image::OciImage;
use cstor_import::{self as import, ImportOptions, layer_identifier};
use cstor_tests::session::{client_for, runtime};
use cstor_tests::{ImageRef, StandardImages, standard_images_or_skip};

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
