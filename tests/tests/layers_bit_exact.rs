//! Story: a client asks the helper, over the real socket from another process, for every
//! layer of every test image, and gets back tars that are bit-identical both to the layer's
//! diff id and to what `skopeo copy containers-storage:… oci:…` exports.

use std::io::Read;

use cstor_tests::session::{client_for, runtime};
use cstor_tests::{ImageRef, standard_images_or_skip};
use sha2::{Digest, Sha256};

fn sha256_file(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn check_image(test: &str, pick: impl Fn(&cstor_tests::StandardImages) -> &ImageRef) {
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let image = pick(images);
    let work = tempfile::tempdir().unwrap();

    // The reference nobody here wrote.
    let export = images
        .store
        .skopeo_export(&image.name, &work.path().join("oci"))
        .expect("skopeo export");

    runtime().block_on(async {
        let client = client_for(&images.store).await.unwrap();
        let img = client.get_image(&image.name).await.unwrap();
        assert_eq!(img.id, image.id);
        assert_eq!(img.config.digest, export.config_digest, "config digest");
        let config: serde_json::Value = serde_json::from_str(&img.config.content).unwrap();
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(img.layers.len(), diff_ids.len());
        assert_eq!(img.layers.len(), export.layers.len());

        for (i, layer) in img.layers.iter().enumerate() {
            assert_eq!(layer.diff_id.as_deref(), Some(diff_ids[i].as_str()));
            let out_path = work.path().join(format!("layer-{i}.tar"));
            let out = std::fs::File::create(&out_path).unwrap();
            let opened = client.open_layer(&layer.id).await.unwrap();
            // write_tar checks every CRC and the diff id itself; check again independently.
            let (tar, _) = opened.write_tar(out).await.unwrap();
            assert_eq!(sha256_file(&out_path), diff_ids[i]);
            assert_eq!(tar.digest, diff_ids[i]);
            let ours = std::fs::read(&out_path).unwrap();
            let theirs = std::fs::read(&export.layers[i]).unwrap();
            assert!(
                ours == theirs,
                "layer {i} of {} differs from skopeo's export ({} vs {} bytes)",
                image.name,
                ours.len(),
                theirs.len()
            );
            if let Some(size) = layer.diff_size {
                assert_eq!(size, ours.len() as u64);
            }
        }
        client.shutdown().await.unwrap();
    });
    images.store.settle();
}

#[test]
fn feature_image_layers_are_bit_exact() {
    check_image("feature_image_layers_are_bit_exact", |i| &i.features);
}

#[test]
fn committed_layers_with_whiteouts_are_bit_exact() {
    check_image("committed_layers_with_whiteouts_are_bit_exact", |i| {
        &i.commit
    });
}

#[test]
fn loaded_gzip_image_layers_are_bit_exact() {
    check_image("loaded_gzip_image_layers_are_bit_exact", |i| &i.loaded);
}

#[test]
fn small_image_layers_are_bit_exact() {
    check_image("small_image_layers_are_bit_exact", |i| &i.small);
}

/// Layers can be fetched by diff id, and several layers can stream at once on one
/// connection.
#[test]
fn layers_by_diff_id_stream_concurrently() {
    let Some(images) = standard_images_or_skip("layers_by_diff_id_stream_concurrently") else {
        return;
    };
    runtime().block_on(async {
        let client = client_for(&images.store).await.unwrap();
        let mut all = Vec::new();
        for image in [
            &images.features,
            &images.commit,
            &images.loaded,
            &images.small,
        ] {
            let img = client.get_image(&image.id).await.unwrap();
            all.extend(img.layers);
        }
        let mut tasks = Vec::new();
        for l in all {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let diff_id = l.diff_id.clone().unwrap();
                let opened = client.open_layer(&diff_id).await.unwrap();
                assert_eq!(opened.info().diff_id.as_deref(), Some(diff_id.as_str()));
                let (tar, _) = opened.write_tar(std::io::sink()).await.unwrap();
                assert_eq!(tar.digest, diff_id);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        client.shutdown().await.unwrap();
    });
}
