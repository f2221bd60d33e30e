//! Page placement over memory servers: control sessions, slabs allocated on demand, remote slots
//! handed out round-robin over every live server (so pages spread over all of them), lease
//! heartbeats, and each thread's data endpoints.
//!
//! A slot names one 4 KiB place: `slab index << 20 | page in slab` (4096 slabs of up to 4 GiB).
//! Slots are handed out from each slab with a bump pointer; freed slots go to a per-server free
//! list, so the allocator costs nothing per used slot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use rdma::{Endpoint, EndpointOptions, ProviderKind};
use remote_mem_server::client::{ClientError, ClientOptions, ControlClient};

use crate::{PagerError, PAGE_SIZE};

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

/// A memory server as the pager sees it.
#[derive(Debug)]
pub struct ServerLink {
    /// Its address.
    pub addr: SocketAddr,
    control: Mutex<ControlClient>,
    alive: AtomicBool,
    full: AtomicBool,
    /// Slots currently holding (or reserved for) pages.
    pub pages: AtomicU64,
    slots: Mutex<ServerSlots>,
}

impl ServerLink {
    /// False once the server failed (connection lost, lease lost, timeout).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// Where a slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index of the server.
    pub server: usize,
    /// Remote address of the page.
    pub addr: u64,
    /// Key of its slab.
    pub rkey: u32,
}

/// All servers and slabs of one pager.
#[derive(Debug)]
pub struct Placement {
    servers: Vec<ServerLink>,
    slabs: RwLock<Vec<Slab>>,
    next_server: AtomicUsize,
    provider: ProviderKind,
    endpoint_options: EndpointOptions,
}

impl Placement {
    /// Opens a control session with every server; fails naming the first unreachable one.
    pub fn connect(
        servers: &[SocketAddr],
        provider: ProviderKind,
        client_id: u64,
        endpoint_options: EndpointOptions,
    ) -> Result<Self, PagerError> {
        if servers.is_empty() {
            return Err(PagerError::Config("no memory servers configured".into()));
        }
        let options = ClientOptions { client_id, provider, ..ClientOptions::default() };
        let mut links = Vec::with_capacity(servers.len());
        for &addr in servers {
            let control =
                ControlClient::connect(addr, &options).map_err(|source| PagerError::Server { addr, source })?;
            tracing::info!(%addr, lease = ?control.session().lease, "connected to memory-server");
            links.push(ServerLink {
                addr,
                control: Mutex::new(control),
                alive: AtomicBool::new(true),
                full: AtomicBool::new(false),
                pages: AtomicU64::new(0),
                slots: Mutex::new(ServerSlots::default()),
            });
        }
        Ok(Self {
            servers: links,
            slabs: RwLock::new(Vec::new()),
            next_server: AtomicUsize::new(0),
            provider,
            endpoint_options,
        })
    }

    /// The servers.
    pub fn servers(&self) -> &[ServerLink] {
        &self.servers
    }

    /// Opens one data endpoint per server for a thread (`None` for a server that is down).
    pub fn endpoints(&self) -> Result<Vec<Option<Endpoint>>, PagerError> {
        self.servers
            .iter()
            .map(|s| {
                if !s.is_alive() {
                    return Ok(None);
                }
                let mut c = lock(&s.control);
                c.connect_endpoint(self.provider, &self.endpoint_options)
                    .map(Some)
                    .map_err(|source| PagerError::Transport { addr: s.addr, source })
            })
            .collect()
    }

    /// Marks a server failed; its pages can no longer be fetched.
    pub fn mark_failed(&self, server: usize, why: &str) {
        if let Some(s) = self.servers.get(server) {
            if s.alive.swap(false, Ordering::AcqRel) {
                tracing::error!(
                    server = %s.addr,
                    pages = s.pages.load(Ordering::Relaxed),
                    "memory-server failed ({why}); its pages cannot be fetched and will raise SIGBUS"
                );
            }
        }
    }

    /// Reserves a slot on the next live server with room, allocating a slab if needed. `None`
    /// when every server is full or down.
    pub fn alloc_slot(&self) -> Option<u32> {
        let n = self.servers.len();
        for _ in 0..n {
            let i = self.next_server.fetch_add(1, Ordering::Relaxed) % n;
            let s = &self.servers[i];
            if !s.is_alive() {
                continue;
            }
            if let Some(slot) = self.slot_from(i) {
                s.pages.fetch_add(1, Ordering::Relaxed);
                return Some(slot);
            }
        }
        None
    }

    fn slot_from(&self, i: usize) -> Option<u32> {
        let s = &self.servers[i];
        let mut slots = lock(&s.slots);
        if let Some(slot) = slots.free.pop() {
            return Some(slot);
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
        let pages = u32::try_from(grant.len / PAGE_SIZE as u64).unwrap_or(0).min(1 << SLOT_PAGE_BITS);
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

    /// Returns a slot to its server's free list.
    pub fn free_slot(&self, slot: u32) {
        let slab = usize::try_from(slot >> SLOT_PAGE_BITS).unwrap_or(usize::MAX);
        let server = self.slabs.read().unwrap_or_else(PoisonError::into_inner).get(slab).map(|s| s.server);
        if let Some(i) = server {
            let s = &self.servers[i];
            s.pages.fetch_sub(1, Ordering::Relaxed);
            if s.is_alive() {
                lock(&s.slots).free.push(slot);
            }
        }
    }

    /// Where a slot lives.
    pub fn locate(&self, slot: u32) -> Option<Location> {
        let slab = usize::try_from(slot >> SLOT_PAGE_BITS).ok()?;
        let page = u64::from(slot & ((1 << SLOT_PAGE_BITS) - 1));
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner);
        let s = slabs.get(slab)?;
        Some(Location { server: s.server, addr: s.addr + page * PAGE_SIZE as u64, rkey: s.rkey })
    }

    /// Slabs held, and the bytes of slot bookkeeping (slab table and free lists).
    pub fn bookkeeping_bytes(&self) -> usize {
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner).len() * std::mem::size_of::<Slab>();
        let free: usize = self.servers.iter().map(|s| lock(&s.slots).free.capacity() * 4).sum();
        slabs + free
    }

    /// Slots in use over every server.
    pub fn remote_pages(&self) -> u64 {
        self.servers.iter().map(|s| s.pages.load(Ordering::Relaxed)).sum()
    }

    /// Renews every live server's lease; a lost session or connection marks the server failed.
    pub fn heartbeat(&self) {
        for (i, s) in self.servers.iter().enumerate() {
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

    /// The shortest lease over the servers.
    pub fn min_lease(&self) -> Duration {
        self.servers.iter().map(|s| lock(&s.control).session().lease).min().unwrap_or(Duration::from_secs(30))
    }

    /// Frees every slab on live servers (at shutdown).
    pub fn release_all(&self) {
        let slabs = self.slabs.read().unwrap_or_else(PoisonError::into_inner).clone();
        for slab in slabs {
            let s = &self.servers[slab.server];
            if s.is_alive() {
                let _ = lock(&s.control).free_slab(slab.slab_id);
            }
        }
    }
}

fn make_slot(slab: usize, page: u32) -> u32 {
    (u32::try_from(slab).unwrap_or(u32::MAX) << SLOT_PAGE_BITS) | page
}
