//! What the object workers of one import learn and share: what the filesystem can do
//! (reflinks, linking by fd), why data was copied, which objects are already stored, and
//! whether the import was stopped.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32};
use std::sync::{Arc, Mutex};

/// What the object workers of one import share: what they learnt about the filesystem, and
/// which objects are already stored.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// The first reason reflinking failed, so the report can say why data was copied.
    first_fallback: Mutex<Option<String>>,
    /// Once FICLONE failed with EXDEV/EOPNOTSUPP, later files skip the attempt.
    unsupported: AtomicBool,
    /// A [`LinkByFd`] for this process's own tmpfiles and one for files passed by the
    /// helper (opened by another process: the kernel may allow the first and refuse the
    /// second), each as learnt by the first such object linked.
    link_by_fd: [AtomicU8; 2],
    /// Objects known to be in the repository (stored by this import or found there), by
    /// the first 8 bytes of their id: some 9 bytes each in the table, where whole ids cost
    /// about 100 (a boxed id and a fat pointer), the largest per-object cost of an import
    /// of a million files. A prefix is a hint, not an answer: two ids can share one (a
    /// layer can be crafted so), so a hit is confirmed by the object's name in the
    /// repository before the object is skipped. Only completed objects go in, so a layer
    /// never references one still in flight elsewhere.
    present: Mutex<HashSet<u64>>,
    /// Consecutive lookups of objects in the repository that found nothing. Importing into
    /// an empty or unrelated repository, every lookup misses; after [`PROBE_MISSES`] of them
    /// only one object in [`PROBE_MISSES`] is looked up, and an object that turns out to
    /// exist (its link fails with EEXIST) resets the count.
    misses: AtomicU32,
    /// Set when the import is cancelled or dropped: workers answer the jobs they take with
    /// `Cancelled`, and a file being read or copied stops at its next chunk, so that one
    /// large file does not hold the import's end back.
    stop: Arc<AtomicBool>,
}

/// See [`WorkerState::misses`]: a lookup costs a stat, while storing an object that was
/// there already costs a tmpfile and a clone thrown away, many times more; once lookups
/// keep missing, most of them are saved.
const PROBE_MISSES: u32 = 64;

/// Whether `linkat(fd, "", AT_EMPTY_PATH)` works here: it needs CAP_DAC_READ_SEARCH or a
/// kernel that allows it for the file's opener; the fallback goes through /proc/self/fd, a
/// path lookup more per object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkByFd {
    /// Not tried yet.
    Untried,
    /// It worked.
    Works,
    /// The kernel refused it: use /proc/self/fd.
    Refused,
}

impl WorkerState {
    /// The state of the workers of an import that `stop` stops.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self {
            stop,
            ..Self::default()
        }
    }

    /// The import's stop flag (see [`WorkerState::new`]).
    pub(super) fn stop(&self) -> &AtomicBool {
        &self.stop
    }

    /// Whether the import was stopped.
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Whether an object with `id`'s prefix was stored or found: if so, `id` itself may be
    /// (see [`WorkerState::present`]); if not, it was not seen by this import.
    pub(super) fn maybe_present(&self, id: &[u8]) -> bool {
        self.present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&crate::spill::id_prefix(id))
    }

    /// Drops the set of stored objects once no worker needs it.
    pub fn forget_objects(&self) {
        *self.present.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    }

    pub(super) fn set_present(&self, id: &[u8]) {
        self.present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(crate::spill::id_prefix(id));
    }

    /// Whether to look the next object up in the repository before storing it.
    pub(super) fn probe(&self) -> bool {
        if self.misses.load(Relaxed) < PROBE_MISSES {
            return true;
        }
        // Skipped objects count too, so that one in PROBE_MISSES is still looked up.
        let n = self.misses.fetch_add(1, Relaxed).wrapping_add(1);
        n.is_multiple_of(PROBE_MISSES)
    }

    /// Records whether an object was found in the repository (see [`WorkerState::misses`]).
    pub(super) fn found(&self, present: bool) {
        if present {
            self.misses.store(0, Relaxed);
        } else {
            self.misses.fetch_add(1, Relaxed);
        }
    }

    /// Whether FICLONE is known to fail here (another filesystem, or none with reflinks).
    pub(super) fn reflinks_unsupported(&self) -> bool {
        self.unsupported.load(Relaxed)
    }

    /// FICLONE failed with EXDEV or EOPNOTSUPP: later files skip the attempt.
    pub(super) fn set_reflinks_unsupported(&self) {
        self.unsupported.store(true, Relaxed);
    }

    /// What linking by fd did for files this process made (`foreign` false) or was passed.
    pub(super) fn link_by_fd(&self, foreign: bool) -> LinkByFd {
        match self.link_by_fd[usize::from(foreign)].load(Relaxed) {
            0 => LinkByFd::Untried,
            1 => LinkByFd::Works,
            _ => LinkByFd::Refused,
        }
    }

    pub(super) fn set_link_by_fd(&self, foreign: bool, works: bool) {
        self.link_by_fd[usize::from(foreign)].store(if works { 1 } else { 2 }, Relaxed);
    }

    /// The first reason a reflink fell back to a copy.
    pub fn first_fallback(&self) -> Option<String> {
        self.first_fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps `why` as the reason data was copied, unless there is one already.
    pub(super) fn note(&self, why: String) {
        let mut f = self
            .first_fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_thin_out_after_a_run_of_misses_and_resume_on_a_hit() {
        let state = WorkerState::default();
        for _ in 0..PROBE_MISSES {
            assert!(state.probe());
            state.found(false);
        }
        let probed = (0..10 * PROBE_MISSES).filter(|_| state.probe()).count();
        assert_eq!(
            probed, 10,
            "one lookup in {PROBE_MISSES} once every lookup missed"
        );
        state.found(true);
        assert_eq!(state.misses.load(Relaxed), 0);
        assert!((0..PROBE_MISSES).all(|_| state.probe()));
    }

    #[test]
    fn what_linking_by_fd_did_reads_back() {
        let state = WorkerState::default();
        assert_eq!(state.link_by_fd(false), LinkByFd::Untried);
        state.set_link_by_fd(false, false);
        assert_eq!(state.link_by_fd(false), LinkByFd::Refused);
        // Learnt separately for passed files.
        assert_eq!(state.link_by_fd(true), LinkByFd::Untried);
        state.set_link_by_fd(false, true);
        assert_eq!(state.link_by_fd(false), LinkByFd::Works);
        state.set_link_by_fd(true, false);
        assert_eq!(state.link_by_fd(true), LinkByFd::Refused);
        assert_eq!(state.link_by_fd(false), LinkByFd::Works);
    }
}
