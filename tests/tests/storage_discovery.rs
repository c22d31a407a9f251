//! Story: the helper finds the storage the way podman does (storage.conf, environment,
//! flags), follows layer chains into additional image stores, and refuses storage kept by
//! another graph driver with an error that names it.

use std::path::Path;
use std::process::{Command, Output};

use cstor_tests::{PodmanStore, run_command, skip, small_private_store};
use serde_json::Value;

/// `cstor SUBCOMMAND` with the helper under test, started directly.
fn cstor(subcommand: &str) -> Command {
    let helper = cstor_tests::helper_binary().unwrap();
    let mut c = Command::new(helper.with_file_name("cstor"));
    c.arg(subcommand)
        .arg("--helper")
        .arg(&helper)
        .arg("--privilege")
        .arg("direct");
    // Only what a test sets decides the storage.
    c.env_remove("CONTAINERS_STORAGE_CONF")
        .env_remove("STORAGE_DRIVER")
        .env_remove("STORAGE_OPTS");
    c
}

fn json_of(out: Output) -> Value {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn storage_conf_from_the_environment_is_honoured() {
    let test = "storage_conf_from_the_environment_is_honoured";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, small) = small_private_store(dir.path()).unwrap();
    // The store's private storage.conf names its graphroot and runroot; no flag is given.
    let out = cstor("inspect")
        .env("CONTAINERS_STORAGE_CONF", &store.storage_conf)
        .args(["--json", &small.name])
        .output()
        .unwrap();
    let v = json_of(out);
    assert_eq!(v["id"], Value::from(small.id.clone()));
    assert_eq!(v["store"], Value::from(store.root.to_str().unwrap()));
    // The same through the flag.
    let out = cstor("images")
        .arg("--storage-conf")
        .arg(&store.storage_conf)
        .args(["--json"])
        .output()
        .unwrap();
    let v = json_of(out);
    assert_eq!(v.as_array().unwrap().len(), 1);
    // A storage.conf that names a missing file is a clear error.
    let out = cstor("images")
        .env("CONTAINERS_STORAGE_CONF", dir.path().join("nope.conf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.conf"), "{err}");
    store.destroy().unwrap();
}

/// Builds store B with a base image, then in store A (B as additional image store) commits a
/// layer on top of it: A's layer has its parent, and its overlay lower link, in B.
fn stores_with_a_chain_across(dir: &Path) -> (PodmanStore, PodmanStore) {
    let (b, base) = small_private_store(&dir.join("b")).unwrap();
    let a = PodmanStore::new(&dir.join("a")).unwrap();
    let opt = format!("overlay.imagestore={}", b.root.display());
    let podman_a = |args: &[&str]| {
        let mut c = a.podman();
        c.args(["--storage-opt", &opt]).args(args);
        run_command(&mut c, "podman on store A with B as additional image store").unwrap()
    };
    let c = podman_a(&["create", &base.name, "/bin/true"]);
    let c = c.lines().last().unwrap().trim().to_owned();
    let m = podman_a(&["mount", &c]);
    std::fs::write(Path::new(m.trim()).join("etc/top"), "top layer\n").unwrap();
    podman_a(&["umount", &c]);
    podman_a(&["commit", "--quiet", &c, "localhost/top:latest"]);
    podman_a(&["rm", &c]);
    (a, b)
}

#[test]
fn layer_chains_cross_into_additional_image_stores() {
    let test = "layer_chains_cross_into_additional_image_stores";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = stores_with_a_chain_across(dir.path());
    for how in [
        vec![
            "--additional-image-store".to_owned(),
            b.root.display().to_string(),
        ],
        vec![
            "--storage-opt".to_owned(),
            format!("overlay.imagestore={}", b.root.display()),
        ],
    ] {
        let base = [
            "--root",
            a.root.to_str().unwrap(),
            "--runroot",
            a.runroot.to_str().unwrap(),
        ];
        let out = cstor("inspect")
            .args(base)
            .args(&how)
            .args(["--json", "localhost/top"])
            .output()
            .unwrap();
        let v = json_of(out);
        let layers = v["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["store"], Value::from(b.root.to_str().unwrap()));
        assert_eq!(layers[1]["store"], Value::from(a.root.to_str().unwrap()));
        let out = cstor("verify")
            .args(base)
            .args(&how)
            .args(["--json", "localhost/top"])
            .output()
            .unwrap();
        let v = json_of(out);
        assert_eq!(v["layers"].as_array().unwrap().len(), 2);
        // Images of the additional store are listed after the primary's.
        let out = cstor("images")
            .args(base)
            .args(&how)
            .args(["--json"])
            .output()
            .unwrap();
        let v = json_of(out);
        let stores: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["store"].as_str().unwrap())
            .collect();
        assert_eq!(stores, [a.root.to_str().unwrap(), b.root.to_str().unwrap()]);
    }
    a.destroy().unwrap();
    b.destroy().unwrap();
}

#[test]
fn other_graph_drivers_are_named_in_the_error() {
    let test = "other_graph_drivers_are_named_in_the_error";
    if !skip::require_root(test) || !skip::require_tools(test, &["podman"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vfs-root");
    let rootfs = dir.path().join("rootfs");
    cstor_tests::rootfs::write_small_rootfs(&rootfs, "vfs").unwrap();
    let tar = dir.path().join("vfs.tar");
    cstor_tests::tar_rootfs(&rootfs, &tar).unwrap();
    let run = format!("/run/cstor-vfs-{}", std::process::id());
    run_command(
        Command::new("podman")
            .arg("--root")
            .arg(&root)
            .args([
                "--runroot",
                &run,
                "--storage-driver",
                "vfs",
                "import",
                "--quiet",
            ])
            .arg(&tar)
            .arg("localhost/vfs-image"),
        "importing into a vfs store",
    )
    .unwrap();
    // Found from the directory layout...
    let out = cstor("images")
        .arg("--root")
        .arg(&root)
        .args(["--runroot", &run])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"vfs\""), "{err}");
    // ...and from the configuration.
    let out = cstor("images")
        .arg("--root")
        .arg(&root)
        .args(["--runroot", &run, "--storage-driver", "btrfs"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"btrfs\""), "{err}");
    let _ = std::fs::remove_dir_all(&run);
}

/// bootc hands over storage it already opened: an open directory fd works like a path.
#[test]
fn storage_given_as_an_open_directory() {
    let Some(images) = cstor_tests::standard_images_or_skip("storage_given_as_an_open_directory")
    else {
        return;
    };
    let dir = std::fs::File::open(&images.store.root).unwrap();
    let mut config = cstor_proxy_client::HelperConfig::default()
        .program(cstor_tests::helper_binary().unwrap())
        .privilege(cstor_proxy_client::Privilege::Direct);
    config.graphroot_fd = Some(std::sync::Arc::new(dir.into()));
    cstor_tests::session::runtime().block_on(async {
        let client = cstor_proxy_client::Client::spawn(&config).await.unwrap();
        let img = client.get_image(&images.small.name).await.unwrap();
        assert_eq!(img.id, images.small.id);
        let l = client.open_layer(&img.layers[0].id).await.unwrap();
        l.write_tar(std::io::sink()).await.unwrap();
        client.shutdown().await.unwrap();
    });
}
