//! Story: someone writes a client in another language from docs/protocol.md alone. The
//! Python client printed in that document (contrib/python/minimal_client.py) rebuilds layers
//! over the real socket, with the helper's fds, and gets their diff ids.

use std::process::Command;

use cstor_tests::{skip, standard_images_or_skip};

#[test]
fn the_documented_python_client_rebuilds_layers() {
    let test = "the_documented_python_client_rebuilds_layers";
    if !skip::require_tools(test, &["python3"]) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let script = cstor_tests::workspace_root().join("contrib/python/minimal_client.py");
    // The pure-Python CRC is slow: use the images whose top layers are small.
    for image in [&images.commit, &images.loaded, &images.small] {
        let out_tar = tempfile::NamedTempFile::new().unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&image.name)
            .arg(out_tar.path())
            .arg("--root")
            .arg(&images.store.root)
            .arg("--runroot")
            .arg(&images.store.runroot)
            .env("CSTOR_HELPER", cstor_tests::helper_binary().unwrap())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}\n{}",
            image.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("top layer: ('sha256:") && last.ends_with(", True)"),
            "{}: {stdout}",
            image.name
        );
    }
}
