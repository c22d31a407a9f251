//! Writing an image's config and manifest streams, its EROFS image and its tag, once its
//! layers are in the repository.
//!
//! This follows what composefs-oci's own pull does, step by step, so that the result is what
//! `cfsctl oci pull` produces (see docs/dev/composefs-0.9.4-notes.md), with these deliberate
//! differences:
//! - images without `/usr` (a scratch image with one static binary) get an EROFS image too:
//!   upstream's `transform_for_oci` copies the root directory's metadata from `/usr` and
//!   fails without it; we keep the root entry of the tar instead, and apply the same xattr
//!   filtering and compaction. Images with `/usr` go through `transform_for_oci` unchanged;
//! - the final manifest stream lists layer references in config order; upstream uses hash
//!   map order, so its output varies between runs, and ours is always one of its outputs;
//! - upstream writes a config and a manifest stream before the EROFS image and both again
//!   after it (the first pair stays behind as unreferenced objects); a fresh import here
//!   writes only the final pair;
//! - the V1 EROFS image is streamed by `cstor-erofs` (same bytes, a fraction of the memory);
//! - layer streams are stored without a name and named here after a single `syncfs`, which
//!   runs while the EROFS image is built (upstream's `write_stream` syncs once per layer,
//!   and the last of those syncs delays everything after it).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use composefs::erofs::format::FormatVersion;
use composefs::fsverity::FsVerityHashValue;
use composefs::generic_tree::{Stat, is_allowed_container_xattr};
use composefs::repository::Repository;
use composefs::tree::FileSystem;
use composefs_oci::OciDigest;
use composefs_oci::oci_image::{OciImage, manifest_identifier, tag_image};

use crate::error::{Error, Result};

/// `ociconfg` in a splitstream header (composefs-oci keeps the constant private).
pub const CONFIG_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ociconfg");
/// `ocimanif` in a splitstream header.
pub const MANIFEST_CONTENT_TYPE: u64 = u64::from_le_bytes(*b"ocimanif");

/// The stream name of a config.
pub fn config_identifier(digest: &OciDigest) -> String {
    format!("oci-config-{digest}")
}

/// What finalizing produced.
#[derive(Debug, Clone)]
pub struct Finalized<ObjectID> {
    /// Digest and final verity of the manifest stream.
    pub manifest: (OciDigest, ObjectID),
    /// Digest and final verity of the config stream.
    pub config: (OciDigest, ObjectID),
    /// The EROFS image of the repository's default format.
    pub erofs: ObjectID,
    /// Its boot variant, when asked for.
    pub boot: Option<ObjectID>,
    /// Whether the image was already complete (only the tag was written).
    pub already_complete: bool,
    /// Whether the image has a `/usr` directory (upstream's transform applied); `None`
    /// when the EROFS image already existed.
    pub has_usr: Option<bool>,
    /// Where the EROFS image's file tree came from; `None` when the image already existed.
    pub tree: Option<TreeSource>,
}

/// Where an import took the file tree of the EROFS image it wrote from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TreeSource {
    /// Built while the layers streamed, from the pieces of their splitstreams (the usual
    /// case).
    Streamed,
    /// Read back from the stored layer streams after the last layer: every layer was in
    /// the repository already, the image lists one layer twice, or the tree thread gave up
    /// (a backlog or entry count over its bounds) or failed (logged as a warning). Same
    /// image, built later: reading the streams back adds to the import's serial tail.
    ReadBack,
}

fn repo_err(doing: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
    let doing = doing.into();
    move |cause| Error::Repository { doing, cause }
}

/// A layer stream stored by this import but not named yet: its diff id and verity.
pub type Unnamed<ObjectID> = (String, ObjectID);

/// A `syncfs` of the repository running in the background.
pub struct PendingSync(std::thread::JoinHandle<anyhow::Result<()>>);

impl PendingSync {
    /// Starts `syncfs` on the repository's filesystem in a thread of its own.
    pub fn start<ObjectID: FsVerityHashValue>(repo: &Arc<Repository<ObjectID>>) -> Result<Self> {
        let repo = repo.clone();
        std::thread::Builder::new()
            .name("cstor-syncfs".into())
            .spawn(move || repo.sync())
            .map(Self)
            .map_err(|e| Error::io("starting the syncfs thread", e))
    }

    /// Waits for it.
    pub fn wait(self) -> Result<()> {
        self.0
            .join()
            .map_err(|_| {
                Error::io(
                    "syncing the repository",
                    std::io::Error::other("the syncfs thread panicked"),
                )
            })?
            .map_err(repo_err("syncing the repository"))
    }
}

/// Names the layer streams in `layers` (`streams/oci-layer-<diff id>`), once `sync` (a
/// `syncfs` started after they were stored, or a new one if `None`) has made them and their
/// objects durable: a named stream never refers to data that is not on disk, as with
/// composefs' `write_stream`, which syncs once per stream.
pub fn name_layers<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    sync: Option<PendingSync>,
    layers: &[Unnamed<ObjectID>],
) -> Result<()> {
    match sync {
        Some(sync) => sync.wait()?,
        None if layers.is_empty() => return Ok(()),
        None => repo.sync().map_err(repo_err("syncing the repository"))?,
    }
    for (diff_id, verity) in layers {
        repo.symlink(
            format!("streams/{}", crate::layer_identifier(diff_id)),
            format!("objects/{}", verity.to_object_pathname()),
        )
        .map_err(repo_err(format!("naming the layer stream of {diff_id}")))?;
    }
    Ok(())
}

/// Names this import's layer streams once the background syncfs is done: at
/// [`finish`](Self::finish), or when dropped on an early return (best effort: a later
/// import then skips those layers).
struct Naming<'a, ObjectID: FsVerityHashValue> {
    repo: &'a Arc<Repository<ObjectID>>,
    sync: Option<PendingSync>,
    layers: &'a [Unnamed<ObjectID>],
    done: bool,
}

impl<'a, ObjectID: FsVerityHashValue> Naming<'a, ObjectID> {
    fn start(repo: &'a Arc<Repository<ObjectID>>, layers: &'a [Unnamed<ObjectID>]) -> Result<Self> {
        let sync = if layers.is_empty() {
            None
        } else {
            Some(PendingSync::start(repo)?)
        };
        Ok(Self {
            repo,
            sync,
            layers,
            done: layers.is_empty(),
        })
    }

    fn finish(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(());
        }
        name_layers(self.repo, self.sync.take(), self.layers)
    }
}

impl<ObjectID: FsVerityHashValue> Drop for Naming<'_, ObjectID> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("naming the layer streams of a failed import: {e}");
        }
    }
}

/// The image being finalized: what containers-storage has of it, and what the import made.
#[derive(Debug)]
pub struct Image<'a, ObjectID> {
    /// The manifest, as stored (its digest names the image).
    pub manifest_json: &'a [u8],
    /// The config, as stored.
    pub config_json: &'a [u8],
    /// Every layer's diff id and stream, in config `diff_ids` order.
    pub layers: &'a [(OciDigest, ObjectID)],
    /// The tag to write.
    pub tag: &'a str,
    /// Whether to write the boot variant of the EROFS image too.
    pub bootable: bool,
}

/// Writes the config and manifest streams, the EROFS image and the tag of an image whose
/// layers are stored, and names the layer streams this import stored (`unnamed`).
/// Idempotent.
///
/// The `syncfs` that must precede naming those layer streams runs in the background while
/// the EROFS image is built. `stop` (the import was cancelled) is looked at before the image
/// is built and before it is tagged: the layer streams are named either way (each is
/// complete and verified), the tag only if the import was not cancelled.
pub fn finalize<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    image: Image<'_, ObjectID>,
    unnamed: &[Unnamed<ObjectID>],
    tree: Option<crate::tree::Builder<ObjectID>>,
    stop: &AtomicBool,
) -> Result<Finalized<ObjectID>> {
    let Image {
        manifest_json,
        config_json,
        layers,
        tag,
        bootable,
    } = image;
    let mut naming = Naming::start(repo, unnamed)?;
    let cancelled = |naming: &mut Naming<'_, ObjectID>| -> Result<()> {
        if stop.load(Relaxed) {
            naming.finish()?;
            return Err(Error::Cancelled);
        }
        Ok(())
    };
    cancelled(&mut naming)?;
    let config_digest = composefs_oci::sha256_content_digest(config_json);
    let config_id = config_identifier(&config_digest);
    let manifest_digest = composefs_oci::sha256_content_digest(manifest_json);
    let manifest_id = manifest_identifier(&manifest_digest);

    // A manifest stream means an earlier import got this far: if it also names an EROFS
    // image of the repository's format, only the tag is missing. (Upstream writes initial
    // config and manifest streams before building the image and rewrites both afterwards;
    // a fresh import skips the initial pair, which nothing ever reads: two stream objects
    // and two syncfs less.)
    let version = repo.erofs_version();
    if let Some(manifest_verity) = repo
        .has_stream(&manifest_id)
        .map_err(repo_err("looking up the manifest stream"))?
        && let Some(erofs) = OciImage::open(repo, &manifest_digest, Some(&manifest_verity))
            .ok()
            .and_then(|img| img.image_ref(version).cloned())
        && let Some(config_verity) = repo
            .has_stream(&config_id)
            .map_err(repo_err("looking up the config stream"))?
    {
        naming.finish()?;
        cancelled(&mut naming)?;
        tag_image(repo, &manifest_digest, tag).map_err(repo_err(format!("tagging {tag}")))?;
        let mut done = Finalized {
            manifest: (manifest_digest, manifest_verity),
            config: (config_digest, config_verity),
            erofs,
            boot: None,
            already_complete: true,
            has_usr: None,
            tree: None,
        };
        if bootable {
            done.add_boot_image(repo, &manifest_id, &config_id)?;
        }
        return Ok(done);
    }

    let built = build_erofs(repo, layers, tree);
    // Named even when the build failed: a later import then skips those layers.
    naming.finish()?;
    let (mut images, has_usr, tree) = built?;
    cancelled(&mut naming)?;
    let image_v2 = images.remove(&FormatVersion::V2);
    let image_v1 = images.remove(&FormatVersion::V1);
    let erofs = match version {
        FormatVersion::V1 => image_v1.clone(),
        _ => image_v2.clone(),
    }
    .ok_or_else(|| Error::Repository {
        doing: "writing the EROFS image".into(),
        cause: anyhow::anyhow!(
            "no image of the repository's default format {version:?} was produced"
        ),
    })?;

    let refs: HashMap<Box<str>, ObjectID> = layers
        .iter()
        .map(|(d, v)| (Box::<str>::from(d.as_ref()), v.clone()))
        .collect();
    let (_, config_verity) = composefs_oci::write_config_raw(
        repo,
        config_json,
        refs,
        image_v2.as_ref(),
        image_v1.as_ref(),
        &HashMap::new(),
    )
    .map_err(repo_err(
        "rewriting the config stream with the EROFS reference",
    ))?;
    let manifest_verity = write_manifest(
        repo,
        manifest_json,
        &manifest_id,
        &config_digest,
        &config_verity,
        layers,
    )?;
    cancelled(&mut naming)?;
    tag_image(repo, &manifest_digest, tag).map_err(repo_err(format!("tagging {tag}")))?;
    let mut done = Finalized {
        manifest: (manifest_digest, manifest_verity),
        config: (config_digest, config_verity),
        erofs,
        boot: None,
        already_complete: false,
        has_usr: Some(has_usr),
        tree: Some(tree),
    };
    if bootable {
        done.add_boot_image(repo, &manifest_id, &config_id)?;
    }
    Ok(done)
}

impl<ObjectID: FsVerityHashValue> Finalized<ObjectID> {
    /// Writes the boot variant of the image with composefs-oci's own code (as its pull with
    /// `bootable` does: the boot transform with its default options), which rewrites the
    /// config and manifest streams to refer to it; reads their new verities back.
    fn add_boot_image(
        &mut self,
        repo: &Arc<Repository<ObjectID>>,
        manifest_id: &str,
        config_id: &str,
    ) -> Result<()> {
        let boot = composefs_oci::boot::generate_boot_image(
            repo,
            &self.manifest.0,
            &composefs::generic_tree::OciTransformOptions::default(),
        )
        .map_err(repo_err("writing the boot EROFS image"))?;
        let reread = |id: &str| {
            repo.has_stream(id)
                .map_err(repo_err(format!("looking up {id}")))?
                .ok_or_else(|| {
                    Error::repository(
                        format!("looking up {id}"),
                        anyhow::anyhow!("gone after the boot image was written"),
                    )
                })
        };
        self.manifest.1 = reread(manifest_id)?;
        self.config.1 = reread(config_id)?;
        self.boot = Some(boot);
        Ok(())
    }
}

fn write_manifest<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    manifest_json: &[u8],
    manifest_id: &str,
    config_digest: &OciDigest,
    config_verity: &ObjectID,
    layers: &[(OciDigest, ObjectID)],
) -> Result<ObjectID> {
    let mut w = repo
        .create_stream(MANIFEST_CONTENT_TYPE)
        .map_err(repo_err("creating the manifest stream"))?;
    w.add_named_stream_ref(&format!("config:{config_digest}"), config_verity);
    for (diff_id, verity) in layers {
        w.add_named_stream_ref(diff_id.as_ref(), verity);
    }
    w.write_external(manifest_json)
        .map_err(repo_err("storing the manifest"))?;
    repo.write_stream(w, manifest_id, None)
        .map_err(repo_err("committing the manifest stream"))
}

/// Builds the image's filesystem from its layer streams and writes its EROFS image(s).
/// The tree comes from the tree thread when there is one (built while the layers streamed),
/// else, or if that failed, from the stored layer streams.
fn build_erofs<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    layers: &[(OciDigest, ObjectID)],
    tree: Option<crate::tree::Builder<ObjectID>>,
) -> Result<(HashMap<FormatVersion, ObjectID>, bool, TreeSource)> {
    let prebuilt = match tree.map(crate::tree::Builder::finish) {
        Some(Ok(Some(fs))) => Some(fs),
        Some(Ok(None)) => {
            tracing::debug!("the tree thread gave up: reading the layer streams");
            None
        }
        Some(Err(e)) => {
            tracing::warn!(
                "building the tree while streaming failed ({e:#}); reading the layer streams \
                 instead"
            );
            None
        }
        None => None,
    };
    let source = match prebuilt {
        Some(_) => TreeSource::Streamed,
        None => TreeSource::ReadBack,
    };
    let mut fs = match prebuilt {
        Some(fs) => fs,
        None => {
            let mut fs: FileSystem<ObjectID> = FileSystem::new(Stat::uninitialized());
            for (diff_id, verity) in layers {
                crate::tree::apply_stored(repo, &mut fs, verity)
                    .map_err(repo_err(format!("applying layer {diff_id}")))?;
            }
            fs
        }
    };
    crate::sys::log_memory("tree built");
    let has_usr = matches!(fs.root.get_directory_opt(OsStr::new("usr")), Ok(Some(_)));
    if has_usr {
        fs.transform_for_oci(&Default::default())
            .map_err(|e| repo_err("transforming the image for OCI")(e.into()))?;
    } else {
        // No /usr to take the root's metadata from: keep the root entry of the layers, or a
        // plain 0755 root:root directory when no layer had one.
        if fs.root.stat.st_mode == 0 {
            let mut stat = Stat::uninitialized();
            stat.st_mode = 0o755;
            fs.set_root_stat(stat);
        }
        fs.filter_xattrs(is_allowed_container_xattr);
        fs.compact();
    }
    crate::sys::log_memory("tree transformed");
    let versions: Vec<FormatVersion> = repo.format_config().versions().collect();
    let images = if versions == [FormatVersion::V1] {
        let id = write_v1_image(repo, &fs)?;
        HashMap::from([(FormatVersion::V1, id)])
    } else {
        // Other formats (legacy V2, or V1 plus V2) are rare enough to leave to composefs.
        fs.commit_images(repo, None)
            .map_err(repo_err("writing the EROFS image"))?
    };
    Ok((images, has_usr, source))
}

/// Streams the V1 EROFS image of `fs` into a repository object and names it `images/<id>`,
/// as `commit_images` does, without holding the image (or composefs' per-file xattr copies)
/// in memory: this is where an import used to reach its peak memory.
fn write_v1_image<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    fs: &FileSystem<ObjectID>,
) -> Result<ObjectID> {
    let write_err = |e: cstor_erofs::Error| repo_err("writing the EROFS image")(e.into());
    let tmp = match repo.create_object_tmpfile() {
        Ok(fd) => std::fs::File::from(fd),
        // No O_TMPFILE here (some FUSE filesystems): build the image in memory instead.
        Err(_) => {
            let mut image = Vec::new();
            cstor_erofs::write_image(fs, FormatVersion::V1, &mut image).map_err(write_err)?;
            return repo
                .write_image(None, &image)
                .map_err(repo_err("storing the EROFS image"));
        }
    };
    // In an insecure repository the image's object id is computed as it is written, on
    // another thread (the other cores are idle here, on the import's serial tail), instead
    // of composefs' finalize_object_tmpfile reading the whole image back and hashing it
    // block by block afterwards.
    let mut hashing = HashingWriter {
        inner: &tmp,
        verity: if repo.is_insecure() {
            Some(BackgroundHasher::start().map_err(|e| Error::io("starting a hasher", e))?)
        } else {
            None
        },
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut hashing);
    let len = cstor_erofs::write_image(fs, FormatVersion::V1, &mut out).map_err(write_err)?;
    out.flush()
        .map_err(|e| Error::io("writing the EROFS image", e))?;
    drop(out);
    crate::sys::log_memory("image written");
    let id = match hashing.verity.take() {
        Some(verity) => {
            let id: ObjectID = verity.finish()?;
            crate::objects::link_tmpfile(repo, &tmp, &id)?;
            id
        }
        None => {
            repo.finalize_object_tmpfile(tmp, len)
                .map_err(repo_err("storing the EROFS image"))?
                .0
        }
    };
    repo.symlink(
        format!("images/{}", id.to_hex()),
        format!("objects/{}", id.to_object_pathname()),
    )
    .map_err(repo_err("naming the EROFS image"))?;
    Ok(id)
}

/// Passes writes through to `inner`, feeding what was written to an fs-verity hasher.
struct HashingWriter<W, ObjectID> {
    inner: W,
    verity: Option<BackgroundHasher<ObjectID>>,
}

impl<W: Write, ObjectID: FsVerityHashValue> Write for HashingWriter<W, ObjectID> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(v) = &mut self.verity {
            v.update(buf.get(..n).unwrap_or(buf));
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An fs-verity hasher on a thread of its own, fed copies of the bytes (the image is written
/// through a 1 MiB buffer: a copy per megabyte).
struct BackgroundHasher<ObjectID> {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    thread: std::thread::JoinHandle<ObjectID>,
}

impl<ObjectID: FsVerityHashValue> BackgroundHasher<ObjectID> {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let thread = std::thread::Builder::new()
            .name("cstor-hash".into())
            .spawn(move || {
                let mut verity = crate::verity::Hasher::for_id::<ObjectID>();
                for chunk in rx {
                    verity.update(&chunk);
                }
                verity.finish()
            })?;
        Ok(Self { tx, thread })
    }

    fn update(&mut self, bytes: &[u8]) {
        // A hasher thread that is gone shows in finish().
        let _ = self.tx.send(bytes.to_vec());
    }

    fn finish(self) -> Result<ObjectID> {
        drop(self.tx);
        self.thread.join().map_err(|_| {
            Error::io(
                "hashing the EROFS image",
                std::io::Error::other("the hasher thread panicked"),
            )
        })
    }
}
