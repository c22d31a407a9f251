//! Naming the layer streams an import stored: `streams/oci-layer-<diff id>` is written only
//! once a `syncfs` has made the stream and its objects durable, and one `syncfs` serves
//! every layer, run in the background while the EROFS image is built.

use std::sync::Arc;

use composefs::fsverity::FsVerityHashValue;
use composefs::repository::Repository;

use crate::error::{Error, Result, repo_err};

/// A layer stream stored by this import but not named yet: its diff id and verity.
pub type Unnamed<ObjectID> = (String, ObjectID);

/// A `syncfs` of the repository running in the background.
pub struct PendingSync(std::thread::JoinHandle<anyhow::Result<()>>);

impl PendingSync {
    /// Starts `syncfs` on the repository's filesystem in a thread of its own.
    pub fn start<ObjectID: FsVerityHashValue>(repo: &Arc<Repository<ObjectID>>) -> Result<Self> {
        let repo = repo.clone();
        std::thread::Builder::new()
            .name("cstor-syncfs".into())
            .spawn(move || repo.sync())
            .map(Self)
            .map_err(|e| Error::io("starting the syncfs thread", e))
    }

    /// Waits for it.
    pub fn wait(self) -> Result<()> {
        self.0
            .join()
            .map_err(|_| {
                Error::io(
                    "syncing the repository",
                    std::io::Error::other("the syncfs thread panicked"),
                )
            })?
            .map_err(repo_err("syncing the repository"))
    }
}

/// Names the layer streams in `layers` (`streams/oci-layer-<diff id>`), once `sync` (a
/// `syncfs` started after they were stored, or a new one if `None`) has made them and their
/// objects durable: a named stream never refers to data that is not on disk, as with
/// composefs' `write_stream`, which syncs once per stream.
pub fn name_layers<ObjectID: FsVerityHashValue>(
    repo: &Arc<Repository<ObjectID>>,
    sync: Option<PendingSync>,
    layers: &[Unnamed<ObjectID>],
) -> Result<()> {
    match sync {
        Some(sync) => sync.wait()?,
        None if layers.is_empty() => return Ok(()),
        None => repo.sync().map_err(repo_err("syncing the repository"))?,
    }
    for (diff_id, verity) in layers {
        repo.symlink(
            format!("streams/{}", crate::layer_identifier(diff_id)),
            format!("objects/{}", verity.to_object_pathname()),
        )
        .map_err(repo_err(format!("naming the layer stream of {diff_id}")))?;
    }
    Ok(())
}

/// Names this import's layer streams once the background syncfs is done: at
/// [`finish`](Self::finish), or when dropped on an early return (best effort: a later
/// import then skips those layers).
pub(super) struct Naming<'a, ObjectID: FsVerityHashValue> {
    repo: &'a Arc<Repository<ObjectID>>,
    sync: Option<PendingSync>,
    layers: &'a [Unnamed<ObjectID>],
    done: bool,
}

impl<'a, ObjectID: FsVerityHashValue> Naming<'a, ObjectID> {
    /// Starts the syncfs that must precede naming `layers`.
    pub(super) fn start(
        repo: &'a Arc<Repository<ObjectID>>,
        layers: &'a [Unnamed<ObjectID>],
    ) -> Result<Self> {
        let sync = if layers.is_empty() {
            None
        } else {
            Some(PendingSync::start(repo)?)
        };
        Ok(Self {
            repo,
            sync,
            layers,
            done: layers.is_empty(),
        })
    }

    /// Waits for the syncfs and names the layers (once).
    pub(super) fn finish(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(());
        }
        name_layers(self.repo, self.sync.take(), self.layers)
    }
}

impl<ObjectID: FsVerityHashValue> Drop for Naming<'_, ObjectID> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("naming the layer streams of a failed import: {e}");
        }
    }
}
