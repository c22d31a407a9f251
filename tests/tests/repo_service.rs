//! Story: a repository that a service owns (upstream's `cfsctl varlink` serving it) gets an
//! image from podman's storage with `cstor import --repo-service SOCKET`: cstor hands each
//! layer the service lacks to it as a splitdirfdstream from a second helper, the service
//! writes it and finalizes the image, and the result is the image a direct `cstor import`
//! makes (the same image id, layer streams and config; `cfsctl oci fsck` clean). A second
//! push skips the layers the service has; a repository the service cannot open is named in
//! the error.

use std::path::Path;
use std::process::Command;

use cstor_tests::rootless::ROOTLESS_IMAGE_NAME;
use cstor_tests::session::public_binaries;
use cstor_tests::upstream::{RepositoryService, cfsctl_or_skip};
use cstor_tests::{
    PodmanStore, helper_binary, rootless_feature_image, rootless_user_or_skip, run_command, skip,
    standard_images_or_skip,
};
use serde_json::Value;

fn cstor_import(store: &PodmanStore, args: &[&str]) -> Value {
    let mut cmd = Command::new(helper_binary().unwrap().with_file_name("cstor"));
    cmd.args(["--json", "import", "--root"])
        .arg(&store.root)
        .arg("--runroot")
        .arg(&store.runroot)
        .arg("--storage-conf")
        .arg(&store.storage_conf)
        .args(args);
    serde_json::from_str(&run_command(&mut cmd, "cstor import").unwrap()).unwrap()
}

fn cfs(cfsctl: &Path, repo: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(cfsctl);
    cmd.arg("--repo").arg(repo).args(args);
    run_command(&mut cmd, "cfsctl").unwrap()
}

#[test]
fn an_image_pushed_through_a_repository_service_is_the_one_a_direct_import_makes() {
    let test = "an_image_pushed_through_a_repository_service_is_the_one_a_direct_import_makes";
    if !skip::require_root(test) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (served, direct) = (work.path().join("served"), work.path().join("direct"));
    cfs(&cfsctl, &served, &["init", "--insecure"]);
    let service = RepositoryService::start(&cfsctl, work.path());
    let socket = service.socket.to_str().unwrap();
    let repo = served.to_str().unwrap();
    let image = images.commit.name.as_str();

    let pushed = cstor_import(
        &images.store,
        &[
            "--repo-service",
            socket,
            "--repo",
            repo,
            "--tag",
            "commit",
            image,
        ],
    );
    let layers = pushed["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{pushed}");
    assert!(layers.iter().all(|l| l["skipped"] == false), "{pushed}");
    // The service stored the base layer's files (it reflinks, hardlinks or copies as it can).
    let stored: u64 = ["reflinked", "hardlinked", "copied", "present"]
        .iter()
        .map(|k| layers[0][k].as_u64().unwrap())
        .sum();
    assert!(stored > 0, "{pushed}");

    let imported = cstor_import(
        &images.store,
        &[
            "--init",
            "--repo",
            direct.to_str().unwrap(),
            "--tag",
            "commit",
            image,
        ],
    );
    assert_eq!(
        cfs(&cfsctl, &served, &["oci", "compute-id", "commit"]),
        imported["erofs_image"].as_str().unwrap()
    );
    assert_eq!(pushed["config_verity"], imported["config_verity"]);
    assert_eq!(pushed["manifest_digest"], imported["manifest_digest"]);
    let verities = |v: &Value, key: &str| -> Vec<Value> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[key].clone())
            .collect()
    };
    assert_eq!(verities(&pushed, "verity"), verities(&imported, "verity"));
    let fsck = cfs(&cfsctl, &served, &["oci", "fsck"]);
    assert!(fsck.contains("status: ok"), "{fsck}");

    // `features` is `commit`'s base layer: the service has it.
    let again = cstor_import(
        &images.store,
        &[
            "--repo-service",
            socket,
            "--repo",
            repo,
            images.features.name.as_str(),
        ],
    );
    assert_eq!(again["layers"][0]["skipped"], true, "{again}");
    let direct_features = cstor_import(
        &images.store,
        &[
            "--repo",
            direct.to_str().unwrap(),
            images.features.name.as_str(),
        ],
    );
    assert_eq!(
        cfs(
            &cfsctl,
            &served,
            &["oci", "compute-id", again["tag"].as_str().unwrap()]
        ),
        direct_features["erofs_image"].as_str().unwrap()
    );

    // A repository the service cannot open is named in the error.
    let out = Command::new(helper_binary().unwrap().with_file_name("cstor"))
        .args(["import", "--root"])
        .arg(&images.store.root)
        .arg("--runroot")
        .arg(&images.store.runroot)
        .arg("--storage-conf")
        .arg(&images.store.storage_conf)
        .args([
            "--repo-service",
            socket,
            "--repo",
            "/nonexistent/repo",
            image,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/repo"),
        "{out:?}"
    );
}

#[test]
fn a_rootless_user_pushes_its_image_into_a_repository_its_own_service_writes() {
    let test = "a_rootless_user_pushes_its_image_into_a_repository_its_own_service_writes";
    let Some(user) = rootless_user_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir_in("/tmp").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = rootless_feature_image(&user, &work.path().join("build")).unwrap();
    let (bins, helper, cstor) = public_binaries().unwrap();
    // The user must be able to run upstream's binary too.
    let their_cfsctl = bins.path().join("cfsctl");
    cstor_tests::copy_executable(&cfsctl, &their_cfsctl).unwrap();
    let mine = work.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    user.chown(&mine).unwrap();
    let (served, direct) = (mine.join("served"), mine.join("direct"));
    run_command(
        user.command(&their_cfsctl)
            .arg("--repo")
            .arg(&served)
            .args(["init", "--insecure"]),
        "cfsctl init as the user",
    )
    .unwrap();
    let service = RepositoryService::start_command(user.command(&their_cfsctl), &mine);
    let as_user = |args: &[&std::ffi::OsStr]| -> Value {
        let out = run_command(
            user.command(&cstor)
                .args(["--json", "import", "--helper"])
                .arg(&helper)
                .args(args)
                .arg(ROOTLESS_IMAGE_NAME),
            "cstor import as the rootless user",
        )
        .unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let pushed = as_user(&[
        "--repo-service".as_ref(),
        service.socket.as_os_str(),
        "--repo".as_ref(),
        served.as_os_str(),
    ]);
    let imported = as_user(&["--init".as_ref(), "--repo".as_ref(), direct.as_os_str()]);
    assert_eq!(pushed["image_id"], Value::from(image.id.clone()));
    assert_eq!(
        pushed["config_verity"], imported["config_verity"],
        "{pushed}"
    );
    assert_eq!(
        cfs(
            &cfsctl,
            &served,
            &["oci", "compute-id", pushed["tag"].as_str().unwrap()]
        ),
        imported["erofs_image"].as_str().unwrap()
    );
    drop(service);
    let _ = user.reset_storage();
}
