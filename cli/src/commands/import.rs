//! `cstor import`: an image of containers-storage into a composefs repository, with progress
//! on stderr and a summary (or `--json` report) on stdout.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use cstor_import::{
    ImportOptions, ImportReport, ObjectStats, PushReport, RepoAlgorithm, TreeSource,
};
use cstor_proxy_client::Client;

use super::{connect, finish, helper_config, init_repository, repo_path};
use crate::args::{CopyPolicyArg, Global, ImportArgs};
use crate::output::{human, print_json, short};
use crate::progress;

pub async fn run(g: &Global, args: &ImportArgs) -> Result<()> {
    let path = repo_path(args.repo.as_deref())?;
    if let Some(socket) = &args.repo_service {
        return via_service(g, args, socket, &path).await;
    }
    if args.init {
        init_repository(g, &path)?;
    }
    let mut options = ImportOptions::new()
        .copy_policy(args.copy_policy.into())
        .bootable(args.bootable);
    options.tag = args.tag.clone();
    options.object_threads = args.jobs.map(usize::from);
    let client = connect(g, &args.storage, Some(&args.image)).await?;
    let summary = match cstor_import::repository_algorithm(&path)? {
        RepoAlgorithm::Sha512 => {
            import::<Sha512HashValue>(g, &client, &path, &args.image, options).await
        }
        RepoAlgorithm::Sha256 => {
            import::<Sha256HashValue>(g, &client, &path, &args.image, options).await
        }
    };
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            // The error is what matters; the helper goes with the client.
            drop(client);
            return Err(e);
        }
    };
    // The image is committed: a helper that then fails to exit cleanly does not undo that.
    if let Err(e) = client.shutdown().await {
        tracing::warn!(
            "{} is imported, but the helper did not shut down cleanly: {e}",
            args.image
        );
    }
    if g.json {
        print_json(&summary)
    } else {
        print_summary(&summary, "Imported", "Already imported")?;
        Ok(())
    }
}

/// `cstor import --repo-service`: the service writes the repository at `path`.
async fn via_service(g: &Global, args: &ImportArgs, socket: &Path, path: &Path) -> Result<()> {
    // Upstream's PutLayer stores each file as it can: a reflink, else a hardlink of the file
    // itself (enabling fs-verity on it), else a copy (unless asked for zero-copy). It cannot
    // be told to copy, or to only reflink.
    if matches!(
        args.copy_policy,
        CopyPolicyArg::Copy | CopyPolicyArg::ReflinkOnly
    ) {
        return Err(crate::exit::Usage(format!(
            "--copy-policy {} cannot be asked of a repository service: it reflinks, else \
             hardlinks, else copies (docs/copy.md)",
            match args.copy_policy {
                CopyPolicyArg::Copy => "copy",
                _ => "reflink-only",
            }
        ))
        .into());
    }
    let zerocopy = false;
    let config = helper_config(g, &args.storage, Some(&args.image))?;
    let client = cstor_proxy_client::Client::spawn(&config).await?;
    let repo = path.to_str().with_context(|| {
        format!(
            "the repository path {} is not UTF-8 (varlink carries strings)",
            path.display()
        )
    })?;
    let r = cstor_import::import_image_via_service(
        &client,
        &config,
        socket,
        repo,
        &args.image,
        args.tag.as_deref(),
        zerocopy,
    )
    .await
    .with_context(|| {
        format!(
            "importing {} into {} through the repository service at {}",
            args.image,
            path.display(),
            socket.display()
        )
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => return finish(client, Err(e)).await,
    };
    let printed = if g.json {
        print_json(&r)
    } else {
        print_pushed(&r, path, socket).map_err(Into::into)
    };
    finish(client, printed).await
}

fn print_pushed(r: &PushReport, path: &Path, socket: &Path) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Imported {} (image {}) into {} as {} through {}",
        r.reference,
        short(&r.image_id),
        path.display(),
        r.tag,
        socket.display()
    )?;
    let skipped = r.layers.iter().filter(|l| l.skipped).count();
    let sum = |f: fn(&cstor_import::PushedLayer) -> u64| r.layers.iter().map(f).sum::<u64>();
    writeln!(
        out,
        "  layers:   {} ({skipped} already present)",
        r.layers.len()
    )?;
    writeln!(
        out,
        "  objects:  {} reflinked, {} hardlinked, {} copied, {} already present (the service's counts)",
        sum(|l| l.reflinked),
        sum(|l| l.hardlinked),
        sum(|l| l.copied),
        sum(|l| l.present)
    )?;
    writeln!(
        out,
        "  manifest: {} (verity {})",
        r.manifest_digest, r.manifest_verity
    )?;
    writeln!(
        out,
        "  config:   {} (verity {})",
        r.config_digest, r.config_verity
    )?;
    writeln!(out, "  time:     {:.2} s", r.elapsed.as_secs_f64())?;
    Ok(())
}

/// The import report with object ids as hex, for printing and `--json`.
#[derive(Debug, serde::Serialize)]
pub(super) struct ImportSummary {
    reference: String,
    /// The repository a copy read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) source: Option<String>,
    image_id: String,
    repository: String,
    tag: String,
    manifest_digest: String,
    manifest_verity: String,
    config_digest: String,
    config_verity: String,
    erofs_image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_image: Option<String>,
    already_complete: bool,
    has_usr: Option<bool>,
    erofs_tree: Option<TreeSource>,
    objects: ObjectStats,
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
    objects: ObjectStats,
    elapsed_seconds: f64,
}

async fn import<ObjectID: FsVerityHashValue>(
    g: &Global,
    client: &Client,
    path: &Path,
    image: &str,
    mut options: ImportOptions,
) -> Result<ImportSummary> {
    let repo = cstor_import::open_repository::<ObjectID>(path)?;
    let bars = if progress::wanted(g) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        options.events = Some(tx);
        Some(tokio::spawn(progress::show(rx)))
    } else {
        None
    };
    let r = cstor_import::import_image(client, &repo, image, &options).await;
    drop(options);
    if let Some(p) = bars {
        let _ = p.await;
    }
    let r = r.with_context(|| format!("importing {image} into {}", path.display()))?;
    Ok(ImportSummary::of(&r, path))
}

impl ImportSummary {
    /// The report of an import (or a copy) into the repository at `path`.
    pub(super) fn of<ObjectID: FsVerityHashValue>(r: &ImportReport<ObjectID>, path: &Path) -> Self {
        ImportSummary {
            reference: r.reference.clone(),
            source: None,
            image_id: r.image_id.clone(),
            repository: path.display().to_string(),
            tag: r.tag.clone(),
            manifest_digest: r.pull.manifest_digest.to_string(),
            manifest_verity: r.pull.manifest_verity.to_hex(),
            config_digest: r.pull.config_digest.to_string(),
            config_verity: r.pull.config_verity.to_hex(),
            erofs_image: r.erofs_image.to_hex(),
            boot_image: r.boot_image.as_ref().map(|b| b.to_hex()),
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
        }
    }
}

/// Prints the summary of an import or a copy: `done` ("Imported") or `already` ("Already
/// imported") the image.
pub(super) fn print_summary(s: &ImportSummary, done: &str, already: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let o = &s.objects;
    let skipped = s.layers.iter().filter(|l| l.skipped).count();
    writeln!(
        out,
        "{} {} (image {}){} into {} as {}",
        if s.already_complete { already } else { done },
        s.reference,
        short(&s.image_id),
        s.source
            .as_deref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default(),
        s.repository,
        s.tag
    )?;
    writeln!(
        out,
        "  layers:   {} ({} already present)",
        s.layers.len(),
        skipped
    )?;
    let hardlinked = if o.hardlinked > 0 {
        format!(
            " {} hardlinked ({}),",
            o.hardlinked,
            human(o.bytes_hardlinked)
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "  objects:  {} reflinked ({}), {} copied ({}),{hardlinked} {} already present ({}), {} inline ({} with headers)",
        o.reflinked,
        human(o.bytes_reflinked),
        o.copied,
        human(o.bytes_copied),
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
    if let Some(b) = &s.boot_image {
        writeln!(out, "  boot:     {b}")?;
    }
    if s.has_usr == Some(false) {
        writeln!(
            out,
            "  note:     the image has no /usr; its root directory keeps the tar's own metadata"
        )?;
    }
    writeln!(out, "  time:     {:.2} s", s.elapsed_seconds)?;
    Ok(())
}
