//! Read-only access to a containers-storage tree (overlay driver).
//!
//! [`Storage::open`] opens the configured roots as directory fds once; every later access is
//! relative to them (see [`crate::confine`]). Metadata is re-read under the stores' read locks
//! on every request, so the helper always sees what podman last committed.
//!
//! This module opens the stores, orders and locks them, lists images and follows layer
//! chains. The rest is one module per concept: [`config`] finds the storage configuration;
//! [`image_records`] and [`layer_records`] read what `images.json` and `layers.json` say;
//! [`reference`](mod@reference) parses image references, `resolve` picks the image one names, and
//! `manifest` reads the manifest and config `GetImage` serves; [`open_layer`] finds and pins
//! a layer and [`layer_walk`] walks it with its content files opened.

pub mod config;
pub mod image_records;
pub mod layer_records;
pub mod layer_walk;
mod manifest;
pub mod open_layer;
mod records_file;
pub mod reference;
mod resolve;

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cstor_protocol::{ErrorCode, GetImageResult, ImageSummary, LayerInfo, StorageInfo};

use crate::confine::{self, Root};
use crate::error::{Error, Result};
use crate::lock::ReadLock;
pub use config::StorageOptions;
use image_records::ImageRecord;
use layer_records::LayerRecord;
pub use manifest::sha256_digest;
use resolve::resolve;

/// What a store root is to the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    /// The graph root: layers, and images unless `imagestore` is set.
    Graph,
    /// The separate `imagestore` root.
    ImageStore,
    /// A read-only additional image store.
    Additional,
}

/// One opened store root.
#[derive(Debug)]
pub struct Store {
    root: Root,
    role: StoreRole,
}

impl Store {
    /// The root's path.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// The root's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.fd()
    }

    /// The store's role.
    pub fn role(&self) -> StoreRole {
        self.role
    }
}

/// An opened containers-storage.
#[derive(Debug)]
pub struct Storage {
    options: StorageOptions,
    stores: Vec<Store>,
    lock_timeout: Duration,
}

/// Layer records of all stores, indexed by id (first store wins).
struct LayerIndex {
    by_id: HashMap<String, (usize, LayerRecord)>,
    order: Vec<String>,
}

impl Storage {
    /// Opens the roots named by `options`.
    ///
    /// Fails with [`ErrorCode::UnsupportedDriver`] when the storage uses another driver than
    /// overlay (named in the message), and [`ErrorCode::StorageUnavailable`] when a root
    /// cannot be opened.
    pub fn open(options: StorageOptions, lock_timeout: Duration) -> Result<Self> {
        let graph = open_root(&options.graphroot, "graph root")?;
        check_driver(options.driver.as_deref(), &graph)?;
        let mut stores = vec![Store {
            root: graph,
            role: StoreRole::Graph,
        }];
        if let Some(is) = &options.imagestore {
            stores.push(Store {
                root: open_root(is, "image store")?,
                role: StoreRole::ImageStore,
            });
        }
        for p in options.additional_image_stores() {
            let root = open_root(&p, "additional image store")?;
            stores.push(Store {
                root,
                role: StoreRole::Additional,
            });
        }
        Ok(Self {
            options,
            stores,
            lock_timeout,
        })
    }

    /// The options the storage was opened with.
    pub fn options(&self) -> &StorageOptions {
        &self.options
    }

    /// How long a read lock is waited for (`--lock-timeout`).
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// The opened stores, graph root first.
    pub fn stores(&self) -> &[Store] {
        &self.stores
    }

    /// What `Initialize` reports.
    pub fn info(&self) -> StorageInfo {
        let s = |p: &Path| p.to_string_lossy().into_owned();
        StorageInfo {
            driver: "overlay".into(),
            graphroot: s(&self.options.graphroot),
            runroot: s(&self.options.runroot),
            imagestore: self.options.imagestore.as_deref().map(s),
            additional_image_stores: self
                .stores
                .iter()
                .filter(|st| st.role == StoreRole::Additional)
                .map(|st| s(st.path()))
                .collect(),
            rootless: self.options.rootless,
            config_files: self.options.config_files.iter().map(|p| s(p)).collect(),
        }
    }

    /// Stores in image lookup order: the image store (imagestore, else graph root), then
    /// the graph root when an imagestore is set, then additional stores.
    fn image_store_order(&self) -> Vec<usize> {
        let mut v: Vec<usize> = Vec::with_capacity(self.stores.len());
        v.extend(self.role_indices(StoreRole::ImageStore));
        v.extend(self.role_indices(StoreRole::Graph));
        v.extend(self.role_indices(StoreRole::Additional));
        v
    }

    fn role_indices(&self, role: StoreRole) -> impl Iterator<Item = usize> + '_ {
        self.stores
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.role == role)
            .map(|(i, _)| i)
    }

    /// Shared locks on every store's `layers.lock`, graph root first (c/storage's order).
    pub fn lock_layers(&self) -> Result<Vec<ReadLock>> {
        self.lock_all("overlay-layers/layers.lock", 0..self.stores.len())
    }

    /// Shared locks on every store's `images.lock`, in image lookup order.
    fn lock_images(&self) -> Result<Vec<ReadLock>> {
        self.lock_all("overlay-images/images.lock", self.image_store_order())
    }

    fn lock_all(&self, rel: &str, order: impl IntoIterator<Item = usize>) -> Result<Vec<ReadLock>> {
        let mut held = Vec::new();
        for i in order {
            let st = &self.stores[i];
            let what = st.path().join(rel).display().to_string();
            if let Some(l) = ReadLock::acquire(st.fd(), Path::new(rel), &what, self.lock_timeout)? {
                held.push(l);
            }
        }
        Ok(held)
    }

    fn load_images(&self) -> Result<Vec<(usize, ImageRecord)>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for i in self.image_store_order() {
            let st = &self.stores[i];
            for r in image_records::load(st.fd(), st.path())? {
                // An id present in two stores is the same image; the first store wins.
                if seen.insert(r.id.clone()) {
                    out.push((i, r));
                }
            }
        }
        Ok(out)
    }

    fn load_layers(&self) -> Result<LayerIndex> {
        let mut idx = LayerIndex {
            by_id: HashMap::new(),
            order: Vec::new(),
        };
        for (i, st) in self.stores.iter().enumerate() {
            for r in layer_records::load(st.fd(), st.path())? {
                if !idx.by_id.contains_key(&r.id) {
                    idx.order.push(r.id.clone());
                    idx.by_id.insert(r.id.clone(), (i, r));
                }
            }
        }
        Ok(idx)
    }

    /// Every image of every store.
    pub fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let _locks = self.lock_images()?;
        let images = self.load_images()?;
        Ok(images
            .into_iter()
            .map(|(i, r)| ImageSummary {
                top_layer: r.top_layer().map(str::to_owned),
                id: r.id,
                names: r.names,
                digest: r.digest.filter(|d| !d.is_empty()),
                created: r.created,
                store: self.stores[i].path().to_string_lossy().into_owned(),
            })
            .collect())
    }

    /// Resolves a reference to an image and reads its manifest, config and layer chain.
    ///
    /// Fails with [`ErrorCode::InvalidReference`], [`ErrorCode::ImageNotFound`],
    /// [`ErrorCode::AmbiguousReference`], [`ErrorCode::ImageDataMissing`] (no manifest or
    /// config, e.g. schema 1 images), [`ErrorCode::ChecksumMismatch`] (config bytes do not
    /// match the manifest's digest), [`ErrorCode::CorruptMetadata`] or
    /// [`ErrorCode::LayerNotFound`] (broken layer chain).
    pub fn get_image(&self, input: &str) -> Result<GetImageResult> {
        let r = reference::parse(input)?;
        if let Some(spec) = &r.store {
            self.check_store_spec(spec, input)?;
        }
        // c/storage's lock order: layer stores before image stores.
        let layer_locks = self.lock_layers()?;
        let image_locks = self.lock_images()?;
        let images = self.load_images()?;
        let (store_idx, image) = resolve(&images, &r.image, input)?;
        let store = &self.stores[*store_idx];
        let (manifest, config) = manifest::read_manifest_and_config(store, image, &r.image)
            .map_err(|e| e.image(&image.id).reference(input))?;
        drop(image_locks);
        let index = self.load_layers()?;
        let layers = self
            .layer_chain(&index, image.top_layer())
            .map_err(|e| e.image(&image.id).reference(input))?;
        drop(layer_locks);
        Ok(GetImageResult {
            id: image.id.clone(),
            names: image.names.clone(),
            store: store.path().to_string_lossy().into_owned(),
            manifest,
            config,
            layers,
        })
    }

    fn layer_chain(&self, index: &LayerIndex, top: Option<&str>) -> Result<Vec<LayerInfo>> {
        let mut chain = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = top.map(str::to_owned);
        while let Some(id) = next {
            if !seen.insert(id.clone()) {
                return Err(Error::new(
                    ErrorCode::CorruptMetadata,
                    format!("the layer chain loops at layer {id}"),
                )
                .layer(id));
            }
            let (store, rec) = index.by_id.get(&id).ok_or_else(|| {
                Error::new(
                    ErrorCode::LayerNotFound,
                    format!("layer {id} of the image's chain is not in any layer store"),
                )
                .layer(&id)
            })?;
            if rec.incomplete() {
                return Err(Error::new(
                    ErrorCode::LayerNotFound,
                    format!("layer {id} is incomplete (being created or deleted)"),
                )
                .layer(&id));
            }
            chain.push(self.layer_info(*store, rec));
            next = rec.parent().map(str::to_owned);
        }
        chain.reverse();
        Ok(chain)
    }

    fn tar_split_rel(id: &str) -> PathBuf {
        PathBuf::from(format!("overlay-layers/{id}.tar-split.gz"))
    }

    /// The store holding a layer's tar-split: its own store, else the graph root (where
    /// c/storage keeps tar-split even for imagestore layers).
    fn tar_split_store(&self, store: usize, id: &str) -> Option<usize> {
        let rel = Self::tar_split_rel(id);
        [store, 0]
            .into_iter()
            .find(|&i| confine::exists(self.stores[i].fd(), &rel))
    }

    fn layer_info(&self, store: usize, rec: &LayerRecord) -> LayerInfo {
        LayerInfo {
            id: rec.id.clone(),
            parent: rec.parent().map(str::to_owned),
            diff_id: rec.diff_id().map(str::to_owned),
            diff_size: rec.diff_size(),
            compressed_digest: rec.compressed_digest.clone().filter(|d| !d.is_empty()),
            compressed_size: rec.compressed_size.and_then(|s| u64::try_from(s).ok()),
            tar_split: self.tar_split_store(store, &rec.id).is_some(),
            store: self.stores[store].path().to_string_lossy().into_owned(),
        }
    }

    /// Finds the store that holds `overlay/<id>`, preferring `first`.
    fn layer_dir_store(&self, first: usize, id: &str) -> Option<usize> {
        let rel = PathBuf::from(format!("overlay/{id}"));
        std::iter::once(first)
            .chain(0..self.stores.len())
            .find(|&i| confine::exists(self.stores[i].fd(), &rel))
    }
}

fn open_root(path: &Path, what: &str) -> Result<Root> {
    Root::open(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (has podman ever used this storage? pass --root to choose another)"
        } else {
            ""
        };
        Error::io(format!("opening {what} {}{hint}", path.display()), e)
            .with_code(ErrorCode::StorageUnavailable)
    })
}

/// Refuses storage that another driver manages. With no driver configured, the graph root
/// tells: c/storage names its metadata directories after the driver.
fn check_driver(driver: Option<&str>, graph: &Root) -> Result<()> {
    match driver {
        Some("overlay") | Some("overlay2") => Ok(()),
        Some(other) => Err(Error::new(
            ErrorCode::UnsupportedDriver,
            format!(
                "the storage at {} uses the {other:?} graph driver; cstor-helper reads only overlay",
                graph.path().display()
            ),
        )),
        None => {
            let has = |d: &str| confine::exists(graph.fd(), Path::new(d));
            if has("overlay-layers") || has("overlay-images") {
                return Ok(());
            }
            for other in ["vfs", "btrfs", "zfs", "aufs", "devicemapper"] {
                if has(&format!("{other}-layers")) {
                    return Err(Error::new(
                        ErrorCode::UnsupportedDriver,
                        format!(
                            "the storage at {} uses the {other:?} graph driver; cstor-helper reads only overlay",
                            graph.path().display()
                        ),
                    ));
                }
            }
            Ok(())
        }
    }
}
