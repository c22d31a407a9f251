//! Story: storage gets corrupted, files change under podman's feet, a tar-split tries to
//! escape, clients send garbage. Every case gets a clear error with a stable code, the helper
//! never panics, and no lock stays held: `podman rmi` works right afterwards.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use cstor_protocol::ErrorCode;
use cstor_protocol::assemble::AssembleError;
use cstor_proxy_client::Error;
use cstor_tests::session::{RawHelper, client_for, error_code, runtime};
use cstor_tests::{ImageRef, PodmanStore, skip, small_private_store};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

struct Case {
    _dir: tempfile::TempDir,
    store: PodmanStore,
    image: ImageRef,
    layer: String,
}

fn case(test: &str) -> Option<Case> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = small_private_store(dir.path()).unwrap();
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    Some(Case {
        _dir: dir,
        store,
        image,
        layer,
    })
}

impl Case {
    /// Rebuilds the layer through a fresh helper and returns the error.
    fn export_error(&self) -> Error {
        runtime().block_on(async {
            let client = client_for(&self.store).await.unwrap();
            let err = match client.open_layer(&self.layer).await {
                Ok(l) => l.write_tar(std::io::sink()).await.unwrap_err(),
                Err(e) => e,
            };
            // The helper is still alive and answering after the failure.
            client.list_images().await.unwrap();
            client.shutdown().await.unwrap();
            err
        })
    }

    fn tar_split(&self) -> Vec<u8> {
        let gz = std::fs::read(self.store.tar_split_path(&self.layer)).unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out).unwrap();
        out
    }

    fn write_tar_split(&self, ndjson: &[u8]) {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(ndjson).unwrap();
        std::fs::write(
            self.store.tar_split_path(&self.layer),
            enc.finish().unwrap(),
        )
        .unwrap();
    }

    /// No lock is left behind: podman can delete the image at once.
    fn podman_can_still_write(self) {
        let mut child =
            cstor_tests::session::podman_background(&self.store, &["rmi", "-f", &self.image.id])
                .unwrap();
        let status = cstor_tests::session::wait_with_timeout(&mut child, Duration::from_secs(20))
            .expect("podman rmi finished: no lock was left held");
        assert!(status.success());
        self.store.destroy().unwrap();
    }
}

fn assert_code(e: &Error, code: ErrorCode) {
    assert_eq!(e.code(), Some(code), "{e}");
}

#[test]
fn corrupt_tar_split_gzip() {
    let Some(c) = case("corrupt_tar_split_gzip") else {
        return;
    };
    std::fs::write(c.store.tar_split_path(&c.layer), b"this is not gzip at all").unwrap();
    assert_code(&c.export_error(), ErrorCode::CorruptTarSplit);
    c.podman_can_still_write();
}

#[test]
fn corrupt_tar_split_json() {
    let Some(c) = case("corrupt_tar_split_json") else {
        return;
    };
    let mut ts = c.tar_split();
    ts.extend_from_slice(b"{\"type\":1,\"name\":\"x\",\"size\":\"many\"}\n");
    c.write_tar_split(&ts);
    let e = c.export_error();
    assert_code(&e, ErrorCode::CorruptTarSplit);
    assert!(e.to_string().contains("line"), "{e}");
    c.podman_can_still_write();
}

#[test]
fn truncated_tar_split_is_not_a_complete_layer() {
    let Some(c) = case("truncated_tar_split_is_not_a_complete_layer") else {
        return;
    };
    let ts = String::from_utf8(c.tar_split()).unwrap();
    // Drop the last segment that holds bytes (the end-of-archive blocks): the tar is short.
    let mut lines: Vec<&str> = ts.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["type"] == 2 && v["payload"].as_str().is_some_and(|p| !p.is_empty())
        })
        .unwrap();
    lines.truncate(last);
    c.write_tar_split((lines.join("\n") + "\n").as_bytes());
    let e = c.export_error();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    c.podman_can_still_write();
}

#[test]
fn file_changed_with_same_size_fails_the_crc() {
    let Some(c) = case("file_changed_with_same_size_fails_the_crc") else {
        return;
    };
    let f = c.store.layer_diff_dir(&c.layer).join("etc/motd");
    let mut content = std::fs::read(&f).unwrap();
    content[0] ^= 0x20;
    std::fs::write(&f, content).unwrap();
    let e = c.export_error();
    assert!(
        matches!(&e, Error::Assemble { cause: AssembleError::Crc { name, .. }, .. } if name.ends_with("etc/motd")),
        "{e}"
    );
    c.podman_can_still_write();
}

#[test]
fn file_changed_in_size_is_a_checksum_mismatch() {
    let Some(c) = case("file_changed_in_size_is_a_checksum_mismatch") else {
        return;
    };
    let f = c.store.layer_diff_dir(&c.layer).join("usr/share/data.txt");
    std::fs::write(&f, b"shorter").unwrap();
    let e = c.export_error();
    assert_code(&e, ErrorCode::ChecksumMismatch);
    assert!(e.to_string().contains("data.txt"), "{e}");
    c.podman_can_still_write();
}

#[test]
fn missing_file_is_named() {
    let Some(c) = case("missing_file_is_named") else {
        return;
    };
    std::fs::remove_file(c.store.layer_diff_dir(&c.layer).join("usr/bin/run.sh")).unwrap();
    let e = c.export_error();
    assert_code(&e, ErrorCode::MissingFile);
    assert!(e.to_string().contains("run.sh"), "{e}");
    c.podman_can_still_write();
}

/// Rewrites the name of the tar-split entry for `etc/motd` (keeping its size and CRC).
fn rename_entry(c: &Case, to: &str) {
    let ts = String::from_utf8(c.tar_split()).unwrap();
    let mut out = String::new();
    for line in ts.lines() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        if v["name"].as_str().is_some_and(|n| n.ends_with("etc/motd")) {
            v["name"] = json!(to);
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    c.write_tar_split(out.as_bytes());
}

#[test]
fn dot_dot_names_are_refused() {
    let Some(c) = case("dot_dot_names_are_refused") else {
        return;
    };
    rename_entry(&c, "./etc/../../../../../../etc/passwd");
    assert_code(&c.export_error(), ErrorCode::PathEscape);
    c.podman_can_still_write();
}

#[test]
fn absolute_symlink_escapes_are_refused() {
    let Some(c) = case("absolute_symlink_escapes_are_refused") else {
        return;
    };
    std::os::unix::fs::symlink("/etc", c.store.layer_diff_dir(&c.layer).join("evil")).unwrap();
    rename_entry(&c, "./evil/passwd");
    let e = c.export_error();
    assert_code(&e, ErrorCode::PathEscape);
    c.podman_can_still_write();
}

#[test]
fn relative_symlink_escapes_are_refused() {
    let Some(c) = case("relative_symlink_escapes_are_refused") else {
        return;
    };
    std::os::unix::fs::symlink(
        "../../../../../../../../../../etc",
        c.store.layer_diff_dir(&c.layer).join("evil"),
    )
    .unwrap();
    rename_entry(&c, "evil/passwd");
    assert_code(&c.export_error(), ErrorCode::PathEscape);
    c.podman_can_still_write();
}

#[test]
fn absolute_names_stay_inside_the_layer() {
    let Some(c) = case("absolute_names_stay_inside_the_layer") else {
        return;
    };
    // "/etc/motd" means the layer's etc/motd, never the host's.
    rename_entry(&c, "/etc/motd");
    runtime().block_on(async {
        let client = client_for(&c.store).await.unwrap();
        let l = client.open_layer(&c.layer).await.unwrap();
        // The bytes rebuilt are the layer's own, so the diff id still matches.
        l.write_tar(Vec::new()).await.unwrap();
        client.shutdown().await.unwrap();
    });
    c.podman_can_still_write();
}

#[test]
fn a_symlink_where_a_file_should_be_is_refused() {
    let Some(c) = case("a_symlink_where_a_file_should_be_is_refused") else {
        return;
    };
    let f = c.store.layer_diff_dir(&c.layer).join("etc/motd");
    std::fs::remove_file(&f).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &f).unwrap();
    assert_code(&c.export_error(), ErrorCode::MissingFile);
    c.podman_can_still_write();
}

#[test]
fn corrupt_layers_json_is_reported() {
    let Some(c) = case("corrupt_layers_json_is_reported") else {
        return;
    };
    let p = c.store.root.join("overlay-layers/layers.json");
    let orig = std::fs::read(&p).unwrap();
    std::fs::write(&p, b"[{\"id\": 42").unwrap();
    let e = runtime().block_on(async {
        let client = client_for(&c.store).await.unwrap();
        let e = client.get_image(&c.image.name).await.unwrap_err();
        client.shutdown().await.unwrap();
        e
    });
    assert_code(&e, ErrorCode::CorruptMetadata);
    assert!(e.to_string().contains("layers.json"), "{e}");
    std::fs::write(&p, orig).unwrap();
    c.podman_can_still_write();
}

#[test]
fn unknown_images_and_layers() {
    let Some(c) = case("unknown_images_and_layers") else {
        return;
    };
    runtime().block_on(async {
        let client = client_for(&c.store).await.unwrap();
        assert_code(
            &client
                .get_image("localhost/nothing-here")
                .await
                .unwrap_err(),
            ErrorCode::ImageNotFound,
        );
        assert_code(
            &client.open_layer(&"0".repeat(64)).await.unwrap_err(),
            ErrorCode::LayerNotFound,
        );
        assert_code(
            &client.open_layer("not-a-layer").await.unwrap_err(),
            ErrorCode::InvalidParams,
        );
        client.shutdown().await.unwrap();
    });
    c.podman_can_still_write();
}

/// A helper that only ever saw garbage still exits cleanly, not with a panic.
fn assert_clean_exit(h: RawHelper) {
    let (status, stderr) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn protocol_garbage_gets_json_rpc_errors() {
    let Some(c) = case("protocol_garbage_gets_json_rpc_errors") else {
        return;
    };
    let mut h = RawHelper::spawn(&c.store, &[]).unwrap();
    // Before Initialize.
    let r = h.call(1, "ListImages", json!({})).unwrap();
    assert_eq!(error_code(&r.value), Some(1001));
    let r = h
        .call(2, "Initialize", json!({"protocol_version": "2.0"}))
        .unwrap();
    assert_eq!(error_code(&r.value), Some(1002));
    let r = h
        .call(3, "Initialize", json!({"protocol_version": "one"}))
        .unwrap();
    assert_eq!(error_code(&r.value), Some(-32602));
    h.initialize().unwrap();
    // Valid JSON, invalid JSON-RPC: the connection survives each.
    for (bytes, code) in [
        (&br#"{"jsonrpc":"2.0","id":4}"#[..], -32600),
        (br#"{"jsonrpc":"1.0","id":5,"method":"ListImages"}"#, -32600),
        (br#"[1,2,3]"#, -32600),
        (br#"{"jsonrpc":"2.0","id":6,"method":7}"#, -32600),
        (br#"{"jsonrpc":"2.0","id":7,"method":"Nope"}"#, -32601),
        (
            br#"{"jsonrpc":"2.0","id":8,"method":"GetImage","params":{"reference":5}}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":9,"method":"GetImage","params":[1]}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","id":10,"method":"FetchFds","params":{"handle":99,"max":1}}"#,
            1500,
        ),
        (
            br#"{"jsonrpc":"2.0","id":11,"method":"ReleaseLayer","params":{"handle":99}}"#,
            1500,
        ),
    ] {
        h.send(bytes).unwrap();
        let r = h.recv().unwrap().expect("a reply");
        assert_eq!(
            error_code(&r.value),
            Some(code),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        assert!(r.value["error"]["data"]["kind"].is_string());
    }
    let r = h.call(12, "ListImages", json!({})).unwrap();
    assert!(r.value["result"]["images"].is_array());
    // Bytes that are not JSON desynchronise the stream: an error, then the helper hangs up.
    h.send(b"}{ not json").unwrap();
    let r = h.recv().unwrap().expect("a parse error reply");
    assert_eq!(error_code(&r.value), Some(-32700));
    assert!(
        h.recv().unwrap().is_none(),
        "the helper closes the connection"
    );
    assert_clean_exit(h);
    c.podman_can_still_write();
}

#[test]
fn wrong_fd_counts() {
    let Some(c) = case("wrong_fd_counts") else {
        return;
    };
    let mut h = RawHelper::spawn(&c.store, &[]).unwrap();
    h.initialize().unwrap();
    // Fds where the method takes none: refused, closed, and the connection goes on.
    let f = std::fs::File::open("/dev/null").unwrap();
    let msg = br#"{"jsonrpc":"2.0","id":1,"method":"ListImages","fds":1}"#;
    h.send_with_fds(msg, &[f.as_fd()]).unwrap();
    let r = h.recv().unwrap().unwrap();
    assert_eq!(error_code(&r.value), Some(-32602));
    let r = h.call(2, "ListImages", json!({})).unwrap();
    assert!(r.value["result"].is_object());
    // A message announcing fds that never come, followed by another message: fatal.
    h.send(br#"{"jsonrpc":"2.0","id":3,"method":"ListImages","fds":2}"#)
        .unwrap();
    h.send(br#"{"jsonrpc":"2.0","id":4,"method":"ListImages"}"#)
        .unwrap();
    let r = h.recv().unwrap().expect("an fd error reply");
    assert_eq!(error_code(&r.value), Some(-32050), "{}", r.value);
    assert!(
        h.recv().unwrap().is_none(),
        "the helper closes the connection"
    );
    assert_clean_exit(h);
    c.podman_can_still_write();
}

#[test]
fn helper_death_is_reported_with_its_status() {
    let Some(c) = case("helper_death_is_reported_with_its_status") else {
        return;
    };
    runtime().block_on(async {
        let client = client_for(&c.store).await.unwrap();
        let layer = client.open_layer(&c.layer).await.unwrap();
        let pid = client.helper_pid().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let e = layer.write_tar(std::io::sink()).await.unwrap_err();
        assert!(
            matches!(&e, Error::HelperDied { .. } | Error::Assemble { .. }),
            "{e}"
        );
        let e = client.list_images().await.unwrap_err();
        let Error::HelperDied { status, .. } = &e else {
            panic!("{e}")
        };
        assert!(status.contains("signal: 9"), "{status}");
    });
    c.podman_can_still_write();
}

#[test]
fn missing_tar_split_is_named_by_id_and_by_diff_id() {
    let Some(c) = case("missing_tar_split_is_named_by_id_and_by_diff_id") else {
        return;
    };
    std::fs::remove_file(c.store.tar_split_path(&c.layer)).unwrap();
    let diff_id = c.store.layer_record(&c.layer).unwrap()["diff-digest"]
        .as_str()
        .unwrap()
        .to_owned();
    runtime().block_on(async {
        let client = client_for(&c.store).await.unwrap();
        for wanted in [c.layer.as_str(), diff_id.as_str()] {
            let e = client.open_layer(wanted).await.unwrap_err();
            assert_code(&e, ErrorCode::NoTarSplit);
        }
        // GetImage still works and says so.
        let img = client.get_image(&c.image.id).await.unwrap();
        assert!(!img.layers[0].tar_split);
        client.shutdown().await.unwrap();
    });
    c.podman_can_still_write();
}

/// A stream that fails keeps failing the same way: every later FetchFds on the handle
/// repeats the error instead of inventing another.
#[test]
fn a_failed_stream_reports_the_same_error_on_every_fetch() {
    let Some(c) = case("a_failed_stream_reports_the_same_error_on_every_fetch") else {
        return;
    };
    std::fs::write(
        c.store.layer_diff_dir(&c.layer).join("usr/share/data.txt"),
        b"shorter",
    )
    .unwrap();
    let mut h = RawHelper::spawn(&c.store, &[]).unwrap();
    h.initialize().unwrap();
    let r = h.call(1, "GetLayer", json!({"layer": c.layer})).unwrap();
    let handle = r.value["result"]["handle"].as_u64().unwrap();
    // Drain the stream so the producer runs to its failure.
    let mut stream = std::fs::File::from(r.fds.into_iter().next().unwrap());
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut all).unwrap();
    let mut codes = Vec::new();
    for id in 2..6 {
        let r = h
            .call(id, "FetchFds", json!({"handle": handle, "max": 100}))
            .unwrap();
        if let Some(code) = error_code(&r.value) {
            codes.push(code);
        }
    }
    assert!(codes.len() >= 2, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 1303), "{codes:?}");
    assert_clean_exit(h);
    c.podman_can_still_write();
}

#[test]
fn bad_command_line_values_exit_with_status_2() {
    for args in [
        &["--lease-timeout", "-1"][..],
        &["--lease-timeout", "soon"],
        &["--lock-timeout", "0"],
        &["--stdio", "--dump-tar", "/nonexistent/dir"],
        &["--describe-limit", "5"],
        &["--no-such-flag"],
    ] {
        let out = std::process::Command::new(cstor_tests::helper_binary().unwrap())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
