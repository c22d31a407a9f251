//! Story: big images work: an image with 500 layers (no reply-size limit anywhere), and a
//! layer with thousands of files streamed by a helper and a client that are both held to a
//! 1024-fd limit (fds in flight are bounded).

use std::path::Path;
use std::process::Command;

use cstor_tests::session::{helper_config, runtime};
use cstor_tests::{PodmanStore, run_command, skip};
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes an OCI image layout with `n` one-file layers.
fn write_many_layer_layout(dir: &Path, n: usize) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let work = dir.join("work");
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..n {
        let root = work.join(format!("l{i}"));
        std::fs::create_dir_all(root.join(format!("layers/{i:03}"))).unwrap();
        std::fs::write(
            root.join(format!("layers/{i:03}/file")),
            format!("layer {i}\n"),
        )
        .unwrap();
        let tar = work.join(format!("l{i}.tar"));
        run_command(
            Command::new("tar")
                .arg("--numeric-owner")
                .arg("--mtime=@0")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("layers"),
            "packing a layer",
        )
        .unwrap();
        let bytes = std::fs::read(&tar).unwrap();
        let d = sha256_hex(&bytes);
        std::fs::write(blobs.join(&d), &bytes).unwrap();
        layers.push(json!({"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":format!("sha256:{d}"),"size":bytes.len()}));
        diff_ids.push(format!("sha256:{d}"));
    }
    let config = serde_json::to_vec(&json!({
        "architecture":"amd64","os":"linux","config":{},
        "rootfs":{"type":"layers","diff_ids":diff_ids},
    }))
    .unwrap();
    let cd = sha256_hex(&config);
    std::fs::write(blobs.join(&cd), &config).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":format!("sha256:{cd}"),"size":config.len()},
        "layers":layers,
    }))
    .unwrap();
    let md = sha256_hex(&manifest);
    std::fs::write(blobs.join(&md), &manifest).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":format!("sha256:{md}"),"size":manifest.len()}]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn an_image_with_500_layers() {
    let test = "an_image_with_500_layers";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "skopeo", "tar"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    write_many_layer_layout(&layout, 500);
    let store = PodmanStore::new(&dir.path().join("store")).unwrap();
    let start = std::time::Instant::now();
    run_command(
        store
            .skopeo()
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}", layout.display()))
            .arg(store.storage_ref("localhost/many:latest")),
        "copying the 500-layer image into the store",
    )
    .unwrap();
    cstor_tests::note(&format!(
        "500-layer image committed in {:?}",
        start.elapsed()
    ));
    store.settle();
    runtime().block_on(async {
        let client = cstor_proxy_client::Client::spawn(&helper_config(&store).unwrap())
            .await
            .unwrap();
        let img = client.get_image("localhost/many").await.unwrap();
        assert_eq!(img.layers.len(), 500);
        let config: serde_json::Value = serde_json::from_str(&img.config.content).unwrap();
        for (l, d) in img
            .layers
            .iter()
            .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
        {
            assert_eq!(l.diff_id.as_deref(), d.as_str());
        }
        // Every layer rebuilds exactly (500 opens on one connection).
        for l in &img.layers {
            let opened = client.open_layer(&l.id).await.unwrap();
            opened.write_tar(std::io::sink()).await.unwrap();
        }
        client.shutdown().await.unwrap();
    });
    store.destroy().unwrap();
}

#[test]
fn thousands_of_files_under_a_1024_fd_limit() {
    let test = "thousands_of_files_under_a_1024_fd_limit";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "tar", "prlimit"]) {
        return;
    }
    const FILES: usize = 6000;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = cstor_tests::many_files_store(
        &dir.path().join("store"),
        dir.path(),
        "localhost/many-files:latest",
        FILES,
        50,
        |i| format!("{i}\n"),
    )
    .unwrap();

    // Both sides run with a hard limit of 1024 fds: the helper through prlimit, this test
    // process by lowering its own soft limit (this file holds no other test).
    let wrapper = dir.path().join("helper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec prlimit --nofile=1024:1024 {} \"$@\"\n",
            cstor_tests::helper_binary().unwrap().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let mut config = helper_config(&store).unwrap();
    config.program = Some(wrapper);
    let entries = runtime().block_on(async {
        let client = cstor_proxy_client::Client::spawn(&config).await.unwrap();
        let img = client.get_image("localhost/many-files").await.unwrap();
        let opened = client.open_layer(&img.layers[0].id).await.unwrap();
        let (tar, _) = opened.write_tar(std::io::sink()).await.unwrap();
        client.shutdown().await.unwrap();
        tar.summary.files
    });
    rustix::process::setrlimit(rustix::process::Resource::Nofile, old).unwrap();
    assert_eq!(entries, FILES as u64);
    store.destroy().unwrap();
}

/// Content fds arrive ahead of the reader and objects queue for the workers, each holding its
/// fd; the helper opens content files ahead of the client. At a low fd limit both sides must
/// hold fewer, not fail with EMFILE (or worse, lose fds in `SCM_RIGHTS` and meet the wrong
/// file). Here client and helper get 256 fds, soft and hard.
#[test]
fn an_import_where_client_and_helper_have_256_fds() {
    let test = "an_import_where_client_and_helper_have_256_fds";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "tar", "prlimit"]) {
        return;
    }
    const FILES: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    // Over 64 bytes: every file becomes an object, queued with its fd.
    let (store, _) = cstor_tests::many_files_store(
        &dir.path().join("store"),
        dir.path(),
        "localhost/many-objects:latest",
        FILES,
        30,
        |i| format!("{i:0>200}\n"),
    )
    .unwrap();
    let helper = cstor_tests::helper_binary().unwrap();
    let repo = dir.path().join("repo");
    let out = Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(helper.with_file_name("cstor"))
        .args(["import", "--helper"])
        .arg(&helper)
        .arg("--root")
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .args(["--json", "--init", "--repo"])
        .arg(&repo)
        .arg("localhost/many-objects")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &report["objects"];
    let stored = ["reflinked", "copied", "present"]
        .iter()
        .map(|k| o[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(stored, FILES as u64, "{report}");
    store.destroy().unwrap();
}
