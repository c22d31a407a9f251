//! `cstor`: look at and export images of containers-storage through `cstor-helper`.
//!
//! Exit codes: 0 success; 1 other failure; 2 command-line error; 3 image or layer not found
//! (or an invalid/ambiguous reference); 4 verification failed (a CRC, size or digest did not
//! match); 5 the helper could not be started or died; 6 storage busy (a lock stayed held),
//! retry later; 141 stdout was closed early (e.g. `cstor layer-tar ... | head`), silently, as
//! for a process killed by SIGPIPE.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
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
                    println!(
                        "layer {i:>3}  {}  {} bytes  {} entries  ok",
                        tar.digest, tar.size, tar.summary.entries
                    );
                }
                results.push(serde_json::json!({
                    "index": i, "layer": l.id, "diff_id": tar.digest, "size": tar.size,
                    "entries": tar.summary.entries, "files": tar.summary.files, "ok": true,
                }));
            }
            if g.json {
                print_json(&serde_json::json!({"image": img.id, "layers": results}))?;
            } else {
                println!(
                    "{}: all {} layers verified",
                    short(&img.id),
                    img.layers.len()
                );
            }
            client.shutdown().await?;
        }
    }
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
