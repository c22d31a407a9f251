//! Importing one image of containers-storage, in the order that makes it safe to stop at
//! any moment: resolve the image and check its config against its layer chain; skip the
//! layers the repository has; stream the others (several at once, largest first), each
//! checked against its diff id before its stream is stored; name the stored layer streams
//! after one `syncfs`; then write the config, manifest, EROFS image and tag.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::{OciDigest, PullResult};
use cstor_protocol::{GetImageResult, LayerInfo};
use cstor_proxy_client::Client;

use crate::cancel::{self, StopOnDrop};
use crate::error::{Error, Result};
use crate::finalize::{self, Finalized, Unnamed};
use crate::objects::{Pool, WorkerState};
use crate::options::ImportOptions;
use crate::progress::{ImportEvent, Progress};
use crate::report::{ImportReport, LayerReport, ObjectStats, import_stats};
use crate::{layer_identifier, layer_import, sys, tree};

/// Imports `reference` from the helper's storage into `repo`.
///
/// Fails with the helper's errors ([`Error::Helper`]: the image is unknown, a layer does
/// not rebuild to its diff id (nothing of that layer is stored; the layers that were are
/// named first, so a retry skips them), the helper died...), [`Error::ReflinkRequired`]
/// under [`crate::CopyPolicy::ReflinkOnly`], [`Error::ImageMismatch`] when the config's diff
/// ids and the layer chain disagree, [`Error::Repository`], and [`Error::Cancelled`] when
/// [`ImportOptions::cancel`] fired. Dropping the returned future stops the import as
/// promptly (its threads stop at their next file, or a large file's next chunk).
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use cstor_import::{ImportOptions, import_image, open_repository};
/// use cstor_proxy_client::{Client, HelperConfig};
/// use composefs::fsverity::Sha512HashValue;
///
/// let repo = open_repository::<Sha512HashValue>("/var/lib/composefs".as_ref())?;
/// let client = Client::spawn(&HelperConfig::default()).await?;
/// let report = import_image(&client, &repo, "localhost/myimage", &ImportOptions::new()).await?;
/// println!("{} reflinked, {} copied", report.objects.reflinked, report.objects.copied);
/// client.shutdown().await?;
/// # Ok(()) }
/// ```
pub async fn import_image<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    reference: &str,
    options: &ImportOptions,
) -> Result<ImportReport<ObjectID>> {
    let stop = StopOnDrop::default();
    let work = import(client, repo, reference, options, stop.flag.clone());
    cancel::run(options.cancel.as_ref(), &stop, work).await
}

async fn import<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    reference: &str,
    options: &ImportOptions,
    stop: Arc<AtomicBool>,
) -> Result<ImportReport<ObjectID>> {
    let start = Instant::now();
    let progress = Progress::new(options.events.clone(), options.progress.clone());
    let img = client.get_image(reference).await?;
    let tag = options
        .tag
        .clone()
        .unwrap_or_else(|| default_tag(reference));
    let diff_ids = checked_diff_ids(&img)?;
    let mut plan = Plan::new(repo, &img, diff_ids)?;
    progress.send(ImportEvent::Started {
        layers: img.layers.len(),
        layers_present: plan.present,
        bytes: plan.bytes,
        bytes_present: plan.bytes_present,
    });
    plan.report_skipped(&img, &progress);

    let reflink = Arc::new(WorkerState::new(stop.clone()));
    let mut unnamed: Vec<Unnamed<ObjectID>> = Vec::new();
    let mut tree_builder = None;
    if !plan.todo.is_empty() {
        let (feeds, builder) = plan.start_tree(repo);
        tree_builder = builder;
        let streamed = stream_layers(
            client,
            repo,
            &img,
            &mut plan,
            feeds,
            StreamSetup {
                options,
                progress: &progress,
                state: &reflink,
                stop: &stop,
            },
        )
        .await;
        match streamed {
            Ok(stored) => unnamed = stored,
            Err((e, stored)) => {
                // Name the layers that made it, so that a retry skips them: each is complete
                // and was checked against its diff id.
                let repo = repo.clone();
                let named = tokio::task::spawn_blocking(move || {
                    finalize::name_layers(&repo, None, &stored)
                })
                .await;
                if let Ok(Err(n)) = named {
                    tracing::warn!("naming the layers stored before the failure: {n}");
                }
                return Err(if stop.load(Ordering::Relaxed) {
                    Error::Cancelled
                } else {
                    e
                });
            }
        }
    }
    // The workers are gone: their set of stored objects need not stay for the EROFS build.
    reflink.forget_objects();
    let layers = plan.into_reports()?;

    progress.send(ImportEvent::Finalizing);
    // Building the EROFS image holds the whole tree in memory: give the streaming phase's
    // buffers back to the system first so that the two peaks do not add up (the workers'
    // arenas keep what they freed otherwise, and the tree is built on another thread).
    sys::log_memory("layers done");
    cstor_sys::memory::release_free_memory();
    sys::log_memory("streaming memory released");
    let fin = finalize_image(
        repo,
        &img,
        &layers,
        &tag,
        unnamed,
        tree_builder,
        options,
        &stop,
    )
    .await?;
    sys::log_memory("finalized");
    progress.send(ImportEvent::Finished);

    let mut objects = ObjectStats::default();
    for l in &layers {
        objects.add(&l.stats);
    }
    let present = layers.iter().filter(|l| l.skipped).count();
    Ok(ImportReport {
        reference: reference.to_owned(),
        image_id: img.id,
        tag,
        pull: PullResult {
            manifest_digest: fin.manifest.0,
            manifest_verity: fin.manifest.1,
            config_digest: fin.config.0,
            config_verity: fin.config.1,
            stats: import_stats(&layers, &objects),
        },
        erofs_image: fin.erofs,
        boot_image: fin.boot,
        already_complete: fin.already_complete && present == layers.len(),
        layers,
        objects,
        first_reflink_fallback: reflink.first_fallback(),
        has_usr: fin.has_usr,
        tree: fin.tree,
        elapsed: start.elapsed(),
    })
}

/// The tag `cfsctl oci pull containers-storage:<reference>` would write.
pub(crate) fn default_tag(reference: &str) -> String {
    match reference.strip_prefix("containers-storage:") {
        Some(_) => reference.to_owned(),
        None => format!("containers-storage:{reference}"),
    }
}

/// The config's `rootfs.diff_ids`, which must be the layer chain's, layer for layer: the
/// manifest and config are what composefs will name the image by, the chain is what we
/// stream.
pub(crate) fn checked_diff_ids(img: &GetImageResult) -> Result<Vec<String>> {
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
    Ok(diff_ids)
}

/// Which layers to stream and which the repository has; the reports as they come in.
struct Plan<ObjectID> {
    diff_ids: Vec<String>,
    /// Layer stream ids by diff id: the repository's, then this import's.
    verities: HashMap<String, ObjectID>,
    /// Indices of the layers to stream (first occurrence of each diff id).
    todo: Vec<usize>,
    bytes: u64,
    bytes_present: u64,
    present: usize,
    reports: Vec<Option<LayerReport<ObjectID>>>,
}

impl<ObjectID: FsVerityHashValue> Plan<ObjectID> {
    /// Looks up every layer in `repo`, without reading any.
    fn new(
        repo: &Repository<ObjectID>,
        img: &GetImageResult,
        diff_ids: Vec<String>,
    ) -> Result<Self> {
        let mut plan = Plan {
            verities: HashMap::new(),
            todo: Vec::new(),
            bytes: 0,
            bytes_present: 0,
            present: 0,
            reports: vec![None; img.layers.len()],
            diff_ids,
        };
        for (i, l) in img.layers.iter().enumerate() {
            let d = &plan.diff_ids[i];
            let size = l.diff_size.unwrap_or(0);
            plan.bytes += size;
            if plan.verities.contains_key(d) || plan.todo.iter().any(|&j| plan.diff_ids[j] == *d) {
                continue;
            }
            match repo
                .has_stream(&layer_identifier(d))
                .map_err(|cause| Error::repository(format!("looking up layer {d}"), cause))?
            {
                Some(v) => {
                    plan.verities.insert(d.clone(), v);
                    plan.present += 1;
                    plan.bytes_present += size;
                }
                None => plan.todo.push(i),
            }
        }
        Ok(plan)
    }

    fn report_skipped(&mut self, img: &GetImageResult, progress: &Progress) {
        for (i, l) in img.layers.iter().enumerate() {
            if let Some(v) = self.verities.get(&self.diff_ids[i]) {
                progress.send(ImportEvent::LayerSkipped {
                    index: i,
                    diff_id: self.diff_ids[i].clone(),
                    bytes: l.diff_size.unwrap_or(0),
                });
                self.reports[i] = Some(LayerReport::skipped(i, l, &self.diff_ids[i], v));
            }
        }
    }

    /// Starts the tree thread, which builds the image's filesystem from the layers as they
    /// stream (see [`tree`]); not for an image listing one layer twice (a layer streams
    /// once). Returns each layer's feed (`None` for a layer not streamed).
    fn start_tree(
        &self,
        repo: &Arc<Repository<ObjectID>>,
    ) -> (
        Vec<Option<tree::Feed<ObjectID>>>,
        Option<tree::Builder<ObjectID>>,
    ) {
        let mut feeds = Vec::new();
        let mut sources = Vec::new();
        let backlog = Arc::new(tree::Backlog::default());
        for (i, d) in self.diff_ids.iter().enumerate() {
            if self.todo.contains(&i) {
                let (feed, source) = tree::channel(&backlog);
                feeds.push(Some(feed));
                sources.push(source);
            } else if let Some(v) = self.verities.get(d) {
                feeds.push(None);
                sources.push(tree::Source::Stored(v.clone()));
            } else {
                return (Vec::new(), None);
            }
        }
        match tree::Builder::start(repo.clone(), sources, backlog) {
            Ok(b) => (feeds, Some(b)),
            Err(e) => {
                tracing::debug!("no tree thread ({e}): the tree is built after the layers");
                (Vec::new(), None)
            }
        }
    }

    /// Every layer's report, base first; duplicated diff ids share the import of their
    /// first occurrence.
    fn into_reports(self) -> Result<Vec<LayerReport<ObjectID>>> {
        self.reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| {
                    Error::ImageMismatch(format!("layer {i} was neither imported nor present"))
                })
            })
            .collect()
    }

    /// Fills in the reports of layers that repeat one imported earlier in this image.
    fn fill_repeats(&mut self, img: &GetImageResult) {
        for (i, l) in img.layers.iter().enumerate() {
            if self.reports[i].is_none()
                && let Some(v) = self.verities.get(&self.diff_ids[i])
            {
                self.reports[i] = Some(LayerReport::skipped(i, l, &self.diff_ids[i], v));
            }
        }
    }
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
        let prefetch = cstor_proxy_client::DEFAULT_PREFETCH
            .min(per_layer / 2)
            .max(2);
        // When the object waited for is a large file, the other workers need enough small
        // ones queued behind it not to run dry.
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

/// What every layer task of [`stream_layers`] shares.
struct StreamSetup<'a> {
    options: &'a ImportOptions,
    progress: &'a Progress,
    state: &'a Arc<WorkerState>,
    stop: &'a Arc<AtomicBool>,
}

/// Streams the planned layers, several at once, largest first. Returns the layer streams
/// stored (not named yet); on failure, the first error with the layers stored meanwhile
/// (the others run to their end: blocking threads cannot be stopped from outside, and what
/// they store can be named for the next attempt).
async fn stream_layers<ObjectID: FsVerityHashValue>(
    client: &Client,
    repo: &Arc<Repository<ObjectID>>,
    img: &GetImageResult,
    plan: &mut Plan<ObjectID>,
    mut feeds: Vec<Option<tree::Feed<ObjectID>>>,
    setup: StreamSetup<'_>,
) -> std::result::Result<Vec<Unnamed<ObjectID>>, (Error, Vec<Unnamed<ObjectID>>)> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let threads = setup.options.object_threads.unwrap_or(cpus).max(1);
    let mut stored: Vec<Unnamed<ObjectID>> = Vec::new();
    let pool = match Pool::new(
        repo.clone(),
        threads,
        setup.options.copy_policy,
        setup.state.clone(),
    ) {
        Ok(p) => Arc::new(p),
        Err(e) => return Err((e, stored)),
    };
    let jobs = setup.options.layer_jobs.unwrap_or(cpus.min(4)).max(1);
    let fds = FdShare::new(cstor_proxy_client::fd_budget(), jobs, threads);
    cstor_proxy_client::reserve_fd_table(fds.held(threads) + 64);
    let sem = Arc::new(tokio::sync::Semaphore::new(fds.jobs));
    let mut set = tokio::task::JoinSet::new();
    let mut order = plan.todo.clone();
    order.sort_by_key(|&i| std::cmp::Reverse(img.layers[i].diff_size.unwrap_or(0)));
    let mut failed: Option<Error> = None;
    let unstarted = Arc::new(AtomicUsize::new(order.len()));
    for i in order {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if setup.stop.load(Ordering::Relaxed) {
            failed.get_or_insert(Error::Cancelled);
            break;
        }
        let task = LayerTask {
            index: i,
            info: img.layers[i].clone(),
            diff_id: plan.diff_ids[i].clone(),
            feed: feeds.get_mut(i).and_then(Option::take),
            fds,
            unstarted: unstarted.clone(),
        };
        unstarted.fetch_sub(1, Ordering::Relaxed);
        let client = client.clone();
        let repo = repo.clone();
        let pool = pool.clone();
        let progress = setup.progress.clone();
        let stop = setup.stop.clone();
        set.spawn(async move {
            let _permit = permit;
            task.run(&client, repo, pool, progress, stop).await
        });
    }
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(|e| Error::io("joining a layer import", std::io::Error::other(e)))
            .and_then(|r| r);
        match r {
            Ok(r) => {
                stored.push((r.diff_id.clone(), r.verity.clone()));
                plan.verities.insert(r.diff_id.clone(), r.verity.clone());
                let i = r.index;
                plan.reports[i] = Some(r);
            }
            Err(e) => {
                // The first error is the cause; the others (cancelled, or helper gone) follow
                // from it.
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err((e, stored));
    }
    plan.fill_repeats(img);
    Ok(stored)
}

/// One layer to stream.
struct LayerTask<ObjectID> {
    index: usize,
    info: LayerInfo,
    diff_id: String,
    feed: Option<tree::Feed<ObjectID>>,
    fds: FdShare,
    /// Layers of the import not started yet: once none is left, the thread that ran this
    /// one has nothing more to do.
    unstarted: Arc<AtomicUsize>,
}

impl<ObjectID: FsVerityHashValue> LayerTask<ObjectID> {
    async fn run(
        self,
        client: &Client,
        repo: Arc<Repository<ObjectID>>,
        pool: Arc<Pool<ObjectID>>,
        progress: Progress,
        stop: Arc<AtomicBool>,
    ) -> Result<LayerReport<ObjectID>> {
        let LayerTask {
            index,
            info,
            diff_id,
            feed,
            fds,
            unstarted,
        } = self;
        let t = Instant::now();
        let bytes = info.diff_size.unwrap_or(0);
        progress.send(ImportEvent::LayerStarted {
            index,
            diff_id: diff_id.clone(),
            bytes,
        });
        let mut opened = client
            .open_layer_with_prefetch(&info.id, fds.prefetch)
            .await?;
        let during = format!("streaming layer {}", info.id);
        let reader = opened
            .take_reader()
            .ok_or_else(|| no_stream("the layer stream was already taken"))?;
        let mut contents = opened
            .take_contents()
            .ok_or_else(|| no_stream("the layer contents were already taken"))?;
        let info2 = info.clone();
        let diff2 = diff_id.clone();
        let p2 = progress.clone();
        let done = tokio::task::spawn_blocking(move || {
            let done = layer_import::import_blocking(
                &repo,
                layer_import::Outputs {
                    pool: &pool,
                    tree: feed,
                    stop: &stop,
                },
                &info2,
                reader,
                &mut contents,
                |b| p2.layer_progress(index, &diff2, b, bytes),
                fds.lookahead,
            );
            // With no layer left to start, this thread goes back to tokio's pool idle for the
            // rest of the import, and the free top of its arena (the layer's buffers) would
            // stay resident under the image's tree. Not after every layer: the next one on
            // this thread reuses those pages (trimming after each of 500 layers cost 5-8%).
            if unstarted.load(Ordering::Relaxed) == 0 {
                cstor_sys::memory::release_thread_memory();
            }
            done
        })
        .await
        .map_err(|e| Error::io("joining a layer import", std::io::Error::other(e)))?;
        let release = opened.release().await;
        let done = done.map_err(|e| match e {
            Error::Helper(e) => Error::Helper(client.explain(e, &during)),
            e => e,
        })?;
        release?;
        progress.send(ImportEvent::LayerDone {
            index,
            diff_id: diff_id.clone(),
            bytes,
            stats: done.stats,
        });
        Ok(LayerReport {
            index,
            layer_id: info.id.clone(),
            diff_id,
            bytes: done.tar_size,
            verity: done.verity,
            skipped: false,
            stats: done.stats,
            elapsed: t.elapsed(),
        })
    }
}

fn no_stream(detail: &str) -> Error {
    cstor_proxy_client::Error::Protocol {
        method: cstor_protocol::method::GET_LAYER.into(),
        detail: detail.into(),
    }
    .into()
}

fn parse_digest(d: &str, what: &str) -> Result<OciDigest> {
    OciDigest::from_str(d)
        .map_err(|e| Error::ImageMismatch(format!("{what} {d:?} is not a digest: {e}")))
}

/// Writes the config, manifest, EROFS image(s) and tag, after naming the layer streams this
/// import stored; on a blocking thread.
#[allow(clippy::too_many_arguments)]
async fn finalize_image<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    img: &GetImageResult,
    layers: &[LayerReport<ObjectID>],
    tag: &str,
    unnamed: Vec<Unnamed<ObjectID>>,
    tree: Option<tree::Builder<ObjectID>>,
    options: &ImportOptions,
    stop: &Arc<AtomicBool>,
) -> Result<Finalized<ObjectID>> {
    let refs: Vec<(OciDigest, ObjectID)> = layers
        .iter()
        .map(|l| Ok((parse_digest(&l.diff_id, "diff id")?, l.verity.clone())))
        .collect::<Result<_>>()?;
    let manifest_json = img.manifest.content.clone().into_bytes();
    let config_json = img.config.content.clone().into_bytes();
    let repo = repo.clone();
    let tag = tag.to_owned();
    let bootable = options.bootable;
    let stop = stop.clone();
    tokio::task::spawn_blocking(move || {
        finalize::finalize(
            &repo,
            finalize::Image {
                manifest_json: &manifest_json,
                config_json: &config_json,
                layers: &refs,
                tag: &tag,
                bootable,
            },
            &unnamed,
            tree,
            &stop,
        )
    })
    .await
    .map_err(|e| Error::io("joining the finalize step", std::io::Error::other(e)))?
}

#[cfg(test)]
mod fd_share {
    use super::FdShare;

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
                s.held(threads) <= budget,
                "{budget} {jobs} {threads}: {s:?}"
            );
        }
    }
}
