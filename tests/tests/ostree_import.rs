//! Story: a user imports an ostree commit into a composefs repository with cstor's library
//! and gets what upstream `cfsctl ostree pull-local` makes of the same commit: the same
//! EROFS image and commit splitstream when the commit has no xattrs, and a repository
//! upstream's `cfsctl ostree compute-id|dump|images` read. With xattrs the image differs on
//! purpose: upstream keeps ostree's trailing NUL in xattr names, we do not.
//!
//! Upstream is the `cfsctl` 0.9.4 binary (feature `ostree`), found as `$CSTOR_CFSCTL` or on
//! `$PATH`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use composefs::fsverity::Sha512HashValue;
use composefs::repository::Repository;
use cstor_import::{
    ImportEvent, ImportOptions, OstreeImportReport, import_ostree_commit, init_repository,
    open_repository,
};
use cstor_tests::ostree::{self, empty_store, ostree, write_file};
use cstor_tests::session::{client_for, runtime};
use cstor_tests::{PodmanStore, run_command, skip};

fn cfsctl() -> Option<PathBuf> {
    std::env::var_os("CSTOR_CFSCTL")
        .map(PathBuf::from)
        .or_else(|| skip::find_tool("cfsctl"))
}

fn ready(test: &str) -> Option<PathBuf> {
    if !skip::require_root(test) || !skip::require_tools(test, &["ostree", "setfattr"]) {
        return None;
    }
    let Some(c) = cfsctl() else {
        skip::skip_or_fail(
            test,
            "no upstream cfsctl 0.9.4 (set CSTOR_CFSCTL or put cfsctl on PATH)",
        );
        return None;
    };
    let help = Command::new(&c).args(["ostree", "--help"]).output().ok()?;
    if !help.status.success() {
        skip::skip_or_fail(test, "this cfsctl was built without its ostree feature");
        return None;
    }
    Some(c)
}

fn cfs(cfsctl: &Path, repo: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(cfsctl);
    cmd.arg("--repo").arg(repo).args(args);
    cmd.env("RUST_BACKTRACE", "0");
    run_command(&mut cmd, "cfsctl").unwrap()
}

/// Owners, setuid, 0600, symlinks, identical files (hardlinks in the image), an empty
/// file, and files on both sides of the inline thresholds (64 bytes for OCI, 128 for
/// composefs-ostree in a SHA-512 repository).
fn write_tree(root: &Path) {
    let f = |rel: &str, content: &[u8], mode: u32| write_file(root, rel, content, mode);
    f("etc/shadow", b"root:*:1::::::\n", 0o600);
    f("usr/bin/su", &[7u8; 5000], 0o4755);
    f("usr/share/a", &[1u8; 100], 0o644);
    f("usr/share/b", &[1u8; 100], 0o644);
    f("usr/share/c64", &[2u8; 64], 0o644);
    f("usr/share/c128", &[3u8; 128], 0o644);
    f("usr/share/c129", &[4u8; 129], 0o644);
    f("empty", b"", 0o644);
    let owned = f("home/u/notes", b"mine\n", 0o640);
    rustix::fs::chown(
        &owned,
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )
    .unwrap();
    symlink("../usr/bin/su", root.join("etc/su-link")).unwrap();
}

fn image_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("image"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no image line in {out}"))
}

fn stream_target(repo: &Path, commit: &str) -> PathBuf {
    std::fs::read_link(repo.join(format!("streams/ostree-commit-{commit}"))).unwrap()
}

#[test]
fn imports_equal_cfsctl_pull_local_without_xattrs() {
    let test = "imports_equal_cfsctl_pull_local_without_xattrs";
    let Some(cfsctl) = ready(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let store = empty_store(&dir.path().join("cs"));
    for mode in ["bare", "bare-user", "bare-user-only", "archive"] {
        let osrepo = dir.path().join(format!("ostree-{mode}"));
        ostree(&osrepo, &["init", &format!("--mode={mode}")]);
        ostree(
            &osrepo,
            &[
                "commit",
                "-b",
                "os/main",
                "--timestamp=2024-01-01",
                &format!("--tree=dir={}", tree.display()),
            ],
        );
        let commit = ostree(&osrepo, &["rev-parse", "os/main"]).trim().to_owned();

        let upstream = dir.path().join(format!("up-{mode}"));
        cfs(
            &cfsctl,
            &upstream,
            &["init", "--insecure", upstream.to_str().unwrap()],
        );
        let out = cfs(
            &cfsctl,
            &upstream,
            &["ostree", "pull-local", osrepo.to_str().unwrap(), "os/main"],
        );
        let up_image = image_line(&out);

        let ours = dir.path().join(format!("ours-{mode}"));
        init_repository(&ours).unwrap();
        let repo = open_repository::<Sha512HashValue>(&ours).unwrap();
        let report = runtime().block_on(async {
            let client = client_for(&store).await.unwrap();
            import_ostree_commit(&client, &repo, &osrepo, "os/main", &ImportOptions::new())
                .await
                .unwrap()
        });
        assert_eq!(report.commit, commit, "{mode}");
        assert_eq!(
            report.image_id, up_image,
            "{mode}: image id differs from cfsctl's"
        );
        assert_eq!(
            stream_target(&ours, &commit),
            stream_target(&upstream, &commit),
            "{mode}: the commit splitstream differs from cfsctl's"
        );
        assert_eq!(report.reference.as_deref(), Some("ostree/os%2Fmain"));

        // Upstream reads what we wrote.
        let id = cfs(&cfsctl, &ours, &["ostree", "compute-id", "os/main"]);
        assert_eq!(id.trim(), up_image, "{mode}");
        assert_eq!(
            cfs(&cfsctl, &ours, &["ostree", "dump", "os/main"]),
            cfs(&cfsctl, &upstream, &["ostree", "dump", "os/main"]),
            "{mode}"
        );
        let images = cfs(&cfsctl, &ours, &["ostree", "images"]);
        assert!(images.contains(&commit), "{mode}: {images}");
    }
}

#[test]
fn xattrs_lose_only_the_trailing_nul() {
    let test = "xattrs_lose_only_the_trailing_nul";
    let Some(cfsctl) = ready(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), b"x").unwrap();
    run_command(
        Command::new("setfattr")
            .args(["-n", "user.key", "-v", "value"])
            .arg(tree.join("f")),
        "setfattr",
    )
    .unwrap();
    let store = empty_store(&dir.path().join("cs"));
    let osrepo = dir.path().join("ostree");
    ostree(&osrepo, &["init", "--mode=bare-user"]);
    ostree(
        &osrepo,
        &[
            "commit",
            "-b",
            "main",
            &format!("--tree=dir={}", tree.display()),
        ],
    );
    let upstream = dir.path().join("up");
    cfs(
        &cfsctl,
        &upstream,
        &["init", "--insecure", upstream.to_str().unwrap()],
    );
    let up_image = image_line(&cfs(
        &cfsctl,
        &upstream,
        &["ostree", "pull-local", osrepo.to_str().unwrap(), "main"],
    ));
    let ours = dir.path().join("ours");
    init_repository(&ours).unwrap();
    let repo = open_repository::<Sha512HashValue>(&ours).unwrap();
    let report = runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        import_ostree_commit(
            &client,
            &repo,
            &osrepo,
            "main",
            &ImportOptions::new().tag("tagged"),
        )
        .await
        .unwrap()
    });
    assert_ne!(
        report.image_id, up_image,
        "the xattr name differs from upstream's"
    );
    // `cfsctl ostree dump` rebuilds the tree from the commit splitstream, which keeps
    // ostree's bytes: it shows upstream's names for both repositories.
    let ours_dump = cfs(&cfsctl, &ours, &["ostree", "dump", "tagged"]);
    let up_dump = cfs(&cfsctl, &upstream, &["ostree", "dump", "main"]);
    assert!(up_dump.contains("user.key\\x00=value"), "{up_dump}");
    assert_eq!(ours_dump, up_dump);
    // The images tell them apart.
    let xattrs = |repo: &Path, id: &str| {
        let img = std::fs::read(repo.join("images").join(id)).unwrap();
        let fs = composefs::erofs::reader::erofs_to_filesystem::<Sha512HashValue>(&img).unwrap();
        let leaf = fs.root.leaf_id(std::ffi::OsStr::new("f")).unwrap();
        fs.leaf(leaf)
            .stat
            .xattrs
            .keys()
            .map(|k| k.as_encoded_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(xattrs(&ours, &report.image_id), [b"user.key".to_vec()]);
    assert_eq!(xattrs(&upstream, &up_image), [b"user.key\0".to_vec()]);
    assert_eq!(
        cfs(&cfsctl, &ours, &["ostree", "compute-id", "tagged"]).trim(),
        report.image_id,
        "upstream finds our image through the splitstream's named ref"
    );
}

/// `cstor ostree import` as a user runs it: no upstream tool needed.
#[test]
fn cstor_ostree_import_command() {
    let test = "cstor_ostree_import_command";
    if !skip::require_root(test) || !skip::require_tools(test, &["ostree"]) {
        return;
    }
    let cstor = cstor_tests::helper_binary()
        .unwrap()
        .with_file_name("cstor");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let osrepo = dir.path().join("ostree");
    ostree(&osrepo, &["init", "--mode=archive"]);
    ostree(
        &osrepo,
        &[
            "commit",
            "-b",
            "fedora/x86_64",
            &format!("--tree=dir={}", tree.display()),
        ],
    );
    let commit = ostree(&osrepo, &["rev-parse", "fedora/x86_64"])
        .trim()
        .to_owned();
    let ours = dir.path().join("cfs");
    let run = |args: &[&str]| {
        Command::new(&cstor)
            .args(["--json", "--progress", "always"])
            .args(["ostree", "import", "--repo"])
            .arg(&ours)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--init", osrepo.to_str().unwrap(), "fedora/x86_64"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["commit"], commit.as_str());
    assert_eq!(v["reference"], "ostree/fedora%2Fx86_64");
    // Progress, asked for on a stderr that is no terminal: lines, ending with every file.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("importing commit {}", &commit[..12]))
            && err.contains("9 of 9 files"),
        "{err}"
    );
    assert!(ours.join("streams/refs/ostree/fedora%2Fx86_64").exists());
    assert!(
        ours.join("images")
            .join(v["image_id"].as_str().unwrap())
            .exists()
    );

    // A corrupt object: exit status 4 (verification), the object named, nothing named.
    let c = Command::new("ostree")
        .arg(format!("--repo={}", osrepo.display()))
        .args(["ls", "-C", "fedora/x86_64", "/usr/share/a"])
        .output()
        .unwrap();
    let line = String::from_utf8(c.stdout).unwrap();
    let file = line.split_whitespace().nth(4).unwrap().to_owned();
    let p = osrepo.join(format!("objects/{}/{}.filez", &file[..2], &file[2..]));
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();
    ostree(
        &osrepo,
        &[
            "commit",
            "-b",
            "other",
            &format!("--tree=dir={}", tree.display()),
        ],
    );
    let other = ostree(&osrepo, &["rev-parse", "other"]).trim().to_owned();
    let out = run(&[osrepo.to_str().unwrap(), "other"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&file), "{err}");
    assert!(!ours.join(format!("streams/ostree-commit-{other}")).exists());
    assert!(!ours.join("streams/refs/ostree/other").exists());
}

/// A rootless user imports commits of their own bare-user and bare-user-only repositories,
/// through `podman unshare` (the default for a non-root user) and with the helper run
/// directly; both give the image root gets from the same repository.
#[test]
fn a_user_imports_their_own_repository() {
    let test = "a_user_imports_their_own_repository";
    let Some(user) = cstor_tests::rootless_user_or_skip(test) else {
        return;
    };
    if !skip::require_tools(test, &["ostree"]) {
        return;
    }
    let (_bins, _helper, cstor) = cstor_tests::session::public_binaries().unwrap();
    let work = user.home.join(format!("ostree-{}", std::process::id()));
    let as_user = |program: &str, args: &[&str]| {
        let mut cmd = user.command(program);
        cmd.args(args);
        run_command(&mut cmd, program).unwrap()
    };
    as_user(
        "mkdir",
        &["-p", work.join("tree/private").to_str().unwrap()],
    );
    std::fs::write(work.join("tree/private/secret"), [9u8; 300]).unwrap();
    std::fs::write(work.join("tree/hello"), b"hello\n").unwrap();
    for p in ["tree/private/secret", "tree/hello"] {
        user.chown(&work.join(p)).unwrap();
    }
    std::fs::set_permissions(
        work.join("tree/private/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        work.join("tree/private"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let store = empty_store(&work.join("root-cs"));
    for mode in ["bare-user", "bare-user-only"] {
        let os = work.join(format!("os-{mode}"));
        let os_s = os.to_str().unwrap();
        as_user(
            "ostree",
            &[&format!("--repo={os_s}"), "init", &format!("--mode={mode}")],
        );
        as_user(
            "ostree",
            &[
                &format!("--repo={os_s}"),
                "config",
                "set",
                "core.min-free-space-percent",
                "0",
            ],
        );
        as_user(
            "ostree",
            &[
                &format!("--repo={os_s}"),
                "commit",
                "-b",
                "main",
                &format!("--tree=dir={}", work.join("tree").display()),
            ],
        );
        let commit = as_user("ostree", &[&format!("--repo={os_s}"), "rev-parse", "main"])
            .trim()
            .to_owned();
        let mut images = Vec::new();
        for privilege in ["auto", "direct"] {
            let cfs = work.join(format!("cfs-{mode}-{privilege}"));
            let out = as_user(
                cstor.to_str().unwrap(),
                &[
                    "--json",
                    "ostree",
                    "import",
                    "--privilege",
                    privilege,
                    "--init",
                    "--repo",
                    cfs.to_str().unwrap(),
                    os_s,
                    "main",
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["commit"], commit.as_str(), "{mode} {privilege}");
            images.push(v["image_id"].as_str().unwrap().to_owned());
        }
        // Root, from the same repository.
        let ours = work.join(format!("cfs-{mode}-root"));
        init_repository(&ours).unwrap();
        let repo = open_repository::<Sha512HashValue>(&ours).unwrap();
        let report = runtime().block_on(async {
            let client = client_for(&store).await.unwrap();
            import_ostree_commit(&client, &repo, &os, "main", &ImportOptions::new())
                .await
                .unwrap()
        });
        assert_eq!(images, [report.image_id.clone(), report.image_id], "{mode}");
    }
    cstor_tests::remove_tree(&work).unwrap();
}

/// On XFS, files of a bare-user repository become objects by reflink (nothing copied), and
/// `--copy-policy reflink-only` of an archive repository fails: its contents are compressed.
#[test]
fn contents_are_reflinked_from_bare_repositories() {
    let test = "contents_are_reflinked_from_bare_repositories";
    if !skip::require_root(test) || !skip::require_tools(test, &["ostree", "mkfs.xfs"]) {
        return;
    }
    let Some(xfs) = cstor_tests::loop_xfs_or_skip(test, 1 << 30) else {
        return;
    };
    let cstor = cstor_tests::helper_binary()
        .unwrap()
        .with_file_name("cstor");
    let tree = xfs.path("tree");
    write_tree(&tree);
    let import = |os: &Path, cfs: &Path, policy: &str| {
        Command::new(&cstor)
            .args([
                "--json",
                "ostree",
                "import",
                "--init",
                "--copy-policy",
                policy,
                "--repo",
            ])
            .arg(cfs)
            .arg(os)
            .arg("main")
            .output()
            .unwrap()
    };
    for mode in ["bare-user", "archive"] {
        let os = xfs.path(format!("os-{mode}"));
        ostree(&os, &["init", &format!("--mode={mode}")]);
        ostree(
            &os,
            &[
                "commit",
                "-b",
                "main",
                &format!("--tree=dir={}", tree.display()),
            ],
        );
        let out = import(&os, &xfs.path(format!("cfs-{mode}")), "reflink-or-copy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let o = &v["objects"];
        // su (5000 bytes) and c129; a and b (100 bytes) are inline in a SHA-512 repository.
        if mode == "archive" {
            assert_eq!(
                (o["reflinked"].as_u64(), o["copied"].as_u64()),
                (Some(0), Some(2)),
                "{v}"
            );
            let out = import(&os, &xfs.path("cfs-archive-only"), "reflink-only");
            assert!(!out.status.success());
        } else {
            assert_eq!(
                (o["reflinked"].as_u64(), o["copied"].as_u64()),
                (Some(2), Some(0)),
                "{v}"
            );
        }
    }
}

/// Root and the `ostree` CLI: what the stories below need (no upstream tool).
fn ready_alone(test: &str) -> bool {
    skip::require_root(test) && skip::require_tools(test, &["ostree", "setfattr"])
}

/// Every name of a composefs repository (streams, refs and images) with what it points to:
/// what a failed import must leave as it was.
fn names(repo: &Path) -> BTreeMap<PathBuf, PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            match std::fs::read_link(&p) {
                Ok(target) => {
                    out.insert(rel, target);
                }
                Err(_) if p.is_dir() => walk(root, &p, out),
                Err(_) => {
                    out.insert(rel, PathBuf::new());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for d in ["streams", "images"] {
        walk(repo, &repo.join(d), &mut out);
    }
    out
}

/// A fresh SHA-512 composefs repository at `path`.
fn fresh_repo(path: &Path) -> Arc<Repository<Sha512HashValue>> {
    init_repository(path).unwrap();
    open_repository::<Sha512HashValue>(path).unwrap()
}

/// Imports `rev` of `osrepo` into `repo` over one helper connection per call.
fn import(
    store: &PodmanStore,
    repo: &Arc<Repository<Sha512HashValue>>,
    osrepo: &Path,
    rev: &str,
) -> Result<OstreeImportReport, cstor_import::Error> {
    runtime().block_on(async {
        let client = client_for(store).await.unwrap();
        let r = import_ostree_commit(&client, repo, osrepo, rev, &ImportOptions::new()).await;
        client.shutdown().await.unwrap();
        r
    })
}

/// A dirtree cut in half on disk: the import fails naming that dirtree, and the composefs
/// repository, which already holds another commit, gains no name.
#[test]
fn a_truncated_dirtree_fails_naming_it_and_names_nothing() {
    let test = "a_truncated_dirtree_fails_naming_it_and_names_nothing";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "bare");
    ostree::commit(&os, "good", &tree, &[]);
    // A file only in the second commit gives its /usr/share a dirtree of its own.
    write_file(&tree, "usr/share/new", b"only in the damaged commit", 0o644);
    let bad = ostree::commit(&os, "bad", &tree, &[]);
    let dirtree = ostree::checksum_of(&os, "bad", "/usr/share");
    let p = ostree::object_file(&os, &dirtree, "dirtree");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let ours = dir.path().join("cfs");
    let repo = fresh_repo(&ours);
    import(&store, &repo, &os, "good").unwrap();
    let before = names(&ours);
    let e = import(&store, &repo, &os, "bad").unwrap_err().to_string();
    assert!(e.contains(&dirtree) && e.contains("dirtree"), "{e}");
    assert_eq!(names(&ours), before, "a failed import named something");
    assert!(!ours.join(format!("streams/ostree-commit-{bad}")).exists());
}

/// A commit object whose bytes are not those its name promises, whether another commit's
/// bytes copied under its name (they decode, only the checksum tells) or one flipped byte:
/// the import fails naming the commit and names nothing.
#[test]
fn a_commit_that_does_not_match_its_checksum_fails_and_names_nothing() {
    let test = "a_commit_that_does_not_match_its_checksum_fails_and_names_nothing";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "archive");
    let good = ostree::commit(&os, "good", &tree, &[]);
    let ours = dir.path().join("cfs");
    let repo = fresh_repo(&ours);
    import(&store, &repo, &os, "good").unwrap();
    let before = names(&ours);

    let good_bytes = std::fs::read(ostree::object_file(&os, &good, "commit")).unwrap();
    for damage in ["another commit's bytes", "a flipped byte"] {
        write_file(&tree, "etc/motd", damage.as_bytes(), 0o644);
        let branch = damage.replace([' ', '\''], "-");
        let victim = ostree::commit(&os, &branch, &tree, &[]);
        let p = ostree::object_file(&os, &victim, "commit");
        let bytes = match damage {
            "a flipped byte" => {
                let mut b = std::fs::read(&p).unwrap();
                let last = b.len() - 1;
                b[last] ^= 0x01;
                b
            }
            _ => good_bytes.clone(),
        };
        std::fs::write(&p, bytes).unwrap();
        let e = import(&store, &repo, &os, &branch).unwrap_err().to_string();
        assert!(e.contains(&victim), "{damage}: {e}");
        assert_eq!(
            names(&ours),
            before,
            "{damage}: a failed import named something"
        );
    }
}

/// The ref names a commit once, when the import starts: the import then reads that commit
/// by checksum, so a ref moved by another process while imports run gives, each time, one
/// of the commits it pointed to, whole: its image and its stream, under the ref's name.
#[test]
fn a_ref_moved_during_imports_gives_one_of_its_commits_whole() {
    let test = "a_ref_moved_during_imports_gives_one_of_its_commits_whole";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "bare");
    // Trees several levels deep, so that each import walks them in several round trips
    // while the ref moves.
    let mut commits = Vec::new();
    for (i, tree) in ["tree-a", "tree-b"].into_iter().enumerate() {
        let tree = dir.path().join(tree);
        for d in 0..6 {
            let rel = format!("l1-{d}/l2/l3/l4/file-{i}");
            write_file(&tree, &rel, format!("{i} {d}").repeat(50).as_bytes(), 0o644);
        }
        commits.push(ostree::commit(&os, "main", &tree, &[]));
    }
    // What each commit gives when imported by checksum, with no ref to move.
    let reference = fresh_repo(&dir.path().join("cfs-reference"));
    let expected: BTreeMap<String, String> = commits
        .iter()
        .map(|c| {
            let r = import(&store, &reference, &os, c).unwrap();
            (c.clone(), r.image_id)
        })
        .collect();

    let ours_path = dir.path().join("cfs");
    let ours = fresh_repo(&ours_path);
    let head = os.join("refs/heads/main");
    let stop = AtomicBool::new(false);
    let mut seen = BTreeSet::new();
    std::thread::scope(|s| {
        // ostree moves a ref by renaming a new file over it; so does this mover.
        s.spawn(|| {
            let tmp = os.join("refs/heads/.main.tmp");
            let mut i = 0;
            while !stop.load(Relaxed) {
                std::fs::write(&tmp, format!("{}\n", commits[i % 2])).unwrap();
                std::fs::rename(&tmp, &head).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        for _ in 0..30 {
            let r = import(&store, &ours, &os, "main");
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    stop.store(true, Relaxed);
                    panic!("an import of a moving ref failed: {e}");
                }
            };
            let image = expected.get(&r.commit);
            assert_eq!(image, Some(&r.image_id), "{} is whole", r.commit);
            assert_eq!(
                std::fs::canonicalize(ours_path.join("streams/refs/ostree/main")).unwrap(),
                std::fs::canonicalize(
                    ours_path.join(format!("streams/ostree-commit-{}", r.commit))
                )
                .unwrap(),
                "the ref names the commit imported"
            );
            seen.insert(r.commit);
        }
        stop.store(true, Relaxed);
    });
    cstor_tests::note(&format!(
        "{test}: {} of the 2 commits seen in 30 imports",
        seen.len()
    ));
}

/// A file with a capability and an SELinux label: the image carries both under their
/// names, without ostree's trailing NUL, with the values byte for byte (the label's own
/// NUL included), and the mounted image shows them.
#[test]
fn security_xattrs_reach_the_image_byte_exact() {
    let test = "security_xattrs_reach_the_image_byte_exact";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let ping = write_file(&tree, "usr/bin/ping", &[0x7f; 4000], 0o755);
    // cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it (VFS_CAP_REVISION_2).
    let cap = "0x0100000200200000000000000000000000000000";
    ostree::setfattr(&ping, "security.capability", cap);
    // Labels carry a NUL of their own, as SELinux writes them.
    let label = "system_u:object_r:ping_exec_t:s0\0";
    let label_hex = format!("0x{}", hex::encode(label));
    let labelled = Command::new("setfattr")
        .args(["-n", "security.selinux", "-v", &label_hex])
        .arg(&ping)
        .output()
        .unwrap();
    let with_label = labelled.status.success();
    if !with_label {
        cstor_tests::note(&format!(
            "{test}: this kernel or filesystem refuses security.selinux ({}); \
             checking security.capability alone",
            String::from_utf8_lossy(&labelled.stderr).trim()
        ));
    }
    let mut expected = BTreeMap::new();
    for name in ["security.capability", "security.selinux"] {
        if let Some(v) = cstor_tests::read_xattr(&ping, name).unwrap() {
            expected.insert(name.as_bytes().to_vec(), v);
        }
    }
    assert_eq!(expected.len(), 1 + with_label as usize, "{expected:?}");
    if with_label {
        assert_eq!(expected[b"security.selinux".as_slice()], label.as_bytes());
    }

    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "bare");
    ostree::commit(&os, "main", &tree, &[]);
    let ours = dir.path().join("cfs");
    let repo = fresh_repo(&ours);
    let report = import(&store, &repo, &os, "main").unwrap();

    let img = std::fs::read(ours.join("images").join(&report.image_id)).unwrap();
    let fs = composefs::erofs::reader::erofs_to_filesystem::<Sha512HashValue>(&img).unwrap();
    let bin = fs
        .root
        .get_directory(std::ffi::OsStr::new("usr/bin"))
        .unwrap();
    let leaf = bin.leaf_id(std::ffi::OsStr::new("ping")).unwrap();
    let in_image: BTreeMap<Vec<u8>, Vec<u8>> = fs
        .leaf(leaf)
        .stat
        .xattrs
        .iter()
        .map(|(k, v)| (k.as_encoded_bytes().to_vec(), v.to_vec()))
        .collect();
    assert_eq!(in_image, expected, "the image's xattrs of usr/bin/ping");

    // Mounted, when this kernel mounts composefs images.
    let mnt = tempfile::tempdir().unwrap();
    match repo.mount_at(
        &report.image_id,
        mnt.path(),
        &composefs::mount::MountOptions::default(),
    ) {
        Ok(()) => {
            let seen: BTreeMap<Vec<u8>, Vec<u8>> = expected
                .keys()
                .map(|n| {
                    let n = std::str::from_utf8(n).unwrap();
                    let v = cstor_tests::read_xattr(&mnt.path().join("usr/bin/ping"), n);
                    (n.as_bytes().to_vec(), v.unwrap().unwrap_or_default())
                })
                .collect();
            rustix::mount::unmount(mnt.path(), rustix::mount::UnmountFlags::DETACH).unwrap();
            assert_eq!(seen, expected, "xattrs of the mounted usr/bin/ping");
        }
        Err(e) => cstor_tests::note(&format!(
            "{test}: the image does not mount here ({e:#}); checked in the image only"
        )),
    }
}

/// A program following an import's progress: the totals arrive once the tree is walked,
/// before any file, then one event per file object stored, counting up to those totals
/// with the bytes the report gives, then the finalizing step and the end.
#[test]
fn progress_events_count_up_to_the_totals_told_first() {
    let test = "progress_events_count_up_to_the_totals_told_first";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    for i in 0..300 {
        let content = format!("file {i}\n").repeat(100);
        write_file(&tree, &format!("many/f{i}"), content.as_bytes(), 0o644);
    }
    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "archive");
    let commit = ostree::commit(&os, "main", &tree, &[]);
    let repo = fresh_repo(&dir.path().join("cfs"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let report = runtime().block_on(async {
        let client = client_for(&store).await.unwrap();
        let options = ImportOptions::new().events(tx);
        let r = import_ostree_commit(&client, &repo, &os, "main", &options).await;
        client.shutdown().await.unwrap();
        r.unwrap()
    });
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    // 300 distinct files, plus the tree's 9 (a and b are one object).
    assert_eq!(report.file_objects, 309);
    match events.first() {
        Some(ImportEvent::OstreeStarted {
            commit: c,
            metadata_objects,
            files,
            ..
        }) => assert_eq!(
            (c, *metadata_objects, *files),
            (&commit, report.metadata_objects, report.file_objects)
        ),
        other => panic!("the first event is not the totals: {other:?}"),
    }
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            ImportEvent::OstreeProgress {
                files_done,
                bytes_done,
                ..
            } => Some((*files_done, *bytes_done)),
            _ => None,
        })
        .collect();
    let counted: Vec<u64> = progress.iter().map(|p| p.0).collect();
    assert_eq!(counted, (1..=report.file_objects).collect::<Vec<_>>());
    assert!(
        progress.windows(2).all(|w| w[0].1 <= w[1].1),
        "{progress:?}"
    );
    assert_eq!(progress.last().map(|p| p.1), Some(report.content_bytes));
    assert_eq!(
        &events[events.len() - 2..],
        [ImportEvent::Finalizing, ImportEvent::Finished]
    );
}

/// Importing a commit the repository already has reads its stream, not the ostree
/// repository: the same image, stream and name come back, every content counted present,
/// even after the ostree repository lost a content (a commit's objects are named by their
/// checksums, so the stream holds what the first import verified). A commit upstream
/// imported first, whose image keeps the xattr names' NUL, is imported afresh instead.
#[test]
fn a_commit_already_imported_is_rebuilt_from_its_stream() {
    let test = "a_commit_already_imported_is_rebuilt_from_its_stream";
    if !ready_alone(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let store = empty_store(&dir.path().join("cs"));
    for mode in ["bare", "archive"] {
        let os = dir.path().join(format!("ostree-{mode}"));
        ostree::init(&os, mode);
        ostree::commit(&os, "main", &tree, &[]);
        let ours = dir.path().join(format!("cfs-{mode}"));
        let repo = fresh_repo(&ours);
        let first = import(&store, &repo, &os, "main").unwrap();
        assert!(!first.reused_stream);
        // usr/bin/su, 5000 bytes, is an object of its own: gone from the ostree repository.
        let su = ostree::checksum_of(&os, "main", "/usr/bin/su");
        let ext = if mode == "archive" { "filez" } else { "file" };
        std::fs::remove_file(ostree::object_file(&os, &su, ext)).unwrap();
        std::fs::remove_file(ours.join("streams/refs/ostree/main")).unwrap();

        let again = import(&store, &repo, &os, "main").unwrap();
        assert!(again.reused_stream, "{mode}");
        assert_eq!(
            (&again.image_id, &again.stream_id, &again.reference),
            (&first.image_id, &first.stream_id, &first.reference),
            "{mode}"
        );
        assert_eq!(
            (
                again.file_objects,
                again.metadata_objects,
                again.content_bytes
            ),
            (
                first.file_objects,
                first.metadata_objects,
                first.content_bytes
            ),
            "{mode}"
        );
        let o = &again.objects;
        assert_eq!(
            (o.present, o.reflinked + o.copied + o.hardlinked),
            (first.external_objects, 0),
            "{mode}: {o:?}"
        );
        assert!(ours.join("streams/refs/ostree/main").exists(), "{mode}");
    }
}

/// A commit upstream imported first (its image keeps ostree's NUL in xattr names) is not
/// taken from upstream's stream: cstor imports it afresh, with its own image.
#[test]
fn a_commit_upstream_imported_is_imported_afresh() {
    let test = "a_commit_upstream_imported_is_imported_afresh";
    let Some(cfsctl) = ready(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let f = write_file(&tree, "f", b"x", 0o644);
    ostree::setfattr(&f, "user.key", "value");
    let store = empty_store(&dir.path().join("cs"));
    let os = dir.path().join("ostree");
    ostree::init(&os, "bare-user");
    ostree::commit(&os, "main", &tree, &[]);
    let shared = dir.path().join("cfs");
    cfs(
        &cfsctl,
        &shared,
        &["init", "--insecure", shared.to_str().unwrap()],
    );
    let up_image = image_line(&cfs(
        &cfsctl,
        &shared,
        &["ostree", "pull-local", os.to_str().unwrap(), "main"],
    ));
    let repo = open_repository::<Sha512HashValue>(&shared).unwrap();
    let r = import(&store, &repo, &os, "main").unwrap();
    assert!(!r.reused_stream);
    assert_ne!(r.image_id, up_image);
    assert_eq!(
        cfs(&cfsctl, &shared, &["ostree", "compute-id", "main"]).trim(),
        r.image_id,
        "the commit stream now links our image"
    );
    // And from then on, ours is reused.
    let again = import(&store, &repo, &os, "main").unwrap();
    assert!(again.reused_stream);
    assert_eq!(again.image_id, r.image_id);
}
