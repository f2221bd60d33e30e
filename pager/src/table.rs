//! The page table: one `AtomicU64` per page of a region holding its state flags and the slot of its
//! remote copy. Transitions are compare-and-swap; the `BUSY` bit is the per-page lock that a fetch,
//! an eviction or a remove holds while the page is between states.
//!
//! Layout of an entry (8 bytes per page, the whole metadata cost of a page besides its slab's share
//! of the slot table):
//!
//! | bits | meaning |
//! |---|---|
//! | 0..32 | remote slot (valid when `HAS_SLOT`): slab index << 20 \| page in slab |
//! | 32 | `RESIDENT`: mapped in the region |
//! | 33 | `DIRTY`: the mapped copy is newer than the remote one (or there is none) |
//! | 34 | `HAS_SLOT`: a remote slot is reserved for the page |
//! | 35 | `REMOTE_VALID`: the slot holds the page's current content |
//! | 36 | `BUSY`: a transition is in progress |
//! | 37 | `REFERENCED`: CLOCK reference bit |
//! | 38 | `PREFETCHED`: brought in by prefetch, not yet known to be used |
//! | 39 | `POISONED`: the page could not be fetched; accesses raise SIGBUS |
//! | 40 | `WRITTEN`: the page has held written data since it was last discarded: it may never be filled with zeros |
//! | 41 | `ZAP_PENDING`: a remove event covered the page and the kernel's zap has not been seen yet |
//! | 42 | `REMOVE_UNHANDLED`: a remove event covering the page was read and not yet applied to it |
//! | 43..64 | reserved; a replica's slot will live in a parallel `u32` array (4 bytes per page) |
//!
//! A page that is neither resident nor `REMOTE_VALID` reads as zeros, unless it is `WRITTEN`: then
//! its content was lost by a bug, and the pager poisons it instead (see `fault::zero_fault`).

use std::sync::Arc;

use crate::history::{History, Transition};
use crate::store::Slot;
pub(crate) use crate::sync::backoff;
use crate::sync::{AtomicU64, Ordering};

/// Mapped in the region.
pub const RESIDENT: u64 = 1 << 32;
/// The mapped copy is newer than the remote copy.
pub const DIRTY: u64 = 1 << 33;
/// A remote slot is reserved.
pub const HAS_SLOT: u64 = 1 << 34;
/// The remote slot holds current content.
pub const REMOTE_VALID: u64 = 1 << 35;
/// A transition is in progress.
pub const BUSY: u64 = 1 << 36;
/// CLOCK reference bit.
pub const REFERENCED: u64 = 1 << 37;
/// Installed by prefetch, use not yet seen.
pub const PREFETCHED: u64 = 1 << 38;
/// Fetch failed; accesses raise SIGBUS.
pub const POISONED: u64 = 1 << 39;
/// Written data lives in this page (set with `DIRTY`, cleared only when the page is discarded):
/// filling it with zeros would lose that data.
pub const WRITTEN: u64 = 1 << 40;
const SLOT_MASK: u64 = 0xFFFF_FFFF;
const ZAP_PENDING: u64 = 1 << 41;
const REMOVE_UNHANDLED: u64 = 1 << 42;
/// Bits the event readers own: lock holders keep them as they are unless told otherwise.
const READER_BITS: u64 = ZAP_PENDING | REMOVE_UNHANDLED;

/// True when a remove event covering the page has been read and not yet applied to it: nothing
/// may be installed in the page until it is (the install would survive the `madvise` whose
/// zap already passed, and the page would read old data where the program expects zeros).
pub fn remove_unhandled(entry: u64) -> bool {
    entry & REMOVE_UNHANDLED != 0
}

/// True when a remove event (`madvise(MADV_DONTNEED)`) covered the page and the zap it announces
/// has not been seen yet. The kernel zaps the range after the event is *read*, at a moment the
/// pager cannot observe (possibly after the event was handled and the page refilled), so a page
/// with this bit may vanish legitimately; finding it unmapped is the zap, and clears the bit.
pub fn discard_pending(entry: u64) -> bool {
    entry & ZAP_PENDING != 0
}

/// A typed, printable view of an entry's bits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Entry(u64);

impl Entry {
    /// Wraps raw bits.
    pub fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u64, &str); 9] = [
            (RESIDENT, "resident"),
            (DIRTY, "dirty"),
            (WRITTEN, "written"),
            (REMOTE_VALID, "remote-valid"),
            (BUSY, "busy"),
            (REFERENCED, "referenced"),
            (PREFETCHED, "prefetched"),
            (POISONED, "poisoned"),
            (HAS_SLOT, "slot"),
        ];
        let mut first = true;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { "|" })?;
                first = false;
            }
        }
        if first {
            f.write_str("zero")?;
        }
        if self.0 & HAS_SLOT != 0 {
            write!(f, "={:#x}", slot_of(self.0).raw())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry({self})")
    }
}

/// The slot bits of an entry (meaningful when `HAS_SLOT` is set).
pub fn slot_of(entry: u64) -> Slot {
    Slot::from_raw(u32::try_from(entry & SLOT_MASK).unwrap_or(u32::MAX))
}

/// The remote slot of an entry, if it has one.
pub fn slot(entry: u64) -> Option<Slot> {
    (entry & HAS_SLOT != 0).then(|| slot_of(entry))
}

/// `entry` with its slot replaced.
pub fn with_slot(entry: u64, slot: Slot) -> u64 {
    (entry & !SLOT_MASK) | u64::from(slot.raw())
}

/// Bytes of page-table metadata per page.
pub const BYTES_PER_PAGE: usize = std::mem::size_of::<AtomicU64>();

/// The entries of one region, in their own anonymous mapping: zero pages cost nothing until an
/// entry in them changes, so a huge, mostly untouched region has a small resident table.
#[derive(Debug)]
pub struct PageTable {
    #[cfg(not(coalesce_loom))]
    map: memmap2::MmapMut,
    /// Under loom: the model's atomics, on the heap.
    #[cfg(coalesce_loom)]
    map: Box<[AtomicU64]>,
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
        let map = (0..pages).map(|_| AtomicU64::new(0)).collect();
        Ok(Self { map, len: pages, region, history })
    }

    #[cfg(coalesce_loom)]
    fn entries(&self) -> &[AtomicU64] {
        &self.map
    }

    #[cfg(not(coalesce_loom))]
    fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, holds `len` 8-byte slots, lives as long as `self`,
        // starts zeroed (a valid `AtomicU64` is any bit pattern) and is only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.len) }
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
    pub fn load(&self, page: usize) -> u64 {
        self.entries()[page].load(Ordering::Acquire)
    }

    /// Takes the page's `BUSY` lock if `accept(entry)` holds and it is not busy; returns the entry
    /// as it was before locking.
    pub fn try_lock(&self, page: usize, accept: impl Fn(u64) -> bool) -> Option<u64> {
        let e = &self.entries()[page];
        let mut cur = e.load(Ordering::Acquire);
        loop {
            if cur & BUSY != 0 || !accept(cur) {
                return None;
            }
            match e.compare_exchange_weak(cur, cur | BUSY, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(cur),
                Err(now) => cur = now,
            }
        }
    }

    /// Takes the `BUSY` lock, waiting for another holder to release it.
    pub fn lock(&self, page: usize) -> u64 {
        let mut spins = 0u32;
        loop {
            if let Some(cur) = self.try_lock(page, |_| true) {
                return cur;
            }
            backoff(&mut spins);
        }
    }

    /// Releases the `BUSY` lock, storing `entry` (without `BUSY`); `why` goes to the history.
    /// The remove-event bits are the event reader's, not the lock holder's: they are kept.
    pub fn unlock(&self, page: usize, entry: u64, why: Transition) {
        self.release(page, why, |cur| (entry & !(BUSY | READER_BITS)) | (cur & READER_BITS));
    }

    /// Marks the page as covered by a remove event just read (before the kernel may zap it).
    pub fn begin_discard(&self, page: usize) {
        self.entries()[page].fetch_or(ZAP_PENDING | REMOVE_UNHANDLED, Ordering::AcqRel);
    }

    /// Releases the lock of a page to which the pending remove events were just applied
    /// (`entry` is its zero state), clearing `REMOVE_UNHANDLED` (one set by an event read while
    /// the page was locked is cleared too: applying a discard is idempotent, and the newer
    /// event's zap is still covered by `ZAP_PENDING`).
    pub fn unlock_removed(&self, page: usize, entry: u64) {
        self.release(page, Transition::Removed, |cur| (entry & !(BUSY | READER_BITS)) | (cur & ZAP_PENDING));
    }

    /// Releases the lock like [`PageTable::unlock`], and clears `ZAP_PENDING`: the caller saw the
    /// zap (the page was found unmapped). `locked` is the entry as the caller locked it: a mark
    /// set by a remove event read since then announces another zap, and is kept.
    pub fn unlock_zapped(&self, page: usize, entry: u64, locked: u64, why: Transition) {
        self.release(page, why, |cur| {
            let newer_mark = if discard_pending(locked) { 0 } else { cur & ZAP_PENDING };
            (entry & !(BUSY | READER_BITS)) | newer_mark | (cur & REMOVE_UNHANDLED)
        });
    }

    /// Stores `new_of(current entry)` (which must not have `BUSY`) and records the transition.
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
            let e = self.load(page);
            h.record(self.region, page, why, e, e);
        }
    }

    /// Waits until the page is not busy; returns the entry then.
    pub fn wait_idle(&self, page: usize) -> u64 {
        let mut spins = 0u32;
        loop {
            let cur = self.load(page);
            if cur & BUSY == 0 {
                return cur;
            }
            backoff(&mut spins);
        }
    }

    /// Atomically sets `set` and clears `clear` on an entry (whatever its lock state).
    pub fn update(&self, page: usize, set: u64, clear: u64) -> u64 {
        let e = &self.entries()[page];
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let new = (cur | set) & !clear;
            match e.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return cur,
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    #[test]
    fn lock_update_and_slots() {
        let t = PageTable::new(4).expect("map");
        assert_eq!(t.bytes(), 32);
        let before = t.try_lock(1, |e| e & RESIDENT == 0).expect("free");
        assert_eq!(before, 0);
        assert!(t.try_lock(1, |_| true).is_none(), "already busy");
        t.unlock(1, with_slot(RESIDENT | HAS_SLOT, Slot::from_raw(77)), Transition::Fetched);
        let e = t.load(1);
        assert_eq!(slot_of(e), Slot::from_raw(77));
        assert_eq!(e & BUSY, 0);
        t.update(1, DIRTY, RESIDENT);
        assert_eq!(t.load(1) & (DIRTY | RESIDENT), DIRTY);
        assert!(t.try_lock(1, |e| e & RESIDENT != 0).is_none(), "predicate refuses");
    }

    #[test]
    fn a_pending_zap_survives_unlock_until_the_zap_is_seen() {
        let t = PageTable::new(2).expect("map");
        t.begin_discard(0);
        let e = t.lock(0);
        assert!(discard_pending(e));
        t.unlock(0, RESIDENT | DIRTY, Transition::Fetched);
        assert!(discard_pending(t.load(0)), "a lock holder cannot clear the event reader's mark");
        assert_eq!(t.load(0) & (RESIDENT | DIRTY), RESIDENT | DIRTY);
        assert!(remove_unhandled(t.load(0)));
        let _ = t.lock(0);
        t.unlock_removed(0, 0);
        assert!(!remove_unhandled(t.load(0)), "applied");
        assert!(discard_pending(t.load(0)), "handling the event does not end it: the zap may come later");
        let e = t.lock(0);
        t.unlock_zapped(0, e & !(RESIDENT | DIRTY), e, Transition::FoundUnmapped);
        assert_eq!(t.load(0), 0);
        // A remove event read while the page was locked announces another zap: its mark stays.
        let e = t.lock(0);
        t.begin_discard(0);
        t.unlock_zapped(0, e, e, Transition::FoundUnmapped);
        assert!(discard_pending(t.load(0)));
        assert!(!discard_pending(t.load(1)));
    }
}
