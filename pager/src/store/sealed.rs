//! Sealed pages: a store layer that encrypts and authenticates every page before it leaves this
//! process, and checks it when it comes back. A lender then holds ciphertext it cannot read, and
//! any change it makes is caught before the program sees a byte: a flipped bit, another page's
//! copy, or an older version of this page all fail to open, and the read fails
//! ([`TransferError::Corrupt`]: the page is poisoned, the log names the lender, the lender is no
//! longer trusted).
//!
//! AES-256-GCM (`ring`), with a key drawn from the OS CSPRNG when the store is made; it never
//! leaves the process (pages do not outlive it). The 96-bit nonce is the page's identity
//! ([`PageId`]: region, page, version) and is also the associated data. It never repeats under
//! the key: regions ids are never reused, and every write-back of a page takes a new version
//! (the page table keeps the last one, 4 bytes per page). The 16-byte tag travels and rests in
//! the slot's trailer beside the ciphertext, so nothing else is kept locally. Works unchanged
//! over one-sided verbs: the lender's CPU is not involved.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdma::LocalRegion;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

use super::{LenderInfo, PageId, PageIo, PageStore, PageTransfer, Slot, TransferError, TRAILER_LEN};
use crate::{PagerError, PAGE_SIZE};

/// The sealing layer over another store (which must keep [`TRAILER_LEN`]-byte trailers).
pub struct SealedStore {
    inner: Arc<dyn PageStore>,
    key: LessSafeKey,
    sealed: AtomicU64,
    rejected: AtomicU64,
}

impl std::fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedStore").field("inner", &self.inner).field("key", &"<hidden>").finish_non_exhaustive()
    }
}

impl SealedStore {
    /// Seals every page that goes to `inner` with a fresh random key.
    pub fn new(inner: Arc<dyn PageStore>) -> Result<Self, PagerError> {
        if inner.trailer_len() < TRAILER_LEN {
            return Err(PagerError::Config(format!(
                "sealed pages need a store that keeps {TRAILER_LEN}-byte trailers beside each page"
            )));
        }
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| PagerError::Config("the OS random generator failed; cannot make a sealing key".into()))?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| PagerError::Config("cannot make an AES-256-GCM key".into()))?;
        bytes.fill(0);
        Ok(Self { inner, key: LessSafeKey::new(key), sealed: AtomicU64::new(0), rejected: AtomicU64::new(0) })
    }

    /// Pages sealed so far.
    pub fn pages_sealed(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Pages whose copy came back changed and was refused (counted once per read, however
    /// many of its copies were refused).
    pub fn copies_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// The nonce (and associated data) of one version of one page.
fn nonce_bytes(id: PageId) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0..4].copy_from_slice(&id.region.to_le_bytes());
    n[4..8].copy_from_slice(&id.page.to_le_bytes());
    n[8..12].copy_from_slice(&id.version.to_le_bytes());
    n
}

impl PageStore for SealedStore {
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError> {
        let inner = Arc::clone(&self.inner).open_io()?;
        Ok(Box::new(SealedIo { store: self, inner, wire: None, transfers: Vec::new() }))
    }

    fn free(&self, slot: Slot) {
        self.inner.free(slot);
    }

    fn lender_of(&self, slot: Slot) -> Option<SocketAddr> {
        self.inner.lender_of(slot)
    }

    fn trailer_len(&self) -> usize {
        0
    }

    fn seals_pages(&self) -> bool {
        true
    }

    fn read_room(&self, pages: usize) -> usize {
        pages.saturating_mul(TRAILER_LEN)
    }

    fn copies_rejected(&self) -> Option<u64> {
        Some(self.copies_rejected())
    }

    fn add_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.inner.add_lender(addr)
    }

    fn retire_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.inner.retire_lender(addr)
    }

    fn migrated_pages(&self) -> u64 {
        self.inner.migrated_pages()
    }

    fn hot_pages_moved_nearer(&self) -> u64 {
        self.inner.hot_pages_moved_nearer()
    }

    fn hedged_reads(&self) -> (u64, u64) {
        self.inner.hedged_reads()
    }

    fn checkpoint(&self, timeout: Duration) -> Result<(), PagerError> {
        self.inner.checkpoint(timeout)
    }

    fn backup_stats(&self) -> Option<super::BackupStats> {
        self.inner.backup_stats()
    }

    fn maintain(&self) {
        self.inner.maintain();
    }

    fn maintenance_period(&self) -> Duration {
        self.inner.maintenance_period()
    }

    fn remote_pages(&self) -> u64 {
        self.inner.remote_pages()
    }

    fn bookkeeping_bytes(&self) -> usize {
        self.inner.bookkeeping_bytes()
    }

    fn lenders(&self) -> Vec<LenderInfo> {
        self.inner.lenders()
    }

    fn release_all(&self) {
        self.inner.release_all();
    }

    /// Records are copied as they are (ciphertext and tag): a sealed page opens wherever it is.
    fn open_repair(self: Arc<Self>) -> Result<Option<Box<dyn super::PageRepair>>, PagerError> {
        Arc::clone(&self.inner).open_repair()
    }

    fn repair_pending(&self) -> u64 {
        self.inner.repair_pending()
    }
}

/// One thread's sealed I/O. Pages are sealed into this thread's own wire buffer, never in the
/// caller's buffer (whose plaintext must survive a failed write-back). They are opened where
/// they land: in the caller's buffer when it left room for the tags at its end
/// ([`PageStore::read_room`]), else in the wire buffer, then copied out.
#[derive(Debug)]
struct SealedIo {
    store: Arc<SealedStore>,
    inner: Box<dyn PageIo>,
    /// Ciphertexts of a batch at `i * PAGE_SIZE`, then their tags.
    wire: Option<Arc<LocalRegion>>,
    transfers: Vec<PageTransfer>,
}

/// Where the tags of `pages` go when they are read into `buf` itself: its last
/// `pages.len() * TRAILER_LEN` bytes, if no page lies in them.
fn tags_in(buf: &LocalRegion, pages: &[PageTransfer]) -> Option<usize> {
    let tags = buf.len().checked_sub(pages.len().checked_mul(TRAILER_LEN)?)?;
    pages.iter().all(|p| p.offset.checked_add(PAGE_SIZE).is_some_and(|end| end <= tags)).then_some(tags)
}

fn local(e: rdma::TransportError) -> TransferError {
    TransferError::Local(e.to_string())
}

impl SealedIo {
    /// The wire buffer, big enough for `n` pages and their trailers, and the transfers of
    /// `pages` into it.
    fn prepare(&mut self, pages: &[PageTransfer]) -> Result<Arc<LocalRegion>, TransferError> {
        let n = pages.len();
        let need = n * (PAGE_SIZE + TRAILER_LEN);
        let wire = match &self.wire {
            Some(w) if w.len() >= need => Arc::clone(w),
            _ => {
                let size = need.next_multiple_of(PAGE_SIZE).max(PAGE_SIZE);
                let w = LocalRegion::new(size).map_err(local)?;
                self.wire = Some(Arc::clone(&w));
                w
            }
        };
        let tags = n * PAGE_SIZE;
        self.transfers.clear();
        self.transfers.extend(pages.iter().enumerate().map(|(i, p)| PageTransfer {
            slot: p.slot,
            offset: i * PAGE_SIZE,
            trailer: Some(tags + i * TRAILER_LEN),
            id: p.id,
        }));
        Ok(wire)
    }

    /// Seals page `i` of the batch from `buf` into the wire buffer: copied there, then sealed in
    /// place.
    fn seal(&self, buf: &LocalRegion, wire: &LocalRegion, i: usize, p: &PageTransfer) -> Result<(), TransferError> {
        let t = &self.transfers[i];
        let n = nonce_bytes(p.id);
        // SAFETY: the wire buffer belongs to this `SealedIo`, which one thread uses; no work
        // request on it is outstanding (every batch ends complete, or with its connections
        // dropped so that nothing is sent from it late); `buf` is another region.
        let sealed = unsafe {
            wire.modify_at(t.offset, PAGE_SIZE, |page| {
                buf.read_at(p.offset, page).map_err(local)?;
                self.store
                    .key
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(n), page)
                    .map_err(|_| TransferError::Local("sealing a page failed".into()))
            })
        };
        let tag = sealed.map_err(local)??;
        wire.write_at(t.trailer.unwrap_or(0), tag.as_ref()).map_err(local)
    }

    /// Opens page `i` of the batch in `at` (the caller's buffer, or the wire buffer), where it
    /// landed; its tag is at the transfer's trailer. A page that fails to open is zeroed.
    ///
    /// # Safety
    ///
    /// The page's range of `at` is this call's alone: its read completed (or its connection
    /// was dropped, so that nothing lands there late), and nothing else reads or writes it.
    unsafe fn open_where_landed(&self, at: &LocalRegion, i: usize, p: &PageTransfer) -> Result<(), TransferError> {
        let t = self.transfers[i];
        let mut tag = [0u8; TRAILER_LEN];
        at.read_at(t.trailer.unwrap_or(0), &mut tag).map_err(local)?;
        let n = nonce_bytes(p.id);
        // SAFETY: the caller vouches that the range is this call's alone (see above).
        let opened = unsafe {
            at.modify_at(t.offset, PAGE_SIZE, |page| {
                let opened = self
                    .store
                    .key
                    .open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(n),
                        Tag::from(tag),
                        page,
                        0..,
                    )
                    .is_ok();
                if !opened {
                    page.fill(0);
                }
                opened
            })
        };
        if opened.map_err(local)? {
            Ok(())
        } else {
            Err(TransferError::Corrupt)
        }
    }
}

/// Every page of a batch failed for the same local reason.
fn fail_all(out: &mut Vec<Result<(), TransferError>>, n: usize, e: TransferError) {
    out.clear();
    out.resize(n, Err(e));
}

impl SealedIo {
    /// Reads a batch and opens every copy; a copy that fails to open is counted and its holder
    /// distrusted. Pages land in `buf` when it has room for the tags at its end, else in the
    /// wire buffer (and are copied to `buf` once opened).
    fn read_and_open(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        let in_place = tags_in(buf, pages);
        let landing = match in_place {
            Some(tags) => {
                self.transfers.clear();
                self.transfers.extend(
                    pages.iter().enumerate().map(|(i, p)| PageTransfer { trailer: Some(tags + i * TRAILER_LEN), ..*p }),
                );
                Arc::clone(buf)
            }
            None => match self.prepare(pages) {
                Ok(w) => w,
                Err(e) => return fail_all(out, pages.len(), e),
            },
        };
        let transfers = std::mem::take(&mut self.transfers);
        self.inner.read_pages(&landing, &transfers, out);
        self.transfers = transfers;
        for (i, p) in pages.iter().enumerate() {
            if out[i].is_err() {
                continue;
            }
            // SAFETY: the page's read completed (its outcome is a success); its range of
            // `landing` is this batch's alone: the caller lent `buf`'s pages and tag room for
            // the call (`PageIo::read_pages`), and the wire buffer is this thread's own.
            out[i] = unsafe { self.open_where_landed(&landing, i, p) };
            if out[i].is_ok() && in_place.is_none() {
                let mut page = [0u8; PAGE_SIZE];
                out[i] = landing
                    .read_at(self.transfers[i].offset, &mut page)
                    .and_then(|()| buf.write_at(p.offset, &page))
                    .map_err(local);
            }
            if out[i] == Err(TransferError::Corrupt) {
                let why = format!(
                    "the copy of page {} (region {}, version {}) failed authentication",
                    p.id.page, p.id.region, p.id.version
                );
                self.inner.distrust(p.slot, &why);
            }
        }
    }
}

impl PageIo for SealedIo {
    fn read_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>) {
        self.read_and_open(buf, pages, out);
        let mut refused: Vec<bool> = out.iter().map(|o| *o == Err(TransferError::Corrupt)).collect();
        // A copy that failed to open made its holder distrusted: read those pages again from
        // another copy, while there is one.
        for _ in 1..super::lenders::MAX_COPIES {
            let retry: Vec<usize> = (0..pages.len())
                .filter(|&i| out[i] == Err(TransferError::Corrupt) && self.inner.readable(pages[i].slot))
                .collect();
            if retry.is_empty() {
                break;
            }
            let again: Vec<PageTransfer> = retry.iter().map(|&i| pages[i]).collect();
            let mut outcomes = Vec::with_capacity(again.len());
            self.read_and_open(buf, &again, &mut outcomes);
            for (&i, outcome) in retry.iter().zip(outcomes) {
                refused[i] |= outcome == Err(TransferError::Corrupt);
                out[i] = outcome;
            }
        }
        let refused = refused.iter().filter(|&&r| r).count() as u64;
        if refused > 0 {
            self.store.rejected.fetch_add(refused, Ordering::Relaxed);
        }
    }

    fn write_pages(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        let wire = match self.prepare(pages) {
            Ok(w) => w,
            Err(e) => return fail_all(out, pages.len(), e),
        };
        for (i, p) in pages.iter().enumerate() {
            if let Err(e) = self.seal(buf, &wire, i, p) {
                return fail_all(out, pages.len(), e);
            }
        }
        self.store.sealed.fetch_add(pages.len() as u64, Ordering::Relaxed);
        let transfers = std::mem::take(&mut self.transfers);
        self.inner.write_pages(&wire, &transfers, out);
        self.transfers = transfers;
    }

    fn set_read_within(&mut self, within: Option<std::time::Duration>) {
        self.inner.set_read_within(within);
    }

    fn readable(&self, slot: Slot) -> bool {
        self.inner.readable(slot)
    }

    fn intact(&self, slot: Slot) -> bool {
        self.inner.intact(slot)
    }

    fn held_elsewhere(&self, id: super::PageId) -> bool {
        self.inner.held_elsewhere(id)
    }

    fn distrust(&mut self, slot: Slot, why: &str) {
        self.inner.distrust(slot, why);
    }

    fn place(&mut self, current: Option<Slot>) -> Option<Slot> {
        self.inner.place(current)
    }

    fn wants_nearer(&self, slot: Slot) -> bool {
        self.inner.wants_nearer(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn id(page: u32) -> PageId {
        PageId { region: 7, page, version: 1 }
    }

    /// Page `k` of a test: every byte `k + 1`.
    fn plain(k: usize) -> Vec<u8> {
        vec![u8::try_from(k + 1).expect("few pages"); PAGE_SIZE]
    }

    /// Seals four pages to an in-memory store; returns the store, the I/O and the transfers.
    fn sealed_four() -> (Arc<MemoryStore>, Box<dyn PageIo>, Vec<PageTransfer>) {
        let store = Arc::new(MemoryStore::new(64));
        let sealed = Arc::new(SealedStore::new(Arc::clone(&store) as Arc<dyn PageStore>).expect("sealing layer"));
        let mut io = Arc::clone(&sealed).open_io().expect("io");
        let src = LocalRegion::new(4 * PAGE_SIZE).expect("map");
        let mut pages = Vec::new();
        for k in 0..4 {
            src.write_at(k * PAGE_SIZE, &plain(k)).expect("in bounds");
            let slot = io.place(None).expect("room");
            pages.push(PageTransfer::page(slot, k * PAGE_SIZE, id(u32::try_from(k).expect("few"))));
        }
        let mut out = Vec::new();
        io.write_pages(&src, &pages, &mut out);
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let mut kept = vec![0u8; PAGE_SIZE];
        src.read_at(0, &mut kept).expect("in bounds");
        assert_eq!(kept, plain(0), "the caller's plaintext survives the write");
        assert_ne!(store.page(pages[0].slot).expect("a copy"), plain(0), "the store holds ciphertext");
        (store, io, pages)
    }

    /// Reads the pages back into `buf`; returns the outcomes and the bytes of each page.
    fn read_back(
        io: &mut Box<dyn PageIo>,
        pages: &[PageTransfer],
        buf: &Arc<LocalRegion>,
    ) -> (Vec<Result<(), TransferError>>, Vec<Vec<u8>>) {
        let mut out = Vec::new();
        io.read_pages(buf, pages, &mut out);
        let bytes = pages
            .iter()
            .map(|p| {
                let mut b = vec![0u8; PAGE_SIZE];
                buf.read_at(p.offset, &mut b).expect("in bounds");
                b
            })
            .collect();
        (out, bytes)
    }

    #[test]
    fn pages_open_where_they_land_with_room_for_the_tags_and_through_a_copy_without() {
        let (store, mut io, pages) = sealed_four();
        let room = LocalRegion::new(4 * PAGE_SIZE + 4 * TRAILER_LEN).expect("map");
        let tight = LocalRegion::new(4 * PAGE_SIZE).expect("map");
        for buf in [&room, &tight] {
            assert_eq!(tags_in(buf, &pages).is_some(), Arc::ptr_eq(buf, &room));
            let (out, bytes) = read_back(&mut io, &pages, buf);
            assert!(out.iter().all(Result::is_ok), "{out:?}");
            for (k, b) in bytes.iter().enumerate() {
                assert!(*b == plain(k), "page {k} did not come back as written");
            }
        }
        // A changed copy fails to open on both paths, and leaves zeros, not ciphertext.
        let mut record = store.record(pages[2].slot).expect("record");
        record[9] ^= 1;
        assert!(store.set_record(pages[2].slot, &record));
        for buf in [&room, &tight] {
            let (out, bytes) = read_back(&mut io, &pages[2..3], buf);
            assert_eq!(out, vec![Err(TransferError::Corrupt)]);
            assert!(bytes[0].iter().all(|&b| b == 0), "a page that failed to open is zeroed");
        }
    }

    #[test]
    fn the_tags_go_only_where_no_page_lies() {
        let buf = LocalRegion::new(2 * PAGE_SIZE + 32).expect("map");
        let at = |offset| PageTransfer::page(Slot::from_raw(0), offset, id(0));
        assert_eq!(tags_in(&buf, &[at(0), at(PAGE_SIZE)]), Some(2 * PAGE_SIZE));
        assert_eq!(tags_in(&buf, &[at(PAGE_SIZE)]), Some(2 * PAGE_SIZE + 16));
        // Three tags would reach into the second page.
        assert_eq!(tags_in(&buf, &[at(0), at(PAGE_SIZE), at(0)]), None);
        assert_eq!(tags_in(&buf, &[at(usize::MAX - 5)]), None);
    }
}
