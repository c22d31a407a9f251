//! Story: a user copies an image from one composefs repository into another with
//! `cstor copy`, and gets what upstream's `cfsctl oci copy` makes of it: the same image id
//! (`cfsctl oci compute-id`), the same layer and config streams, a repository `cfsctl oci
//! fsck` finds clean; into a repository of the other hash (SHA-512 into SHA-256) the
//! objects are rehashed, as upstream's copy does. Layers the destination has are skipped;
//! an object of the source that is not what its name says fails the copy, naming it, with
//! nothing named in the destination; on XFS an unprivileged user who can read the source
//! gets every object reflinked. Through upstream's repository service (`--from-service`) a
//! user copies from a repository only root can open, and a damaged object there fails the
//! copy just the same.
//!
//! Upstream is the `cfsctl` 0.9.4 binary, found as `$CSTOR_CFSCTL` or on `$PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use composefs::fsverity::Sha512HashValue;
use cstor_import::{ImportOptions, import_image, init_repository, open_repository};
use cstor_tests::session::{client_for, public_binaries, runtime};
use cstor_tests::upstream::{RepositoryService, cfsctl_or_skip};
use cstor_tests::{
    RootlessUser, StandardImages, helper_binary, loop_xfs_or_skip, run_command, skip,
    standard_images_or_skip,
};
use serde_json::Value;

fn cstor() -> PathBuf {
    helper_binary().unwrap().with_file_name("cstor")
}

fn cfs(cfsctl: &Path, repo: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(cfsctl);
    cmd.arg("--repo").arg(repo).args(args);
    cmd.env("RUST_BACKTRACE", "0");
    run_command(&mut cmd, "cfsctl").unwrap()
}

/// A SHA-512 repository at `dir` holding `features` and `commit` (two layers, the first
/// `features`' one), imported from podman's storage with cstor.
fn source_repo(images: &StandardImages, dir: &Path) {
    init_repository(dir).unwrap();
    let repo = open_repository::<Sha512HashValue>(dir).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = client_for(&images.store).await.unwrap();
        for (image, tag) in [(&images.features, "features"), (&images.commit, "commit")] {
            import_image(&client, &repo, &image.name, &ImportOptions::new().tag(tag))
                .await
                .unwrap();
        }
        client.shutdown().await.unwrap();
    });
}

fn copy(from: &Path, to: &Path, args: &[&str]) -> Output {
    Command::new(cstor())
        .args(["copy", "--json", "--init", "--from"])
        .arg(from)
        .arg("--repo")
        .arg(to)
        .args(args)
        .output()
        .unwrap()
}

fn copied(from: &Path, to: &Path, args: &[&str]) -> Value {
    let out = copy(from, to, args);
    assert!(
        out.status.success(),
        "cstor copy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Where `streams/<name>` points.
fn stream_target(repo: &Path, name: &str) -> PathBuf {
    std::fs::read_link(repo.join("streams").join(name)).unwrap()
}

fn layer_streams(repo: &Path) -> Vec<(String, PathBuf)> {
    let Ok(dir) = std::fs::read_dir(repo.join("streams")) else {
        return Vec::new();
    };
    let mut v: Vec<_> = dir
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("oci-layer-"))
        .map(|n| {
            let t = stream_target(repo, &n);
            (n, t)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn an_image_copied_between_repositories_is_what_cfsctl_oci_copy_makes() {
    let test = "an_image_copied_between_repositories_is_what_cfsctl_oci_copy_makes";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (src, ours, theirs) = (
        work.path().join("src"),
        work.path().join("ours"),
        work.path().join("theirs"),
    );
    source_repo(images, &src);

    let report = copied(&src, &ours, &["commit"]);
    assert_eq!(report["tag"], "commit", "{report}");
    assert_eq!(report["layers"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["already_complete"], false);
    cfs(&cfsctl, &theirs, &["init", "--insecure"]);
    cfs(
        &cfsctl,
        &theirs,
        &[
            "oci",
            "copy",
            "--from",
            src.to_str().unwrap(),
            "--name",
            "commit",
            "commit",
        ],
    );

    let id = |repo: &Path| cfs(&cfsctl, repo, &["oci", "compute-id", "commit"]);
    assert_eq!(id(&ours), id(&theirs));
    assert_eq!(id(&ours), id(&src));
    assert_eq!(report["erofs_image"].as_str().unwrap(), id(&src));
    // Layer and config streams are the same objects in all three.
    assert_eq!(layer_streams(&ours), layer_streams(&theirs));
    assert_eq!(layer_streams(&ours), layer_streams(&src));
    let config = format!("oci-config-{}", report["config_digest"].as_str().unwrap());
    assert_eq!(
        stream_target(&ours, &config),
        stream_target(&theirs, &config)
    );
    let fsck = cfs(&cfsctl, &ours, &["oci", "fsck"]);
    assert!(fsck.contains("status: ok"), "{fsck}");
    assert!(cfs(&cfsctl, &ours, &["oci", "images"]).contains("commit"));

    // `features` is `commit`'s first layer: copied next, it has nothing left to copy.
    let report = copied(&src, &ours, &["features"]);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["skipped"], true, "{report}");
    assert_eq!(report["objects"]["copied"], 0, "{report}");
    assert_eq!(report["objects"]["reflinked"], 0, "{report}");
    assert_eq!(
        report["erofs_image"].as_str().unwrap(),
        cfs(&cfsctl, &src, &["oci", "compute-id", "features"])
    );
    // And a copy of what is there only writes the tag.
    let again = copied(&src, &ours, &["commit", "--tag", "commit-again"]);
    assert_eq!(again["already_complete"], true, "{again}");
    assert_eq!(
        id(&ours),
        cfs(&cfsctl, &ours, &["oci", "compute-id", "commit-again"])
    );
}

#[test]
fn an_image_copied_into_a_repository_of_the_other_hash_is_rehashed() {
    let test = "an_image_copied_into_a_repository_of_the_other_hash_is_rehashed";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    source_repo(images, &src);
    let (ours, theirs, back) = (
        work.path().join("ours256"),
        work.path().join("theirs256"),
        work.path().join("back512"),
    );
    for repo in [&ours, &theirs] {
        cfs(
            &cfsctl,
            repo,
            &["init", "--insecure", "--algorithm", "fsverity-sha256-12"],
        );
    }
    let report = copied(&src, &ours, &["commit"]);
    cfs(
        &cfsctl,
        &theirs,
        &[
            "oci",
            "copy",
            "--from",
            src.to_str().unwrap(),
            "--name",
            "commit",
            "commit",
        ],
    );
    let id = |repo: &Path| cfs(&cfsctl, repo, &["oci", "compute-id", "commit"]);
    let sha256_id = id(&ours);
    assert_eq!(sha256_id.len(), 64, "a SHA-256 image id: {sha256_id}");
    assert_eq!(sha256_id, id(&theirs));
    assert_eq!(report["erofs_image"].as_str().unwrap(), sha256_id);
    assert_eq!(layer_streams(&ours), layer_streams(&theirs));
    let fsck = cfs(&cfsctl, &ours, &["oci", "fsck"]);
    assert!(fsck.contains("status: ok"), "{fsck}");
    // Objects were written anew, not shared with the source.
    assert!(
        report["objects"]["copied"].as_u64().unwrap() > 0,
        "{report}"
    );

    // And back into SHA-512: the source's image again.
    copied(&ours, &back, &["commit"]);
    assert_eq!(id(&back), id(&src));
    assert_eq!(layer_streams(&back), layer_streams(&src));
}

/// Flips the first byte of the largest object of `repo` (a file's contents: streams and
/// images of the test images are smaller) and returns its hex id.
fn corrupt_largest_object(repo: &Path) -> String {
    let mut largest: Option<(u64, PathBuf)> = None;
    for dir in std::fs::read_dir(repo.join("objects")).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            if largest.as_ref().is_none_or(|(l, _)| len > *l) {
                largest = Some((len, p));
            }
        }
    }
    let (_, path) = largest.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let parent = path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy();
    format!("{parent}{}", path.file_name().unwrap().to_string_lossy())
}

#[test]
fn a_corrupt_source_object_fails_the_copy_naming_it_and_nothing_is_named() {
    let test = "a_corrupt_source_object_fails_the_copy_naming_it_and_nothing_is_named";
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    source_repo(images, &src);

    // Asking for what is not there.
    let out = copy(&src, &dst, &["no-such-tag"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = copy(&src, &dst, &["@sha256:not-a-digest"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let object = corrupt_largest_object(&src);
    let out = copy(&src, &dst, &["features"]);
    failed_on_corrupt_object(&out, &object, &dst);
}

/// A copy of `features` into `dst` that met the damaged `object`: exit 4 naming it, and
/// nothing of the image named in the destination.
fn failed_on_corrupt_object(out: &Output, object: &str, dst: &Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "exit 4 (verification): {stderr}"
    );
    assert!(
        stderr.contains(object),
        "names the object {object}: {stderr}"
    );
    assert!(stderr.contains("is corrupt"), "{stderr}");
    assert!(layer_streams(dst).is_empty(), "{:?}", layer_streams(dst));
    assert!(!dst.join("streams/refs/oci/features").exists());
    let images_dir = dst.join("images");
    assert!(
        !images_dir.exists() || std::fs::read_dir(&images_dir).unwrap().next().is_none(),
        "no EROFS image is named"
    );
}

#[test]
fn an_unprivileged_user_copying_on_xfs_gets_every_object_reflinked() {
    let test = "an_unprivileged_user_copying_on_xfs_gets_every_object_reflinked";
    if !skip::require_root(test) || !skip::require_tools(test, &["runuser", "mkfs.xfs"]) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let Some(xfs) = loop_xfs_or_skip(test, 1 << 30) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    open(xfs.mountpoint.parent().unwrap());
    open(&xfs.mountpoint);
    // Root's repository, readable by everyone (as a shared image store would be).
    let src = xfs.path("shared");
    source_repo(images, &src);
    run_command(
        Command::new("chmod").args(["-R", "a+rX"]).arg(&src),
        "opening the source to everyone",
    )
    .unwrap();
    let user = RootlessUser::ensure("cstorxfs").unwrap();
    let home = xfs.path("user");
    std::fs::create_dir_all(&home).unwrap();
    user.chown(&home).unwrap();
    let (_bins, _helper, cstor) = public_binaries().unwrap();
    let out = run_command(
        user.command(&cstor)
            .args(["copy", "--json", "--init", "--from"])
            .arg(&src)
            .arg("--repo")
            .arg(home.join("repo"))
            .arg("commit"),
        "cstor copy as an unprivileged user",
    )
    .unwrap();
    let report: Value = serde_json::from_str(&out).unwrap();
    let o = &report["objects"];
    assert_eq!(o["copied"], 0, "nothing is copied on XFS: {report}");
    assert!(o["reflinked"].as_u64().unwrap() > 0, "{report}");
    assert!(report["first_reflink_fallback"].is_null(), "{report}");
    assert_eq!(
        cfs(
            &cfsctl,
            &home.join("repo"),
            &["oci", "compute-id", "commit"]
        ),
        cfs(&cfsctl, &src, &["oci", "compute-id", "commit"])
    );
}

#[test]
fn a_user_copies_from_a_root_only_repository_through_its_repository_service() {
    let test = "a_user_copies_from_a_root_only_repository_through_its_repository_service";
    if !skip::require_root(test) || !skip::require_tools(test, &["runuser", "mkfs.xfs"]) {
        return;
    }
    let Some(images) = standard_images_or_skip(test) else {
        return;
    };
    let Some(cfsctl) = cfsctl_or_skip(test) else {
        return;
    };
    let Some(xfs) = loop_xfs_or_skip(test, 1 << 30) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(xfs.mountpoint.parent().unwrap(), 0o755);
    open(&xfs.mountpoint, 0o755);
    // Root's repository, which the user cannot open (as /sysroot/composefs).
    let src = xfs.path("sysroot/composefs");
    source_repo(images, &src);
    open(&src, 0o700);
    let user = RootlessUser::ensure("cstorxfs").unwrap();
    let run = xfs.path("run");
    std::fs::create_dir_all(&run).unwrap();
    open(&run, 0o755);
    let service = RepositoryService::start(&cfsctl, &run);
    open(&service.socket, 0o666);
    let home = xfs.path("user");
    std::fs::create_dir_all(&home).unwrap();
    user.chown(&home).unwrap();
    let (_bins, _helper, cstor) = public_binaries().unwrap();
    let copy_as_user = |image: &str| -> Output {
        user.command(&cstor)
            .args(["copy", "--json", "--init", "--from-service"])
            .arg(&service.socket)
            .arg("--from")
            .arg(&src)
            .arg("--repo")
            .arg(home.join("repo"))
            .arg(image)
            .output()
            .unwrap()
    };
    // Without the service, the user cannot read the source at all.
    let direct = user
        .command(&cstor)
        .args(["copy", "--from"])
        .arg(&src)
        .arg("--repo")
        .arg(home.join("other"))
        .args(["--init", "commit"])
        .output()
        .unwrap();
    assert!(!direct.status.success(), "{direct:?}");

    let out = copy_as_user("commit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["objects"]["copied"], 0,
        "nothing copied on XFS: {report}"
    );
    assert!(
        report["objects"]["reflinked"].as_u64().unwrap() > 0,
        "{report}"
    );
    let repo = home.join("repo");
    assert_eq!(
        cfs(&cfsctl, &repo, &["oci", "compute-id", "commit"]),
        cfs(&cfsctl, &src, &["oci", "compute-id", "commit"])
    );
    assert_eq!(layer_streams(&repo), layer_streams(&src));
    let fsck = cfs(&cfsctl, &repo, &["oci", "fsck"]);
    assert!(fsck.contains("status: ok"), "{fsck}");
    // The base layer is there now: `features` has nothing left to copy.
    let again: Value = serde_json::from_slice(&copy_as_user("features").stdout).unwrap();
    assert_eq!(again["layers"][0]["skipped"], true, "{again}");
    // What the service does not have.
    let missing = copy_as_user("no-such-image");
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no image no-such-image"),
        "{missing:?}"
    );

    // A damaged object in the served repository: upstream's service passes its directory
    // without reading it, and the copy checks every object it opens there against its name.
    let object = corrupt_largest_object(&src);
    let fresh = home.join("fresh");
    let out = user
        .command(&cstor)
        .args(["copy", "--init", "--from-service"])
        .arg(&service.socket)
        .arg("--from")
        .arg(&src)
        .arg("--repo")
        .arg(&fresh)
        .arg("features")
        .output()
        .unwrap();
    failed_on_corrupt_object(&out, &object, &fresh);
}
