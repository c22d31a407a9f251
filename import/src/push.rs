//! Importing through a composefs repository service (upstream's `cfsctl varlink`), for a
//! repository that a service owns: the service writes, this process brokers. A second helper
//! is started in varlink mode (`cstor-helper --varlink-stdin`, on a socketpair, with the
//! storage and privileges of the caller's helper); each layer the service lacks
//! (`HasLayer`) is asked of that helper as a splitdirfdstream (`GetLayer`) and its pipe and
//! directory fds are handed to the service (`PutLayer`), which reads the files through them
//! (reflinking where it can) and checks the layer against its diff id; the helper's lifetime
//! fd, holding podman's read locks, is closed once the service has the layer. Then
//! `FinalizeImage` writes the config, manifest, EROFS image and tag, as upstream's own import
//! through a service does.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use composefs_oci::varlink_types::{
    FinalizeImageReply, GetLayerParams, LayerRef, OciError, OciProxy as _,
};
use cstor_proxy_client::spawn::HelperProcess;
use cstor_proxy_client::{Client, HelperConfig};
use serde::Serialize;

use crate::copy::RepositoryProxy as _;
use crate::error::{Error, Result};
use crate::image::{checked_diff_ids, default_tag};

/// What [`import_image_via_service`] did, layer by layer, as the service reported it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PushReport {
    /// The reference as given.
    pub reference: String,
    /// The image id in containers-storage.
    pub image_id: String,
    /// The tag the service wrote.
    pub tag: String,
    /// The service's `FinalizeImage` reply: manifest and config digests and stream ids.
    pub manifest_digest: String,
    /// The manifest stream's fs-verity id (hex).
    pub manifest_verity: String,
    /// The config digest.
    pub config_digest: String,
    /// The config stream's fs-verity id (hex).
    pub config_verity: String,
    /// Per layer, base first.
    pub layers: Vec<PushedLayer>,
    /// Wall time.
    pub elapsed: Duration,
}

/// One layer of a [`PushReport`].
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PushedLayer {
    /// The diff id.
    pub diff_id: String,
    /// The layer stream's fs-verity id (hex), as the service names it.
    pub verity: String,
    /// Whether the service had it already (`HasLayer`, or an earlier layer of the image).
    pub skipped: bool,
    /// Objects the service reflinked, hardlinked, copied, or had (its `PutLayer` counts).
    pub reflinked: u64,
    /// See [`PushedLayer::reflinked`].
    pub hardlinked: u64,
    /// See [`PushedLayer::reflinked`].
    pub copied: u64,
    /// See [`PushedLayer::reflinked`].
    pub present: u64,
}

/// Imports `reference` from the storage of `client`'s helper into the repository at
/// `repo_path`, which the composefs repository service at `socket` opens and writes. The
/// helper that hands the layers over is started with `helper` (the configuration `client`
/// was spawned with). `tag` defaults to `containers-storage:<reference>` as for
/// [`crate::import_image`]. `zerocopy` lets the service reflink (or hardlink) the layer
/// files instead of copying them, as `PutLayer` takes it.
///
/// Fails with the helper's errors, [`Error::NotFound`] when the service cannot open the
/// repository, and [`Error::Io`] carrying the service's error otherwise (a layer whose
/// content does not match its diff id is refused by the service with `DiffIdMismatch`).
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use cstor_import::import_image_via_service;
/// use cstor_proxy_client::{Client, HelperConfig};
///
/// let config = HelperConfig::default();
/// let client = Client::spawn(&config).await?;
/// let report = import_image_via_service(
///     &client, &config, "/run/composefs.sock".as_ref(), "/sysroot/composefs",
///     "localhost/myimage", None, true,
/// ).await?;
/// println!("manifest {}", report.manifest_digest);
/// # Ok(()) }
/// ```
pub async fn import_image_via_service(
    client: &Client,
    helper: &HelperConfig,
    socket: &Path,
    repo_path: &str,
    reference: &str,
    tag: Option<&str>,
    zerocopy: bool,
) -> Result<PushReport> {
    let start = Instant::now();
    let img = client.get_image(reference).await?;
    let diff_ids = checked_diff_ids(&img)?;
    let tag = tag
        .map(str::to_owned)
        .unwrap_or_else(|| default_tag(reference));
    let job = Job {
        helper: helper.clone(),
        socket: socket.to_owned(),
        repo_path: repo_path.to_owned(),
        manifest: img.manifest.content.clone(),
        config: img.config.content.clone(),
        diff_ids,
        tag: tag.clone(),
        zerocopy,
    };
    // zlink's reply streams are not Send: both connections live on a thread of their own.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cstor-push".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("starting the push thread", e))
                .and_then(|rt| rt.block_on(job.run()));
            let _ = tx.send(r);
        })
        .map_err(|e| Error::io("starting the push thread", e))?;
    let (layers, fin) = rx
        .await
        .map_err(|_| Error::io("pushing", std::io::Error::other("the push thread stopped")))??;
    Ok(PushReport {
        reference: reference.to_owned(),
        image_id: img.id,
        tag,
        manifest_digest: fin.manifest_digest,
        manifest_verity: fin.manifest_verity,
        config_digest: fin.config_digest,
        config_verity: fin.config_verity,
        layers,
        elapsed: start.elapsed(),
    })
}

struct Job {
    helper: HelperConfig,
    socket: std::path::PathBuf,
    repo_path: String,
    manifest: String,
    config: String,
    diff_ids: Vec<String>,
    tag: String,
    zerocopy: bool,
}

fn service_err(socket: &Path, doing: &str, e: impl std::fmt::Debug) -> Error {
    Error::io(
        format!(
            "{doing} through the repository service at {}",
            socket.display()
        ),
        std::io::Error::other(format!("{e:?}")),
    )
}

fn helper_err(doing: &str, e: impl std::fmt::Debug) -> Error {
    Error::io(
        format!("{doing} from cstor-helper --varlink-stdin"),
        std::io::Error::other(format!("{e:?}")),
    )
}

impl Job {
    async fn run(self) -> Result<(Vec<PushedLayer>, FinalizeImageReply)> {
        let socket = self.socket.as_path();
        let mut service = zlink::tokio::unix::connect(socket)
            .await
            .map_err(|e| service_err(socket, "connecting", e))?;
        let handle = service
            .open_repository(Some(&self.repo_path), None, None)
            .await
            .map_err(|e| service_err(socket, "opening the repository", e))?
            .map_err(|e| match e {
                crate::copy::RepositoryError::RepoNotFound { message } => Error::NotFound(format!(
                    "the repository service cannot open {}: {message}",
                    self.repo_path
                )),
                e => service_err(socket, "opening the repository", e),
            })?
            .handle;

        // The helper serving layers as splitdirfdstreams, on a socketpair.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::io("creating the helper's socket", e))?;
        let config = self.helper.clone().args(["--varlink-stdin"]);
        let process = HelperProcess::start(&config, OwnedFd::from(theirs))?;
        ours.set_nonblocking(true)
            .map_err(|e| Error::io("configuring the helper's socket", e))?;
        let ours = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| Error::io("configuring the helper's socket", e))?;
        let stream =
            zlink::tokio::unix::Stream::try_from(ours).map_err(|e| helper_err("connecting", e))?;
        let mut helper = zlink::Connection::new(stream);

        let mut layers: Vec<PushedLayer> = Vec::new();
        for d in &self.diff_ids {
            if let Some(seen) = layers.iter().find(|l| l.diff_id == *d) {
                let mut again = seen.clone();
                again.skipped = true;
                layers.push(again);
                continue;
            }
            let has = service
                .has_layer(handle, d)
                .await
                .map_err(|e| service_err(socket, "looking up a layer", e))?
                .map_err(|e| service_err(socket, "looking up a layer", e))?;
            if has.present
                && let Some(verity) = has.layer_verity
            {
                layers.push(PushedLayer {
                    diff_id: d.clone(),
                    verity,
                    skipped: true,
                    reflinked: 0,
                    hardlinked: 0,
                    copied: 0,
                    present: 0,
                });
                continue;
            }
            let (fds, lifetime) = get_layer(&mut helper, d).await.map_err(|e| {
                match process.exit_status(Duration::ZERO) {
                    Some(status) => helper_err(
                        &format!("reading layer {d}"),
                        format!(
                            "{e:?}; the helper exited ({status}): {}",
                            process.stderr_tail()
                        ),
                    ),
                    None => e,
                }
            })?;
            let put = service
                .put_layer(handle, d, self.zerocopy, fds)
                .await
                .map_err(|e| service_err(socket, &format!("storing layer {d}"), e))?
                .map_err(|e| service_err(socket, &format!("storing layer {d}"), e))?;
            // The service has read the layer: podman's locks may go.
            drop(lifetime);
            layers.push(PushedLayer {
                diff_id: d.clone(),
                verity: put.layer_verity,
                skipped: put.already_present,
                reflinked: put.objects_reflinked,
                hardlinked: put.objects_hardlinked,
                copied: put.objects_copied,
                present: put.objects_already_present,
            });
        }
        drop(helper);
        drop(process);
        let refs = layers
            .iter()
            .map(|l| LayerRef {
                diff_id: l.diff_id.clone(),
                layer_verity: l.verity.clone(),
            })
            .collect();
        let fin = service
            .finalize_image(handle, &self.manifest, &self.config, refs, Some(&self.tag))
            .await
            .map_err(|e| service_err(socket, "finalizing the image", e))?
            .map_err(|e: OciError| service_err(socket, "finalizing the image", e))?;
        Ok((layers, fin))
    }
}

/// Asks the helper for layer `diff_id`; returns the fds `PutLayer` takes (the pipe, then
/// the directories) and the lifetime fds, held until the service has read the layer.
async fn get_layer(
    helper: &mut zlink::tokio::unix::Connection,
    diff_id: &str,
) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
    use zlink::futures_util::StreamExt as _;
    let doing = format!("reading layer {diff_id}");
    let params = GetLayerParams {
        diff_id: Some(diff_id.to_owned()),
        ..Default::default()
    };
    let stream = helper
        .get_layer(0, params)
        .await
        .map_err(|e| helper_err(&doing, e))?;
    let mut stream = std::pin::pin!(stream);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut dir_count = None;
    while let Some(item) = stream.next().await {
        let (reply, batch) = item.map_err(|e| helper_err(&doing, e))?;
        // zlink receives fds without close-on-exec; the lifetime fd holds podman's locks and
        // must not leak into a process started meanwhile.
        for fd in &batch {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)
                .map_err(|e| Error::io("marking a received fd close-on-exec", e.into()))?;
        }
        let reply = reply.map_err(|e| helper_err(&doing, e))?;
        dir_count = Some(reply.dir_count as usize);
        fds.extend(batch);
    }
    let dir_count = dir_count.ok_or_else(|| helper_err(&doing, "no reply"))?;
    if fds.len() < 1 + dir_count {
        return Err(helper_err(
            &doing,
            format!("{} fds for a pipe and {dir_count} directories", fds.len()),
        ));
    }
    let lifetime = fds.split_off(1 + dir_count);
    if dir_count == 0 {
        // A layer of directories and tiny files only: `PutLayer` still wants a directory fd
        // beside the pipe, which the stream never refers to.
        let root = rustix::fs::open(
            "/",
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::io("opening a placeholder directory", e.into()))?;
        fds.push(root);
    }
    Ok((fds, lifetime))
}
