//! Installing pages into a region: runs of consecutive pages in one `UFFDIO_COPY`, and never
//! into a page that an unapplied remove event covers.

use crate::entry::Entry;
use crate::region::ActiveRegion as RegionState;
use crate::stats::Counters;
use crate::PAGE_SIZE;

use super::{apply_remove, Handler};

/// What became of a page a handler tried to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Install {
    /// Installed: the caller unlocks it with its new state.
    Done,
    /// Not installed (already mapped, or the ioctl failed): the caller unlocks it unchanged.
    NotDone,
    /// Not installed because a remove event read meanwhile covers it: the discard was applied
    /// instead; already unlocked.
    Discarded,
}

impl Handler {
    /// Installs pages (locked by the caller, sorted: the faulting page first, then the window),
    /// merging runs of consecutive pages with consecutive sources and the same protection into
    /// one `UFFDIO_COPY`. `EEXIST` (someone mapped the page) wakes instead.
    ///
    /// Never installs into a page that a remove event read since it was locked covers: the
    /// kernel zaps such a page at a moment the pager cannot see, and an install after the zap
    /// would stay mapped after the `madvise` returned, showing old data where the program
    /// expects zeros. Each copy is issued under the install gate (shared), after checking the
    /// pages' marks; readers read and mark under the gate (exclusive); so a copy either comes
    /// before the event is read (and before the zap, which then wins) or sees its mark. A marked
    /// page gets the discard applied instead (`Install::Discarded`: unlocked, zero from now on,
    /// its waiter woken to fault again).
    pub(super) fn install_runs(
        &mut self,
        region: &RegionState,
        pages: &[(usize, Entry)],
        src_of: impl Fn(usize) -> *const u8,
        wp_of: impl Fn(usize) -> bool,
    ) -> Vec<Install> {
        let mut out = vec![Install::NotDone; pages.len()];
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].0 == pages[j - 1].0 + 1
                && wp_of(j) == wp_of(i)
                && src_of(j) as usize == src_of(j - 1) as usize + PAGE_SIZE
            {
                j += 1;
            }
            self.install_run(region, &pages[i..j], i, &src_of, wp_of(i), &mut out[i..j]);
            i = j;
        }
        out
    }

    /// Installs one run of `install_runs` (`first` is its index there, for `src_of`).
    fn install_run(
        &mut self,
        region: &RegionState,
        run: &[(usize, Entry)],
        first: usize,
        src_of: &impl Fn(usize) -> *const u8,
        wp: bool,
        out: &mut [Install],
    ) {
        let mut k = 0;
        while k < run.len() {
            let gate = self.shared.install_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let end = (k..run.len()).find(|&m| region.table.load(run[m].0).remove_unhandled()).unwrap_or(run.len());
            if end == k {
                drop(gate);
                out[k] = self.discard_locked(region, run[k].0, run[k].1);
                k += 1;
                continue;
            }
            let addr = region.page_addr(run[k].0);
            let result = self.shared.uffd.copy_run(addr, src_of(first + k), (end - k) * PAGE_SIZE, wp);
            drop(gate);
            let n = match &result {
                Ok(()) => end - k,
                Err((_, bytes)) => bytes / PAGE_SIZE,
            };
            out[k..k + n].fill(Install::Done);
            k += n;
            match result {
                Ok(()) => {}
                Err((e, _)) if e.raw_os_error() == Some(libc::EAGAIN) => self.drain_events(),
                Err((e, _)) => {
                    // The page at `k` was not installed: EEXIST (mapped meanwhile) or a failure.
                    let addr = region.page_addr(run[k].0);
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        tracing::error!(addr = format_args!("{addr:#x}"), error = %e, "UFFDIO_COPY failed");
                    }
                    let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                    k += 1;
                }
            }
        }
    }

    /// Applies the pending discard to a page locked (with entry `e`) for an install, instead of
    /// installing it, and wakes a thread waiting on it (it faults again and gets the zero page).
    pub(super) fn discard_locked(&mut self, region: &RegionState, page: usize, e: Entry) -> Install {
        let freed = apply_remove(&self.shared, region, page, e);
        self.shared.unreserve(freed);
        Counters::add(&self.shared.stats.installs_skipped, 1);
        let _ = self.shared.uffd.wake(region.page_addr(page), PAGE_SIZE);
        Install::Discarded
    }
}
