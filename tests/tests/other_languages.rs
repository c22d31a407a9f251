//! Story: someone writes a client in another language from docs/protocol.md alone. The
//! Python client printed in that document (contrib/python/minimal_client.py, the same bytes)
//! rebuilds layers over the real socket, with the helper's fds, and gets their diff ids, also
//! for a layer of thousands of files when it may hold no more than 1024 fds.

use std::process::Command;

use cstor_tests::{skip, standard_images_or_skip};

/// The program printed in section 10.2 of docs/protocol.md: the first `python` block of
/// that section, up to its closing fence.
fn documented_python_client(doc: &str) -> &str {
    let (_, section) = doc
        .split_once("\n### 10.2 ")
        .expect("docs/protocol.md has a section 10.2");
    let section = section.split("\n### ").next().unwrap_or(section);
    let (_, block) = section
        .split_once("\n```python\n")
        .expect("section 10.2 of docs/protocol.md holds a python block");
    let (program, _) = block
        .split_once("\n```\n")
        .expect("the python block of section 10.2 is closed");
    // The newline before the fence ends the program's last line.
    &block[..program.len() + 1]
}

/// Runs the Python client on `image`, writing its top layer to a temporary file, and checks
/// that the rebuilt tar has the layer's diff id. `prefix` is a command that runs python3
/// (prlimit...), if any.
fn rebuild_top_layer(prefix: &[&str], image: &str, store: &cstor_tests::PodmanStore) {
    let script = cstor_tests::workspace_root().join("contrib/python/minimal_client.py");
    let out_tar = tempfile::NamedTempFile::new().unwrap();
    let mut argv = prefix.to_vec();
    argv.push("python3");
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]);
    let out = command
        .arg(&script)
        .arg(image)
        .arg(out_tar.path())
        .arg("--root")
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .env("CSTOR_HELPER", cstor_tests::helper_binary().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{image}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("top layer: ('sha256:") && last.ends_with(", True)"),
        "{image}: {stdout}"
    );
}

#[test]
fn the_python_client_in_the_repository_is_the_program_the_document_prints() {
    let root = cstor_tests::workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/protocol.md")).unwrap();
    let file = std::fs::read_to_string(root.join("contrib/python/minimal_client.py")).unwrap();
    let printed = documented_python_client(&doc);
    if printed != file {
        let line = printed
            .lines()
            .zip(file.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| printed.lines().count().min(file.lines().count()));
        panic!(
            "contrib/python/minimal_client.py differs from the program in section 10.2 of \
             docs/protocol.md from line {} on; copy one onto the other",
            line + 1
        );
    }
}

#[test]
fn the_documented_python_client_rebuilds_layers() {
    let test = "the_documented_python_client_rebuilds_layers";
    if !skip::require_tools(test, &["python3"]) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    // The pure-Python CRC is slow: use the images whose top layers are small.
    for image in [&images.commit, &images.loaded, &images.small] {
        rebuild_top_layer(&[], &image.name, &images.store);
    }
}

/// Section 6.4: a client holds no more content fds than its limit leaves room for. The
/// layer has more files than the helper queues ahead, and the client and the helper it
/// starts may each open 1024 fds.
#[test]
fn the_documented_python_client_reads_3000_files_with_1024_fds() {
    let test = "the_documented_python_client_reads_3000_files_with_1024_fds";
    if !skip::require_root(test)
        || !skip::require_tools(test, &["python3", "podman", "tar", "prlimit"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = cstor_tests::many_files_store(
        &dir.path().join("store"),
        dir.path(),
        "localhost/many-files:latest",
        3000,
        30,
        |i| format!("file {i}\n"),
    )
    .unwrap();
    rebuild_top_layer(
        &["prlimit", "--nofile=1024:1024", "--"],
        &image.name,
        &store,
    );
    store.destroy().unwrap();
}
