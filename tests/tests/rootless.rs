//! Story: a rootless user whose image holds a 0600 file owned by a subordinate uid and a
//! world-readable file inside a 0700 subordinate-uid directory. Alone, the user cannot read
//! them; through `podman unshare cstor-helper` every layer comes back bit-exact, equal to
//! what skopeo exports for the same user.

use std::io::Write;
use std::process::Stdio;

use cstor_tests::rootless::ROOTLESS_IMAGE_NAME;
use cstor_tests::session::public_binaries;
use cstor_tests::{rootless_feature_image, rootless_user_or_skip, run_command};
use serde_json::{Value, json};

/// The stories of this file build the same image for the same user
/// (`rootless_feature_image` removes the earlier one first): one at a time.
static ONE_STORY_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_rootless_user_exports_its_private_files_bit_exactly() {
    let _alone = ONE_STORY_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(user) = rootless_user_or_skip("a_rootless_user_exports_its_private_files_bit_exactly")
    else {
        return;
    };
    let work = tempfile::tempdir_in("/tmp").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = rootless_feature_image(&user, &work.path().join("build")).unwrap();
    let (_bins, helper, cstor) = public_binaries().unwrap();
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    user.chown(&out_dir).unwrap();

    // The CLI, as the user, decides by itself to go through `podman unshare`.
    let verify = run_command(
        user.command(&cstor)
            .args(["verify", "--helper"])
            .arg(&helper)
            .args(["--json", ROOTLESS_IMAGE_NAME]),
        "cstor verify as the rootless user",
    )
    .unwrap();
    let v: Value = serde_json::from_str(&verify).unwrap();
    assert_eq!(v["image"], json!(image.id));
    let layers = v["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    assert!(layers.iter().all(|l| l["ok"] == json!(true)));

    // Bit-exact against skopeo run by the same user.
    let oci = work.path().join("out/oci");
    run_command(
        user.command("skopeo").args([
            "copy",
            "--quiet",
            &format!("containers-storage:{ROOTLESS_IMAGE_NAME}"),
            &format!("oci:{}", oci.display()),
            "--dest-oci-accept-uncompressed-layers",
        ]),
        "skopeo export as the rootless user",
    )
    .unwrap();
    let export = cstor_tests::podman::parse_oci_layout(&oci).unwrap();
    for (i, blob) in export.layers.iter().enumerate() {
        let tar = out_dir.join(format!("layer{i}.tar"));
        run_command(
            user.command(&cstor)
                .args(["layer-tar", "--helper"])
                .arg(&helper)
                .args([ROOTLESS_IMAGE_NAME, &i.to_string(), "-o"])
                .arg(&tar),
            "cstor layer-tar as the rootless user",
        )
        .unwrap();
        assert!(
            std::fs::read(&tar).unwrap() == std::fs::read(blob).unwrap(),
            "layer {i} differs from skopeo's export"
        );
    }

    // The debug mode works under podman unshare too.
    let layer = user.top_layer(ROOTLESS_IMAGE_NAME).unwrap();
    let dump = out_dir.join("dump");
    std::fs::create_dir(&dump).unwrap();
    user.chown(&dump).unwrap();
    let req = json!({"jsonrpc":"2.0","id":1,"method":"GetLayer","params":{"layer": layer}});
    let stdio = |unshare: bool| {
        let mut cmd = if unshare {
            user.unshare(
                &helper,
                ["--stdio".as_ref(), "--dump-tar".as_ref(), dump.as_os_str()]
                    as [&std::ffi::OsStr; 3],
            )
        } else {
            let mut c = user.command(&helper);
            c.args(["--stdio"]);
            c
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{req}").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let inside = stdio(true);
    assert_eq!(
        inside["result"]["described"]["tar"]["matches_diff_id"],
        json!(true),
        "{inside}"
    );
    // Outside the namespace the same user is refused by the kernel: the reason for
    // `podman unshare`.
    let outside = stdio(false);
    assert_eq!(outside["error"]["data"]["errno"], json!(13), "{outside}");
}

/// Set in the environment of this test binary when the story below runs it again as the
/// rootless user: what the child needs, as JSON.
const OPEN_STORAGE_CHILD: &str = "CSTOR_TEST_OPEN_STORAGE_CHILD";
const OPEN_STORAGE_STORY: &str =
    "a_rootless_user_hands_the_helper_its_storage_as_an_open_directory";

/// Story: a program embedding the client (bootc, say) holds the user's storage open already
/// and hands the helper that directory, not a path, through `podman unshare`: the helper
/// finds the image in it and every layer comes back matching its diff id. The program is
/// this test binary, run again as the user.
#[test]
fn a_rootless_user_hands_the_helper_its_storage_as_an_open_directory() {
    if let Ok(child) = std::env::var(OPEN_STORAGE_CHILD) {
        open_storage_child(&child);
        return;
    }
    let _alone = ONE_STORY_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(user) = rootless_user_or_skip(OPEN_STORAGE_STORY) else {
        return;
    };
    let work = tempfile::tempdir_in("/tmp").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = rootless_feature_image(&user, &work.path().join("build")).unwrap();
    let (bins, helper, _cstor) = public_binaries().unwrap();
    let me = bins.path().join("rootless-tests");
    cstor_tests::copy_executable(&std::env::current_exe().unwrap(), &me).unwrap();
    let child = json!({
        "helper": helper,
        "graphroot": user.graphroot(),
        "image": ROOTLESS_IMAGE_NAME,
    });
    let out = run_command(
        user.command(&me)
            .args([
                "--exact",
                OPEN_STORAGE_STORY,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OPEN_STORAGE_CHILD, child.to_string()),
        "the embedding program as the rootless user",
    )
    .unwrap();
    let line = out
        .lines()
        // The harness' "test NAME ... " precedes the child's line on the same line.
        .find_map(|l| l.split_once("OPEN-STORAGE ").map(|(_, report)| report))
        .unwrap_or_else(|| panic!("the child reported nothing: {out}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["image"], json!(image.id));
    assert!(v["layers"].as_u64().unwrap() > 0, "{v}");
}

/// The embedding program: opens the storage, spawns the helper through `podman unshare`
/// with that directory, reads the image and every layer (each checked against its diff id
/// by the client), and prints what it saw.
fn open_storage_child(child: &str) {
    let v: Value = serde_json::from_str(child).unwrap();
    let path = |k: &str| std::path::PathBuf::from(v[k].as_str().unwrap());
    let dir = std::fs::File::open(path("graphroot")).unwrap();
    let mut config = cstor_proxy_client::HelperConfig::default()
        .program(path("helper"))
        .privilege(cstor_proxy_client::Privilege::PodmanUnshare);
    config.graphroot_fd = Some(std::sync::Arc::new(dir.into()));
    let report = cstor_tests::session::runtime().block_on(async {
        let client = cstor_proxy_client::Client::spawn(&config).await.unwrap();
        let graphroot = client.info().storage.graphroot.clone();
        let img = client
            .get_image(v["image"].as_str().unwrap())
            .await
            .unwrap();
        for layer in &img.layers {
            let l = client.open_layer(&layer.id).await.unwrap();
            l.write_tar(std::io::sink()).await.unwrap();
        }
        client.shutdown().await.unwrap();
        json!({"image": img.id, "layers": img.layers.len(), "graphroot": graphroot})
    });
    println!("OPEN-STORAGE {report}");
}
