//! Story: someone debugging types JSON into `cstor-helper --stdio`, without any handshake,
//! lists images, inspects one, looks at a layer's files and dumps its tar; typos get JSON-RPC
//! errors and the session goes on.

use std::io::Write;
use std::process::{Command, Stdio};

use cstor_tests::standard_images_or_skip;
use serde_json::{Value, json};

fn run_stdio(
    args: &[&str],
    store: &cstor_tests::PodmanStore,
    input: &str,
) -> (Vec<Value>, std::process::Output) {
    let mut child = Command::new(cstor_tests::helper_binary().unwrap())
        .arg("--stdio")
        .arg("--root")
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let values = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|v| v.expect("stdout holds JSON values only"))
        .collect();
    (values, out)
}

#[test]
fn a_newcomer_lists_images_and_dumps_a_layer() {
    let Some(images) = standard_images_or_skip("a_newcomer_lists_images_and_dumps_a_layer") else {
        return;
    };
    let dump = tempfile::tempdir().unwrap();
    let features = &images.features;
    let layer = images.store.image_layers(&features.id).unwrap()[0].clone();
    let lines = [
        json!({"jsonrpc":"2.0","id":1,"method":"ListImages"}).to_string(),
        json!({"jsonrpc":"2.0","id":2,"method":"GetImage","params":{"reference": features.name}})
            .to_string(),
        "this is not json".to_owned(),
        json!({"jsonrpc":"2.0","id":3,"method":"GetLayer","params":{"layer": layer}}).to_string(),
        json!({"jsonrpc":"2.0","id":4,"method":"FetchFds","params":{"handle":1,"max":10}})
            .to_string(),
        json!({"jsonrpc":"2.0","id":5,"method":"GetImage","params":{"reference":"nope"}})
            .to_string(),
        json!({"jsonrpc":"2.0","id":6,"method":"Frobnicate"}).to_string(),
        json!({"jsonrpc":"2.0","method":"ListImages"}).to_string(),
        json!({"jsonrpc":"1.0","id":7,"method":"ListImages"}).to_string(),
        json!({"jsonrpc":"2.0","id":8,"method":"Shutdown"}).to_string(),
        json!({"jsonrpc":"2.0","id":9,"method":"ListImages"}).to_string(),
    ];
    let (replies, out) = run_stdio(
        &["--dump-tar", dump.path().to_str().unwrap()],
        &images.store,
        &(lines.join("\n") + "\n"),
    );
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The notification gets no reply; nothing after Shutdown is read.
    let ids: Vec<Value> = replies.iter().map(|r| r["id"].clone()).collect();
    assert_eq!(
        ids,
        vec![
            json!(1),
            json!(2),
            Value::Null,
            json!(3),
            json!(4),
            json!(5),
            json!(6),
            json!(7),
            json!(8)
        ]
    );

    let names: Vec<&str> = replies[0]["result"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| {
            i["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
        })
        .collect();
    assert!(names.contains(&features.name.as_str()), "{names:?}");

    assert_eq!(replies[1]["result"]["id"], json!(features.id));
    assert_eq!(replies[2]["error"]["code"], json!(-32700));

    let described = &replies[3]["result"]["described"];
    let entries = described["entries"].as_array().unwrap();
    assert_eq!(described["truncated"], json!(false));
    let tar = &described["tar"];
    assert_eq!(tar["matches_diff_id"], json!(true), "{tar}");
    let path = tar["path"].as_str().unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        tar["size"].as_u64().unwrap()
    );
    // Every file with content names the fd that would carry it, with its size.
    let big = entries
        .iter()
        .find(|e| {
            e["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("opt/big/random.bin"))
        })
        .expect("the 50 MB file is described");
    assert_eq!(big["fd"]["type"], json!("regular"));
    assert_eq!(big["fd"]["size"], json!(50 * 1024 * 1024));
    // The non-UTF-8 name comes with its exact bytes.
    assert!(
        entries.iter().any(|e| e.get("name_base64").is_some()),
        "a non-UTF-8 name is described with name_base64"
    );

    assert_eq!(
        replies[4]["error"]["data"]["kind"],
        json!("unavailable-in-stdio")
    );
    assert_eq!(
        replies[5]["error"]["data"]["kind"],
        json!("image-not-found")
    );
    assert_eq!(replies[6]["error"]["code"], json!(-32601));
    assert_eq!(replies[7]["error"]["code"], json!(-32600));
    assert_eq!(replies[8]["result"], json!({}));
}

#[test]
fn describe_limit_truncates_the_listing_but_not_the_dump() {
    let Some(images) =
        standard_images_or_skip("describe_limit_truncates_the_listing_but_not_the_dump")
    else {
        return;
    };
    let dump = tempfile::tempdir().unwrap();
    let layer = images.store.image_layers(&images.features.id).unwrap()[0].clone();
    let line = json!({"jsonrpc":"2.0","id":1,"method":"GetLayer","params":{"layer": layer}});
    let (replies, out) = run_stdio(
        &[
            "--describe-limit",
            "10",
            "--dump-tar",
            dump.path().to_str().unwrap(),
        ],
        &images.store,
        &format!("{line}\n"),
    );
    assert!(out.status.success());
    let d = &replies[0]["result"]["described"];
    assert_eq!(d["entries"].as_array().unwrap().len(), 10);
    assert_eq!(d["truncated"], json!(true));
    assert_eq!(d["tar"]["matches_diff_id"], json!(true));
    assert!(d["summary"]["entries"].as_u64().unwrap() > 1000);
}

#[test]
fn a_terminal_on_fd_0_gets_pointed_to_stdio() {
    let out = Command::new(cstor_tests::helper_binary().unwrap())
        .args(["--root", "/nonexistent-for-sure"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent-for-sure"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(cstor_tests::helper_binary().unwrap())
        .arg("--root")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--stdio"), "{err}");
}
