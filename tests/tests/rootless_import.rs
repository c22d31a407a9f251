//! Story: a rootless user, whose image holds a 0600 file owned by a subordinate uid and a
//! world-readable file inside a 0700 subordinate-uid directory, imports it with `cstor`.
//! With storage and repository on XFS every file above the inline threshold is reflinked
//! (nothing copied); into a repository on ext4 the same files are copied; and the result
//! equals what root imports from the same storage.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cstor_tests::rootless::ROOTLESS_IMAGE_NAME;
use cstor_tests::session::public_binaries;
use cstor_tests::{RootlessUser, loop_xfs_or_skip, rootless_feature_image, run_command, skip};
use serde_json::Value;

const USER: &str = "cstorxfs";

fn open_up(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn user_dir(user: &RootlessUser, p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    user.chown(p).unwrap();
}

#[test]
fn a_rootless_import_reflinks_on_xfs_copies_on_ext4_and_equals_the_rootful_one() {
    let test = "a_rootless_import_reflinks_on_xfs_copies_on_ext4_and_equals_the_rootful_one";
    if !skip::require_root(test)
        || !skip::require_tools(
            test,
            &["podman", "runuser", "useradd", "newuidmap", "mkfs.xfs"],
        )
    {
        return;
    }
    let Some(xfs) = loop_xfs_or_skip(test, 2 << 30) else {
        return;
    };
    open_up(xfs.mountpoint.parent().unwrap());
    open_up(&xfs.mountpoint);
    let user = RootlessUser::ensure(USER).unwrap();
    let storage = xfs.path("storage");
    user_dir(&user, &storage);
    let conf = user.home.join(".config/containers/storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\n",
            storage.display()
        ),
    )
    .unwrap();
    // The pause process must see the new mount.
    user.migrate().unwrap();
    let work = tempfile::tempdir_in("/tmp").unwrap();
    open_up(work.path());
    let image = rootless_feature_image(&user, &work.path().join("build")).unwrap();
    let (_bins, helper, cstor) = public_binaries().unwrap();

    let import_as_user = |repo: &Path| -> Value {
        user_dir(&user, repo.parent().unwrap());
        let out = run_command(
            user.command(&cstor)
                .args(["import", "--helper"])
                .arg(&helper)
                .args(["--json", "--init", "--repo"])
                .arg(repo)
                .arg(ROOTLESS_IMAGE_NAME),
            "cstor import as the rootless user",
        )
        .unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let on_xfs = import_as_user(&xfs.path("user/repo"));
    let on_ext4 = import_as_user(&work.path().join("ext4/repo"));
    let rootful: Value = serde_json::from_str(
        &run_command(
            std::process::Command::new(&cstor)
                .args(["import", "--helper"])
                .arg(&helper)
                .args(["--privilege", "direct", "--root"])
                .arg(&storage)
                .args(["--json", "--init", "--repo"])
                .arg(xfs.path("root/repo"))
                .arg(ROOTLESS_IMAGE_NAME),
            "cstor import as root from the user's storage",
        )
        .unwrap(),
    )
    .unwrap();

    assert_eq!(on_xfs["image_id"], Value::from(image.id.clone()));
    // data.txt, the 0600 secret and the file in the 0700 directory are above 64 bytes.
    let o = &on_xfs["objects"];
    assert_eq!(o["copied"], 0, "nothing is copied on XFS: {on_xfs}");
    assert!(o["reflinked"].as_u64().unwrap() >= 3, "{on_xfs}");
    assert!(on_xfs["first_reflink_fallback"].is_null(), "{on_xfs}");
    let o = &on_ext4["objects"];
    assert_eq!(o["reflinked"], 0, "{on_ext4}");
    assert!(o["copied"].as_u64().unwrap() >= 3, "{on_ext4}");
    assert!(
        on_ext4["first_reflink_fallback"]
            .as_str()
            .is_some_and(|w| w.contains("EXDEV") || w.contains("EOPNOTSUPP")),
        "{on_ext4}"
    );
    for key in [
        "manifest_digest",
        "config_digest",
        "config_verity",
        "erofs_image",
        "tag",
    ] {
        assert_eq!(on_xfs[key], rootful[key], "{key}");
        assert_eq!(on_ext4[key], rootful[key], "{key}");
    }
    let verities = |v: &Value| -> Vec<Value> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["verity"].clone())
            .collect()
    };
    assert_eq!(verities(&on_xfs), verities(&rootful));
    assert_eq!(verities(&on_ext4), verities(&rootful));

    // Leave nothing of the user's on the loop device, so it can be detached. (podman also
    // tries to remove the graphroot itself, which lives in a root-owned directory: that
    // part fails harmlessly.)
    let _ = user.reset_storage();
    std::fs::remove_file(&conf).unwrap();
    user.migrate().unwrap();
}
