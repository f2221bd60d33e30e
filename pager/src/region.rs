//! Regions: the memory a pager serves, and the typed explicit API on top (`Region`, `RemoteVec`,
//! per-region latency bound and failure handler).

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};

use crate::prefetch::TrendDetector;
use crate::table::{self, PageTable};
use crate::{Pager, PagerError, PAGE_SIZE};

/// What a failure handler is told when a page of its region cannot be fetched.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    /// Address of the page.
    pub addr: usize,
    /// Offset of the page in the region.
    pub offset: usize,
    /// The server that held it.
    pub server: SocketAddr,
    /// Why it could not be fetched.
    pub reason: String,
}

/// Called on the fault-handling thread when a page cannot be fetched, before the access raises
/// SIGBUS. It must not touch pager-managed memory.
pub type FailureHandler = Arc<dyn Fn(&FetchFailure) + Send + Sync>;

/// Per-region options of the explicit API.
#[derive(Clone, Default)]
pub struct RegionOptions {
    /// Remote faults slower than this count as violations; while the region's smoothed fetch time
    /// is above it, its pages are evicted only when no page of an unbounded (or within-bound)
    /// region can go: they stay local, best effort, and the local budget still holds.
    pub latency_bound: Option<Duration>,
    /// Called when a page cannot be fetched.
    pub on_failure: Option<FailureHandler>,
    /// Overrides the pager's prefetch setting for this region.
    pub prefetch: Option<bool>,
    /// A service-level objective on this region's remote-fault service time, e.g. `p99=300us`,
    /// beside the pager's ([`crate::PagerConfig::slo`]): the region's faults are counted
    /// against it ([`RegionStats::slo_faults_met`]), and from a second whose faults miss it
    /// until one whose faults meet it, its pages stay local (evicted only when nothing else can
    /// go, as under `latency_bound`) and the local share grows toward the local maximum. With
    /// copies, the region's fault reads are hedged soon enough to meet it, as under the pager's
    /// (the tighter of the two targets counts).
    pub slo: Option<crate::Slo>,
}

impl std::fmt::Debug for RegionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionOptions")
            .field("latency_bound", &self.latency_bound)
            .field("on_failure", &self.on_failure.as_ref().map(|_| "Fn(&FetchFailure)"))
            .field("prefetch", &self.prefetch)
            .field("slo", &self.slo)
            .finish()
    }
}

/// Statistics of one region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Remote faults slower than the latency bound.
    pub latency_bound_violations: u64,
    /// Smoothed remote fetch time.
    pub smoothed_fetch: Duration,
    /// Pages that could not be fetched.
    pub fetch_failures: u64,
    /// Pages evicted while the region was over its latency bound or its objective was at risk,
    /// because nothing else could make room within the local budget.
    pub evicted_over_bound: u64,
    /// Remote faults counted against the region's objective ([`RegionOptions::slo`]).
    pub slo_faults: u64,
    /// Of those, the faults served within its target.
    pub slo_faults_met: u64,
    /// The objective is at risk now: the last second judged missed it.
    pub slo_at_risk: bool,
}

/// Pager-side state of a region.
#[derive(Debug)]
pub(crate) struct RegionState {
    pub(crate) id: u32,
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) table: PageTable,
    pub(crate) trend: Mutex<TrendDetector>,
    pub(crate) options: RegionOptions,
    alive: AtomicBool,
    in_flight: AtomicUsize,
    pub(crate) violations: AtomicU64,
    pub(crate) smoothed_fetch_ns: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) evicted_over_bound: AtomicU64,
    /// The region's own objective, judged by the heartbeat thread (`slo.rs`).
    pub(crate) objective: Option<crate::slo::Controller>,
}

/// A region entered for an operation: it stays mapped until this is dropped.
#[derive(Debug)]
pub(crate) struct ActiveRegion(Arc<RegionState>);

impl Drop for ActiveRegion {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Deref for ActiveRegion {
    type Target = RegionState;
    fn deref(&self) -> &RegionState {
        &self.0
    }
}

impl RegionState {
    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.base + self.len
    }

    pub(crate) fn page_addr(&self, page: usize) -> usize {
        self.base + page * PAGE_SIZE
    }

    /// The identity of the current version of a locked page, for the store.
    pub(crate) fn page_id(&self, page: usize) -> crate::store::PageId {
        // Regions hold fewer than 2^32 pages (checked when they are made).
        let index = u32::try_from(page).unwrap_or(u32::MAX);
        crate::store::PageId { region: self.id, page: index, version: self.table.version(page) }
    }

    /// Enters an operation; `None` once the region is being unmapped.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<ActiveRegion> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.alive.load(Ordering::SeqCst) {
            Some(ActiveRegion(Arc::clone(self)))
        } else {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }

    pub(crate) fn prefetch_enabled(&self, default: bool) -> bool {
        self.options.prefetch.unwrap_or(default)
    }

    /// Records a remote fetch time against the latency bound.
    pub(crate) fn record_fetch(&self, t: Duration) {
        let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        let old = self.smoothed_fetch_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
        self.smoothed_fetch_ns.store(new, Ordering::Relaxed);
        if self.options.latency_bound.is_some_and(|b| t > b) {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = &self.objective {
            c.record(t);
        }
    }

    /// True while remote fetches of this region are slower than its bound, or its objective is
    /// at risk: keep its pages local.
    pub(crate) fn keep_local(&self) -> bool {
        self.objective.as_ref().is_some_and(crate::slo::Controller::at_risk)
            || self
                .options
                .latency_bound
                .is_some_and(|b| Duration::from_nanos(self.smoothed_fetch_ns.load(Ordering::Relaxed)) > b)
    }
}

/// A region of borrowed memory. Its bytes behave as ordinary memory; pages beyond the local budget
/// live on memory servers. Borrows the pager, which must outlive it.
#[derive(Debug)]
pub struct Region<'p> {
    pager: &'p Pager,
    state: Arc<RegionState>,
    map: MmapMut,
}

impl<'p> Region<'p> {
    pub(crate) fn new(pager: &'p Pager, len: usize, options: RegionOptions) -> Result<Self, PagerError> {
        if len == 0 {
            return Err(PagerError::Config("a region needs at least one byte".into()));
        }
        if len / PAGE_SIZE >= u32::MAX as usize {
            return Err(PagerError::Config(format!(
                "a region of {len} bytes is too large: at most 16 TiB (pages are numbered in 32 bits)"
            )));
        }
        if let Some(slo) = &options.slo {
            slo.validate().map_err(PagerError::Config)?;
        }
        let objective = options.slo.map(crate::slo::Controller::new);
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let map_err = |source| PagerError::Map { len, source };
        let map = MmapOptions::new().len(len).no_reserve_swap().map_anon().map_err(map_err)?;
        let base = map.as_ptr() as usize;
        // SAFETY: madvise on the mapping just created; NOHUGEPAGE only changes how the kernel backs
        // it (the pager installs 4 KiB pages and moves them one by one).
        let rc = unsafe { libc::madvise(map.as_ptr().cast_mut().cast(), len, libc::MADV_NOHUGEPAGE) };
        if rc != 0 {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let shared = pager.shared();
        shared.uffd.register(base, len, true).map_err(map_err)?;
        let pages = len / PAGE_SIZE;
        let id = shared.regions.next_id();
        let state = Arc::new(RegionState {
            id,
            base,
            len,
            table: PageTable::with_history(pages, id, shared.history.clone()).map_err(map_err)?,
            trend: Mutex::new(TrendDetector::default()),
            options,
            alive: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            violations: AtomicU64::new(0),
            smoothed_fetch_ns: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            evicted_over_bound: AtomicU64::new(0),
            objective,
        });
        shared.regions.insert(Arc::clone(&state));
        Ok(Self { pager, state, map })
    }

    /// Address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    #[cfg(all(test, not(coalesce_loom)))]
    pub(crate) fn state(&self) -> &RegionState {
        &self.state
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: regions hold at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The region's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// The region's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Discards whole pages in `[offset, offset + len)` (rounded inwards to pages): they read as
    /// zeros from now on and their remote copies are freed. Same as `madvise(MADV_DONTNEED)`.
    pub fn discard(&mut self, offset: usize, len: usize) -> Result<(), PagerError> {
        let start = offset.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = (offset.saturating_add(len) / PAGE_SIZE * PAGE_SIZE).min(self.len());
        if end <= start {
            return Ok(());
        }
        // SAFETY: the range lies inside this region's mapping (checked above) and `&mut self`
        // guarantees no Rust reference into it is alive.
        let rc = unsafe { libc::madvise(self.as_ptr().add(start).cast(), end - start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(PagerError::Map { len: end - start, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Pages out the pages in `[offset, offset + len)` now (written back first if dirty) and waits
    /// until they are gone from local memory (at most 5 s). Returns how many pages of the range are
    /// not resident when it returns.
    pub fn evict(&self, offset: usize, len: usize) -> usize {
        let shared = self.pager.shared();
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len).div_ceil(PAGE_SIZE).min(self.state.table.len());
        let resident = |p: &usize| self.state.table.load(*p).is_resident();
        let force = |pages: &[usize]| shared.queue.force(self.state.id, pages);
        // A page still locked by a fault that installed it (the access returns before the entry
        // says resident) is waited for, so that it is not passed over.
        let mut pages: Vec<usize> = (first..last).filter(|&p| self.state.table.wait_idle(p).is_resident()).collect();
        force(&pages);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut spins = 0;
        while std::time::Instant::now() < deadline {
            pages.retain(resident);
            if pages.is_empty() {
                break;
            }
            if spins % 64 == 63 {
                // A page the evictor found busy (a fault or a scan on it) was passed over: ask again.
                force(&pages);
            }
            table::backoff(&mut spins);
        }
        (first..last).filter(|&p| !self.state.table.load(p).is_resident()).count()
    }

    /// Brings every remote page of the region back into local memory by touching it from the
    /// calling thread (which must not be a pager thread). Use with [`Pager::hold_resident`], or
    /// eviction pushes pages out again. Returns how many pages were fetched.
    pub fn fetch_all(&self) -> usize {
        let mut n = 0;
        for page in 0..self.state.table.len() {
            if self.state.table.load(page).state() == crate::PageState::Remote {
                // SAFETY: a byte inside this live region; the read faults the page in.
                unsafe { std::ptr::read_volatile(self.as_ptr().add(page * PAGE_SIZE)) };
                n += 1;
            }
        }
        n
    }

    /// The recorded transitions of the page at byte `offset` (empty unless the pager keeps a
    /// history: [`crate::PagerConfig::history`]), oldest first, with the page's entry now.
    pub fn page_history(&self, offset: usize) -> (Vec<crate::history::Record>, crate::PageEntry) {
        let page = offset / PAGE_SIZE;
        let now = if page < self.state.table.len() { self.state.table.load(page) } else { crate::PageEntry::ZERO };
        let records = self.pager.shared().history.as_ref().map(|h| h.of_page(self.state.id, page)).unwrap_or_default();
        (records, now)
    }

    /// The lender that holds the remote copy of the page at byte `offset` (its first live copy,
    /// or the lender of its first data shard when erasure-coded), as named in failure reports;
    /// `None` while the page has no remote copy.
    pub fn lender_of(&self, offset: usize) -> Option<std::net::SocketAddr> {
        let page = offset / PAGE_SIZE;
        if page >= self.state.table.len() {
            return None;
        }
        let slot = self.state.table.load(page).slot()?;
        self.pager.shared().store.lender_of(slot)
    }

    /// This region's statistics.
    pub fn stats(&self) -> RegionStats {
        let (slo_faults, slo_faults_met) =
            self.state.objective.as_ref().map_or((0, 0), crate::slo::Controller::figures);
        RegionStats {
            latency_bound_violations: self.state.violations.load(Ordering::Relaxed),
            smoothed_fetch: Duration::from_nanos(self.state.smoothed_fetch_ns.load(Ordering::Relaxed)),
            fetch_failures: self.state.failures.load(Ordering::Relaxed),
            evicted_over_bound: self.state.evicted_over_bound.load(Ordering::Relaxed),
            slo_faults,
            slo_faults_met,
            slo_at_risk: self.state.objective.as_ref().is_some_and(crate::slo::Controller::at_risk),
        }
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        let shared = self.pager.shared();
        let s = &self.state;
        s.alive.store(false, Ordering::SeqCst);
        let mut spins = 0;
        while s.in_flight.load(Ordering::SeqCst) != 0 {
            table::backoff(&mut spins);
        }
        if let Err(e) = shared.uffd.unregister(s.base, s.len) {
            tracing::warn!(error = %e, "unregistering a region failed");
        }
        let mut resident = 0;
        for page in 0..s.table.len() {
            let e = s.table.load(page);
            if e.is_resident() {
                resident += 1;
            }
            if let Some(slot) = e.slot() {
                shared.store.free(slot);
            }
        }
        shared.unreserve(resident);
        shared.regions.remove(s);
    }
}

/// A fixed-length vector of plain-old-data values in borrowed memory, zero-initialised.
///
/// ```
/// use std::time::Duration;
/// use coalesce_pager::{Pager, PagerConfig, RemoteVec, RegionOptions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = lender::start(lender::ServerConfig::loopback())?;
/// let pager = Pager::new(PagerConfig::new(vec![server.addr()], 4 << 20))?;
/// let options = RegionOptions {
///     latency_bound: Some(Duration::from_millis(1)), // slower fetches: keep this region local
///     on_failure: Some(std::sync::Arc::new(|f: &coalesce_pager::FetchFailure| {
///         eprintln!("page at {:#x} lost with {}: {}", f.addr, f.server, f.reason)
///     })),
///     ..RegionOptions::default()
/// };
/// let mut v: RemoteVec<u64> = RemoteVec::new(&pager, 4 << 20, options)?; // 32 MiB of u64
/// for (i, x) in v.iter_mut().enumerate() {
///     *x = i as u64;
/// }
/// assert_eq!(v.iter().sum::<u64>(), (4u64 << 20) * ((4 << 20) - 1) / 2);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RemoteVec<'p, T: bytemuck::Pod> {
    region: Region<'p>,
    len: usize,
    _marker: std::marker::PhantomData<T>,
}

impl<'p, T: bytemuck::Pod> RemoteVec<'p, T> {
    /// `len` zeroed values in a new region of `pager`.
    pub fn new(pager: &'p Pager, len: usize, options: RegionOptions) -> Result<Self, PagerError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| PagerError::Config(format!("{len} elements overflow the address space")))?;
        let region = Region::new(pager, bytes.max(1), options)?;
        Ok(Self { region, len, _marker: std::marker::PhantomData })
    }

    /// The underlying region.
    pub fn region(&self) -> &Region<'p> {
        &self.region
    }
}

impl<T: bytemuck::Pod> Deref for RemoteVec<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let bytes = &self.region.as_slice()[..self.len * std::mem::size_of::<T>()];
        bytemuck::cast_slice(bytes)
    }
}

impl<T: bytemuck::Pod> DerefMut for RemoteVec<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let n = self.len * std::mem::size_of::<T>();
        bytemuck::cast_slice_mut(&mut self.region.as_mut_slice()[..n])
    }
}
