//! `cstor copy`: an image from one composefs repository into another, as `cfsctl oci copy`
//! makes it, with progress on stderr and the import's summary (or `--json` report) on
//! stdout. No helper: both repositories are opened by this process, as the user running it.

use std::path::Path;

use anyhow::{Context, Result};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use cstor_import::{ImportOptions, RepoAlgorithm};

use super::import::{ImportSummary, print_summary};
use super::{init_repository, repo_path};
use crate::args::{CopyArgs, Global};
use crate::output::print_json;
use crate::progress;

pub async fn run(g: &Global, args: &CopyArgs) -> Result<()> {
    let path = repo_path(args.repo.as_deref())?;
    if args.init {
        init_repository(g, &path)?;
    }
    let mut options = ImportOptions::new()
        .copy_policy(args.copy_policy.into())
        .bootable(args.bootable);
    options.tag = args.tag.clone();
    options.object_threads = args.jobs.map(usize::from);
    let to = cstor_import::repository_algorithm(&path)?;
    if let Some(socket) = &args.from_service {
        let mut summary = match to {
            RepoAlgorithm::Sha512 => {
                from_service::<Sha512HashValue>(g, args, socket, &path, options).await
            }
            RepoAlgorithm::Sha256 => {
                from_service::<Sha256HashValue>(g, args, socket, &path, options).await
            }
        }?;
        summary.source = Some(match &args.from {
            Some(p) => format!("{} (through {})", p.display(), socket.display()),
            None => format!("the repository service at {}", socket.display()),
        });
        return print(g, &summary);
    }
    let Some(from_path) = &args.from else {
        anyhow::bail!("--from or --from-service names the source");
    };
    let from = cstor_import::repository_algorithm(from_path)
        .with_context(|| format!("opening the source repository {}", from_path.display()))?;
    use RepoAlgorithm::{Sha256, Sha512};
    let mut summary = match (from, to) {
        (Sha512, Sha512) => {
            copy::<Sha512HashValue, Sha512HashValue>(g, args, from_path, &path, options).await
        }
        (Sha512, Sha256) => {
            copy::<Sha512HashValue, Sha256HashValue>(g, args, from_path, &path, options).await
        }
        (Sha256, Sha512) => {
            copy::<Sha256HashValue, Sha512HashValue>(g, args, from_path, &path, options).await
        }
        (Sha256, Sha256) => {
            copy::<Sha256HashValue, Sha256HashValue>(g, args, from_path, &path, options).await
        }
    }?;
    summary.source = Some(from_path.display().to_string());
    print(g, &summary)
}

fn print(g: &Global, summary: &ImportSummary) -> Result<()> {
    if g.json {
        print_json(summary)
    } else {
        print_summary(summary, "Copied", "Already had")?;
        Ok(())
    }
}

/// Shows progress bars for `options`' events while `work` runs, as an import does.
async fn with_progress<T>(
    g: &Global,
    options: &mut ImportOptions,
    work: impl AsyncFnOnce(&ImportOptions) -> T,
) -> T {
    let bars = if progress::wanted(g) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        options.events = Some(tx);
        Some(tokio::spawn(progress::show(rx)))
    } else {
        None
    };
    let r = work(options).await;
    options.events = None;
    if let Some(p) = bars {
        let _ = p.await;
    }
    r
}

async fn from_service<D: FsVerityHashValue>(
    g: &Global,
    args: &CopyArgs,
    socket: &Path,
    path: &Path,
    mut options: ImportOptions,
) -> Result<ImportSummary> {
    let repo = cstor_import::open_repository::<D>(path)?;
    let from = args.from.as_ref().map(|p| p.display().to_string());
    let service = cstor_import::RepositoryService::connect(socket, from.as_deref())
        .await
        .with_context(|| {
            format!(
                "connecting to the repository service at {}",
                socket.display()
            )
        })?;
    let r = with_progress(g, &mut options, async |o| {
        cstor_import::copy_image_from_service(service, &repo, &args.image, o).await
    })
    .await
    .with_context(|| {
        format!(
            "copying {} through the repository service at {} into {}",
            args.image,
            socket.display(),
            path.display()
        )
    })?;
    Ok(ImportSummary::of(&r, path))
}

async fn copy<S: FsVerityHashValue, D: FsVerityHashValue>(
    g: &Global,
    args: &CopyArgs,
    from: &Path,
    path: &Path,
    mut options: ImportOptions,
) -> Result<ImportSummary> {
    let source = cstor_import::open_repository::<S>(from)
        .with_context(|| format!("opening the source repository {}", from.display()))?;
    let repo = cstor_import::open_repository::<D>(path)?;
    let r = with_progress(g, &mut options, async |o| {
        cstor_import::copy_image(&source, &repo, &args.image, o).await
    })
    .await
    .with_context(|| {
        format!(
            "copying {} from {} into {}",
            args.image,
            from.display(),
            path.display()
        )
    })?;
    Ok(ImportSummary::of(&r, path))
}
