//! Story: podman keeps working on the same storage while layers are read. A layer being
//! streamed is pinned: `podman rmi` waits for it. As soon as the client is done, gone, or
//! silent past its lease, the layer is released and podman proceeds.

use std::time::{Duration, Instant};

use cstor_tests::session::{
    RawHelper, client_for, error_code, podman_background, runtime, wait_with_timeout,
};
use cstor_tests::{ImageRef, PodmanStore, skip, small_private_store};
use serde_json::json;

fn setup(test: &str) -> Option<(tempfile::TempDir, PodmanStore, ImageRef, String)> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = small_private_store(dir.path()).unwrap();
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    Some((dir, store, image, layer))
}

/// Starts `podman rmi` and checks it is still waiting after a while.
fn rmi_blocked(store: &PodmanStore, image: &ImageRef) -> std::process::Child {
    let mut rmi = podman_background(store, &["rmi", "-f", &image.id]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rmi.try_wait().unwrap().is_none(),
        "podman rmi finished while the layer was pinned"
    );
    rmi
}

fn rmi_finishes(mut rmi: std::process::Child, store: &PodmanStore, image: &ImageRef) -> Duration {
    let start = Instant::now();
    let status = wait_with_timeout(&mut rmi, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "podman rmi failed: {status}");
    assert!(!store.image_exists(&image.id).unwrap());
    start.elapsed()
}

#[test]
fn podman_waits_while_a_layer_is_streamed_and_proceeds_after_release() {
    let Some((_d, store, image, layer)) =
        setup("podman_waits_while_a_layer_is_streamed_and_proceeds_after_release")
    else {
        return;
    };
    runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        let mut opened = client.open_layer(&layer).await.unwrap();
        let rmi = tokio::task::spawn_blocking({
            let store = store.clone();
            let image = image.clone();
            move || rmi_blocked(&store, &image)
        })
        .await
        .unwrap();
        opened.release().await.unwrap();
        let waited = tokio::task::spawn_blocking({
            let store = store.clone();
            let image = image.clone();
            move || rmi_finishes(rmi, &store, &image)
        })
        .await
        .unwrap();
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        // Metadata requests take and drop their locks each time.
        assert!(client.list_images().await.unwrap().is_empty());
        client.shutdown().await.unwrap();
    });
    store.destroy().unwrap();
}

#[test]
fn a_client_that_disappears_releases_its_layers() {
    let Some((_d, store, image, layer)) = setup("a_client_that_disappears_releases_its_layers")
    else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    h.initialize().unwrap();
    let r = h.call(1, "GetLayer", json!({"layer": layer})).unwrap();
    assert!(r.value["result"]["handle"].is_u64(), "{}", r.value);
    assert_eq!(r.fds.len(), 1);
    let rmi = rmi_blocked(&store, &image);
    // The client dies: its socket closes.
    let (status, stderr) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    rmi_finishes(rmi, &store, &image);
    store.destroy().unwrap();
}

#[test]
fn a_silent_client_loses_its_lease() {
    let Some((_d, store, image, layer)) = setup("a_silent_client_loses_its_lease") else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &["--lease-timeout", "1"]).unwrap();
    let init = h.initialize().unwrap();
    assert_eq!(init["limits"]["lease_timeout_ms"], json!(1000));
    let r = h.call(1, "GetLayer", json!({"layer": layer})).unwrap();
    let handle = r.value["result"]["handle"].as_u64().unwrap();
    // KeepAlive renews.
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        let k = h
            .call(10 + i, "KeepAlive", json!({"handle": handle}))
            .unwrap();
        assert_eq!(k.value["result"]["lease_ms"], json!(1000), "{}", k.value);
    }
    // Then silence.
    std::thread::sleep(Duration::from_millis(2500));
    let r = h
        .call(2, "FetchFds", json!({"handle": handle, "max": 10}))
        .unwrap();
    assert_eq!(error_code(&r.value), Some(1501), "{}", r.value);
    assert_eq!(r.value["error"]["data"]["kind"], json!("lease-expired"));
    // The lock is gone although the connection is still open.
    let rmi = podman_background(&store, &["rmi", "-f", &image.id]).unwrap();
    rmi_finishes(rmi, &store, &image);
    assert!(h.alive());
    let (status, _) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    store.destroy().unwrap();
}

#[test]
fn shutdown_releases_everything_and_exits() {
    let Some((_d, store, image, layer)) = setup("shutdown_releases_everything_and_exits") else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    h.initialize().unwrap();
    let r = h.call(1, "GetLayer", json!({"layer": layer})).unwrap();
    assert!(r.value["result"].is_object());
    let rmi = rmi_blocked(&store, &image);
    let r = h.call(2, "Shutdown", json!({})).unwrap();
    assert_eq!(r.value["result"], json!({}));
    assert!(
        h.recv().unwrap().is_none(),
        "the helper hangs up after Shutdown"
    );
    let (status, _) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    rmi_finishes(rmi, &store, &image);
    store.destroy().unwrap();
}

/// The helper waits for podman's write lock, up to --lock-timeout, then says so.
#[test]
fn a_busy_store_times_out_with_a_retryable_error() {
    let Some((_d, store, _image, _layer)) = setup("a_busy_store_times_out_with_a_retryable_error")
    else {
        return;
    };
    // Hold layers.lock for writing the way c/storage does (a classic POSIX lock).
    let lock_path = store.root.join("overlay-layers/layers.lock");
    let script = "import fcntl,sys\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('locked',flush=True)\nsys.stdin.read()\n";
    let mut holder = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&lock_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let mut h = RawHelper::spawn(&store, &["--lock-timeout", "1"]).unwrap();
    h.initialize().unwrap();
    let start = Instant::now();
    let r = h.call(1, "ListImages", json!({})).unwrap();
    // ListImages only needs images.lock.
    assert!(r.value["result"].is_object(), "{}", r.value);
    let r = h
        .call(
            2,
            "GetImage",
            json!({"reference": "localhost/cstor-test/small"}),
        )
        .unwrap();
    assert_eq!(error_code(&r.value), Some(1400), "{}", r.value);
    assert_eq!(r.value["error"]["data"]["retryable"], json!(true));
    assert!(start.elapsed() >= Duration::from_secs(1));
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let r = h
        .call(
            3,
            "GetImage",
            json!({"reference": "localhost/cstor-test/small"}),
        )
        .unwrap();
    assert!(r.value["result"].is_object(), "{}", r.value);
    let (status, _) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    store.destroy().unwrap();
}
