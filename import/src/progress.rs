//! Progress of an import, told as it happens, without ever blocking the import.
//!
//! Two listeners can be attached, together or alone: composefs' own
//! [`ProgressReporter`](composefs::progress::ProgressReporter), which `cfsctl` and bootc
//! already render (a layer is a component counted in bytes, skipped layers are
//! `Skipped`, the finalize step is a `Message`), and a channel of [`ImportEvent`]s, which
//! carry more: totals before the first layer is read and how each layer's objects were
//! stored.

use composefs::progress::{ComponentId, ProgressEvent, ProgressUnit, SharedReporter};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::report::ObjectStats;

/// Progress of an import, sent without ever blocking the import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ImportEvent {
    /// Totals, known before any layer is read.
    #[non_exhaustive]
    Started {
        /// Layers of the image.
        layers: usize,
        /// Layers already in the repository (skipped without reading).
        layers_present: usize,
        /// Uncompressed size of all layers.
        bytes: u64,
        /// Uncompressed size of the layers already present.
        bytes_present: u64,
    },
    /// A layer started streaming.
    #[non_exhaustive]
    LayerStarted {
        /// Position in the image (0 = base).
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
    },
    /// Bytes of a layer processed so far.
    #[non_exhaustive]
    LayerProgress {
        /// Position in the image.
        index: usize,
        /// Bytes done.
        bytes_done: u64,
    },
    /// A layer was stored (it is named with the others at the end).
    #[non_exhaustive]
    LayerDone {
        /// Position in the image.
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
        /// How its objects were stored.
        stats: ObjectStats,
    },
    /// A layer was already in the repository.
    #[non_exhaustive]
    LayerSkipped {
        /// Position in the image.
        index: usize,
        /// Its diff id.
        diff_id: String,
        /// Its uncompressed size.
        bytes: u64,
    },
    /// Writing the config, manifest, EROFS image and tag.
    Finalizing,
    /// Done.
    Finished,
}

/// Where an import tells its progress: the options' channel and reporter, either or both.
#[derive(Clone, Default)]
pub(crate) struct Progress {
    events: Option<UnboundedSender<ImportEvent>>,
    reporter: Option<SharedReporter>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("events", &self.events.is_some())
            .field("reporter", &self.reporter.is_some())
            .finish()
    }
}

impl Progress {
    pub(crate) fn new(
        events: Option<UnboundedSender<ImportEvent>>,
        reporter: Option<SharedReporter>,
    ) -> Self {
        Self { events, reporter }
    }

    /// Bytes `done` of `total` of layer `index` (`diff_id`) are imported.
    pub(crate) fn layer_progress(&self, index: usize, diff_id: &str, done: u64, total: u64) {
        if let Some(r) = &self.reporter {
            r.report(ProgressEvent::Progress {
                id: ComponentId::from(diff_id),
                fetched: done,
                total: Some(total),
            });
        }
        if let Some(tx) = &self.events {
            let _ = tx.send(ImportEvent::LayerProgress {
                index,
                bytes_done: done,
            });
        }
    }

    /// Tells `e` to both listeners. A closed channel is not an error: the caller stopped
    /// listening, the import goes on.
    pub(crate) fn send(&self, e: ImportEvent) {
        if let Some(r) = &self.reporter
            && let Some(translated) = to_composefs(&e)
        {
            r.report(translated);
        }
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }
}

/// The composefs event for one of ours, as composefs-oci's own containers-storage import
/// reports: one component per layer, named by its diff id, counted in bytes.
fn to_composefs(e: &ImportEvent) -> Option<ProgressEvent> {
    Some(match e {
        ImportEvent::Started { .. } | ImportEvent::Finished => return None,
        ImportEvent::LayerStarted { diff_id, bytes, .. } => ProgressEvent::Started {
            id: ComponentId::from(diff_id.as_str()),
            total: Some(*bytes),
            unit: ProgressUnit::Bytes,
        },
        // The event does not name the layer: see `Progress::layer_progress`.
        ImportEvent::LayerProgress { .. } => return None,
        ImportEvent::LayerDone { diff_id, bytes, .. } => ProgressEvent::Done {
            id: ComponentId::from(diff_id.as_str()),
            transferred: *bytes,
        },
        ImportEvent::LayerSkipped { diff_id, .. } => ProgressEvent::Skipped {
            id: ComponentId::from(diff_id.as_str()),
        },
        ImportEvent::Finalizing => ProgressEvent::Message("Layers imported".into()),
    })
}
