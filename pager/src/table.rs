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
//! | 40..64 | reserved; a replica's slot will live in a parallel `u32` array (4 bytes per page) |
//!
//! A page that is neither resident nor `REMOTE_VALID` reads as zeros.

use std::sync::atomic::{AtomicU64, Ordering};

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
const SLOT_MASK: u64 = 0xFFFF_FFFF;

/// The slot stored in an entry.
pub fn slot_of(entry: u64) -> u32 {
    u32::try_from(entry & SLOT_MASK).unwrap_or(u32::MAX)
}

/// `entry` with its slot replaced.
pub fn with_slot(entry: u64, slot: u32) -> u64 {
    (entry & !SLOT_MASK) | u64::from(slot)
}

/// Bytes of page-table metadata per page.
pub const BYTES_PER_PAGE: usize = std::mem::size_of::<AtomicU64>();

/// The entries of one region, in their own anonymous mapping: zero pages cost nothing until an
/// entry in them changes, so a huge, mostly untouched region has a small resident table.
#[derive(Debug)]
pub struct PageTable {
    map: memmap2::MmapMut,
    len: usize,
}

impl PageTable {
    /// A table of `pages` entries, all "zero, not resident".
    pub fn new(pages: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new().len((pages * BYTES_PER_PAGE).max(1)).map_anon()?;
        Ok(Self { map, len: pages })
    }

    fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, holds `len` 8-byte slots, lives as long as `self`,
        // starts zeroed (a valid `AtomicU64` is any bit pattern) and is only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.len) }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty table.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Releases the `BUSY` lock, storing `entry` (without `BUSY`).
    pub fn unlock(&self, page: usize, entry: u64) {
        self.entries()[page].store(entry & !BUSY, Ordering::Release);
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

/// Spin briefly, then yield, then sleep: waits for another thread's short transition.
pub fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_update_and_slots() {
        let t = PageTable::new(4).expect("map");
        assert_eq!(t.bytes(), 32);
        let before = t.try_lock(1, |e| e & RESIDENT == 0).expect("free");
        assert_eq!(before, 0);
        assert!(t.try_lock(1, |_| true).is_none(), "already busy");
        t.unlock(1, with_slot(RESIDENT | HAS_SLOT, 77));
        let e = t.load(1);
        assert_eq!(slot_of(e), 77);
        assert_eq!(e & BUSY, 0);
        t.update(1, DIRTY, RESIDENT);
        assert_eq!(t.load(1) & (DIRTY | RESIDENT), DIRTY);
        assert!(t.try_lock(1, |e| e & RESIDENT != 0).is_none(), "predicate refuses");
    }
}
