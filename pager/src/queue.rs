//! The eviction queue: the CLOCK ring of resident pages in install order, the pages the
//! application asked to evict now, and the evictor's wake-up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::lock;

/// A page as the queue names it: region id and page index.
pub(crate) type QueuedPage = (u32, u32);

/// What the evictor works from.
#[derive(Debug, Default)]
pub(crate) struct EvictQueue {
    ring: Mutex<VecDeque<QueuedPage>>,
    forced: Mutex<Vec<QueuedPage>>,
    kicked: Mutex<bool>,
    kick: Condvar,
    /// Victims the evictors hold (locked, being evicted).
    held: AtomicUsize,
}

fn queued(region: u32, page: usize) -> QueuedPage {
    (region, u32::try_from(page).unwrap_or(u32::MAX))
}

impl EvictQueue {
    /// Adds a page that just became resident to the ring.
    pub(crate) fn push(&self, region: u32, page: usize) {
        lock(&self.ring).push_back(queued(region, page));
    }

    /// The ring, for a CLOCK scan (pages are popped from the front and pushed back).
    pub(crate) fn ring(&self) -> MutexGuard<'_, VecDeque<QueuedPage>> {
        lock(&self.ring)
    }

    /// Notes `n` more victims held by an evictor; called during its scan, with the ring locked,
    /// so that the next scan (by any evictor) sees them.
    pub(crate) fn hold(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    /// Notes `n` victims released (evicted, or kept).
    pub(crate) fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    /// Victims the evictors hold now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Asks for `pages` of `region` to be evicted first, and wakes the evictor.
    pub(crate) fn force(&self, region: u32, pages: &[usize]) {
        lock(&self.forced).extend(pages.iter().map(|&p| queued(region, p)));
        self.kick();
    }

    /// Takes up to `max` of the pages asked for.
    pub(crate) fn take_forced(&self, max: usize) -> Vec<QueuedPage> {
        let mut forced = lock(&self.forced);
        let n = forced.len().min(max);
        forced.drain(..n).collect()
    }

    pub(crate) fn has_forced(&self) -> bool {
        !lock(&self.forced).is_empty()
    }

    /// Wakes the evictors.
    pub(crate) fn kick(&self) {
        let mut kicked = lock(&self.kicked);
        if !*kicked {
            *kicked = true;
            self.kick.notify_all();
        }
    }

    /// Waits for a kick, at most `max`; clears it.
    pub(crate) fn wait_for_kick(&self, max: Duration) {
        let mut kicked = lock(&self.kicked);
        if !*kicked {
            kicked = self.kick.wait_timeout(kicked, max).unwrap_or_else(PoisonError::into_inner).0;
        }
        *kicked = false;
    }
}
