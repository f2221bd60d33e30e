//! Unit tests of the fault and eviction logic against the in-memory store ([`MemoryStore`]): real
//! userfaultfd faults and `UFFDIO_MOVE` evictions, no lender and no network, with failures of
//! the store injected on demand, and sealed pages ([`SealedStore`]) against a store that lies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::store::{MemoryStore, MemoryStoreFaults, PageStore, SealedStore, Slot};
use crate::{Pager, PagerConfig, Region, RegionOptions, PAGE_SIZE};

const WORDS: usize = PAGE_SIZE / 8;

fn pager(budget_pages: usize, store: &Arc<MemoryStore>) -> Pager {
    let config = PagerConfig::new(Vec::new(), budget_pages * PAGE_SIZE);
    let store: Arc<dyn PageStore> = Arc::clone(store) as Arc<dyn PageStore>;
    Pager::with_store(config, store).expect("a pager on the in-memory store (needs userfaultfd: run as root)")
}

/// The value of word `w` of page `p` in generation `seed` (never zero).
fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) | ((p as u64) << 16) | (w as u64 + 1)
}

fn fill(region: &mut Region<'_>, pages: std::ops::Range<usize>, seed: u64) {
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for p in pages {
        for w in 0..WORDS {
            words[p * WORDS + w] = word(seed, p, w);
        }
    }
}

/// The first page in `pages` whose content is not generation `seed`.
fn first_wrong(region: &Region<'_>, pages: std::ops::Range<usize>, seed: u64) -> Option<usize> {
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    pages.into_iter().find(|&p| (0..WORDS).any(|w| words[p * WORDS + w] != word(seed, p, w)))
}

/// Whether the table calls `page` resident, once nobody holds its lock: a fault handler's install
/// wakes the faulting thread before the handler publishes the page's new entry, so the program can
/// run on and see the page still locked and not yet resident.
fn is_resident(region: &Region<'_>, page: usize) -> bool {
    let start = std::time::Instant::now();
    loop {
        let entry = region.state().table.load(page);
        if !entry.is_busy() || start.elapsed() > std::time::Duration::from_secs(10) {
            return entry.is_resident();
        }
        std::thread::yield_now();
    }
}

/// Reads the page at `addr` from the kernel (a `write` of it into a pipe), so that a poisoned
/// page gives `EFAULT` instead of killing the test with SIGBUS.
fn kernel_read(addr: *const u8) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `addr` points at a whole page of a live region; the kernel reads it (faulting it in
    // through userfaultfd) and reports a poisoned page as EFAULT.
    let rc = unsafe { libc::write(fds[1], addr.cast(), PAGE_SIZE) };
    let result = if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    for fd in fds {
        // SAFETY: closes the descriptors pipe(2) just made.
        unsafe { libc::close(fd) };
    }
    result
}

/// Writes one page of `byte` at `addr` from the kernel (a `read` from a pipe into it), so that a
/// page that cannot be made resident gives `EFAULT` instead of killing the test with SIGBUS.
fn kernel_write(addr: *mut u8, byte: u8) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let page = [byte; PAGE_SIZE];
    // SAFETY: writes a whole local page into the pipe (its buffer holds 16 pages), then reads it
    // into the page at `addr` of a live region; a page the pager fails is reported as EFAULT.
    let rc = unsafe {
        libc::write(fds[1], page.as_ptr().cast(), PAGE_SIZE);
        libc::read(fds[0], addr.cast(), PAGE_SIZE)
    };
    let result = if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    for fd in fds {
        // SAFETY: closes the descriptors pipe(2) just made.
        unsafe { libc::close(fd) };
    }
    result
}

#[test]
fn first_touch_is_a_zero_page_and_needs_no_store() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(64, &store);
    let region = pager.map(32 * PAGE_SIZE, RegionOptions::default()).expect("map");
    assert!(region.as_slice().iter().all(|&b| b == 0));
    let stats = pager.stats();
    // (The fault counters are updated after the install has woken the reader: not asserted.)
    assert_eq!(stats.resident_pages, 32, "{stats}");
    assert_eq!((stats.remote_faults, store.pages_read(), store.pages_written()), (0, 0, 0));
}

#[test]
fn dirty_pages_are_written_back_and_fetched_again_within_the_budget() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(64, &store);
    let mut region = pager.map(512 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..512, 1);
    assert_eq!(first_wrong(&region, 0..512, 1), None);
    let stats = pager.stats();
    assert!(stats.evictions_dirty >= 512 - 64, "{stats}");
    // Counters trail the store by the batch in flight when the snapshot is taken.
    assert!(store.pages_written() >= stats.evictions_dirty, "a dirty page was dropped without a write\n{stats}");
    assert!(stats.remote_faults > 0 && store.pages_read() >= stats.remote_faults, "{stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
}

#[test]
fn clean_pages_are_dropped_without_writing_them_again() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(64, &store);
    let mut region = pager.map(512 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..512, 1);
    assert_eq!(first_wrong(&region, 0..512, 1), None);
    let written = store.pages_written();
    let clean = pager.stats().evictions_clean;
    for _ in 0..2 {
        assert_eq!(first_wrong(&region, 0..512, 1), None);
    }
    let stats = pager.stats();
    assert!(stats.evictions_clean > clean, "{stats}");
    assert_eq!(store.pages_written(), written, "reading never writes back");
}

#[test]
fn a_sequential_stream_is_fetched_in_prefetch_windows() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(256, &store);
    let mut region = pager.map(4096 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..4096, 3);
    let before = pager.stats();
    assert_eq!(first_wrong(&region, 0..4096, 3), None);
    let stats = pager.stats();
    let faults = stats.remote_faults - before.remote_faults;
    let prefetched = stats.prefetched_pages - before.prefetched_pages;
    assert!(prefetched > 0 && stats.prefetch_hits > before.prefetch_hits, "{stats}");
    assert!(faults * 4 < 4096, "{faults} faults for 4096 sequential pages: prefetch is not working\n{stats}");
}

#[test]
fn a_failed_write_back_puts_the_page_back_and_loses_nothing() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let mut config = PagerConfig::new(Vec::new(), 64 * PAGE_SIZE);
    config.history = 1 << 16;
    let pager = Pager::with_store(config, Arc::clone(&store) as Arc<dyn PageStore>).expect("pager");
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..256, 1);
    store.set_faults(MemoryStoreFaults { writes_fail: true, ..MemoryStoreFaults::default() });
    fill(&mut region, 0..8, 2);
    if let Some(p) = (0..8).find(|&p| !is_resident(&region, p)) {
        let (history, now) = region.page_history(p * PAGE_SIZE);
        let history: Vec<String> = history.iter().map(ToString::to_string).collect();
        panic!("page {p} is not resident: {now}\n{}\n{}", history.join("\n"), pager.stats());
    }
    let gone = region.evict(0, 8 * PAGE_SIZE);
    assert_eq!(gone, 0, "no dirty page may leave while the store refuses writes");
    assert!(pager.stats().writeback_failures >= 8, "{}", pager.stats());
    assert_eq!(first_wrong(&region, 0..8, 2), None);
    store.set_faults(MemoryStoreFaults::default());
    assert_eq!(first_wrong(&region, 8..256, 1), None);
    assert_eq!(first_wrong(&region, 0..8, 2), None);
    let gone = region.evict(0, 8 * PAGE_SIZE);
    let entries: Vec<String> = (0..8).map(|p| region.state().table.load(p).to_string()).collect();
    assert_eq!(gone, 8, "writes work again; entries {entries:?}\n{}", pager.stats());
    assert_eq!(first_wrong(&region, 0..8, 2), None);
}

#[test]
fn with_no_room_anywhere_dirty_pages_stay_local_over_the_budget() {
    let store = Arc::new(MemoryStore::new(0));
    let mut config = PagerConfig::new(Vec::new(), 64 * PAGE_SIZE);
    config.local_max = crate::LocalMax::Unlimited;
    let pager = Pager::with_store(config, Arc::clone(&store) as Arc<dyn PageStore>).expect("pager");
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..256, 1);
    assert_eq!(first_wrong(&region, 0..256, 1), None);
    let stats = pager.stats();
    assert!(stats.overshoot_events > 0 && stats.peak_resident_pages > stats.budget_pages, "{stats}");
    assert_eq!((stats.remote_pages, store.pages_written()), (0, 0));
}

#[test]
fn with_no_room_anywhere_the_local_maximum_holds_and_the_access_past_it_fails() {
    let store = Arc::new(MemoryStore::new(0));
    let mut config = PagerConfig::new(Vec::new(), 64 * PAGE_SIZE);
    config.local_max = crate::LocalMax::Bytes(96 * PAGE_SIZE);
    config.fetch_timeout = std::time::Duration::from_millis(200);
    let pager = Pager::with_store(config, Arc::clone(&store) as Arc<dyn PageStore>).expect("pager");
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    assert!(pager.may_allocate(200 * PAGE_SIZE), "nothing presses on the budget yet");
    fill(&mut region, 0..80, 1);
    let base = region.as_ptr();
    let failed = (80..256).find(|&p| kernel_write(base.wrapping_add(p * PAGE_SIZE), 7).is_err());
    let stats = pager.stats();
    let failed = failed.unwrap_or_else(|| panic!("every page was made resident past the maximum\n{stats}"));
    assert!((90..=96).contains(&failed), "failed at page {failed}\n{stats}");
    assert_eq!(stats.local_max_pages, 96);
    assert!(stats.peak_resident_pages <= 96 && stats.local_max_refusals >= 1, "{stats}");
    assert!(!pager.may_allocate(16 * PAGE_SIZE), "an allocation past the maximum is refused");
    assert_eq!(first_wrong(&region, 0..80, 1), None, "the pages kept local are intact");
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    assert!((80..failed).all(|p| words[p * WORDS] == 0x0707_0707_0707_0707));
}

#[test]
fn a_failed_fetch_poisons_the_page_and_reports_it() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(64, &store);
    let reported = Arc::new(AtomicUsize::new(usize::MAX));
    let seen = Arc::clone(&reported);
    let options = RegionOptions {
        on_failure: Some(Arc::new(move |f: &crate::FetchFailure| seen.store(f.offset, Ordering::SeqCst))),
        ..RegionOptions::default()
    };
    let mut region = pager.map(256 * PAGE_SIZE, options).expect("map");
    fill(&mut region, 0..256, 1);
    let page = (0..256).find(|&p| !is_resident(&region, p)).expect("a page was evicted");
    store.set_faults(MemoryStoreFaults { reads_fail: true, ..MemoryStoreFaults::default() });
    let addr = region.as_ptr().wrapping_add(page * PAGE_SIZE).cast_const();
    let err = kernel_read(addr).expect_err("a page that cannot be fetched must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    assert_eq!(reported.load(Ordering::SeqCst), page * PAGE_SIZE);
    assert_eq!((region.stats().fetch_failures, pager.stats().fetch_failures), (1, 1));
    store.set_faults(MemoryStoreFaults::default());
    assert!(kernel_read(addr).is_err(), "a poisoned page stays poisoned");
}

#[test]
fn a_discard_frees_remote_copies_and_reads_zeros() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = pager(64, &store);
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..256, 1);
    let remote = store.remote_pages();
    assert!(remote > 0);
    region.discard(0, 128 * PAGE_SIZE).expect("discard");
    assert!(region.as_slice()[..128 * PAGE_SIZE].iter().all(|&b| b == 0));
    assert_eq!(first_wrong(&region, 128..256, 1), None);
    let stats = pager.stats();
    assert!(stats.remote_freed > 0 && store.remote_pages() < remote, "{stats}");
    assert_eq!(stats.state_violations, 0, "{stats}");
}

#[test]
fn absurd_configuration_is_refused_with_a_clear_error() {
    let store: Arc<dyn PageStore> = Arc::new(MemoryStore::new(16));
    let mut config = PagerConfig::new(Vec::new(), 64 * PAGE_SIZE);
    config.fetch_timeout = std::time::Duration::from_secs(10_000_000_000_000_000_000);
    let err = Pager::with_store(config, store).expect_err("a timeout of 3e11 years").to_string();
    assert!(err.contains("fetch timeout") && err.contains("at most 1 hour"), "{err}");
}

fn sealed_pager(budget_pages: usize, store: &Arc<MemoryStore>) -> Pager {
    let mut config = PagerConfig::new(Vec::new(), budget_pages * PAGE_SIZE);
    // One fault fetches one page: each lie below is met by exactly one read.
    config.prefetch = false;
    let inner: Arc<dyn PageStore> = Arc::clone(store) as Arc<dyn PageStore>;
    let sealed: Arc<dyn PageStore> = Arc::new(SealedStore::new(inner).expect("a sealing layer"));
    Pager::with_store(config, sealed).expect("a pager on the sealed in-memory store (needs userfaultfd: run as root)")
}

/// Pages of `pages` that are remote now, with their slots.
fn remote_pages(region: &Region<'_>, pages: std::ops::Range<usize>) -> Vec<(usize, Slot)> {
    pages
        .filter(|&p| !is_resident(region, p))
        .filter_map(|p| region.state().table.load(p).slot().map(|s| (p, s)))
        .collect()
}

#[test]
fn sealed_pages_round_trip_and_the_lender_holds_only_ciphertext() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = sealed_pager(64, &store);
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..256, 1);
    let remote = remote_pages(&region, 0..256);
    assert!(remote.len() > 128, "most pages went to the store");
    for &(page, slot) in &remote {
        let held = store.page(slot).expect("a copy");
        let plain: Vec<u8> = (0..WORDS).flat_map(|w| word(1, page, w).to_ne_bytes()).collect();
        assert_ne!(held, plain, "page {page} rests in plaintext");
        assert_ne!(held[..8], plain[..8], "page {page}: its first word is readable by the lender");
    }
    assert_eq!(first_wrong(&region, 0..256, 1), None);
    let stats = pager.stats();
    assert!(stats.sealed && stats.copies_rejected == 0 && stats.remote_faults > 0, "{stats}");
}

#[test]
fn a_lender_that_changes_swaps_or_replays_a_page_is_caught_before_the_program_reads_it() {
    let store = Arc::new(MemoryStore::new(1 << 16));
    let pager = sealed_pager(64, &store);
    let mut region = pager.map(256 * PAGE_SIZE, RegionOptions::default()).expect("map");
    fill(&mut region, 0..256, 1);
    let remote = remote_pages(&region, 0..128);
    let [(flipped, flipped_slot), (swapped, swapped_slot), (replayed, _), (donor, donor_slot), ..] = remote[..] else {
        panic!("too few remote pages: {remote:?}");
    };
    // An old version of `replayed`, kept by the lender; then the page is written and evicted again.
    let old_slot = region.state().table.load(replayed).slot().expect("slot");
    let old = store.record(old_slot).expect("record");
    fill(&mut region, replayed..replayed + 1, 2);
    assert_eq!(region.evict(replayed * PAGE_SIZE, PAGE_SIZE), 1);
    let replayed_slot = region.state().table.load(replayed).slot().expect("slot");

    // The lies: one flipped bit, another page's copy, the old version.
    let mut record = store.record(flipped_slot).expect("record");
    record[100] ^= 0x10;
    assert!(store.set_record(flipped_slot, &record));
    assert!(store.set_record(swapped_slot, &store.record(donor_slot).expect("record")));
    assert!(store.set_record(replayed_slot, &old));

    for page in [flipped, swapped, replayed] {
        let addr = region.as_ptr().wrapping_add(page * PAGE_SIZE).cast_const();
        let err = kernel_read(addr).expect_err("a changed copy must never reach the program");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "page {page}: {err}");
    }
    let stats = pager.stats();
    assert_eq!((stats.copies_rejected, stats.fetch_failures), (3, 3), "{stats}");
    assert_eq!(store.times_distrusted(), 3);
    // An untouched copy still opens.
    assert_eq!(first_wrong(&region, donor..donor + 1, 1), None);
}
