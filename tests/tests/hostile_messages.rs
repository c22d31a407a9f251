//! Story: a peer that is buggy or hostile sends the helper huge messages, floods it with
//! pipelined requests it never reads the replies of, uses request ids that cannot be echoed,
//! nests JSON ten thousand deep, races `GetLayer` against the open-layer limit, and types
//! broken lines into `--stdio`. Each gets a clear JSON-RPC error; the helper's memory stays
//! within a few tens of megabytes whatever the input; it never panics; and where the byte
//! stream can still be trusted it goes on serving.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cstor_tests::session::{RawHelper, error_code};
use cstor_tests::{PodmanStore, skip, small_private_store};
use serde_json::{Value, json};

/// Memory a helper may use, whatever it is sent: its own footprint is a few MB.
const MAX_HELPER_KIB: u64 = 40 << 10;

fn store(test: &str) -> Option<(tempfile::TempDir, PodmanStore, cstor_tests::ImageRef)> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = small_private_store(dir.path()).unwrap();
    Some((dir, store, image))
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn assert_clean_exit(h: RawHelper) {
    let (status, stderr) = h.finish(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_huge_request_is_refused_before_it_is_buffered() {
    let Some((_dir, store, _)) = store("a_huge_request_is_refused_before_it_is_buffered") else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    let limits = h.initialize().unwrap()["limits"].clone();
    let max = limits["max_request_bytes"].as_u64().unwrap();
    assert_eq!(max, 64 << 10);
    // 16 MB of one request: the helper reads its first 64 KiB, answers and closes.
    let pid = h.child.id();
    let mut big =
        br#"{"jsonrpc":"2.0","id":5,"method":"GetImage","params":{"reference":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 16 << 20));
    big.extend(br#""}}"#);
    // The helper stops reading once it refused: our write fails with EPIPE/ECONNRESET then.
    let _ = h.send(&big);
    let reply = h
        .recv()
        .unwrap()
        .expect("an error reply before the connection closes");
    assert_eq!(error_code(&reply.value), Some(-32600), "{}", reply.value);
    assert_eq!(reply.value["id"], Value::Null);
    let msg = reply.value["error"]["message"].as_str().unwrap();
    assert!(msg.contains("larger than 65536 bytes"), "{msg}");
    assert!(
        h.recv().unwrap().is_none(),
        "the connection is closed after it"
    );
    let peak = status_kib(pid, "VmHWM:");
    assert!(peak == 0 || peak < MAX_HELPER_KIB, "helper peak {peak} KiB");
    assert_clean_exit(h);
}

#[test]
fn a_flood_of_pipelined_requests_is_read_no_faster_than_it_is_answered() {
    let Some((_dir, store, _)) =
        store("a_flood_of_pipelined_requests_is_read_no_faster_than_it_is_answered")
    else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    let limits = h.initialize().unwrap()["limits"].clone();
    assert_eq!(limits["max_requests_in_flight"].as_u64(), Some(64));
    let pid = h.child.id();
    const N: u64 = 60_000;
    // Write every request from another thread without reading a single reply.
    let mut writer = h.sock.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for id in 1..=N {
            buf.extend(
                format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"KeepAlive","params":{{"handle":{id}}}}}"#
                )
                .as_bytes(),
            );
            if buf.len() > 1 << 16 {
                writer.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        writer.write_all(&buf).unwrap();
    });
    // Nobody reads: the replies fill the socket, the helper stops reading requests.
    std::thread::sleep(Duration::from_secs(2));
    let rss_while_flooded = status_kib(pid, "VmRSS:");
    assert!(
        rss_while_flooded < MAX_HELPER_KIB,
        "helper RSS {rss_while_flooded} KiB while flooded"
    );
    assert!(
        !sender.is_finished(),
        "60k requests cannot all have been read"
    );
    // Now read: every request is answered, under its own id.
    let mut seen = vec![false; N as usize + 1];
    for _ in 0..N {
        let r = h.recv().unwrap().expect("a reply");
        assert_eq!(error_code(&r.value), Some(1500), "{}", r.value);
        let id = r.value["id"].as_u64().unwrap();
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "{id} twice"
        );
    }
    sender.join().unwrap();
    assert!(seen[1..].iter().all(|s| *s));
    let peak = status_kib(pid, "VmHWM:");
    assert!(peak < MAX_HELPER_KIB, "helper peak {peak} KiB");
    assert_clean_exit(h);
}

#[test]
fn request_ids_come_back_unchanged_or_not_at_all() {
    let Some((_dir, store, _)) = store("request_ids_come_back_unchanged_or_not_at_all") else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    h.initialize().unwrap();
    for id in [
        "18446744073709551615",
        "-9223372036854775808",
        "\"a string\"",
        "{\"x\":[1]}",
    ] {
        h.send(
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"KeepAlive","params":{{"handle":1}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let r = h.recv().unwrap().unwrap();
        let sent: Value = serde_json::from_str(id).unwrap();
        assert_eq!(r.value["id"], sent, "{}", r.value);
        assert_eq!(error_code(&r.value), Some(1500));
    }
    for id in ["18446744073709551616", "1.5"] {
        h.send(
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"KeepAlive","params":{{"handle":1}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let r = h.recv().unwrap().unwrap();
        assert_eq!(r.value["id"], Value::Null, "{id}: {}", r.value);
        assert_eq!(error_code(&r.value), Some(-32600), "{id}: {}", r.value);
    }
    assert_clean_exit(h);
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let Some((_dir, store, _)) = store("deep_nesting_is_an_error_not_a_crash") else {
        return;
    };
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    h.initialize().unwrap();
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"GetImage","params":{{"reference":{}{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    h.send(deep.as_bytes()).unwrap();
    let r = h.recv().unwrap().expect("an error reply");
    assert!(
        matches!(error_code(&r.value), Some(-32700 | -32600 | -32602)),
        "{}",
        r.value
    );
    assert_clean_exit(h);
}

#[test]
fn concurrent_get_layer_calls_respect_the_open_layer_limit() {
    let Some((_dir, store, image)) =
        store("concurrent_get_layer_calls_respect_the_open_layer_limit")
    else {
        return;
    };
    let layer = store.image_layers(&image.id).unwrap()[0].clone();
    let mut h = RawHelper::spawn(&store, &[]).unwrap();
    let max = h.initialize().unwrap()["limits"]["max_open_layers"]
        .as_u64()
        .unwrap();
    // All at once, before any is answered: each one is checked against the others.
    let mut all = Vec::new();
    for id in 1..=100u64 {
        all.extend(
            serde_json::to_vec(&json!({"jsonrpc":"2.0","id":id,"method":"GetLayer",
                "params":{"layer": layer}}))
            .unwrap(),
        );
    }
    h.send(&all).unwrap();
    let (mut opened, mut refused) = (0u64, 0u64);
    for _ in 0..100 {
        let r = h.recv().unwrap().expect("a reply to every GetLayer");
        match error_code(&r.value) {
            None => {
                assert_eq!(r.fds.len(), 1, "one stream fd");
                opened += 1;
            }
            Some(1502) => refused += 1,
            other => panic!("unexpected {other:?}: {}", r.value),
        }
    }
    assert_eq!(opened, max, "exactly max_open_layers handles");
    assert_eq!(refused, 100 - max);
    assert_clean_exit(h);
}

#[test]
fn stdio_survives_broken_and_huge_lines() {
    let Some((_dir, store, _)) = store("stdio_survives_broken_and_huge_lines") else {
        return;
    };
    let mut child = Command::new(cstor_tests::helper_binary().unwrap())
        .arg("--stdio")
        .arg("--root")
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).unwrap();
        out
    });
    stdin.write_all(b"\xff\xfe not utf-8\n").unwrap();
    // 100 MB on one line, then a valid request: the line is skipped as it streams by.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        stdin.write_all(&chunk).unwrap();
    }
    stdin.write_all(b"\n").unwrap();
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"ListImages\"}\n")
        .unwrap();
    stdin.flush().unwrap();
    // The pipe is small: the helper has read all but the last bytes by now.
    std::thread::sleep(Duration::from_millis(500));
    let peak = status_kib(pid, "VmHWM:");
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let out = reader.join().unwrap();
    let values: Vec<Value> = serde_json::Deserializer::from_slice(&out)
        .into_iter::<Value>()
        .map(|v| v.unwrap())
        .collect();
    assert_eq!(values.len(), 3, "{values:?}");
    assert_eq!(error_code(&values[0]), Some(-32700), "{}", values[0]);
    assert!(
        values[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    assert_eq!(error_code(&values[1]), Some(-32600), "{}", values[1]);
    assert_eq!(values[2]["id"], json!(7));
    assert!(values[2]["result"]["images"].is_array(), "{}", values[2]);
    assert!(peak == 0 || peak < MAX_HELPER_KIB, "helper peak {peak} KiB");
}
