//! `cstor images`: every image of the storage, as `podman images` lists them.

use std::io::Write;

use anyhow::{Context, Result};

use super::{connect, finish};
use crate::args::{Global, StorageArgs};
use crate::output::{print_json, short};

pub async fn run(g: &Global, storage: &StorageArgs) -> Result<()> {
    let client = connect(g, storage, None).await?;
    let r = async {
        let images = client.list_images().await.context("listing images")?;
        if g.json {
            return print_json(&images);
        }
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
        Ok(())
    }
    .await;
    finish(client, r).await
}
