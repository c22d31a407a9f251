//! A private podman overlay store, driven by the real `podman` and `skopeo`.
//!
//! Every store lives in its own directory: `DIR/root` (graph root) and two
//! private configuration files, `DIR/storage.conf` and `DIR/containers.conf`,
//! passed to podman and skopeo through
//! `CONTAINERS_STORAGE_CONF` / `CONTAINERS_CONF` so that no system-wide
//! configuration (e.g. a `mount_program` or additional image stores in
//! `/etc/containers/storage.conf`) leaks in. podman also gets a private
//! `--tmpdir` (`RUNROOT/libpod-tmp`): by default every root store would
//! share `/run/libpod`, and libpod records the tmp dir of the first
//! invocation in its database, so it must be passed from the very first
//! command on.
//!
//! The run root cannot live in `DIR`: podman 4.3.1 refuses a `--runroot`
//! longer than 50 characters ("the specified runroot is longer than 50
//! characters"). It is `/run/cstor-tests/<16 hex digits of sha256(DIR)>`
//! (`$TMPDIR/cstor-tests-run/…` when /run is not writable), so reopening
//! `DIR` finds the same run root; `DIR/run` is a symlink to it for
//! convenience. [`PodmanStore::destroy`] removes both.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{mounts_under, run_command, unmount_all_under};

/// An image in a store: the name it was given and its image id (64 hex
/// digits, no `sha256:` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The full name, e.g. `localhost/cstor-test/features:latest`.
    pub name: String,
    /// The image id (the config digest without `sha256:`).
    pub id: String,
}

/// A private podman overlay store (see the module documentation).
#[derive(Debug, Clone)]
pub struct PodmanStore {
    /// The directory holding everything of this store.
    pub dir: PathBuf,
    /// The graph root (`--root`): `overlay/`, `overlay-layers/`, …
    pub root: PathBuf,
    /// The run root (`--runroot`), outside `dir` (see the module
    /// documentation).
    pub runroot: PathBuf,
    /// libpod's tmp dir (`--tmpdir`).
    pub tmpdir: PathBuf,
    /// The private storage.conf (`CONTAINERS_STORAGE_CONF`).
    pub storage_conf: PathBuf,
    /// The private containers.conf (`CONTAINERS_CONF`).
    pub containers_conf: PathBuf,
}

/// The result of [`PodmanStore::skopeo_export`]: an OCI image layout written
/// by skopeo, the reference against which rebuilt layers are compared.
#[derive(Debug, Clone)]
pub struct OciExport {
    /// The OCI layout directory.
    pub dir: PathBuf,
    /// The manifest digest (`sha256:…`).
    pub manifest_digest: String,
    /// The config digest (`sha256:…`).
    pub config_digest: String,
    /// The manifest as parsed JSON.
    pub manifest: Value,
    /// The layer blob paths, in manifest order (bottom layer first).
    pub layers: Vec<PathBuf>,
    /// The layer digests (`sha256:…`), in manifest order.
    pub layer_digests: Vec<String>,
    /// The layer media types as the manifest states them. skopeo 1.9.3 may
    /// say `tar+gzip` for a blob that is plain tar: trust the bytes.
    pub layer_media_types: Vec<String>,
}

impl OciExport {
    /// The path of the blob with digest `digest` (`algo:hex`) in this layout.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        blob_path(&self.dir, digest)
    }
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (algo, hex) = digest.split_once(':').with_context(|| {
        format!(
            "malformed digest {digest:?} in OCI layout {}",
            dir.display()
        )
    })?;
    if algo.is_empty() || hex.is_empty() || hex.contains('/') || algo.contains('/') {
        bail!(
            "malformed digest {digest:?} in OCI layout {}",
            dir.display()
        );
    }
    Ok(dir.join("blobs").join(algo).join(hex))
}

/// Strips an optional `sha256:` prefix from an id printed by podman.
fn bare_id(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix("sha256:").unwrap_or(s).to_string()
}

/// Whether `s` is a full 64-hex-digit image id.
fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl PodmanStore {
    /// Creates (or reopens) the private store in `dir`: creates `dir/root`
    /// and the run root (with a `dir/run` symlink to it) and (re)writes the
    /// private configuration files. `dir` is made absolute.
    pub fn new(dir: &Path) -> Result<Self> {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("making store directory {} absolute", dir.display()))?;
        let runroot = short_runroot(&dir)?;
        let store = PodmanStore {
            root: dir.join("root"),
            tmpdir: runroot.join("libpod-tmp"),
            runroot,
            storage_conf: dir.join("storage.conf"),
            containers_conf: dir.join("containers.conf"),
            dir,
        };
        for d in [&store.root, &store.runroot] {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating store directory {}", d.display()))?;
        }
        let owner_file = store.runroot.join(RUNROOT_OWNER_FILE);
        std::fs::write(
            &owner_file,
            std::os::unix::ffi::OsStrExt::as_bytes(store.dir.as_os_str()),
        )
        .with_context(|| format!("writing {}", owner_file.display()))?;
        collect_stale_runroots_once(&store.runroot);
        let link = store.dir.join("run");
        if std::fs::read_link(&link).ok().as_deref() != Some(store.runroot.as_path()) {
            match std::fs::symlink_metadata(&link) {
                Ok(md) if md.is_dir() => crate::remove_tree(&link)?,
                Ok(_) => std::fs::remove_file(&link)
                    .with_context(|| format!("removing stale {}", link.display()))?,
                Err(_) => {}
            }
            std::os::unix::fs::symlink(&store.runroot, &link)
                .with_context(|| format!("creating symlink {}", link.display()))?;
        }
        let storage_conf = format!(
            "# Written by cstor-tests for a private test store.\n[storage]\ndriver = \"overlay\"\ngraphroot = {}\nrunroot = {}\n",
            toml_string(&store.root)?,
            toml_string(&store.runroot)?,
        );
        write_if_changed(&store.storage_conf, &storage_conf)?;
        // lock_type = "file": podman's default shm lock table (/libpod_lock)
        // is global, and on a freshly booted machine two stores' first podman
        // commands race to create it ("failed to create 2048 locks ... file
        // exists"). File locks live in the store's own tmp_dir.
        let containers_conf = format!(
            "# Written by cstor-tests for a private test store.\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nlock_type = \"file\"\ntmp_dir = {}\n",
            toml_string(&store.tmpdir)?,
        );
        write_if_changed(&store.containers_conf, &containers_conf)?;
        Ok(store)
    }

    /// Sets the private configuration environment on `cmd` (for podman,
    /// skopeo or any other containers/storage client run against this
    /// store).
    pub fn apply_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("CONTAINERS_STORAGE_CONF", &self.storage_conf)
            .env("CONTAINERS_CONF", &self.containers_conf)
    }

    /// A `podman` command prefilled with this store's options: `--root`,
    /// `--runroot`, `--storage-driver overlay`, `--tmpdir`,
    /// `--cgroup-manager cgroupfs` and `--events-backend none` (no journald
    /// noise, no shared events file).
    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.apply_env(&mut cmd);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "overlay"])
            .arg("--tmpdir")
            .arg(&self.tmpdir)
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"]);
        cmd
    }

    /// A `skopeo` command with this store's configuration environment.
    pub fn skopeo(&self) -> Command {
        let mut cmd = Command::new("skopeo");
        self.apply_env(&mut cmd);
        cmd
    }

    /// Runs `podman <args>` against this store and returns stdout (trailing
    /// whitespace trimmed); a failure reports stderr.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.podman();
        cmd.args(args);
        let what = format!("running podman on store {}", self.dir.display());
        run_command(&mut cmd, &what)
    }

    /// `podman import` of the tar file `tar` as image `name`; returns the
    /// image id.
    pub fn import_tar(&self, tar: &Path, name: &str) -> Result<String> {
        let mut cmd = self.podman();
        cmd.arg("import").arg("--quiet").arg(tar).arg(name);
        let out = run_command(
            &mut cmd,
            &format!(
                "importing {} as {name} into store {}",
                tar.display(),
                self.dir.display()
            ),
        )?;
        let id = bare_id(out.lines().last().unwrap_or_default());
        if !is_full_id(&id) {
            bail!(
                "importing {} as {name}: podman printed {out:?}, not an image id",
                tar.display()
            );
        }
        Ok(id)
    }

    /// Builds image `new_name` on top of `base` without a container runtime:
    /// `podman create`, `podman mount`, `mutate(rootfs)` on the mounted root
    /// file system, `podman umount`, `podman commit`, and finally
    /// `podman rm` (also when a step fails). Returns the new image id.
    pub fn commit_with(
        &self,
        base: &str,
        new_name: &str,
        mutate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<String> {
        let ctx = || {
            format!(
                "committing {new_name} from {base} in store {}",
                self.dir.display()
            )
        };
        let cid = self
            .run([
                "create",
                "--pull",
                "never",
                "--network",
                "none",
                base,
                "/cstor-test-no-command",
            ])
            .with_context(ctx)?;
        let cid = cid.lines().last().unwrap_or_default().trim().to_string();
        let mutated = (|| -> Result<()> {
            let mnt = self.run(["mount", &cid])?;
            let mnt = PathBuf::from(mnt.trim());
            mutate(&mnt).with_context(|| format!("mutating the root file system {}", mnt.display()))
        })();
        let unmounted = self.run(["umount", &cid]).map(drop);
        let committed = mutated
            .and(unmounted)
            .and_then(|()| self.run(["commit", "--quiet", &cid, new_name]));
        let removed = self.run(["rm", "--force", &cid]);
        let id = committed.with_context(ctx)?;
        removed.with_context(|| format!("removing container {cid} after {}", ctx()))?;
        let id = bare_id(id.lines().last().unwrap_or_default());
        if !is_full_id(&id) {
            bail!("{}: podman commit printed {id:?}, not an image id", ctx());
        }
        Ok(id)
    }

    /// The image id of `name` (which may also be an id or a prefix of one).
    pub fn image_id(&self, name: &str) -> Result<String> {
        let out = self
            .run(["image", "inspect", "--format", "{{.Id}}", name])
            .with_context(|| format!("looking up image {name}"))?;
        Ok(bare_id(&out))
    }

    /// Whether image `name` exists in this store.
    pub fn image_exists(&self, name: &str) -> Result<bool> {
        let status = self
            .podman()
            .args(["image", "exists", name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running podman image exists {name}"))?;
        match status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!("podman image exists {name} failed: {status}"),
        }
    }

    /// An [`ImageRef`] for the existing image `name`.
    pub fn image_ref(&self, name: &str) -> Result<ImageRef> {
        Ok(ImageRef {
            name: name.to_string(),
            id: self.image_id(name)?,
        })
    }

    /// `podman tag image new_name`.
    pub fn tag(&self, image: &str, new_name: &str) -> Result<()> {
        self.run(["tag", image, new_name])
            .with_context(|| format!("tagging {image} as {new_name}"))
            .map(drop)
    }

    /// `podman rmi name`.
    pub fn rmi(&self, name: &str) -> Result<()> {
        self.run(["rmi", name])
            .with_context(|| format!("removing image {name}"))
            .map(drop)
    }

    /// `podman load -i archive`, then tags the loaded image as `name`.
    /// Returns the image id.
    pub fn load_archive(&self, archive: &Path, name: &str) -> Result<String> {
        let mut cmd = self.podman();
        cmd.arg("load").arg("--input").arg(archive);
        let out = run_command(
            &mut cmd,
            &format!(
                "loading {} into store {}",
                archive.display(),
                self.dir.display()
            ),
        )?;
        // "Loaded image: NAME" or "Loaded image(s): NAME" per image.
        let loaded: Vec<&str> = out
            .lines()
            .filter_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.starts_with("Loaded image"))
            })
            .map(|(_, v)| v.trim())
            .collect();
        let [loaded] = loaded[..] else {
            bail!(
                "loading {}: expected one loaded image, podman said {out:?}",
                archive.display()
            );
        };
        let loaded = loaded.split(',').next().unwrap_or(loaded).trim();
        let id = self.image_id(loaded)?;
        if loaded != name {
            self.tag(&id, name)?;
        }
        Ok(id)
    }

    /// The containers-storage reference to `image` in this store:
    /// `containers-storage:[overlay@ROOT+RUNROOT]IMAGE`. A full 64-hex image
    /// id is written `@ID`.
    pub fn storage_ref(&self, image: &str) -> String {
        let image = if is_full_id(image) {
            format!("@{image}")
        } else {
            image.to_string()
        };
        format!(
            "containers-storage:[overlay@{}+{}]{image}",
            self.root.display(),
            self.runroot.display()
        )
    }

    /// `skopeo copy <storage_ref(image)> <dest_ref>` followed by
    /// [`settle`](Self::settle).
    pub fn skopeo_copy(&self, image: &str, dest_ref: &str, extra_args: &[&str]) -> Result<()> {
        let src = self.storage_ref(image);
        let mut cmd = self.skopeo();
        cmd.args(["copy", "--quiet"])
            .args(extra_args)
            .arg(&src)
            .arg(dest_ref);
        let result = run_command(&mut cmd, &format!("copying {src} to {dest_ref}"));
        self.settle();
        result.map(drop)
    }

    /// The reference export: `skopeo copy containers-storage:[…]IMAGE oci:DEST
    /// --dest-oci-accept-uncompressed-layers` (skopeo rebuilds each layer
    /// from tar-split), then parses the layout. `dest` must not exist yet or
    /// be empty. Calls [`settle`](Self::settle) afterwards.
    pub fn skopeo_export(&self, image: &str, dest: &Path) -> Result<OciExport> {
        if dest.exists()
            && std::fs::read_dir(dest)
                .with_context(|| format!("reading export directory {}", dest.display()))?
                .next()
                .is_some()
        {
            bail!(
                "exporting {image}: destination {} is not empty",
                dest.display()
            );
        }
        let dest = std::path::absolute(dest)
            .with_context(|| format!("making {} absolute", dest.display()))?;
        let dest_ref = format!("oci:{}", dest.display());
        self.skopeo_copy(image, &dest_ref, &["--dest-oci-accept-uncompressed-layers"])
            .with_context(|| {
                format!("exporting image {image} from store {}", self.dir.display())
            })?;
        parse_oci_layout(&dest)
    }

    /// Removes the self bind mount of `<root>/overlay` that skopeo 1.9.3
    /// leaves behind (while it exists, hardlinks out of layer files fail with
    /// EXDEV) by running a harmless podman command, `podman images -q`.
    /// Failures are reported on stderr only.
    ///
    /// Bounded: it runs at teardown too, where a process a failed test left behind may
    /// hold a lock podman would wait on for ever.
    pub fn settle(&self) {
        let mut cmd = self.podman();
        cmd.args(["images", "--quiet"])
            .stdin(std::process::Stdio::null());
        let failed = match crate::faults::run(&mut cmd, SETTLE_BOUND) {
            Ok(done) if done.status.success() => return,
            Ok(done) => format!("{}: {}", done.status, done.stderr.trim()),
            Err(e) => format!("{e:#}"),
        };
        crate::note(&format!(
            "cstor-tests: settling store {} failed: {failed}",
            self.dir.display()
        ));
    }

    /// Whether `<root>/overlay` is currently a mount point (the skopeo
    /// leftover that [`settle`](Self::settle) removes).
    pub fn overlay_bind_mounted(&self) -> Result<bool> {
        let overlay = self.root.join("overlay");
        Ok(mounts_under(&overlay)?.contains(&overlay))
    }

    /// Removes every mount below this store: settles, then unmounts whatever
    /// is still mounted under the graph root and the run root (e.g. after a
    /// test died with a container mounted). Call before deleting the store
    /// directory.
    pub fn release_mounts(&self) -> Result<()> {
        self.settle();
        unmount_all_under(&self.root)?;
        unmount_all_under(&self.runroot)
    }

    /// Deletes the store: [`release_mounts`](Self::release_mounts), then
    /// removes the run root and `dir`. Stores in temporary directories should
    /// call this at the end, or the run root (a few KiB) stays behind.
    pub fn destroy(&self) -> Result<()> {
        self.release_mounts()?;
        crate::remove_tree(&self.runroot)?;
        crate::remove_tree(&self.dir)
    }

    /// `<root>/overlay-layers/layers.json`, parsed.
    pub fn layers_json(&self) -> Result<Value> {
        read_json(&self.root.join("overlay-layers").join("layers.json"))
    }

    /// `<root>/overlay-images/images.json`, parsed.
    pub fn images_json(&self) -> Result<Value> {
        read_json(&self.root.join("overlay-images").join("images.json"))
    }

    /// The layers.json entry of layer `layer_id`.
    pub fn layer_record(&self, layer_id: &str) -> Result<Value> {
        let layers = self.layers_json()?;
        find_by_id(&layers, layer_id).cloned().with_context(|| {
            format!(
                "layer {layer_id} not in layers.json of {}",
                self.dir.display()
            )
        })
    }

    /// The images.json entry of image `image` (name or id).
    pub fn image_record(&self, image: &str) -> Result<Value> {
        let id = self.image_id(image)?;
        let images = self.images_json()?;
        find_by_id(&images, &id)
            .cloned()
            .with_context(|| format!("image {id} not in images.json of {}", self.dir.display()))
    }

    /// The layer ids of image `image`, bottom layer first: the image's top
    /// layer and its `parent` chain in layers.json. (Manifest layer digests
    /// of a `podman load`ed image may match nothing in layers.json, so this
    /// does not use them.)
    pub fn image_layers(&self, image: &str) -> Result<Vec<String>> {
        let record = self.image_record(image)?;
        let layers = self.layers_json()?;
        let mut chain = Vec::new();
        let mut next = record
            .get("layer")
            .and_then(Value::as_str)
            .map(str::to_string);
        while let Some(id) = next {
            if chain.contains(&id) || chain.len() > 1000 {
                bail!("layer parent chain of image {image} loops at {id}");
            }
            let layer = find_by_id(&layers, &id)
                .with_context(|| format!("layer {id} of image {image} not in layers.json"))?;
            next = layer
                .get("parent")
                .and_then(Value::as_str)
                .map(str::to_string);
            chain.push(id);
        }
        chain.reverse();
        Ok(chain)
    }

    /// `<root>/overlay/<layer_id>/diff`: the layer's files in overlay format.
    pub fn layer_diff_dir(&self, layer_id: &str) -> PathBuf {
        self.root.join("overlay").join(layer_id).join("diff")
    }

    /// `<root>/overlay-layers/<layer_id>.tar-split.gz`.
    pub fn tar_split_path(&self, layer_id: &str) -> PathBuf {
        self.root
            .join("overlay-layers")
            .join(format!("{layer_id}.tar-split.gz"))
    }
}

/// The file in each run root naming the store directory it belongs to.
const RUNROOT_OWNER_FILE: &str = "cstor-store-dir";

/// How long [`PodmanStore::settle`] lets podman run.
const SETTLE_BOUND: std::time::Duration = std::time::Duration::from_secs(120);

/// Once per process: removes run roots (siblings of `runroot`) whose store
/// directory no longer exists, e.g. of stores in deleted temporary
/// directories that were never [`destroy`](PodmanStore::destroy)ed. Only run
/// roots carrying our owner file are considered; errors are ignored.
fn collect_stale_runroots_once(runroot: &Path) {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let Some(parent) = runroot.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(owner) = std::fs::read(entry.path().join(RUNROOT_OWNER_FILE)) else {
                continue;
            };
            let owner = PathBuf::from(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&owner));
            if owner.is_absolute() && !owner.exists() {
                let _ = crate::remove_tree(&entry.path());
            }
        }
    });
}

/// The run root of the store in `dir`: short (podman's 50 character limit)
/// and a pure function of `dir`.
fn short_runroot(dir: &Path) -> Result<PathBuf> {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let hash = sha2::Sha256::digest(dir.as_os_str().as_bytes());
    let name = hex::encode(&hash[..8]);
    let run = Path::new("/run");
    let base = if rustix::fs::access(run, rustix::fs::Access::WRITE_OK).is_ok() {
        run.join("cstor-tests")
    } else {
        std::env::temp_dir().join("cstor-tests-run")
    };
    let runroot = base.join(name);
    if runroot.as_os_str().len() > 50 {
        bail!(
            "the run root {} for store {} is longer than podman's limit of 50 characters; set TMPDIR to a shorter directory",
            runroot.display(),
            dir.display()
        );
    }
    Ok(runroot)
}

/// Parses an OCI image layout holding exactly one manifest.
pub fn parse_oci_layout(dir: &Path) -> Result<OciExport> {
    let index = read_json(&dir.join("index.json"))?;
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .with_context(|| format!("{}/index.json has no manifests array", dir.display()))?;
    let [entry] = &manifests[..] else {
        bail!(
            "{}/index.json lists {} manifests, expected exactly one",
            dir.display(),
            manifests.len()
        );
    };
    let manifest_digest = digest_field(entry, dir, "index.json manifest")?;
    let manifest = read_json(&blob_path(dir, &manifest_digest)?)?;
    let config_digest = digest_field(
        manifest
            .get("config")
            .with_context(|| format!("manifest {manifest_digest} has no config"))?,
        dir,
        "config",
    )?;
    let mut layers = Vec::new();
    let mut layer_digests = Vec::new();
    let mut layer_media_types = Vec::new();
    for layer in manifest
        .get("layers")
        .and_then(Value::as_array)
        .with_context(|| format!("manifest {manifest_digest} has no layers array"))?
    {
        let digest = digest_field(layer, dir, "layer")?;
        let path = blob_path(dir, &digest)?;
        if !path.is_file() {
            bail!(
                "layer blob {} of manifest {manifest_digest} is missing",
                path.display()
            );
        }
        layers.push(path);
        layer_digests.push(digest);
        layer_media_types.push(
            layer
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
    Ok(OciExport {
        dir: dir.to_path_buf(),
        manifest_digest,
        config_digest,
        manifest,
        layers,
        layer_digests,
        layer_media_types,
    })
}

fn digest_field(v: &Value, dir: &Path, what: &str) -> Result<String> {
    v.get("digest")
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| {
            format!(
                "{what} entry without digest in OCI layout {}",
                dir.display()
            )
        })
}

/// The entry with `"id": id` in a layers.json / images.json array.
fn find_by_id<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|e| e.get("id").and_then(Value::as_str) == Some(id))
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {} as JSON", path.display()))
}

/// A TOML basic string holding `path` (which must be UTF-8).
fn toml_string(path: &Path) -> Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("store path {} is not UTF-8", path.display()))?;
    // A JSON string is a valid TOML basic string for these characters.
    Ok(serde_json::to_string(s)?)
}

fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_ref_forms() {
        let s = PodmanStore {
            dir: "/s".into(),
            root: "/s/root".into(),
            runroot: "/s/run".into(),
            tmpdir: "/s/run/libpod-tmp".into(),
            storage_conf: "/s/storage.conf".into(),
            containers_conf: "/s/containers.conf".into(),
        };
        assert_eq!(
            s.storage_ref("localhost/x:latest"),
            "containers-storage:[overlay@/s/root+/s/run]localhost/x:latest"
        );
        let id = "a".repeat(64);
        assert_eq!(
            s.storage_ref(&id),
            format!("containers-storage:[overlay@/s/root+/s/run]@{id}")
        );
        assert_eq!(
            s.tar_split_path("L"),
            Path::new("/s/root/overlay-layers/L.tar-split.gz")
        );
        assert_eq!(s.layer_diff_dir("L"), Path::new("/s/root/overlay/L/diff"));
    }

    #[test]
    fn ids() {
        assert_eq!(bare_id("sha256:abc\n"), "abc");
        assert!(is_full_id(&"0f".repeat(32)));
        assert!(!is_full_id("localhost/x"));
    }
}
