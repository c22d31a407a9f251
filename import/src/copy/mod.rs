//! Copying an image from one composefs repository into another, as `cfsctl oci copy` does,
//! with what an import guarantees: every object checked against its name (its fs-verity
//! digest in the source) in the read that stores it, every layer's rebuilt tar checked
//! against its diff id, the manifest and config against their digests, contents reflinked
//! where both repositories share a filesystem (by any user who can read the source), layers
//! the destination has skipped, and nothing named until it is complete.
//!
//! The source may use another hash than the destination (a SHA-512 repository into a
//! SHA-256 one): objects are then digested with both in the same read, and the layer
//! streams, the config and manifest streams and the EROFS image are written with the
//! destination's ids. With the same hash the layer streams come out byte for byte as the
//! source's (composefs writes a layer stream one way), and the EROFS image is rebuilt from
//! them as an import builds it: the image id is the one `cfsctl oci compute-id` gives.
//!
//! The source is opened with composefs' own shared lock on the repository, which its
//! garbage collection takes exclusively: a `cfsctl gc` of the source waits for the copy.
//!
//! - here: resolving the image, the plan, the layers in parallel, the finalize step;
//! - `layer`: one layer stream.

mod layer;
mod service;

pub use service::Service;
pub(crate) use service::{RepositoryError, RepositoryProxy};

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;
use composefs_oci::oci_image::OciImage;
use composefs_oci::{OciDigest, PullResult};

use crate::cancel::{self, StopOnDrop};
use crate::error::{Error, Result};
use crate::finalize::{self, Unnamed};
use crate::objects::{Pool, WorkerState};
use crate::options::ImportOptions;
use crate::progress::{ImportEvent, Progress};
use crate::report::{ImportReport, LayerReport, ObjectStats, import_stats};
use crate::{layer_identifier, sys, tree};

/// Copies `image` (a tag of `source`, or `@sha256:<manifest digest>`) into `repo`.
///
/// The destination tag is [`ImportOptions::tag`], else the source's tag; an image named by
/// digest needs [`ImportOptions::tag`] (an untagged image would be garbage to the
/// destination). The report's `image_id` is the config digest (what podman calls the image
/// id), its layers' `layer_id` their diff ids.
///
/// Fails with [`Error::NotFound`] when the source has no such tag or image,
/// [`Error::SourceObject`] when an object, a stream or the manifest or config of the source
/// is not what its name says (nothing of that layer, or of the image, is named in `repo`),
/// [`Error::ImageMismatch`] for an artifact or an image without a tag,
/// [`Error::ReflinkRequired`] under [`crate::CopyPolicy::ReflinkOnly`] across filesystems,
/// [`Error::Cancelled`] and [`Error::Repository`] as [`crate::import_image`] does.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use composefs::fsverity::Sha512HashValue;
/// use cstor_import::{ImportOptions, copy_image, open_repository};
///
/// let source = open_repository::<Sha512HashValue>("/sysroot/composefs".as_ref())?;
/// let repo = open_repository::<Sha512HashValue>("/var/tmp/mine".as_ref())?;
/// let report = copy_image(&source, &repo, "myimage", &ImportOptions::new()).await?;
/// println!("{} reflinked, {} copied", report.objects.reflinked, report.objects.copied);
/// # Ok(()) }
/// ```
pub async fn copy_image<S: FsVerityHashValue, D: FsVerityHashValue>(
    source: &Arc<Repository<S>>,
    repo: &Arc<Repository<D>>,
    image: &str,
    options: &ImportOptions,
) -> Result<ImportReport<D>> {
    let stop = StopOnDrop::default();
    let work = copy(
        Origin::Repo(source.clone()),
        repo,
        image,
        options,
        stop.flag.clone(),
    );
    cancel::run(options.cancel.as_ref(), &stop, work).await
}

/// [`copy_image`] from a repository service (upstream's `cfsctl varlink`) instead of a
/// path: for a source the caller cannot read, such as a root-owned `/sysroot/composefs`
/// served by a system service, copied into the caller's own repository. The service reads
/// the objects; they reach this process as fds, and are reflinked from them where the
/// filesystem allows. Every object whose reference names its id is checked against it, and
/// every layer against its diff id. Layer sizes are not known up front (the progress events
/// carry 0 for them).
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use composefs::fsverity::Sha512HashValue;
/// use cstor_import::{ImportOptions, RepositoryService, copy_image_from_service, open_repository};
///
/// let service = RepositoryService::connect("/run/composefs.sock".as_ref(), None).await?;
/// let repo = open_repository::<Sha512HashValue>("/var/tmp/mine".as_ref())?;
/// let report = copy_image_from_service(service, &repo, "myimage", &ImportOptions::new()).await?;
/// println!("{} reflinked", report.objects.reflinked);
/// # Ok(()) }
/// ```
pub async fn copy_image_from_service<D: FsVerityHashValue>(
    service: Service,
    repo: &Arc<Repository<D>>,
    image: &str,
    options: &ImportOptions,
) -> Result<ImportReport<D>> {
    let stop = StopOnDrop::default();
    let origin = Origin::<D>::Service(Arc::new(service));
    let work = copy(origin, repo, image, options, stop.flag.clone());
    cancel::run(options.cancel.as_ref(), &stop, work).await
}

/// The image in the source, checked: manifest and config are what their digests say.
struct SourceImage<S> {
    manifest_json: Vec<u8>,
    config_json: Vec<u8>,
    config_digest: OciDigest,
    /// Diff id and the source's layer stream (`None` from a service), in config order.
    layers: Vec<(String, Option<S>)>,
    /// The source's tag, when the image was named by one.
    tag: Option<String>,
}

fn resolve<S: FsVerityHashValue>(source: &Repository<S>, image: &str) -> Result<SourceImage<S>> {
    let not_found = |e: anyhow::Error| {
        if e.chain().any(|c| {
            c.is::<composefs_oci::oci_image::OciRefNotFound>()
                || c.is::<composefs_oci::oci_image::OciImageNotFound>()
                || c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
        }) {
            Error::NotFound(format!("the source repository has no image {image}: {e:#}"))
        } else {
            Error::repository(format!("opening image {image} in the source repository"), e)
        }
    };
    let (img, tag) = match image.strip_prefix('@') {
        Some(digest) => {
            let digest = OciDigest::from_str(digest)
                .map_err(|e| Error::NotFound(format!("{image:?} is not a digest: {e}")))?;
            (
                OciImage::open(source, &digest, None).map_err(not_found)?,
                None,
            )
        }
        None => (
            OciImage::open_ref(source, image).map_err(not_found)?,
            Some(image.to_owned()),
        ),
    };
    if !img.is_container_image() {
        return Err(Error::ImageMismatch(format!(
            "{image} is an OCI artifact, not a container image: cstor copies container images"
        )));
    }
    let read = |what: &str, r: anyhow::Result<Vec<u8>>| {
        r.map_err(|e| Error::SourceObject {
            object: format!("the {what} stream of {image}"),
            detail: format!("{e:#}"),
        })
    };
    let manifest_json = read("manifest", img.read_manifest_json(source))?;
    let config_json = read("config", img.read_config_json(source))?;
    for (what, json, digest) in [
        ("manifest", &manifest_json, img.manifest_digest()),
        ("config", &config_json, img.config_digest()),
    ] {
        let actual = composefs_oci::sha256_content_digest(json);
        if actual != *digest {
            return Err(Error::SourceObject {
                object: format!("the {what} of {image}"),
                detail: format!("named {digest}, its content has {actual}"),
            });
        }
    }
    let diff_ids: Vec<String> = img.layer_diff_ids().iter().map(|d| d.to_string()).collect();
    let layers = diff_ids
        .into_iter()
        .map(|d| match img.layer_verity(&d) {
            Some(v) => Ok((d, Some(v.clone()))),
            None => Err(Error::SourceObject {
                object: format!("the config stream of {image}"),
                detail: format!("it has no reference to layer {d}"),
            }),
        })
        .collect::<Result<_>>()?;
    Ok(SourceImage {
        manifest_json,
        config_json,
        config_digest: img.config_digest().clone(),
        layers,
        tag,
    })
}

/// The image as a repository service has it: manifest and config checked against their
/// digests (the manifest's when `image` names one), diff ids from the config.
async fn resolve_service<S: FsVerityHashValue>(
    service: &Service,
    image: &str,
) -> Result<SourceImage<S>> {
    let (manifest_json, config_json) = service.inspect(image).await?;
    let corrupt = |what: &str, detail: String| Error::SourceObject {
        object: format!("the {what} of {image} from the repository service"),
        detail,
    };
    let tag = match image.strip_prefix('@') {
        Some(digest) => {
            let actual = composefs_oci::sha256_content_digest(&manifest_json);
            if actual.to_string() != digest {
                return Err(corrupt(
                    "manifest",
                    format!("named {digest}, its content has {actual}"),
                ));
            }
            None
        }
        None => Some(image.to_owned()),
    };
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_json)
        .map_err(|e| corrupt("manifest", format!("not JSON: {e}")))?;
    let config: serde_json::Value = serde_json::from_slice(&config_json)
        .map_err(|e| corrupt("config", format!("not JSON: {e}")))?;
    let named = manifest
        .pointer("/config/digest")
        .and_then(|d| d.as_str())
        .ok_or_else(|| corrupt("manifest", "it names no config".into()))?;
    let config_digest = composefs_oci::sha256_content_digest(&config_json);
    if config_digest.to_string() != named {
        return Err(corrupt(
            "config",
            format!("named {named}, its content has {config_digest}"),
        ));
    }
    let diff_ids = config
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .ok_or_else(|| {
            Error::ImageMismatch(format!(
                "{image} has no rootfs.diff_ids: an OCI artifact, not a container image"
            ))
        })?
        .iter()
        .map(|d| d.as_str().map(|d| (d.to_owned(), None)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| corrupt("config", "rootfs.diff_ids holds a non-string".into()))?;
    Ok(SourceImage {
        manifest_json,
        config_json,
        config_digest,
        layers: diff_ids,
        tag,
    })
}

/// Where a copy reads from.
enum Origin<S: FsVerityHashValue> {
    /// A repository this process opened.
    Repo(Arc<Repository<S>>),
    /// A repository service.
    Service(Arc<Service>),
}

impl<S: FsVerityHashValue> Clone for Origin<S> {
    fn clone(&self) -> Self {
        match self {
            Origin::Repo(r) => Origin::Repo(r.clone()),
            Origin::Service(s) => Origin::Service(s.clone()),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("joining a copy step", std::io::Error::other(e)))?
}

async fn copy<S: FsVerityHashValue, D: FsVerityHashValue>(
    source: Origin<S>,
    repo: &Arc<Repository<D>>,
    image: &str,
    options: &ImportOptions,
    stop: Arc<AtomicBool>,
) -> Result<ImportReport<D>> {
    let start = Instant::now();
    let progress = Progress::new(options.events.clone(), options.progress.clone());
    let src = match &source {
        Origin::Repo(r) => {
            let (r, image) = (r.clone(), image.to_owned());
            blocking(move || resolve(&r, &image)).await?
        }
        Origin::Service(s) => resolve_service(s, image).await?,
    };
    let tag = options
        .tag
        .clone()
        .or_else(|| src.tag.clone())
        .ok_or_else(|| {
            Error::ImageMismatch(format!(
                "{image} names an image by digest: give the destination a tag"
            ))
        })?;

    // The plan: what the destination has, and the size of each layer it does not.
    let plan = {
        let (source, repo, layers) = (source.clone(), repo.clone(), src.layers.clone());
        blocking(move || {
            let source = match &source {
                Origin::Repo(r) => Some(&**r),
                Origin::Service(_) => None,
            };
            Plan::new(source, &repo, &layers)
        })
        .await?
    };
    progress.send(ImportEvent::Started {
        layers: src.layers.len(),
        layers_present: plan.present.len(),
        bytes: plan.bytes.values().sum::<u64>()
            + plan.present.values().map(|(_, b)| *b).sum::<u64>(),
        bytes_present: plan.present.values().map(|(_, b)| *b).sum(),
    });
    for (i, (d, _)) in src.layers.iter().enumerate() {
        if let Some((_, bytes)) = plan.present.get(d) {
            progress.send(ImportEvent::LayerSkipped {
                index: i,
                diff_id: d.clone(),
                bytes: *bytes,
            });
        }
    }

    let state = Arc::new(WorkerState::new(stop.clone()));
    let (feeds, tree) = start_tree(repo, &src, &plan);
    let copied = copy_layers(
        &source, repo, &src, &plan, feeds, options, &progress, &state, &stop,
    )
    .await;
    let (done, stored) = match copied {
        Ok(done) => {
            let stored: Vec<Unnamed<D>> = done
                .values()
                .map(|r| (r.diff_id.clone(), r.verity.clone()))
                .collect();
            (done, stored)
        }
        Err((e, stored)) => {
            // Each stored layer is complete and checked: name it, so a retry skips it.
            let repo = repo.clone();
            let _ = blocking(move || finalize::name_layers(&repo, None, &stored)).await;
            return Err(if stop.load(Ordering::Relaxed) {
                Error::Cancelled
            } else {
                e
            });
        }
    };
    state.forget_objects();
    let mut layers = Vec::with_capacity(src.layers.len());
    for (i, (d, _)) in src.layers.iter().enumerate() {
        let r = match (plan.present.get(d), done.get(d)) {
            (Some((v, bytes)), _) => LayerReport {
                index: i,
                layer_id: d.clone(),
                diff_id: d.clone(),
                bytes: *bytes,
                verity: v.clone(),
                skipped: true,
                stats: ObjectStats::default(),
                elapsed: std::time::Duration::ZERO,
            },
            (None, Some(r)) if layers.iter().any(|l: &LayerReport<D>| l.diff_id == *d) => {
                // An image listing one layer twice: copied once.
                LayerReport {
                    index: i,
                    skipped: true,
                    stats: ObjectStats::default(),
                    elapsed: std::time::Duration::ZERO,
                    ..r.clone()
                }
            }
            (None, Some(r)) => LayerReport {
                index: i,
                ..r.clone()
            },
            (None, None) => {
                return Err(Error::ImageMismatch(format!(
                    "layer {d} was neither copied nor present"
                )));
            }
        };
        layers.push(r);
    }

    progress.send(ImportEvent::Finalizing);
    sys::log_memory("layers copied");
    // As after an import's layers: the tree and the EROFS layout come next.
    cstor_sys::memory::release_free_memory();
    let refs: Vec<(OciDigest, D)> = layers
        .iter()
        .map(|l| {
            OciDigest::from_str(&l.diff_id)
                .map(|d| (d, l.verity.clone()))
                .map_err(|e| Error::ImageMismatch(format!("diff id {:?}: {e}", l.diff_id)))
        })
        .collect::<Result<_>>()?;
    let fin = {
        let repo = repo.clone();
        let (manifest_json, config_json) = (src.manifest_json.clone(), src.config_json.clone());
        let (tag, bootable, stop) = (tag.clone(), options.bootable, stop.clone());
        blocking(move || {
            finalize::finalize(
                &repo,
                finalize::Image {
                    manifest_json: &manifest_json,
                    config_json: &config_json,
                    layers: &refs,
                    tag: &tag,
                    bootable,
                },
                &stored,
                tree,
                &stop,
            )
        })
        .await?
    };
    progress.send(ImportEvent::Finished);

    let mut objects = ObjectStats::default();
    for l in &layers {
        objects.add(&l.stats);
    }
    let all_present = layers.iter().all(|l| l.skipped);
    Ok(ImportReport {
        reference: image.to_owned(),
        image_id: src.config_digest.to_string(),
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
        already_complete: fin.already_complete && all_present,
        layers,
        objects,
        first_reflink_fallback: state.first_fallback(),
        has_usr: fin.has_usr,
        tree: fin.tree,
        elapsed: start.elapsed(),
    })
}

/// Which layers the destination has (its stream, and the layer's size) and which to copy
/// (the layer's size, from the source stream's header).
struct Plan<D> {
    present: HashMap<String, (D, u64)>,
    bytes: HashMap<String, u64>,
}

impl<D: FsVerityHashValue> Plan<D> {
    /// Layer sizes come from the source's layer streams; a service's are not known (0).
    fn new<S: FsVerityHashValue>(
        source: Option<&Repository<S>>,
        repo: &Repository<D>,
        layers: &[(String, Option<S>)],
    ) -> Result<Self> {
        let mut plan = Plan {
            present: HashMap::new(),
            bytes: HashMap::new(),
        };
        for (d, v) in layers {
            if plan.present.contains_key(d) || plan.bytes.contains_key(d) {
                continue;
            }
            let size = match (source, v) {
                (Some(source), Some(v)) => layer::stream_size(source, v, d)?,
                _ => 0,
            };
            match repo
                .has_stream(&layer_identifier(d))
                .map_err(|cause| Error::repository(format!("looking up layer {d}"), cause))?
            {
                Some(have) => {
                    plan.present.insert(d.clone(), (have, size));
                }
                None => {
                    plan.bytes.insert(d.clone(), size);
                }
            }
        }
        Ok(plan)
    }
}

/// Starts the tree thread, which builds the EROFS image's tree from the layers as they are
/// copied (see [`crate::tree`]), with a feed for each layer to copy; none for an image listing
/// a layer twice (it is copied once), which gets its tree read back from the streams.
fn start_tree<S: FsVerityHashValue, D: FsVerityHashValue>(
    repo: &Arc<Repository<D>>,
    src: &SourceImage<S>,
    plan: &Plan<D>,
) -> (HashMap<String, tree::Feed<D>>, Option<tree::Builder<D>>) {
    let mut feeds = HashMap::new();
    let mut sources = Vec::new();
    let backlog = Arc::new(tree::Backlog::default());
    for (d, _) in &src.layers {
        if let Some((v, _)) = plan.present.get(d) {
            sources.push(tree::Source::Stored(v.clone()));
        } else if feeds.contains_key(d) {
            return (HashMap::new(), None);
        } else {
            let (feed, source) = tree::channel(&backlog);
            feeds.insert(d.clone(), feed);
            sources.push(source);
        }
    }
    match tree::Builder::start(repo.clone(), sources, backlog) {
        Ok(b) => (feeds, Some(b)),
        Err(e) => {
            tracing::debug!("no tree thread ({e}): the tree is built after the layers");
            (HashMap::new(), None)
        }
    }
}

/// Copies the layers the plan lists, several at once, largest first. On failure, returns
/// the first error with the streams stored meanwhile.
#[allow(clippy::too_many_arguments)]
async fn copy_layers<S: FsVerityHashValue, D: FsVerityHashValue>(
    source: &Origin<S>,
    repo: &Arc<Repository<D>>,
    src: &SourceImage<S>,
    plan: &Plan<D>,
    mut feeds: HashMap<String, tree::Feed<D>>,
    options: &ImportOptions,
    progress: &Progress,
    state: &Arc<WorkerState>,
    stop: &Arc<AtomicBool>,
) -> std::result::Result<HashMap<String, LayerReport<D>>, (Error, Vec<Unnamed<D>>)> {
    let mut done: HashMap<String, LayerReport<D>> = HashMap::new();
    if plan.bytes.is_empty() {
        return Ok(done);
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let threads = options.object_threads.unwrap_or(cpus).max(1);
    let pool = match Pool::new(repo.clone(), threads, options.copy_policy, state.clone()) {
        Ok(p) => Arc::new(p),
        Err(e) => return Err((e, Vec::new())),
    };
    let jobs = options.layer_jobs.unwrap_or(cpus.min(4)).max(1);
    // Each layer holds an fd per queued object.
    let lookahead = (threads * 32 + 64).min(cstor_proxy_client::fd_budget() / (2 * jobs) + 1);
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs));
    let mut order: Vec<(usize, &(String, Option<S>))> = src
        .layers
        .iter()
        .enumerate()
        .filter(|(_, (d, _))| plan.bytes.contains_key(d))
        .collect();
    order.dedup_by(|a, b| a.1.0 == b.1.0);
    order.sort_by_key(|(_, (d, _))| std::cmp::Reverse(plan.bytes.get(d).copied().unwrap_or(0)));
    let mut seen = std::collections::HashSet::new();
    let mut set = tokio::task::JoinSet::new();
    let mut failed: Option<Error> = None;
    for (index, (diff_id, verity)) in order {
        if !seen.insert(diff_id.clone()) {
            continue;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if stop.load(Ordering::Relaxed) {
            failed.get_or_insert(Error::Cancelled);
            break;
        }
        let (source, repo, pool, progress, stop) = (
            source.clone(),
            repo.clone(),
            pool.clone(),
            progress.clone(),
            stop.clone(),
        );
        let (diff_id, verity) = (diff_id.clone(), verity.clone());
        let feed = feeds.remove(&diff_id);
        let bytes = plan.bytes.get(&diff_id).copied().unwrap_or(0);
        set.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            progress.send(ImportEvent::LayerStarted {
                index,
                diff_id: diff_id.clone(),
                bytes,
            });
            let d = diff_id.clone();
            let p = progress.clone();
            let copy = move |walk: &mut dyn FnMut(layer::Each<'_>) -> Result<()>| {
                layer::copy_blocking(
                    walk,
                    &d,
                    layer::Target {
                        repo: &repo,
                        pool: &pool,
                        tree: feed,
                        stop: &stop,
                        lookahead,
                    },
                    |b| p.layer_progress(index, &d, b, bytes),
                )
            };
            let r = match source {
                Origin::Repo(source) => {
                    let d = diff_id.clone();
                    blocking(move || {
                        let verity = verity.ok_or_else(|| {
                            Error::ImageMismatch(format!("no layer stream for {d}"))
                        })?;
                        let mut reader = layer::open_stream(&source, &verity, &d)?;
                        copy(&mut |each| layer::walk_stream(&source, &mut reader, &d, each))
                    })
                    .await?
                }
                Origin::Service(service) => {
                    // The fds are had one layer at a time (one connection); the layers are
                    // then read and stored in parallel.
                    let fetched = service.get_layer(&diff_id).await?;
                    let d = diff_id.clone();
                    blocking(move || copy(&mut |each| service::walk(&fetched, &d, each))).await?
                }
            };
            progress.send(ImportEvent::LayerDone {
                index,
                diff_id: diff_id.clone(),
                bytes,
                stats: r.stats,
            });
            Ok(LayerReport {
                index,
                layer_id: diff_id.clone(),
                diff_id,
                bytes: r.tar_size,
                verity: r.verity,
                skipped: false,
                stats: r.stats,
                elapsed: t.elapsed(),
            })
        });
    }
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(|e| Error::io("joining a layer copy", std::io::Error::other(e)))
            .and_then(|r: Result<LayerReport<D>>| r);
        match r {
            Ok(r) => {
                done.insert(r.diff_id.clone(), r);
            }
            Err(e) => {
                // The first error is the cause. The other layers run to their end: what
                // they store is named, for the next attempt.
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        let stored = done
            .values()
            .map(|r| (r.diff_id.clone(), r.verity.clone()))
            .collect();
        return Err((e, stored));
    }
    Ok(done)
}
