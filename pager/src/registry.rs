//! The region registry: every live region by id, the lookup of a faulting address, and the
//! page-table memory they hold.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::region::RegionState;
use crate::PAGE_SIZE;

/// The live regions of a pager.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    regions: RwLock<Vec<Option<Arc<RegionState>>>>,
    next_id: AtomicU32,
    table_bytes: AtomicU64,
}

impl Registry {
    /// A fresh region id.
    pub(crate) fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a region (under the id it was given by `next_id`).
    pub(crate) fn insert(&self, region: Arc<RegionState>) {
        self.table_bytes.fetch_add(region.table.bytes() as u64, Ordering::Relaxed);
        let mut regions = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        let idx = usize::try_from(region.id).unwrap_or(usize::MAX);
        if regions.len() <= idx {
            regions.resize(idx + 1, None);
        }
        regions[idx] = Some(region);
    }

    /// Removes a region.
    pub(crate) fn remove(&self, region: &RegionState) {
        let mut regions = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = usize::try_from(region.id).ok().and_then(|i| regions.get_mut(i)) {
            *slot = None;
        }
        self.table_bytes.fetch_sub(region.table.bytes() as u64, Ordering::Relaxed);
    }

    /// The region holding `addr`, and the page's index in it.
    pub(crate) fn lookup(&self, addr: usize) -> Option<(Arc<RegionState>, usize)> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        regions.iter().flatten().find(|r| r.contains(addr)).map(|r| (Arc::clone(r), (addr - r.base) / PAGE_SIZE))
    }

    /// The region with id `id`.
    pub(crate) fn get(&self, id: u32) -> Option<Arc<RegionState>> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        regions.get(usize::try_from(id).ok()?).and_then(Clone::clone)
    }

    /// The live regions with an objective of their own (`RegionOptions::slo`).
    pub(crate) fn with_objectives(&self) -> Vec<Arc<RegionState>> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        regions.iter().flatten().filter(|r| r.objective.is_some()).cloned().collect()
    }

    /// Bytes of page tables of the live regions.
    pub(crate) fn table_bytes(&self) -> u64 {
        self.table_bytes.load(Ordering::Relaxed)
    }
}
