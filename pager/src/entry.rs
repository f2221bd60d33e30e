//! One page's entry in the page table, as a typed value: its named state ([`PageState`]), its
//! flags, its remote slot, and the transitions the fault handlers and the evictor make. Every
//! change of an entry goes through a method here, so the state machine is written down once
//! (and the exhaustive model in `model.rs` drives the same methods).
//!
//! Layout of the 8 bytes (the whole metadata cost of a page besides its slab's share of the
//! slot table):
//!
//! | bits | meaning |
//! |---|---|
//! | 0..32 | remote slot (valid when `HAS_SLOT`): slab index << 20 \| page in slab |
//! | 32 | `RESIDENT`: mapped in the region |
//! | 33 | `DIRTY`: the mapped copy is newer than the remote one (or there is none) |
//! | 34 | `HAS_SLOT`: a remote slot is reserved for the page |
//! | 35 | `REMOTE_VALID`: the slot holds the page's current content |
//! | 36 | `BUSY`: a transition is in progress (the page table's per-page lock) |
//! | 37 | `REFERENCED`: CLOCK reference bit |
//! | 38 | `PREFETCHED`: brought in by prefetch, not yet known to be used |
//! | 39 | `POISONED`: the page could not be fetched; accesses raise SIGBUS |
//! | 40 | `WRITTEN`: the page has held written data since it was last discarded: it may never be filled with zeros |
//! | 41 | `ZAP_PENDING`: a remove event covered the page and the kernel's zap has not been seen yet |
//! | 42 | `REMOVE_UNHANDLED`: a remove event covering the page was read and not yet applied to it |
//! | 43..64 | reserved; a replica's slot will live in a parallel `u32` array (4 bytes per page) |
//!
//! A page that is neither resident nor `REMOTE_VALID` reads as zeros, unless it is `WRITTEN`: then
//! its content was lost by a bug ([`PageState::Lost`]), and the pager poisons it instead.

use crate::store::Slot;

const SLOT_MASK: u64 = 0xFFFF_FFFF;
const RESIDENT: u64 = 1 << 32;
const DIRTY: u64 = 1 << 33;
const HAS_SLOT: u64 = 1 << 34;
const REMOTE_VALID: u64 = 1 << 35;
pub(crate) const BUSY: u64 = 1 << 36;
const REFERENCED: u64 = 1 << 37;
const PREFETCHED: u64 = 1 << 38;
const POISONED: u64 = 1 << 39;
const WRITTEN: u64 = 1 << 40;
pub(crate) const ZAP_PENDING: u64 = 1 << 41;
pub(crate) const REMOVE_UNHANDLED: u64 = 1 << 42;
/// Bits the event readers own: lock holders keep them as they are unless told otherwise.
pub(crate) const READER_BITS: u64 = ZAP_PENDING | REMOVE_UNHANDLED;

/// Where a page's content is, which decides how a missing fault on it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Never written, or discarded since: a fault installs a zero page, with no network.
    Absent,
    /// Mapped in the region (dirty or clean).
    Resident,
    /// Only the remote slot holds it: a fault fetches it.
    Remote,
    /// It could not be fetched (or its state broke an invariant): accesses raise SIGBUS.
    Poisoned,
    /// Written once, and now neither mapped nor held remotely: its content was lost by a bug.
    /// Never served as zeros; the pager poisons it and says so.
    Lost,
}

/// A typed, printable view of a page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Entry(u64);

impl Entry {
    /// The entry of a page never touched (or discarded): absent, no slot.
    pub(crate) const ZERO: Self = Self(0);

    /// Wraps raw bits (as recorded in the page history).
    pub(crate) fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub(crate) fn bits(self) -> u64 {
        self.0
    }

    fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }

    /// Where the page's content is.
    pub fn state(self) -> PageState {
        if self.has(POISONED) {
            PageState::Poisoned
        } else if self.has(RESIDENT) {
            PageState::Resident
        } else if self.has(REMOTE_VALID) {
            PageState::Remote
        } else if self.has(WRITTEN) {
            PageState::Lost
        } else {
            PageState::Absent
        }
    }

    /// Mapped in the region.
    pub fn is_resident(self) -> bool {
        self.has(RESIDENT)
    }

    /// The mapped copy is newer than the remote one (or there is none).
    pub fn is_dirty(self) -> bool {
        self.has(DIRTY)
    }

    /// The remote slot holds the page's current content (whether or not it is also mapped).
    pub fn has_remote_copy(self) -> bool {
        self.has(REMOTE_VALID)
    }

    /// Installed by prefetch, and no use of it seen yet.
    pub fn is_prefetched(self) -> bool {
        self.has(PREFETCHED)
    }

    /// The CLOCK reference bit.
    pub fn is_referenced(self) -> bool {
        self.has(REFERENCED)
    }

    /// A transition is in progress (the page is locked).
    pub fn is_busy(self) -> bool {
        self.has(BUSY)
    }

    /// The page's remote slot, if one is reserved for it.
    pub fn slot(self) -> Option<Slot> {
        self.has(HAS_SLOT).then(|| Slot::from_raw(u32::try_from(self.0 & SLOT_MASK).unwrap_or(u32::MAX)))
    }

    /// True when a remove event covering the page has been read and not yet applied to it: nothing
    /// may be installed in the page until it is (the install would survive the `madvise` whose
    /// zap already passed, and the page would read old data where the program expects zeros).
    pub fn remove_unhandled(self) -> bool {
        self.has(REMOVE_UNHANDLED)
    }

    /// True when a remove event (`madvise(MADV_DONTNEED)`) covered the page and the zap it
    /// announces has not been seen yet. The kernel zaps the range after the event is *read*, at a
    /// moment the pager cannot observe (possibly after the event was handled and the page
    /// refilled), so a page with this mark may vanish legitimately; finding it unmapped is the
    /// zap, and clears the mark.
    pub fn discard_pending(self) -> bool {
        self.has(ZAP_PENDING)
    }

    // Transitions. Each returns the entry to store when the lock is released.

    /// Installed from a zero page or a fetched copy, for the faulting access: written data if the
    /// access was a write (installed writable), clean otherwise (installed write-protected).
    pub(crate) fn installed(self, write: bool) -> Self {
        let written = if write { DIRTY | WRITTEN } else { 0 };
        Self(self.0 | RESIDENT | REFERENCED | written)
    }

    /// Installed ahead of use by prefetch (write-protected, clean).
    pub(crate) fn prefetched(self) -> Self {
        Self(self.0 | RESIDENT | REFERENCED | PREFETCHED)
    }

    /// The first write to a clean resident page (its protection lifted).
    pub(crate) fn written_to(self) -> Self {
        Self((self.0 | DIRTY | WRITTEN | REFERENCED) & !PREFETCHED)
    }

    /// A page zapped by a discard and refilled with zeros for a write: dirty, and its old remote
    /// copy no longer current.
    pub(crate) fn refilled(self) -> Self {
        Self((self.0 | DIRTY | WRITTEN | REFERENCED) & !(REMOTE_VALID | PREFETCHED))
    }

    /// Moved out of the region by the evictor; `written_to` is the slot the content was just
    /// written to (a dirty page), or `None` (a clean page whose remote copy, if any, is current).
    pub(crate) fn evicted(self, written_to: Option<Slot>) -> Self {
        let out = self.0 & !(RESIDENT | DIRTY | REFERENCED | PREFETCHED);
        match written_to {
            Some(slot) => Self((out & !SLOT_MASK) | u64::from(slot.raw()) | HAS_SLOT | REMOTE_VALID),
            None => Self(out),
        }
    }

    /// Found unmapped after a discard zapped it: an absent page (its slot, if any, stays reserved
    /// until the remove event is applied and frees it).
    pub(crate) fn zapped(self) -> Self {
        Self(self.0 & !(RESIDENT | DIRTY | WRITTEN | REMOTE_VALID | REFERENCED | PREFETCHED))
    }

    /// Poisoned: every access raises SIGBUS from now on.
    pub(crate) fn poisoned(self) -> Self {
        Self((self.0 | POISONED) & !(RESIDENT | DIRTY | REFERENCED | PREFETCHED))
    }

    /// The evictor could not move it out: it stays resident, and counts as just used.
    pub(crate) fn kept(self) -> Self {
        Self(self.0 | REFERENCED)
    }

    /// Unshared from a forked child by the evictor: from here on it counts as written (a write
    /// between lifting the protection and the rewrite would not be tracked).
    pub(crate) fn unshared(self) -> Self {
        Self(self.0 | DIRTY | WRITTEN)
    }

    /// Put back into the region after its write-back failed: resident and dirty. `kept_slot`:
    /// it still owns its slot (otherwise the slot and the remote copy are gone).
    pub(crate) fn put_back(self, kept_slot: bool) -> Self {
        let e = self.0 | REFERENCED | DIRTY | WRITTEN;
        Self(if kept_slot { e } else { e & !(HAS_SLOT | REMOTE_VALID) })
    }

    /// The CLOCK hand passed it: its reference bit cleared.
    pub(crate) fn unreferenced(self) -> Self {
        Self(self.0 & !REFERENCED)
    }

    /// Its prefetch has been accounted for (used or wasted).
    pub(crate) fn prefetch_settled(self) -> Self {
        Self(self.0 & !PREFETCHED)
    }

    /// Fault injection for the stress harness: the dirty mark forgotten (the bug class of #7).
    pub(crate) fn dirty_forgotten(self) -> Self {
        Self(self.0 & !DIRTY)
    }

    /// The entry with its slot replaced (and marked reserved).
    #[cfg(test)]
    pub(crate) fn with_slot(self, slot: Slot) -> Self {
        Self((self.0 & !SLOT_MASK) | u64::from(slot.raw()) | HAS_SLOT)
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u64, &str); 11] = [
            (RESIDENT, "resident"),
            (DIRTY, "dirty"),
            (WRITTEN, "written"),
            (REMOTE_VALID, "remote-valid"),
            (BUSY, "busy"),
            (REFERENCED, "referenced"),
            (PREFETCHED, "prefetched"),
            (POISONED, "poisoned"),
            (ZAP_PENDING, "zap-pending"),
            (REMOVE_UNHANDLED, "remove-unhandled"),
            (HAS_SLOT, "slot"),
        ];
        let mut first = true;
        for (bit, name) in NAMES {
            if self.has(bit) {
                write!(f, "{}{name}", if first { "" } else { "|" })?;
                first = false;
            }
        }
        if first {
            f.write_str("zero")?;
        }
        if let Some(slot) = self.slot() {
            write!(f, "={:#x}", slot.raw())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u32) -> Slot {
        Slot::from_raw(n)
    }

    #[test]
    fn a_page_moves_through_its_states() {
        let e = Entry::ZERO;
        assert_eq!(e.state(), PageState::Absent);
        let read = e.installed(false);
        assert_eq!(read.state(), PageState::Resident);
        assert!(!read.is_dirty(), "a read installs clean");
        let written = read.written_to();
        assert!(written.is_dirty());
        let out = written.evicted(Some(slot(9)));
        assert_eq!(out.state(), PageState::Remote);
        assert_eq!(out.slot(), Some(slot(9)));
        let back = out.installed(false);
        assert!(back.has_remote_copy() && !back.is_dirty(), "a fetched page is clean, its copy current");
        assert_eq!(back.evicted(None).state(), PageState::Remote, "a clean eviction keeps the copy");
        assert_eq!(back.poisoned().state(), PageState::Poisoned);
    }

    #[test]
    fn a_written_page_without_a_copy_is_lost_never_absent() {
        let dirty = Entry::ZERO.installed(true);
        // The bug class of #7: dropped as if clean.
        let dropped = dirty.dirty_forgotten().evicted(None);
        assert_eq!(dropped.state(), PageState::Lost);
        // A discard is what makes a written page absent again.
        assert_eq!(dirty.zapped().state(), PageState::Absent);
    }

    #[test]
    fn a_failed_write_back_puts_the_page_back_dirty() {
        let e = Entry::ZERO.installed(true).evicted(Some(slot(3))).installed(false);
        let kept = e.put_back(true);
        assert!(kept.is_resident() && kept.is_dirty() && kept.slot() == Some(slot(3)));
        let lost_slot = e.put_back(false);
        assert_eq!(lost_slot.slot(), None);
        assert!(!lost_slot.has_remote_copy());
    }

    #[test]
    fn prefetched_pages_are_marked_until_used() {
        let e = Entry::ZERO.with_slot(slot(1)).evicted(Some(slot(1))).prefetched();
        assert!(e.is_prefetched() && !e.is_dirty());
        assert!(!e.written_to().is_prefetched());
        assert!(!e.prefetch_settled().is_prefetched());
        assert_eq!(e.to_string(), "resident|remote-valid|referenced|prefetched|slot=0x1");
    }
}
