//! `cstor-bench-protocol`: protocol-only throughput.
//!
//! Starts a helper with `cstor-proxy-client` (`Client::spawn`), resolves an image, then for
//! each layer opens it (`open_layer`), reads every record of its stream (`take_reader`) and
//! takes every content fd the helper passes (`take_contents`), closing each at once without
//! reading a byte of content. What is left is the cost of the protocol itself: tar-split
//! parsing and confined opens in the helper, the binary stream, SCM_RIGHTS batches.
//!
//! Prints one JSON object: per layer and in total, entries, content fds, metadata bytes and
//! seconds, and files per second (streaming time only; the helper start is reported apart).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cstor_proxy_client::protocol::assemble::ContentSource;
use cstor_proxy_client::protocol::stream::Record;
use cstor_proxy_client::{Client, HelperConfig, Privilege, StorageSelection};

#[derive(Parser, Debug)]
#[command(about = "Stream every layer's metadata and content fds of IMAGE without reading data")]
struct Args {
    /// Storage root (graphroot); default: storage.conf as podman reads it.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Run root.
    #[arg(long)]
    runroot: Option<PathBuf>,
    /// The helper binary (default: $CSTOR_HELPER, next to this program, then $PATH).
    #[arg(long)]
    helper: Option<PathBuf>,
    /// How to run the helper: auto, direct or unshare.
    #[arg(long, default_value = "auto")]
    privilege: String,
    /// The image.
    image: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let privilege = match args.privilege.as_str() {
        "auto" => Privilege::Auto,
        "direct" => Privilege::Direct,
        "unshare" => Privilege::PodmanUnshare,
        other => bail!("--privilege: auto, direct or unshare, not {other:?}"),
    };
    let mut storage = StorageSelection::default();
    storage.graphroot = args.root.clone();
    storage.runroot = args.runroot.clone();
    let mut config = HelperConfig::default()
        .storage(storage)
        .privilege(privilege);
    config.program = args.helper.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(run(config, &args.image))
}

async fn run(config: HelperConfig, image: &str) -> Result<()> {
    let start = Instant::now();
    let client = Client::spawn(&config)
        .await
        .context("starting the helper")?;
    let spawn_seconds = start.elapsed().as_secs_f64();
    let img = client
        .get_image(image)
        .await
        .with_context(|| format!("resolving {image}"))?;
    let stream_start = Instant::now();
    let mut layers = Vec::new();
    let (mut entries, mut fds, mut meta) = (0u64, 0u64, 0u64);
    for info in &img.layers {
        let t = Instant::now();
        let mut layer = client
            .open_layer(&info.id)
            .await
            .with_context(|| format!("opening layer {}", info.id))?;
        let reader = layer.take_reader().context("no stream")?;
        let mut contents = layer.take_contents().context("no contents")?;
        let id = info.id.clone();
        let counts = tokio::task::spawn_blocking(move || -> Result<(u64, u64, u64)> {
            let mut reader = reader;
            let (mut e, mut f, mut m) = (0u64, 0u64, 0u64);
            loop {
                match reader
                    .next_record()
                    .with_context(|| format!("reading the stream of layer {id}"))?
                {
                    Some(Record::Segment(bytes)) => m += bytes.len() as u64,
                    Some(Record::File(entry)) => {
                        e += 1;
                        m += entry.name.len() as u64 + 24;
                        if let Some(fd) = entry.fd {
                            // Take the fd and close it at once.
                            drop(
                                contents
                                    .content(fd)
                                    .with_context(|| format!("content fd {fd} of layer {id}"))?,
                            );
                            f += 1;
                        }
                    }
                    Some(Record::End(summary)) => {
                        if summary.entries != e || summary.fds != f {
                            bail!(
                                "layer {id}: END says {} entries and {} fds, saw {e} and {f}",
                                summary.entries,
                                summary.fds
                            );
                        }
                        return Ok((e, f, m));
                    }
                    None => bail!("layer {id}: the stream ended without END"),
                }
            }
        })
        .await
        .context("joining the stream reader")??;
        layer.release().await.context("releasing the layer")?;
        let seconds = t.elapsed().as_secs_f64();
        entries += counts.0;
        fds += counts.1;
        meta += counts.2;
        layers.push(serde_json::json!({
            "layer": info.id,
            "entries": counts.0,
            "fds": counts.1,
            "metadata_bytes": counts.2,
            "seconds": seconds,
            "fds_per_second": counts.1 as f64 / seconds.max(1e-9),
        }));
    }
    let seconds = stream_start.elapsed().as_secs_f64();
    client.shutdown().await.context("stopping the helper")?;
    let report = serde_json::json!({
        "image": img.id,
        "spawn_seconds": spawn_seconds,
        "seconds": seconds,
        "entries": entries,
        "fds": fds,
        "metadata_bytes": meta,
        "fds_per_second": fds as f64 / seconds.max(1e-9),
        "entries_per_second": entries as f64 / seconds.max(1e-9),
        "total_seconds": start.elapsed().as_secs_f64(),
        "layers": layers,
    });
    println!("{report}");
    Ok(())
}
