//! Opening and creating composefs repositories the way `cfsctl` does.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use composefs::fsverity::{Algorithm, FsVerityHashValue, Sha512HashValue};
use composefs::repository::{Repository, RepositoryConfig};

use crate::error::{Error, Result};

/// The object hash of a repository, read from its `meta.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoAlgorithm {
    /// `fsverity-sha256-*`: use `Sha256HashValue`.
    Sha256,
    /// `fsverity-sha512-*` (what `cfsctl init` makes): use `Sha512HashValue`.
    Sha512,
}

fn open_dir(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening the repository {}", path.display()), e))
}

/// Reads which hash a repository uses. Fails when `path` holds no `meta.json`.
pub fn repository_algorithm(path: &Path) -> Result<RepoAlgorithm> {
    let dir = open_dir(path)?;
    let alg = composefs::repository::read_repo_algorithm(&dir.as_fd())
        .map_err(|cause| Error::Repository {
            doing: format!("reading {}/meta.json", path.display()),
            cause,
        })?
        .ok_or_else(|| Error::Repository {
            doing: format!("opening the repository {}", path.display()),
            cause: anyhow::anyhow!(
                "no meta.json: not a composefs repository (create one with --init or `cfsctl init`)"
            ),
        })?;
    Ok(match alg {
        Algorithm::Sha256 { .. } => RepoAlgorithm::Sha256,
        Algorithm::Sha512 { .. } => RepoAlgorithm::Sha512,
    })
}

/// Opens an existing repository whose hash is `ObjectID` (see [`repository_algorithm`]).
pub fn open_repository<ObjectID: FsVerityHashValue>(
    path: &Path,
) -> Result<Arc<Repository<ObjectID>>> {
    Repository::open_path(rustix::fs::CWD, path)
        .map(Arc::new)
        .map_err(|e| Error::Repository {
            doing: format!("opening the repository {}", path.display()),
            cause: e.into(),
        })
}

/// What [`init_repository`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// A new repository with fs-verity required.
    CreatedSecure,
    /// A new repository in insecure mode: the filesystem has no fs-verity.
    CreatedInsecure,
    /// The repository already existed with the same settings.
    Existed,
}

/// Whether files on the filesystem of `dir` can get fs-verity.
fn verity_supported(dir: &Path) -> Result<bool> {
    let tmp = tempfile::tempfile_in(dir)
        .map_err(|e| Error::io(format!("probing fs-verity in {}", dir.display()), e))?;
    use std::io::Write;
    (&tmp)
        .write_all(b"cstor fs-verity probe")
        .map_err(|e| Error::io("writing the fs-verity probe", e))?;
    // Enabling verity needs a read-only fd and no writers.
    let ro = std::fs::File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&tmp)
    ))
    .map_err(|e| Error::io("reopening the fs-verity probe", e))?;
    drop(tmp);
    Ok(
        match composefs::fsverity::enable_verity_raw::<Sha512HashValue>(&ro) {
            Ok(()) => true,
            Err(composefs::fsverity::EnableVerityError::FilesystemNotSupported) => false,
            Err(e) => {
                tracing::debug!("fs-verity probe: {e}; treating as unsupported");
                false
            }
        },
    )
}

/// Creates a repository at `path` with the settings `cfsctl init` uses (SHA-512 objects,
/// EROFS format 1), in insecure mode when the filesystem has no fs-verity (as
/// `cfsctl init --insecure` would). An existing repository is left as it is (it must
/// open: a readable `meta.json` of a known hash).
pub fn init_repository(path: &Path) -> Result<InitOutcome> {
    std::fs::create_dir_all(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    if path.join("meta.json").exists() {
        // Whatever its hash: `--init` on a SHA-256 repository `cfsctl init` made uses it.
        match repository_algorithm(path)? {
            RepoAlgorithm::Sha512 => drop(open_repository::<Sha512HashValue>(path)?),
            RepoAlgorithm::Sha256 => drop(open_repository::<composefs::fsverity::Sha256HashValue>(
                path,
            )?),
        }
        return Ok(InitOutcome::Existed);
    }
    let secure = verity_supported(path)?;
    let mut config = RepositoryConfig::new(Algorithm::SHA512);
    config.erofs_formats =
        composefs::erofs::format::FormatConfig::single(composefs::erofs::format::FormatVersion::V1);
    if !secure {
        config = config.set_insecure();
    }
    let (_repo, created) = Repository::<Sha512HashValue>::init_path(rustix::fs::CWD, path, config)
        .map_err(|cause| Error::Repository {
            doing: format!("initializing the repository {}", path.display()),
            cause,
        })?;
    Ok(match (created, secure) {
        (false, _) => InitOutcome::Existed,
        (true, true) => InitOutcome::CreatedSecure,
        (true, false) => InitOutcome::CreatedInsecure,
    })
}
