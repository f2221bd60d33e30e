//! Fault-handling threads: read userfaultfd messages (spinning briefly, then sleeping), and serve
//! missing faults (zero page, or remote fetch with a prefetch window in one batched READ per
//! server), write-protect faults (mark dirty, unprotect) and remove events (discard, free remote
//! copy). Handles the known races: `EEXIST` still wakes, `EAGAIN` drains pending events first.
//!
//! A handler never touches region memory itself (only ioctls do) and never blocks on a page lock
//! held by an operation that needs this thread to make progress.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::LocalRegion;

use crate::entry::{Entry, PageState};
use crate::history::Transition;
use crate::region::ActiveRegion as RegionState;
use crate::stats::Counters;
use crate::store::{PageIo, PageTransfer, TransferError};
use crate::uffd::{Event, Scratch, MSG_SIZE};
use crate::{PagerError, Reservation, Shared, PAGE_SIZE};

mod ahead;
mod events;
mod failure;
mod install;

pub(crate) use ahead::{AheadJob, AheadQueue};
pub(crate) use failure::{report_violation, POISONED_NOTE};
use install::Install;

/// How long an idle handler sleeps between checks for shutdown (a message wakes it at once).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long a handler with postponed faults sleeps before looking at their pages again.
const POSTPONED_WAIT: Duration = Duration::from_micros(50);

/// One fault-handling thread.
#[derive(Debug)]
pub(crate) struct Handler {
    shared: Arc<Shared>,
    /// This thread's I/O on the remote page store.
    io: Box<dyn PageIo>,
    staging: Arc<LocalRegion>,
    /// Where a page mapped against the table's word is taken out to.
    scratch: Scratch,
    zero: Vec<u8>,
    deferred: VecDeque<Event>,
    /// Faults on pages another thread held when they came up (a prefetch fetching the page, the
    /// evictor writing it out): served once the page is free, while this thread serves others.
    postponed: VecDeque<Event>,
    outcomes: Vec<Result<(), TransferError>>,
    /// False on the prefetch-ahead thread, which leaves userfaultfd messages to the handlers.
    reads_events: bool,
}

/// A page taken for one fetch.
struct Fetch {
    page: usize,
    entry: Entry,
    staging: usize,
    outcome: Result<(), TransferError>,
}

/// Locked pages to fetch, each given the next staging slot.
fn fetches_of(pages: impl Iterator<Item = (usize, Entry)>) -> Vec<Fetch> {
    pages
        .enumerate()
        .map(|(i, (page, entry))| Fetch { page, entry, staging: i, outcome: Err(TransferError::NoSuchSlot) })
        .collect()
}

/// A page a prefetch may take: only on a lender, and not being discarded.
fn is_fetchable(e: Entry) -> bool {
    e.state() == PageState::Remote && !e.remove_unhandled()
}

impl Handler {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, PagerError> {
        let io = Arc::clone(&shared.store).open_io()?;
        // A fault's page and its window, then the room the store asks for (a sealing store's
        // tags: pages are opened where they land, in their staging slots).
        let slots = 1 + shared.prefetch_window_max();
        let room = shared.store.read_room(slots);
        let staging = LocalRegion::new(slots * PAGE_SIZE + room).map_err(PagerError::Buffer)?;
        let zero = vec![0; (1 + shared.config.prefetch_window) * PAGE_SIZE];
        let scratch = Scratch::new().map_err(|source| PagerError::Map { len: PAGE_SIZE, source })?;
        Ok(Self {
            shared,
            io,
            staging,
            scratch,
            zero,
            deferred: VecDeque::new(),
            postponed: VecDeque::new(),
            outcomes: Vec::new(),
            reads_events: true,
        })
    }

    pub(crate) fn run(mut self) {
        let mut buf = [[0u8; MSG_SIZE]; 64];
        let mut idle_since: Option<Instant> = None;
        while !self.shared.shutdown.load(Ordering::Acquire) {
            if let Some(ev) = self.deferred.pop_front() {
                self.handle(ev);
                continue;
            }
            // Before reading more: a stream of new faults must not starve the postponed ones.
            let served = self.serve_postponed();
            match self.read_and_mark(&mut buf) {
                Ok(0) if !served => {}
                Ok(_) => {
                    idle_since = None;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading userfaultfd failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.shared.config.spin {
                // Yield between checks: the program thread just woken (or a lender on this
                // machine) takes the CPU at once instead of waiting for this spin to end.
                std::thread::yield_now();
            } else {
                // Postponed faults are looked at again soon; a new message wakes this at once.
                let wait = if self.postponed.is_empty() { IDLE_WAIT } else { POSTPONED_WAIT };
                let _ = self.shared.uffd.wait_readable(wait);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Fault { addr, write, wp } => {
                let Some((region, page)) = self.shared.lookup(addr) else {
                    tracing::warn!(addr = format_args!("{addr:#x}"), "fault outside every region; waking it");
                    let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                    return;
                };
                let Some(region) = region.enter() else { return };
                if self.reads_events && region.table.load(page).is_busy() {
                    // Held by another thread: an install wakes the access, or the page is served
                    // once free; this thread does not wait for it (a demand fault behind would).
                    Counters::add(&self.shared.stats.faults_postponed, 1);
                    self.postponed.push_back(ev);
                    return;
                }
                if wp {
                    self.write_fault(&region, page);
                } else {
                    self.missing_fault(&region, page, write);
                }
            }
            Event::Remove { start, end } => self.remove(start, end),
            Event::Other(kind) => tracing::debug!(kind, "ignoring userfaultfd event"),
        }
    }

    /// Serves the postponed faults whose pages are free now (those still held stay postponed).
    /// True if one was served.
    fn serve_postponed(&mut self) -> bool {
        let mut served = false;
        for _ in 0..self.postponed.len() {
            let Some(ev) = self.postponed.pop_front() else { break };
            let held = match ev {
                Event::Fault { addr, .. } => self
                    .shared
                    .lookup(addr)
                    .is_some_and(|(region, page)| region.enter().is_some_and(|r| r.table.load(page).is_busy())),
                _ => false,
            };
            if held {
                self.postponed.push_back(ev);
            } else {
                self.handle(ev);
                served = true;
            }
        }
        served
    }

    /// Reserves room for `n` resident pages; while waiting for the evictor, keeps reading events so
    /// that an `madvise` blocking on its remove event (and an eviction blocked on that) can finish.
    /// False at the local maximum when no room came within the fetch timeout.
    fn reserve(&mut self, n: usize) -> bool {
        // The clock is read only once there was no room at the first try.
        let mut outcome = self.shared.try_reserve(n, Duration::ZERO);
        let start = Instant::now();
        while outcome == Reservation::Wait {
            self.drain_events();
            outcome = self.shared.try_reserve(n, start.elapsed());
        }
        outcome == Reservation::Made
    }

    /// Reserves room for a fault's `n` pages (the faulting page and its window): all of them, or
    /// at the local maximum the faulting page alone. Returns how many were reserved (0: none).
    fn reserve_window(&mut self, n: usize) -> usize {
        if self.reserve(n) {
            n
        } else if n > 1 && self.shared.try_reserve(1, self.shared.config.fetch_timeout) == Reservation::Made {
            1
        } else {
            0
        }
    }

    /// Runs an ioctl, retrying while events are pending (`EAGAIN`).
    fn retry(&mut self, mut op: impl FnMut(&Self) -> io::Result<()>) -> io::Result<()> {
        loop {
            match op(self) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    self.drain_events();
                    std::thread::yield_now();
                }
                other => return other,
            }
        }
    }

    fn missing_fault(&mut self, region: &RegionState, page: usize, write: bool) {
        let t = &region.table;
        let addr = region.page_addr(page);
        loop {
            let idle = self.wait_idle(t, page);
            if idle.remove_unhandled() {
                // Discarded by an madvise whose event another thread has read and not handled
                // yet: apply it first, so that this fault sees the zero page the program expects.
                let Some(e) = t.try_lock(page, Entry::remove_unhandled) else { continue };
                let freed = apply_remove(&self.shared, region, page, e);
                self.shared.unreserve(freed);
                continue;
            }
            let state = idle.state();
            // Served from the state seen while idle, if it still holds once locked.
            let Some(e) = t.try_lock(page, |e| e.state() == state && !e.remove_unhandled()) else {
                continue;
            };
            match state {
                PageState::Resident => self.fault_on_resident(region, page, e),
                PageState::Remote => self.remote_fault(region, page, e, write),
                PageState::Lost => self.state_violation(
                    region,
                    page,
                    e,
                    "a written page has no copy anywhere and would be filled with zeros",
                ),
                PageState::Absent => self.zero_fault(region, page, e, write),
                PageState::Poisoned => {
                    t.unlock(page, e, Transition::NotInstalled);
                    let _ = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE));
                }
            }
            return;
        }
    }

    /// A missing fault on a page the table calls resident: normally a stale event (the page is
    /// mapped: wake). If the page really is unmapped, an `madvise` discard zapped it (zero is its
    /// content now); without one, its data was lost by a bug: poisoned, never zeroed.
    fn fault_on_resident(&mut self, region: &RegionState, page: usize, e: Entry) {
        let t = &region.table;
        let addr = region.page_addr(page);
        match crate::uffd::is_mapped(addr) {
            Ok(false) => {}
            Ok(true) => {
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                t.unlock(page, e, Transition::NotInstalled);
                return;
            }
            Err(err) => {
                tracing::error!(addr = format_args!("{addr:#x}"), error = %err, "mincore failed");
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                t.unlock(page, e, Transition::NotInstalled);
                return;
            }
        }
        // Unmapped. Every remove event read before now is marked once its reader is done.
        self.shared.wait_for_readers();
        if !t.load(page).discard_pending() {
            self.shared.unreserve(1);
            self.report_violation(
                region,
                page,
                e,
                &format!("a resident page was found unmapped with no discard pending; {POISONED_NOTE}"),
            );
            t.unlock(page, e.poisoned(), Transition::Poisoned);
            if let Err(err) = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE)) {
                tracing::error!(error = %err, "UFFDIO_POISON failed; the faulting thread stays blocked");
            }
            return;
        }
        let zero = self.zero.as_ptr();
        match self.install_runs(region, &[(page, e)], |_| zero, |_| false)[0] {
            Install::Done => {
                t.unlock_zapped(page, e.refilled(), e, Transition::Refilled);
                Counters::add(&self.shared.stats.refills, 1);
            }
            Install::NotDone => t.unlock(page, e, Transition::NotInstalled),
            Install::Discarded => {}
        }
    }

    /// First touch of a never-written page: a zero page, no network. Along a trend, the next
    /// never-written pages of the window are installed too (a sequential first-touch stream then
    /// costs one fault per window, not one per page); along a write trend they are installed
    /// writable and dirty, as the stream is about to write them.
    fn zero_fault(&mut self, region: &RegionState, page: usize, entry: Entry, write: bool) {
        let stride = self.record_trend(region, page);
        let mut pages = vec![(page, entry)];
        if let Some(stride) = stride.filter(|_| region.prefetch_enabled(self.shared.config.prefetch)) {
            pages.extend(self.lock_window(region, page, stride, self.shared.prefetch_window(), |e| {
                e.state() == PageState::Absent && !e.remove_unhandled()
            }));
        }
        match self.reserve_window(pages.len()) {
            0 => return self.fail_at_max(region, &pages),
            k => pages.drain(k..).for_each(|(p, e)| region.table.unlock(p, e, Transition::NotInstalled)),
        }
        let zero = self.zero.as_ptr();
        let wp = !write;
        // The zero buffer holds 1 + window pages, one per page here.
        let installed = self.install_runs(region, &pages, |k| zero.wrapping_add(k * PAGE_SIZE), |_| wp);
        let t = &region.table;
        let mut n = 0;
        for (&(p, e), outcome) in pages.iter().zip(&installed) {
            match outcome {
                Install::Done => {
                    t.unlock(p, e.installed(write), Transition::ZeroFilled);
                    self.shared.queue.push(region.id, p);
                    n += 1;
                }
                Install::NotDone => t.unlock(p, e, Transition::NotInstalled),
                Install::Discarded => {}
            }
        }
        self.shared.unreserve(pages.len() - n);
        Counters::add(&self.shared.stats.zero_faults, n as u64);
    }

    fn write_fault(&mut self, region: &RegionState, page: usize) {
        let t = &region.table;
        let addr = region.page_addr(page);
        let e = loop {
            let e = self.wait_idle(t, page);
            if !e.is_resident() {
                // Evicted meanwhile: the retried access will fault as missing.
                if let Some(e) = t.try_lock(page, |e| !e.is_resident()) {
                    self.take_out_stray(region, page, e);
                }
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                return;
            }
            if let Some(e) = t.try_lock(page, Entry::is_resident) {
                break e;
            }
        };
        match self.retry(|h| h.shared.uffd.write_protect(addr, PAGE_SIZE, false)) {
            Ok(()) => {}
            Err(err) => {
                tracing::warn!(addr = format_args!("{addr:#x}"), error = %err, "un-write-protecting failed");
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
            }
        }
        if e.is_prefetched() {
            Counters::add(&self.shared.stats.prefetch_hits, 1);
        }
        t.unlock(page, e.written_to(), Transition::WriteFault);
        Counters::add(&self.shared.stats.write_faults, 1);
    }

    /// Unlocks a page the table calls not resident (locked with entry `e`) after making sure it
    /// is not mapped: a write-protect fault on such a page means a page is mapped against the
    /// table's word (a bug: an install that crossed a discard), and it would fault forever. The
    /// table is the authority: the stray page is taken out, logged and counted as a page-state
    /// violation, and the retried access is served from the table's state.
    fn take_out_stray(&mut self, region: &RegionState, page: usize, e: Entry) {
        let addr = region.page_addr(page);
        if crate::uffd::is_mapped(addr).unwrap_or(false) {
            let what =
                "a page the table calls not resident is mapped; it is taken out and the access served from the table";
            self.report_violation(region, page, e, what);
            if let Err(err) = self.scratch.take_out(addr) {
                tracing::error!(addr = format_args!("{addr:#x}"), error = %err, "cannot take a stray page out");
            }
        }
        region.table.unlock(page, e, Transition::NotInstalled);
    }

    /// Records a fault in the region's history, credits prefetch hits the stream went past, and
    /// returns the current trend.
    fn record_trend(&mut self, region: &RegionState, page: usize) -> Option<isize> {
        let mut trend = region.trend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        trend.confirm(page);
        let stride = trend.record(page);
        // Pages of the previous prefetch window that the stream has now passed were used.
        if let Some((start, s, count)) = trend.last_window.take() {
            let mut hits = 0;
            for k in 0..count {
                let q = start.wrapping_add_signed(s * k.cast_signed());
                let passed = if s > 0 { q < page } else { q > page };
                if q < region.table.len() && passed {
                    let old = region.table.modify(q, Entry::prefetch_settled);
                    if old.is_prefetched() && old.is_resident() {
                        hits += 1;
                    }
                }
            }
            Counters::add(&self.shared.stats.prefetch_hits, hits);
        }
        stride
    }

    /// Locks up to `window` pages along `stride` after `page` that satisfy `want`.
    fn lock_window(
        &self,
        region: &RegionState,
        page: usize,
        stride: isize,
        window: usize,
        want: impl Fn(Entry) -> bool,
    ) -> Vec<(usize, Entry)> {
        let mut out = Vec::new();
        let mut q = page;
        for _ in 0..window {
            match q.checked_add_signed(stride) {
                Some(n) if n < region.table.len() => q = n,
                _ => break,
            }
            if let Some(e) = region.table.try_lock(q, &want) {
                out.push((q, e));
            }
        }
        out
    }

    /// Pages to fetch along with `page`: up to the window along the region's trend, each locked.
    fn prefetch_window(&mut self, region: &RegionState, page: usize) -> Vec<(usize, Entry)> {
        let stride = self.record_trend(region, page);
        let Some(stride) = stride.filter(|_| region.prefetch_enabled(self.shared.config.prefetch)) else {
            self.shared.ahead.note_demand(region.id);
            return Vec::new();
        };
        let window_len = {
            let trend = region.trend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            trend.window(self.shared.prefetch_window(), self.shared.prefetch_window_max())
        };
        let out = self.lock_window(region, page, stride, window_len, is_fetchable);
        let (Some(&(first, _)), Some(&(last, _))) = (out.first(), out.last()) else { return out };
        let ahead = self.shared.prefetches_ahead();
        {
            // The stream's next fault is expected past the window (and the one after it, when
            // that is fetched ahead).
            let mut trend = region.trend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            trend.last_window = Some((first, stride, out.len() + if ahead { window_len } else { 0 }));
        }
        if !ahead {
            return out;
        }
        // While demand faults are being served, the window (locked) goes to the prefetch-ahead
        // thread with the one after it: this handler fetches the faulting page alone and is free
        // for them sooner. Otherwise it fetches the window here, and only the next goes ahead.
        let demand_first = self.shared.config.demand_first && self.shared.ahead.demand_is_recent(region.id);
        let (window, out) = if demand_first {
            Counters::add(&self.shared.stats.windows_handed_ahead, 1);
            (out, Vec::new())
        } else {
            (Vec::new(), out)
        };
        let job = AheadJob { region: region.id, window, after: last, stride, steps: window_len };
        self.shared.ahead.post(job, &self.shared);
        out
    }

    fn remote_fault(&mut self, region: &RegionState, page: usize, entry: Entry, write: bool) {
        let started = Instant::now();
        let extra = self.prefetch_window(region, page);
        let mut fetches = fetches_of(std::iter::once((page, entry)).chain(extra));
        match self.reserve_window(fetches.len()) {
            0 => {
                let pages: Vec<(usize, Entry)> = fetches.iter().map(|f| (f.page, f.entry)).collect();
                return self.fail_at_max(region, &pages);
            }
            k => fetches.drain(k..).for_each(|f| region.table.unlock(f.page, f.entry, Transition::NotInstalled)),
        }
        let ok = self.fetch_and_install(region, &mut fetches, Some(write));
        if fetches[0].outcome.is_ok() {
            Counters::add(&self.shared.stats.remote_faults, 1);
            Counters::add(&self.shared.stats.prefetched, ok - 1);
            let elapsed = started.elapsed();
            self.shared.stats.record_remote_fault(elapsed);
            if let Some(c) = &self.shared.slo {
                c.record(elapsed);
            }
            region.record_fetch(elapsed);
        }
    }

    /// Fetches `fetches` (locked, their room reserved) and installs those that came. With
    /// `fault` (whether the access writes), the first is the faulting page: it fails loudly if it
    /// cannot be fetched and is installed for the access; the others are prefetched, and left
    /// remote if they cannot be. Returns how many pages were fetched.
    fn fetch_and_install(&mut self, region: &RegionState, fetches: &mut [Fetch], fault: Option<bool>) -> u64 {
        // A fault's read is hedged by its region's objective too; a prefetch's by the store's alone.
        let within = fault.and(region.options.slo.map(|slo| slo.target));
        self.io.set_read_within(within);
        self.fetch(region, fetches);
        let rejected = fetches.iter().filter(|f| f.outcome == Err(TransferError::Corrupt)).count();
        Counters::add(&self.shared.stats.copies_rejected, rejected as u64);
        let t = &region.table;
        let faulting = |i: usize| i == 0 && fault.is_some();
        // Failed pages first: the faulting one is poisoned, prefetched ones are simply left remote.
        for (i, f) in fetches.iter().enumerate().filter(|(_, f)| f.outcome.is_err()) {
            if faulting(i) {
                self.fail_page(region, f);
            } else {
                t.unlock(f.page, f.entry, Transition::NotInstalled);
            }
        }
        let good: Vec<(usize, &Fetch)> = fetches.iter().enumerate().filter(|(_, f)| f.outcome.is_ok()).collect();
        let pages: Vec<(usize, Entry)> = good.iter().map(|(_, f)| (f.page, f.entry)).collect();
        let staging = self.staging.as_ptr().cast_const();
        // Staging slots are inside the staging region, sized for the window.
        let src_of = |k: usize| staging.wrapping_add(good[k].1.staging * PAGE_SIZE);
        let wp_of = |k: usize| !(faulting(good[k].0) && fault == Some(true));
        let done = self.install_runs(region, &pages, src_of, wp_of);
        let mut installed = 0usize;
        for (&(i, f), outcome) in good.iter().zip(&done) {
            if *outcome == Install::Discarded {
                continue;
            }
            if *outcome == Install::Done {
                let (e, why) = if faulting(i) {
                    (f.entry.installed(fault == Some(true)), Transition::Fetched)
                } else {
                    (f.entry.prefetched(), Transition::Prefetched)
                };
                t.unlock(f.page, e, why);
                self.shared.queue.push(region.id, f.page);
                installed += 1;
            } else {
                t.unlock(f.page, f.entry, Transition::NotInstalled);
            }
        }
        self.shared.unreserve(fetches.len() - installed);
        let ok = fetches.iter().filter(|f| f.outcome.is_ok()).count() as u64;
        Counters::add(&self.shared.stats.bytes_in, ok * PAGE_SIZE as u64);
        ok
    }

    /// Reads every page of `fetches` into its staging slot, in one batch of the store.
    fn fetch(&mut self, region: &RegionState, fetches: &mut [Fetch]) {
        let mut transfers = Vec::with_capacity(fetches.len());
        let mut idxs = Vec::with_capacity(fetches.len());
        for (i, f) in fetches.iter_mut().enumerate() {
            match f.entry.slot() {
                Some(slot) => {
                    let id = region.page_id(f.page);
                    transfers.push(PageTransfer::page(slot, f.staging * PAGE_SIZE, id));
                    idxs.push(i);
                }
                None => f.outcome = Err(TransferError::NoSuchSlot),
            }
        }
        self.io.read_pages(&self.staging, &transfers, &mut self.outcomes);
        for (&i, outcome) in idxs.iter().zip(self.outcomes.drain(..)) {
            fetches[i].outcome = outcome;
        }
    }
}

/// Applies the pending remove events to a page locked with entry `e`: its remote copy is freed
/// and it becomes a zero page. Returns the resident pages freed (0 or 1) for the caller to
/// unreserve.
pub(crate) fn apply_remove(shared: &Shared, region: &RegionState, page: usize, e: Entry) -> usize {
    let mut freed = 0;
    if e.is_resident() {
        freed = 1;
        if e.is_prefetched() {
            Counters::add(&shared.stats.prefetch_wasted, 1);
        }
    }
    if let Some(slot) = e.slot() {
        shared.store.free(slot);
        Counters::add(&shared.stats.remote_freed, 1);
    }
    Counters::add(&shared.stats.removed_pages, 1);
    region.table.unlock_removed(page);
    freed
}
