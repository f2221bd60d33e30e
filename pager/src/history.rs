//! Page history: an optional, lock-free log of every page-table transition (which page, which
//! thread, why, entry before and after), for finding races. Off by default
//! ([`crate::PagerConfig::history`]); the stress harness (`coalesce stress`) turns it on and prints
//! the history of the page whose content came back wrong.
//!
//! The log is a ring of fixed-size records written with relaxed atomics: recording costs one
//! `fetch_add` and five stores, never allocates and never blocks, so it can run on the fault path
//! (and inside the LD_PRELOAD allocator's pager threads). A record is published by its sequence
//! word, written last; a reader skips records that are being overwritten.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::entry::Entry;

/// Why a page's entry changed (or what was done to the page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Transition {
    /// First touch: a zero page was installed.
    ZeroFilled = 1,
    /// Fetched from a lender and installed (the faulting page).
    Fetched,
    /// Fetched from a lender and installed ahead of use.
    Prefetched,
    /// Locked for an install that did not happen (already mapped, or the fetch failed): unchanged.
    NotInstalled,
    /// First write to a clean page: marked dirty and unprotected.
    WriteFault,
    /// Taken out of the region by the evictor (`UFFDIO_MOVE`); the entry is still locked.
    MovedOut,
    /// Evicted clean: dropped, its remote copy (if any) is current.
    EvictedClean,
    /// Evicted dirty: written back, then dropped.
    EvictedDirty,
    /// The evictor could not move the page out; it stays resident.
    Kept,
    /// The evictor found no page mapped where the table said resident.
    FoundUnmapped,
    /// A write-back failed; the page was put back, dirty.
    PutBack,
    /// The page could not be fetched (or may not be zero-filled): accesses raise SIGBUS.
    Poisoned,
    /// `madvise` discarded the page: zero from now on.
    Removed,
    /// A missing fault on a page the table calls resident: it had been discarded behind the
    /// table's back and was refilled.
    Refilled,
}

impl Transition {
    fn from_u8(v: u8) -> Option<Self> {
        // Discriminants are 1, 2, ... in declaration order.
        let all = [
            Self::ZeroFilled,
            Self::Fetched,
            Self::Prefetched,
            Self::NotInstalled,
            Self::WriteFault,
            Self::MovedOut,
            Self::EvictedClean,
            Self::EvictedDirty,
            Self::Kept,
            Self::FoundUnmapped,
            Self::PutBack,
            Self::Poisoned,
            Self::Removed,
            Self::Refilled,
        ];
        all.get(usize::from(v).checked_sub(1)?).copied()
    }
}

thread_local! {
    static THREAD_TAG: Cell<u8> = const { Cell::new(0) };
}

/// Names the calling thread in history records (0: an application thread).
pub(crate) fn set_thread_tag(tag: u8) {
    THREAD_TAG.with(|t| t.set(tag));
}

/// The tag of the evictor thread; fault handlers are 1..=64, application threads 0.
pub(crate) const EVICTOR_TAG: u8 = 200;

fn thread_name(tag: u8) -> String {
    match tag {
        0 => "app".into(),
        EVICTOR_TAG => "evictor".into(),
        n => format!("uffd-{}", n - 1),
    }
}

const WORDS: usize = 5;

/// The ring of records.
#[derive(Debug)]
pub struct History {
    words: Box<[AtomicU64]>,
    capacity: usize,
    next: AtomicUsize,
    epoch: Instant,
}

/// One recorded transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Order of recording (global over all pages).
    pub seq: u64,
    /// Nanoseconds since the pager started.
    pub nanos: u64,
    /// Region id.
    pub region: u32,
    /// Page index in the region.
    pub page: u32,
    /// Thread tag (0 application, 1.. fault handlers, 200 evictor).
    pub thread: u8,
    /// What happened.
    pub transition: Option<Transition>,
    /// Entry before.
    pub before: u64,
    /// Entry after.
    pub after: u64,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.transition.map_or_else(|| "?".to_string(), |t| format!("{t:?}"));
        write!(
            f,
            "#{:<9} {:>12.6} s  {:<8} {:<14} {} -> {}",
            self.seq,
            self.nanos as f64 / 1e9,
            thread_name(self.thread),
            what,
            Entry::from_bits(self.before),
            Entry::from_bits(self.after)
        )
    }
}

impl History {
    /// A ring of `capacity` records (at least 1024).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1024);
        let words = (0..capacity * WORDS).map(|_| AtomicU64::new(0)).collect();
        Self { words, capacity, next: AtomicUsize::new(0), epoch: Instant::now() }
    }

    /// Records one transition of `(region, page)`.
    pub fn record(&self, region: u32, page: usize, transition: Transition, before: u64, after: u64) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let at = (seq % self.capacity) * WORDS;
        let w = &self.words[at..at + WORDS];
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let page = u64::try_from(page).unwrap_or(u64::MAX) & 0xFFFF_FFFF;
        let tag = u64::from(THREAD_TAG.with(Cell::get));
        w[0].store(0, Ordering::Release);
        w[1].store(nanos, Ordering::Relaxed);
        w[2].store(
            page | u64::from(region & 0xFFFF) << 32 | u64::from(transition as u8) << 48 | tag << 56,
            Ordering::Relaxed,
        );
        w[3].store(before, Ordering::Relaxed);
        w[4].store(after, Ordering::Relaxed);
        w[0].store(seq as u64 + 1, Ordering::Release);
    }

    /// Every record still in the ring for `(region, page)`, oldest first.
    pub fn of_page(&self, region: u32, page: usize) -> Vec<Record> {
        let mut out: Vec<Record> = (0..self.capacity)
            .filter_map(|i| {
                let w = &self.words[i * WORDS..(i + 1) * WORDS];
                let seq = w[0].load(Ordering::Acquire);
                if seq == 0 {
                    return None;
                }
                let packed = w[2].load(Ordering::Relaxed);
                let r = Record {
                    seq: seq - 1,
                    nanos: w[1].load(Ordering::Relaxed),
                    region: u32::try_from(packed >> 32 & 0xFFFF).unwrap_or(0),
                    page: u32::try_from(packed & 0xFFFF_FFFF).unwrap_or(u32::MAX),
                    thread: u8::try_from(packed >> 56).unwrap_or(0),
                    transition: Transition::from_u8(u8::try_from(packed >> 48 & 0xFF).unwrap_or(0)),
                    before: w[3].load(Ordering::Relaxed),
                    after: w[4].load(Ordering::Relaxed),
                };
                let same = w[0].load(Ordering::Acquire) == seq;
                (same && r.region == region & 0xFFFF && r.page as usize == page).then_some(r)
            })
            .collect();
        out.sort_by_key(|r| r.seq);
        out
    }

    /// Records written since the start (including overwritten ones).
    pub fn recorded(&self) -> u64 {
        self.next.load(Ordering::Relaxed) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_by_page_in_order_and_the_ring_wraps() {
        let h = History::new(1024);
        for i in 0..3000usize {
            h.record(1, i % 10, Transition::Fetched, i as u64, i as u64 + 1);
        }
        let r = h.of_page(1, 7);
        assert!(!r.is_empty());
        assert!(r.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(r.iter().all(|r| r.page == 7 && r.region == 1 && r.transition == Some(Transition::Fetched)));
        // Only the newest 1024 records survive.
        assert!(r[0].seq >= 3000 - 1024);
        assert_eq!(h.recorded(), 3000);
        assert!(h.of_page(2, 7).is_empty());
    }

    #[test]
    fn transitions_round_trip_through_their_byte() {
        for v in 0..=255u8 {
            if let Some(t) = Transition::from_u8(v) {
                assert_eq!(t as u8, v);
            }
        }
        assert_eq!(Transition::from_u8(1), Some(Transition::ZeroFilled));
        assert_eq!(Transition::from_u8(14), Some(Transition::Refilled));
        assert_eq!(Transition::from_u8(0), None);
        assert_eq!(Transition::from_u8(15), None);
    }
}
