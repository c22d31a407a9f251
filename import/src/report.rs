//! What an import did: per layer and in total, in the terms of composefs-oci's own pull
//! result, plus what only this importer knows (reflinked vs. copied, why a copy happened,
//! where the EROFS tree came from).

use std::time::Duration;

use composefs_oci::{ImportStats, PullResult};
use serde::Serialize;

use crate::objects::Stored;

/// How objects of one layer (or a whole import) were stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ObjectStats {
    /// New objects made by reflink.
    pub reflinked: u64,
    /// New objects made by copying.
    pub copied: u64,
    /// New objects that are the layer file itself, hardlinked
    /// ([`crate::CopyPolicy::ReflinkOrHardlink`]).
    pub hardlinked: u64,
    /// Objects the repository already had.
    pub present: u64,
    /// Files stored inline in the splitstream (64 bytes or less).
    pub inlined: u64,
    /// Bytes of reflinked objects.
    pub bytes_reflinked: u64,
    /// Bytes of copied objects.
    pub bytes_copied: u64,
    /// Bytes of hardlinked objects.
    pub bytes_hardlinked: u64,
    /// Bytes of objects already present.
    pub bytes_present: u64,
    /// Bytes inline: small files plus every tar header and padding byte.
    pub bytes_inlined: u64,
}

impl ObjectStats {
    pub(crate) fn count(&mut self, how: Stored, size: u64) {
        match how {
            Stored::Reflinked => {
                self.reflinked += 1;
                self.bytes_reflinked += size;
            }
            Stored::Copied => {
                self.copied += 1;
                self.bytes_copied += size;
            }
            Stored::Hardlinked => {
                self.hardlinked += 1;
                self.bytes_hardlinked += size;
            }
            Stored::AlreadyPresent => {
                self.present += 1;
                self.bytes_present += size;
            }
        }
    }

    pub(crate) fn add(&mut self, o: &ObjectStats) {
        self.reflinked += o.reflinked;
        self.copied += o.copied;
        self.hardlinked += o.hardlinked;
        self.bytes_hardlinked += o.bytes_hardlinked;
        self.present += o.present;
        self.inlined += o.inlined;
        self.bytes_reflinked += o.bytes_reflinked;
        self.bytes_copied += o.bytes_copied;
        self.bytes_present += o.bytes_present;
        self.bytes_inlined += o.bytes_inlined;
    }
}

/// One layer in an [`ImportReport`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LayerReport<ObjectID> {
    /// Position in the image.
    pub index: usize,
    /// The storage layer id.
    pub layer_id: String,
    /// The diff id.
    pub diff_id: String,
    /// Uncompressed size.
    pub bytes: u64,
    /// The layer splitstream's fs-verity id.
    pub verity: ObjectID,
    /// Whether it was already in the repository.
    pub skipped: bool,
    /// How its objects were stored (zero when skipped).
    pub stats: ObjectStats,
    /// Time spent importing it.
    pub elapsed: Duration,
}

impl<ObjectID: Clone> LayerReport<ObjectID> {
    /// A layer the repository already had (or that repeats an earlier one in the image).
    pub(crate) fn skipped(
        index: usize,
        l: &cstor_protocol::LayerInfo,
        diff_id: &str,
        verity: &ObjectID,
    ) -> Self {
        Self {
            index,
            layer_id: l.id.clone(),
            diff_id: diff_id.to_owned(),
            bytes: l.diff_size.unwrap_or(0),
            verity: verity.clone(),
            skipped: true,
            stats: ObjectStats::default(),
            elapsed: Duration::ZERO,
        }
    }
}

/// What [`crate::import_image`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct ImportReport<ObjectID> {
    /// The reference as given.
    pub reference: String,
    /// The image id in containers-storage.
    pub image_id: String,
    /// The tag written.
    pub tag: String,
    /// composefs-oci's own pull result: manifest and config digests and stream verities,
    /// and its import statistics.
    pub pull: PullResult<ObjectID>,
    /// The EROFS image (of the repository's default format).
    pub erofs_image: ObjectID,
    /// The boot variant of the EROFS image, when [`crate::ImportOptions::bootable`] asked
    /// for it.
    pub boot_image: Option<ObjectID>,
    /// Per layer, base first.
    pub layers: Vec<LayerReport<ObjectID>>,
    /// Totals over all layers.
    pub objects: ObjectStats,
    /// The first reason a reflink fell back to a copy, if one did.
    pub first_reflink_fallback: Option<String>,
    /// Whether the image was already complete in the repository.
    pub already_complete: bool,
    /// Whether the image has `/usr` (if not, the EROFS root comes from the tar's root
    /// entry); `None` when the EROFS image already existed.
    pub has_usr: Option<bool>,
    /// Where the EROFS image's file tree came from (built while streaming, or read back from
    /// the layer streams); `None` when the EROFS image already existed.
    pub tree: Option<TreeSource>,
    /// Wall time.
    pub elapsed: Duration,
}

impl<ObjectID> ImportReport<ObjectID> {
    /// composefs-oci's statistics for this import.
    pub fn stats(&self) -> &ImportStats {
        &self.pull.stats
    }
}

/// composefs-oci's statistics from ours.
pub(crate) fn import_stats<ObjectID>(
    layers: &[LayerReport<ObjectID>],
    objects: &ObjectStats,
) -> ImportStats {
    ImportStats {
        layers: layers.len() as u64,
        layers_already_present: layers.iter().filter(|l| l.skipped).count() as u64,
        objects_copied: objects.copied,
        objects_reflinked: objects.reflinked,
        objects_hardlinked: objects.hardlinked,
        objects_already_present: objects.present,
        bytes_copied: objects.bytes_copied,
        bytes_reflinked: objects.bytes_reflinked,
        bytes_hardlinked: objects.bytes_hardlinked,
        bytes_inlined: objects.bytes_inlined,
    }
}

/// Where an import took the file tree of the EROFS image it wrote from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TreeSource {
    /// Built while the layers streamed, from the pieces of their splitstreams (the usual
    /// case).
    Streamed,
    /// Read back from the stored layer streams after the last layer: every layer was in
    /// the repository already, the image lists one layer twice, or the tree thread gave up
    /// (a backlog or entry count over its bounds) or failed (logged as a warning). Same
    /// image, built later: reading the streams back adds to the import's serial tail.
    ReadBack,
}
