//! The standard image set, built once and shared.
//!
//! [`standard_images`] builds (on first use in a process) or reuses a private
//! podman store holding four images:
//!
//! | field | name | how it is made |
//! |---|---|---|
//! | `features` | `localhost/cstor-test/features:latest` | `podman import` of the [feature rootfs](crate::rootfs) tar: one layer |
//! | `commit` | `localhost/cstor-test/commit:latest` | `features` + [`CommitChanges`] via [`PodmanStore::commit_with`]: two layers, the top one with whiteouts and an opaque directory |
//! | `loaded` | `localhost/cstor-test/loaded:latest` | a different small rootfs, imported into a scratch store, copied with skopeo to an `oci-archive` (gzip layers), `podman load`ed: one layer with a `compressed-diff-digest` |
//! | `small` | `localhost/cstor-test/small:latest` | `podman import` of a few files: one layer |
//!
//! What the storage looks like (podman 4.3.1 on kernel 6.18, as root):
//!
//! - the commit layer's diff directory holds each deleted path as a 0:0
//!   character device (mode 0 on the device node) and the deleted-then-
//!   recreated directory carries `trusted.overlay.opaque=y`; its tar-split
//!   keeps the `.wh.<name>` and `.wh..wh..opq` entries;
//! - the loaded layer's `compressed-diff-digest` is the digest of the gzip
//!   blob in the archive (which the stored manifest also lists) and differs
//!   from its `diff-digest`, with `compression` = 2 (gzip) and
//!   `compressed-size` < `diff-size`; imported and committed layers have
//!   `compressed-diff-digest` equal to `diff-digest`, equal sizes, and
//!   `compression` null;
//! - layer ids: an imported or loaded base layer's id is its diff digest (hex);
//!   the committed layer has a random id (not its chain id);
//! - every layer's `diff/` directory itself is mode 0555 root:root, whatever
//!   the tar's `./` entry says (0755 here; tar-split keeps that header);
//! - GNU tar `--xattrs` writes PAX headers with `mtime`, `atime` and `ctime`
//!   records for every entry, and podman keeps them in tar-split;
//! - an xattr with an empty value is in the tar but not in the diff
//!   directory (see [`FeatureManifest::empty_user_xattr`]).
//!
//! The store lives in [`fixture_base_dir`]. An exclusive `flock` on
//! `<base>/lock` makes concurrent test processes share one build; the
//! marker `<base>/complete.json` makes later processes and later runs reuse
//! it. Bump [`FIXTURE_VERSION`] whenever what is built changes.
//!
//! Tests must treat the standard store as read-only. Tests that corrupt
//! storage use [`small_private_store`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::podman::{ImageRef, PodmanStore, read_json};
use crate::rootfs::{FeatureManifest, tar_rootfs, write_feature_rootfs, write_small_rootfs};
use crate::{remove_tree, run_command, skip};

/// Version of the fixture content; part of the default base directory.
pub const FIXTURE_VERSION: u32 = 1;
/// Environment variable overriding the base directory of the standard
/// images.
pub const BASE_DIR_ENV: &str = "CSTOR_TEST_DIR";
/// Name of the feature image.
pub const FEATURES_NAME: &str = "localhost/cstor-test/features:latest";
/// Name of the commit image.
pub const COMMIT_NAME: &str = "localhost/cstor-test/commit:latest";
/// Name of the loaded (gzip) image.
pub const LOADED_NAME: &str = "localhost/cstor-test/loaded:latest";
/// Name of the small image.
pub const SMALL_NAME: &str = "localhost/cstor-test/small:latest";

const MARKER: &str = "complete.json";
const LOCK: &str = "lock";

/// The shared standard images (see the module documentation).
#[derive(Debug)]
pub struct StandardImages {
    /// The base directory holding everything below.
    pub base_dir: PathBuf,
    /// The store holding the four images. Read-only for tests.
    pub store: PodmanStore,
    /// One layer: the feature rootfs.
    pub features: ImageRef,
    /// Two layers: `features` plus [`CommitChanges`].
    pub commit: ImageRef,
    /// One layer loaded from a gzip `oci-archive`.
    pub loaded: ImageRef,
    /// One small layer.
    pub small: ImageRef,
    /// Where each feature lives in `features`.
    pub feature_manifest: FeatureManifest,
    /// The feature rootfs on disk (the source of `features`).
    pub features_rootfs: PathBuf,
    /// The tar file `features` was imported from.
    pub features_tar: PathBuf,
    /// The changes of `commit` relative to `features`.
    pub commit_changes: CommitChanges,
    /// The gzip `oci-archive` `loaded` was loaded from.
    pub loaded_archive: PathBuf,
}

/// What the commit image changes on top of the feature image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitChanges {
    /// Deleted regular files (whiteouts), one of them a hard link.
    pub deleted_files: Vec<PathBuf>,
    /// Deleted directories with content (a whiteout for the directory).
    pub deleted_dirs: Vec<PathBuf>,
    /// A directory deleted with its content and recreated (opaque).
    pub opaque_dir: PathBuf,
    /// The new content of `opaque_dir` (relative to the rootfs).
    pub opaque_dir_files: Vec<PathBuf>,
    /// New files (some in new directories).
    pub added_files: Vec<PathBuf>,
    /// A file whose content is replaced, and the new content.
    pub replaced_file: (PathBuf, Vec<u8>),
    /// A file whose mode changes, and the new mode.
    pub chmod_file: (PathBuf, u32),
    /// A file whose owner changes, and the new uid and gid.
    pub chown_file: (PathBuf, u32, u32),
}

impl CommitChanges {
    /// The changes the standard commit image makes.
    pub fn standard() -> Self {
        let m = FeatureManifest::standard();
        let p = PathBuf::from;
        CommitChanges {
            deleted_files: vec![p("etc/hostname"), m.hardlinks[1].clone(), m.many_file(500)],
            deleted_dirs: vec![m.removed_dir.clone()],
            opaque_dir: m.replaced_dir.clone(),
            opaque_dir_files: vec![
                m.replaced_dir.join("new-1"),
                m.replaced_dir.join("new-dir/new-2"),
            ],
            added_files: vec![
                p("etc/added.conf"),
                p("usr/local/bin/added-tool"),
                m.empty_dir.join("now-not-empty"),
            ],
            replaced_file: (
                p("etc/os-release"),
                b"NAME=\"cstor test\"\nID=cstor\nVERSION_ID=2\n".to_vec(),
            ),
            chmod_file: (m.script.clone(), 0o700),
            chown_file: (p("usr/bin/README"), 4321, 8765),
        }
    }

    /// Applies the changes to the mounted root file system `rootfs`.
    pub fn apply(&self, rootfs: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let at = |rel: &Path| rootfs.join(rel);
        for f in &self.deleted_files {
            std::fs::remove_file(at(f)).with_context(|| format!("deleting {}", f.display()))?;
        }
        for d in &self.deleted_dirs {
            std::fs::remove_dir_all(at(d)).with_context(|| format!("deleting {}", d.display()))?;
        }
        let od = at(&self.opaque_dir);
        std::fs::remove_dir_all(&od).with_context(|| format!("deleting {}", od.display()))?;
        std::fs::create_dir(&od).with_context(|| format!("recreating {}", od.display()))?;
        for f in self.opaque_dir_files.iter().chain(&self.added_files) {
            let path = at(f);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(
                &path,
                format!("added by the commit image: {}\n", f.display()),
            )
            .with_context(|| format!("writing {}", path.display()))?;
        }
        let (f, content) = &self.replaced_file;
        std::fs::write(at(f), content).with_context(|| format!("replacing {}", f.display()))?;
        let (f, mode) = &self.chmod_file;
        std::fs::set_permissions(at(f), std::fs::Permissions::from_mode(*mode))
            .with_context(|| format!("chmod {mode:o} {}", f.display()))?;
        let (f, uid, gid) = &self.chown_file;
        std::os::unix::fs::lchown(at(f), Some(*uid), Some(*gid))
            .with_context(|| format!("chown {uid}:{gid} {}", f.display()))?;
        Ok(())
    }
}

/// The base directory of the standard images: `$CSTOR_TEST_DIR` if set,
/// else `<target dir>/cstor-test-fixtures/v<FIXTURE_VERSION>` (see
/// [`crate::target_dir`]).
pub fn fixture_base_dir() -> PathBuf {
    match std::env::var_os(BASE_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => crate::target_dir()
            .join("cstor-test-fixtures")
            .join(format!("v{FIXTURE_VERSION}")),
    }
}

static STANDARD: OnceLock<std::result::Result<StandardImages, String>> = OnceLock::new();

/// The standard images, built on first use in this process (or reused from
/// an earlier build, see the module documentation). A build failure is
/// remembered and returned to every caller.
pub fn standard_images() -> Result<&'static StandardImages> {
    match STANDARD.get_or_init(|| obtain_standard_images().map_err(|e| format!("{e:#}"))) {
        Ok(images) => Ok(images),
        Err(e) => bail!("building the standard test images failed: {e}"),
    }
}

/// The standard images for test `test`, or `None` after reporting a skip
/// (see [`skip::skip_or_fail`]) when the machine cannot build them (not root,
/// or podman / skopeo / tar missing).
///
/// # Panics
///
/// When the capabilities are there but the build fails: that is a test
/// failure, not a skip.
pub fn standard_images_or_skip(test: &str) -> Option<&'static StandardImages> {
    if !skip::require_root(test) || !skip::require_tools(test, &["podman", "skopeo", "tar"]) {
        return None;
    }
    match standard_images() {
        Ok(images) => Some(images),
        Err(e) => panic!("{test}: {e:#}"),
    }
}

fn obtain_standard_images() -> Result<StandardImages> {
    let started = Instant::now();
    let base =
        std::path::absolute(fixture_base_dir()).context("resolving the fixture directory")?;
    std::fs::create_dir_all(&base)
        .with_context(|| format!("creating fixture directory {}", base.display()))?;
    let lock_path = base.join(LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening lock file {}", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(std::io::Error::from)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let waited = started.elapsed();

    if let Some(images) = reuse(&base)? {
        crate::note(&format!(
            "cstor-tests: reusing standard images in {} (lock wait {:.1}s, check {:.2}s)",
            base.display(),
            waited.as_secs_f64(),
            (started.elapsed() - waited).as_secs_f64()
        ));
        return Ok(images);
    }

    // Start from scratch: remove whatever an interrupted build left,
    // including the store's run root outside `base`.
    // (The run root survives `rm -rf` of the base directory: remove it too.)
    PodmanStore::new(&base.join("store"))?.destroy()?;
    for entry in std::fs::read_dir(&base)
        .with_context(|| format!("reading fixture directory {}", base.display()))?
    {
        let entry =
            entry.with_context(|| format!("reading fixture directory {}", base.display()))?;
        if entry.file_name() != LOCK {
            remove_tree(&entry.path())?;
        }
    }
    let build_start = Instant::now();
    let (images, timings) = build(&base)
        .with_context(|| format!("building the standard images in {}", base.display()))?;
    write_marker(&base, &images)?;
    crate::note(&format!(
        "cstor-tests: built standard images in {} in {:.1}s ({}; lock wait {:.1}s)",
        base.display(),
        build_start.elapsed().as_secs_f64(),
        timings.join(", "),
        waited.as_secs_f64()
    ));
    drop(lock);
    Ok(images)
}

fn paths(base: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        base.join("features-rootfs"),
        base.join("features.tar"),
        base.join("loaded.oci-archive.tar"),
    )
}

fn assemble(base: &Path, store: PodmanStore, refs: [ImageRef; 4]) -> StandardImages {
    let (features_rootfs, features_tar, loaded_archive) = paths(base);
    let [features, commit, loaded, small] = refs;
    StandardImages {
        base_dir: base.to_path_buf(),
        store,
        features,
        commit,
        loaded,
        small,
        feature_manifest: FeatureManifest::standard(),
        features_rootfs,
        features_tar,
        commit_changes: CommitChanges::standard(),
        loaded_archive,
    }
}

const NAMES: [&str; 4] = [FEATURES_NAME, COMMIT_NAME, LOADED_NAME, SMALL_NAME];

/// The images recorded by a complete earlier build, if they are all still
/// in the store under their names.
fn reuse(base: &Path) -> Result<Option<StandardImages>> {
    let marker = base.join(MARKER);
    if !marker.exists() {
        return Ok(None);
    }
    let recorded = read_json(&marker)?;
    if recorded.get("version").and_then(Value::as_u64) != Some(u64::from(FIXTURE_VERSION)) {
        return Ok(None);
    }
    let store = PodmanStore::new(&base.join("store"))?;
    let Ok(images_json) = store.images_json() else {
        return Ok(None);
    };
    let mut refs = Vec::new();
    for name in NAMES {
        let Some(id) = recorded
            .get("images")
            .and_then(|i| i.get(name))
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        let present = images_json.as_array().is_some_and(|list| {
            list.iter().any(|img| {
                img.get("id").and_then(Value::as_str) == Some(id)
                    && img
                        .get("names")
                        .and_then(Value::as_array)
                        .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(name)))
            })
        });
        if !present {
            crate::note(&format!(
                "cstor-tests: image {name} ({id}) is gone from {}; rebuilding the standard images",
                base.display()
            ));
            return Ok(None);
        }
        refs.push(ImageRef {
            name: name.to_string(),
            id: id.to_string(),
        });
    }
    let refs: [ImageRef; 4] = refs
        .try_into()
        .map_err(|_| anyhow::anyhow!("internal: wrong number of standard images"))?;
    Ok(Some(assemble(base, store, refs)))
}

fn write_marker(base: &Path, images: &StandardImages) -> Result<()> {
    let mut map = serde_json::Map::new();
    for r in [
        &images.features,
        &images.commit,
        &images.loaded,
        &images.small,
    ] {
        map.insert(r.name.clone(), Value::String(r.id.clone()));
    }
    let marker = json!({ "version": FIXTURE_VERSION, "images": map });
    let tmp = base.join(format!("{MARKER}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&marker)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, base.join(MARKER))
        .with_context(|| format!("renaming {} into place", tmp.display()))
}

fn timed<T>(timings: &mut Vec<String>, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f().with_context(|| format!("building the {what} image"))?;
    timings.push(format!("{what} {:.1}s", t.elapsed().as_secs_f64()));
    Ok(r)
}

fn build(base: &Path) -> Result<(StandardImages, Vec<String>)> {
    let mut timings = Vec::new();
    let (features_rootfs, features_tar, loaded_archive) = paths(base);
    let store = PodmanStore::new(&base.join("store"))?;

    let features = timed(&mut timings, "features", || {
        write_feature_rootfs(&features_rootfs)?;
        tar_rootfs(&features_rootfs, &features_tar)?;
        let id = store.import_tar(&features_tar, FEATURES_NAME)?;
        Ok(ImageRef {
            name: FEATURES_NAME.into(),
            id,
        })
    })?;

    let commit = timed(&mut timings, "commit", || {
        let changes = CommitChanges::standard();
        let id = store.commit_with(FEATURES_NAME, COMMIT_NAME, |root| changes.apply(root))?;
        Ok(ImageRef {
            name: COMMIT_NAME.into(),
            id,
        })
    })?;

    let loaded = timed(&mut timings, "loaded", || {
        let scratch_dir = base.join("scratch");
        let scratch = PodmanStore::new(&scratch_dir.join("store"))?;
        let rootfs = scratch_dir.join("rootfs");
        write_small_rootfs(&rootfs, "loaded")?;
        let tar = scratch_dir.join("loaded.tar");
        plain_tar(&rootfs, &tar)?;
        let src = "localhost/cstor-test/loaded-source:latest";
        scratch.import_tar(&tar, src)?;
        scratch.skopeo_copy(
            src,
            &format!("oci-archive:{}:{LOADED_NAME}", loaded_archive.display()),
            &[],
        )?;
        let id = store.load_archive(&loaded_archive, LOADED_NAME)?;
        scratch.destroy()?;
        remove_tree(&scratch_dir)?;
        Ok(ImageRef {
            name: LOADED_NAME.into(),
            id,
        })
    })?;

    let small = timed(&mut timings, "small", || {
        let rootfs = base.join("small-rootfs");
        write_small_rootfs(&rootfs, "small")?;
        let tar = base.join("small.tar");
        plain_tar(&rootfs, &tar)?;
        let id = store.import_tar(&tar, SMALL_NAME)?;
        Ok(ImageRef {
            name: SMALL_NAME.into(),
            id,
        })
    })?;

    Ok((
        assemble(base, store, [features, commit, loaded, small]),
        timings,
    ))
}

/// `tar --numeric-owner --sort=name -C dir -cf out .`
fn plain_tar(dir: &Path, out: &Path) -> Result<()> {
    run_command(
        std::process::Command::new("tar")
            .args(["--numeric-owner", "--sort=name", "-C"])
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
        &format!("packing {} into {}", dir.display(), out.display()),
    )
    .map(drop)
}

/// A fresh private store in `dir` (`dir/store`) holding one small image,
/// `localhost/cstor-test/small:latest`, for tests that corrupt storage.
/// Takes well under a second. Needs root. Call [`PodmanStore::destroy`]
/// when done (the run root lives outside `dir`).
pub fn small_private_store(dir: &Path) -> Result<(PodmanStore, ImageRef)> {
    let what = || format!("building a small private store in {}", dir.display());
    let store = PodmanStore::new(&dir.join("store")).with_context(what)?;
    let rootfs = dir.join("small-rootfs");
    write_small_rootfs(&rootfs, "small").with_context(what)?;
    let tar = dir.join("small.tar");
    plain_tar(&rootfs, &tar).with_context(what)?;
    let id = store.import_tar(&tar, SMALL_NAME).with_context(what)?;
    Ok((
        store,
        ImageRef {
            name: SMALL_NAME.into(),
            id,
        },
    ))
}

/// A fresh private store at `store_dir` holding image `name`: one layer of `files` regular
/// files, `dNN/fI` spread over `dirs` directories, file `I` holding `content(I)`. The tree
/// and its tar are built under `work`. For stories about many files (fd limits, object
/// placement). Needs root; call [`PodmanStore::destroy`] when done.
pub fn many_files_store(
    store_dir: &Path,
    work: &Path,
    name: &str,
    files: usize,
    dirs: usize,
    content: impl Fn(usize) -> String,
) -> Result<(PodmanStore, ImageRef)> {
    let what = || {
        format!(
            "building a store of {files} files in {}",
            store_dir.display()
        )
    };
    let root = work.join("many-files-rootfs");
    for i in 0..files {
        let d = root.join(format!("d{:02}", i % dirs.max(1)));
        std::fs::create_dir_all(&d)
            .with_context(|| format!("creating {}", d.display()))
            .with_context(what)?;
        let f = d.join(format!("f{i}"));
        std::fs::write(&f, content(i))
            .with_context(|| format!("writing {}", f.display()))
            .with_context(what)?;
    }
    let tar = work.join("many-files.tar");
    tar_rootfs(&root, &tar).with_context(what)?;
    let store = PodmanStore::new(store_dir).with_context(what)?;
    let id = store.import_tar(&tar, name).with_context(what)?;
    Ok((
        store,
        ImageRef {
            name: name.into(),
            id,
        },
    ))
}
