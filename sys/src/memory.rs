//! Giving freed heap memory back to the kernel between the phases of an import.
//!
//! glibc's allocator keeps one arena per thread that allocated, and keeps what is freed in an
//! arena for that arena's next allocations. An import streams its layers on worker threads
//! (tens of MB of buffers at a time) and then builds the image's tree and EROFS layout on
//! another: the workers' freed buffers stay resident, unused, beside the tree, and count in
//! the process' peak RSS.
//!
//! Two things are needed to give them back. `malloc_trim(0)` returns the free pages inside
//! every arena, but not the free space at the top of a thread's arena, which glibc returns
//! only when it exceeds the trim threshold; and that threshold grows (up to 64 MiB) each time
//! a large block is freed, so after the first few buffers of a layer it is never reached.
//! [`limit_retained_memory`] fixes the thresholds instead.
//!
//! And glibc trims a thread arena's top only when a block of that arena is freed while
//! the top exceeds the threshold: a worker that freed many small blocks last leaves its
//! arena's top resident, and `malloc_trim` does not touch the top of any arena but the
//! main one. An arena whose threads exited waits on a free list for the next new thread.
//! [`release_free_memory`] hands those arenas to short-lived threads that free one block
//! above the threshold each. A thread that stays alive, idle in a pool, keeps its arena:
//! it gives back that arena's top itself, with [`release_thread_memory`], when its work ends.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once [`limit_retained_memory`] fixed the thresholds: the arena trim relies on them.
static THRESHOLDS_FIXED: AtomicBool = AtomicBool::new(false);

/// The trim threshold [`limit_retained_memory`] sets.
const TRIM_THRESHOLD: usize = 8 << 20;
/// The mmap threshold it sets: blocks below it come from an arena.
const MMAP_THRESHOLD: usize = 32 << 20;

/// Makes glibc give the free top of any arena back once it exceeds 8 MiB, and keeps blocks
/// under 32 MiB in the arenas; returns whether both settings were taken.
///
/// Process-wide, so it is for programs (the `cstor` CLI calls it first thing), not for
/// libraries to call behind their caller's back; a program embedding the importer may call
/// it too. With glibc's default, dynamic thresholds, the freed buffers of an import's
/// streaming phase (up to tens of MB) stay resident beside the EROFS image's tree. The fixed
/// mmap threshold is the value the dynamic one reaches anyway, so large buffers are not
/// mapped and unmapped one by one. Does nothing (returns false) where the C library is not
/// glibc.
///
/// ```
/// assert_eq!(
///     cstor_sys::memory::limit_retained_memory(),
///     cfg!(all(target_os = "linux", target_env = "gnu"))
/// );
/// ```
pub fn limit_retained_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and no pointers; glibc applies each setting under
        // the main arena's lock, so it may be called while other threads allocate.
        let fixed = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
        };
        THRESHOLDS_FIXED.store(fixed, Ordering::Relaxed);
        fixed
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Returns the allocator's free memory to the kernel; true when some was released.
///
/// Cheap against the phases it sits between (it walks the free lists once, and after
/// [`limit_retained_memory`] starts and joins a few short threads to trim the arenas of
/// threads that exited, see the module documentation), so it is called at phase boundaries,
/// never per file. Does nothing (returns false) where the C library is not glibc.
///
/// ```
/// let _released: bool = cstor_sys::memory::release_free_memory();
/// ```
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if THRESHOLDS_FIXED.load(Ordering::Relaxed) {
            trim_idle_arenas();
        }
        // SAFETY: malloc_trim takes no pointers and has no preconditions: it locks each arena
        // in turn, so it may run while other threads allocate and free.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives back the free top of the calling thread's arena, which glibc returns only when a
/// block freed there leaves more than the trim threshold on top, and `malloc_trim` never
/// does for a thread's arena. For threads that stay alive idle after a burst of work (a
/// thread pool's): up to the threshold each would stay resident until the thread's next
/// large free. Does nothing (returns false) unless [`limit_retained_memory`] fixed the
/// thresholds.
///
/// ```
/// cstor_sys::memory::limit_retained_memory();
/// let _trimmed: bool = cstor_sys::memory::release_thread_memory();
/// ```
pub fn release_thread_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if !THRESHOLDS_FIXED.load(Ordering::Relaxed) {
            return false;
        }
        // A block above the trim threshold and below the mmap threshold comes from this
        // thread's arena, from its top when no free block fits; freed, it takes the top
        // with it back over the threshold, and glibc trims it.
        let block: Vec<u8> = Vec::with_capacity(TRIM_BLOCK);
        std::hint::black_box(&block);
        drop(block);
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// What [`release_thread_memory`] and the idle-arena trim allocate and free.
const TRIM_BLOCK: usize = TRIM_THRESHOLD + (1 << 20);
const _: () = assert!(TRIM_BLOCK < MMAP_THRESHOLD);

/// Trims the top of every arena left by threads that exited: as many threads as glibc
/// allows arenas (8 per CPU), all alive at once so that each takes a different arena (those
/// on the free list first), each allocate a block just above the trim threshold (below the
/// mmap threshold, so from its arena's top) and free it once all hold theirs; that free
/// trims the arena's top. Thread start failures only mean fewer arenas trimmed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_idle_arenas() {
    use std::sync::{Arc, RwLock, mpsc};
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (8 * cpus).min(64);
    let gate = Arc::new(RwLock::new(()));
    let Ok(closed) = gate.write() else {
        return;
    };
    let (ready, readied) = mpsc::channel();
    let mut handles = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (gate, ready) = (gate.clone(), ready.clone());
        let spawned = std::thread::Builder::new()
            .name("cstor-trim".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let block: Vec<u8> = Vec::with_capacity(TRIM_BLOCK);
                std::hint::black_box(&block);
                let _ = ready.send(());
                drop(gate.read());
                drop(block);
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(_) => break,
        }
    }
    drop(ready);
    for _ in 0..handles.len() {
        if readied.recv().is_err() {
            break;
        }
    }
    drop(closed);
    for h in handles {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    /// The tests below measure the whole process' memory: one at a time (the other's
    /// worker would count in it).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Runs `worker` on a thread of its own to its end, gives free memory back, and fails
    /// unless the anonymous memory it freed (48 MB) is gone: other tests of this binary may
    /// allocate meanwhile, but 48 MB kept would show anyway.
    fn assert_given_back(what: &str, worker: fn()) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        assert!(super::limit_retained_memory());
        let before = anon_kib();
        std::thread::spawn(worker).join().unwrap();
        super::release_free_memory();
        let after = anon_kib();
        assert!(
            after < before + 24 * 1024,
            "{before} KiB anonymous memory before, {after} KiB after the worker freed {what}"
        );
    }

    /// What the import relies on: buffers a worker thread allocated and freed do not stay
    /// resident once the worker is done.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn memory_a_finished_worker_freed_is_given_back() {
        assert_given_back("48 MiB", || {
            // As an import's layer reader does: a large buffer freed (with glibc's default
            // thresholds, this raises the trim threshold to 60 MiB), then 48 MiB of smaller
            // ones, which live in this thread's arena.
            drop(std::hint::black_box(vec![1u8; 30 << 20]));
            let blocks: Vec<Vec<u8>> = (0..192).map(|i| vec![i as u8; 256 << 10]).collect();
            std::hint::black_box(&blocks);
        });
    }

    /// A pool thread that stays alive after its work keeps its arena's free top (below the
    /// trim threshold) resident; it gives it back when it asks.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn memory_a_live_thread_gives_back_its_arenas_free_top() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        assert!(super::limit_retained_memory());
        let (kept, trimmed) = std::thread::spawn(|| {
            // 7 MB in blocks too small for a free to trim: they end in the arena's top,
            // below the 8 MiB threshold, and stay resident.
            let blocks: Vec<Vec<u8>> = (0..7 * 1024).map(|i| vec![i as u8; 1000]).collect();
            std::hint::black_box(&blocks);
            drop(blocks);
            let kept = anon_kib();
            assert!(super::release_thread_memory());
            (kept, anon_kib())
        })
        .join()
        .unwrap();
        assert!(
            trimmed + 4 * 1024 < kept,
            "{kept} KiB anonymous memory with the free top, {trimmed} KiB after trimming it"
        );
    }

    /// A worker whose last frees were small blocks leaves its arena's top resident
    /// (`malloc_trim` trims only the main arena's top): it is given back all the same.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn memory_a_finished_worker_freed_in_small_blocks_is_given_back() {
        assert_given_back("48 MB in 1,000-byte blocks", || {
            let blocks: Vec<Vec<u8>> = (0..48 * 1024).map(|i| vec![i as u8; 1000]).collect();
            std::hint::black_box(&blocks);
            // Freed one by one, each far below the size whose free trims the arena.
            drop(blocks);
        });
    }
}
