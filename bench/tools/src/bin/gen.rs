//! `cstor-bench-gen`: the scaling series' synthetic images, made without a network.
//!
//! Writes an OCI image layout (uncompressed tar layers) of `--layers` layers of `--files`
//! regular files each, whose sizes follow what large real images hold: 40% empty or under
//! 64 bytes (stored inline by composefs), 40% of 100 bytes to 2 KiB, 20% of 2 to 16 KiB; every
//! tenth file repeats the contents of an earlier file of its layer (deduplicated into one
//! object). Files sit 500 to a directory under `/scale/lNNN/dNNNN/`, so that directory sizes
//! stay realistic whatever the count; the base layer also has an empty `/usr`, without which
//! upstream `cfsctl` refuses the image. The contents come from a seeded generator: the same
//! arguments give the same bytes, hence the same diff ids and image id, on every machine.
//!
//! The tar is streamed straight into the blob (hashed on the way), so a million files cost
//! no million files on disk before `skopeo copy oci:DIR containers-storage:…` loads it.
//! Prints one JSON object: the layout, the files, objects, bytes and the diff ids.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(about = "Write a synthetic OCI image layout of LAYERS layers of FILES files each")]
struct Args {
    /// Regular files per layer.
    #[arg(long)]
    files: u64,
    /// Number of layers.
    #[arg(long, default_value_t = 1)]
    layers: u32,
    /// Seed of the contents (a different seed, different objects).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The OCI layout directory to create (must not exist).
    out: PathBuf,
}

/// Files per directory.
const PER_DIR: u64 = 500;

/// splitmix64: tiny, fast and good enough to make distinct, incompressible file contents.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The size class of file `i` of a layer, and the seed of its contents.
fn file_plan(layer_seed: u64, i: u64) -> (usize, u64) {
    // A duplicate takes the size and seed of a file a few places back (same directory or
    // the one before), as copies in real trees sit near each other.
    let source = if i % 10 == 9 && i >= 7 { i - 7 } else { i };
    let mut r = Rng::new(layer_seed ^ source.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let class = r.below(10);
    let size = match class {
        0..=3 => r.below(64),
        4..=7 => 100 + r.below(2048 - 100),
        _ => 2048 + r.below(16384 - 2048),
    };
    (size as usize, r.next())
}

/// A writer that hashes what goes through it and counts it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct LayerStats {
    diff_id: String,
    size: u64,
    objects: u64,
    inline: u64,
    bytes: u64,
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).with_context(|| format!("naming {path}"))?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h.set_cksum();
    Ok(h)
}

fn write_layer(blobs: &Path, layer: u32, files: u64, seed: u64) -> Result<LayerStats> {
    let tmp = blobs.join(format!(".layer-{layer}.tmp"));
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, out),
        hash: Sha256::new(),
        len: 0,
    };
    let layer_seed = seed
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(u64::from(layer) << 32);
    let (mut objects, mut inline, mut bytes) = (0, 0, 0);
    {
        let mut b = tar::Builder::new(&mut w);
        let top = format!("scale/l{layer:03}");
        // An empty /usr in the base layer: upstream cfsctl (composefs 0.9.4) copies the root
        // directory's metadata from /usr and refuses an image without one.
        let usr = (layer == 0).then(|| "usr".to_string());
        for dir in usr.into_iter().chain(["scale".to_string(), top.clone()]) {
            let h = header(&format!("{dir}/"), tar::EntryType::Directory, 0o755, 0)?;
            b.append(&h, std::io::empty())?;
        }
        let mut buf = Vec::new();
        for i in 0..files {
            if i % PER_DIR == 0 {
                let d = format!("{top}/d{:04}/", i / PER_DIR);
                let h = header(&d, tar::EntryType::Directory, 0o755, 0)?;
                b.append(&h, std::io::empty())?;
            }
            let (size, content_seed) = file_plan(layer_seed, i);
            buf.resize(size, 0);
            Rng::new(content_seed).fill(&mut buf);
            let mode = if i % 50 == 0 { 0o755 } else { 0o644 };
            let path = format!("{top}/d{:04}/f{i:07}", i / PER_DIR);
            let h = header(&path, tar::EntryType::Regular, mode, size as u64)?;
            b.append(&h, buf.as_slice())
                .with_context(|| format!("writing {path}"))?;
            bytes += size as u64;
            if size > 64 {
                if i % 10 != 9 || i < 7 {
                    objects += 1;
                }
            } else {
                inline += 1;
            }
        }
        b.finish().context("ending the tar")?;
    }
    w.flush()?;
    let digest = hex::encode(w.hash.finalize());
    let dest = blobs.join(&digest);
    std::fs::rename(&tmp, &dest).with_context(|| format!("naming {}", dest.display()))?;
    Ok(LayerStats {
        diff_id: format!("sha256:{digest}"),
        size: w.len,
        objects,
        inline,
        bytes,
    })
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let digest = hex::encode(Sha256::digest(bytes));
    std::fs::write(blobs.join(&digest), bytes).context("writing a blob")?;
    Ok(format!("sha256:{digest}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.files == 0 || args.layers == 0 {
        bail!("--files and --layers must be at least 1");
    }
    if args.out.exists() {
        bail!("{} exists already", args.out.display());
    }
    let blobs = args.out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let (mut objects, mut inline, mut bytes) = (0, 0, 0);
    for l in 0..args.layers {
        let s = write_layer(&blobs, l, args.files, args.seed)
            .with_context(|| format!("writing layer {l}"))?;
        layers.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": s.diff_id, "size": s.size,
        }));
        diff_ids.push(s.diff_id);
        objects += s.objects;
        inline += s.inline;
        bytes += s.bytes;
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = write_blob(&blobs, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config.len(),
        },
        "layers": layers,
    }))?;
    let manifest_digest = write_blob(&blobs, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
        }],
    });
    std::fs::write(args.out.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        args.out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let report = json!({
        "layout": args.out,
        "layers": args.layers,
        "files_per_layer": args.files,
        "files": args.files * u64::from(args.layers),
        "distinct_objects": objects,
        "inline_files": inline,
        "content_bytes": bytes,
        "manifest": manifest_digest,
        "diff_ids": diff_ids,
    });
    // Not println!: a closed stdout (`| head`) is an error to report, not a panic.
    writeln!(std::io::stdout().lock(), "{report}").context("writing the report to stdout")?;
    Ok(())
}
