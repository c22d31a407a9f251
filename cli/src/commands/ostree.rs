//! `cstor ostree import`: an ostree commit into a composefs repository, read through the
//! helper, written as `cfsctl ostree pull-local` writes it; a summary (or `--json`) on stdout.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use cstor_import::{ObjectStats, OstreeImportReport, RepoAlgorithm};
use cstor_proxy_client::Client;

use super::{connect, finish, init_repository, repo_path};
use crate::args::{Global, HelperArgs, OstreeImportArgs, StorageArgs};
use crate::output::{human, print_json, short};
use crate::progress;

pub async fn import(g: &Global, args: &OstreeImportArgs) -> Result<()> {
    let path = repo_path(args.repo.as_deref())?;
    if args.init {
        init_repository(g, &path)?;
    }
    // The helper opens the repository by absolute path, whatever its working directory.
    let source = std::path::absolute(&args.ostree_repo)
        .with_context(|| format!("resolving {}", args.ostree_repo.display()))?;
    // The helper always opens a containers-storage at start, which an ostree import never
    // reads; an empty private one (its own storage.conf, overlay) lets it start on a machine
    // without podman storage, or whose storage.conf names another driver.
    let empty = tempfile::Builder::new()
        .prefix("cstor-ostree-")
        .tempdir()
        .context("creating an empty storage for the helper")?;
    let storage = empty_storage(empty.path(), &args.helper)?;
    let client = connect(g, &storage, None).await?;
    let r = match cstor_import::repository_algorithm(&path)? {
        RepoAlgorithm::Sha512 => run::<Sha512HashValue>(g, &client, &path, &source, args).await,
        RepoAlgorithm::Sha256 => run::<Sha256HashValue>(g, &client, &path, &source, args).await,
    };
    let report = match r {
        Ok(r) => r,
        Err(e) => return finish(client, Err(e)).await,
    };
    let printed = if g.json {
        print_json(&Summary::of(&report, &path))
    } else {
        print_summary(&report, &path, &args.reference).map_err(Into::into)
    };
    finish(client, printed).await
}

/// Storage flags selecting an empty storage in `dir`.
fn empty_storage(dir: &Path, helper: &HelperArgs) -> Result<StorageArgs> {
    let sub = |name: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    };
    let (root, run) = (sub("root")?, sub("run")?);
    let conf = dir.join("storage.conf");
    // Debug formatting quotes and escapes the paths as TOML basic strings need.
    let text = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = {:?}\nrunroot = {:?}\n",
        root.display().to_string(),
        run.display().to_string()
    );
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    Ok(StorageArgs {
        root: Some(root),
        runroot: Some(run),
        imagestore: None,
        storage_driver: Some("overlay".into()),
        storage_opts: Vec::new(),
        additional_image_stores: Vec::new(),
        storage_conf: Some(conf),
        helper: helper.clone(),
    })
}

async fn run<ObjectID: FsVerityHashValue>(
    g: &Global,
    client: &Client,
    path: &Path,
    source: &Path,
    args: &OstreeImportArgs,
) -> Result<OstreeImportReport> {
    let repo = cstor_import::open_repository::<ObjectID>(path)?;
    let mut options = cstor_import::ImportOptions::new().copy_policy(args.copy_policy.into());
    options.tag = args.tag.clone();
    let bars = if progress::wanted(g) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        options.events = Some(tx);
        Some(tokio::spawn(progress::show(rx)))
    } else {
        None
    };
    let r =
        cstor_import::import_ostree_commit(client, &repo, source, &args.reference, &options).await;
    // The channel closes with the options: the bars finish drawing before the summary.
    drop(options);
    if let Some(p) = bars {
        let _ = p.await;
    }
    r.with_context(|| {
        format!(
            "importing {} of {} into {}",
            args.reference,
            source.display(),
            path.display()
        )
    })
}

/// `--json` output.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    commit: &'a str,
    repository: String,
    image_id: &'a str,
    stream_id: &'a str,
    reference: Option<&'a str>,
    metadata_objects: u64,
    file_objects: u64,
    external_objects: u64,
    content_bytes: u64,
    objects: ObjectStats,
    first_reflink_fallback: Option<&'a str>,
    reused_stream: bool,
}

impl<'a> Summary<'a> {
    fn of(r: &'a OstreeImportReport, path: &Path) -> Self {
        Self {
            commit: &r.commit,
            repository: path.display().to_string(),
            image_id: &r.image_id,
            stream_id: &r.stream_id,
            reference: r.reference.as_deref(),
            metadata_objects: r.metadata_objects,
            file_objects: r.file_objects,
            external_objects: r.external_objects,
            content_bytes: r.content_bytes,
            objects: r.objects,
            first_reflink_fallback: r.first_reflink_fallback.as_deref(),
            reused_stream: r.reused_stream,
        }
    }
}

fn print_summary(r: &OstreeImportReport, path: &Path, rev: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Imported {rev} (commit {}, image {}) into {}{}",
        short(&r.commit),
        short(&r.image_id),
        path.display(),
        r.reference
            .as_deref()
            .map(|n| format!(" as {n}"))
            .unwrap_or_default()
    )?;
    let o = &r.objects;
    writeln!(
        out,
        "  objects:  {} metadata, {} files: {} reflinked ({}), {} copied ({}), {} hardlinked, {} already present, {} inline",
        r.metadata_objects,
        r.file_objects,
        o.reflinked,
        human(o.bytes_reflinked),
        o.copied,
        human(o.bytes_copied),
        o.hardlinked,
        o.present,
        o.inlined
    )?;
    if r.reused_stream {
        writeln!(
            out,
            "  already imported: rebuilt from the repository's commit stream"
        )?;
    }
    if let Some(why) = &r.first_reflink_fallback {
        writeln!(out, "  first copy instead of reflink: {why}")?;
    }
    Ok(())
}
