//! # Coalesce pager: borrow memory end to end
//!
//! A [`Pager`] maps regions larger than the local memory budget. Pages it cannot keep locally live
//! on memory servers; touching one raises a userfaultfd fault that a handler thread serves by
//! fetching the page with a one-sided READ (plus a prefetch window along any detected trend, in the
//! same request) and installing it atomically with `UFFDIO_COPY`. While a stream goes on, the
//! window after that one is fetched ahead by a thread of its own as the program reads
//! ([`PagerConfig::prefetch_ahead`]); while other regions take demand faults, that thread
//! fetches the stream's window too, and the handler only the faulting page, so that a demand
//! fault never waits behind a stream's window on the handler.
//!
//! - **First touch** of a never-written page installs a zero page, no network.
//! - **Dirty tracking**: pages are installed write-protected; the first write faults, marks the
//!   page dirty and unprotects it. Clean pages are dropped without network; dirty ones are written
//!   back (batched, one request per server) before they are dropped.
//! - **Eviction** keeps resident pages within the budget (see [`PagerConfig::local_budget`]):
//!   evictor threads (one by default) run CLOCK (second chance) over the ring of resident pages
//!   in install order.
//!   The reference bit is set when a page is faulted in and on its first write: the only accesses
//!   user space sees without scanning page tables. A victim is taken out of the region with
//!   `UFFDIO_MOVE` into a staging buffer (atomic: a racing access faults and waits; no
//!   `madvise` event is generated), written back if dirty, and only then marked remote. A failed
//!   write-back puts the page back: nothing is lost.
//! - **Failure**: a page that cannot be fetched (server gone, timeout) is poisoned with
//!   `UFFDIO_POISON`: the access raises SIGBUS and the log names the server and address. It never
//!   reads back as zeros.
//! - `madvise(MADV_DONTNEED)` inside a region makes pages zero-on-next-touch and frees their remote
//!   copies (userfaultfd remove events). `MADV_FREE` is not supported inside a region: the kernel
//!   may drop such a page later without an event, and a page that vanishes without one is
//!   treated as lost (SIGBUS on access, a logged page-state violation).
//! - **Remove events and installs never cross**: a remove event marks its pages when it is read
//!   (the kernel zaps them right after); no page is installed while such a mark is unapplied (the
//!   fault applies the discard first and serves zeros), and the event's later handling leaves
//!   alone pages a fault already brought up to date. Reading and marking happen under the install
//!   gate (exclusive) and every `UFFDIO_COPY` checks the marks under it (shared), so an install
//!   either precedes the read (and the zap then removes it) or sees the mark: none lands after a
//!   zap it did not know about.
//! - **Never zeros for written data**: the page table remembers that a page holds written data
//!   (`WRITTEN`, see [`PageState::Lost`]); a path that would fill such a page with zeros, or find it gone without a
//!   discard, poisons it instead and counts a page-state violation (see `coalesce stress`).
//!
//! Budget and slack: an install first reserves room (`resident + n <= budget`), so the pages the
//! pager has mapped never exceed the budget. The only exception is when no server can take a dirty
//! page (all full or down): the pager then keeps it local (best effort, as the coalescent model
//! asks) and counts an over-budget event, up to the local maximum ([`LocalMax`]) and no further:
//! there [`Pager::may_allocate`] says no and an access that needs another local page waits up to
//! the fetch timeout, then gets SIGBUS. Fixed overhead beside the budget: the staging buffers
//! (`(1 + prefetch_window_max)` pages per handler thread and for the prefetch-ahead thread, 512
//! pages per evictor thread, emptied after every batch) and the metadata (12 bytes per page of
//! every region: its 8-byte entry and a 4-byte write-out version).
//!
//! ```
//! use coalesce_pager::{Pager, PagerConfig, RegionOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A lender on 127.0.0.1 (normally a `memory-server` on a neighbouring host).
//! let server = lender::start(lender::ServerConfig::loopback())?;
//! // 64 MiB of region on 4 MiB of local memory.
//! let pager = Pager::new(PagerConfig::new(vec![server.addr()], 4 << 20))?;
//! let mut region = pager.map(64 << 20, RegionOptions::default())?;
//! for (page, chunk) in region.as_mut_slice().chunks_mut(4096).enumerate() {
//!     chunk[0] = page as u8; // first touch: a zero page; older pages get evicted
//! }
//! for (page, chunk) in region.as_slice().chunks(4096).enumerate() {
//!     assert_eq!(chunk[0], page as u8); // evicted pages come back from the server
//! }
//! let stats = pager.stats();
//! assert!(stats.evictions_dirty > 0 && stats.remote_faults > 0);
//! assert!(stats.peak_resident_pages <= stats.budget_pages);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rdma::EndpointOptions;

mod budget;
mod config;
pub mod discover;
mod entry;
mod evict;
mod fault;
pub mod history;
#[cfg(all(test, coalesce_loom))]
mod loom_models;
#[cfg(all(test, not(coalesce_loom)))]
mod model;
#[cfg(all(test, not(coalesce_loom)))]
mod paging_tests;
mod prefetch;
mod queue;
mod region;
mod registry;
pub mod slo;
mod stats;
pub mod store;
mod sync;
mod table;
mod uffd;

pub use config::{LocalMax, PagerConfig, MAX_FETCH_TIMEOUT, MAX_PREFETCH_WINDOW};
pub use entry::{Entry as PageEntry, PageState};
pub use region::{FailureHandler, FetchFailure, Region, RegionOptions, RemoteVec};
pub use slo::Slo;
pub use stats::{ExitReport, PagerStats, PreloadStats};
pub use uffd::OpenError as UserfaultfdError;

/// The page size the pager works in.
pub const PAGE_SIZE: usize = 4096;

/// Pager errors; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// userfaultfd is not usable.
    #[error(transparent)]
    Userfaultfd(#[from] UserfaultfdError),
    /// A memory server could not be reached or refused the session.
    #[error("memory-server {addr}: {source}")]
    Server {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: rdma::client::ClientError,
    },
    /// A data endpoint could not be opened.
    #[error("data connection to memory-server {addr}: {source}")]
    Transport {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: rdma::TransportError,
    },
    /// A region could not be mapped or registered.
    #[error("cannot map a {len}-byte region: {source}")]
    Map {
        /// Requested length.
        len: usize,
        /// Cause.
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("invalid pager configuration: {0}")]
    Config(String),
    /// A thread could not be started.
    #[error("cannot start a pager thread: {0}")]
    Thread(std::io::Error),
    /// A staging buffer could not be mapped.
    #[error("cannot map a staging buffer: {0}; is the process out of memory or address space?")]
    Buffer(rdma::TransportError),
    /// Looking for lenders ([`PagerConfig::discovery`]) could not start.
    #[error(transparent)]
    Discovery(#[from] discover::DiscoveryError),
    /// No lender is named and none was found.
    #[error("no lender: {0}")]
    NoLenders(String),
}

/// What [`Shared::try_reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// Room reserved.
    Made,
    /// No room yet: call again.
    Wait,
    /// The local maximum has no room and none was made within the fetch timeout.
    Refused,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the pager's threads: the owners below, each with its own invariants, plus
/// the userfaultfd, the store and the remove-event bookkeeping.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: PagerConfig,
    pub(crate) uffd: uffd::Uffd,
    /// Where remote pages live.
    pub(crate) store: Arc<dyn store::PageStore>,
    /// Resident pages against the local budget.
    pub(crate) budget: budget::Budget,
    /// The live regions.
    pub(crate) regions: registry::Registry,
    /// The evictor's CLOCK ring, forced evictions and wake-up.
    pub(crate) queue: queue::EvictQueue,
    pub(crate) stats: stats::Counters,
    pub(crate) shutdown: AtomicBool,
    pub(crate) history: Option<Arc<history::History>>,
    /// The service-level objective's controller, when there is one.
    pub(crate) slo: Option<slo::Controller>,
    /// The local share, steered for the pager's objective and its regions'.
    pub(crate) steering: slo::Steering,
    /// Installs (`UFFDIO_COPY` into a region) hold it shared; reading userfaultfd messages and
    /// marking the pages of remove events holds it exclusive. See `fault::Handler::install_runs`.
    pub(crate) install_gate: RwLock<()>,
    /// The window waiting for the prefetch-ahead thread.
    pub(crate) ahead: fault::AheadQueue,
    /// Test hook: the evictor drops dirty pages as if clean (the bug class of issue #7).
    pub(crate) inject_drop_dirty: AtomicBool,
    /// Test hook: `UFFDIO_MOVE` of a run reports failure after moving it all (a kernel quirk).
    pub(crate) inject_move_undercount: AtomicBool,
    /// Test hook: microseconds the evictor waits before unsharing a page or putting one back.
    pub(crate) inject_evictor_delay_us: AtomicU64,
    /// Test hook: put-backs fail (`Pager::inject_put_back_failure`).
    pub(crate) inject_put_back_failure: AtomicBool,
}

impl Shared {
    /// The prefetch window in use: the configured one, at most an eighth of the budget.
    pub(crate) fn prefetch_window(&self) -> usize {
        self.config.prefetch_window.min(self.budget.base() / 8).max(1)
    }

    /// The largest window a confirmed stream grows to: the configured maximum, at most an
    /// eighth of the budget, at least the starting window.
    pub(crate) fn prefetch_window_max(&self) -> usize {
        self.config.prefetch_window_max.min(self.budget.base() / 8).max(self.prefetch_window())
    }

    /// Finds the region and page index of an address.
    pub(crate) fn lookup(&self, addr: usize) -> Option<(Arc<region::RegionState>, usize)> {
        self.regions.lookup(addr)
    }

    /// Tries to reserve room for `n` more resident pages; on failure kicks the evictor and waits
    /// up to a millisecond for room ([`Reservation::Wait`]: call again). Once the caller has been
    /// waiting (`waited`) for 2 s, or when the evictor is stuck (no lender can take a dirty page),
    /// reserves past the budget, up to the local maximum, counting an over-budget event. At the
    /// maximum, when no lender takes pages, it keeps waiting for room until `waited` reaches the
    /// fetch timeout, then refuses.
    /// While the budget is held (around `fork`) or the pager shuts down, reserves without bound.
    pub(crate) fn try_reserve(&self, n: usize, waited: Duration) -> Reservation {
        if self.budget.take(n) {
            self.kick_if_low();
            return Reservation::Made;
        }
        if self.budget.is_held() || self.shutdown.load(Ordering::Acquire) {
            self.budget.take_held(n);
            if self.budget.is_held() {
                stats::Counters::add(&self.stats.held_pages, n as u64);
            }
            return Reservation::Made;
        }
        let too_long = waited > Duration::from_secs(2);
        if self.budget.is_stuck() || too_long {
            if self.budget.take_over(n) {
                if too_long {
                    tracing::warn!("the evictor made no room for 2 s; exceeding the local budget");
                }
                self.kick_if_low();
                return Reservation::Made;
            }
            // At the maximum. Refused only when no lender takes pages: past the maximum after a
            // hold (`fork`), the evictor is making room and the fault waits for it.
            if self.budget.stuck_lately() {
                if waited >= self.config.fetch_timeout {
                    self.budget.refused();
                    return Reservation::Refused;
                }
                self.report_at_max();
            }
        }
        self.queue.kick();
        self.budget.wait_for_room(Duration::from_millis(1));
        Reservation::Wait
    }

    /// True if `bytes` more of resident memory may be promised now. False only when the evictor
    /// found no lender to take a page since the resident set was last within the budget, and the
    /// bytes, plus the evictor's headroom (for allocator metadata and prefetch windows), would
    /// take the resident set past the local maximum. Counts a refusal.
    pub(crate) fn may_grow(&self, bytes: usize) -> bool {
        let b = &self.budget;
        if !b.stuck_lately() || b.is_held() || !b.would_pass_max(bytes.div_ceil(PAGE_SIZE).saturating_add(b.headroom()))
        {
            return true;
        }
        b.refused();
        self.report_at_max();
        false
    }

    /// Says once per episode over the budget that the local maximum was reached.
    fn report_at_max(&self) {
        if self.budget.first_at_max() {
            tracing::error!(
                local_max_pages = self.budget.max(),
                budget_pages = self.budget.limit(),
                "local memory is at its maximum (--local-max, COALESCE_LOCAL_MAX) and no lender can take a page: \
                 allocations fail with ENOMEM, and accesses that need another local page wait up to the fetch \
                 timeout ({:?}), then fail with SIGBUS",
                self.config.fetch_timeout
            );
        }
    }

    fn kick_if_low(&self) {
        if self.budget.low_on_room() {
            self.queue.kick();
        }
    }

    /// Whether the prefetch-ahead thread runs.
    pub(crate) fn prefetches_ahead(&self) -> bool {
        self.config.prefetch && self.config.prefetch_ahead
    }

    /// Waits until every thread reading userfaultfd messages has marked the remove events it
    /// read (readers read and mark holding the install gate exclusively). The kernel lets an
    /// `madvise` zap its range as soon as its remove event is read, before the reader can mark
    /// the pages: a thread that finds a page unmapped calls this before deciding that no discard
    /// explains it. Must not be called by a thread holding the gate.
    pub(crate) fn wait_for_readers(&self) {
        drop(self.install_gate.read().unwrap_or_else(PoisonError::into_inner));
    }

    /// Gives back reserved room that was not used (or pages that left).
    pub(crate) fn unreserve(&self, n: usize) {
        self.budget.give_back(n);
    }

    pub(crate) fn snapshot(&self) -> PagerStats {
        let mut s = self.stats.snapshot();
        s.resident_pages = self.budget.resident() as u64;
        s.peak_resident_pages = self.budget.peak();
        s.overshoot_events = self.budget.overshoots();
        s.local_max_pages = self.budget.max() as u64;
        s.local_max_refusals = self.budget.refusals();
        s.budget_pages = self.budget.base() as u64;
        s.local_limit_pages = self.budget.limit() as u64;
        if let Some(c) = &self.slo {
            s.slo = Some(c.slo());
            (s.slo_faults, s.slo_faults_met) = c.figures();
        }
        s.slo_local_grown_pages = self.steering.grown();
        s.remote_pages = self.store.remote_pages();
        s.rereplication_pending_pages = self.store.repair_pending();
        s.pages_migrated = self.store.migrated_pages();
        s.hot_pages_moved_nearer = self.store.hot_pages_moved_nearer();
        (s.hedged_reads, s.hedge_wins) = self.store.hedged_reads();
        s.sealed = self.store.seals_pages();
        if let Some(rejected) = self.store.copies_rejected() {
            s.copies_rejected = rejected;
        }
        if let Some(b) = self.store.backup_stats() {
            s.backup = true;
            s.backup_written_pages = b.written;
            s.backup_lag_pages = b.lag_pages;
            s.backup_lag = Duration::from_millis(b.lag_ms);
            s.backup_read_pages = b.read_back;
            s.backup_stale_pages = b.stale;
            s.backup_failures = b.failures;
            s.backup_dropped_pages = b.dropped;
            s.backup_checkpoints = b.checkpoints;
            s.backup_last_checkpoint = b.last_checkpoint_ms.map(Duration::from_millis);
            s.backup_pages_since_checkpoint = b.since_checkpoint;
        }
        s.metadata_bytes = self.regions.table_bytes() + self.store.bookkeeping_bytes() as u64;
        s
    }
}

/// The pager: owns the userfaultfd, the handler and evictor threads, and the server sessions.
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pager {
    /// Finds lenders if asked to ([`PagerConfig::discovery`], see [`discover`]), connects to them
    /// and to the named ones (one copy of each page on `memory-server` lenders, see
    /// [`store::LenderStore`], sealed unless [`PagerConfig::trusted_lenders`]) and starts the
    /// threads.
    pub fn new(mut config: PagerConfig) -> Result<Self, PagerError> {
        config.validate()?;
        // userfaultfd first: without it, nothing is asked of the lenders.
        let uffd = open_userfaultfd()?;
        let source = discover::start(&mut config)?;
        let redundancy = config.redundancy.unwrap_or_else(|| store::Redundancy::default_for(config.servers.len()));
        if redundancy.lenders() > config.servers.len() {
            return Err(PagerError::Config(format!(
                "redundancy {redundancy} needs {} distinct lenders; {} configured",
                redundancy.lenders(),
                config.servers.len()
            )));
        }
        let endpoint = EndpointOptions {
            link: config.link.clone(),
            max_outstanding: 64,
            device: config.device.clone(),
            key: config.key.clone(),
            ..EndpointOptions::default()
        };
        let options = store::LenderStoreOptions {
            provider: config.provider,
            client_id: config.client_id,
            endpoint,
            timeout: config.fetch_timeout,
            failover: config.failover_timeout,
            spin: config.reply_spin,
            trailers: !config.trusted_lenders,
            redundancy,
            extra_shard_reads: config.extra_shard_reads,
            hedged_reads: config.hedged_reads,
            hedge_within: config.slo.map(|slo| slo.target),
        };
        let client = rdma::client::ClientOptions {
            provider: config.provider,
            key: config.key.clone(),
            ..rdma::client::ClientOptions::default()
        };
        let mut lenders: Arc<dyn store::PageStore> = Arc::new(store::LenderStore::connect(&config.servers, options)?);
        if let Some(addr) = config.backup {
            let backup = store::BackupOptions {
                addr,
                client,
                max_lag: config.backup_max_lag,
                max_lag_pages: config.backup_max_lag_pages,
                timeout: config.fetch_timeout,
                checkpoint_interval: config.backup_checkpoint_interval,
            };
            lenders = Arc::new(store::BackupStore::new(lenders, backup)?);
        }
        if redundancy == store::Redundancy::None {
            tracing::warn!("pages have one copy: losing a lender loses its pages (replicate:2 needs two lenders)");
        } else {
            tracing::info!(
                %redundancy,
                lenders = redundancy.lenders(),
                survives_losing = redundancy.tolerates(),
                remote_memory_per_page = redundancy.memory_factor(),
                "every page is kept on distinct lenders"
            );
        }
        let store: Arc<dyn store::PageStore> =
            if config.trusted_lenders { lenders } else { Arc::new(store::SealedStore::new(lenders)?) };
        if config.trusted_lenders {
            tracing::info!("lenders are trusted: pages travel and rest in plaintext");
        }
        let mut pager = Self::start(config, store, uffd)?;
        if let Some(source) = source {
            let s = Arc::clone(&pager.shared);
            pager.spawn("discover".into(), move || discover::adopt(source.as_ref(), &s))?;
        }
        Ok(pager)
    }

    /// Starts a pager whose remote pages live in `store` (`config.servers`, `provider`, `link`,
    /// `device` and `client_id` are the store's business and not used here).
    pub fn with_store(config: PagerConfig, store: Arc<dyn store::PageStore>) -> Result<Self, PagerError> {
        config.validate()?;
        let uffd = open_userfaultfd()?;
        Self::start(config, store, uffd)
    }

    fn start(config: PagerConfig, store: Arc<dyn store::PageStore>, uffd: uffd::Uffd) -> Result<Self, PagerError> {
        let limit = config.local_budget / PAGE_SIZE;
        let window = config.prefetch_window_max.max(config.prefetch_window).min(limit / 8).max(1);
        let ahead = config.prefetch && config.prefetch_ahead; // `Shared::prefetches_ahead`
        let headroom = budget::Budget::headroom_for(limit, 1 + window, config.fault_threads + usize::from(ahead));
        let budget = budget::Budget::new(limit, headroom, config.local_max.pages(limit));
        let shared = Arc::new(Shared {
            uffd,
            store,
            budget,
            regions: registry::Registry::default(),
            queue: queue::EvictQueue::default(),
            stats: stats::Counters::default(),
            shutdown: AtomicBool::new(false),
            install_gate: RwLock::new(()),
            ahead: fault::AheadQueue::default(),
            inject_drop_dirty: AtomicBool::new(false),
            inject_move_undercount: AtomicBool::new(false),
            inject_evictor_delay_us: AtomicU64::new(0),
            inject_put_back_failure: AtomicBool::new(false),
            history: (config.history > 0).then(|| Arc::new(history::History::new(config.history))),
            slo: config.slo.map(slo::Controller::new),
            steering: slo::Steering::default(),
            config,
        });
        let mut pager = Self { shared: Arc::clone(&shared), threads: Vec::new() };
        for i in 0..shared.config.fault_threads {
            let handler = fault::Handler::new(Arc::clone(&shared))?;
            let tag = u8::try_from(i + 1).unwrap_or(u8::MAX);
            pager.spawn(format!("uffd-{i}"), move || {
                history::set_thread_tag(tag);
                handler.run();
            })?;
        }
        if ahead {
            let handler = fault::Handler::ahead(Arc::clone(&shared))?;
            pager.spawn("prefetch-ahead".into(), move || handler.run_ahead())?;
        }
        for _ in 0..shared.config.evictor_threads {
            let evictor = evict::Evictor::new(Arc::clone(&shared))?;
            pager.spawn("evictor".into(), move || {
                history::set_thread_tag(history::EVICTOR_TAG);
                evictor.run();
            })?;
        }
        let s = Arc::clone(&shared);
        pager.spawn("heartbeat".into(), move || heartbeat_loop(&s))?;
        if shared.config.repair_rate > 0 {
            if let Some(repair) = Arc::clone(&shared.store).open_repair()? {
                let s = Arc::clone(&shared);
                pager.spawn("repair".into(), move || repair_loop(&s, repair))?;
            }
        }
        Ok(pager)
    }

    /// Starts a pager thread. Failure policy: a panic on a pager thread aborts the process. A
    /// process whose fault handler or evictor died would hang on its next fault (or grow past
    /// its budget) with nothing said; aborting makes the bug loud at once (the panic message and
    /// a log line name the thread).
    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), PagerError> {
        let hook = self.shared.config.thread_start;
        let thread = name.clone();
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(hook) = hook {
                    hook();
                }
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    tracing::error!(thread, "a pager thread panicked (a bug in Coalesce); aborting the process");
                    std::process::abort();
                }
            })
            .map_err(PagerError::Thread)?;
        self.threads.push(t);
        Ok(())
    }

    /// Maps a region of `len` bytes (rounded up to whole pages), registered with the pager.
    pub fn map(&self, len: usize, options: RegionOptions) -> Result<Region<'_>, PagerError> {
        Region::new(self, len, options)
    }

    /// While `true`, nothing is evicted and faults may take the resident set past the budget
    /// (used around `fork`, which must see every page locally). `false` resumes normal eviction.
    pub fn hold_resident(&self, hold: bool) {
        self.shared.budget.set_held(hold);
        self.shared.queue.kick();
    }

    /// True if an allocation of `bytes` may be served now. False only when no lender can take a
    /// page (the evictor is stuck) and the allocation would take the resident set past the local
    /// maximum ([`PagerConfig::local_max`]): an allocator should then fail it (`ENOMEM`) rather
    /// than hand out memory whose first touch would have to fail. Counted in
    /// [`PagerStats::local_max_refusals`].
    pub fn may_allocate(&self, bytes: usize) -> bool {
        self.shared.may_grow(bytes)
    }

    /// Test hook, not for production: while `true`, the evictor drops dirty pages as if they
    /// were clean, without writing them back: the bug that once made a written page read back
    /// as zeros. The page-state invariants must turn the next access to such a page into SIGBUS
    /// and a logged, counted violation.
    #[doc(hidden)]
    pub fn inject_bug_drop_dirty_pages(&self, on: bool) {
        self.shared.inject_drop_dirty.store(on, Ordering::Release);
    }

    /// Test hook, not for production: while `true`, every `UFFDIO_MOVE` of two or more pages
    /// that moved them all is reported to the evictor as `EEXIST` with nothing moved, as a kernel
    /// that miscounts would. The evictor must find the pages in staging and lose nothing.
    #[doc(hidden)]
    pub fn inject_move_undercount(&self, on: bool) {
        self.shared.inject_move_undercount.store(on, Ordering::Release);
    }

    /// Test hook, not for production: the evictor waits `delay` before it unshares each page
    /// shared with a forked child and before it puts back each page whose write-back failed,
    /// widening the windows in which the program may discard or touch the page, or make its own
    /// `madvise` wait. Nothing may deadlock or be lost whatever lands in them.
    #[doc(hidden)]
    pub fn inject_evictor_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.inject_evictor_delay_us.store(us, Ordering::Release);
    }

    /// Test hook, not for production: while `true`, putting back a page whose write-back failed
    /// fails as if the kernel refused the copy (`ENOMEM`). The page's contents are then lost: it
    /// must be poisoned (SIGBUS on access, counted in [`PagerStats::lost_pages`]), never read as
    /// zeros or left counted resident while unmapped.
    #[doc(hidden)]
    pub fn inject_put_back_failure(&self, on: bool) {
        self.shared.inject_put_back_failure.store(on, Ordering::Release);
    }

    /// Test hook, not for production: while `true`, every stream's prefetch window is handed to
    /// the prefetch-ahead thread as if demand faults were being served (the fault handler
    /// fetches the faulting page alone), so that the stress harness runs that path under
    /// contention whatever its access pattern.
    #[doc(hidden)]
    pub fn force_windows_ahead(&self, on: bool) {
        self.shared.ahead.forced.store(on, Ordering::Release);
    }

    /// Adds a lender while the pager runs (for example one just discovered): new pages may go to
    /// it at once, and lost copies or shards may be rebuilt on it. Fails naming the lender when
    /// it cannot be reached, is a lender already, or the pager has [`store::MAX_LENDERS`].
    pub fn add_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.shared.store.add_lender(addr)
    }

    /// Treats the lender at `addr` as leaving (it withdrew its announcement, or its registry lease
    /// expired): no new pages go to it, and its pages move to the other lenders in the
    /// background while it still serves them (as in a drain). Fails for an address that is not
    /// one of this pager's lenders.
    pub fn retire_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.shared.store.retire_lender(addr)
    }

    /// Waits until every page written back so far is in the backup tier and durable there
    /// (`--backup`; at once without one). Fails if the backup server does not take them all
    /// within `timeout`.
    pub fn checkpoint(&self, timeout: Duration) -> Result<(), PagerError> {
        self.shared.store.checkpoint(timeout)
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> PagerStats {
        self.shared.snapshot()
    }

    /// How many threads the pager started (each ran [`PagerConfig::thread_start`] first).
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// The configuration.
    pub fn config(&self) -> &PagerConfig {
        &self.shared.config
    }

    /// Every lender: address, pages held, health, measured round trips and placement weight.
    pub fn lenders(&self) -> Vec<store::LenderInfo> {
        self.shared.store.lenders()
    }

    /// Addresses of the servers and the pages each holds.
    pub fn server_pages(&self) -> Vec<(SocketAddr, u64, bool)> {
        self.shared.store.lenders().into_iter().map(|l| (l.addr, l.pages, l.alive)).collect()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// The userfaultfd of a pager, with every feature it relies on.
fn open_userfaultfd() -> Result<uffd::Uffd, PagerError> {
    let features = uffd::features::PAGEFAULT_FLAG_WP
        | uffd::features::EVENT_REMOVE
        | uffd::features::POISON
        | uffd::features::MOVE;
    Ok(uffd::Uffd::open(features)?)
}

fn heartbeat_loop(shared: &Shared) {
    let period = shared.store.maintenance_period();
    let mut last = std::time::Instant::now();
    while !shared.shutdown.load(Ordering::Acquire) {
        std::thread::park_timeout(Duration::from_millis(50));
        if last.elapsed() >= period {
            shared.store.maintain();
            last = std::time::Instant::now();
        }
        steer_local_share(shared);
    }
}

/// Once a period, judges the pager's objective and its regions' and grows or shrinks the local
/// share for them (`slo.rs`).
fn steer_local_share(shared: &Shared) {
    let regions = shared.regions.with_objectives();
    let objectives = shared
        .slo
        .iter()
        .map(|c| (c, None))
        .chain(regions.iter().filter_map(|r| r.objective.as_ref().map(|c| (c, Some(r.id)))));
    let mut verdicts = Vec::new();
    let mut any_at_risk = false;
    for (c, region) in objectives {
        verdicts.extend(c.judge().map(|v| (v, region)));
        any_at_risk |= c.at_risk();
    }
    if !verdicts.is_empty() {
        shared.steering.apply(&verdicts, any_at_risk, &shared.budget);
    }
}

/// Restores redundancy in the background, at most `repair_rate` bytes per second.
fn repair_loop(shared: &Shared, mut repair: Box<dyn store::PageRepair>) {
    let rate = shared.config.repair_rate.max(PAGE_SIZE) as f64;
    while !shared.shutdown.load(Ordering::Acquire) {
        let copied = repair.repair(64);
        if copied == 0 {
            std::thread::park_timeout(Duration::from_millis(200));
            continue;
        }
        stats::Counters::add(&shared.stats.rereplicated, copied as u64);
        std::thread::park_timeout(Duration::from_secs_f64((copied * PAGE_SIZE) as f64 / rate));
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.queue.kick();
        for t in self.threads.drain(..) {
            t.thread().unpark();
            let _ = t.join();
        }
        self.shared.store.release_all();
    }
}
