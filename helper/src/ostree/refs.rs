//! What a user names, resolved to a commit: a full checksum, a unique checksum prefix, a
//! local ref (`refs/heads/`), a remote ref (`REMOTE:REF`, or `REMOTE/REF` found under
//! `refs/remotes/`), in the order ostree's own resolution tries them.

use std::path::{Path, PathBuf};

use cstor_protocol::ErrorCode;
use cstor_protocol::ostree::format::Checksum;

use super::OstreeRepo;
use crate::confine;
use crate::error::{Error, Result};

/// A resolved commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The commit checksum.
    pub commit: Checksum,
    /// The ref file that named it, relative to the repository.
    pub ref_file: Option<String>,
}

/// Shortest hex string taken as a checksum prefix; shorter ones are only ref names.
pub const MIN_PREFIX: usize = 4;

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses 64 lowercase hex digits.
pub fn parse_checksum(s: &str) -> Option<Checksum> {
    if s.len() != 64 || !is_lower_hex(s) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// A ref path component as ostree accepts it: a letter, digit or `_`, then also `-` and `.`.
fn valid_component(c: &str) -> bool {
    let mut bytes = c.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn valid_ref(r: &str) -> bool {
    r.len() <= 1024 && r.split('/').all(valid_component)
}

fn invalid(rev: &str, why: &str) -> Error {
    Error::new(
        ErrorCode::InvalidReference,
        format!("{rev:?} is not an ostree ref or commit checksum: {why}"),
    )
    .reference(rev)
}

/// The path of a metadata object beneath the repository.
pub fn object_path(checksum: &Checksum, ext: &str) -> PathBuf {
    let h = hex::encode(checksum);
    PathBuf::from(format!("objects/{}/{}.{ext}", &h[..2], &h[2..]))
}

impl OstreeRepo {
    /// Resolves `rev` to a commit that exists in the repository.
    ///
    /// Fails with [`ErrorCode::InvalidReference`] for a malformed name,
    /// [`ErrorCode::AmbiguousReference`] for a prefix of several commits (they are listed),
    /// and [`ErrorCode::ImageNotFound`] when nothing matches or the commit object is absent.
    pub fn resolve(&self, rev: &str) -> Result<Resolved> {
        if let Some(c) = parse_checksum(rev) {
            self.require_commit(&c, rev)?;
            return Ok(Resolved {
                commit: c,
                ref_file: None,
            });
        }
        if (MIN_PREFIX..64).contains(&rev.len()) && is_lower_hex(rev) {
            match self.commits_with_prefix(rev)?.as_slice() {
                [] => {}
                [one] => {
                    return Ok(Resolved {
                        commit: *one,
                        ref_file: None,
                    });
                }
                many => {
                    let candidates: Vec<String> = many.iter().map(hex::encode).collect();
                    return Err(Error::new(
                        ErrorCode::AmbiguousReference,
                        format!(
                            "{rev:?} is the prefix of {} commits; give more digits",
                            candidates.len()
                        ),
                    )
                    .reference(rev)
                    .candidates(candidates));
                }
            }
        }
        let candidates: Vec<String> = match rev.split_once(':') {
            Some((remote, r)) => {
                if !valid_component(remote) || !valid_ref(r) {
                    return Err(invalid(rev, "expected REMOTE:REF"));
                }
                vec![format!("refs/remotes/{remote}/{r}")]
            }
            None => {
                if !valid_ref(rev) {
                    return Err(invalid(
                        rev,
                        "ref components are letters, digits, '_', '-' and '.', separated by '/'",
                    ));
                }
                vec![format!("refs/heads/{rev}"), format!("refs/remotes/{rev}")]
            }
        };
        for file in &candidates {
            if let Some(commit) = self.read_ref(file)? {
                self.require_commit(&commit, rev)?;
                return Ok(Resolved {
                    commit,
                    ref_file: Some(file.clone()),
                });
            }
        }
        Err(Error::new(
            ErrorCode::ImageNotFound,
            format!(
                "no ref or commit {rev:?} in ostree repository {} (looked for {})",
                self.path().display(),
                candidates.join(", ")
            ),
        )
        .reference(rev))
    }

    /// Reads a ref file; `None` when it does not exist.
    fn read_ref(&self, file: &str) -> Result<Option<Checksum>> {
        let bytes = match confine::read_small(self.root.fd(), Path::new(file), 4096) {
            Ok(b) => b,
            // A ref below a name that is a file (refs/heads/a when refs/heads/a/b is asked
            // for) is absent too.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(Error::io(format!("reading ref {file}"), e).path(file)),
        };
        let text = std::str::from_utf8(&bytes).unwrap_or("").trim();
        parse_checksum(text).map(Some).ok_or_else(|| {
            Error::new(
                ErrorCode::CorruptMetadata,
                format!("ref {file} does not hold a commit checksum"),
            )
            .path(file)
        })
    }

    fn require_commit(&self, c: &Checksum, rev: &str) -> Result<()> {
        let p = object_path(c, "commit");
        if confine::exists(self.root.fd(), &p) {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::ImageNotFound,
            format!(
                "{rev:?} names commit {}, which is not in the repository",
                hex::encode(c)
            ),
        )
        .reference(rev)
        .path(p.display().to_string()))
    }

    /// The commits whose checksum starts with `prefix` (at least 2 hex digits).
    fn commits_with_prefix(&self, prefix: &str) -> Result<Vec<Checksum>> {
        let dir_name = format!("objects/{}", &prefix[..2]);
        let dir = match confine::open_dir(self.root.fd(), Path::new(&dir_name)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {dir_name}"), e)),
        };
        let rest = &prefix[2..];
        let mut found = Vec::new();
        let entries = rustix::fs::Dir::read_from(&dir)
            .map_err(|e| Error::io(format!("listing {dir_name}"), e.into()))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {dir_name}"), e.into()))?;
            let name = entry.file_name().to_bytes();
            let Some(stem) = name.strip_suffix(b".commit") else {
                continue;
            };
            if stem.len() == 62 && stem.starts_with(rest.as_bytes()) {
                let full = format!("{}{}", &prefix[..2], String::from_utf8_lossy(stem));
                if let Some(c) = parse_checksum(&full) {
                    found.push(c);
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        for ok in ["main", "fedora/40/x86_64", "a_b-c.d", "_x"] {
            assert!(valid_ref(ok), "{ok}");
        }
        for bad in [
            "", "/main", "main/", "a//b", "../x", "a/../b", ".hidden", "-x", "a b",
        ] {
            assert!(!valid_ref(bad), "{bad}");
        }
        assert!(parse_checksum(&"a".repeat(64)).is_some());
        assert!(parse_checksum(&"A".repeat(64)).is_none());
        assert!(parse_checksum(&"a".repeat(63)).is_none());
    }
}
