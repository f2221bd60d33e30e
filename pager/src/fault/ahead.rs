//! Prefetch along a stream on a thread of its own. When a fault continues a trend, its handler
//! fetches the faulting page and one window along the trend in the same request, and posts the
//! *next* window here: the prefetch-ahead thread fetches it while the program reads the window
//! just installed, so a stream that keeps going meets installed pages instead of a fault every
//! window.
//!
//! While demand faults (ones that continue no stream) are being served, a stream must not hold
//! the fault handler for a whole window: the handler then fetches the faulting page alone, locks
//! the window and posts it here too, and returns to serve other faults. This thread fetches the
//! window (the stream's next access, if it comes first, is set aside by the handler and woken
//! by the install), then the window after it.
//!
//! The thread is a `Handler` that reads no userfaultfd messages (it leaves them to the fault
//! handlers, which keep reading them even while a page they fault on is held here). It never
//! goes over the budget: without room within a few milliseconds it drops the job (its locked
//! window is released, and faults on it are served by the handlers). Only the latest job is
//! kept: a stream that moved on has no use for an older window.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{fetches_of, is_fetchable, Handler};
use crate::entry::Entry;
use crate::history::Transition;
use crate::region::ActiveRegion;
use crate::stats::Counters;
use crate::{PagerError, Reservation, Shared};

/// How long a job waits for room in the budget before it is dropped.
const ROOM_WAIT: Duration = Duration::from_millis(20);

/// Windows to fetch for a stream of region `region`: `window`, pages its poster locked (fetched
/// first), then `steps` pages along `stride` after page `after`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AheadJob {
    pub(crate) region: u32,
    pub(crate) window: Vec<(usize, Entry)>,
    pub(crate) after: usize,
    pub(crate) stride: isize,
    pub(crate) steps: usize,
}

impl AheadJob {
    /// Unlocks the job's window, unfetched (a job replaced or dropped).
    fn release(self, shared: &Shared) {
        if self.window.is_empty() {
            return;
        }
        // A region gone meanwhile has no table to unlock.
        if let Some(region) = shared.regions.get(self.region).and_then(|r| r.enter()) {
            for (page, entry) in self.window {
                region.table.unlock(page, entry, Transition::NotInstalled);
            }
        }
    }
}

/// How long after a demand fault (one that continues no stream) a stream's window is handed to
/// the prefetch-ahead thread rather than fetched by the fault handler.
const DEMAND_RECENT: Duration = Duration::from_millis(20);

/// The job waiting for the prefetch-ahead thread (only the latest), and when a demand fault was
/// last served.
#[derive(Debug)]
pub(crate) struct AheadQueue {
    job: Mutex<Option<AheadJob>>,
    posted: Condvar,
    epoch: Instant,
    /// Microseconds after `epoch` of the latest demand fault (0: none yet) ...
    demand_at: AtomicU64,
    /// ... and its region (the two are read without a lock: a hint, not a record).
    demand_region: AtomicU32,
    /// Test hook: every stream's window is handed ahead, as if demand faults were being served.
    pub(crate) forced: AtomicBool,
}

impl Default for AheadQueue {
    fn default() -> Self {
        Self {
            job: Mutex::new(None),
            posted: Condvar::new(),
            epoch: Instant::now(),
            demand_at: AtomicU64::new(0),
            demand_region: AtomicU32::new(u32::MAX),
            forced: AtomicBool::new(false),
        }
    }
}

impl AheadQueue {
    fn micros_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
    }

    /// Notes a remote fault in `region` that continues no stream: a program waits on single
    /// pages.
    pub(crate) fn note_demand(&self, region: u32) {
        self.demand_region.store(region, Ordering::Relaxed);
        self.demand_at.store(self.micros_now(), Ordering::Relaxed);
    }

    /// Whether a demand fault in a region other than the stream's (a stream's own first faults
    /// continue no stream yet) was served within [`DEMAND_RECENT`]: the stream's window then goes
    /// to the prefetch-ahead thread, and the fault handler stays free for such faults.
    /// Otherwise the handler fetches the window with the faulting page, which streams faster
    /// (two threads' windows in flight at once).
    pub(crate) fn demand_is_recent(&self, stream_region: u32) -> bool {
        let at = self.demand_at.load(Ordering::Relaxed);
        let recent = u64::try_from(DEMAND_RECENT.as_micros()).unwrap_or(u64::MAX);
        if self.forced.load(Ordering::Relaxed) {
            return true;
        }
        at != 0
            && self.demand_region.load(Ordering::Relaxed) != stream_region
            && self.micros_now().saturating_sub(at) < recent
    }

    /// Posts a job, replacing one not yet started (whose window is released).
    pub(crate) fn post(&self, job: AheadJob, shared: &Shared) {
        let replaced = self.job.lock().unwrap_or_else(PoisonError::into_inner).replace(job);
        self.posted.notify_one();
        if let Some(old) = replaced {
            old.release(shared);
        }
    }

    /// Takes the job, waiting up to `timeout` for one.
    fn take(&self, timeout: Duration) -> Option<AheadJob> {
        let job = self.job.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut job, _) =
            self.posted.wait_timeout_while(job, timeout, |j| j.is_none()).unwrap_or_else(PoisonError::into_inner);
        job.take()
    }
}

impl Handler {
    /// The prefetch-ahead thread's handler.
    pub(crate) fn ahead(shared: Arc<Shared>) -> Result<Self, PagerError> {
        let mut handler = Self::new(shared)?;
        handler.reads_events = false;
        Ok(handler)
    }

    /// Runs jobs until the pager shuts down.
    pub(crate) fn run_ahead(mut self) {
        let shared = Arc::clone(&self.shared);
        while !shared.shutdown.load(Ordering::Acquire) {
            if let Some(job) = shared.ahead.take(Duration::from_millis(50)) {
                self.fetch_ahead(job);
            }
        }
        // A job posted as the pager stopped: its window's locks are released.
        if let Some(job) = shared.ahead.take(Duration::ZERO) {
            job.release(&shared);
        }
    }

    fn fetch_ahead(&mut self, mut job: AheadJob) {
        // A region gone meanwhile has no table to unlock.
        let Some(region) = self.shared.regions.get(job.region).and_then(|r| r.enter()) else { return };
        let window = std::mem::take(&mut job.window);
        if !window.is_empty() {
            let ok = self.fetch_window(&region, window);
            Counters::add(&self.shared.stats.prefetched, ok);
        }
        let next: Vec<(usize, Entry)> = self.lock_window(&region, job.after, job.stride, job.steps, is_fetchable);
        if !next.is_empty() {
            let ok = self.fetch_window(&region, next);
            Counters::add(&self.shared.stats.prefetched, ok);
            Counters::add(&self.shared.stats.prefetched_ahead, ok);
        }
    }

    /// Fetches and installs locked `pages` within the budget; without room, unlocks them and
    /// counts a dropped window. Returns how many pages were fetched.
    fn fetch_window(&mut self, region: &ActiveRegion, pages: Vec<(usize, Entry)>) -> u64 {
        if !self.reserve_ahead(pages.len()) {
            for &(page, entry) in &pages {
                region.table.unlock(page, entry, Transition::NotInstalled);
            }
            Counters::add(&self.shared.stats.prefetch_ahead_dropped, 1);
            return 0;
        }
        let mut fetches = fetches_of(pages.into_iter());
        self.fetch_and_install(region, &mut fetches, None)
    }

    /// Room for `n` pages within the budget (never past it), waiting at most [`ROOM_WAIT`].
    fn reserve_ahead(&self, n: usize) -> bool {
        let deadline = Instant::now() + ROOM_WAIT;
        loop {
            let budget = &self.shared.budget;
            if budget.is_held() || budget.is_stuck() {
                return false;
            }
            match self.shared.try_reserve(n, Duration::ZERO) {
                Reservation::Made => return true,
                Reservation::Refused => return false,
                Reservation::Wait if Instant::now() >= deadline => return false,
                Reservation::Wait => {}
            }
        }
    }
}
