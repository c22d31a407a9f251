//! Importing an image from containers-storage into a composefs repository.
//!
//! Layers stream from the helper; every regular file above 64 bytes becomes a repository
//! object by reflink (or copy), smaller ones and all tar headers go inline into the layer's
//! splitstream, exactly as composefs-oci's tar import splits them. Each layer's rebuilt tar
//! is checked against its diff id before the layer stream is stored; layer streams get their
//! names after one `syncfs` at the end (also when another layer failed, so that a retry
//! skips them), and the image's config, manifest, EROFS image and tag are written last, so
//! an interrupted import leaves only unreferenced objects behind, never a partial layer or
//! image under a final name.
//!
//! ```no_run
//! # async fn f() -> Result<(), cstor_proxy_client::Error> {
//! use cstor_proxy_client::{Client, HelperConfig};
//! use cstor_proxy_client::import::{import_image, open_repository, ImportOptions};
//! use composefs::fsverity::Sha512HashValue;
//!
//! let repo = open_repository::<Sha512HashValue>("/var/lib/composefs".as_ref())?;
//! let client = Client::spawn(&HelperConfig::default()).await?;
//! let report = import_image(&client, &repo, "localhost/myimage", &ImportOptions::default()).await?;
//! println!("{} reflinked, {} copied", report.stats().objects_reflinked, report.stats().objects_copied);
//! # Ok(()) }
//! ```

mod finalize;
mod jobs;
mod layer;
mod objects;
mod placement;
mod repo;
mod tree;
pub mod verity;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::{ImportStats, OciDigest, PullResult};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::client::Client;
use crate::error::{Error, Result};
pub use finalize::{CONFIG_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, TreeSource, config_identifier};
pub use layer::INLINE_MAX;
pub use objects::CopyPolicy;
use objects::{Pool, Stored, WorkerState};
pub use repo::{
    InitOutcome, RepoAlgorithm, init_repository, open_repository, repository_algorithm,
};

/// The stream name of a layer (`oci-layer-<diff id>`), as composefs-oci names it.
pub fn layer_identifier(diff_id: &str) -> String {
    format!("oci-layer-{diff_id}")
}

/// How objects of one layer (or a whole import) were stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ObjectStats {
    /// New objects made by reflink.
    pub reflinked: u64,
    /// New objects made by copying.
    pub copied: u64,
    /// New objects that are the layer file itself, hardlinked
    /// ([`CopyPolicy::ReflinkOrHardlink`]).
    pub hardlinked: u64,
    /// Objects the repository already had.
    pub present: u64,
    /// Files stored inline in the splitstream (64 bytes or less).
    pub inlined: u64,
    /// Bytes of reflinked objects.
    pub bytes_reflinked: u64,
    /// Bytes of copied objects.
    pub bytes_copied: u64,
    /// Bytes of hardlinked objects.
    pub bytes_hardlinked: u64,
    /// Bytes of objects already present.
    pub bytes_present: u64,
    /// Bytes inline: small files plus every tar header and padding byte.
    pub bytes_inlined: u64,
}

impl ObjectStats {
    fn count(&mut self, how: Stored, size: u64) {
        match how {
            Stored::Reflinked => {
                self.reflinked += 1;
                self.bytes_reflinked += size;
            }
            Stored::Copied => {
                self.copied += 1;
                self.bytes_copied += size;
            }
            Stored::Hardlinked => {
                self.hardlinked += 1;
                self.bytes_hardlinked += size;
            }
            Stored::AlreadyPresent => {
                self.present += 1;
                self.bytes_present += size;
            }
        }
    }

    fn add(&mut self, o: &ObjectStats) {
        self.reflinked += o.reflinked;
        self.copied += o.copied;
        self.hardlinked += o.hardlinked;
        self.bytes_hardlinked += o.bytes_hardlinked;
        self.present += o.present;
        self.inlined += o.inlined;
        self.bytes_reflinked += o.bytes_reflinked;
        self.bytes_copied += o.bytes_copied;
        self.bytes_present += o.bytes_present;
        self.bytes_inlined += o.bytes_inlined;
    }
}

/// Progress of an import, sent without ever blocking the import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ImportEvent {
    /// Totals, known before any layer is read.
    Started {
        /// Layers of the image.
        layers: usize,
        /// Layers already in the repository (skipped without reading).
        layers_present: usize,
        /// Uncompressed size of all layers.
        bytes: u64,
        /// Uncompressed size of the layers already present.
        bytes_present: u64,
    },
    /// A layer started streaming.
    LayerStarted {
        /// Position in the image (0 = base).
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
    },
    /// Bytes of a layer processed so far.
    LayerProgress {
        /// Position in the image.
        index: usize,
        /// Bytes done.
        bytes_done: u64,
    },
    /// A layer was stored (it is named with the others at the end).
    LayerDone {
        /// Position in the image.
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
        /// How its objects were stored.
        stats: ObjectStats,
    },
    /// A layer was already in the repository.
    LayerSkipped {
        /// Position in the image.
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
    },
    /// Writing the config, manifest, EROFS image and tag.
    Finalizing,
    /// Done.
    Finished,
}

/// Options of [`import_image`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The tag to write (`streams/refs/oci/<tag>`); default `containers-storage:<reference>`,
    /// as `cfsctl oci pull containers-storage:<reference>` names it.
    pub tag: Option<String>,
    /// Reflink, copy, or insist on reflinks.
    pub copy_policy: CopyPolicy,
    /// Threads storing objects; default: the number of CPUs.
    pub object_threads: Option<usize>,
    /// Layers imported at once; default: up to 4.
    pub layer_jobs: Option<usize>,
    /// Where progress events go.
    pub progress: Option<UnboundedSender<ImportEvent>>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            tag: None,
            copy_policy: CopyPolicy::ReflinkOrCopy,
            object_threads: None,
            layer_jobs: None,
            progress: None,
        }
    }
}

/// One layer in an [`ImportReport`].
#[derive(Debug, Clone)]
pub struct LayerReport<ObjectID> {
    /// Position in the image.
    pub index: usize,
    /// The storage layer id.
    pub layer_id: String,
    /// The diff id.
    pub diff_id: String,
    /// Uncompressed size.
    pub bytes: u64,
    /// The layer splitstream's fs-verity id.
    pub verity: ObjectID,
    /// Whether it was already in the repository.
    pub skipped: bool,
    /// How its objects were stored (zero when skipped).
    pub stats: ObjectStats,
    /// Time spent importing it.
    pub elapsed: Duration,
}

impl<ObjectID: Clone> LayerReport<ObjectID> {
    /// A layer the repository already had (or that repeats an earlier one in the image).
    fn skipped(
        index: usize,
        l: &cstor_protocol::LayerInfo,
        diff_id: &str,
        verity: &ObjectID,
    ) -> Self {
        Self {
            index,
            layer_id: l.id.clone(),
            diff_id: diff_id.to_owned(),
            bytes: l.diff_size.unwrap_or(0),
            verity: verity.clone(),
            skipped: true,
            stats: ObjectStats::default(),
            elapsed: Duration::ZERO,
        }
    }
}

/// What [`import_image`] did.
#[derive(Debug)]
pub struct ImportReport<ObjectID> {
    /// The reference as given.
    pub reference: String,
    /// The image id in containers-storage.
    pub image_id: String,
    /// The tag written.
    pub tag: String,
    /// composefs-oci's own pull result: manifest and config digests and stream verities,
    /// and its import statistics.
    pub pull: PullResult<ObjectID>,
    /// The EROFS image (of the repository's default format).
    pub erofs_image: ObjectID,
    /// Per layer, base first.
    pub layers: Vec<LayerReport<ObjectID>>,
    /// Totals over all layers.
    pub objects: ObjectStats,
    /// The first reason a reflink fell back to a copy, if one did.
    pub first_reflink_fallback: Option<String>,
    /// Whether the image was already complete in the repository.
    pub already_complete: bool,
    /// Whether the image has `/usr` (if not, the EROFS root comes from the tar's root
    /// entry); `None` when the EROFS image already existed.
    pub has_usr: Option<bool>,
    /// Where the EROFS image's file tree came from (built while streaming, or read back from
    /// the layer streams); `None` when the EROFS image already existed.
    pub tree: Option<TreeSource>,
    /// Wall time.
    pub elapsed: Duration,
}

impl<ObjectID> ImportReport<ObjectID> {
    /// composefs-oci's statistics for this import.
    pub fn stats(&self) -> &ImportStats {
        &self.pull.stats
    }
}

fn send(tx: &Option<UnboundedSender<ImportEvent>>, e: ImportEvent) {
    if let Some(tx) = tx {
        let _ = tx.send(e);
    }
}

/// Lowers the calling thread's scheduling priority by `by` nice steps (to 19 at most). Best
/// effort: a failure only leaves the thread at its priority. On Linux, `setpriority` on "this
/// process" changes the calling thread only.
fn lower_thread_priority(by: i32) {
    let Ok(now) = rustix::process::getpriority_process(None) else {
        return;
    };
    let _ = rustix::process::setpriority_process(None, now.saturating_add(by).min(19));
}

fn parse_digest(d: &str, what: &str) -> Result<OciDigest> {
    OciDigest::from_str(d)
        .map_err(|e| Error::ImageMismatch(format!("{what} {d:?} is not a digest: {e}")))
}

/// How an import shares the process's fds between layers: content fds received ahead of each
/// layer's reader (`prefetch`) and objects queued to the workers (`lookahead`, each holding
/// its content fd). A receiver over its fd limit loses `SCM_RIGHTS` fds without an error the
/// protocol could see (the size and CRC checks catch the misplaced files, and the import fails),
/// so the totals stay within the soft `RLIMIT_NOFILE`: with fewer fds, fewer layers run at
/// once and each holds less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdShare {
    jobs: usize,
    prefetch: usize,
    lookahead: usize,
}

impl FdShare {
    /// Fewest fds worth giving one layer.
    const MIN_LAYER: usize = 48;

    /// Most fds an import holds: content fds ahead of each layer's reader, objects queued
    /// behind the one waited for (each with its fd), two per worker.
    fn held(self, threads: usize) -> usize {
        self.jobs * (self.prefetch + self.lookahead + 1) + 2 * threads
    }

    fn new(budget: usize, jobs: usize, threads: usize) -> Self {
        // Each worker also holds a tmpfile and the file it clones.
        let budget = budget.saturating_sub(2 * threads);
        let jobs = jobs.min(budget / Self::MIN_LAYER).max(1);
        let per_layer = budget / jobs;
        let prefetch = crate::layer::PREFETCH.min(per_layer / 2).max(2);
        // When the object waited for is a large file, the other workers need enough small
        // ones queued behind it not to run dry (with 4 per worker they idled ~0.4 s per
        // import of the reference image).
        let lookahead = (threads * 32 + 64)
            .min(per_layer.saturating_sub(prefetch + 8))
            .max(1);
        FdShare {
            jobs,
            prefetch,
            lookahead,
        }
    }
}

/// Imports `reference` from the helper's storage into `repo`.
///
/// Fails with the helper's errors ([`Error::Remote`]), [`Error::DigestMismatch`] when a
/// layer does not rebuild to its diff id (nothing of that layer is stored; the layers that
/// were are named first, so a retry skips them),
/// [`Error::ReflinkRequired`] under [`CopyPolicy::ReflinkOnly`], [`Error::ImageMismatch`]
/// when the config's diff ids and the layer chain disagree, [`Error::Repository`].
pub async fn import_image<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    reference: &str,
    options: &ImportOptions,
) -> Result<ImportReport<ObjectID>> {
    let start = Instant::now();
    let img = client.get_image(reference).await?;
    let tag = options.tag.clone().unwrap_or_else(|| {
        match reference.strip_prefix("containers-storage:") {
            Some(_) => reference.to_owned(),
            None => format!("containers-storage:{reference}"),
        }
    });
    let config: serde_json::Value = serde_json::from_str(&img.config.content)
        .map_err(|e| Error::ImageMismatch(format!("the config of {} is not JSON: {e}", img.id)))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .ok_or_else(|| {
            Error::ImageMismatch(format!("the config of {} has no rootfs.diff_ids", img.id))
        })?
        .iter()
        .map(|d| d.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::ImageMismatch("rootfs.diff_ids holds a non-string".into()))?;
    let chain: Vec<Option<&str>> = img.layers.iter().map(|l| l.diff_id.as_deref()).collect();
    if diff_ids.len() != chain.len()
        || diff_ids
            .iter()
            .zip(&chain)
            .any(|(a, b)| Some(a.as_str()) != *b)
    {
        return Err(Error::ImageMismatch(format!(
            "image {}: the config lists diff ids {diff_ids:?} but the layer chain has {chain:?}",
            img.id
        )));
    }

    // Skip what the repository has, without reading it.
    let mut verities: HashMap<String, ObjectID> = HashMap::new();
    let mut todo: Vec<usize> = Vec::new();
    let mut bytes = 0u64;
    let mut bytes_present = 0u64;
    let mut present = 0usize;
    for (i, l) in img.layers.iter().enumerate() {
        let d = &diff_ids[i];
        let size = l.diff_size.unwrap_or(0);
        bytes += size;
        if verities.contains_key(d) || todo.iter().any(|&j| diff_ids[j] == *d) {
            continue;
        }
        match repo
            .has_stream(&layer_identifier(d))
            .map_err(|cause| Error::Repository {
                doing: format!("looking up layer {d}"),
                cause,
            })? {
            Some(v) => {
                verities.insert(d.clone(), v);
                present += 1;
                bytes_present += size;
            }
            None => todo.push(i),
        }
    }
    send(
        &options.progress,
        ImportEvent::Started {
            layers: img.layers.len(),
            layers_present: present,
            bytes,
            bytes_present,
        },
    );
    let mut reports: Vec<Option<LayerReport<ObjectID>>> = vec![None; img.layers.len()];
    for (i, l) in img.layers.iter().enumerate() {
        if let Some(v) = verities.get(&diff_ids[i]) {
            send(
                &options.progress,
                ImportEvent::LayerSkipped {
                    index: i,
                    diff_id: diff_ids[i].clone(),
                    bytes: l.diff_size.unwrap_or(0),
                },
            );
            reports[i] = Some(LayerReport::skipped(i, l, &diff_ids[i], v));
        }
    }

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let threads = options.object_threads.unwrap_or(cpus).max(1);
    let reflink = Arc::new(WorkerState::default());
    // Layer streams stored by this import, named by the finalize step after one syncfs.
    let mut unnamed: Vec<finalize::Unnamed<ObjectID>> = Vec::new();
    // The tree thread builds the image's filesystem from the layers as they stream (see
    // `tree`); not for an image listing one layer twice (a layer streams once).
    let mut feeds: Vec<Option<tree::Feed<ObjectID>>> = Vec::new();
    let mut tree_builder = None;
    if !todo.is_empty() {
        let mut sources = Vec::new();
        let backlog = Arc::new(tree::Backlog::default());
        for (i, d) in diff_ids.iter().enumerate() {
            if todo.contains(&i) {
                let (feed, source) = tree::channel(&backlog);
                feeds.push(Some(feed));
                sources.push(source);
            } else if let Some(v) = verities.get(d) {
                feeds.push(None);
                sources.push(tree::Source::Stored(v.clone()));
            } else {
                feeds.clear();
                sources.clear();
                break;
            }
        }
        if !sources.is_empty() {
            match tree::Builder::start(repo.clone(), sources, backlog) {
                Ok(b) => tree_builder = Some(b),
                Err(e) => {
                    tracing::debug!("no tree thread ({e}): the tree is built after the layers");
                    feeds.clear();
                }
            }
        }
    }
    if !todo.is_empty() {
        let pool = Arc::new(Pool::new(
            repo.clone(),
            threads,
            options.copy_policy,
            reflink.clone(),
        )?);
        let jobs = options.layer_jobs.unwrap_or(cpus.min(4)).max(1);
        let fds = FdShare::new(crate::layer::fd_budget(), jobs, threads);
        crate::layer::reserve_fd_table(fds.held(threads) + 64);
        let jobs = fds.jobs;
        let sem = Arc::new(tokio::sync::Semaphore::new(jobs));
        let mut set = tokio::task::JoinSet::new();
        // Largest first, so the longest layer does not start last.
        let mut order = todo.clone();
        order.sort_by_key(|&i| std::cmp::Reverse(img.layers[i].diff_size.unwrap_or(0)));
        for i in order {
            let permit = sem.clone().acquire_owned().await.map_err(|_| {
                Error::io(
                    "scheduling layers",
                    std::io::Error::other("semaphore closed"),
                )
            })?;
            let client = client.clone();
            let repo = repo.clone();
            let pool = pool.clone();
            let info = img.layers[i].clone();
            let progress = options.progress.clone();
            let diff_id = diff_ids[i].clone();
            let feed = feeds.get_mut(i).and_then(Option::take);
            let lookahead = fds.lookahead;
            let prefetch = fds.prefetch;
            set.spawn(async move {
                let _permit = permit;
                let t = Instant::now();
                let bytes = info.diff_size.unwrap_or(0);
                send(
                    &progress,
                    ImportEvent::LayerStarted {
                        index: i,
                        diff_id: diff_id.clone(),
                        bytes,
                    },
                );
                let mut opened = client.open_layer_with_prefetch(&info.id, prefetch).await?;
                let during = format!("streaming layer {}", info.id);
                let reader = opened
                    .take_reader()
                    .ok_or_else(|| Error::Protocol {
                        method: "GetLayer".into(),
                        detail: "no stream".into(),
                    })?
                    .map_err(|e| client.explain(e, &during))?;
                let mut contents = opened.take_contents().ok_or_else(|| Error::Protocol {
                    method: "GetLayer".into(),
                    detail: "no contents".into(),
                })?;
                let p2 = progress.clone();
                let info2 = info.clone();
                let done = tokio::task::spawn_blocking(move || {
                    layer::import_blocking(
                        &repo,
                        layer::Outputs {
                            pool: &pool,
                            tree: feed,
                        },
                        &info2,
                        reader,
                        &mut contents,
                        |b| {
                            send(
                                &p2,
                                ImportEvent::LayerProgress {
                                    index: i,
                                    bytes_done: b,
                                },
                            )
                        },
                        lookahead,
                    )
                })
                .await
                .map_err(|e| Error::io("joining a layer import", std::io::Error::other(e)))?;
                let release = opened.release().await;
                let done = done.map_err(|e| client.explain(e, &during))?;
                release?;
                send(
                    &progress,
                    ImportEvent::LayerDone {
                        index: i,
                        diff_id: diff_id.clone(),
                        bytes,
                        stats: done.stats,
                    },
                );
                Ok::<_, Error>(LayerReport {
                    index: i,
                    layer_id: info.id.clone(),
                    diff_id,
                    bytes: done.tar_size,
                    verity: done.verity,
                    skipped: false,
                    stats: done.stats,
                    elapsed: t.elapsed(),
                })
            });
        }
        let mut failed = None;
        while let Some(r) = set.join_next().await {
            let r = match r
                .map_err(|e| Error::io("joining a layer import", std::io::Error::other(e)))
                .and_then(|r| r)
            {
                Ok(r) => r,
                Err(e) => {
                    // The other layers run on (their threads cannot be stopped anyway), so
                    // that what they store can be named for the next attempt.
                    failed.get_or_insert(e);
                    continue;
                }
            };
            unnamed.push((r.diff_id.clone(), r.verity.clone()));
            verities.insert(r.diff_id.clone(), r.verity.clone());
            let i = r.index;
            reports[i] = Some(r);
        }
        if let Some(e) = failed {
            // Name the layers that made it, so that a retry skips them.
            let repo = repo.clone();
            let named =
                tokio::task::spawn_blocking(move || finalize::name_layers(&repo, None, &unnamed))
                    .await;
            if let Ok(Err(n)) = named {
                tracing::warn!("naming the layers stored before the failure: {n}");
            }
            return Err(e);
        }
        // Duplicated diff ids share the import of their first occurrence.
        for (i, l) in img.layers.iter().enumerate() {
            if reports[i].is_none()
                && let Some(v) = verities.get(&diff_ids[i])
            {
                reports[i] = Some(LayerReport::skipped(i, l, &diff_ids[i], v));
            }
        }
    }
    // The workers are gone: their set of stored objects need not stay for the EROFS build.
    reflink.forget_objects();
    let layers: Vec<LayerReport<ObjectID>> = reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| {
                Error::ImageMismatch(format!("layer {i} was neither imported nor present"))
            })
        })
        .collect::<Result<_>>()?;

    send(&options.progress, ImportEvent::Finalizing);
    // Building the EROFS image holds the whole tree in memory: give the streaming phase's
    // buffers back to the system first so that the two peaks do not add up.
    log_memory("layers done");
    let refs: Vec<(OciDigest, ObjectID)> = layers
        .iter()
        .map(|l| Ok((parse_digest(&l.diff_id, "diff id")?, l.verity.clone())))
        .collect::<Result<_>>()?;
    let manifest_json = img.manifest.content.clone().into_bytes();
    let config_json = img.config.content.clone().into_bytes();
    let repo2 = repo.clone();
    let tag2 = tag.clone();
    let fin = tokio::task::spawn_blocking(move || {
        finalize::finalize(
            &repo2,
            &manifest_json,
            &config_json,
            &refs,
            &tag2,
            &unnamed,
            tree_builder,
        )
    })
    .await
    .map_err(|e| Error::io("joining the finalize step", std::io::Error::other(e)))??;
    log_memory("finalized");
    send(&options.progress, ImportEvent::Finished);

    let mut objects = ObjectStats::default();
    for l in &layers {
        objects.add(&l.stats);
    }
    let stats = ImportStats {
        layers: layers.len() as u64,
        layers_already_present: layers.iter().filter(|l| l.skipped).count() as u64,
        objects_copied: objects.copied,
        objects_reflinked: objects.reflinked,
        objects_hardlinked: objects.hardlinked,
        objects_already_present: objects.present,
        bytes_copied: objects.bytes_copied,
        bytes_reflinked: objects.bytes_reflinked,
        bytes_hardlinked: objects.bytes_hardlinked,
        bytes_inlined: objects.bytes_inlined,
    };
    Ok(ImportReport {
        reference: reference.to_owned(),
        image_id: img.id,
        tag,
        pull: PullResult {
            manifest_digest: fin.manifest.0,
            manifest_verity: fin.manifest.1,
            config_digest: fin.config.0,
            config_verity: fin.config.1,
            stats,
        },
        erofs_image: fin.erofs,
        layers,
        objects,
        first_reflink_fallback: reflink.first_fallback(),
        already_complete: fin.already_complete && present == img.layers.len(),
        has_usr: fin.has_usr,
        tree: fin.tree,
        elapsed: start.elapsed(),
    })
}

/// Logs the process's resident and peak memory at `phase` (debug level, from /proc).
pub(crate) fn log_memory(phase: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tracing::debug!(
        phase,
        rss_kib = field("VmRSS:"),
        peak_kib = field("VmHWM:"),
        "memory"
    );
}

#[cfg(test)]
mod fd_share {
    use super::FdShare;

    fn held(s: FdShare, threads: usize) -> usize {
        s.held(threads)
    }

    #[test]
    fn a_generous_limit_changes_nothing() {
        let s = FdShare::new(1 << 20, 4, 4);
        assert_eq!((s.jobs, s.prefetch, s.lookahead), (4, 456, 4 * 32 + 64));
    }

    #[test]
    fn a_low_limit_is_shared_not_exceeded() {
        for (budget, jobs, threads) in [(960, 2, 2), (960, 4, 8), (192, 4, 2), (100, 4, 4)] {
            let s = FdShare::new(budget, jobs, threads);
            assert!(s.jobs >= 1 && s.jobs <= jobs, "{s:?}");
            assert!(
                held(s, threads) <= budget,
                "{budget} {jobs} {threads}: {s:?}"
            );
        }
    }
}
