//! The lender store: each page on `memory-server` lenders, in one copy, replicated on several
//! distinct lenders, or erasure-coded over several ([`LenderStoreOptions::redundancy`]), over
//! the shim or verbs provider. Control
//! sessions, slabs allocated on demand, slots handed out over the live lenders by proximity
//! (`proximity.rs`: shares follow weights from measured round trips; equally near lenders share
//! evenly), lease heartbeats; each thread's connections are in [`io::LenderIo`].
//!
//! Slabs come in groups: a group is one slab on each of `width` distinct lenders (the copies, or
//! the K + M shards), and record `r` of a group is record `r` of each of its slabs. A slot names
//! a record of a group: `group index << 20 | record` (4096 groups of up to 2^20 records), so the
//! page table keeps 4 bytes per page in every mode. With copies a record is the page's 4 KiB,
//! followed by a [`TRAILER_LEN`]-byte trailer when the store keeps trailers (for a sealing
//! layer's tags); erasure-coded, record `r` of slab `s` is shard `s` of the page and trailer
//! (`coding.rs`), read and written by `coded_io.rs`.
//!
//! A failed lender is tried again now and then (every [`REVIVE_INTERVAL`], from the upkeep
//! thread): if its session is still there (a stall shorter than the lease) it is trusted again
//! with its copies; if not (it restarted, or the lease ran out) it gets a new session, its old
//! copies count as gone, and new pages go to it again.
//!
//! Replicas: a write goes to every copy (posted together) and succeeds when all have
//! acknowledged; a read goes to the first copy on a live lender, and when it fails (the lender is
//! then marked failed) to the next. A group that lost a copy is made whole again in the
//! background (`repair.rs`: a new slab on another lender, filled from a surviving copy); a clean
//! page of such a group evicted before that is written again, to a whole group. When fewer live
//! lenders than `width` have room, new groups have fewer copies (or parity shards; never fewer
//! than K data shards), said once in the log, rather than none.
//! Slots are handed out from each slab with a bump pointer; freed slots go to a per-lender free
//! list, so the allocator costs nothing per used slot.
//!
//! Failure policy (the same for reads and writes): a lender is marked failed when its control
//! session or lease is lost, when a request to it times out, when its connection is lost, or when
//! it refuses a request (a remote access error: our slabs are gone, and on verbs the queue pair
//! is in the error state). Its pages are then read from their other copies or shards (or, with
//! none left, raise SIGBUS when accessed), pages evicted later go to the other lenders, and it is
//! tried again as said above. A lender that served a copy which came back changed (a sealing
//! layer's verdict) is *distrusted*: failed for good, never tried again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rdma::client::{ClientError, ClientOptions};
use rdma::{EndpointOptions, ProviderKind};

use super::{LenderInfo, PageIo, PageStore, Redundancy, Slot, TRAILER_LEN};
use crate::{PagerError, PAGE_SIZE};

mod coded_io;
mod coding;
mod hedge;
mod io;
mod lender;
mod liar;
mod migrate;
mod proximity;
mod quiesce;
mod repair;
mod revive;
mod roster;
mod slots;

use lender::{control_timeout, open_lender, Lender};
pub use proximity::{weight as proximity_weight, NEAR_ENOUGH};
pub use roster::MAX_LENDERS;

const SLOT_PAGE_BITS: u32 = 20;
const MAX_SLABS: usize = 1 << (32 - SLOT_PAGE_BITS);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most copies of a page.
pub const MAX_COPIES: usize = 4;

/// Most slabs in a group (copies, or data plus parity shards).
const MAX_GROUP: usize = crate::store::MAX_DATA_SHARDS + crate::store::MAX_PARITY_SHARDS;

/// How often a failed lender is tried again.
pub const REVIVE_INTERVAL: Duration = Duration::from_secs(1);

/// One slab granted by a server.
#[derive(Debug, Clone, Copy, Default)]
struct Slab {
    server: usize,
    /// The lender's session generation the slab was granted in.
    generation: u64,
    slab_id: u64,
    addr: u64,
    rkey: u32,
}

/// One slab on each of up to [`MAX_GROUP`] distinct lenders; record `r` of the group is record
/// `r` of every slab (with erasure coding, slab `s` holds shard `s`).
#[derive(Debug, Clone, Copy)]
struct Group {
    copies: [Slab; MAX_GROUP],
    len: usize,
    records: u32,
}

impl Group {
    fn slabs(&self) -> &[Slab] {
        &self.copies[..self.len]
    }
}

/// Where one copy of a slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Location {
    /// Index of the lender.
    lender: usize,
    /// The lender's session generation of the copy's slab.
    generation: u64,
    /// Remote address of the page.
    addr: u64,
    /// Key of its slab.
    rkey: u32,
}

/// Where every copy of a slot lives.
#[derive(Debug, Clone, Copy)]
struct Places {
    at: [Location; MAX_GROUP],
    len: usize,
    /// The group's index.
    group: usize,
}

impl Places {
    fn copies(&self) -> &[Location] {
        &self.at[..self.len]
    }
}

/// The lender store: every lender, its slab groups, and the slot allocator.
#[derive(Debug)]
pub struct LenderStore {
    lenders: roster::Roster,
    groups: RwLock<Vec<Group>>,
    /// Slots freed while their group was not whole: handed out again once it is (`unpark`).
    parked: Mutex<Vec<u32>>,
    /// Slabs a repair replaced while their lender was unreachable: freed if it comes back with
    /// the same session (lender, generation, slab id).
    orphans: Mutex<Vec<(usize, u64, u64)>>,
    /// Slabs a repair, drain or migration replaced while their lender stays: (lender,
    /// generation, slab id, when). Freed once no read that found them before can still be in
    /// flight (`retire_slabs`): freeing at once would fail such a read with a remote access error.
    replaced: Mutex<Vec<(usize, u64, u64, Instant)>>,
    /// Slabs in a whole group: copies of each page, or data plus parity shards.
    width: usize,
    /// The erasure code, when pages are coded rather than copied.
    code: Option<coding::PageCode>,
    /// Shards a coded read posts beyond the K it needs.
    extra_shard_reads: usize,
    /// Set once a group was made with fewer copies than asked (said once in the log).
    degraded: AtomicBool,
    /// How control sessions are opened (again, when a failed lender is tried again).
    client_options: ClientOptions,
    next_lender: AtomicUsize,
    provider: ProviderKind,
    endpoint_options: EndpointOptions,
    /// A request not completed within this time fails and marks its lender failed.
    timeout: Duration,
    /// With several copies: a read not completed within this time, when every page it carries
    /// has another usable copy, fails over to those copies, and a write fails (its lender is
    /// marked failed and tried again later).
    failover: Duration,
    /// How long a waiting thread busy-polls before it sleeps in the kernel.
    spin: Duration,
    /// Trailer bytes kept after each page (0 or [`TRAILER_LEN`]).
    trailer: usize,
    /// Write batches in flight (`quiesce.rs`).
    write_batches: quiesce::WriteBatches,
    /// The slab being moved toward a nearer lender (`migrate.rs`; 0: none).
    migrating: AtomicU64,
    /// Pages moved toward nearer lenders.
    migrated: AtomicU64,
    /// Hot pages written to a nearer lender than their old slot's (`proximity.rs`).
    moved_nearer: AtomicU64,
    /// Reads of replicated pages are hedged (`hedge.rs`).
    hedged_reads: bool,
    /// [`LenderStoreOptions::hedge_within`].
    hedge_within: Option<Duration>,
    hedges: hedge::HedgeCounters,
}

/// How a [`LenderStore`] connects and times out.
#[derive(Debug, Clone)]
pub struct LenderStoreOptions {
    /// Data-path provider.
    pub provider: ProviderKind,
    /// Client id presented to lenders (`None`: a fresh random one per lender).
    pub client_id: Option<u64>,
    /// Options of every data connection (link emulation, verbs device).
    pub endpoint: EndpointOptions,
    /// A read or write not completed within this time fails.
    pub timeout: Duration,
    /// With several copies, reads (whose pages all have another usable copy) and writes give up
    /// on a stalled lender after this long (capped by `timeout`).
    pub failover: Duration,
    /// How long a thread waiting for a reply busy-polls before it sleeps
    /// ([`crate::PagerConfig::reply_spin`]).
    pub spin: Duration,
    /// Keep a [`TRAILER_LEN`]-byte trailer beside each page (needed by a sealing layer).
    pub trailers: bool,
    /// How pages are kept: copies on distinct lenders, or erasure-coded shards on distinct
    /// lenders; needs at least [`Redundancy::lenders`] lenders.
    pub redundancy: Redundancy,
    /// Erasure-coded reads: shards read beyond the K needed (late binding; at most M).
    pub extra_shard_reads: usize,
    /// With copies: read a page again from its next copy when the first has not answered within
    /// its lender's recent 95th percentile, and take the first answer (`hedge.rs`).
    pub hedged_reads: bool,
    /// The service time a hedged read should still answer within (the objective's target,
    /// [`crate::PagerConfig::slo`]): a read whose hedge after the 95th percentile would come back
    /// later than this, going by the other copies' median, is hedged sooner (`hedge.rs`).
    /// `None`: after the 95th percentile only.
    pub hedge_within: Option<Duration>,
}

impl LenderStore {
    /// Opens a control session with every lender; fails naming the first unreachable one.
    pub fn connect(addrs: &[SocketAddr], options: LenderStoreOptions) -> Result<Self, PagerError> {
        if addrs.is_empty() {
            return Err(PagerError::Config("no memory servers configured".into()));
        }
        let width = options.redundancy.lenders();
        if width > addrs.len() {
            return Err(PagerError::Config(format!(
                "redundancy {} needs {width} distinct lenders; {} configured",
                options.redundancy,
                addrs.len()
            )));
        }
        let trailer = if options.trailers { TRAILER_LEN } else { 0 };
        let code = match options.redundancy {
            Redundancy::Erasure { data, parity } => Some(coding::PageCode::new(data, parity, trailer)?),
            Redundancy::None | Redundancy::Replicate(_) => None,
        };
        let client = ClientOptions {
            client_id: options.client_id,
            provider: options.provider,
            key: options.endpoint.key.clone(),
            ..ClientOptions::default()
        };
        if addrs.len() > MAX_LENDERS {
            return Err(PagerError::Config(format!(
                "{} memory servers configured; a pager uses at most {MAX_LENDERS}",
                addrs.len()
            )));
        }
        let lenders = addrs.iter().map(|&addr| open_lender(addr, &client)).collect::<Result<Vec<_>, _>>()?;
        let store = Self {
            lenders: roster::Roster::new(lenders),
            groups: RwLock::new(Vec::new()),
            parked: Mutex::new(Vec::new()),
            orphans: Mutex::new(Vec::new()),
            replaced: Mutex::new(Vec::new()),
            width,
            code,
            extra_shard_reads: options.extra_shard_reads,
            degraded: AtomicBool::new(false),
            client_options: client,
            next_lender: AtomicUsize::new(0),
            provider: options.provider,
            endpoint_options: options.endpoint,
            timeout: options.timeout,
            failover: options.failover.min(options.timeout),
            spin: options.spin,
            trailer,
            write_batches: quiesce::WriteBatches::default(),
            migrating: AtomicU64::new(0),
            migrated: AtomicU64::new(0),
            moved_nearer: AtomicU64::new(0),
            hedged_reads: options.hedged_reads,
            hedge_within: options.hedge_within,
            hedges: hedge::HedgeCounters::default(),
        };
        store.update_weights();
        Ok(store)
    }

    fn is_alive(&self, lender: usize) -> bool {
        self.lenders.get(lender).is_some_and(Lender::is_alive)
    }

    /// True when the copy at `loc` still exists: its lender is alive, in the session that
    /// granted the copy's slab.
    fn copy_valid(&self, loc: &Location) -> bool {
        self.lenders
            .get(loc.lender)
            .is_some_and(|s| s.is_alive() && s.generation.load(Ordering::Acquire) == loc.generation)
    }

    /// True when the copy at `loc` exists and stays: its lender is not leaving.
    fn copy_whole(&self, loc: &Location) -> bool {
        // SeqCst: pairs with the mark in `mark_leaving` (see `quiesce.rs`).
        self.copy_valid(loc) && !self.lenders[loc.lender].leaving.load(Ordering::SeqCst)
    }

    /// True when every copy of `places` still exists on a lender that stays, and there are as
    /// many as the live lenders allow (a group made with fewer copies while lenders were down is
    /// not healthy once they are back). Pages are written only to healthy groups; the others are
    /// made whole in the background (`repair.rs`), and their pages are written again to a whole
    /// group as they pass through local memory.
    fn healthy(&self, places: &Places) -> bool {
        // SeqCst: a group that stops being whole (a lender leaves, or one comes back so that
        // groups need another copy) is marked before a repair snapshots the writes in flight
        // (`quiesce.rs`).
        let live = self
            .lenders
            .iter()
            .filter(|(_, s)| s.alive.load(Ordering::SeqCst) && !s.leaving.load(Ordering::SeqCst))
            .count();
        places.len >= self.width.min(live)
            && places.copies().iter().all(|loc| self.copy_whole(loc))
            && !self.is_migrating(places.group)
    }

    /// Where every copy of a slot lives.
    fn locate(&self, slot: Slot) -> Option<Places> {
        let group = usize::try_from(slot.0 >> SLOT_PAGE_BITS).ok()?;
        let record = u64::from(slot.0 & ((1 << SLOT_PAGE_BITS) - 1));
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        let g = groups.get(group)?;
        let mut places = Places { at: [Location::default(); MAX_GROUP], len: g.len, group };
        for (at, slab) in places.at.iter_mut().zip(g.slabs()) {
            *at = Location {
                lender: slab.server,
                generation: slab.generation,
                addr: slab.addr + record * self.record_len(),
                rkey: slab.rkey,
            };
        }
        Some(places)
    }

    /// Bytes one slot takes in a slab: the page and its trailer, or one shard of them.
    fn record_len(&self) -> u64 {
        match &self.code {
            Some(code) => code.shard_len() as u64,
            None => (PAGE_SIZE + self.trailer) as u64,
        }
    }

    /// The shortest lease over the lenders.
    fn min_lease(&self) -> Duration {
        self.lenders.iter().map(|(_, s)| lock(&s.control).session().lease).min().unwrap_or(Duration::from_secs(30))
    }
}

impl PageStore for LenderStore {
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError> {
        Ok(Box::new(io::LenderIo::open(self)?))
    }

    fn free(&self, slot: Slot) {
        let Some(places) = self.locate(slot) else { return };
        for loc in places.copies().iter().filter(|loc| self.copy_valid(loc)) {
            let pages = &self.lenders[loc.lender].pages;
            let _ = pages.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        // The slot is reused only while every copy of its group can be written; until its
        // group is whole again, it waits.
        if self.healthy(&places) {
            lock(&self.lenders[places.copies()[0].lender].slots).free.push(slot.0);
        } else {
            lock(&self.parked).push(slot.0);
        }
    }

    fn lender_of(&self, slot: Slot) -> Option<SocketAddr> {
        let places = self.locate(slot)?;
        let first = places.copies().iter().find(|loc| self.is_alive(loc.lender)).or(places.copies().first())?;
        self.lenders.get(first.lender).map(|s| s.addr)
    }

    fn trailer_len(&self) -> usize {
        self.trailer
    }

    fn seals_pages(&self) -> bool {
        false
    }

    /// Renews every live lender's lease (a lost session or connection marks the lender failed)
    /// and tries failed lenders again.
    fn maintain(&self) {
        self.free_replaced();
        for (i, s) in self.lenders.iter() {
            if !s.is_alive() {
                continue;
            }
            s.retry_if_full();
            let t = Instant::now();
            let result = lock(&s.control).heartbeat();
            match result {
                Ok(hb) => {
                    lock(&s.rtt).record(t.elapsed());
                    if hb.leaving_in.is_some() {
                        self.mark_leaving(i, hb.leaving_in);
                    }
                }
                Err(ClientError::SessionExpired { .. }) => {
                    self.mark_failed(i, "its lease expired and our slabs were reclaimed")
                }
                Err(e) => self.mark_failed(i, &e.to_string()),
            }
        }
        // Then, with every live lease renewed, try the failed lenders again.
        for (i, s) in self.lenders.iter() {
            if !s.is_alive() {
                self.revive(i);
            }
        }
        self.update_weights();
    }

    /// A third of the shortest lease, at most a second (a lender's drain notice or death is
    /// noticed within it, even when no page moves).
    fn maintenance_period(&self) -> Duration {
        (self.min_lease() / 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    fn remote_pages(&self) -> u64 {
        self.lenders.iter().map(|(_, s)| s.pages.load(Ordering::Relaxed)).sum()
    }

    fn bookkeeping_bytes(&self) -> usize {
        let slabs = self.groups.read().unwrap_or_else(PoisonError::into_inner).len() * std::mem::size_of::<Group>();
        let free: usize = self.lenders.iter().map(|(_, s)| lock(&s.slots).free.capacity() * 4).sum();
        slabs + free + lock(&self.parked).capacity() * 4
    }

    fn lenders(&self) -> Vec<LenderInfo> {
        self.lenders
            .iter()
            .map(|(_, s)| {
                let rtt = lock(&s.rtt);
                LenderInfo {
                    addr: s.addr,
                    pages: s.pages.load(Ordering::Relaxed),
                    alive: s.is_alive(),
                    leaving: s.leaving.load(Ordering::Acquire),
                    rtt_min: rtt.min(),
                    rtt_median: rtt.median(),
                    weight: f64::from_bits(s.weight.load(Ordering::Relaxed)),
                }
            })
            .collect()
    }

    fn add_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        LenderStore::add_lender(self, addr).map(|_| ())
    }

    fn retire_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        let (i, _) = self
            .lenders
            .iter()
            .find(|(_, s)| s.addr == addr)
            .ok_or_else(|| PagerError::Config(format!("memory-server {addr} is not a lender of this pager")))?;
        self.mark_leaving(i, None);
        Ok(())
    }

    fn open_repair(self: Arc<Self>) -> Result<Option<Box<dyn crate::store::PageRepair>>, PagerError> {
        Ok(Some(Box::new(repair::Repairer::open(self)?)))
    }

    fn repair_pending(&self) -> u64 {
        self.pending_repair()
    }

    fn migrated_pages(&self) -> u64 {
        self.migrated.load(Ordering::Relaxed)
    }

    fn hot_pages_moved_nearer(&self) -> u64 {
        self.moved_nearer.load(Ordering::Relaxed)
    }

    fn hedged_reads(&self) -> (u64, u64) {
        (self.hedges.posted.load(Ordering::Relaxed), self.hedges.won.load(Ordering::Relaxed))
    }

    fn release_all(&self) {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner).clone();
        for slab in groups.iter().flat_map(Group::slabs) {
            let s = &self.lenders[slab.server];
            if s.is_alive() {
                let _ = lock(&s.control).free_slab(slab.slab_id);
            }
        }
    }
}

fn make_slot(group: usize, record: u32) -> Slot {
    Slot((u32::try_from(group).unwrap_or(u32::MAX) << SLOT_PAGE_BITS) | record)
}
