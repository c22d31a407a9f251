//! Story: a user points cstor at an ostree repository of any mode and names a commit; the
//! helper resolves it as ostree does, serves the commit's metadata objects checked against
//! their checksums and every file with the metadata ostree checksummed, so a client can walk
//! the whole tree in a few round trips and verify each file. Corrupt objects fail naming the
//! object, and `ostree prune` waits while the helper holds the repository.
//!
//! Repositories are made with the `ostree` CLI and compared with what `ostree` itself
//! reports (`rev-parse`, `ls -R -C`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use cstor_protocol::ostree::format::{Commit, DirTree, FileHasher, Meta};
use cstor_protocol::ostree::{GetOstreeObjectsResult, OpenOstreeFilesResult};
use cstor_tests::ostree::{empty_store, object_file, ostree, setfattr, write_file};
use cstor_tests::session::{RawHelper, error_code, wait_with_timeout};
use cstor_tests::{PodmanStore, skip};
use serde_json::{Value, json};

const MODES: [&str; 4] = ["bare", "bare-user", "bare-user-only", "archive"];

fn ready(test: &str) -> bool {
    skip::require_root(test) && skip::require_tools(test, &["ostree", "setfattr"])
}

/// A tree with what ostree must carry exactly: owners, setuid, a 0600 file, a 0700
/// directory, xattrs (several on one file, one on a symlink), symlinks, identical files,
/// an empty file and a file large enough to be compressed in several deflate blocks.
fn write_tree(root: &Path) {
    let f = |rel: &str, content: &[u8], mode: u32| write_file(root, rel, content, mode);
    f("etc/hostname", b"ostree-test\n", 0o644);
    f("etc/shadow", b"root:*:1::::::\n", 0o600);
    f("usr/bin/su", b"\x7fELF pretend setuid\n", 0o4755);
    f("usr/share/a.txt", b"same content\n", 0o644);
    f("usr/share/b.txt", b"same content\n", 0o644);
    f("empty", b"", 0o644);
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f("usr/lib/big.bin", &big, 0o755);
    let x = f("usr/share/xattrs", b"labelled\n", 0o644);
    for (n, v) in [
        ("user.zeta", "last"),
        ("user.alpha", "first"),
        ("user.mid", "m"),
    ] {
        setfattr(&x, n, v);
    }
    let owned = f("home/user/notes", b"owned by 1234:5678\n", 0o640);
    rustix::fs::chown(
        &owned,
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("home/user"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    symlink("hostname", root.join("etc/hostname-link")).unwrap();
    symlink("/usr/bin/su", root.join("usr/bin/su-abs")).unwrap();
    // user.* xattrs are not allowed on symlinks; trusted.* are (for root).
    setfattr(
        &root.join("etc/hostname-link"),
        "trusted.link",
        "on-a-symlink",
    );
}

/// A repository of `mode` with the tree committed as `main`; returns its path and commit.
fn make_repo(dir: &Path, mode: &str, tree: &Path) -> (PathBuf, String) {
    let repo = dir.join(format!("repo-{mode}"));
    ostree(&repo, &["init", &format!("--mode={mode}")]);
    ostree(
        &repo,
        &[
            "commit",
            "-b",
            "main",
            "-s",
            "test",
            "--timestamp=2024-01-01",
            &format!("--tree=dir={}", tree.display()),
        ],
    );
    let commit = ostree(&repo, &["rev-parse", "main"]).trim().to_owned();
    (repo, commit)
}

struct Session {
    helper: RawHelper,
    next_id: u64,
    repo: u64,
    max_fds: usize,
    calls: BTreeMap<&'static str, usize>,
}

impl Session {
    fn open(store: &PodmanStore, repo: &Path) -> Self {
        let mut helper = RawHelper::spawn(store, &[]).unwrap();
        let init = helper.initialize().unwrap();
        assert!(
            init["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!("ostree")),
            "{init}"
        );
        let max_fds = init["limits"]["max_fds_per_message"].as_u64().unwrap() as usize;
        let mut s = Self {
            helper,
            next_id: 1,
            repo: 0,
            max_fds,
            calls: BTreeMap::new(),
        };
        let r = s.ok("OpenOstreeRepo", json!({"path": repo}));
        assert_eq!(r["locked"], true, "{r}");
        s.repo = r["repo"].as_u64().unwrap();
        s
    }

    fn call(&mut self, method: &'static str, params: Value) -> cstor_tests::session::RawMessage {
        *self.calls.entry(method).or_default() += 1;
        self.next_id += 1;
        self.helper.call(self.next_id, method, params).unwrap()
    }

    fn ok(&mut self, method: &'static str, params: Value) -> Value {
        let r = self.call(method, params);
        match r.value.get("result") {
            Some(v) => v.clone(),
            None => panic!("{method} failed: {}", r.value),
        }
    }

    fn err(&mut self, method: &'static str, params: Value) -> Value {
        let r = self.call(method, params);
        r.value
            .get("error")
            .unwrap_or_else(|| panic!("{method} succeeded: {}", r.value))
            .clone()
    }

    /// Fetches metadata objects, following partial replies.
    fn objects(&mut self, wanted: &[(String, &str)]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < wanted.len() {
            let ask: Vec<Value> = wanted[out.len()..]
                .iter()
                .map(|(c, t)| json!({"checksum": c, "type": t}))
                .collect();
            let r = self.ok(
                "GetOstreeObjects",
                json!({"repo": self.repo, "objects": ask}),
            );
            let r: GetOstreeObjectsResult = serde_json::from_value(r).unwrap();
            assert!(!r.objects.is_empty());
            for o in r.objects {
                assert_eq!(o.checksum, wanted[out.len()].0);
                out.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(o.data)
                        .unwrap(),
                );
            }
        }
        out
    }
}

/// What `ostree ls -R -C` says of one path: type and permission bits, owner, size,
/// checksum (dirtree checksum for a directory), symlink target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    checksum: String,
    target: Option<String>,
}

fn ostree_listing(repo: &Path) -> BTreeMap<String, Entry> {
    let out = ostree(repo, &["ls", "-R", "-C", "main"]);
    let mut map = BTreeMap::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (path, target) = match w.iter().position(|x| *x == "->") {
            Some(i) => (w[i - 1], Some(w[i + 1].to_owned())),
            None => (*w.last().unwrap(), None),
        };
        map.insert(
            path.to_owned(),
            Entry {
                mode: w[0].to_owned(),
                uid: w[1].parse().unwrap(),
                gid: w[2].parse().unwrap(),
                size: w[3].parse().unwrap(),
                checksum: w[4].to_owned(),
                target,
            },
        );
    }
    map
}

fn ls_mode(mode: u32) -> String {
    let t = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        _ => '-',
    };
    format!("{t}{:05o}", mode & 0o7777)
}

/// Walks `commit` through the helper: every file verified against its checksum. Returns the
/// listing in `ostree ls -R -C` form and the xattrs of each path (names without the NUL).
#[allow(clippy::type_complexity)]
fn walk(
    s: &mut Session,
    commit: &str,
) -> (
    BTreeMap<String, Entry>,
    BTreeMap<String, BTreeMap<String, Vec<u8>>>,
) {
    let c = Commit::decode(&s.objects(&[(commit.to_owned(), "commit")])[0]).unwrap();
    let mut listing = BTreeMap::new();
    let mut xattrs = BTreeMap::new();
    let mut files: Vec<(String, String)> = Vec::new();
    let mut level = vec![(
        "/".to_owned(),
        hex::encode(c.root_tree),
        hex::encode(c.root_meta),
    )];
    while !level.is_empty() {
        let mut wanted = Vec::new();
        for (_, tree, meta) in &level {
            wanted.push((tree.clone(), "dirtree"));
            wanted.push((meta.clone(), "dirmeta"));
        }
        let got = s.objects(&wanted);
        let mut next = Vec::new();
        for (i, (path, tree, _)) in level.iter().enumerate() {
            let t = DirTree::decode(&got[2 * i]).unwrap();
            let m = Meta::decode(&got[2 * i + 1]).unwrap();
            listing.insert(
                path.clone(),
                Entry {
                    mode: ls_mode(m.mode),
                    uid: m.uid,
                    gid: m.gid,
                    size: 0,
                    checksum: tree.clone(),
                    target: None,
                },
            );
            xattrs.insert(path.clone(), names(&m.xattrs));
            let child = |n: &str| {
                if path == "/" {
                    format!("/{n}")
                } else {
                    format!("{path}/{n}")
                }
            };
            for (n, c) in &t.files {
                files.push((child(n), hex::encode(c)));
            }
            for (n, tr, me) in &t.dirs {
                next.push((child(n), hex::encode(tr), hex::encode(me)));
            }
        }
        level = next;
    }
    // Each distinct file object once, in batches the helper accepts.
    let unique: Vec<String> = files
        .iter()
        .map(|(_, c)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut by_checksum = BTreeMap::new();
    for batch in unique.chunks(s.max_fds) {
        let r = s.call("OpenOstreeFiles", json!({"repo": s.repo, "files": batch}));
        let res: OpenOstreeFilesResult = serde_json::from_value(r.value["result"].clone())
            .unwrap_or_else(|e| {
                panic!("OpenOstreeFiles failed ({e}): {}", r.value);
            });
        let mut fds: Vec<Option<std::os::fd::OwnedFd>> = r.fds.into_iter().map(Some).collect();
        for f in res.files {
            let meta = Meta {
                uid: f.uid,
                gid: f.gid,
                mode: f.mode,
                xattrs: f
                    .xattrs
                    .iter()
                    .map(|x| {
                        let d =
                            |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
                        (d(&x.name), d(&x.value))
                    })
                    .collect(),
            };
            let target = f.symlink_target.clone().unwrap_or_default();
            let mut h = FileHasher::new(&meta, &target);
            let mut content = Vec::new();
            if let Some(i) = f.fd {
                let mut file = std::fs::File::from(fds[i as usize].take().unwrap());
                file.seek(SeekFrom::Start(f.content_offset)).unwrap();
                match f.content.unwrap() {
                    cstor_protocol::ostree::ContentEncoding::Raw => {
                        file.read_to_end(&mut content).unwrap();
                    }
                    cstor_protocol::ostree::ContentEncoding::Deflate => {
                        flate2::read::DeflateDecoder::new(file)
                            .read_to_end(&mut content)
                            .unwrap();
                    }
                }
            }
            assert_eq!(content.len() as u64, f.size, "{}", f.checksum);
            h.update(&content);
            assert_eq!(
                hex::encode(h.finish()),
                f.checksum,
                "the metadata and content served for a file object hash to its name"
            );
            by_checksum.insert(f.checksum.clone(), (meta, f.size, f.symlink_target));
        }
    }
    for (path, c) in files {
        let (meta, size, target) = &by_checksum[&c];
        listing.insert(
            path.clone(),
            Entry {
                mode: ls_mode(meta.mode),
                uid: meta.uid,
                gid: meta.gid,
                size: *size,
                checksum: c,
                target: target.clone(),
            },
        );
        xattrs.insert(path, names(&meta.xattrs));
    }
    (listing, xattrs)
}

fn names(x: &[(Vec<u8>, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    x.iter()
        .map(|(n, v)| {
            let n = n.strip_suffix(b"\0").expect("ostree names end with NUL");
            (String::from_utf8(n.to_vec()).unwrap(), v.clone())
        })
        .collect()
}

#[test]
fn every_mode_serves_the_commit_ostree_made() {
    let test = "every_mode_serves_the_commit_ostree_made";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write_tree(&tree);
    let store = empty_store(&dir.path().join("cs"));
    for mode in MODES {
        let (repo, commit) = make_repo(dir.path(), mode, &tree);
        let mut s = Session::open(&store, &repo);
        let r = s.ok("ResolveOstreeRef", json!({"repo": s.repo, "ref": "main"}));
        assert_eq!(r["commit"], commit.as_str(), "{mode}");
        assert_eq!(r["ref_file"], "refs/heads/main", "{mode}");

        let (listing, xattrs) = walk(&mut s, &commit);
        assert_eq!(
            listing,
            ostree_listing(&repo),
            "{mode}: the walk differs from ostree ls"
        );
        // Metadata: one request for the commit, one per tree level (4 here); files in one.
        assert!(s.calls["GetOstreeObjects"] <= 6, "{mode}: {:?}", s.calls);
        assert_eq!(s.calls["OpenOstreeFiles"], 1, "{mode}");

        let x = &xattrs["/usr/share/xattrs"];
        let link = &xattrs["/etc/hostname-link"];
        let owner = &listing["/home/user/notes"];
        if mode == "bare-user-only" {
            // ostree drops xattrs, owners and setuid when committing into bare-user-only.
            assert!(x.is_empty() && link.is_empty(), "{mode}: {x:?}");
            assert_eq!((owner.uid, owner.gid), (0, 0));
            assert_eq!(listing["/usr/bin/su"].mode, "-00755");
        } else {
            let keys: Vec<&str> = x.keys().map(|k| k.as_str()).collect();
            assert_eq!(keys, ["user.alpha", "user.mid", "user.zeta"], "{mode}");
            assert_eq!(link["trusted.link"], b"on-a-symlink", "{mode}");
            assert_eq!((owner.uid, owner.gid), (1234, 5678), "{mode}");
            assert_eq!(listing["/usr/bin/su"].mode, "-04755");
            assert_eq!(listing["/etc/shadow"].mode, "-00600");
            assert_eq!(listing["/home/user"].mode, "d00700");
        }
        assert_eq!(
            listing["/usr/share/a.txt"].checksum, listing["/usr/share/b.txt"].checksum,
            "identical files are one object"
        );
        assert_eq!(
            listing["/usr/bin/su-abs"].target.as_deref(),
            Some("/usr/bin/su")
        );
        s.ok("CloseOstreeRepo", json!({"repo": s.repo}));
        let e = s.err("ResolveOstreeRef", json!({"repo": s.repo, "ref": "main"}));
        assert_eq!(error_code(&json!({"error": e})), Some(1500));
    }
}

#[test]
fn refs_resolve_as_ostree_resolves_them() {
    let test = "refs_resolve_as_ostree_resolves_them";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), b"one").unwrap();
    let store = empty_store(&dir.path().join("cs"));
    let (repo, commit) = make_repo(dir.path(), "bare-user", &tree);
    // A second commit, a remote ref and a nested ref.
    std::fs::write(tree.join("f"), b"two").unwrap();
    ostree(
        &repo,
        &[
            "commit",
            "-b",
            "os/x86_64/stable",
            &format!("--tree=dir={}", tree.display()),
        ],
    );
    let second = ostree(&repo, &["rev-parse", "os/x86_64/stable"])
        .trim()
        .to_owned();
    std::fs::create_dir_all(repo.join("refs/remotes/origin")).unwrap();
    std::fs::write(repo.join("refs/remotes/origin/prod"), format!("{commit}\n")).unwrap();
    assert_eq!(ostree(&repo, &["rev-parse", "origin:prod"]).trim(), commit);

    let mut s = Session::open(&store, &repo);
    let resolve = |s: &mut Session, r: &str| {
        s.call("ResolveOstreeRef", json!({"repo": s.repo, "ref": r}))
            .value
    };
    for (r, want, file) in [
        ("main", &commit, Some("refs/heads/main")),
        (
            "os/x86_64/stable",
            &second,
            Some("refs/heads/os/x86_64/stable"),
        ),
        ("origin:prod", &commit, Some("refs/remotes/origin/prod")),
        ("origin/prod", &commit, Some("refs/remotes/origin/prod")),
        (commit.as_str(), &commit, None),
        (&commit[..10], &commit, None),
    ] {
        let v = resolve(&mut s, r);
        assert_eq!(v["result"]["commit"], want.as_str(), "{r}: {v}");
        assert_eq!(v["result"]["ref_file"].as_str(), file, "{r}");
    }
    // Two commit objects sharing a prefix: a copy of one under a name that differs after
    // the sixth digit (the prefix lookup only lists names).
    let other_digit = if &second[6..7] == "f" { "0" } else { "f" };
    let twin = format!("{}{}", &second[..6], other_digit.repeat(58));
    std::fs::copy(
        repo.join(format!("objects/{}/{}.commit", &second[..2], &second[2..])),
        repo.join(format!("objects/{}/{}.commit", &twin[..2], &twin[2..])),
    )
    .unwrap();
    let v = resolve(&mut s, &second[..6]);
    assert_eq!(error_code(&v), Some(1202), "{v}");
    let candidates = v["error"]["data"]["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2, "{v}");
    assert_eq!(
        resolve(&mut s, &second[..7])["result"]["commit"],
        second.as_str()
    );
    for (bad, code) in [
        ("../../etc", 1200),
        ("main^", 1200),
        ("", 1200),
        ("nope", 1201),
        (&"0".repeat(64), 1201),
        ("origin:missing", 1201),
    ] {
        let v = resolve(&mut s, bad);
        assert_eq!(error_code(&v), Some(code), "{bad:?}: {v}");
    }
    let e = s.err("OpenOstreeRepo", json!({"path": dir.path().join("tree")}));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("is this an ostree repository"),
        "{e}"
    );
    let e = s.err("OpenOstreeRepo", json!({"path": "relative/repo"}));
    assert_eq!(e["code"], -32602, "{e}");
}

#[test]
fn corrupt_objects_fail_naming_the_object() {
    let test = "corrupt_objects_fail_naming_the_object";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/f"), b"content").unwrap();
    let store = empty_store(&dir.path().join("cs"));
    for mode in ["bare", "archive"] {
        let (repo, commit) = make_repo(dir.path(), mode, &tree);
        let mut s = Session::open(&store, &repo);
        let c = Commit::decode(&s.objects(&[(commit.clone(), "commit")])[0]).unwrap();
        let root = hex::encode(c.root_tree);
        let t = DirTree::decode(&s.objects(&[(root.clone(), "dirtree")])[0]).unwrap();
        let sub = hex::encode(t.dirs[0].1);

        // A flipped byte in a dirtree: the checksum no longer matches.
        let p = object_file(&repo, &sub, "dirtree");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let e = s.err(
            "GetOstreeObjects",
            json!({"repo": s.repo, "objects": [{"checksum": sub, "type": "dirtree"}]}),
        );
        assert_eq!(e["code"], 1303, "{mode}: {e}");
        assert!(e["message"].as_str().unwrap().contains(&sub), "{e}");
        assert_eq!(
            e["data"]["path"],
            format!("objects/{}/{}.dirtree", &sub[..2], &sub[2..])
        );

        // A missing object.
        std::fs::remove_file(&p).unwrap();
        let e = s.err(
            "GetOstreeObjects",
            json!({"repo": s.repo, "objects": [{"checksum": sub, "type": "dirtree"}]}),
        );
        assert_eq!(e["code"], 1304, "{mode}: {e}");

        // A checksum given with the wrong type names a file that does not exist.
        let e = s.err(
            "GetOstreeObjects",
            json!({"repo": s.repo, "objects": [{"checksum": root, "type": "commit"}]}),
        );
        assert_eq!(e["code"], 1304, "{mode}: {e}");

        // An archive object whose header is cut short.
        if mode == "archive" {
            let files: Vec<_> = walkdir(&repo.join("objects"))
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "filez"))
                .collect();
            let f = &files[0];
            let name = f.file_stem().unwrap().to_str().unwrap();
            let checksum = format!(
                "{}{name}",
                f.parent().unwrap().file_name().unwrap().to_str().unwrap()
            );
            std::fs::write(f, b"\0\0\0\x40\0\0\0\0short").unwrap();
            let e = s.err(
                "OpenOstreeFiles",
                json!({"repo": s.repo, "files": [checksum]}),
            );
            assert_eq!(e["code"], 1300, "{e}");
            assert!(e["message"].as_str().unwrap().contains(&checksum), "{e}");
        }
    }
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn prune_waits_while_the_helper_holds_the_repository() {
    let test = "prune_waits_while_the_helper_holds_the_repository";
    if !ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = empty_store(&dir.path().join("cs"));
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("only-in-old"), b"unique to the old commit").unwrap();
    let (repo, old) = make_repo(dir.path(), "bare", &tree);
    ostree(&repo, &["refs", "--delete", "main"]);
    let commit_object = object_file(&repo, &old, "commit");
    assert!(commit_object.exists());

    let mut s = Session::open(&store, &repo);
    let mut prune = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["prune", "--refs-only"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        prune.try_wait().unwrap().is_none(),
        "ostree prune finished while the helper held the repository"
    );
    assert!(commit_object.exists());
    // The helper still serves the unreferenced commit.
    s.objects(&[(old.clone(), "commit")]);

    s.ok("CloseOstreeRepo", json!({"repo": s.repo}));
    let status = wait_with_timeout(&mut prune, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "ostree prune failed: {status}");
    assert!(
        !commit_object.exists(),
        "prune removed the unreferenced commit"
    );
}
