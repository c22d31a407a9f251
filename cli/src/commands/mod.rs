//! One module per subcommand; here what they share: starting a helper for the storage the
//! flags and the reference select, and the repository path.

mod copy;
mod export;
mod generate;
mod images;
mod import;
mod inspect;
mod mount;
mod ostree;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use cstor_proxy_client::protocol::GetImageResult;
use cstor_proxy_client::protocol::reference::split_store;
use cstor_proxy_client::{Client, HelperConfig, Privilege, StorageSelection};

use crate::args::{Cli, Command, Global, OstreeCommand, PrivilegeArg, StorageArgs};
use crate::exit::NotFound;

/// Runs the command line's subcommand.
pub async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Images { storage } => images::run(g, &storage).await,
        Command::Inspect { image, storage } => inspect::run(g, &storage, &image).await,
        Command::LayerTar {
            image,
            layer,
            output,
            storage,
        } => export::layer_tar(g, &storage, &image, &layer, output.as_deref()).await,
        Command::Verify { image, storage } => export::verify(g, &storage, &image).await,
        Command::Import(args) => import::run(g, &args).await,
        Command::Copy(args) => copy::run(g, &args).await,
        Command::Ostree {
            command: OstreeCommand::Import(args),
        } => ostree::import(g, &args).await,
        Command::Mount {
            tag,
            mountpoint,
            repo,
        } => mount::run(g, &tag, &mountpoint, repo.as_deref()),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { dir } => generate::man(&dir),
    }
}

/// The storage the flags select, with the `[driver@graphroot+runroot]` selector of a
/// `containers-storage:` reference over them.
fn storage_for(s: &StorageArgs, reference: Option<&str>) -> Result<StorageSelection> {
    let mut sel = StorageSelection::default();
    sel.graphroot = s.root.clone();
    sel.runroot = s.runroot.clone();
    sel.imagestore = s.imagestore.clone();
    sel.driver = s.storage_driver.clone();
    sel.storage_opts = s.storage_opts.clone();
    sel.additional_image_stores = s.additional_image_stores.clone();
    sel.storage_conf = s.storage_conf.clone();
    if let Some(r) = reference {
        let (spec, _) =
            split_store(r).map_err(|m| NotFound(format!("invalid image reference {r:?}: {m}")))?;
        if let Some(spec) = spec {
            sel.graphroot = spec.graphroot.or(sel.graphroot);
            sel.runroot = spec.runroot.or(sel.runroot);
            sel.driver = spec.driver.or(sel.driver);
            if !spec.options.is_empty() {
                sel.storage_opts = spec.options;
            }
        }
    }
    Ok(sel)
}

/// Starts a helper for the selected storage.
async fn connect(g: &Global, s: &StorageArgs, reference: Option<&str>) -> Result<Client> {
    Ok(Client::spawn(&helper_config(g, s, reference)?).await?)
}

/// How to start a helper for the selected storage.
fn helper_config(g: &Global, s: &StorageArgs, reference: Option<&str>) -> Result<HelperConfig> {
    let mut extra: Vec<OsString> = Vec::new();
    if g.verbose > 1 {
        extra.push("-v".into());
    }
    let mut config = HelperConfig::default()
        .storage(storage_for(s, reference)?)
        .privilege(match s.helper.privilege {
            PrivilegeArg::Auto => Privilege::Auto,
            PrivilegeArg::Direct => Privilege::Direct,
            PrivilegeArg::Unshare => Privilege::PodmanUnshare,
        })
        .args(extra)
        .reply_timeout(s.helper.helper_timeout);
    config.program = s.helper.helper.clone();
    Ok(config)
}

/// The image `reference` names, with the reference in the error.
async fn get_image(client: &Client, reference: &str) -> Result<GetImageResult> {
    client
        .get_image(reference)
        .await
        .with_context(|| format!("inspecting {reference}"))
}

/// The repository to use: the given one, else cfsctl's default for this user.
fn repo_path(repo: Option<&Path>) -> Result<PathBuf> {
    Ok(match repo {
        Some(p) => p.to_owned(),
        None if rustix::process::geteuid().is_root() => composefs::repository::system_path(),
        None => {
            composefs::repository::user_path().context("finding the user's composefs repository")?
        }
    })
}

/// `--init`: creates the repository at `path` as `cfsctl init` would, saying so when it had to
/// be insecure (the filesystem has no fs-verity); an existing one is used as it is.
fn init_repository(g: &Global, path: &Path) -> Result<()> {
    let outcome = cstor_import::init_repository(path)?;
    tracing::info!(repo = %path.display(), ?outcome, "repository");
    if outcome == cstor_import::InitOutcome::CreatedInsecure && !g.json && !g.quiet {
        eprintln!(
            "cstor: created {} in insecure mode: the filesystem has no fs-verity",
            path.display()
        );
    }
    Ok(())
}

/// Shuts the helper down after the work is done. The work's own result wins: a helper
/// that fails to exit cleanly afterwards is worth a warning, not a failure of a command
/// whose output is complete.
async fn finish(client: Client, result: Result<()>) -> Result<()> {
    let shutdown = client.shutdown().await;
    match (result, shutdown) {
        (Ok(()), Err(e)) => {
            tracing::warn!("the helper did not shut down cleanly: {e}");
            Ok(())
        }
        (r, _) => r,
    }
}

/// `anyhow!` for a missing thing, with exit status 3.
fn not_found(msg: String) -> anyhow::Error {
    anyhow!(NotFound(msg))
}
