//! The lenders a store knows, in the order they joined: append-only, so that a lender's index
//! (kept in slab groups, copies' locations and every thread's endpoint table) stays valid for the
//! store's life. A lender that fails or leaves keeps its place (marked so); a new one is appended
//! while the store runs (discovery, [`super::LenderStore::add_lender`]) without a lock on the
//! readers' side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use super::Lender;

impl std::ops::Index<usize> for Roster {
    type Output = Lender;

    /// Lender `i`. Indices come from the store's own records (groups, locations), made only after
    /// the lender joined, and lenders are never removed: a missing one is a bug.
    fn index(&self, i: usize) -> &Lender {
        self.get(i).unwrap_or_else(|| unreachable!("lender {i} of {} is not in the roster", self.len()))
    }
}

/// Most lenders one store can know over its life.
pub const MAX_LENDERS: usize = 256;

/// The append-only list of lenders.
#[derive(Debug)]
pub(super) struct Roster {
    slots: Box<[OnceLock<Lender>]>,
    len: AtomicUsize,
    /// Serialises appends.
    append: Mutex<()>,
}

impl Roster {
    pub(super) fn new(lenders: Vec<Lender>) -> Self {
        let slots: Box<[OnceLock<Lender>]> = (0..MAX_LENDERS).map(|_| OnceLock::new()).collect();
        let len = lenders.len().min(MAX_LENDERS);
        for (slot, lender) in slots.iter().zip(lenders) {
            let _ = slot.set(lender);
        }
        Self { slots, len: AtomicUsize::new(len), append: Mutex::new(()) }
    }

    /// Lenders known so far.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Lender `i`, if there is one.
    pub(super) fn get(&self, i: usize) -> Option<&Lender> {
        if i < self.len() {
            self.slots.get(i)?.get()
        } else {
            None
        }
    }

    /// Every lender known so far, with its index.
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &Lender)> {
        (0..self.len()).filter_map(|i| self.get(i).map(|l| (i, l)))
    }

    /// Appends a lender; returns its index, or gives it back when the roster is full.
    #[allow(clippy::result_large_err)]
    pub(super) fn push(&self, lender: Lender) -> Result<usize, Lender> {
        let _guard = self.append.lock().unwrap_or_else(PoisonError::into_inner);
        let i = self.len();
        let Some(slot) = self.slots.get(i) else { return Err(lender) };
        slot.set(lender)?;
        self.len.store(i + 1, Ordering::Release);
        Ok(i)
    }
}
