//! The remote page store: the one seam that owns *where a page lives and how it travels*.
//!
//! The fault path and the evictor never see an endpoint, a work request or a lender's address
//! arithmetic: they hand the store batches of pages, each named by a [`Slot`] and a place in a
//! local buffer, and get one outcome per page. Everything below is the store's business:
//! connections, request ids, batching per lender (everything is posted before anything is waited
//! for), deadlines, and the failure policy (what a timeout or a refused request means for the
//! lender).
//!
//! A store is shared by the pager's threads ([`PageStore`]); each thread doing I/O opens its own
//! [`PageIo`] (its connections and request ids), so the data path takes no lock.
//!
//! Implementations:
//! - [`LenderStore`]: each page on `memory-server` lenders (one copy, copies, or erasure-coded
//!   shards; round-robin over live ones), over the shim or verbs provider.
//! - [`MemoryStore`]: pages in this process's memory, with injectable failures; for unit tests
//!   of the fault and eviction logic and for measuring the pager without a network.
//! - [`SealedStore`]: a layer over another store that seals every page before it leaves
//!   (AES-256-GCM, a key that never leaves this process) and opens it when it comes back, so a
//!   lender can neither read a page nor change, swap or replay one unnoticed.
//! - [`BackupStore`]: a layer (below the sealing one) that writes every page behind to a
//!   farther backup server with a bounded lag, and reads a page back from it when every lender
//!   copy is gone.
//!
//! The lender store keeps each page in one copy, replicated, or erasure-coded ([`Redundancy`]): a
//! slot names a record of a group of slabs on distinct lenders, `place` picks the group, and
//! `read_pages` of a coded page decodes from the first shards to arrive.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdma::LocalRegion;

use crate::PagerError;

mod backup;
mod lenders;
mod memory;
mod sealed;

pub use backup::{BackupOptions, BackupStats, BackupStore};
pub use lenders::{proximity_weight, LenderStore, LenderStoreOptions, MAX_COPIES, MAX_LENDERS, NEAR_ENOUGH};
pub use memory::{MemoryStore, MemoryStoreFaults};
pub use sealed::SealedStore;

/// How the lenders keep each page so that losing some of them loses nothing (`--redundancy`,
/// `COALESCE_REDUNDANCY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redundancy {
    /// One copy: the loss of a lender loses its pages (their accesses get SIGBUS).
    None,
    /// `N` copies on `N` distinct lenders (2 to [`MAX_COPIES`]): a page survives the loss of
    /// `N - 1` of them.
    Replicate(usize),
    /// Reed-Solomon erasure coding: each page cut into `data` shards plus `parity` shards, each
    /// on its own lender (`data + parity` of them); any `data` shards rebuild the page, so it
    /// survives the loss of `parity` lenders, at `(data + parity) / data` times the memory.
    Erasure {
        /// Data shards (2 to [`MAX_DATA_SHARDS`]).
        data: usize,
        /// Parity shards (1 to [`MAX_PARITY_SHARDS`]).
        parity: usize,
    },
}

/// Most data shards of an erasure-coded page (`ec:K+M`: K).
pub const MAX_DATA_SHARDS: usize = 8;

/// Most parity shards of an erasure-coded page (`ec:K+M`: M).
pub const MAX_PARITY_SHARDS: usize = 4;

impl Redundancy {
    /// Distinct lenders each page is spread over (copies, or data plus parity shards).
    pub fn lenders(self) -> usize {
        match self {
            Self::None => 1,
            Self::Replicate(n) => n,
            Self::Erasure { data, parity } => data + parity,
        }
    }

    /// Lenders that may be lost without losing a page.
    pub fn tolerates(self) -> usize {
        match self {
            Self::None => 0,
            Self::Replicate(n) => n - 1,
            Self::Erasure { parity, .. } => parity,
        }
    }

    /// Remote bytes kept per byte of page (1.0 for `none`).
    pub fn memory_factor(self) -> f64 {
        match self {
            Self::None | Self::Replicate(_) => self.lenders() as f64,
            Self::Erasure { data, parity } => (data + parity) as f64 / data as f64,
        }
    }

    /// The default for `lenders` configured lenders: `replicate:2` from two lenders on, else
    /// `none`.
    pub fn default_for(lenders: usize) -> Self {
        if lenders >= 2 {
            Self::Replicate(2)
        } else {
            Self::None
        }
    }
}

impl std::str::FromStr for Redundancy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "none" {
            return Ok(Self::None);
        }
        if let Some(n) = s.strip_prefix("replicate:") {
            return match n.parse::<usize>() {
                Ok(n) if (2..=MAX_COPIES).contains(&n) => Ok(Self::Replicate(n)),
                _ => Err(format!("{s:?}: replicate:N takes N from 2 to {MAX_COPIES}")),
            };
        }
        if let Some(km) = s.strip_prefix("ec:") {
            let parsed =
                km.split_once('+').and_then(|(k, m)| Some((k.parse::<usize>().ok()?, m.parse::<usize>().ok()?)));
            return match parsed {
                Some((data, parity))
                    if (2..=MAX_DATA_SHARDS).contains(&data) && (1..=MAX_PARITY_SHARDS).contains(&parity) =>
                {
                    Ok(Self::Erasure { data, parity })
                }
                _ => Err(format!(
                    "{s:?}: ec:K+M takes K data shards from 2 to {MAX_DATA_SHARDS} and M parity shards from 1 \
                     to {MAX_PARITY_SHARDS} (e.g. ec:4+2)"
                )),
            };
        }
        Err(format!("{s:?} is not a redundancy: use none, replicate:N or ec:K+M"))
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Replicate(n) => write!(f, "replicate:{n}"),
            Self::Erasure { data, parity } => write!(f, "ec:{data}+{parity}"),
        }
    }
}

/// Bytes a store keeps beside each page in its slot when asked to ([`PageStore::trailer_len`]):
/// room for a sealing layer's authentication tag.
pub const TRAILER_LEN: usize = 16;

/// Which page a transfer carries, and which version of it: the page table's identity of the
/// bytes. A sealing layer binds the copy to it (a copy of another page, or an older version of
/// this one, fails to open); other stores ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageId {
    /// The region's id (never reused within a pager).
    pub region: u32,
    /// The page's index in the region.
    pub page: u32,
    /// How many times the page has been written out (each write-back takes a new one).
    pub version: u32,
}

/// The name of the place that holds one page's remote copy, handed out by a store. Its meaning
/// is private to the store (the page table keeps the 32 bits and gives them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(u32);

impl Slot {
    /// Wraps the raw bits kept in the page table.
    pub fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The raw bits, for the page table.
    pub fn raw(self) -> u32 {
        self.0
    }
}

/// One page to move between a slot and a local buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTransfer {
    /// Where the page lives (read) or goes (write).
    pub slot: Slot,
    /// Byte offset of the page in the local buffer (a multiple of the page size).
    pub offset: usize,
    /// Byte offset in the same buffer of the slot's [`TRAILER_LEN`] trailer bytes, moved with
    /// the page (only for stores made with trailers; `None`: the page alone).
    pub trailer: Option<usize>,
    /// The page and version these bytes are.
    pub id: PageId,
}

impl PageTransfer {
    /// A transfer of page `id` between `slot` and offset `offset`, without a trailer.
    pub fn page(slot: Slot, offset: usize, id: PageId) -> Self {
        Self { slot, offset, trailer: None, id }
    }
}

/// Why one page could not be read or written. The store has already applied its failure policy
/// (for a lender store: the lender is marked failed and its connection dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The slot names no place (a bug, or a slot of another store).
    #[error("the page table names no remote slot")]
    NoSuchSlot,
    /// The lender holding the slot is marked failed.
    #[error("the lender is marked failed")]
    LenderDown,
    /// No completion within the deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection was lost before the request completed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The lender refused the request (bad key or bounds: its copy is gone).
    #[error("the lender refused the request ({0}): its copy is gone")]
    Refused(String),
    /// The copy came back changed: it failed authentication (a flipped bit, another page's copy,
    /// or an older version of this page). The lender is no longer trusted.
    #[error("the copy failed authentication: the lender changed, swapped or replayed it")]
    Corrupt,
    /// The request could not be built or posted locally.
    #[error("{0}")]
    Local(String),
}

/// A lender as the pager reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LenderInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Slots it holds for this pager.
    pub pages: u64,
    /// False once it was marked failed.
    pub alive: bool,
    /// It is leaving (draining, or retired when its announcement was withdrawn): no new pages
    /// go to it and its pages move to the others.
    pub leaving: bool,
    /// Its smallest recent control round trip (`None`: not measured).
    pub rtt_min: Option<std::time::Duration>,
    /// Its median recent control round trip.
    pub rtt_median: Option<std::time::Duration>,
    /// Its placement weight: 1 for the nearest lenders, `(nearest / rtt)²` for farther ones.
    pub weight: f64,
}

/// Where pages live: allocation of places, lender health and bookkeeping. Shared by all threads.
pub trait PageStore: Send + Sync + fmt::Debug {
    /// Opens the I/O context of one thread (its connections and request ids).
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError>;

    /// Gives a slot back: the page no longer has a remote copy there.
    fn free(&self, slot: Slot);

    /// The lender that holds `slot`, for log lines and failure reports.
    fn lender_of(&self, slot: Slot) -> Option<SocketAddr>;

    /// Bytes kept beside each page in its slot for [`PageTransfer::trailer`] (0: none).
    fn trailer_len(&self) -> usize;

    /// Whether pages are sealed before they reach a lender.
    fn seals_pages(&self) -> bool;

    /// Bytes at the end of a buffer that a caller of [`PageIo::read_pages`] for up to `pages`
    /// pages should leave to the store (no page asked for may lie in them): a sealing store
    /// receives the tags there and opens each page where it landed, instead of copying it in
    /// and out of a buffer of its own. Without that room reads still work, through the copies.
    /// Default: 0.
    fn read_room(&self, _pages: usize) -> usize {
        0
    }

    /// Periodic upkeep (lease heartbeats); a lender that lost our session is marked failed.
    fn maintain(&self);

    /// How often [`PageStore::maintain`] must run.
    fn maintenance_period(&self) -> Duration;

    /// Slots in use.
    fn remote_pages(&self) -> u64;

    /// Bytes of local bookkeeping (slab tables, free lists).
    fn bookkeeping_bytes(&self) -> usize;

    /// The lenders and what each holds.
    fn lenders(&self) -> Vec<LenderInfo>;

    /// Gives every remote allocation back (at shutdown).
    fn release_all(&self);

    /// Opens the background repair of this store's redundancy (see [`PageRepair`]), run by the
    /// pager's repair thread; `None` (the default) when the store has nothing to repair.
    fn open_repair(self: Arc<Self>) -> Result<Option<Box<dyn PageRepair>>, PagerError> {
        Ok(None)
    }

    /// Remote pages that have fewer copies than asked for and can still be given them.
    fn repair_pending(&self) -> u64 {
        0
    }

    /// Pages whose copy came back changed and was refused (a sealing layer counts them, even
    /// when another copy then served the page); `None` when this store does not check copies.
    fn copies_rejected(&self) -> Option<u64> {
        None
    }

    /// Adds a lender while the store runs (discovered, or named later); stores with a fixed set
    /// of places refuse.
    fn add_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        Err(PagerError::Config(format!("this page store takes no new lenders (asked to add {addr})")))
    }

    /// Pages moved toward nearer lenders so far (`migrate.rs` of the lender store).
    fn migrated_pages(&self) -> u64 {
        0
    }

    /// Hot pages written to a nearer lender than their old slot's as they left local memory
    /// (`proximity.rs` of the lender store).
    fn hot_pages_moved_nearer(&self) -> u64 {
        0
    }

    /// Pages read again from another copy because the first was slow (hedged), and how many of
    /// those the second read brought first.
    fn hedged_reads(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Treats a lender as leaving (its registration expired, or it withdrew its announcement):
    /// no new pages go to it and its copies move to the other lenders while it still serves
    /// them, as in a drain. Unknown addresses are refused.
    fn retire_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        Err(PagerError::Config(format!("this page store has no lender {addr} to retire")))
    }

    /// Waits until every page written so far is in the backup tier and durable there (see
    /// [`BackupStore`]); at once for a store without one.
    fn checkpoint(&self, _timeout: Duration) -> Result<(), PagerError> {
        Ok(())
    }

    /// The backup tier's counters, when the store writes pages behind to one.
    fn backup_stats(&self) -> Option<BackupStats> {
        None
    }
}

/// Background re-replication: after a lender is lost, the pages it held a copy of get a new copy
/// on another lender, so that a later loss is survived too.
pub trait PageRepair: Send + fmt::Debug {
    /// Does up to `max_pages` pages of repair work; returns the pages copied (0: nothing to do
    /// now, or no lender to copy to).
    fn repair(&mut self, max_pages: usize) -> usize;
}

/// One thread's I/O on a store: batched reads and writes, each page with its own outcome.
pub trait PageIo: Send + fmt::Debug {
    /// Reads every page into `buf` at its offset: all requests are posted before any is waited
    /// for. `out` is cleared and gets one outcome per page, in order. The store may use the last
    /// [`PageStore::read_room`] bytes of `buf` during the call; a page that failed may be left
    /// with any bytes.
    fn read_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>);

    /// The service time the reads that follow should be served within (a region's objective),
    /// besides the store's own ([`lenders::LenderStoreOptions::hedge_within`]): a store that
    /// hedges reads hedges them sooner when the tighter of the two asks for it. `None`: the
    /// store's own alone. Stores that do not hedge ignore it.
    fn set_read_within(&mut self, _within: Option<Duration>) {}

    /// Writes every page from `buf` at its offset, as [`PageIo::read_pages`] reads. The bytes of
    /// `buf` must not change until this returns.
    fn write_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>);

    /// Whether the page in `slot` can still be read by this thread (a copy of it is on a lender
    /// that is alive and reachable).
    fn readable(&self, slot: Slot) -> bool;

    /// Whether every copy of the page in `slot` is still on a live, reachable lender. A clean
    /// page whose copy is not intact is written again (to a whole new place) before it is
    /// dropped: its redundancy is restored as it passes through local memory.
    fn intact(&self, slot: Slot) -> bool;

    /// Whether version `id` of a page is held outside the lenders (by a backup tier), so that a
    /// clean page whose lender copies are not intact may still leave local memory without being
    /// written: it keeps its slot and a fault reads it back from there. Default: no.
    fn held_elsewhere(&self, _id: PageId) -> bool {
        false
    }

    /// The copy of `slot` this thread read last came back changed (see
    /// [`TransferError::Corrupt`]): the store stops trusting whoever holds it (a lender store
    /// marks that lender failed; a later read goes to another copy, if there is one).
    fn distrust(&mut self, slot: Slot, why: &str);

    /// Where to write a page whose copy is now in `current` (`None`: it has none): `current` if
    /// it can still be written from this thread and is not much farther than a lender with room
    /// ([`PageIo::wants_nearer`]), else a new slot (`current` is then freed). `None` when no
    /// lender can take the page (all full or down).
    fn place(&mut self, current: Option<Slot>) -> Option<Slot>;

    /// True when the intact copy in `slot` of a page that was faulted back is much farther than
    /// a lender that could take it: the evictor then writes the page there even when it is
    /// clean ([`PageIo::place`] gives the new slot). Default: no.
    fn wants_nearer(&self, _slot: Slot) -> bool {
        false
    }
}
