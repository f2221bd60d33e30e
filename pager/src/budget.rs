//! The local memory budget: how many pages of all regions may be resident, reservations against
//! it (an install reserves room first, so mapped pages never exceed the budget), the headroom the
//! evictor keeps free, and the two ways past the limit: `hold` (around `fork`) and a stuck
//! evictor (no lender can take a dirty page), the latter bounded by the local maximum.

use std::time::Duration;

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// The budget and the pages reserved against it.
#[derive(Debug)]
pub(crate) struct Budget {
    /// The limit now: the budget, or more while a service-level objective needs it (`slo.rs`).
    limit: AtomicUsize,
    /// The budget as configured.
    base: usize,
    /// Reservations past the limit stop here (except while held).
    max: usize,
    headroom: usize,
    resident: AtomicUsize,
    peak: AtomicU64,
    overshoots: AtomicU64,
    /// Reservations refused at the maximum.
    refusals: AtomicU64,
    /// While set, nothing is evicted and reservations go past the limit (see `Pager::hold_resident`).
    held: AtomicBool,
    /// Set by the evictor when it can make no room (no lender can take a dirty page).
    stuck: AtomicBool,
    /// Set once a stuck evictor was reported, until the resident set is back below the budget.
    stuck_reported: AtomicBool,
    /// Set once the maximum was reported, until the resident set is back below the budget.
    max_reported: AtomicBool,
    room: (Mutex<()>, Condvar),
}

impl Budget {
    /// A budget of `limit` pages, exceeded up to `max` pages when no room can be made; the
    /// evictor keeps `headroom` of them free.
    pub(crate) fn new(limit: usize, headroom: usize, max: usize) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
            base: limit,
            max: max.max(limit),
            headroom,
            resident: AtomicUsize::new(0),
            peak: AtomicU64::new(0),
            overshoots: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            held: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
            stuck_reported: AtomicBool::new(false),
            max_reported: AtomicBool::new(false),
            room: (Mutex::new(()), Condvar::new()),
        }
    }

    /// The headroom for a budget of `limit` pages and installs of up to `largest_install` pages
    /// at once by each of `installers` threads: room for all of them without waiting, between
    /// 4 and 4096 pages, at most a quarter of the budget.
    pub(crate) fn headroom_for(limit: usize, largest_install: usize, installers: usize) -> usize {
        (limit / 32).max(largest_install * installers).clamp(4, 4096).min(limit / 4)
    }

    /// The limit now (the budget, unless grown for an objective).
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// The budget as configured.
    pub(crate) fn base(&self) -> usize {
        self.base
    }

    /// Moves the limit to `pages`, kept between the budget and the maximum; returns the new
    /// limit. The evictor brings the resident set down to a lower one.
    pub(crate) fn set_limit(&self, pages: usize) -> usize {
        let pages = pages.clamp(self.base, self.max.min(usize::MAX / 2));
        self.limit.store(pages, Ordering::Relaxed);
        pages
    }

    /// Pages the evictor keeps free below the limit.
    pub(crate) fn headroom(&self) -> usize {
        self.headroom
    }

    /// The local maximum: no reservation goes past it unless the budget is held.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Reservations refused because they would have gone past the local maximum.
    pub(crate) fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Counts a reservation (or an allocation) refused at the maximum.
    pub(crate) fn refused(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// True when `n` more pages would go past the local maximum.
    pub(crate) fn would_pass_max(&self, n: usize) -> bool {
        self.resident().saturating_add(n) > self.max
    }

    pub(crate) fn resident(&self) -> usize {
        self.resident.load(Ordering::Acquire)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Reservations that went past the limit because the evictor could make no room.
    pub(crate) fn overshoots(&self) -> u64 {
        self.overshoots.load(Ordering::Relaxed)
    }

    /// Reserves room for `n` pages if the budget has it.
    pub(crate) fn take(&self, n: usize) -> bool {
        self.take_within(n, self.limit())
    }

    /// Reserves room for `n` pages past the limit but within the maximum, counted as an
    /// over-budget event; false (nothing reserved) if the maximum has no room.
    pub(crate) fn take_over(&self, n: usize) -> bool {
        let ok = self.take_within(n, self.max);
        if ok {
            self.overshoots.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn take_within(&self, n: usize, bound: usize) -> bool {
        let mut cur = self.resident.load(Ordering::Acquire);
        while cur.saturating_add(n) <= bound {
            match self.resident.compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.peak.fetch_max((cur + n) as u64, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
        false
    }

    /// Reserves room for `n` pages whatever the limit and the maximum (while held, or when the
    /// pager shuts down); counted as an over-budget event when it takes the resident set past the
    /// limit.
    pub(crate) fn take_held(&self, n: usize) {
        let now = self.resident.fetch_add(n, Ordering::AcqRel) + n;
        self.peak.fetch_max(now as u64, Ordering::Relaxed);
        if now > self.limit() {
            self.overshoots.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Gives back room for `n` pages (unused reservations, or pages that left) and wakes waiters.
    pub(crate) fn give_back(&self, n: usize) {
        self.resident.fetch_sub(n, Ordering::AcqRel);
        self.room.1.notify_all();
    }

    /// True when less than the headroom is free: time for the evictor.
    pub(crate) fn low_on_room(&self) -> bool {
        self.resident() + self.headroom > self.limit()
    }

    /// Above this many resident pages the evictor starts.
    pub(crate) fn high_water(&self) -> usize {
        self.limit() - self.headroom
    }

    /// The evictor stops at this many resident pages.
    pub(crate) fn low_water(&self) -> usize {
        self.limit().saturating_sub(2 * self.headroom)
    }

    /// Waits up to `max` for room to be given back.
    pub(crate) fn wait_for_room(&self, max: Duration) {
        let guard = self.room.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = self.room.1.wait_timeout(guard, max);
    }

    /// Wakes threads waiting for room (the evictor made some).
    pub(crate) fn room_made(&self) {
        self.room.1.notify_all();
    }

    pub(crate) fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    pub(crate) fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Release);
    }

    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::Acquire)
    }

    /// Records whether the evictor can make room. Returns true when it becomes stuck for the
    /// first time in an episode over the budget (to report it once).
    pub(crate) fn set_stuck(&self, stuck: bool) -> bool {
        self.stuck.store(stuck, Ordering::Release);
        stuck && !self.stuck_reported.swap(true, Ordering::Relaxed)
    }

    /// True if the evictor was stuck at some point since the resident set was last back within
    /// the budget (a clean page it could still drop does not end the episode).
    pub(crate) fn stuck_lately(&self) -> bool {
        self.stuck_reported.load(Ordering::Relaxed)
    }

    /// True the first time it is called in an episode over the budget (to report the maximum
    /// once).
    pub(crate) fn first_at_max(&self) -> bool {
        !self.max_reported.swap(true, Ordering::Relaxed)
    }

    /// The resident set is back within the budget: the next episode past it is reported again.
    pub(crate) fn back_within(&self) {
        if self.stuck_reported.load(Ordering::Relaxed) || self.max_reported.load(Ordering::Relaxed) {
            self.stuck_reported.store(false, Ordering::Relaxed);
            self.max_reported.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_unless_forced() {
        let b = Budget::new(16, Budget::headroom_for(16, 2, 1), 20);
        assert_eq!(Budget::headroom_for(16, 2, 1), 4);
        assert!(b.take(10) && b.take(6) && !b.take(1));
        assert!(b.low_on_room());
        assert!(b.take_over(2) && !b.take_over(3) && !b.would_pass_max(2) && b.would_pass_max(3));
        assert_eq!((b.resident(), b.peak(), b.overshoots()), (18, 18, 1));
        b.take_held(4);
        assert_eq!((b.resident(), b.peak(), b.overshoots()), (22, 22, 2));
        b.give_back(22);
        assert_eq!(b.resident(), 0);
        assert!(!b.low_on_room() && b.take(16));
        assert_eq!((b.high_water(), b.low_water()), (12, 8));
    }
}
