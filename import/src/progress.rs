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
    /// An ostree commit's tree was walked: its totals, known before any file is read.
    /// Content bytes are not among them: a dirtree names its files by checksum only, their
    /// sizes come as the helper opens them.
    #[non_exhaustive]
    OstreeStarted {
        /// The commit checksum.
        commit: String,
        /// Metadata objects (commit, dirtrees, dirmetas), all fetched and verified by now.
        metadata_objects: u64,
        /// Distinct file objects to verify and store.
        files: u64,
    },
    /// File objects of an ostree commit verified and stored so far.
    #[non_exhaustive]
    OstreeProgress {
        /// Files done, of `OstreeStarted::files`.
        files_done: u64,
        /// Their content bytes.
        bytes_done: u64,
    },
    /// Writing the config, manifest, EROFS image and tag (for an ostree commit: the EROFS
    /// image and the commit stream).
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

    /// `files_done` of `files` file objects of ostree commit `commit` are stored, with
    /// `bytes_done` content bytes.
    pub(crate) fn ostree_progress(
        &self,
        commit: &str,
        files_done: u64,
        files: u64,
        bytes_done: u64,
    ) {
        if let Some(r) = &self.reporter {
            r.report(ProgressEvent::Progress {
                id: ComponentId::from(commit),
                fetched: files_done,
                total: Some(files),
            });
            if files_done == files {
                r.report(ProgressEvent::Done {
                    id: ComponentId::from(commit),
                    transferred: files,
                });
            }
        }
        if let Some(tx) = &self.events {
            let _ = tx.send(ImportEvent::OstreeProgress {
                files_done,
                bytes_done,
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
        // An ostree commit is one component counted in file objects, as composefs-ostree
        // counts what it pulls.
        ImportEvent::OstreeStarted { commit, files, .. } => ProgressEvent::Started {
            id: ComponentId::from(commit.as_str()),
            total: Some(*files),
            unit: ProgressUnit::Items,
        },
        // The event does not name the commit: see `Progress::ostree_progress`.
        ImportEvent::OstreeProgress { .. } => return None,
        ImportEvent::Finalizing => ProgressEvent::Message("Layers imported".into()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use composefs::progress::ProgressReporter;

    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<ProgressEvent>>);

    impl ProgressReporter for Collect {
        fn report(&self, event: ProgressEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    /// composefs' renderers see an ostree commit as one component counted in items, which
    /// is done when its last file is.
    #[test]
    fn an_ostree_commit_is_one_composefs_component_counted_in_files() {
        let collect = Arc::new(Collect::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let p = Progress::new(Some(tx), Some(collect.clone()));
        p.send(ImportEvent::OstreeStarted {
            commit: "c0ffee".into(),
            metadata_objects: 3,
            files: 2,
        });
        p.ostree_progress("c0ffee", 1, 2, 10);
        p.ostree_progress("c0ffee", 2, 2, 30);
        let id = || ComponentId::from("c0ffee");
        assert_eq!(
            *collect.0.lock().unwrap(),
            [
                ProgressEvent::Started {
                    id: id(),
                    total: Some(2),
                    unit: ProgressUnit::Items
                },
                ProgressEvent::Progress {
                    id: id(),
                    fetched: 1,
                    total: Some(2)
                },
                ProgressEvent::Progress {
                    id: id(),
                    fetched: 2,
                    total: Some(2)
                },
                ProgressEvent::Done {
                    id: id(),
                    transferred: 2
                },
            ]
        );
        rx.try_recv().unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            ImportEvent::OstreeProgress {
                files_done: 1,
                bytes_done: 10
            }
        );
    }
}
