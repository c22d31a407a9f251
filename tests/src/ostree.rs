//! ostree repositories for the ostree stories, made with the real `ostree` CLI: running it
//! on a repository, where its objects live on disk, and the empty containers-storage the
//! helper starts with when only ostree methods are called.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{PodmanStore, run_command};

/// Runs `ostree --repo=<repo> <args>` and returns its stdout; panics (the test fails) when
/// it fails.
///
/// After `init`, the repository accepts commits on a nearly full disk: ostree refuses to
/// commit with less than 3% free, and these tests write a few kB, so a busy disk on the
/// test machine must not fail them.
pub fn ostree(repo: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("ostree");
    cmd.arg(format!("--repo={}", repo.display())).args(args);
    let out = run_command(&mut cmd, "ostree").unwrap();
    if args.first() == Some(&"init") {
        let mut cmd = Command::new("ostree");
        cmd.arg(format!("--repo={}", repo.display())).args([
            "config",
            "set",
            "core.min-free-space-percent",
            "0",
        ]);
        run_command(&mut cmd, "ostree").unwrap();
    }
    out
}

/// Initialises a repository of `mode` at `repo`.
pub fn init(repo: &Path, mode: &str) {
    ostree(repo, &["init", &format!("--mode={mode}")]);
}

/// Commits the directory `tree` as `branch` (with `extra` arguments to `ostree commit`,
/// e.g. a timestamp) and returns the new commit's checksum.
pub fn commit(repo: &Path, branch: &str, tree: &Path, extra: &[&str]) -> String {
    let tree_arg = format!("--tree=dir={}", tree.display());
    let mut args = vec!["commit", "-b", branch];
    args.extend_from_slice(extra);
    args.push(&tree_arg);
    ostree(repo, &args);
    rev_parse(repo, branch)
}

/// The commit `rev` names.
pub fn rev_parse(repo: &Path, rev: &str) -> String {
    ostree(repo, &["rev-parse", rev]).trim().to_owned()
}

/// The file holding object `checksum` of type `ext` (`commit`, `dirtree`, `dirmeta`,
/// `file`, `filez`).
pub fn object_file(repo: &Path, checksum: &str, ext: &str) -> PathBuf {
    repo.join(format!(
        "objects/{}/{}.{ext}",
        &checksum[..2],
        &checksum[2..]
    ))
}

/// The checksum ostree lists for `path` of commit `rev` (`ostree ls -C`): the file object's
/// for a file, the dirtree's for a directory.
pub fn checksum_of(repo: &Path, rev: &str, path: &str) -> String {
    let out = ostree(repo, &["ls", "-C", "-d", rev, path]);
    out.split_whitespace()
        .nth(4)
        .unwrap_or_else(|| panic!("no checksum in `ostree ls -C -d {rev} {path}`: {out}"))
        .to_owned()
}

/// An empty containers-storage in `dir` for the helper to start with; the ostree methods
/// do not touch it.
pub fn empty_store(dir: &Path) -> PodmanStore {
    let p = |n: &str| {
        let d = dir.join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    PodmanStore {
        dir: dir.to_owned(),
        root: p("root"),
        runroot: p("runroot"),
        tmpdir: p("tmp"),
        storage_conf: dir.join("storage.conf"),
        containers_conf: dir.join("containers.conf"),
    }
}

/// Writes `content` at `root/rel` with permission bits `mode`, creating its parents;
/// returns its path.
pub fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// Sets xattr `name` to `value` on `path` (not following a symlink) with `setfattr`.
pub fn setfattr(path: &Path, name: &str, value: &str) {
    run_command(
        Command::new("setfattr")
            .args(["-h", "-n", name, "-v", value])
            .arg(path),
        "setfattr",
    )
    .unwrap();
}
