//! `cstor copy`: an image from one composefs repository into another, as `cfsctl oci copy`
//! makes it, with progress on stderr and the import's summary (or `--json` report) on
//! stdout. No helper: both repositories are opened by this process, as the user running it.

use std::path::Path;

use anyhow::{Context, Result};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use cstor_import::{ImportOptions, RepoAlgorithm};

use super::import::{ImportSummary, print_summary};
use super::repo_path;
use crate::args::{CopyArgs, Global};
use crate::output::print_json;
use crate::progress;

pub async fn run(g: &Global, args: &CopyArgs) -> Result<()> {
    let path = repo_path(args.repo.as_deref())?;
    if args.init {
        let outcome = cstor_import::init_repository(&path)?;
        if outcome == cstor_import::InitOutcome::CreatedInsecure && !g.json && !g.quiet {
            eprintln!(
                "cstor: created {} in insecure mode: the filesystem has no fs-verity",
                path.display()
            );
        }
    }
    let mut options = ImportOptions::new()
        .copy_policy(args.copy_policy.into())
        .bootable(args.bootable);
    options.tag = args.tag.clone();
    options.object_threads = args.jobs.map(usize::from);
    let from = cstor_import::repository_algorithm(&args.from)
        .with_context(|| format!("opening the source repository {}", args.from.display()))?;
    let to = cstor_import::repository_algorithm(&path)?;
    use RepoAlgorithm::{Sha256, Sha512};
    let mut summary = match (from, to) {
        (Sha512, Sha512) => copy::<Sha512HashValue, Sha512HashValue>(g, args, &path, options).await,
        (Sha512, Sha256) => copy::<Sha512HashValue, Sha256HashValue>(g, args, &path, options).await,
        (Sha256, Sha512) => copy::<Sha256HashValue, Sha512HashValue>(g, args, &path, options).await,
        (Sha256, Sha256) => copy::<Sha256HashValue, Sha256HashValue>(g, args, &path, options).await,
    }?;
    summary.source = Some(args.from.display().to_string());
    if g.json {
        print_json(&summary)
    } else {
        print_summary(&summary, "Copied", "Already had")?;
        Ok(())
    }
}

async fn copy<S: FsVerityHashValue, D: FsVerityHashValue>(
    g: &Global,
    args: &CopyArgs,
    path: &Path,
    mut options: ImportOptions,
) -> Result<ImportSummary> {
    let source = cstor_import::open_repository::<S>(&args.from)
        .with_context(|| format!("opening the source repository {}", args.from.display()))?;
    let repo = cstor_import::open_repository::<D>(path)?;
    let bars = if progress::wanted(g) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        options.events = Some(tx);
        Some(tokio::spawn(progress::show(rx)))
    } else {
        None
    };
    let r = cstor_import::copy_image(&source, &repo, &args.image, &options).await;
    drop(options);
    if let Some(p) = bars {
        let _ = p.await;
    }
    let r = r.with_context(|| {
        format!(
            "copying {} from {} into {}",
            args.image,
            args.from.display(),
            path.display()
        )
    })?;
    Ok(ImportSummary::of(&r, path))
}
