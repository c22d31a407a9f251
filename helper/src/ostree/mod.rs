//! Read-only access to an ostree repository: its mode, its shared lock, refs, metadata
//! objects and file objects.
//!
//! [`OstreeRepo::open`] opens the repository directory once; every later open is beneath
//! it (see [`crate::confine`]). While the value lives it holds ostree's shared repository
//! lock, which `ostree prune` must take exclusively, so objects a client was told about do
//! not disappear under it. Metadata objects are checked against their checksums before they
//! are served; file contents are not read here (a client hashes them as it copies them).
//! The concepts are one module each: [`refs`] resolves what a user names, [`objects`] reads
//! objects in each repository mode.

pub mod objects;
pub mod refs;

use std::path::Path;
use std::time::Duration;

use cstor_protocol::ErrorCode;
use cstor_protocol::ostree::RepoMode;

use crate::confine::{self, Root};
use crate::error::{Error, Result};
use crate::lock::ReadLock;

/// The largest `config` file read.
const MAX_CONFIG: u64 = 256 << 10;

/// An open ostree repository, holding its shared lock.
#[derive(Debug)]
pub struct OstreeRepo {
    root: Root,
    mode: RepoMode,
    lock: Option<ReadLock>,
}

impl OstreeRepo {
    /// Opens the repository at `path`, reads its mode from `config` and takes ostree's shared
    /// lock on `.lock`, waiting up to `lock_timeout` for an exclusive holder (a prune).
    ///
    /// ostree locks `.lock` with open-file-description locks, which is what [`ReadLock`]
    /// takes, so the two exclude each other. A repository no locking ostree command has
    /// touched has no `.lock`; it is opened unlocked rather than written to.
    pub fn open(path: &Path, lock_timeout: Duration) -> Result<Self> {
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(Error::new(
                ErrorCode::InvalidParams,
                format!("ostree repository path {shown:?} is not absolute"),
            ));
        }
        let root = Root::open(path)
            .map_err(|e| Error::io(format!("opening ostree repository {shown}"), e))?;
        let config =
            confine::read_small(root.fd(), Path::new("config"), MAX_CONFIG).map_err(|e| {
                Error::io(
                    format!("reading {shown}/config (is this an ostree repository?)"),
                    e,
                )
                .path("config")
            })?;
        let mode = parse_mode(&config).map_err(|e| e.path("config"))?;
        let lock = ReadLock::acquire(
            root.fd(),
            Path::new(".lock"),
            &format!("{shown}/.lock"),
            lock_timeout,
        )?;
        if lock.is_none() {
            tracing::warn!(repo = %shown, "no .lock in the ostree repository; reading it unlocked");
        }
        tracing::debug!(repo = %shown, ?mode, "ostree repository opened");
        Ok(Self { root, mode, lock })
    }

    /// The repository mode.
    pub fn mode(&self) -> RepoMode {
        self.mode
    }

    /// Whether the shared lock is held.
    pub fn locked(&self) -> bool {
        self.lock.is_some()
    }

    /// The repository path as given (for messages).
    pub fn path(&self) -> &Path {
        self.root.path()
    }
}

/// Reads `core.mode` from a repository `config` (a GLib key file). ostree treats a missing
/// mode as `bare` and `archive-z2` as the old name of `archive`.
pub fn parse_mode(config: &[u8]) -> Result<RepoMode> {
    let text = std::str::from_utf8(config)
        .map_err(|_| Error::new(ErrorCode::CorruptMetadata, "config is not UTF-8"))?;
    let mut in_core = false;
    let mut mode = None;
    let mut version = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            in_core = section.strip_suffix(']') == Some("core");
            continue;
        }
        if !in_core {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "mode" => mode = Some(v.trim().to_owned()),
                "repo_version" => version = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    if let Some(v) = version
        && v != "1"
    {
        return Err(Error::new(
            ErrorCode::Unsupported,
            format!("ostree repository version {v:?} (only 1 is known)"),
        ));
    }
    match mode.as_deref().unwrap_or("bare") {
        "bare" => Ok(RepoMode::Bare),
        "bare-user" => Ok(RepoMode::BareUser),
        "bare-user-only" => Ok(RepoMode::BareUserOnly),
        "archive" | "archive-z2" => Ok(RepoMode::Archive),
        other => Err(Error::new(
            ErrorCode::Unsupported,
            format!(
                "ostree repository mode {other:?} is not served (bare, bare-user, bare-user-only and archive are)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let m = |s: &str| parse_mode(s.as_bytes());
        assert_eq!(
            m("[core]\nrepo_version=1\nmode=archive-z2\n").unwrap(),
            RepoMode::Archive
        );
        assert_eq!(
            m("[core]\n mode = bare-user \n").unwrap(),
            RepoMode::BareUser
        );
        assert_eq!(m("[core]\nrepo_version=1\n").unwrap(), RepoMode::Bare);
        // A mode outside [core] is not the repository's.
        assert_eq!(
            m("[remote \"x\"]\nmode=archive\n[core]\n").unwrap(),
            RepoMode::Bare
        );
        let e = m("[core]\nmode=bare-split-xattrs\n").unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unsupported);
        assert!(m("[core]\nrepo_version=2\nmode=bare\n").is_err());
    }
}
