//! The layer importers' side of the tree thread: each sends what it writes into its
//! splitstream (inline bytes, object references) in batches, without ever blocking, and
//! gives up, leaving the tree to be read back from the streams, when too much is waiting.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;

/// One piece of a layer's splitstream, in stream order.
#[derive(Debug)]
pub enum Piece<ObjectID> {
    /// Inline bytes (tar headers, padding, small files).
    Inline(Vec<u8>),
    /// A file's contents, stored as this object.
    External(ObjectID),
    /// The layer's stream is complete and matched its diff id.
    Done,
    /// The importer stopped feeding (too much was waiting): the tree thread gives up and
    /// the finalize step reads the streams.
    GaveUp,
}

/// Inline bytes sent to the tree thread and not parsed yet, for all layers; above
/// [`BACKLOG_MAX`] the feeds give up. The tree thread runs at the lowest priority and may
/// fall behind on a busy machine (and a layer's pieces wait while the layers before it are
/// applied): this bounds the memory that costs.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Inline bytes sent and not parsed yet.
    pub(super) bytes: AtomicUsize,
    /// The most there ever were, for the debug log.
    pub(super) peak: AtomicUsize,
}

/// The reference image (53k files, two layers) keeps 5-6 MB waiting on a quiet machine: a
/// cap of about three times that leaves the tree thread room on a busy one. An image of many
/// layers fills any cap (each layer's pieces wait for the layers before it) and passes
/// the tree's `MAX_ENTRIES` anyway, so what it waits with is memory spent for nothing: 24 MB
/// of it was the streaming peak of 500 layers of 2,000 files.
pub(super) const BACKLOG_MAX: usize = 16 << 20;

/// The sending end for one layer: what its importer writes into the splitstream, it also
/// sends here, [`BATCH`] pieces at a time (a send per piece would wake the tree thread for
/// every file and header). Sending never blocks; a tree thread that stopped is ignored (the
/// finalize step then builds the tree from the streams).
#[derive(Debug)]
pub struct Feed<ObjectID> {
    /// `None` once the feed gave up.
    tx: Option<Sender<Vec<Piece<ObjectID>>>>,
    batch: Vec<Piece<ObjectID>>,
    backlog: Arc<Backlog>,
}

/// Pieces per message to the tree thread.
const BATCH: usize = 256;

impl<ObjectID> Feed<ObjectID> {
    pub(super) fn new(tx: Sender<Vec<Piece<ObjectID>>>, backlog: Arc<Backlog>) -> Self {
        Self {
            tx: Some(tx),
            batch: Vec::with_capacity(BATCH),
            backlog,
        }
    }

    fn push(&mut self, piece: Piece<ObjectID>) {
        let Some(tx) = &self.tx else { return };
        if let Piece::Inline(b) = &piece {
            let now = self.backlog.bytes.fetch_add(b.len(), Relaxed) + b.len();
            self.backlog.peak.fetch_max(now, Relaxed);
            if now > BACKLOG_MAX {
                self.batch.clear();
                let _ = tx.send(vec![Piece::GaveUp]);
                self.tx = None;
                return;
            }
        }
        self.batch.push(piece);
        if self.batch.len() >= BATCH {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
            let _ = tx.send(batch);
        }
    }

    /// Inline bytes, after they went into the stream.
    pub fn inline(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.push(Piece::Inline(bytes));
        }
    }

    /// An object reference, after it went into the stream.
    pub fn external(&mut self, id: ObjectID) {
        self.push(Piece::External(id));
    }

    /// The layer is complete and verified; without this the tree thread fails.
    pub fn done(mut self) {
        if let Some(tx) = self.tx.take() {
            self.batch.push(Piece::Done);
            let _ = tx.send(std::mem::take(&mut self.batch));
        }
    }
}
