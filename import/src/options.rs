//! What a caller can ask of an import: the tag, how contents are stored, how much
//! parallelism, where progress goes, how to cancel, and whether to build the boot variant.

use composefs::progress::SharedReporter;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

pub use crate::objects::CopyPolicy;
use crate::progress::ImportEvent;

/// Options of [`crate::import_image`]. Start from [`ImportOptions::default`] (or `new`) and
/// set what differs, with the builder methods or by assigning fields:
///
/// ```
/// use cstor_import::{CopyPolicy, ImportOptions};
/// let options = ImportOptions::new()
///     .tag("myimage")
///     .copy_policy(CopyPolicy::ReflinkOnly)
///     .object_threads(4);
/// assert_eq!(options.tag.as_deref(), Some("myimage"));
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ImportOptions {
    /// The tag to write (`streams/refs/oci/<tag>`); default `containers-storage:<reference>`,
    /// as `cfsctl oci pull containers-storage:<reference>` names it.
    pub tag: Option<String>,
    /// Reflink, copy, hardlink, or insist on reflinks.
    pub copy_policy: CopyPolicy,
    /// Threads storing objects; default: the number of CPUs.
    pub object_threads: Option<usize>,
    /// Layers imported at once; default: up to 4 (fewer when the fd limit is low).
    pub layer_jobs: Option<usize>,
    /// composefs' progress reporter, as `composefs_oci::PullOptions::progress` takes it: a
    /// renderer written for `cfsctl oci pull` shows this import unchanged.
    pub progress: Option<SharedReporter>,
    /// A channel of this importer's own, richer events (totals up front, how each layer's
    /// objects were stored). Never blocks the import.
    pub events: Option<UnboundedSender<ImportEvent>>,
    /// Cancels the import when triggered: the layer readers and object workers stop at the
    /// next file (a large file at its next chunk), the layers are released, the layers
    /// stored completely are named, and the import fails with [`crate::Error::Cancelled`].
    /// Dropping the import's future stops it as promptly, but then nothing is left to name
    /// the complete layers: a later import stores them again.
    pub cancel: Option<CancellationToken>,
    /// Also write the boot variant of the EROFS image (composefs' boot transform with its
    /// default options), as `composefs_oci::PullOptions::bootable` does.
    pub bootable: bool,
}

impl std::fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("tag", &self.tag)
            .field("copy_policy", &self.copy_policy)
            .field("object_threads", &self.object_threads)
            .field("layer_jobs", &self.layer_jobs)
            .field(
                "progress",
                &self.progress.as_ref().map(|_| "<ProgressReporter>"),
            )
            .field("events", &self.events.is_some())
            .field("cancel", &self.cancel)
            .field("bootable", &self.bootable)
            .finish()
    }
}

impl ImportOptions {
    /// The defaults: tag as `cfsctl` would, reflink or copy, one object thread per CPU.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ImportOptions::tag`].
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Sets [`ImportOptions::copy_policy`].
    pub fn copy_policy(mut self, policy: CopyPolicy) -> Self {
        self.copy_policy = policy;
        self
    }

    /// Sets [`ImportOptions::object_threads`].
    pub fn object_threads(mut self, n: usize) -> Self {
        self.object_threads = Some(n);
        self
    }

    /// Sets [`ImportOptions::layer_jobs`].
    pub fn layer_jobs(mut self, n: usize) -> Self {
        self.layer_jobs = Some(n);
        self
    }

    /// Sets [`ImportOptions::progress`].
    pub fn progress(mut self, reporter: SharedReporter) -> Self {
        self.progress = Some(reporter);
        self
    }

    /// Sets [`ImportOptions::events`].
    pub fn events(mut self, tx: UnboundedSender<ImportEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// Sets [`ImportOptions::cancel`].
    pub fn cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Sets [`ImportOptions::bootable`].
    pub fn bootable(mut self, yes: bool) -> Self {
        self.bootable = yes;
        self
    }
}
