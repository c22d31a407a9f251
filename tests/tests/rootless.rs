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

#[test]
fn a_rootless_user_exports_its_private_files_bit_exactly() {
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
