//! `cstor`: look at and export images of containers-storage through `cstor-helper`.
//!
//! Exit codes: 0 success; 1 other failure; 2 command-line error; 3 image or layer not found
//! (or an invalid/ambiguous reference); 4 verification failed (a CRC, size or digest did not
//! match); 5 the helper could not be started or died; 6 storage busy (a lock stayed held),
//! retry later; 7 `--copy-policy reflink-only` and a file could not be reflinked; 141 stdout
//! was closed early (e.g. `cstor layer-tar ... | head`), silently, as
//! for a process killed by SIGPIPE.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cstor_proxy_client::import::{self, CopyPolicy, ImportEvent, ImportOptions, RepoAlgorithm};
use cstor_proxy_client::protocol::{ErrorCode, GetImageResult, LayerInfo};
use cstor_proxy_client::{Client, Error, HelperConfig, Privilege, StorageSelection};

/// Move container images out of containers-storage, zero-copy, through cstor-helper.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Storage root (graphroot); default: storage.conf as podman reads it.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Run root.
    #[arg(long, global = true, value_name = "DIR")]
    runroot: Option<PathBuf>,
    /// Separate image store.
    #[arg(long, global = true, value_name = "DIR")]
    imagestore: Option<PathBuf>,
    /// Storage driver (only overlay is supported).
    #[arg(long, global = true, value_name = "NAME")]
    storage_driver: Option<String>,
    /// Storage driver option (repeatable), replacing storage.conf's.
    #[arg(long = "storage-opt", global = true, value_name = "OPT")]
    storage_opts: Vec<String>,
    /// Additional read-only image store (repeatable).
    #[arg(long = "additional-image-store", global = true, value_name = "DIR")]
    additional_image_stores: Vec<PathBuf>,
    /// Read only this storage.conf.
    #[arg(long, global = true, value_name = "FILE")]
    storage_conf: Option<PathBuf>,
    /// The helper binary (default: $CSTOR_HELPER, next to cstor, then $PATH).
    #[arg(long, global = true, value_name = "PATH")]
    helper: Option<PathBuf>,
    /// How to run the helper: directly (root), under `podman unshare` (rootless), or decide.
    #[arg(long, global = true, value_enum, default_value_t = PrivilegeArg::Auto)]
    privilege: PrivilegeArg,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PrivilegeArg {
    Auto,
    Direct,
    Unshare,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List images.
    Images,
    /// Show an image: id, names, digests, layers.
    Inspect {
        /// Image reference, with or without `containers-storage:`.
        image: String,
    },
    /// Write one layer's uncompressed tar, bit-exact, to stdout (or --output).
    LayerTar {
        /// Image reference.
        image: String,
        /// Layer index (0 = base) or diff id (sha256:...).
        layer: String,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Rebuild every layer of an image and check its CRCs and diff id.
    Verify {
        /// Image reference.
        image: String,
    },
    /// Import an image into a composefs repository, zero-copy where the filesystem allows.
    Import {
        /// Image reference, with or without `containers-storage:`.
        image: String,
        /// The composefs repository (default: /sysroot/composefs as root, else
        /// ~/.var/lib/composefs, like cfsctl).
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
        /// Create the repository if it does not exist (as `cfsctl init` does; insecure
        /// when the filesystem has no fs-verity).
        #[arg(long)]
        init: bool,
        /// Tag to write (default: containers-storage:IMAGE, as `cfsctl oci pull` names it).
        #[arg(long, value_name = "NAME")]
        tag: Option<String>,
        /// How file contents get into the repository.
        #[arg(long, value_enum, default_value_t = CopyPolicyArg::ReflinkOrCopy)]
        copy_policy: CopyPolicyArg,
        /// Threads storing objects (default: the number of CPUs).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
    },
    /// Mount an imported image read-only (composefs; needs root). Unmount with umount.
    Mount {
        /// The tag given at import (e.g. containers-storage:localhost/myimage).
        tag: String,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// The composefs repository (same default as import).
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CopyPolicyArg {
    /// Reflink where possible, copy otherwise.
    ReflinkOrCopy,
    /// Reflink or fail (exit status 7).
    ReflinkOnly,
    /// Always copy.
    Copy,
    /// Reflink where possible, else hardlink the layer file itself (privileged callers,
    /// insecure repositories; the object shares podman's inode), else copy.
    ReflinkOrHardlink,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Splits `containers-storage:[overlay@G+R]IMAGE`: the selector configures the helper.
fn storage_for(g: &Global, reference: Option<&str>) -> Result<StorageSelection> {
    let mut s = StorageSelection {
        graphroot: g.root.clone(),
        runroot: g.runroot.clone(),
        imagestore: g.imagestore.clone(),
        driver: g.storage_driver.clone(),
        storage_opts: g.storage_opts.clone(),
        additional_image_stores: g.additional_image_stores.clone(),
        storage_conf: g.storage_conf.clone(),
    };
    if let Some(r) = reference {
        let (spec, _) = cstor_proxy_client::protocol::reference::split_store(r)
            .map_err(|m| anyhow!("invalid image reference {r:?}: {m}"))?;
        if let Some(spec) = spec {
            s.graphroot = spec.graphroot.or(s.graphroot);
            s.runroot = spec.runroot.or(s.runroot);
            s.driver = spec.driver.or(s.driver);
            if !spec.options.is_empty() {
                s.storage_opts = spec.options;
            }
        }
    }
    Ok(s)
}

async fn connect(g: &Global, reference: Option<&str>) -> Result<Client> {
    let mut extra: Vec<OsString> = Vec::new();
    if g.verbose > 1 {
        extra.push("-v".into());
    }
    let config = HelperConfig {
        program: g.helper.clone(),
        storage: storage_for(g, reference)?,
        privilege: match g.privilege {
            PrivilegeArg::Auto => Privilege::Auto,
            PrivilegeArg::Direct => Privilege::Direct,
            PrivilegeArg::Unshare => Privilege::PodmanUnshare,
        },
        extra_args: extra,
        ..HelperConfig::default()
    };
    Ok(Client::spawn(&config).await?)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.get(..12).unwrap_or(id)
}

fn pick_layer<'a>(image: &'a GetImageResult, which: &str) -> Result<&'a LayerInfo> {
    if let Ok(i) = which.parse::<usize>() {
        return image.layers.get(i).ok_or_else(|| {
            anyhow!(
                "image {} has {} layers; index {i} does not exist",
                short(&image.id),
                image.layers.len()
            )
        });
    }
    image
        .layers
        .iter()
        .find(|l| l.diff_id.as_deref() == Some(which) || l.id == which)
        .ok_or_else(|| anyhow!("image {} has no layer {which}", short(&image.id)))
}

async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match &cli.command {
        Command::Images => {
            let client = connect(g, None).await?;
            let images = client.list_images().await.context("listing images")?;
            if g.json {
                print_json(&images)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{:<12}  {:<30}  NAMES", "IMAGE ID", "CREATED")?;
                for i in &images {
                    let names = if i.names.is_empty() {
                        "<none>".to_owned()
                    } else {
                        i.names.join(", ")
                    };
                    writeln!(
                        out,
                        "{:<12}  {:<30}  {names}",
                        short(&i.id),
                        i.created.as_deref().unwrap_or("-")
                    )?;
                }
            }
            client.shutdown().await?;
        }
        Command::Inspect { image } => {
            let client = connect(g, Some(image)).await?;
            let img = client
                .get_image(image)
                .await
                .with_context(|| format!("inspecting {image}"))?;
            if g.json {
                print_json(&img)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "Id:       {}", img.id)?;
                writeln!(out, "Names:    {}", img.names.join(", "))?;
                writeln!(out, "Store:    {}", img.store)?;
                writeln!(
                    out,
                    "Manifest: {} ({} bytes)",
                    img.manifest.digest, img.manifest.size
                )?;
                writeln!(
                    out,
                    "Config:   {} ({} bytes)",
                    img.config.digest, img.config.size
                )?;
                writeln!(out, "Layers:")?;
                for (i, l) in img.layers.iter().enumerate() {
                    writeln!(
                        out,
                        "  {i:>3}  {}  {:>12} bytes  layer {}{}",
                        l.diff_id.as_deref().unwrap_or("(no diff id)"),
                        l.diff_size
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "?".into()),
                        short(&l.id),
                        if l.tar_split { "" } else { "  (no tar-split)" }
                    )?;
                }
            }
            client.shutdown().await?;
        }
        Command::LayerTar {
            image,
            layer,
            output,
        } => {
            let client = connect(g, Some(image)).await?;
            let img = client
                .get_image(image)
                .await
                .with_context(|| format!("inspecting {image}"))?;
            let l = pick_layer(&img, layer)?;
            let opened = client
                .open_layer(&l.id)
                .await
                .with_context(|| format!("opening layer {}", l.id))?;
            let sink: Box<dyn Write + Send> = match output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::io::stdout(),
                )),
            };
            let (tar, _) = opened
                .write_tar(sink)
                .await
                .with_context(|| format!("exporting layer {}", l.id))?;
            tracing::info!(digest = %tar.digest, size = tar.size, "layer written");
            if g.json && output.is_some() {
                print_json(
                    &serde_json::json!({"digest": tar.digest, "size": tar.size, "entries": tar.summary.entries}),
                )?;
            }
            client.shutdown().await?;
        }
        Command::Verify { image } => {
            let client = connect(g, Some(image)).await?;
            let img = client
                .get_image(image)
                .await
                .with_context(|| format!("inspecting {image}"))?;
            let mut results = Vec::new();
            for (i, l) in img.layers.iter().enumerate() {
                let opened = client
                    .open_layer(&l.id)
                    .await
                    .with_context(|| format!("opening layer {}", l.id))?;
                let (tar, _) = opened
                    .write_tar(std::io::sink())
                    .await
                    .with_context(|| format!("verifying layer {i} ({})", l.id))?;
                if !g.json {
                    writeln!(
                        std::io::stdout().lock(),
                        "layer {i:>3}  {}  {} bytes  {} entries  ok",
                        tar.digest,
                        tar.size,
                        tar.summary.entries
                    )?;
                }
                results.push(serde_json::json!({
                    "index": i, "layer": l.id, "diff_id": tar.digest, "size": tar.size,
                    "entries": tar.summary.entries, "files": tar.summary.files, "ok": true,
                }));
            }
            if g.json {
                print_json(&serde_json::json!({"image": img.id, "layers": results}))?;
            } else {
                writeln!(
                    std::io::stdout().lock(),
                    "{}: all {} layers verified",
                    short(&img.id),
                    img.layers.len()
                )?;
            }
            client.shutdown().await?;
        }
        Command::Mount {
            tag,
            mountpoint,
            repo,
        } => {
            let path = repo_path(repo.as_deref())?;
            let erofs = match import::repository_algorithm(&path)? {
                RepoAlgorithm::Sha512 => {
                    mount::<composefs::fsverity::Sha512HashValue>(&path, tag, mountpoint)?
                }
                RepoAlgorithm::Sha256 => {
                    mount::<composefs::fsverity::Sha256HashValue>(&path, tag, mountpoint)?
                }
            };
            if g.json {
                print_json(
                    &serde_json::json!({"tag": tag, "image": erofs, "mountpoint": mountpoint}),
                )?;
            } else {
                writeln!(
                    std::io::stdout().lock(),
                    "{tag} (image {}) mounted on {}",
                    short(&erofs),
                    mountpoint.display()
                )?;
            }
        }
        Command::Import {
            image,
            repo,
            init,
            tag,
            copy_policy,
            jobs,
        } => {
            let path = repo_path(repo.as_deref())?;
            if *init {
                let outcome = import::init_repository(&path)?;
                tracing::info!(repo = %path.display(), ?outcome, "repository");
                if outcome == import::InitOutcome::CreatedInsecure && !g.json {
                    eprintln!(
                        "cstor: created {} in insecure mode: the filesystem has no fs-verity",
                        path.display()
                    );
                }
            }
            let options = ImportOptions {
                tag: tag.clone(),
                copy_policy: match copy_policy {
                    CopyPolicyArg::ReflinkOrCopy => CopyPolicy::ReflinkOrCopy,
                    CopyPolicyArg::ReflinkOnly => CopyPolicy::ReflinkOnly,
                    CopyPolicyArg::Copy => CopyPolicy::CopyOnly,
                    CopyPolicyArg::ReflinkOrHardlink => CopyPolicy::ReflinkOrHardlink,
                },
                object_threads: *jobs,
                ..ImportOptions::default()
            };
            let client = connect(g, Some(image)).await?;
            let summary = match import::repository_algorithm(&path)? {
                RepoAlgorithm::Sha512 => {
                    run_import::<composefs::fsverity::Sha512HashValue>(
                        g, &client, &path, image, options,
                    )
                    .await?
                }
                RepoAlgorithm::Sha256 => {
                    run_import::<composefs::fsverity::Sha256HashValue>(
                        g, &client, &path, image, options,
                    )
                    .await?
                }
            };
            if g.json {
                print_json(&summary)?;
            } else {
                print_summary(&summary)?;
            }
            client.shutdown().await?;
        }
    }
    Ok(())
}

/// The repository to use: the given one, else cfsctl's default for this user.
fn repo_path(repo: Option<&std::path::Path>) -> Result<PathBuf> {
    Ok(match repo {
        Some(p) => p.to_owned(),
        None if rustix::process::geteuid().is_root() => composefs::repository::system_path(),
        None => {
            composefs::repository::user_path().context("finding the user's composefs repository")?
        }
    })
}

fn mount<ObjectID: composefs::fsverity::FsVerityHashValue>(
    path: &std::path::Path,
    tag: &str,
    mountpoint: &std::path::Path,
) -> Result<String> {
    let repo = import::open_repository::<ObjectID>(path)?;
    let image = composefs_oci::OciImage::open_ref(&repo, tag)
        .with_context(|| format!("looking up {tag} in {}", path.display()))?;
    let erofs = image
        .image_ref(repo.erofs_version())
        .ok_or_else(|| anyhow!("{tag} has no EROFS image; import it again"))?
        .to_hex();
    repo.mount_at(
        &erofs,
        mountpoint,
        &composefs::mount::MountOptions::default(),
    )
    .with_context(|| format!("mounting {tag} on {}", mountpoint.display()))?;
    Ok(erofs)
}

/// The import report with object ids as hex, for printing and `--json`.
#[derive(Debug, serde::Serialize)]
struct ImportSummary {
    reference: String,
    image_id: String,
    repository: String,
    tag: String,
    manifest_digest: String,
    manifest_verity: String,
    config_digest: String,
    config_verity: String,
    erofs_image: String,
    already_complete: bool,
    has_usr: Option<bool>,
    erofs_tree: Option<import::TreeSource>,
    objects: import::ObjectStats,
    first_reflink_fallback: Option<String>,
    elapsed_seconds: f64,
    layers: Vec<LayerSummary>,
}

#[derive(Debug, serde::Serialize)]
struct LayerSummary {
    index: usize,
    diff_id: String,
    layer_id: String,
    bytes: u64,
    verity: String,
    skipped: bool,
    objects: import::ObjectStats,
    elapsed_seconds: f64,
}

async fn run_import<ObjectID: composefs::fsverity::FsVerityHashValue>(
    g: &Global,
    client: &Client,
    path: &std::path::Path,
    image: &str,
    mut options: ImportOptions,
) -> Result<ImportSummary> {
    let repo = import::open_repository::<ObjectID>(path)?;
    let interactive = !g.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = if interactive {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        options.progress = Some(tx);
        Some(tokio::spawn(show_progress(rx)))
    } else {
        None
    };
    let r = import::import_image(client, &repo, image, &options).await;
    drop(options);
    if let Some(p) = progress {
        let _ = p.await;
    }
    let r = r.with_context(|| format!("importing {image} into {}", path.display()))?;
    Ok(ImportSummary {
        reference: r.reference.clone(),
        image_id: r.image_id.clone(),
        repository: path.display().to_string(),
        tag: r.tag.clone(),
        manifest_digest: r.pull.manifest_digest.to_string(),
        manifest_verity: r.pull.manifest_verity.to_hex(),
        config_digest: r.pull.config_digest.to_string(),
        config_verity: r.pull.config_verity.to_hex(),
        erofs_image: r.erofs_image.to_hex(),
        already_complete: r.already_complete,
        has_usr: r.has_usr,
        erofs_tree: r.tree,
        objects: r.objects,
        first_reflink_fallback: r.first_reflink_fallback.clone(),
        elapsed_seconds: r.elapsed.as_secs_f64(),
        layers: r
            .layers
            .iter()
            .map(|l| LayerSummary {
                index: l.index,
                diff_id: l.diff_id.clone(),
                layer_id: l.layer_id.clone(),
                bytes: l.bytes,
                verity: l.verity.to_hex(),
                skipped: l.skipped,
                objects: l.stats,
                elapsed_seconds: l.elapsed.as_secs_f64(),
            })
            .collect(),
    })
}

async fn show_progress(mut rx: tokio::sync::mpsc::UnboundedReceiver<ImportEvent>) {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let total = multi.add(
        ProgressBar::new(0)
            .with_style(style.clone())
            .with_prefix("total"),
    );
    let mut bars = std::collections::HashMap::new();
    while let Some(e) = rx.recv().await {
        match e {
            ImportEvent::Started {
                bytes,
                bytes_present,
                layers_present,
                ..
            } => {
                total.set_length(bytes);
                total.set_position(bytes_present);
                if layers_present > 0 {
                    total.set_message(format!("{layers_present} layers already present"));
                }
            }
            ImportEvent::LayerStarted {
                index,
                diff_id,
                bytes,
            } => {
                let b = multi.add(
                    ProgressBar::new(bytes)
                        .with_style(style.clone())
                        .with_prefix(format!("layer {index}"))
                        .with_message(short(&diff_id).to_owned()),
                );
                bars.insert(index, (b, 0u64));
            }
            ImportEvent::LayerProgress { index, bytes_done } => {
                if let Some((b, last)) = bars.get_mut(&index) {
                    total.inc(bytes_done.saturating_sub(*last));
                    *last = bytes_done;
                    b.set_position(bytes_done);
                }
            }
            ImportEvent::LayerDone { index, bytes, .. } => {
                if let Some((b, last)) = bars.remove(&index) {
                    total.inc(bytes.saturating_sub(last));
                    b.finish_and_clear();
                }
            }
            ImportEvent::LayerSkipped { .. } => {}
            ImportEvent::Finalizing => total.set_message("writing the EROFS image"),
            ImportEvent::Finished => total.finish_and_clear(),
        }
    }
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

fn print_summary(s: &ImportSummary) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let o = &s.objects;
    let skipped = s.layers.iter().filter(|l| l.skipped).count();
    writeln!(
        out,
        "{} {} (image {}) into {} as {}",
        if s.already_complete {
            "Already imported"
        } else {
            "Imported"
        },
        s.reference,
        short(&s.image_id),
        s.repository,
        s.tag
    )?;
    writeln!(
        out,
        "  layers:   {} ({} already present)",
        s.layers.len(),
        skipped
    )?;
    writeln!(
        out,
        "  objects:  {} reflinked ({}), {} copied ({}),{} {} already present ({}), {} inline ({} with headers)",
        o.reflinked,
        human(o.bytes_reflinked),
        o.copied,
        human(o.bytes_copied),
        if o.hardlinked > 0 {
            format!(
                " {} hardlinked ({}),",
                o.hardlinked,
                human(o.bytes_hardlinked)
            )
        } else {
            String::new()
        },
        o.present,
        human(o.bytes_present),
        o.inlined,
        human(o.bytes_inlined)
    )?;
    if let Some(why) = &s.first_reflink_fallback {
        writeln!(out, "  copied because: {why}")?;
    }
    writeln!(
        out,
        "  manifest: {} (verity {})",
        s.manifest_digest, s.manifest_verity
    )?;
    writeln!(
        out,
        "  config:   {} (verity {})",
        s.config_digest, s.config_verity
    )?;
    writeln!(out, "  image:    {}", s.erofs_image)?;
    if s.has_usr == Some(false) {
        writeln!(
            out,
            "  note:     the image has no /usr; its root directory keeps the tar's own metadata"
        )?;
    }
    writeln!(out, "  time:     {:.2} s", s.elapsed_seconds)?;
    Ok(())
}

/// Exit code for a reader that went away (128 + SIGPIPE), as shells report it.
const EXIT_PIPE: u8 = 141;

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<Error>(),
            Some(Error::Assemble {
                cause: cstor_proxy_client::protocol::assemble::AssembleError::Write(w),
                ..
            }) if w.kind() == std::io::ErrorKind::BrokenPipe
        ) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|w| w.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if broken_pipe(e) {
        return EXIT_PIPE;
    }
    for cause in e.chain() {
        if let Some(err) = cause.downcast_ref::<Error>() {
            return match err {
                Error::ReflinkRequired { .. } => 7,
                Error::HelperNotFound(_) | Error::Spawn { .. } | Error::HelperDied { .. } => 5,
                Error::DigestMismatch { .. } | Error::Assemble { .. } => 4,
                Error::Timeout { .. } => 6,
                _ => match err.code() {
                    Some(
                        ErrorCode::ImageNotFound
                        | ErrorCode::LayerNotFound
                        | ErrorCode::AmbiguousReference
                        | ErrorCode::InvalidReference,
                    ) => 3,
                    Some(ErrorCode::ChecksumMismatch | ErrorCode::MissingFile) => 4,
                    Some(ErrorCode::LockTimeout) => 6,
                    _ => 1,
                },
            };
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    // While this is the only thread (see reserve_fd_table): an import of two layers holds
    // about 1,200 fds.
    cstor_proxy_client::reserve_fd_table(4096);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cstor: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            if code != EXIT_PIPE {
                eprintln!("cstor: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
