//! `cstor mount`: an imported image, mounted read-only with composefs.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use composefs::fsverity::{FsVerityHashValue, Sha256HashValue, Sha512HashValue};
use cstor_import::RepoAlgorithm;

use super::{not_found, repo_path};
use crate::args::Global;
use crate::output::{print_json, short};

pub fn run(g: &Global, tag: &str, mountpoint: &Path, repo: Option<&Path>) -> Result<()> {
    let path = repo_path(repo)?;
    let erofs = match cstor_import::repository_algorithm(&path)? {
        RepoAlgorithm::Sha512 => mount::<Sha512HashValue>(&path, tag, mountpoint)?,
        RepoAlgorithm::Sha256 => mount::<Sha256HashValue>(&path, tag, mountpoint)?,
    };
    if g.json {
        print_json(&serde_json::json!({"tag": tag, "image": erofs, "mountpoint": mountpoint}))
    } else {
        writeln!(
            std::io::stdout().lock(),
            "{tag} (image {}) mounted on {}",
            short(&erofs),
            mountpoint.display()
        )?;
        Ok(())
    }
}

fn mount<ObjectID: FsVerityHashValue>(path: &Path, tag: &str, mountpoint: &Path) -> Result<String> {
    let repo = cstor_import::open_repository::<ObjectID>(path)?;
    let image = composefs_oci::OciImage::open_ref(&repo, tag)
        .map_err(|e| not_found(format!("looking up {tag} in {}: {e:#}", path.display())))?;
    let erofs = image
        .image_ref(repo.erofs_version())
        .ok_or_else(|| anyhow::anyhow!("{tag} has no EROFS image; import it again"))?
        .to_hex();
    repo.mount_at(
        &erofs,
        mountpoint,
        &composefs::mount::MountOptions::default(),
    )
    .with_context(|| format!("mounting {tag} on {}", mountpoint.display()))?;
    Ok(erofs)
}
