//! Read-only access to a containers-storage tree (overlay driver).
//!
//! [`Storage::open`] opens the configured roots as directory fds once; every later access is
//! relative to them (see [`crate::confine`]). Metadata is re-read under the stores' read locks
//! on every request, so the helper always sees what podman last committed.

pub mod config;
pub mod image_records;
pub mod layer_records;
pub mod layer_walk;
pub mod open_layer;
pub mod reference;

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cstor_protocol::{Blob, ErrorCode, ImageSummary, LayerInfo, StorageInfo};
use sha2::{Digest, Sha256};

use crate::confine::Root;
use crate::error::{Error, Result};
use crate::lock::ReadLock;
pub use config::StorageOptions;
use image_records::ImageRecord;
use layer_records::LayerRecord;
use reference::{ImageSpec, NormalizedName};

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

/// Everything `GetImage` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDetails {
    /// The image id.
    pub id: String,
    /// Its names.
    pub names: Vec<String>,
    /// Root of the store holding it.
    pub store: String,
    /// The manifest.
    pub manifest: Blob,
    /// The config.
    pub config: Blob,
    /// Layers, base first.
    pub layers: Vec<LayerInfo>,
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

    /// Checks that a reference's `[driver@graph+run]` selector names this storage.
    fn check_store_spec(&self, spec: &reference::StoreSpec, input: &str) -> Result<()> {
        if let Some(d) = &spec.driver
            && d != "overlay"
            && d != "overlay2"
        {
            return Err(Error::new(
                ErrorCode::UnsupportedDriver,
                format!("the reference selects the {d:?} driver; only overlay is supported"),
            )
            .reference(input));
        }
        if let Some(g) = &spec.graphroot {
            let same = |a: &Path, b: &Path| {
                a == b
                    || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
            };
            if !same(g, &self.options.graphroot) {
                return Err(Error::new(
                    ErrorCode::InvalidReference,
                    format!(
                        "the reference names graph root {}, but this helper serves {}; \
                         start the helper with --root {}",
                        g.display(),
                        self.options.graphroot.display(),
                        g.display()
                    ),
                )
                .reference(input));
            }
        }
        Ok(())
    }

    /// Resolves a reference to an image and reads its manifest, config and layer chain.
    ///
    /// Fails with [`ErrorCode::InvalidReference`], [`ErrorCode::ImageNotFound`],
    /// [`ErrorCode::AmbiguousReference`], [`ErrorCode::ImageDataMissing`] (no manifest or
    /// config, e.g. schema 1 images), [`ErrorCode::ChecksumMismatch`] (config bytes do not
    /// match the manifest's digest), [`ErrorCode::CorruptMetadata`] or
    /// [`ErrorCode::LayerNotFound`] (broken layer chain).
    pub fn get_image(&self, input: &str) -> Result<ImageDetails> {
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
        let (manifest, config) = self
            .read_manifest_and_config(store, image, &r.image)
            .map_err(|e| e.image(&image.id).reference(input))?;
        drop(image_locks);
        let index = self.load_layers()?;
        let layers = self
            .layer_chain(&index, image.top_layer())
            .map_err(|e| e.image(&image.id).reference(input))?;
        drop(layer_locks);
        Ok(ImageDetails {
            id: image.id.clone(),
            names: image.names.clone(),
            store: store.path().to_string_lossy().into_owned(),
            manifest,
            config,
            layers,
        })
    }

    fn read_manifest_and_config(
        &self,
        store: &Store,
        image: &ImageRecord,
        spec: &ImageSpec,
    ) -> Result<(Blob, Blob)> {
        let read =
            |key: &str| image_records::read_big_data(store.fd(), store.path(), &image.id, key);
        // A digested reference selects that manifest, unless it is a list (then the
        // per-platform manifest stored as "manifest" is the image's).
        let mut manifest = None;
        if let ImageSpec::Digested { digest, .. } = spec
            && let Some(bytes) = read(&format!("manifest-{digest}"))?
            && !is_manifest_list(&bytes)
        {
            manifest = Some(bytes);
        }
        let manifest = match manifest {
            Some(m) => m,
            None => read("manifest")?.ok_or_else(|| {
                Error::new(
                    ErrorCode::ImageDataMissing,
                    format!("image {} has no manifest", image.id),
                )
            })?,
        };
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).map_err(|e| {
            Error::new(
                ErrorCode::CorruptMetadata,
                format!("the manifest of image {} is not JSON: {e}", image.id),
            )
        })?;
        if parsed.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
            return Err(Error::new(
                ErrorCode::ImageDataMissing,
                format!(
                    "image {} has a Docker schema 1 manifest, which has no config",
                    image.id
                ),
            ));
        }
        if is_manifest_list(&manifest) {
            return Err(Error::new(
                ErrorCode::ImageDataMissing,
                format!(
                    "image {} stores a manifest list, not an image manifest",
                    image.id
                ),
            ));
        }
        let config_digest = parsed
            .pointer("/config/digest")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::CorruptMetadata,
                    format!("the manifest of image {} names no config digest", image.id),
                )
            })?
            .to_owned();
        let config_media_type = parsed
            .pointer("/config/mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let config = read(&config_digest)?.ok_or_else(|| {
            Error::new(
                ErrorCode::ImageDataMissing,
                format!("image {} has no config {config_digest}", image.id),
            )
        })?;
        let actual = sha256_digest(&config);
        if actual != config_digest {
            return Err(Error::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "the config of image {} has digest {actual}, the manifest says {config_digest}",
                    image.id
                ),
            ));
        }
        let manifest_media_type = parsed
            .get("mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok((
            blob(manifest, manifest_media_type, "manifest", &image.id)?,
            blob(config, config_media_type, "config", &image.id)?,
        ))
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
        [store, 0].into_iter().find(|&i| {
            rustix::fs::statat(
                self.stores[i].fd(),
                &rel,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok()
        })
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
            .find(|&i| {
                rustix::fs::statat(
                    self.stores[i].fd(),
                    &rel,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .is_ok()
            })
    }
}

fn blob(bytes: Vec<u8>, media_type: Option<String>, what: &str, id: &str) -> Result<Blob> {
    let digest = sha256_digest(&bytes);
    let size = bytes.len() as u64;
    let content = String::from_utf8(bytes).map_err(|_| {
        Error::new(
            ErrorCode::CorruptMetadata,
            format!("the {what} of image {id} is not UTF-8"),
        )
    })?;
    Ok(Blob {
        digest,
        media_type,
        size,
        content,
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn is_manifest_list(bytes: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    matches!(
        v.get("mediaType").and_then(|m| m.as_str()),
        Some("application/vnd.oci.image.index.v1+json")
            | Some("application/vnd.docker.distribution.manifest.list.v2+json")
    ) || (v.get("manifests").is_some() && v.get("layers").is_none())
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
            let has = |d: &str| {
                rustix::fs::statat(graph.fd(), d, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
            };
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

/// Picks the image a reference names.
fn resolve<'a>(
    images: &'a [(usize, ImageRecord)],
    spec: &ImageSpec,
    input: &str,
) -> Result<&'a (usize, ImageRecord)> {
    let not_found = || {
        Error::new(
            ErrorCode::ImageNotFound,
            format!("no image matches {input:?}"),
        )
        .reference(input)
    };
    let by_name = |n: &NormalizedName| {
        let want = n.with_tag();
        images
            .iter()
            .find(|(_, r)| r.names.contains(&want))
            .or_else(|| {
                let alt = n.localhost_candidate()?;
                images.iter().find(|(_, r)| r.names.contains(&alt))
            })
    };
    let by_prefix = |p: &str| -> Result<Option<&'a (usize, ImageRecord)>> {
        let hits: Vec<&(usize, ImageRecord)> =
            images.iter().filter(|(_, r)| r.id.starts_with(p)).collect();
        match hits.len() {
            0 => Ok(None),
            1 => Ok(Some(hits[0])),
            _ => Err(Error::new(
                ErrorCode::AmbiguousReference,
                format!("{p:?} is a prefix of {} image ids", hits.len()),
            )
            .reference(input)
            .candidates(hits.iter().map(|(_, r)| r.id.clone()).collect())),
        }
    };
    match spec {
        ImageSpec::Id(id) => images
            .iter()
            .find(|(_, r)| r.id == *id)
            .ok_or_else(not_found),
        ImageSpec::IdPrefix(p) => by_prefix(p)?.ok_or_else(not_found),
        ImageSpec::IdPrefixOrName { prefix, name } => match by_name(name) {
            Some(hit) => Ok(hit),
            None => by_prefix(prefix)?.ok_or_else(not_found),
        },
        ImageSpec::Name(n) => by_name(n).ok_or_else(not_found),
        ImageSpec::Digested { name, digest } => {
            let exact = format!("{}@{digest}", name.repository);
            if let Some(hit) = images.iter().find(|(_, r)| r.names.contains(&exact)) {
                return Ok(hit);
            }
            let repos = std::iter::once(name.repository.clone())
                .chain(
                    name.localhost_candidate()
                        .map(|c| reference::repository_of(&c).to_owned()),
                )
                .collect::<Vec<_>>();
            images
                .iter()
                .find(|(_, r)| {
                    r.manifest_digests().any(|d| d == digest)
                        && r.names
                            .iter()
                            .any(|n| repos.iter().any(|repo| reference::repository_of(n) == repo))
                })
                .ok_or_else(not_found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, names: &[&str], digest: Option<&str>) -> (usize, ImageRecord) {
        (
            0,
            ImageRecord {
                id: id.into(),
                digest: digest.map(Into::into),
                names: names.iter().map(|s| s.to_string()).collect(),
                top_layer: None,
                big_data_digests: Default::default(),
                big_data_names: vec![],
                created: None,
            },
        )
    }

    fn images() -> Vec<(usize, ImageRecord)> {
        vec![
            rec(
                &format!("abc1{}", "0".repeat(60)),
                &["docker.io/library/busybox:latest"],
                None,
            ),
            rec(
                &format!("abc2{}", "0".repeat(60)),
                &["localhost/myimg:latest", "quay.io/x/y:1"],
                Some(&format!("sha256:{}", "d".repeat(64))),
            ),
            rec(&format!("fed{}", "0".repeat(61)), &[], None),
        ]
    }

    fn find(input: &str) -> Result<String> {
        let imgs = images();
        let r = reference::parse(input)?;
        resolve(&imgs, &r.image, input).map(|(_, r)| r.id.clone())
    }

    #[test]
    fn resolves_every_form() {
        let a = format!("abc1{}", "0".repeat(60));
        let b = format!("abc2{}", "0".repeat(60));
        let c = format!("fed{}", "0".repeat(61));
        assert_eq!(find("busybox").unwrap(), a);
        assert_eq!(find("docker.io/library/busybox").unwrap(), a);
        assert_eq!(find(&a).unwrap(), a);
        assert_eq!(find(&format!("sha256:{a}")).unwrap(), a);
        assert_eq!(find("abc1").unwrap(), a);
        assert_eq!(find("fed").unwrap(), c);
        assert_eq!(find("myimg").unwrap(), b);
        assert_eq!(find("localhost/myimg").unwrap(), b);
        assert_eq!(find("quay.io/x/y:1").unwrap(), b);
        assert_eq!(
            find(&format!("quay.io/x/y@sha256:{}", "d".repeat(64))).unwrap(),
            b
        );
        assert_eq!(find("whatever@abc2").unwrap(), b);
    }

    #[test]
    fn failures_have_codes() {
        assert_eq!(
            find("abc").unwrap_err().code(),
            ErrorCode::AmbiguousReference
        );
        assert_eq!(find("abc").unwrap_err().details().candidates.len(), 2);
        assert_eq!(find("nope").unwrap_err().code(), ErrorCode::ImageNotFound);
        assert_eq!(
            find("quay.io/x/y:2").unwrap_err().code(),
            ErrorCode::ImageNotFound
        );
        // The digest matches, but the repository does not.
        assert_eq!(
            find(&format!("quay.io/other@sha256:{}", "d".repeat(64)))
                .unwrap_err()
                .code(),
            ErrorCode::ImageNotFound
        );
    }
}
