//! `cstor layer-tar` and `cstor verify`: rebuilding layers bit for bit, into a file or
//! stdout, or only to check them.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use cstor_proxy_client::protocol::{GetImageResult, LayerInfo};

use super::{connect, finish, get_image, not_found};
use crate::args::{Global, StorageArgs};
use crate::output::{print_json, short};

/// The layer `which` names: an index (0 = base), a diff id or a layer id.
fn pick_layer<'a>(image: &'a GetImageResult, which: &str) -> Result<&'a LayerInfo> {
    if let Ok(i) = which.parse::<usize>() {
        return image.layers.get(i).ok_or_else(|| {
            not_found(format!(
                "image {} has {} layers; index {i} does not exist",
                short(&image.id),
                image.layers.len()
            ))
        });
    }
    image
        .layers
        .iter()
        .find(|l| l.diff_id.as_deref() == Some(which) || l.id == which)
        .ok_or_else(|| not_found(format!("image {} has no layer {which}", short(&image.id))))
}

pub async fn layer_tar(
    g: &Global,
    storage: &StorageArgs,
    image: &str,
    layer: &str,
    output: Option<&Path>,
) -> Result<()> {
    let client = connect(g, storage, Some(image)).await?;
    let r = async {
        let img = get_image(&client, image).await?;
        let l = pick_layer(&img, layer)?;
        let opened = client
            .open_layer(&l.id)
            .await
            .with_context(|| format!("opening layer {}", l.id))?;
        let sink: Box<dyn Write + Send> = match output {
            Some(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            )),
            None => Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout(),
            )),
        };
        let (tar, mut sink) = opened
            .write_tar(sink)
            .await
            .with_context(|| format!("exporting layer {}", l.id))?;
        sink.flush().context("writing the tar")?;
        tracing::info!(digest = %tar.digest, size = tar.size, "layer written");
        if g.json && output.is_some() {
            print_json(&serde_json::json!({
                "digest": tar.digest, "size": tar.size, "entries": tar.summary.entries,
            }))?;
        }
        Ok(())
    }
    .await;
    finish(client, r).await
}

pub async fn verify(g: &Global, storage: &StorageArgs, image: &str) -> Result<()> {
    let client = connect(g, storage, Some(image)).await?;
    let r = async {
        let img = get_image(&client, image).await?;
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
        Ok(())
    }
    .await;
    finish(client, r).await
}
