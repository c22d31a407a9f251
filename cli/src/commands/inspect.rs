//! `cstor inspect`: an image's id, names, digests and layers.

use std::io::Write;

use anyhow::Result;

use super::{connect, finish, get_image};
use crate::args::{Global, StorageArgs};
use crate::output::{print_json, short};

pub async fn run(g: &Global, storage: &StorageArgs, image: &str) -> Result<()> {
    let client = connect(g, storage, Some(image)).await?;
    let r = async {
        let img = get_image(&client, image).await?;
        if g.json {
            return print_json(&img);
        }
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
        Ok(())
    }
    .await;
    finish(client, r).await
}
