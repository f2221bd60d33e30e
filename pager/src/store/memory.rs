//! A store in this process's memory: every slot is a heap page (and its trailer). For unit tests
//! of the fault and eviction logic (no lender, no network) and for measuring the pager alone.
//! Failures can be injected ([`MemoryStoreFaults`]), a test can play a lying lender by changing
//! what a slot holds ([`MemoryStore::set_record`]), and the store counts what it was asked to do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdma::LocalRegion;

use super::{LenderInfo, PageIo, PageStore, PageTransfer, Slot, TransferError, TRAILER_LEN};
use crate::{lock, PagerError, PAGE_SIZE};

/// Failures a [`MemoryStore`] fakes, for tests of the failure paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStoreFaults {
    /// Every read fails (as a lender that stopped answering: the pages are poisoned).
    pub reads_fail: bool,
    /// Every write fails (as a lender that refuses: the pages are put back).
    pub writes_fail: bool,
    /// No new slot is handed out (as lenders that are all full).
    pub full: bool,
}

#[derive(Debug, Default)]
struct Pages {
    /// Slot `i` holds `pages[i]` (`None`: free): the page, then its trailer.
    pages: Vec<Option<Box<[u8]>>>,
    free: Vec<u32>,
    used: u64,
}

/// Pages kept in this process's memory, up to a capacity.
#[derive(Debug)]
pub struct MemoryStore {
    capacity: u64,
    pages: Mutex<Pages>,
    faults: Mutex<MemoryStoreFaults>,
    reads: AtomicU64,
    writes: AtomicU64,
    distrusted: AtomicU64,
    /// Slots whose copy came back changed: no longer readable.
    untrusted: Mutex<std::collections::HashSet<u32>>,
}

impl MemoryStore {
    /// A store that holds up to `capacity_pages` pages.
    pub fn new(capacity_pages: u64) -> Self {
        Self {
            capacity: capacity_pages,
            pages: Mutex::new(Pages::default()),
            faults: Mutex::new(MemoryStoreFaults::default()),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            distrusted: AtomicU64::new(0),
            untrusted: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Times a layer above said a copy came back changed ([`PageIo::distrust`]).
    pub fn times_distrusted(&self) -> u64 {
        self.distrusted.load(Ordering::Relaxed)
    }

    /// What `slot` holds: the page, then its trailer (`None`: the slot is free).
    pub fn record(&self, slot: Slot) -> Option<Vec<u8>> {
        let pages = lock(&self.pages);
        pages.pages.get(usize::try_from(slot.raw()).ok()?)?.as_ref().map(|p| p.to_vec())
    }

    /// Replaces what `slot` holds, as a lying lender would (`record` as [`MemoryStore::record`]
    /// returns it). False when the slot is free or the length is wrong.
    pub fn set_record(&self, slot: Slot, record: &[u8]) -> bool {
        let mut pages = lock(&self.pages);
        let Some(Some(held)) = usize::try_from(slot.raw()).ok().and_then(|i| pages.pages.get_mut(i)) else {
            return false;
        };
        if held.len() != record.len() {
            return false;
        }
        held.copy_from_slice(record);
        true
    }

    /// The slots in use.
    pub fn slots(&self) -> Vec<Slot> {
        let pages = lock(&self.pages);
        (0..pages.pages.len())
            .filter(|&i| pages.pages[i].is_some())
            .filter_map(|i| u32::try_from(i).ok().map(Slot))
            .collect()
    }

    /// Sets the failures to fake from now on.
    pub fn set_faults(&self, faults: MemoryStoreFaults) {
        *lock(&self.faults) = faults;
    }

    /// Pages read successfully so far.
    pub fn pages_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Pages written successfully so far.
    pub fn pages_written(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// A copy of the page in `slot`, if the slot is in use.
    pub fn page(&self, slot: Slot) -> Option<Vec<u8>> {
        self.record(slot).map(|mut r| {
            r.truncate(PAGE_SIZE);
            r
        })
    }

    fn faults(&self) -> MemoryStoreFaults {
        *lock(&self.faults)
    }

    fn alloc(&self) -> Option<Slot> {
        if self.faults().full {
            return None;
        }
        let mut p = lock(&self.pages);
        if p.used >= self.capacity {
            return None;
        }
        let slot = match p.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(p.pages.len()).ok()?;
                p.pages.push(None);
                slot
            }
        };
        p.pages[usize::try_from(slot).ok()?] = Some(vec![0; PAGE_SIZE + TRAILER_LEN].into_boxed_slice());
        p.used += 1;
        Some(Slot(slot))
    }

    fn in_use(&self, slot: Slot) -> bool {
        let p = lock(&self.pages);
        usize::try_from(slot.raw()).ok().and_then(|i| p.pages.get(i)).is_some_and(Option::is_some)
    }
}

impl PageStore for MemoryStore {
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError> {
        Ok(Box::new(MemoryIo { store: self }))
    }

    fn free(&self, slot: Slot) {
        let mut p = lock(&self.pages);
        if let Some(page) = usize::try_from(slot.raw()).ok().and_then(|i| p.pages.get_mut(i)) {
            if page.take().is_some() {
                p.free.push(slot.raw());
                p.used -= 1;
                lock(&self.untrusted).remove(&slot.raw());
            }
        }
    }

    fn lender_of(&self, _slot: Slot) -> Option<SocketAddr> {
        None
    }

    fn trailer_len(&self) -> usize {
        TRAILER_LEN
    }

    fn seals_pages(&self) -> bool {
        false
    }

    fn maintain(&self) {}

    fn maintenance_period(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn remote_pages(&self) -> u64 {
        lock(&self.pages).used
    }

    fn bookkeeping_bytes(&self) -> usize {
        let p = lock(&self.pages);
        p.pages.capacity() * std::mem::size_of::<Option<Box<[u8]>>>() + p.free.capacity() * 4
    }

    fn lenders(&self) -> Vec<LenderInfo> {
        Vec::new()
    }

    fn release_all(&self) {
        let mut p = lock(&self.pages);
        *p = Pages::default();
    }
}

/// I/O on a [`MemoryStore`]: copies under the store's lock.
#[derive(Debug)]
struct MemoryIo {
    store: Arc<MemoryStore>,
}

impl PageIo for MemoryIo {
    fn read_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>) {
        out.clear();
        let fail = self.store.faults().reads_fail;
        let p = lock(&self.store.pages);
        for t in pages {
            let page = usize::try_from(t.slot.raw()).ok().and_then(|i| p.pages.get(i)).and_then(Option::as_ref);
            out.push(match page {
                None => Err(TransferError::NoSuchSlot),
                Some(_) if fail => Err(TransferError::Timeout(Duration::ZERO)),
                Some(record) => read_record(buf, t, record),
            });
        }
        let ok = out.iter().filter(|r| r.is_ok()).count() as u64;
        self.store.reads.fetch_add(ok, Ordering::Relaxed);
    }

    fn write_pages(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        out.clear();
        let fail = self.store.faults().writes_fail;
        let mut p = lock(&self.store.pages);
        for t in pages {
            let page = usize::try_from(t.slot.raw()).ok().and_then(|i| p.pages.get_mut(i)).and_then(Option::as_mut);
            out.push(match page {
                None => Err(TransferError::NoSuchSlot),
                Some(_) if fail => Err(TransferError::Refused("injected".into())),
                Some(record) => write_record(buf, t, record),
            });
        }
        let ok = out.iter().filter(|r| r.is_ok()).count() as u64;
        self.store.writes.fetch_add(ok, Ordering::Relaxed);
    }

    fn readable(&self, slot: Slot) -> bool {
        self.store.in_use(slot) && !lock(&self.store.untrusted).contains(&slot.raw())
    }

    fn intact(&self, slot: Slot) -> bool {
        self.readable(slot)
    }

    fn distrust(&mut self, slot: Slot, _why: &str) {
        self.store.distrusted.fetch_add(1, Ordering::Relaxed);
        lock(&self.store.untrusted).insert(slot.raw());
    }

    fn place(&mut self, current: Option<Slot>) -> Option<Slot> {
        match current {
            Some(slot) if self.intact(slot) => Some(slot),
            Some(slot) => {
                PageStore::free(&*self.store, slot);
                self.store.alloc()
            }
            None => self.store.alloc(),
        }
    }
}

/// Copies a slot's record (page, and trailer if asked for) into `buf`.
fn read_record(buf: &LocalRegion, t: &PageTransfer, record: &[u8]) -> Result<(), TransferError> {
    let local = |e: rdma::TransportError| TransferError::Local(e.to_string());
    buf.write_at(t.offset, &record[..PAGE_SIZE]).map_err(local)?;
    if let Some(at) = t.trailer {
        buf.write_at(at, &record[PAGE_SIZE..]).map_err(local)?;
    }
    Ok(())
}

/// Copies a page (and its trailer if given) from `buf` into a slot's record.
fn write_record(buf: &LocalRegion, t: &PageTransfer, record: &mut [u8]) -> Result<(), TransferError> {
    let local = |e: rdma::TransportError| TransferError::Local(e.to_string());
    let (page, trailer) = record.split_at_mut(PAGE_SIZE);
    buf.read_at(t.offset, page).map_err(local)?;
    if let Some(at) = t.trailer {
        buf.read_at(at, trailer).map_err(local)?;
    }
    Ok(())
}
