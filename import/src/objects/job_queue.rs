//! The object workers' job queue: first in, first out, except that a worker skips (a few)
//! jobs whose source sits in an XFS allocation group another worker is cloning from.
//!
//! FICLONE updates the reference counts of the *source* extents, under the lock of their
//! allocation group's AGF buffer: two workers cloning from one group take turns, and the
//! one waiting sleeps in the kernel.
//! The importer cannot choose where podman's files are, but it can choose which file a
//! worker takes next. Results are matched to jobs by their own reply channels, so the order
//! in which workers take jobs does not matter to the reader, which waits for them in order;
//! only a short look ahead keeps the oldest job from waiting long.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// How many queued jobs a worker looks through for one from a free group.
const SCAN: usize = 8;

/// A blocking multi-consumer queue of `T`, each tagged with an optional group.
#[derive(Debug)]
pub(crate) struct GroupQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<(Option<u64>, T)>,
    /// The group of the job each worker is on.
    busy: Vec<Option<u64>>,
    /// Workers asleep in [`GroupQueue::pop_batch`]: a push wakes one only if there is one
    /// (a futex wake is a system call, once per object otherwise).
    waiting: usize,
    closed: bool,
}

impl<T> State<T> {
    /// Which queued item `worker` takes: the first of the first [`SCAN`] whose group no other
    /// worker is on, else the oldest.
    fn pick(&self, worker: usize) -> Option<usize> {
        if self.items.is_empty() {
            return None;
        }
        let taken = |g: u64| {
            self.busy
                .iter()
                .enumerate()
                .any(|(w, b)| w != worker && *b == Some(g))
        };
        Some(
            self.items
                .iter()
                .take(SCAN)
                .position(|(g, _)| g.is_none_or(|g| !taken(g)))
                .unwrap_or(0),
        )
    }
}

impl<T> GroupQueue<T> {
    /// An empty queue for `workers` consumers (numbered from 0).
    pub fn new(workers: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                busy: vec![None; workers],
                waiting: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A worker that panicked mid-pop leaves consistent state: every mutation is a
        // single VecDeque or Vec operation.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` from `group`; gives it back if the queue is closed.
    pub fn push(&self, group: Option<u64>, item: T) -> Result<(), T> {
        let mut s = self.lock();
        if s.closed {
            return Err(item);
        }
        s.items.push_back((group, item));
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// No more items: workers drain what is queued, then [`pop`](Self::pop) returns `None`.
    /// (The pool abandons instead; the queue's ordering tests drain.)
    #[cfg(test)]
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// No more items, and those queued are dropped unprocessed: workers finish the item
    /// they hold, then [`pop`](Self::pop) returns `None`.
    pub fn abandon(&self) {
        let dropped = {
            let mut s = self.lock();
            s.closed = true;
            std::mem::take(&mut s.items)
        };
        self.ready.notify_all();
        drop(dropped);
    }

    /// The next item for `worker`, which is done with its previous one; blocks while the
    /// queue is empty, `None` once it is closed and empty.
    #[cfg(test)]
    pub fn pop(&self, worker: usize) -> Option<T> {
        let mut batch = Vec::new();
        self.pop_batch(worker, 1, &mut batch);
        batch.pop().map(|(_, item)| item)
    }

    /// Up to `max` items for `worker` (at least one), with their groups, into `out`: as
    /// many as are queued, each picked as [`pop`](Self::pop) would. Blocks while the queue
    /// is empty; returns false once it is closed and empty. The worker is taken to be on
    /// the first item's group until it says otherwise ([`working_on`](Self::working_on)).
    pub fn pop_batch(&self, worker: usize, max: usize, out: &mut Vec<(Option<u64>, T)>) -> bool {
        let mut s = self.lock();
        if let Some(b) = s.busy.get_mut(worker) {
            *b = None;
        }
        loop {
            while out.len() < max.max(1)
                && let Some(i) = s.pick(worker)
                && let Some(item) = s.items.remove(i)
            {
                out.push(item);
            }
            if let Some((group, _)) = out.first() {
                let group = *group;
                if let Some(b) = s.busy.get_mut(worker) {
                    *b = group;
                }
                return true;
            }
            if s.closed {
                return false;
            }
            s.waiting += 1;
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
    }

    /// Which of `groups` (those of the items left in `worker`'s batch, in order) the worker
    /// should take on next: the first whose group no other worker is on, else the first.
    /// The worker is on that item's group from now on.
    pub fn choose(&self, worker: usize, groups: impl Iterator<Item = Option<u64>>) -> usize {
        let mut s = self.lock();
        let mut first = None;
        let mut chosen = None;
        for (i, g) in groups.enumerate() {
            first.get_or_insert((i, g));
            let taken = |g: u64| {
                s.busy
                    .iter()
                    .enumerate()
                    .any(|(w, b)| w != worker && *b == Some(g))
            };
            if g.is_none_or(|g| !taken(g)) {
                chosen = Some((i, g));
                break;
            }
        }
        let Some((i, g)) = chosen.or(first) else {
            return 0;
        };
        if let Some(b) = s.busy.get_mut(worker) {
            *b = g;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoning_drops_what_is_queued() {
        let q = GroupQueue::new(1);
        q.push(None, 1).unwrap();
        q.abandon();
        assert_eq!(q.pop(0), None);
        assert_eq!(q.push(None, 2), Err(2));
    }

    #[test]
    fn a_worker_skips_the_group_another_is_on() {
        let q = GroupQueue::new(2);
        for (g, v) in [(3, "a"), (3, "b"), (1, "c"), (3, "d")] {
            q.push(Some(g), v).unwrap();
        }
        assert_eq!(q.pop(0), Some("a")); // worker 0 on group 3
        assert_eq!(q.pop(1), Some("c")); // not b: group 3 is busy
        // Worker 0 finished "a": group 3 is free for it again.
        assert_eq!(q.pop(0), Some("b"));
        // Only group-3 jobs left while worker 0 is on group 3: the oldest anyway.
        assert_eq!(q.pop(1), Some("d"));
    }

    #[test]
    fn untagged_jobs_and_the_scan_limit() {
        let q = GroupQueue::new(2);
        q.push(Some(7), 0).unwrap();
        assert_eq!(q.pop(0), Some(0));
        for i in 1..=SCAN + 1 {
            q.push(Some(7), i).unwrap();
        }
        q.push(None, 99).unwrap();
        // The free job is beyond the scan: take the oldest rather than starve it.
        assert_eq!(q.pop(1), Some(1));
        let q = GroupQueue::new(2);
        q.push(Some(7), 0).unwrap();
        q.push(Some(7), 1).unwrap();
        q.push(None, 2).unwrap();
        assert_eq!(q.pop(0), Some(0));
        assert_eq!(q.pop(1), Some(2));
    }

    #[test]
    fn a_batch_takes_what_is_queued_free_groups_first() {
        let q = GroupQueue::new(2);
        for (g, v) in [(3, "a"), (1, "b"), (3, "c"), (2, "d"), (1, "e")] {
            q.push(Some(g), v).unwrap();
        }
        assert_eq!(q.pop(0), Some("a")); // worker 0 on group 3
        let mut batch = Vec::new();
        assert!(q.pop_batch(1, 3, &mut batch));
        assert_eq!(batch, [(Some(1), "b"), (Some(2), "d"), (Some(1), "e")]);
        // Worker 1 goes through its batch avoiding worker 0's group 3: all free, first first.
        assert_eq!(q.choose(1, [Some(1), Some(2), Some(1)].into_iter()), 0);
        assert_eq!(q.choose(1, [Some(2), Some(1)].into_iter()), 0);
        // Now on group 2: worker 0's next batch skips that one.
        for (g, v) in [(2, "f"), (4, "g")] {
            q.push(Some(g), v).unwrap();
        }
        let mut batch = Vec::new();
        assert!(q.pop_batch(0, 8, &mut batch));
        assert_eq!(batch, [(Some(3), "c"), (Some(4), "g"), (Some(2), "f")]);
        // Worker 1, on group 2, holds worker 0 off "f" until the rest is done.
        assert_eq!(q.choose(0, [Some(2), Some(3)].into_iter()), 1);
        assert_eq!(q.choose(0, [Some(2)].into_iter()), 0);
        assert_eq!(q.choose(0, std::iter::empty()), 0);
        q.close();
        assert!(!q.pop_batch(0, 8, &mut Vec::new()));
    }

    #[test]
    fn close_drains_then_ends_and_refuses_more() {
        let q = std::sync::Arc::new(GroupQueue::new(3));
        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || q.pop(2))
        };
        q.push(None, "x").unwrap();
        assert_eq!(waiter.join().unwrap(), Some("x"));
        q.push(Some(1), "y").unwrap();
        q.close();
        assert_eq!(q.push(None, "z"), Err("z"));
        assert_eq!(q.pop(0), Some("y"));
        assert_eq!(q.pop(0), None);
        assert_eq!(q.pop(1), None);
    }
}
