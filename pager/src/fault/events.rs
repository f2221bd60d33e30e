//! A handler's side of the userfaultfd's messages: reading them (remove events marked on their
//! pages at once, under the install gate), applying remove events, and waiting for a page's lock
//! while still reading them.
//!
//! Every userfaultfd ioctl fails with `EAGAIN` while a message is pending, so a thread that holds
//! page locks and retries an ioctl (the evictor putting a page back) makes progress only once the
//! message is read. A handler waiting for such a lock therefore keeps reading messages (queued in
//! `deferred`, remove events marked); it never just sleeps on the lock.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{apply_remove, Handler};
use crate::entry::Entry;
use crate::history::Transition;
use crate::region::ActiveRegion as RegionState;
use crate::table::{backoff, PageTable};
use crate::uffd::{Event, MSG_SIZE};
use crate::PAGE_SIZE;

/// Spins on a lock before reading messages between tries (a `poll` each): most holds are short.
const SPINS_BEFORE_READING: u32 = 64;

impl Handler {
    /// Reads pending messages into the deferred queue (what `EAGAIN` asks for).
    pub(super) fn drain_events(&mut self) {
        if !self.reads_events {
            // The fault handlers read them; give them the CPU.
            std::thread::yield_now();
            return;
        }
        let mut buf = [[0u8; MSG_SIZE]; 16];
        while let Ok(n) = self.read_and_mark(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// Reads messages into the deferred queue, marking the pages of remove events, all under the
    /// install gate (see `install_runs` and `Shared::wait_for_readers`).
    pub(super) fn read_and_mark(&mut self, buf: &mut [[u8; MSG_SIZE]]) -> io::Result<usize> {
        let shared = Arc::clone(&self.shared);
        // Nothing to read: leave the gate alone (an idle handler spins here, and taking the gate
        // each time would hold up the other threads' installs).
        if !shared.uffd.wait_readable(Duration::ZERO)? {
            return Ok(0);
        }
        // Exclusive: no install is issued between reading a remove event and marking its pages
        // (see `install_runs`).
        let _gate = shared.install_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = shared.uffd.read_events(buf);
        if let Ok(n) = result {
            for raw in &buf[..n] {
                self.defer(Event::decode(raw));
            }
        }
        result
    }

    /// Queues an event read from the userfaultfd. A remove event is counted on its pages at once:
    /// the `madvise` behind it zaps them as soon as it has been read, before it is handled, and
    /// until then a page found unmapped is expected rather than a lost page.
    fn defer(&mut self, ev: Event) {
        if let Event::Remove { start, end } = ev {
            tracing::debug!(start = format_args!("{start:#x}"), end = format_args!("{end:#x}"), "remove event read");
            for (region, pages) in self.region_spans(start, end) {
                for page in pages {
                    region.table.begin_discard(page);
                }
            }
        }
        self.deferred.push_back(ev);
    }

    /// The pages of every live region in `[start, end)`, region by region.
    fn region_spans(&self, start: usize, end: usize) -> Vec<(RegionState, Range<usize>)> {
        let mut spans = Vec::new();
        let mut addr = start & !(PAGE_SIZE - 1);
        while addr < end {
            let Some((region, first)) = self.shared.lookup(addr) else {
                addr += PAGE_SIZE;
                continue;
            };
            let Some(region) = region.enter() else { break };
            let last = ((end.min(region.base + region.len) - region.base).div_ceil(PAGE_SIZE)).min(region.table.len());
            addr = region.base + last * PAGE_SIZE;
            spans.push((region, first..last));
        }
        spans
    }

    /// Waits until `page` is not locked and returns its entry, reading messages meanwhile.
    pub(super) fn wait_idle(&mut self, table: &PageTable, page: usize) -> Entry {
        let mut spins = 0u32;
        loop {
            let cur = table.load(page);
            if !cur.is_busy() {
                return cur;
            }
            self.wait_a_little(&mut spins);
        }
    }

    /// Takes `page`'s lock, reading messages while another holder has it.
    pub(super) fn lock_page(&mut self, table: &PageTable, page: usize) -> Entry {
        let mut spins = 0u32;
        loop {
            if let Some(e) = table.try_lock(page, |_| true) {
                return e;
            }
            self.wait_a_little(&mut spins);
        }
    }

    fn wait_a_little(&mut self, spins: &mut u32) {
        if *spins >= SPINS_BEFORE_READING {
            self.drain_events();
        }
        backoff(spins);
    }

    /// Handles a remove event: the pages read as zeros from now on; remote copies are freed.
    /// A page to which a fault already applied it is left alone: its state is newer than the
    /// discard.
    pub(super) fn remove(&mut self, start: usize, end: usize) {
        let mut freed_resident = 0;
        for (region, pages) in self.region_spans(start, end) {
            for page in pages {
                let e = self.lock_page(&region.table, page);
                if e.remove_unhandled() {
                    freed_resident += apply_remove(&self.shared, &region, page, e);
                } else {
                    region.table.unlock(page, e, Transition::NotInstalled);
                }
            }
        }
        self.shared.unreserve(freed_resident);
    }
}
