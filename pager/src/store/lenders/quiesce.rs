//! Write batches in flight, so that a repair (or drain) copies a slab group only once no write
//! placed before the group stopped being whole can still land in it.
//!
//! Why: a write-back picks its slot (`PageIo::place`, which refuses groups that are not whole)
//! and then writes. A group can stop being whole between the two (its lender starts draining):
//! that write still goes to the old slab, and a copy of the group made meanwhile would miss it,
//! leaving the group's new slab with an older page than the page table's version (a loud
//! failure when sealed, a silent wrong byte when not).
//!
//! How: each I/O thread has a counter, odd while a batch (from its first `place` to the end of
//! its `write_pages`) is open. The group is marked (leaving flag) before the repair takes a
//! [`Snapshot`] of the counters, all with `SeqCst`; a batch opened after the snapshot sees the
//! mark in `place` and does not write to the group, and the repair waits for every batch open at
//! the snapshot to close, or for the write timeout to pass (a write still out by then has failed
//! and its lender is marked failed, so the copy is rejected when it completes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The batch counters of every I/O thread.
#[derive(Debug, Default)]
pub(super) struct WriteBatches {
    counters: Mutex<Vec<Arc<AtomicU64>>>,
}

impl WriteBatches {
    /// A counter for a new I/O thread.
    pub(super) fn register(&self) -> Batch {
        let counter = Arc::new(AtomicU64::new(0));
        self.counters.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::clone(&counter));
        Batch { counter, open: false }
    }

    /// The batches open now.
    pub(super) fn snapshot(&self) -> Snapshot {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let open = counters
            .iter()
            .filter_map(|c| {
                let v = c.load(Ordering::SeqCst);
                (v % 2 == 1).then(|| (Arc::clone(c), v))
            })
            .collect();
        Snapshot { open, taken: Instant::now() }
    }
}

/// One I/O thread's batch counter.
#[derive(Debug)]
pub(super) struct Batch {
    counter: Arc<AtomicU64>,
    open: bool,
}

impl Batch {
    /// Opens a batch (before the first slot is placed), unless one is open.
    pub(super) fn open(&mut self) {
        if !self.open {
            self.counter.fetch_add(1, Ordering::SeqCst);
            self.open = true;
        }
    }

    /// Closes the batch (its writes completed or failed).
    pub(super) fn close(&mut self) {
        if self.open {
            self.counter.fetch_add(1, Ordering::SeqCst);
            self.open = false;
        }
    }
}

/// The batches that were open when a group was found not whole.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    open: Vec<(Arc<AtomicU64>, u64)>,
    taken: Instant,
}

impl Snapshot {
    /// True once every batch open at the snapshot has closed, or `timeout` has passed.
    pub(super) fn settled(&self, timeout: Duration) -> bool {
        self.taken.elapsed() >= timeout || self.open.iter().all(|(c, v)| c.load(Ordering::SeqCst) != *v)
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_waits_for_the_batches_open_when_it_was_taken_only() {
        let batches = WriteBatches::default();
        let (mut a, mut b) = (batches.register(), batches.register());
        a.open();
        a.open(); // still one batch
        let snap = batches.snapshot();
        assert!(!snap.settled(Duration::from_secs(60)));
        b.open(); // opened after: not waited for
        assert!(!snap.settled(Duration::from_secs(60)));
        a.close();
        assert!(snap.settled(Duration::from_secs(60)));
        a.open(); // a new batch of the same thread: not waited for either
        assert!(snap.settled(Duration::from_secs(60)));
        assert!(batches.snapshot().settled(Duration::ZERO), "the timeout ends the wait");
        b.close();
        a.close();
        assert!(batches.snapshot().settled(Duration::from_secs(60)));
    }
}
