//! The lender store: one copy of each page on `memory-server` lenders, over the shim or verbs
//! provider. Control sessions, slabs allocated on demand, slots handed out round-robin over every
//! live lender (so pages spread over all of them), lease heartbeats; each thread's connections are
//! in [`io::LenderIo`].
//!
//! A slot names one place for a page: `slab index << 20 | record in slab` (4096 slabs of up to
//! 4 GiB). A record is the page's 4 KiB, followed by a [`TRAILER_LEN`]-byte trailer when the
//! store keeps trailers (for a sealing layer's tags).
//! Slots are handed out from each slab with a bump pointer; freed slots go to a per-lender free
//! list, so the allocator costs nothing per used slot.
//!
//! Failure policy (the same for reads and writes): a lender is marked failed, for good, when its
//! control session or lease is lost, when a request to it times out, when its connection is lost,
//! or when it refuses a request (a remote access error: our slabs are gone, and on verbs the queue
//! pair is in the error state). Its pages then raise SIGBUS when accessed, and pages evicted
//! later go to the other lenders.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use rdma::client::{ClientError, ClientOptions, ControlClient};
use rdma::{EndpointOptions, ProviderKind};

use super::{LenderInfo, PageIo, PageStore, Slot, TRAILER_LEN};
use crate::{PagerError, PAGE_SIZE};

mod io;

const SLOT_PAGE_BITS: u32 = 20;
const MAX_SLABS: usize = 1 << (32 - SLOT_PAGE_BITS);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One slab granted by a server.
#[derive(Debug, Clone, Copy)]
struct Slab {
    server: usize,
    slab_id: u64,
    addr: u64,
    rkey: u32,
    pages: u32,
}

#[derive(Debug, Default)]
struct ServerSlots {
    free: Vec<u32>,
    /// (slab index, next unused page) of the slab being filled.
    bump: Option<(usize, u32)>,
}

/// A lender as the store sees it.
#[derive(Debug)]
struct Lender {
    addr: SocketAddr,
    control: Mutex<ControlClient>,
    alive: AtomicBool,
    full: AtomicBool,
    /// Slots currently holding (or reserved for) pages.
    pages: AtomicU64,
    slots: Mutex<ServerSlots>,
}

impl Lender {
    /// False once the lender failed (connection lost, lease lost, timeout, refusal).
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// Where a slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    /// Index of the lender.
    lender: usize,
    /// Remote address of the page.
    addr: u64,
    /// Key of its slab.
    rkey: u32,
}

/// The lender store: every lender, its slabs, and the slot allocator.
#[derive(Debug)]
pub struct LenderStore {
    lenders: Vec<Lender>,
    slabs: RwLock<Vec<Slab>>,
    next_lender: AtomicUsize,
    provider: ProviderKind,
    endpoint_options: EndpointOptions,
    /// A request not completed within this time fails and marks its lender failed.
    timeout: Duration,
    /// How long a waiting thread busy-polls before it sleeps in the kernel.
    spin: Duration,
    /// Trailer bytes kept after each page (0 or [`TRAILER_LEN`]).
    trailer: usize,
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
    /// How long a waiting thread busy-polls before it sleeps.
    pub spin: Duration,
    /// Keep a [`TRAILER_LEN`]-byte trailer beside each page (needed by a sealing layer).
    pub trailers: bool,
}

impl LenderStore {
    /// Opens a control session with every lender; fails naming the first unreachable one.
    pub fn connect(addrs: &[SocketAddr], options: LenderStoreOptions) -> Result<Self, PagerError> {
        if addrs.is_empty() {
            return Err(PagerError::Config("no memory servers configured".into()));
        }
        let client = ClientOptions {
            client_id: options.client_id,
            provider: options.provider,
            key: options.endpoint.key.clone(),
            ..ClientOptions::default()
        };
        let mut lenders = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let control =
                ControlClient::connect(addr, &client).map_err(|source| PagerError::Server { addr, source })?;
            tracing::info!(%addr, lease = ?control.session().lease, "connected to memory-server");
            lenders.push(Lender {
                addr,
                control: Mutex::new(control),
                alive: AtomicBool::new(true),
                full: AtomicBool::new(false),
                pages: AtomicU64::new(0),
                slots: Mutex::new(ServerSlots::default()),
            });
        }
        Ok(Self {
            lenders,
            slabs: RwLock::new(Vec::new()),
            next_lender: AtomicUsize::new(0),
            provider: options.provider,
            endpoint_options: options.endpoint,
            timeout: options.timeout,
            spin: options.spin,
            trailer: if options.trailers { TRAILER_LEN } else { 0 },
        })
    }

    fn is_alive(&self, lender: usize) -> bool {
        self.lenders.get(lender).is_some_and(Lender::is_alive)
    }

    /// Marks a lender failed; its pages can no longer be fetched.
    fn mark_failed(&self, lender: usize, why: &str) {
        if let Some(s) = self.lenders.get(lender) {
            if s.alive.swap(false, Ordering::AcqRel) {
                tracing::error!(
                    server = %s.addr,
                    pages = s.pages.load(Ordering::Relaxed),
                    "memory-server failed ({why}); its pages cannot be fetched and will raise SIGBUS"
                );
            }
        }
    }

    /// Reserves a slot on the next live lender with room (and `usable`), allocating a slab if
    /// needed. `None` when every lender is full, down or not usable.
    fn alloc_slot(&self, usable: impl Fn(usize) -> bool) -> Option<Slot> {
        let n = self.lenders.len();
        for _ in 0..n {
            let i = self.next_lender.fetch_add(1, Ordering::Relaxed) % n;
            let s = &self.lenders[i];
            if !s.is_alive() || !usable(i) {
                continue;
            }
            if let Some(slot) = self.slot_from(i) {
                s.pages.fetch_add(1, Ordering::Relaxed);
                return Some(slot);
            }
        }
        None
    }

    fn slot_from(&self, i: usize) -> Option<Slot> {
        let s = &self.lenders[i];
        let mut slots = lock(&s.slots);
        if let Some(slot) = slots.free.pop() {
            return Some(Slot(slot));
        }
        if let Some((slab, next)) = slots.bump {
            let pages = self.slabs.read().unwrap_or_else(PoisonError::into_inner)[slab].pages;
            if next < pages {
                slots.bump = Some((slab, next + 1));
                return Some(make_slot(slab, next));
            }
        }
        if s.full.load(Ordering::Acquire) {
            return None;
        }
        let grant = match lock(&s.control).alloc_slab() {
            Ok(g) => g,
            Err(ClientError::CapacityExhausted { message, .. }) => {
                s.full.store(true, Ordering::Release);
                tracing::warn!(server = %s.addr, "memory-server is full: {message}");
                return None;
            }
            Err(e) => {
                drop(slots);
                self.mark_failed(i, &e.to_string());
                return None;
            }
        };
        let pages = u32::try_from(grant.len / self.record_len()).unwrap_or(0).min(1 << SLOT_PAGE_BITS);
        let mut slabs = self.slabs.write().unwrap_or_else(PoisonError::into_inner);
        if slabs.len() >= MAX_SLABS || pages == 0 {
            tracing::warn!(server = %s.addr, "slab table full or empty slab; not using more remote memory");
            s.full.store(true, Ordering::Release);
            return None;
        }
        let index = slabs.len();
        slabs.push(Slab { server: i, slab_id: grant.slab_id, addr: grant.addr, rkey: grant.rkey, pages });
        tracing::debug!(server = %s.addr, slab = grant.slab_id, pages, "slab allocated");
        slots.bump = Some((index, 1));
        Some(make_slot(index, 0))
    }

    /// Where a slot lives.
    fn locate(&self, slot: Slot) -> Option<Location> {
        let slab = usize::try_from(slot.0 >> SLOT_PAGE_BITS).ok()?;
        let page = u64::from(slot.0 & ((1 << SLOT_PAGE_BITS) - 1));
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner);
        let s = slabs.get(slab)?;
        Some(Location { lender: s.server, addr: s.addr + page * self.record_len(), rkey: s.rkey })
    }

    /// Bytes one slot takes in a slab: the page and its trailer.
    fn record_len(&self) -> u64 {
        (PAGE_SIZE + self.trailer) as u64
    }

    /// The shortest lease over the lenders.
    fn min_lease(&self) -> Duration {
        self.lenders.iter().map(|s| lock(&s.control).session().lease).min().unwrap_or(Duration::from_secs(30))
    }
}

impl PageStore for LenderStore {
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError> {
        Ok(Box::new(io::LenderIo::open(self)?))
    }

    fn free(&self, slot: Slot) {
        let slab = usize::try_from(slot.0 >> SLOT_PAGE_BITS).unwrap_or(usize::MAX);
        let server = self.slabs.read().unwrap_or_else(PoisonError::into_inner).get(slab).map(|s| s.server);
        if let Some(i) = server {
            let s = &self.lenders[i];
            s.pages.fetch_sub(1, Ordering::Relaxed);
            if s.is_alive() {
                lock(&s.slots).free.push(slot.0);
            }
        }
    }

    fn lender_of(&self, slot: Slot) -> Option<SocketAddr> {
        self.locate(slot).and_then(|loc| self.lenders.get(loc.lender)).map(|s| s.addr)
    }

    fn trailer_len(&self) -> usize {
        self.trailer
    }

    fn seals_pages(&self) -> bool {
        false
    }

    fn distrust(&self, slot: Slot, why: &str) {
        if let Some(loc) = self.locate(slot) {
            self.mark_failed(loc.lender, why);
        }
    }

    /// Renews every live lender's lease; a lost session or connection marks the lender failed.
    fn maintain(&self) {
        for (i, s) in self.lenders.iter().enumerate() {
            if !s.is_alive() {
                continue;
            }
            let result = lock(&s.control).heartbeat();
            match result {
                Ok(_) => {}
                Err(ClientError::SessionExpired { .. }) => {
                    self.mark_failed(i, "its lease expired and our slabs were reclaimed")
                }
                Err(e) => self.mark_failed(i, &e.to_string()),
            }
        }
    }

    fn maintenance_period(&self) -> Duration {
        (self.min_lease() / 3).max(Duration::from_millis(50))
    }

    fn remote_pages(&self) -> u64 {
        self.lenders.iter().map(|s| s.pages.load(Ordering::Relaxed)).sum()
    }

    fn bookkeeping_bytes(&self) -> usize {
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner).len() * std::mem::size_of::<Slab>();
        let free: usize = self.lenders.iter().map(|s| lock(&s.slots).free.capacity() * 4).sum();
        slabs + free
    }

    fn lenders(&self) -> Vec<LenderInfo> {
        self.lenders
            .iter()
            .map(|s| LenderInfo { addr: s.addr, pages: s.pages.load(Ordering::Relaxed), alive: s.is_alive() })
            .collect()
    }

    fn release_all(&self) {
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner).clone();
        for slab in slabs {
            let s = &self.lenders[slab.server];
            if s.is_alive() {
                let _ = lock(&s.control).free_slab(slab.slab_id);
            }
        }
    }
}

fn make_slot(slab: usize, page: u32) -> Slot {
    Slot((u32::try_from(slab).unwrap_or(u32::MAX) << SLOT_PAGE_BITS) | page)
}
