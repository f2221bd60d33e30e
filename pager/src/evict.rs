//! The evictor threads (`PagerConfig::evictor_threads`, one by default, each with its own
//! staging buffer and store I/O): keep resident pages below the budget with CLOCK over the shared
//! ring of resident pages, and evict race-free (a victim is locked, so no two evictors ever hold
//! the same page):
//!
//! 1. lock the victim (`BUSY`): faults on it wait, and nobody else changes it;
//! 2. `UFFDIO_MOVE` it out of the region into a staging slot: atomic, so a racing access simply
//!    faults (and waits on the lock) and no write can slip in between copy-out and drop; unlike
//!    `madvise` it raises no remove event. Where each page went is read back from the staging
//!    buffer (`mincore`) rather than trusted from the ioctl's count, so that a page is never
//!    dropped while mapped nor kept while gone;
//! 3. dirty pages are written back, one batched WRITE per server; clean pages need no network;
//! 4. only after the write completes is the page marked remote; a failed write puts the page back
//!    with `UFFDIO_COPY`, still dirty, so nothing is lost (if the kernel refuses that copy too,
//!    the page is poisoned and counted lost: SIGBUS on access, never zeros);
//! 5. the staging buffer (registered with a second, event-less userfaultfd, as `UFFDIO_MOVE`
//!    requires of its destination) is emptied with `madvise(MADV_DONTNEED)`.
//!
//! A `fork` leaves every resident page shared copy-on-write (until this process writes it, even
//! after the child has exec'd or exited), and `UFFDIO_MOVE` refuses shared pages (`EBUSY`). Such a
//! page is unshared first (`Evictor::unshare`) and then evicted as dirty.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdma::LocalRegion;

use crate::entry::Entry;
use crate::history::Transition;
use crate::region::ActiveRegion;
use crate::stats::Counters;
use crate::store::{PageIo, PageTransfer, Slot, TransferError};
use crate::uffd::Uffd;
use crate::{PagerError, Shared, PAGE_SIZE};

mod cow {
    //! The one store the evictor makes into application pages.
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Rewrites the first word of the page at `addr` with its own value by compare-and-swap: a
    /// write access (so the kernel breaks copy-on-write sharing) that cannot lose a concurrent
    /// store by the application. If the swap fails, another thread wrote the word, which broke
    /// the sharing just as well.
    pub(super) fn rewrite_first_word(addr: usize) {
        // SAFETY: `addr` is the page-aligned address of a resident page of a live region, locked
        // by the evictor; the word is only accessed atomically here, and a compare-and-swap of a
        // value with itself never changes what any other access observes.
        let word = unsafe { AtomicU64::from_ptr(addr as *mut u64) };
        let current = word.load(Ordering::Relaxed);
        let _ = word.compare_exchange(current, current, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Pages evicted per batch: a batch costs two TLB shoot-downs (the move out and emptying the
/// staging buffer), each interrupting every CPU the program runs on; 256 pages (1 MiB) cost a
/// quarter of the shoot-downs of 64 and passes 8% less time.
const BATCH: usize = 256;
/// Staging slots: a batch's pages, plus room for slots left unused when a run is split.
const STAGING_SLOTS: usize = 2 * BATCH;

struct Victim {
    region: Arc<ActiveRegion>,
    page: usize,
    entry: Entry,
    /// The page must be written back: it is dirty, or its only remote copy is on a failed server.
    needs_write: bool,
    /// Remote slot to write to.
    slot: Option<Slot>,
    written: bool,
    /// Copy-on-write sharing with a forked child was broken once for this page.
    unshared: bool,
    /// The staging slot the page was moved to.
    staging: usize,
}

impl Victim {
    /// A page just locked for eviction, its entry as it was when locked.
    fn locked(region: Arc<ActiveRegion>, page: usize, entry: Entry) -> Self {
        Self { region, page, entry, needs_write: false, slot: None, written: false, unshared: false, staging: 0 }
    }
}

/// Victims an evictor holds, released from the queue's count when the batch is done.
struct Held {
    shared: Arc<Shared>,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.queue.release(self.n);
    }
}

/// The eviction thread's state.
#[derive(Debug)]
pub(crate) struct Evictor {
    shared: Arc<Shared>,
    staging_uffd: Uffd,
    staging: Arc<LocalRegion>,
    /// This thread's I/O on the remote page store.
    io: Box<dyn PageIo>,
    outcomes: Vec<Result<(), TransferError>>,
}

impl Evictor {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, PagerError> {
        let staging_uffd = Uffd::open(0)?;
        let staging = LocalRegion::new(STAGING_SLOTS * PAGE_SIZE).map_err(PagerError::Buffer)?;
        staging_uffd
            .register(staging.as_ptr() as usize, staging.len(), false)
            .map_err(|source| PagerError::Map { len: staging.len(), source })?;
        let io = Arc::clone(&shared.store).open_io()?;
        Ok(Self { shared, staging_uffd, staging, io, outcomes: Vec::new() })
    }

    pub(crate) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        while !shared.shutdown.load(Ordering::Acquire) {
            shared.queue.wait_for_kick(Duration::from_millis(20));
            if shared.budget.is_held() {
                continue;
            }
            if shared.queue.has_forced() {
                self.evict_batch(BATCH);
                shared.budget.room_made();
            }
            let (high, low) = (shared.budget.high_water(), shared.budget.low_water());
            if shared.budget.resident() <= high {
                continue;
            }
            let mut idle_rounds = 0;
            while !shared.shutdown.load(Ordering::Acquire) && !shared.budget.is_held() {
                let resident = shared.budget.resident();
                if resident <= low {
                    shared.budget.back_within();
                    break;
                }
                let (evicted, no_room) = self.evict_batch((resident - low).min(BATCH));
                shared.budget.room_made();
                if evicted > 0 {
                    shared.budget.set_stuck(false);
                    idle_rounds = 0;
                    continue;
                }
                if no_room {
                    if shared.budget.set_stuck(true) {
                        tracing::warn!(
                            budget_pages = shared.budget.limit(),
                            local_max_pages = shared.budget.max(),
                            "cannot evict: no memory-server can take more pages (all full or down), or pages \
                             stay busy (pinned, or shared and not unsharable); keeping them local beyond the \
                             budget, up to the local maximum"
                        );
                    }
                    break;
                }
                // Every candidate was busy or recently referenced: give faults a moment.
                idle_rounds += 1;
                if idle_rounds > 100 {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Picks up to `want` victims with CLOCK and locks them. Pages of regions over their latency
    /// bound or with their objective at risk are spared, unless nothing else can go: the bound
    /// and the objective are best effort, the budget is not.
    fn select(&self, want: usize) -> Vec<Victim> {
        let (victims, spared) = self.scan(want, true);
        // Another evictor's victims make room: only when none are held is it sure that nothing
        // but the bounded pages can go.
        if !victims.is_empty() || spared == 0 || self.shared.queue.held() > 0 {
            return victims;
        }
        let victims = self.scan(want, false).0;
        for v in &victims {
            v.region.evicted_over_bound.fetch_add(1, Ordering::Relaxed);
        }
        if !victims.is_empty() {
            tracing::debug!(
                pages = victims.len(),
                "evicting pages of regions over their latency bound or with their objective at risk: nothing else can go"
            );
        }
        victims
    }

    /// One CLOCK pass; with `spare_bounded`, pages of regions that keep them local (over their
    /// latency bound, or their objective at risk) stay (and are counted in the second value).
    fn scan(&self, want: usize, spare_bounded: bool) -> (Vec<Victim>, usize) {
        let shared = &self.shared;
        let mut ring = shared.queue.ring();
        let limit = ring.len() * 2 + 1;
        let mut active: HashMap<u32, Arc<ActiveRegion>> = HashMap::new();
        let mut victims = Vec::new();
        let mut spared = 0;
        // Pages the application asked to evict come first, whatever their reference bit.
        for (rid, page32) in shared.queue.take_forced(want) {
            let Some(region) = shared.regions.get(rid).and_then(|r| r.enter()) else { continue };
            let page = usize::try_from(page32).unwrap_or(usize::MAX);
            if page < region.table.len() {
                if let Some(entry) = region.table.try_lock(page, Entry::is_resident) {
                    victims.push(Victim::locked(Arc::new(region), page, entry));
                }
            }
        }
        let mut scanned = 0;
        while victims.len() < want && scanned < limit {
            let Some((rid, page32)) = ring.pop_front() else { break };
            scanned += 1;
            let region = match active.get(&rid) {
                Some(r) => Arc::clone(r),
                None => match shared.regions.get(rid).and_then(|r| r.enter()) {
                    Some(r) => {
                        let r = Arc::new(r);
                        active.insert(rid, Arc::clone(&r));
                        r
                    }
                    None => continue,
                },
            };
            let page = usize::try_from(page32).unwrap_or(usize::MAX);
            if page >= region.table.len() {
                continue;
            }
            let e = region.table.load(page);
            if !e.is_resident() {
                continue; // stale entry
            }
            if e.is_busy() {
                ring.push_back((rid, page32));
                continue;
            }
            if spare_bounded && region.keep_local() {
                spared += 1;
                ring.push_back((rid, page32));
                continue;
            }
            if e.is_referenced() {
                region.table.modify(page, Entry::unreferenced);
                ring.push_back((rid, page32));
                continue;
            }
            match region.table.try_lock(page, |e| e.is_resident() && !e.is_referenced()) {
                Some(entry) => victims.push(Victim::locked(region, page, entry)),
                None => ring.push_back((rid, page32)),
            }
        }
        // Counted while the ring is still locked: the next scan sees these victims as held.
        shared.queue.hold(victims.len());
        drop(ring);
        (victims, spared)
    }

    /// Evicts up to `want` pages; returns how many, and whether a dirty page found no remote room.
    fn evict_batch(&mut self, want: usize) -> (usize, bool) {
        let victims = self.select(want);
        if victims.is_empty() {
            return (0, false);
        }
        let _held = Held { shared: Arc::clone(&self.shared), n: victims.len() };
        // Step 2: move every victim out of its region into its own staging slot.
        let (mut moved, shared_pages) = self.move_victims(victims);
        for v in &moved {
            v.region.table.note(v.page, Transition::MovedOut);
        }
        // Step 3: reserve slots for dirty pages and write them back.
        let mut no_room = false;
        if self.shared.inject_drop_dirty.load(Ordering::Acquire) {
            for v in &mut moved {
                v.entry = v.entry.dirty_forgotten();
            }
        }
        for v in &mut moved {
            // A clean page whose lender copies are not whole still needs no write when a backup
            // tier holds this very version: it comes back from there.
            let own_intact = v.entry.slot().filter(|&slot| self.io.intact(slot));
            let copy_intact =
                own_intact.is_some() || (!v.entry.is_dirty() && self.io.held_elsewhere(v.region.page_id(v.page)));
            // A clean page faulted back (not a prefetched one never touched) is hot: written
            // nearer when its copy is far (`proximity.rs` of the lender store; `place` moves
            // dirty ones itself).
            let hot_and_far = !v.entry.is_dirty()
                && !v.entry.is_prefetched()
                && own_intact.is_some_and(|slot| self.io.wants_nearer(slot));
            v.needs_write = v.entry.is_dirty() || (v.entry.has_remote_copy() && !copy_intact) || hot_and_far;
            if !v.needs_write {
                continue;
            }
            v.slot = self.io.place(v.entry.slot());
            no_room |= v.slot.is_none();
        }
        self.write_back(&mut moved);
        // Step 4: publish the new states.
        let mut evicted = 0;
        for v in &moved {
            let t = &v.region.table;
            let dirty = v.needs_write;
            if dirty && !v.written {
                self.put_back(v);
                continue;
            }
            // A clean page keeps its remote copy; a dirty one was just written to `v.slot`.
            let e = v.entry.evicted(if dirty { v.slot } else { None });
            if v.entry.is_prefetched() {
                Counters::add(&self.shared.stats.prefetch_wasted, 1);
            }
            t.unlock(v.page, e, if dirty { Transition::EvictedDirty } else { Transition::EvictedClean });
            if dirty {
                Counters::add(&self.shared.stats.evictions_dirty, 1);
                Counters::add(&self.shared.stats.bytes_out, PAGE_SIZE as u64);
            } else {
                Counters::add(&self.shared.stats.evictions_clean, 1);
            }
            evicted += 1;
        }
        self.shared.unreserve(evicted);
        // Step 5: empty the staging buffer.
        // SAFETY: the staging region is this thread's own mapping; nothing references its bytes
        // (every write-back completed or was abandoned together with its connection).
        let rc = unsafe { libc::madvise(self.staging.as_ptr().cast(), self.staging.len(), libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "emptying the staging buffer failed");
        }
        // Pages that stay busy (EBUSY) even after unsharing (pinned by I/O, say) cannot be moved
        // out; when nothing else could be evicted, report that as no room so that faults go over
        // budget at once instead of waiting.
        (evicted, evicted == 0 && (no_room || shared_pages > 0))
    }

    /// Moves the victims out of their regions, contiguous runs in one ioctl, each page into a
    /// staging slot of its own (`Victim::staging`). Where each page went is read back from the
    /// staging buffer (`mincore`), not inferred from the ioctl's count: a page is written back and
    /// dropped only if it is really in staging, and one that is really still mapped is kept. A
    /// disagreement between the two is logged and counted (`move_miscounts`). Returns the moved
    /// victims and how many could not be moved because they are shared.
    fn move_victims(&mut self, victims: Vec<Victim>) -> (Vec<Victim>, usize) {
        let mut victims = victims;
        victims.sort_by_key(|v| (v.region.id, v.page));
        let mut moved: Vec<Victim> = Vec::with_capacity(victims.len());
        let mut shared_pages = 0usize;
        let mut next_slot = 0usize;
        let mut pending: std::collections::VecDeque<Victim> = victims.into();
        while let Some(first) = pending.pop_front() {
            let mut run = vec![first];
            while let Some(next) = pending.front() {
                let last = &run[run.len() - 1];
                if next.region.id == last.region.id && next.page == last.page + 1 {
                    run.extend(pending.pop_front());
                } else {
                    break;
                }
            }
            if next_slot + run.len() > STAGING_SLOTS {
                for v in run {
                    self.keep(v, &io::Error::from_raw_os_error(libc::ENOSPC));
                }
                continue;
            }
            let src = run[0].region.page_addr(run[0].page);
            let result = self.move_out(self.staging_addr(next_slot), src, run.len() * PAGE_SIZE);
            let landed = self.staged(next_slot, run.len());
            let reported = result.as_ref().map_or_else(|(_, done)| done / PAGE_SIZE, |()| run.len());
            let actual = landed.iter().filter(|&&l| l).count();
            if actual != reported || landed.iter().skip(reported).any(|&l| l) {
                Counters::add(&self.shared.stats.move_miscounts, 1);
                tracing::warn!(
                    reported,
                    actual,
                    result = ?result.as_ref().err().map(|(e, _)| e.to_string()),
                    "UFFDIO_MOVE moved other pages than it reported; trusting what is in staging"
                );
            }
            let error = match result {
                Ok(()) => io::Error::from_raw_os_error(libc::EAGAIN),
                Err((e, _)) => e,
            };
            let last_landed = landed.iter().rposition(|&l| l);
            let mut failed: Option<Victim> = None;
            let mut retry = Vec::new();
            for (j, mut v) in run.into_iter().enumerate() {
                if landed[j] {
                    v.staging = next_slot + j;
                    moved.push(v);
                } else if failed.is_none() {
                    failed = Some(v);
                } else {
                    retry.push(v);
                }
            }
            // The rest of the run is tried again as its own run.
            for v in retry.into_iter().rev() {
                pending.push_front(v);
            }
            next_slot += last_landed.map_or(0, |j| j + 1);
            if let Some(mut v) = failed {
                if error.raw_os_error() == Some(libc::EBUSY) && !v.unshared && self.unshare(&mut v) {
                    pending.push_front(v);
                } else {
                    if error.raw_os_error() == Some(libc::EBUSY) {
                        shared_pages += 1;
                    }
                    self.keep(v, &error);
                }
            }
        }
        (moved, shared_pages)
    }

    /// Which of `n` staging slots from `first` hold a page.
    fn staged(&self, first: usize, n: usize) -> Vec<bool> {
        let mut vec = vec![0u8; n];
        // SAFETY: mincore reads the page-table state of this thread's own staging mapping (the
        // range lies inside it: callers keep `first + n <= STAGING_SLOTS`) and writes one byte
        // per page into `vec`, which has exactly `n` bytes.
        let rc =
            unsafe { libc::mincore(self.staging_addr(first) as *mut libc::c_void, n * PAGE_SIZE, vec.as_mut_ptr()) };
        if rc != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "mincore on the staging buffer failed");
            return vec![false; n];
        }
        vec.iter().map(|b| b & 1 != 0).collect()
    }

    fn staging_addr(&self, i: usize) -> usize {
        self.staging.as_ptr() as usize + i * PAGE_SIZE
    }

    /// Moves `[src, src + len)` to `dst`, retrying while events are pending. On failure returns
    /// the error and the bytes moved before it.
    fn move_out(&self, dst: usize, src: usize, len: usize) -> Result<(), (io::Error, usize)> {
        let mut tries = 0;
        let mut done = 0;
        loop {
            match self.staging_uffd.move_pages(dst + done, src + done, len - done) {
                Ok(()) if len - done > PAGE_SIZE && self.shared.inject_move_undercount.load(Ordering::Acquire) => {
                    return Err((io::Error::from_raw_os_error(libc::EEXIST), done));
                }
                Ok(()) => return Ok(()),
                Err((e, n)) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 1000 => {
                    done += n;
                    tries += 1;
                    std::thread::yield_now();
                }
                Err((e, n)) => return Err((e, done + n)),
            }
        }
    }

    /// A page that a `fork` left shared copy-on-write (with a child still running, or one that has
    /// since exec'd or exited, until this process writes the page) cannot be moved: `EBUSY`.
    /// Breaks the sharing: lifts the page's write protection, then rewrites one word with its own
    /// value, so the kernel gives this process a private copy (the child keeps the old one). A
    /// write by the application between the two steps would not be seen by dirty tracking, so the
    /// page counts as dirty from here on.
    fn unshare(&self, v: &mut Victim) -> bool {
        let addr = v.region.page_addr(v.page);
        self.injected_delay();
        // The rewrite must not fault. A page the kernel zapped meanwhile (an `madvise` discard)
        // would raise a missing fault that only a fault handler serves, and the handler waits
        // for this page's lock, held here: a deadlock. An `madvise` zaps only once its remove
        // event is read, and readers read and mark under the install gate, exclusively; so with
        // the gate held shared, a page not marked discard-pending stays mapped until it is
        // dropped. A marked one is left alone: the remove event takes it.
        let gate = self.shared.install_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if v.region.table.load(v.page).discard_pending() {
            drop(gate);
            tracing::debug!(page = v.page, "not unsharing a page that a discard is about to zap");
            return false;
        }
        if let Err(e) = self.shared.uffd.write_protect(addr, PAGE_SIZE, false) {
            tracing::debug!(error = %e, page = v.page, "cannot lift write protection to unshare a page");
            return false;
        }
        v.entry = v.entry.unshared();
        v.unshared = true;
        Counters::add(&self.shared.stats.unshared, 1);
        cow::rewrite_first_word(addr);
        drop(gate);
        true
    }

    /// The test hook's delay (`Pager::inject_evictor_delay`), if set.
    fn injected_delay(&self) {
        let delay = self.shared.inject_evictor_delay_us.load(Ordering::Acquire);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
    }

    /// A victim that could not be moved out: a zapped page (ENOENT) now reads as zero and the
    /// remove event frees its remote copy; any other refusal keeps the page resident.
    fn keep(&self, v: Victim, e: &io::Error) {
        if e.raw_os_error() == Some(libc::ENOENT) {
            let t = &v.region.table;
            // Every remove event read before the move failed is marked once its reader is done.
            self.shared.wait_for_readers();
            if t.load(v.page).discard_pending() {
                t.unlock_zapped(v.page, v.entry.zapped(), v.entry, Transition::FoundUnmapped);
                Counters::add(&self.shared.stats.found_unmapped, 1);
            } else {
                // Nothing zapped it: its data is lost. Poisoned, so the next access fails loudly.
                crate::fault::report_violation(
                    &self.shared,
                    &v.region,
                    v.page,
                    v.entry,
                    &format!(
                        "the evictor found a resident page unmapped with no discard pending; {}",
                        crate::fault::POISONED_NOTE
                    ),
                );
                t.unlock(v.page, v.entry.poisoned(), Transition::Poisoned);
            }
            self.shared.unreserve(1);
        } else {
            tracing::debug!(error = %e, page = v.page, "cannot move a page out; keeping it");
            v.region.table.unlock(v.page, v.entry.kept(), Transition::Kept);
            self.shared.queue.push(v.region.id, v.page);
        }
    }

    /// Writes the dirty victims to their slots, in one batch of the store.
    fn write_back(&mut self, moved: &mut [Victim]) {
        let mut transfers = Vec::new();
        let mut idxs = Vec::new();
        for (i, v) in moved.iter().enumerate() {
            let Some(slot) = v.slot.filter(|_| v.needs_write) else { continue };
            // Each write-out takes a new version (a sealing store binds the copy to it).
            if v.region.table.next_version(v.page).is_none() {
                tracing::warn!(page = v.page, "a page used up its 2^32 write-out versions; it stays local");
                continue;
            }
            transfers.push(PageTransfer::page(slot, v.staging * PAGE_SIZE, v.region.page_id(v.page)));
            idxs.push(i);
        }
        if transfers.is_empty() {
            return;
        }
        self.io.write_pages(&self.staging, &transfers, &mut self.outcomes);
        for (&i, outcome) in idxs.iter().zip(&self.outcomes) {
            moved[i].written = outcome.is_ok();
        }
    }

    /// Puts a dirty page that could not be written back into its region again.
    fn put_back(&self, v: &Victim) {
        self.injected_delay();
        let addr = v.region.page_addr(v.page);
        let src = self.staging_addr(v.staging) as *const u8;
        let mut tries = 0;
        loop {
            // Under the install gate, as the fault handlers install (see `fault::install_runs`):
            // a page that a remove event read meanwhile covers is not put back.
            let gate = self.shared.install_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if v.region.table.load(v.page).remove_unhandled() {
                break;
            }
            let result = if self.shared.inject_put_back_failure.load(Ordering::Acquire) {
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            } else {
                self.shared.uffd.copy(addr, src, PAGE_SIZE, false)
            };
            drop(gate);
            match result {
                // A message is pending: the fault handlers read it (they keep reading even while
                // they wait for this page), so this ends; only shutdown stops the wait.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && !self.shared.shutdown.load(Ordering::Acquire) => {
                    if tries == 100_000 {
                        tracing::warn!(
                            addr = format_args!("{addr:#x}"),
                            "still waiting to put a page back: a userfaultfd message stays unread"
                        );
                    }
                    crate::table::backoff(&mut tries);
                }
                Ok(()) => return self.finish_put_back(v),
                // Already mapped: the page never left (only its locker maps it), so its bytes are
                // there; it stays resident. (A CI run under load poisoned such a page when every
                // error but EAGAIN was taken as loss.)
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    tracing::warn!(addr = format_args!("{addr:#x}"), "a page to put back was still mapped; kept");
                    return self.finish_put_back(v);
                }
                Err(e) => return self.lose_page(v, &e),
            }
        }
        // The program discarded the page while it was out: it is a zero page now.
        Counters::add(&self.shared.stats.installs_skipped, 1);
        if let Some(slot) = v.slot.filter(|&s| Some(s) != v.entry.slot()) {
            self.shared.store.free(slot);
        }
        let freed = crate::fault::apply_remove(&self.shared, &v.region, v.page, v.entry);
        self.shared.unreserve(freed);
    }

    /// A dirty page that could be neither written back nor put back (`error`): its contents are
    /// gone. It is poisoned, so that every access to it raises SIGBUS (never zeros, never stale
    /// bytes), and said in the log with its address.
    fn lose_page(&self, v: &Victim, error: &io::Error) {
        let addr = v.region.page_addr(v.page);
        let lender = v.slot.or(v.entry.slot()).and_then(|s| self.shared.store.lender_of(s));
        tracing::error!(
            addr = format_args!("{addr:#x}"),
            lender = %lender.map_or_else(|| "none".into(), |a| a.to_string()),
            error = %error,
            "a page whose write-back failed could not be put back either: its contents are lost, and every \
             access to it raises SIGBUS"
        );
        if let Some(slot) = v.slot.filter(|&s| Some(s) != v.entry.slot()) {
            self.shared.store.free(slot);
        }
        Counters::add(&self.shared.stats.writeback_failures, 1);
        Counters::add(&self.shared.stats.lost_pages, 1);
        v.region.failures.fetch_add(1, Ordering::Relaxed);
        // Not mapped any more: its next access faults, and the handler installs the poison.
        v.region.table.unlock(v.page, v.entry.poisoned(), Transition::Poisoned);
        self.shared.unreserve(1);
    }

    /// Unlocks a page put back after a failed write-back: resident and dirty.
    fn finish_put_back(&self, v: &Victim) {
        // Keep the page's own slot if it kept it; otherwise `place` freed the old one, and a
        // new one, unused now, goes back.
        let kept_own = v.slot.is_some() && v.slot == v.entry.slot();
        if !kept_own {
            if let Some(slot) = v.slot {
                self.shared.store.free(slot);
            }
        }
        v.region.table.unlock(v.page, v.entry.put_back(kept_own), Transition::PutBack);
        self.shared.queue.push(v.region.id, v.page);
        Counters::add(&self.shared.stats.writeback_failures, 1);
    }
}
