//! Prefetch one window ahead of a stream, on a thread of its own. When a fault continues a trend,
//! its handler fetches the faulting page and one window along the trend in the same request (the
//! access waits for both), and posts the *next* window here: the prefetch-ahead thread fetches it
//! while the program reads the window just installed, so a stream that keeps going meets
//! installed pages instead of a fault every window.
//!
//! The thread is a `Handler` that reads no userfaultfd messages (it leaves them to the fault
//! handlers, which keep reading them even while they wait for a page this thread holds). It
//! never goes over the budget: without room within a few milliseconds it drops the job. Only the
//! latest job is kept: a stream that moved on has no use for an older window.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{fetches_of, is_fetchable, Handler};
use crate::entry::Entry;
use crate::history::Transition;
use crate::stats::Counters;
use crate::{PagerError, Reservation, Shared};

/// How long a job waits for room in the budget before it is dropped.
const ROOM_WAIT: Duration = Duration::from_millis(20);

/// A window to fetch ahead: `steps` pages along `stride` after page `after` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AheadJob {
    pub(crate) region: u32,
    pub(crate) after: usize,
    pub(crate) stride: isize,
    pub(crate) steps: usize,
}

/// The job waiting for the prefetch-ahead thread (only the latest).
#[derive(Debug, Default)]
pub(crate) struct AheadQueue {
    job: Mutex<Option<AheadJob>>,
    posted: Condvar,
}

impl AheadQueue {
    /// Posts a job, replacing one not yet started.
    pub(crate) fn post(&self, job: AheadJob) {
        *self.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(job);
        self.posted.notify_one();
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
        while !shared.shutdown.load(std::sync::atomic::Ordering::Acquire) {
            if let Some(job) = shared.ahead.take(Duration::from_millis(50)) {
                self.fetch_ahead(job);
            }
        }
    }

    fn fetch_ahead(&mut self, job: AheadJob) {
        let Some(region) = self.shared.regions.get(job.region).and_then(|r| r.enter()) else { return };
        let pages: Vec<(usize, Entry)> = self.lock_window(&region, job.after, job.stride, job.steps, is_fetchable);
        if pages.is_empty() {
            return;
        }
        if !self.reserve_ahead(pages.len()) {
            for &(page, entry) in &pages {
                region.table.unlock(page, entry, Transition::NotInstalled);
            }
            Counters::add(&self.shared.stats.prefetch_ahead_dropped, 1);
            return;
        }
        let mut fetches = fetches_of(pages.into_iter());
        let ok = self.fetch_and_install(&region, &mut fetches, None);
        Counters::add(&self.shared.stats.prefetched, ok);
        Counters::add(&self.shared.stats.prefetched_ahead, ok);
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
