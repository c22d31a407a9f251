//! `cstor-bench-varlink`: the helper's varlink producer (`cstor-helper --varlink`, composefs'
//! `org.composefs.Oci.GetLayer`) as upstream's consumer reads it.
//!
//! Connects to a running helper's socket, resolves an image's layers from the storage's own
//! records (as composefs-oci's containers-storage import does: the image's config gives the
//! diff ids, the layer chain gives the storage layer ids) and asks for each layer by storage
//! locator, with composefs-oci's `OciProxy`, collecting every reply's fds as its consumer does.
//!
//! - `--mode protocol`: reads every splitdirfdstream record with upstream's reader, and opens
//!   every referenced file beneath its passed directory fd (`openat2` with `RESOLVE_BENEATH`,
//!   read-only, upstream's `open_beneath`) and closes it without reading a byte: the work a
//!   consumer must do to hold the fd that the JSON-RPC protocol passes over `SCM_RIGHTS`, so
//!   that this and `cstor-bench-protocol` measure two producers doing the same consumer work.
//!   Tar headers are walked to count entries as that tool does. Prints one JSON object with
//!   its fields (`fds` are the files named by reference; those sent inline are apart).
//! - `--mode import`: the whole consumer work of composefs-oci's containers-storage import,
//!   with our producer in place of its own: every layer drained with
//!   `drain_splitdirfdstream_verified` into `--repo` (one layer at a time, reflinking where
//!   it can, as `cfsctl oci pull --local-fetch auto` does), then `finalize_oci_image` with
//!   the image's manifest and config from the storage (config and manifest streams, EROFS
//!   image, tag `bench`).
//!
//! The helper is started (and stopped) by the caller, once for many runs, as a service is;
//! `spawn_seconds` is the time to connect to it and ask `GetInfo`. `seconds` counts from the
//! first `GetLayer` to the last layer done (and, importing, the finalize).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use composefs::fsverity::{FsVerityHashValue, Sha512HashValue};
use composefs::repository::{ImportContext, Repository};
use composefs_oci::OciDigest;
use composefs_oci::varlink_types::{GetLayerParams, OciProxy as _, StorageLocator};
use composefs_splitdirfdstream::{Chunk, SplitdirfdstreamReader, open_beneath};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    about = "Read every layer of IMAGE from `cstor-helper --varlink` with upstream's consumer"
)]
struct Args {
    /// The helper's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Storage root (graphroot) holding the image, spelled as the helper serves it.
    #[arg(long)]
    root: PathBuf,
    /// protocol: records and fds only; import: upstream's drain into --repo.
    #[arg(long, value_enum, default_value = "protocol")]
    mode: Mode,
    /// The repository to import into (`--mode import`; made beforehand, e.g. `cfsctl init`).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// What to tell the helper about this process' rights (`consumer_has_cap_dac_override`):
    /// auto is yes for root.
    #[arg(long, value_enum, default_value = "auto")]
    dac_override: DacOverride,
    /// The image: an id or a name as the storage lists it.
    image: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Protocol,
    Import,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DacOverride {
    Auto,
    Yes,
    No,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.mode == Mode::Import && args.repo.is_none() {
        bail!("--mode import needs --repo");
    }
    // One thread drives the connection, blocking work (the reads) goes to spawn_blocking:
    // the shape of protocol.rs and of composefs-oci's own import.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(run(args))
}

/// One layer as upstream's consumer names it.
struct Layer {
    id: String,
    diff_id: String,
}

/// The image as the storage records it.
struct Image {
    id: String,
    layers: Vec<Layer>,
    config_json: Vec<u8>,
    manifest_json: Vec<u8>,
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Resolves `image` from `root`'s `overlay-images` and `overlay-layers` records, read
/// without podman's locks (the bench's storage does not change while it runs). The config
/// is the image's big-data item `sha256:<id>`, the manifest its item `manifest`.
fn resolve(root: &Path, image: &str) -> Result<Image> {
    let images = read_json(&root.join("overlay-images/images.json"))?;
    let wanted = image.strip_prefix("sha256:").unwrap_or(image);
    let record = images
        .as_array()
        .context("images.json is not an array")?
        .iter()
        .find(|i| {
            i["id"].as_str() == Some(wanted)
                || i["names"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(image)))
        })
        .with_context(|| format!("no image {image} in {}", root.display()))?;
    let id = record["id"]
        .as_str()
        .context("an image without id")?
        .to_owned();
    let dir = root.join("overlay-images").join(&id);
    let key = base64::engine::general_purpose::STANDARD.encode(format!("sha256:{id}"));
    let config_path = dir.join(format!("={key}"));
    let config_json = std::fs::read(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let manifest_json = std::fs::read(dir.join("manifest"))
        .with_context(|| format!("reading the manifest of {id}"))?;
    let config: Value = serde_json::from_slice(&config_json).context("parsing the config")?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("the config has no rootfs.diff_ids")?
        .iter()
        .map(|d| d.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .context("a diff id that is not a string")?;

    // The chain from the image's top layer down its parents, then base first.
    let layers = read_json(&root.join("overlay-layers/layers.json"))?;
    let layers = layers.as_array().context("layers.json is not an array")?;
    let mut chain = Vec::new();
    let mut next = record["layer"].as_str().map(str::to_owned);
    while let Some(layer_id) = next {
        let l = layers
            .iter()
            .find(|l| l["id"].as_str() == Some(&layer_id))
            .with_context(|| format!("layer {layer_id} is not in layers.json"))?;
        chain.push(Layer {
            id: layer_id,
            diff_id: l["diff-digest"].as_str().unwrap_or_default().to_owned(),
        });
        next = l["parent"].as_str().map(str::to_owned);
    }
    chain.reverse();
    ensure!(
        chain.len() == diff_ids.len() && chain.iter().zip(&diff_ids).all(|(l, d)| l.diff_id == *d),
        "the layer chain of {id} does not match its config's diff ids"
    );
    Ok(Image {
        id,
        layers: chain,
        config_json,
        manifest_json,
    })
}

/// What `GetLayer` handed over, split as composefs-oci's consumer splits it: the stream's
/// pipe, `dir_count` directories, then the lifetime fds (held until the layer is done).
struct Fetched {
    pipe: OwnedFd,
    dirs: Vec<OwnedFd>,
    lifetime: Vec<OwnedFd>,
}

async fn get_layer(
    conn: &mut zlink::tokio::unix::Connection,
    params: GetLayerParams,
) -> Result<Fetched> {
    use zlink::futures_util::StreamExt as _;
    let stream = conn
        .get_layer(0, params)
        .await
        .map_err(|e| anyhow::anyhow!("GetLayer: {e:?}"))?;
    let mut stream = std::pin::pin!(stream);
    let mut fds = Vec::new();
    let mut dir_count = None;
    while let Some(item) = stream.next().await {
        let (reply, batch) = item.map_err(|e| anyhow::anyhow!("GetLayer: {e:?}"))?;
        let reply = reply.map_err(|e| anyhow::anyhow!("GetLayer failed: {e:?}"))?;
        dir_count = Some(reply.dir_count as usize);
        // zlink 0.7 receives fds without close-on-exec; a consumer must set it (docs/varlink.md
        // section 6), so its cost belongs to the consumer's work.
        for fd in &batch {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)
                .context("setting FD_CLOEXEC")?;
        }
        fds.extend(batch);
    }
    let dir_count = dir_count.context("GetLayer gave no reply")?;
    ensure!(
        fds.len() >= dir_count + 2,
        "GetLayer passed {} fds for {dir_count} directories",
        fds.len()
    );
    let mut it = fds.into_iter();
    let pipe = it.next().context("no pipe")?;
    let dirs = it.by_ref().take(dir_count).collect();
    Ok(Fetched {
        pipe,
        dirs,
        lifetime: it.collect(),
    })
}

/// Counts tar entries in a layer stream whose file contents arrive as records of their own:
/// the metadata records hold headers, extended headers with their data, padding and the end
/// blocks; a content record stands for a file's data (its padding follows in metadata).
#[derive(Default)]
struct TarEntries {
    entries: u64,
    /// Bytes still to pass before the next header: extended header data or a file's data
    /// and padding.
    skip: u64,
    header: Vec<u8>,
}

impl TarEntries {
    fn metadata(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (512 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 512 {
                let header = std::mem::take(&mut self.header);
                self.header_block(&header)?;
            }
        }
        Ok(())
    }

    fn header_block(&mut self, h: &[u8]) -> Result<()> {
        if h.iter().all(|&b| b == 0) {
            return Ok(()); // an end-of-archive block
        }
        let size = tar_size(&h[124..136])?;
        let padded = size.div_ceil(512) * 512;
        match h[156] {
            // Extended headers (pax, GNU long names): their data follows, then the header
            // of the entry they describe.
            b'x' | b'g' | b'L' | b'K' => self.skip = padded,
            // Entries whose size is not data in the archive (links, dirs, devices, fifos).
            b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => self.entries += 1,
            _ => {
                self.entries += 1;
                self.skip = padded;
            }
        }
        Ok(())
    }

    /// A content record of `length` bytes: a file's data, in place of the archive's bytes.
    fn content(&mut self, length: u64) -> Result<()> {
        ensure!(
            self.header.is_empty() && self.skip >= length,
            "a content record of {length} bytes where the tar stream expects {} bytes of data",
            self.skip
        );
        self.skip -= length;
        Ok(())
    }
}

/// A tar header's size field: octal, or base-256 when its high bit is set.
fn tar_size(field: &[u8]) -> Result<u64> {
    if field[0] & 0x80 != 0 {
        return Ok(field[1..]
            .iter()
            .fold(0u64, |n, &b| (n << 8) | u64::from(b)));
    }
    let text = std::str::from_utf8(field).context("a tar size that is not text")?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).with_context(|| format!("tar size {text:?}"))
}

/// What one layer's stream held.
#[derive(Default)]
struct Counts {
    entries: u64,
    /// Files named by reference, each opened beneath its directory and closed.
    fds: u64,
    /// Files sent in the stream (the consumer could not open them itself).
    inline: u64,
    inline_bytes: u64,
    /// Stream bytes other than file contents: metadata records, record headers, names.
    metadata_bytes: u64,
}

/// Reads a layer's stream to its end, opening (and closing) every named file.
fn read_layer(fetched: Fetched) -> Result<Counts> {
    let Fetched {
        pipe,
        dirs,
        lifetime,
    } = fetched;
    let mut reader = SplitdirfdstreamReader::new(std::fs::File::from(pipe));
    let mut tar = TarEntries::default();
    let mut c = Counts::default();
    while let Some(chunk) = reader.next_chunk().context("reading the stream")? {
        match chunk {
            Chunk::Metadata(bytes) => {
                c.metadata_bytes += 5 + bytes.len() as u64;
                tar.metadata(bytes)?;
            }
            Chunk::InlineData(bytes) => {
                c.metadata_bytes += 5;
                c.inline += 1;
                c.inline_bytes += bytes.len() as u64;
                tar.content(bytes.len() as u64)?;
            }
            Chunk::FileBackedData {
                dirfd_index,
                length,
                filename,
            } => {
                c.metadata_bytes += 17 + filename.len() as u64;
                let dir = dirs
                    .get(dirfd_index as usize)
                    .with_context(|| format!("no directory {dirfd_index}"))?;
                drop(
                    open_beneath(dir.as_fd(), filename).with_context(|| {
                        format!("opening {}", String::from_utf8_lossy(filename))
                    })?,
                );
                c.fds += 1;
                tar.content(length)?;
            }
        }
    }
    ensure!(
        tar.skip == 0 && tar.header.is_empty(),
        "the stream ended inside a tar entry"
    );
    c.entries = tar.entries;
    // The layer is done: its locks go with the lifetime fds.
    drop(lifetime);
    Ok(c)
}

fn locator(root: &Path, layer: &Layer, dac_override: bool) -> GetLayerParams {
    GetLayerParams {
        diff_id: None,
        storage: Some(StorageLocator {
            storage_path: root.to_string_lossy().into_owned(),
            layer_id: layer.id.clone(),
        }),
        consumer_has_cap_dac_override: dac_override,
    }
}

async fn run(args: Args) -> Result<()> {
    let t = Instant::now();
    let image = resolve(&args.root, &args.image)?;
    let resolve_seconds = t.elapsed().as_secs_f64();
    let dac_override = match args.dac_override {
        DacOverride::Auto => rustix::process::geteuid().is_root(),
        DacOverride::Yes => true,
        DacOverride::No => false,
    };

    let t = Instant::now();
    let mut conn = zlink::tokio::unix::connect(&args.socket)
        .await
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    let info = conn
        .get_info()
        .await
        .map_err(|e| anyhow::anyhow!("GetInfo: {e:?}"))?
        .map_err(|e| anyhow::anyhow!("GetInfo failed: {e:?}"))?;
    ensure!(
        info.features.iter().any(|f| f == "splitdirfdstream-v0"),
        "the service does not serve splitdirfdstream-v0: {:?}",
        info.features
    );
    let spawn_seconds = t.elapsed().as_secs_f64();

    let mut report = match args.mode {
        Mode::Protocol => protocol(&mut conn, &args.root, &image, dac_override).await?,
        Mode::Import => {
            let repo = args.repo.as_deref().context("--repo")?;
            import(&mut conn, &args.root, &image, dac_override, repo).await?
        }
    };
    report["image"] = json!(image.id);
    report["spawn_seconds"] = json!(spawn_seconds);
    report["resolve_seconds"] = json!(resolve_seconds);
    report["consumer_has_cap_dac_override"] = json!(dac_override);
    println!("{report}");
    Ok(())
}

async fn protocol(
    conn: &mut zlink::tokio::unix::Connection,
    root: &Path,
    image: &Image,
    dac_override: bool,
) -> Result<Value> {
    let start = Instant::now();
    let mut layers = Vec::new();
    let mut total = Counts::default();
    for layer in &image.layers {
        let t = Instant::now();
        let fetched = get_layer(conn, locator(root, layer, dac_override))
            .await
            .with_context(|| format!("layer {}", layer.id))?;
        let id = layer.id.clone();
        let c = tokio::task::spawn_blocking(move || read_layer(fetched))
            .await
            .context("joining the stream reader")?
            .with_context(|| format!("layer {id}"))?;
        let seconds = t.elapsed().as_secs_f64();
        layers.push(json!({
            "layer": layer.id,
            "entries": c.entries,
            "fds": c.fds,
            "inline": c.inline,
            "inline_bytes": c.inline_bytes,
            "metadata_bytes": c.metadata_bytes,
            "seconds": seconds,
            "fds_per_second": c.fds as f64 / seconds.max(1e-9),
        }));
        total.entries += c.entries;
        total.fds += c.fds;
        total.inline += c.inline;
        total.inline_bytes += c.inline_bytes;
        total.metadata_bytes += c.metadata_bytes;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "protocol",
        "seconds": seconds,
        "entries": total.entries,
        "fds": total.fds,
        "inline": total.inline,
        "inline_bytes": total.inline_bytes,
        "metadata_bytes": total.metadata_bytes,
        "fds_per_second": total.fds as f64 / seconds.max(1e-9),
        "entries_per_second": total.entries as f64 / seconds.max(1e-9),
        "layers": layers,
    }))
}

async fn import(
    conn: &mut zlink::tokio::unix::Connection,
    root: &Path,
    image: &Image,
    dac_override: bool,
    repo: &Path,
) -> Result<Value> {
    let repo: Arc<Repository<Sha512HashValue>> = Arc::new(
        Repository::open_path(rustix::fs::CWD, repo)
            .with_context(|| format!("opening the repository {}", repo.display()))?,
    );
    let start = Instant::now();
    let mut ctx = ImportContext::default();
    let mut refs = Vec::new();
    let mut layers = Vec::new();
    let mut total = composefs_oci::ImportStats::default();
    for layer in &image.layers {
        let t = Instant::now();
        let diff_id: OciDigest = layer.diff_id.parse().context("parsing a diff id")?;
        let fetched = get_layer(conn, locator(root, layer, dac_override))
            .await
            .with_context(|| format!("layer {}", layer.id))?;
        let (r, d) = (repo.clone(), diff_id.clone());
        let (verity, stats, back) = tokio::task::spawn_blocking(move || {
            // The lifetime fds are held until the drain is done, as upstream's consumer does.
            let _lifetime = fetched.lifetime;
            composefs_oci::layer_sync::drain_splitdirfdstream_verified(
                r,
                fetched.pipe,
                fetched.dirs,
                &d,
                false,
                ctx,
            )
        })
        .await
        .context("joining the drain")?
        .map_err(|e| anyhow::anyhow!("draining layer {}: {e:#}", layer.id))?;
        ctx = back;
        layers.push(json!({
            "layer": layer.id,
            "diff_id": layer.diff_id,
            "verity": verity.to_hex(),
            "reflinked": stats.objects_reflinked,
            "copied": stats.objects_copied,
            "seconds": t.elapsed().as_secs_f64(),
        }));
        total.merge(&stats);
        refs.push((diff_id, verity));
    }
    let layers_seconds = start.elapsed().as_secs_f64();
    let (manifest, config) = (image.manifest_json.clone(), image.config_json.clone());
    let r = repo.clone();
    let ((manifest_digest, _), _) = tokio::task::spawn_blocking(move || {
        composefs_oci::layer_sync::finalize_oci_image(
            &r,
            &manifest,
            &config,
            &refs,
            Some("bench"),
            None,
        )
    })
    .await
    .context("joining the finalize")??;
    let seconds = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "import",
        "seconds": seconds,
        "layers_seconds": layers_seconds,
        "finalize_seconds": seconds - layers_seconds,
        "manifest_digest": manifest_digest.to_string(),
        "tag": "bench",
        "reflinked": total.objects_reflinked,
        "copied": total.objects_copied,
        "hardlinked": total.objects_hardlinked,
        "present": total.objects_already_present,
        "bytes_reflinked": total.bytes_reflinked,
        "bytes_copied": total.bytes_copied,
        "layers": layers,
    }))
}
