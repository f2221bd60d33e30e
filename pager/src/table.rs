//! The page table: one `AtomicU64` per page of a region holding its [`Entry`]. Transitions are
//! compare-and-swap; the `BUSY` bit is the per-page lock that a fetch, an eviction or a remove
//! holds while the page is between states. What the bits mean, and which transitions exist, is
//! `entry.rs`'s; this module owns the atomics, the lock and the history records.

use std::sync::Arc;

use crate::entry::{Entry, BUSY, READER_BITS, REMOVE_UNHANDLED, ZAP_PENDING};
use crate::history::{History, Transition};
pub(crate) use crate::sync::backoff;
use crate::sync::{AtomicU64, Ordering};
// Versions are only touched by the holder of a page's lock, which orders them: plain atomics.
use std::sync::atomic::AtomicU32;

/// Bytes of page-table metadata per page.
pub const BYTES_PER_PAGE: usize = ENTRY_BYTES + VERSION_BYTES;
const ENTRY_BYTES: usize = std::mem::size_of::<AtomicU64>();
const VERSION_BYTES: usize = std::mem::size_of::<AtomicU32>();

/// The entries of one region, then their pages' versions (how many times each was written out;
/// a sealing store binds a copy to it), in their own anonymous mapping: zero pages cost nothing
/// until an entry in them changes, so a huge, mostly untouched region has a small resident table.
#[derive(Debug)]
pub struct PageTable {
    #[cfg(not(coalesce_loom))]
    map: memmap2::MmapMut,
    /// Under loom: the model's atomics, on the heap.
    #[cfg(coalesce_loom)]
    map: Box<[AtomicU64]>,
    #[cfg(coalesce_loom)]
    versions: Box<[AtomicU32]>,
    len: usize,
    region: u32,
    history: Option<Arc<History>>,
}

impl PageTable {
    /// A table of `pages` entries, all "zero, not resident".
    #[cfg(test)]
    pub fn new(pages: usize) -> std::io::Result<Self> {
        Self::with_history(pages, 0, None)
    }

    /// A table of `pages` entries for region `region` whose transitions are recorded in `history`.
    pub fn with_history(pages: usize, region: u32, history: Option<Arc<History>>) -> std::io::Result<Self> {
        #[cfg(not(coalesce_loom))]
        let map = memmap2::MmapOptions::new().len((pages * BYTES_PER_PAGE).max(1)).map_anon()?;
        #[cfg(coalesce_loom)]
        let (map, versions) =
            ((0..pages).map(|_| AtomicU64::new(0)).collect(), (0..pages).map(|_| AtomicU32::new(0)).collect());
        Ok(Self {
            map,
            #[cfg(coalesce_loom)]
            versions,
            len: pages,
            region,
            history,
        })
    }

    #[cfg(coalesce_loom)]
    fn entries(&self) -> &[AtomicU64] {
        &self.map
    }

    #[cfg(coalesce_loom)]
    fn versions(&self) -> &[AtomicU32] {
        &self.versions
    }

    #[cfg(not(coalesce_loom))]
    fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, holds `len` 8-byte slots first, lives as long as
        // `self`, starts zeroed (a valid `AtomicU64` is any bit pattern) and is only accessed
        // atomically.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.len) }
    }

    #[cfg(not(coalesce_loom))]
    fn versions(&self) -> &[AtomicU32] {
        // SAFETY: after the `len` entries the mapping holds `len` 4-byte slots (4-aligned: they
        // start at a multiple of 8), zeroed, only accessed atomically, living as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.len * ENTRY_BYTES).cast::<AtomicU32>(), self.len)
        }
    }

    /// The version of `page`'s last write-out (0: never written out). Read by the holder of the
    /// page's lock.
    pub fn version(&self, page: usize) -> u32 {
        self.versions()[page].load(Ordering::Relaxed)
    }

    /// Takes the next version of a locked page for a write-out, and keeps it (whether or not the
    /// write succeeds: a version is never used twice). `None` when the page has used all 2^32 - 1
    /// versions: it must stay local.
    pub fn next_version(&self, page: usize) -> Option<u32> {
        let next = self.version(page).checked_add(1)?;
        self.versions()[page].store(next, Ordering::Relaxed);
        Some(next)
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes used by the entries.
    pub fn bytes(&self) -> usize {
        self.len * BYTES_PER_PAGE
    }

    /// Current entry of `page`.
    pub fn load(&self, page: usize) -> Entry {
        Entry::from_bits(self.entries()[page].load(Ordering::Acquire))
    }

    /// Takes the page's `BUSY` lock if `accept(entry)` holds and it is not busy; returns the entry
    /// as it was before locking.
    pub fn try_lock(&self, page: usize, accept: impl Fn(Entry) -> bool) -> Option<Entry> {
        let e = &self.entries()[page];
        let mut cur = e.load(Ordering::Acquire);
        loop {
            if cur & BUSY != 0 || !accept(Entry::from_bits(cur)) {
                return None;
            }
            match e.compare_exchange_weak(cur, cur | BUSY, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Entry::from_bits(cur)),
                Err(now) => cur = now,
            }
        }
    }

    /// Takes the `BUSY` lock, waiting for another holder to release it. For tests and models: a
    /// fault handler must keep reading messages while it waits (`Handler::lock_page`).
    #[cfg(test)]
    pub fn lock(&self, page: usize) -> Entry {
        let mut spins = 0u32;
        loop {
            if let Some(cur) = self.try_lock(page, |_| true) {
                return cur;
            }
            backoff(&mut spins);
        }
    }

    /// Releases the `BUSY` lock, storing `entry` (without `BUSY`); `why` goes to the history.
    /// The remove-event marks are the event reader's, not the lock holder's: they are kept.
    pub fn unlock(&self, page: usize, entry: Entry, why: Transition) {
        let entry = entry.bits();
        self.release(page, why, |cur| (entry & !(BUSY | READER_BITS)) | (cur & READER_BITS));
    }

    /// Marks the page as covered by a remove event just read (before the kernel may zap it).
    pub fn begin_discard(&self, page: usize) {
        self.entries()[page].fetch_or(ZAP_PENDING | REMOVE_UNHANDLED, Ordering::AcqRel);
    }

    /// Releases the lock of a page to which the pending remove events were just applied: it
    /// becomes [`Entry::ZERO`], with `REMOVE_UNHANDLED` cleared (one set by an event read while
    /// the page was locked is cleared too: applying a discard is idempotent, and the newer
    /// event's zap is still covered by `ZAP_PENDING`).
    pub fn unlock_removed(&self, page: usize) {
        self.release(page, Transition::Removed, |cur| cur & ZAP_PENDING);
    }

    /// Releases the lock like [`PageTable::unlock`], and clears `ZAP_PENDING`: the caller saw the
    /// zap (the page was found unmapped). `locked` is the entry as the caller locked it: a mark
    /// set by a remove event read since then announces another zap, and is kept.
    pub fn unlock_zapped(&self, page: usize, entry: Entry, locked: Entry, why: Transition) {
        let entry = entry.bits();
        self.release(page, why, |cur| {
            let newer_mark = if locked.discard_pending() { 0 } else { cur & ZAP_PENDING };
            (entry & !(BUSY | READER_BITS)) | newer_mark | (cur & REMOVE_UNHANDLED)
        });
    }

    /// Stores `new_of(current bits)` (which must not have `BUSY`) and records the transition.
    fn release(&self, page: usize, why: Transition, new_of: impl Fn(u64) -> u64) {
        let e = &self.entries()[page];
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let new = new_of(cur);
            match e.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if let Some(h) = &self.history {
                        h.record(self.region, page, why, cur & !BUSY, new);
                    }
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Records a step of a transition in progress (the page stays locked).
    pub fn note(&self, page: usize, why: Transition) {
        if let Some(h) = &self.history {
            let e = self.load(page).bits();
            h.record(self.region, page, why, e, e);
        }
    }

    /// Waits until the page is not busy; returns the entry then.
    pub fn wait_idle(&self, page: usize) -> Entry {
        let mut spins = 0u32;
        loop {
            let cur = self.load(page);
            if !cur.is_busy() {
                return cur;
            }
            backoff(&mut spins);
        }
    }

    /// Applies a transition that does not need the lock (a flag the lock holder may also change,
    /// such as the reference or the prefetch mark) to the entry, whatever its lock state;
    /// returns the entry before.
    pub fn modify(&self, page: usize, change: impl Fn(Entry) -> Entry) -> Entry {
        let e = &self.entries()[page];
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let new = change(Entry::from_bits(cur)).bits();
            match e.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Entry::from_bits(cur),
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;
    use crate::entry::PageState;
    use crate::store::Slot;

    #[test]
    fn lock_modify_and_slots() {
        let t = PageTable::new(4).expect("map");
        assert_eq!(t.bytes(), 4 * 12, "8 bytes of entry and 4 of version per page");
        assert_eq!(t.version(2), 0);
        assert_eq!((t.next_version(2), t.next_version(2), t.version(2)), (Some(1), Some(2), 2));
        assert_eq!(t.version(1), 0, "versions are per page");
        let before = t.try_lock(1, |e| !e.is_resident()).expect("free");
        assert_eq!(before, Entry::ZERO);
        assert!(t.try_lock(1, |_| true).is_none(), "already busy");
        t.unlock(1, before.installed(false).with_slot(Slot::from_raw(77)), Transition::Fetched);
        let e = t.load(1);
        assert_eq!(e.slot(), Some(Slot::from_raw(77)));
        assert!(!e.is_busy() && e.is_referenced());
        let old = t.modify(1, Entry::unreferenced);
        assert!(old.is_referenced() && !t.load(1).is_referenced());
        assert!(t.try_lock(1, |e| !e.is_resident()).is_none(), "predicate refuses");
    }

    #[test]
    fn a_pending_zap_survives_unlock_until_the_zap_is_seen() {
        let t = PageTable::new(2).expect("map");
        t.begin_discard(0);
        let e = t.lock(0);
        assert!(e.discard_pending());
        t.unlock(0, e.installed(true), Transition::Fetched);
        assert!(t.load(0).discard_pending(), "a lock holder cannot clear the event reader's mark");
        assert!(t.load(0).is_resident() && t.load(0).is_dirty());
        assert!(t.load(0).remove_unhandled());
        let _ = t.lock(0);
        t.unlock_removed(0);
        assert!(!t.load(0).remove_unhandled(), "applied");
        assert!(t.load(0).discard_pending(), "handling the event does not end it: the zap may come later");
        let e = t.lock(0);
        t.unlock_zapped(0, e.zapped(), e, Transition::FoundUnmapped);
        assert_eq!(t.load(0), Entry::ZERO);
        assert_eq!(t.load(0).state(), PageState::Absent);
        // A remove event read while the page was locked announces another zap: its mark stays.
        let e = t.lock(0);
        t.begin_discard(0);
        t.unlock_zapped(0, e, e, Transition::FoundUnmapped);
        assert!(t.load(0).discard_pending());
        assert!(!t.load(1).discard_pending());
    }
}
