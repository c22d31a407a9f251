//! Opening a layer for streaming: finding its record by id or diff id, pinning it with the
//! layer stores' read locks, and gathering what a walk reads (its tar-split file and the
//! overlay `diff` directories of the layer and its lower layers).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
        let dirs = vec![open_diff(dst, id)?];
        let links = lower_links(dst.fd(), id)?;
        let stores = self
            .stores
            .iter()
            .map(|s| {
                let fd = s
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io(format!("duplicating {}", s.path().display()), e))?;
                Ok((fd, s.path().to_owned()))
            })
            .collect::<Result<Vec<_>>>()?;
        let lowers = Lowers {
            stores,
            first: dir_store,
            links: links.into(),
            link_dirs: Vec::new(),
            layer_id: id.to_owned(),
        };
        Ok(LayerSource::new(id.to_owned(), tar_split, dirs, lowers))
    }
}

fn open_diff(store: &Store, id: &str) -> Result<OwnedFd> {
    let rel = PathBuf::from(format!("overlay/{id}/diff"));
    confine::open_dir(store.fd(), &rel)
        .map_err(|e| Error::io(format!("opening {}", store.path().join(&rel).display()), e))
}

/// Reads `overlay/<id>/lower`: the `l/<LINK>` names of the lower layers' directories,
/// nearest first (each link is a symlink `../<id>/diff` in some store's `overlay/l/`).
/// Absent file: no lowers.
fn lower_links(layer_dir_store: BorrowedFd<'_>, id: &str) -> Result<Vec<String>> {
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
    let mut links = Vec::new();
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
        links.push(link.to_owned());
    }
    Ok(links)
}

/// The lower layers of a layer, each opened only when a file is not found in the
/// directories above it. c/storage looks a file up in the layer's `diff`, then in each lower
/// `diff`, and the walk does the same; but a layer's tar-split names its own files, so the
/// lowers are rarely needed. Opening all of them for every layer (a link read, a lookup and
/// an open each) made the helper's work grow with the square of the layer count: most of an
/// import of 500 small layers.
#[derive(Debug)]
pub(super) struct Lowers {
    /// Every store's root (duplicated) and path.
    stores: Vec<(OwnedFd, PathBuf)>,
    /// The store of the layer's own directory, where its lowers are looked for first.
    first: usize,
    /// The links of the lowers not opened yet, nearest first.
    links: std::collections::VecDeque<String>,
    /// Each store's `overlay/l`, once opened (see [`LinkDirs`]).
    link_dirs: Vec<Option<Option<OwnedFd>>>,
    layer_id: String,
}

impl Lowers {
    /// The `diff` of the next lower layer, `None` past the last.
    pub(super) fn next(&mut self) -> Result<Option<OwnedFd>> {
        let Some(link) = self.links.pop_front() else {
            return Ok(None);
        };
        let stores: Vec<(BorrowedFd<'_>, &Path)> = self
            .stores
            .iter()
            .map(|(fd, path)| (fd.as_fd(), path.as_path()))
            .collect();
        let mut link_dirs = LinkDirs {
            stores: &stores,
            opened: std::mem::take(&mut self.link_dirs),
        };
        link_dirs.opened.resize_with(stores.len(), || None);
        let found = resolve_link(&mut link_dirs, &link);
        self.link_dirs = link_dirs.opened;
        let lower = found.map_err(|e| e.layer(&self.layer_id))?;
        let rel = PathBuf::from(format!("overlay/{lower}"));
        let s = std::iter::once(self.first)
            .chain(0..stores.len())
            .find(|&i| {
                stores
                    .get(i)
                    .is_some_and(|(fd, _)| confine::exists(*fd, &rel))
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::CorruptMetadata,
                    format!("lower layer {lower} of {} has no directory", self.layer_id),
                )
                .layer(&self.layer_id)
            })?;
        let (fd, path) = stores[s];
        let diff = rel.join("diff");
        confine::open_dir(fd, &diff)
            .map(Some)
            .map_err(|e| Error::io(format!("opening {}", path.join(&diff).display()), e))
    }
}

/// Each store's `overlay/l`, opened (confined) the first time a link is looked up in it.
struct LinkDirs<'a> {
    stores: &'a [(BorrowedFd<'a>, &'a Path)],
    /// Per store: not tried yet, absent, or open.
    opened: Vec<Option<Option<OwnedFd>>>,
}

impl LinkDirs<'_> {
    /// Store `i`'s link directory, `None` if it has none.
    fn get(&mut self, i: usize) -> Result<Option<BorrowedFd<'_>>> {
        let links = Path::new("overlay/l");
        let (fd, path) = self.stores[i];
        if self.opened[i].is_none() {
            let dir = match confine::open_dir(fd, links) {
                Ok(dir) => Some(dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::io(
                        format!("opening {}", path.join(links).display()),
                        e,
                    ));
                }
            };
            self.opened[i] = Some(dir);
        }
        Ok(self.opened[i]
            .as_ref()
            .and_then(|d| d.as_ref())
            .map(AsFd::as_fd))
    }
}

/// Finds `overlay/l/<link>` in any store and returns the layer id it points to.
fn resolve_link(dirs: &mut LinkDirs<'_>, link: &str) -> Result<String> {
    let rel = Path::new("overlay/l").join(link);
    for i in 0..dirs.stores.len() {
        // The directory was opened confined, and `link` is one checked component: the link
        // read cannot be one outside the store.
        let Some(dir) = dirs.get(i)? else {
            continue;
        };
        let target = match rustix::fs::readlinkat(dir, link, Vec::new()) {
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

    /// The lowers of `id`, as a walk opens them.
    fn lowers(root: &Root, path: &Path, id: &str) -> Result<Lowers> {
        Ok(Lowers {
            stores: vec![(root.fd().try_clone_to_owned().unwrap(), path.to_owned())],
            first: 0,
            links: lower_links(root.fd(), id)?.into(),
            link_dirs: Vec::new(),
            layer_id: id.to_owned(),
        })
    }

    #[test]
    fn lowers_are_opened_through_their_links_and_only_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let o = d.path().join("overlay");
        std::fs::create_dir_all(o.join("l")).unwrap();
        std::fs::create_dir_all(o.join(A).join("diff")).unwrap();
        std::fs::create_dir_all(o.join(B).join("diff")).unwrap();
        std::fs::write(o.join(A).join("diff/in-a"), b"a").unwrap();
        std::os::unix::fs::symlink(format!("../{A}/diff"), o.join("l/LINKA")).unwrap();
        std::fs::write(o.join(B).join("lower"), "l/LINKA").unwrap();
        let root = Root::open(d.path()).unwrap();

        let mut b = lowers(&root, d.path(), B).unwrap();
        let a_diff = b.next().unwrap().expect("A is B's lower");
        assert!(confine::exists(a_diff.as_fd(), Path::new("in-a")));
        assert!(b.next().unwrap().is_none(), "one lower only");
        assert!(
            lowers(&root, d.path(), A)
                .unwrap()
                .next()
                .unwrap()
                .is_none()
        );

        // A lower file naming something other than a link, a link that leads out of the
        // store, a link that does not exist: corrupt metadata, when the lower is needed.
        std::fs::write(o.join(B).join("lower"), "l/../../x").unwrap();
        assert_eq!(
            lowers(&root, d.path(), B).unwrap_err().code(),
            ErrorCode::CorruptMetadata
        );
        std::os::unix::fs::symlink("/etc", o.join("l/EVIL")).unwrap();
        std::fs::write(o.join(B).join("lower"), "l/EVIL").unwrap();
        let mut b = lowers(&root, d.path(), B).unwrap();
        assert_eq!(b.next().unwrap_err().code(), ErrorCode::CorruptMetadata);
        std::fs::write(o.join(B).join("lower"), "l/GONE").unwrap();
        let mut b = lowers(&root, d.path(), B).unwrap();
        assert_eq!(b.next().unwrap_err().code(), ErrorCode::CorruptMetadata);
    }
}
