//! Opening a layer for streaming: finding its record by id or diff id, pinning it with the
//! layer stores' read locks, and gathering what a walk reads (its tar-split file and the
//! overlay `diff` directories of the layer and its lower layers).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use cstor_protocol::{ErrorCode, LayerInfo};

use super::layer_records::is_full_id;
use super::layer_walk::LayerSource;
use super::{Storage, Store};
use crate::confine;
use crate::error::{Error, Result};
use crate::lock::ReadLock;

/// A layer pinned for streaming: the layer stores stay read-locked until this is dropped.
#[derive(Debug)]
pub struct OpenLayer {
    /// The layer.
    pub info: LayerInfo,
    /// Held while the layer is in use, so c/storage cannot change or delete it.
    pub locks: Vec<ReadLock>,
    /// The files to read; moved into whoever walks the layer.
    pub source: LayerSource,
}

impl Storage {
    /// Opens and pins a layer named by id (64 hex) or diff id (`sha256:` + 64 hex).
    ///
    /// Fails with [`ErrorCode::InvalidParams`] for another form, [`ErrorCode::LayerNotFound`]
    /// when no complete layer matches, [`ErrorCode::NoTarSplit`] when the layer has no
    /// tar-split, [`ErrorCode::Unsupported`] for composefs-flat and additional-layer-store
    /// layers, [`ErrorCode::LockTimeout`] when podman keeps the store locked.
    pub fn open_layer(&self, wanted: &str) -> Result<OpenLayer> {
        let by_diff_id = match wanted.strip_prefix("sha256:") {
            Some(hex) if is_full_id(hex) => true,
            None if is_full_id(wanted) => false,
            _ => {
                return Err(Error::new(
                    ErrorCode::InvalidParams,
                    format!(
                        "{wanted:?} is neither a layer id (64 hex digits) nor a diff id (sha256:...)"
                    ),
                ));
            }
        };
        let locks = self.lock_layers()?;
        let index = self.load_layers()?;
        let found = if by_diff_id {
            // Several layers can share content (same diff id, other parents); any complete
            // one with tar-split rebuilds the same bytes. Failing that, any match, so that the
            // error says what is wrong with it.
            let matching = || {
                index
                    .order
                    .iter()
                    .filter_map(|id| index.by_id.get(id))
                    .filter(|(_, r)| r.diff_id() == Some(wanted))
            };
            matching()
                .find(|(s, r)| !r.incomplete() && self.tar_split_store(*s, &r.id).is_some())
                .or_else(|| matching().find(|(_, r)| !r.incomplete()))
                .or_else(|| matching().next())
        } else {
            index.by_id.get(wanted)
        };
        let (store, rec) = match found {
            Some((s, r)) if !r.incomplete() => (*s, r),
            Some(_) => {
                return Err(Error::new(
                    ErrorCode::LayerNotFound,
                    format!("layer {wanted} is incomplete (being created or deleted)"),
                )
                .layer(wanted));
            }
            None => {
                return Err(
                    Error::new(ErrorCode::LayerNotFound, format!("no layer {wanted}"))
                        .layer(wanted),
                );
            }
        };
        let id = rec.id.clone();
        let info = self.layer_info(store, rec);
        let source = self.layer_source(store, &id).map_err(|e| e.layer(&id))?;
        Ok(OpenLayer {
            info,
            locks,
            source,
        })
    }

    fn layer_source(&self, store: usize, id: &str) -> Result<LayerSource> {
        let ts_store = self.tar_split_store(store, id).ok_or_else(|| {
            Error::new(
                ErrorCode::NoTarSplit,
                format!(
                    "layer {id} has no tar-split metadata, so it cannot be rebuilt bit-exactly"
                ),
            )
        })?;
        let st = &self.stores[ts_store];
        let rel = Self::tar_split_rel(id);
        let tar_split = confine::open_regular(st.fd(), &rel)
            .map_err(|e| Error::io(format!("opening {}", st.path().join(&rel).display()), e))?;

        let dir_store = self.layer_dir_store(store, id).ok_or_else(|| {
            Error::new(
                ErrorCode::CorruptMetadata,
                format!("layer {id} is in layers.json but overlay/{id} exists in no store"),
            )
        })?;
        let base = PathBuf::from(format!("overlay/{id}"));
        let dst = &self.stores[dir_store];
        for (marker, what) in [
            (
                "composefs-data/composefs.blob",
                "composefs-flat layers (use_composefs)",
            ),
            ("additionallayer", "layers of an additional layer store"),
        ] {
            if confine::exists(dst.fd(), &base.join(marker)) {
                return Err(Error::new(
                    ErrorCode::Unsupported,
                    format!("layer {id}: {what} are not supported"),
                ));
            }
        }
        let mut dirs = vec![open_diff(dst, id)?];
        let store_fds: Vec<_> = self.stores.iter().map(|s| (s.fd(), s.path())).collect();
        for lower in lower_chain(&store_fds, dst.fd(), id)? {
            let s = self.layer_dir_store(dir_store, &lower).ok_or_else(|| {
                Error::new(
                    ErrorCode::CorruptMetadata,
                    format!("lower layer {lower} of {id} has no directory"),
                )
            })?;
            dirs.push(open_diff(&self.stores[s], &lower)?);
        }
        Ok(LayerSource::new(id.to_owned(), tar_split, dirs))
    }
}

fn open_diff(store: &Store, id: &str) -> Result<OwnedFd> {
    let rel = PathBuf::from(format!("overlay/{id}/diff"));
    confine::open_dir(store.fd(), &rel)
        .map_err(|e| Error::io(format!("opening {}", store.path().join(&rel).display()), e))
}

/// Reads `overlay/<id>/lower` and returns the ids of the lower layers' directories, nearest
/// first. The file holds `l/<LINK>:l/<LINK>...`; each link is a symlink `../<id>/diff` in some
/// store's `overlay/l/`. Absent file: no lowers.
fn lower_chain(
    stores: &[(BorrowedFd<'_>, &Path)],
    layer_dir_store: BorrowedFd<'_>,
    id: &str,
) -> Result<Vec<String>> {
    let rel = PathBuf::from(format!("overlay/{id}/lower"));
    let bytes = match confine::read_small(layer_dir_store, &rel, 1 << 20) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", rel.display()), e).layer(id)),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        Error::new(
            ErrorCode::CorruptMetadata,
            format!("{} is not UTF-8", rel.display()),
        )
        .layer(id)
    })?;
    let mut ids = Vec::new();
    for entry in text.trim().split(':').filter(|s| !s.is_empty()) {
        let link = entry.strip_prefix("l/").filter(|l| {
            !l.is_empty() && l.len() <= 64 && l.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        let Some(link) = link else {
            return Err(Error::new(
                ErrorCode::CorruptMetadata,
                format!("{} holds an unexpected entry {entry:?}", rel.display()),
            )
            .layer(id));
        };
        ids.push(resolve_link(stores, link).map_err(|e| e.layer(id))?);
    }
    Ok(ids)
}

/// Finds `overlay/l/<link>` in any store and returns the layer id it points to.
fn resolve_link(stores: &[(BorrowedFd<'_>, &Path)], link: &str) -> Result<String> {
    let links = Path::new("overlay/l");
    let rel = links.join(link);
    for (fd, path) in stores {
        // The directory is opened confined, and `link` is one checked component: the link
        // read cannot be one outside the store.
        let dir = match confine::open_dir(*fd, links) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("opening {}", path.join(links).display()),
                    e,
                ));
            }
        };
        let target = match rustix::fs::readlinkat(&dir, link, Vec::new()) {
            Ok(t) => t,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("reading link {}", rel.display()),
                    e.into(),
                ));
            }
        };
        let target = target.to_string_lossy().into_owned();
        // "../<id>/diff"
        let id = target
            .strip_prefix("../")
            .and_then(|t| t.strip_suffix("/diff"))
            .filter(|id| is_full_id(id));
        return id.map(str::to_owned).ok_or_else(|| {
            Error::new(
                ErrorCode::CorruptMetadata,
                format!(
                    "{} points to {target:?}, not ../<layer-id>/diff",
                    rel.display()
                ),
            )
        });
    }
    Err(Error::new(
        ErrorCode::CorruptMetadata,
        format!("lower link l/{link} exists in no store"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::Root;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn lower_chain_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let o = d.path().join("overlay");
        std::fs::create_dir_all(o.join("l")).unwrap();
        std::fs::create_dir_all(o.join(A).join("diff")).unwrap();
        std::fs::create_dir_all(o.join(B).join("diff")).unwrap();
        std::os::unix::fs::symlink(format!("../{A}/diff"), o.join("l/LINKA")).unwrap();
        std::fs::write(o.join(B).join("lower"), "l/LINKA").unwrap();
        let root = Root::open(d.path()).unwrap();
        let stores = [(root.fd(), d.path())];
        assert_eq!(
            lower_chain(&stores, root.fd(), B).unwrap(),
            vec![A.to_string()]
        );
        assert!(lower_chain(&stores, root.fd(), A).unwrap().is_empty());
        std::fs::write(o.join(B).join("lower"), "l/../../x").unwrap();
        assert_eq!(
            lower_chain(&stores, root.fd(), B).unwrap_err().code(),
            ErrorCode::CorruptMetadata
        );
        std::os::unix::fs::symlink("/etc", o.join("l/EVIL")).unwrap();
        std::fs::write(o.join(B).join("lower"), "l/EVIL").unwrap();
        assert_eq!(
            lower_chain(&stores, root.fd(), B).unwrap_err().code(),
            ErrorCode::CorruptMetadata
        );
    }
}
