//! One lender as the store sees it, and the states it goes through: opened (its distance probed
//! first), joined while the store runs, full, leaving (draining), failed, distrusted, and taken
//! back once it has moved its pages away. Its comeback after a failure is `revive.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdma::client::{ClientOptions, ControlClient};

use super::{hedge, lock, proximity, LenderStore, MAX_LENDERS, REVIVE_INTERVAL};
use crate::PagerError;

#[derive(Debug, Default)]
pub(super) struct ServerSlots {
    pub(super) free: Vec<u32>,
    /// (group index, next unused record) of the group being filled, led by this lender.
    pub(super) bump: Option<(usize, u32)>,
}

/// A lender as the store sees it.
#[derive(Debug)]
pub(super) struct Lender {
    pub(super) addr: SocketAddr,
    pub(super) control: Mutex<ControlClient>,
    pub(super) alive: AtomicBool,
    /// It refused us a slab: no new groups there until it is asked again (`FULL_RETRY`).
    pub(super) full: AtomicBool,
    /// When it last refused a slab, and whether that was said already (once until it has room).
    pub(super) full_at: Mutex<Option<Instant>>,
    pub(super) full_told: AtomicBool,
    /// The lender is draining (leaving on purpose): its copies are read but moved elsewhere.
    pub(super) leaving: AtomicBool,
    /// A copy it served came back changed: it is failed for good (never tried again).
    pub(super) distrusted: AtomicBool,
    /// Slots currently holding (or reserved for) pages.
    pub(super) pages: AtomicU64,
    pub(super) slots: Mutex<ServerSlots>,
    /// Bumped when the lender comes back with a new session: slabs of older generations are gone.
    pub(super) generation: AtomicU64,
    /// Bumped whenever the lender comes back: threads then reconnect their endpoints.
    pub(super) revivals: AtomicU64,
    pub(super) last_attempt: Mutex<Option<Instant>>,
    /// Its last control round trips (`proximity.rs`).
    pub(super) rtt: Mutex<proximity::RttWindow>,
    /// Its placement weight (`f64` bits; see `proximity.rs`), updated by the upkeep thread.
    pub(super) weight: AtomicU64,
    /// Its recent read service times (`hedge.rs`).
    pub(super) service: Mutex<hedge::ServiceTimes>,
}

impl Lender {
    /// False once the lender failed (connection lost, lease lost, timeout, refusal).
    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// It refused a slab (`why`): no new groups there for `FULL_RETRY`. Said once until it has
    /// room again.
    pub(super) fn mark_full(&self, why: &str) {
        self.full.store(true, Ordering::Release);
        *lock(&self.full_at) = Some(Instant::now());
        if !self.full_told.swap(true, Ordering::AcqRel) {
            tracing::warn!(server = %self.addr, "memory-server is full: {why}; asked again every {FULL_RETRY:?}");
        } else {
            tracing::debug!(server = %self.addr, "memory-server is still full: {why}");
        }
    }

    /// It granted a slab: it has room.
    pub(super) fn has_room(&self) {
        self.full_told.store(false, Ordering::Release);
    }

    /// Lets new groups try it again once it has been full for `FULL_RETRY` (other clients of
    /// its may have freed memory). Not a leaving lender: it stays full.
    pub(super) fn retry_if_full(&self) {
        let due = lock(&self.full_at).is_some_and(|at| at.elapsed() >= FULL_RETRY);
        if due && self.full.load(Ordering::Acquire) && !self.leaving.load(Ordering::Acquire) {
            self.full.store(false, Ordering::Release);
        }
    }
}

/// How long a lender that refused a slab is left alone before it is asked again.
const FULL_RETRY: Duration = Duration::from_secs(5);

impl LenderStore {
    /// Adds a lender while the store runs (a lender discovered, or named later): new groups
    /// use it at once, and so do repairs. Returns its index. A lender retired
    /// ([`PageStore::retire_lender`]) and still connected is taken back once its pages have
    /// moved away (before that the call fails, saying so).
    pub fn add_lender(&self, addr: SocketAddr) -> Result<usize, PagerError> {
        if let Some((i, s)) = self.lenders.iter().find(|(_, s)| s.addr == addr) {
            return self.reinstate(i, s);
        }
        let lender = open_lender(addr, &self.client_options)?;
        let i = self.lenders.push(lender).map_err(|_| {
            PagerError::Config(format!("cannot add memory-server {addr}: a pager uses at most {MAX_LENDERS} lenders"))
        })?;
        self.update_weights();
        if !self.lenders[i].is_alive() {
            return Ok(i);
        }
        tracing::info!(
            %addr,
            lenders = self.lenders.len(),
            weight = self.weight_of(i),
            "memory-server joined: new pages may go to it"
        );
        Ok(i)
    }

    /// Takes back lender `i`, retired earlier, if it holds nothing any more: a group placed on
    /// it while it held copies still to move could be copied away with a write in flight.
    fn reinstate(&self, i: usize, s: &Lender) -> Result<usize, PagerError> {
        let addr = s.addr;
        // SeqCst: see `LenderStore::healthy`.
        if !s.leaving.load(Ordering::SeqCst) || !s.is_alive() {
            return Err(PagerError::Config(format!("memory-server {addr} is a lender already")));
        }
        let pages = s.pages.load(Ordering::Acquire);
        if pages > 0 {
            return Err(PagerError::Config(format!(
                "memory-server {addr} is still moving its {pages} pages away; it rejoins once they have moved"
            )));
        }
        s.full.store(false, Ordering::Release);
        s.leaving.store(false, Ordering::SeqCst);
        self.update_weights();
        tracing::info!(%addr, weight = self.weight_of(i), "memory-server rejoined: new pages may go to it again");
        Ok(i)
    }

    /// Marks a lender leaving (it is draining): no new slabs there, and its copies move to the
    /// other lenders in the background while it still serves them.
    pub(super) fn mark_leaving(&self, lender: usize, leaving_in: Option<Duration>) {
        let s = &self.lenders[lender];
        s.full.store(true, Ordering::Release);
        if !s.leaving.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                server = %s.addr,
                pages = s.pages.load(Ordering::Relaxed),
                leaving_in = ?leaving_in,
                "memory-server is leaving (draining): moving its pages to the other lenders"
            );
        }
    }

    /// Fails a lender for good: a copy it served came back changed. It is never tried again,
    /// and its copies are rebuilt on the other lenders.
    pub(super) fn distrust_lender(&self, lender: usize, why: &str) {
        if let Some(s) = self.lenders.get(lender) {
            s.distrusted.store(true, Ordering::Release);
            self.mark_failed(lender, why);
        }
    }

    /// Times lender `i` came back (threads reconnect their endpoints when this moves).
    pub(super) fn revivals(&self, i: usize) -> u64 {
        self.lenders.get(i).map_or(0, |s| s.revivals.load(Ordering::Acquire))
    }

    /// Marks a lender failed; its pages can no longer be fetched.
    pub(super) fn mark_failed(&self, lender: usize, why: &str) {
        if let Some(s) = self.lenders.get(lender) {
            if s.alive.swap(false, Ordering::AcqRel) {
                let pages = s.pages.load(Ordering::Relaxed);
                // (No lock taken here: callers may hold a lender's slot lock.)
                if s.leaving.load(Ordering::Acquire) && pages == 0 {
                    tracing::info!(server = %s.addr, "memory-server left after draining ({why})");
                } else if self.code.is_some() {
                    tracing::error!(
                        server = %s.addr,
                        shards = pages,
                        "memory-server failed ({why}); its pages are rebuilt from their other shards"
                    );
                } else if self.width > 1 {
                    tracing::error!(
                        server = %s.addr,
                        pages,
                        "memory-server failed ({why}); its pages are read from their other copies"
                    );
                } else {
                    tracing::error!(
                        server = %s.addr,
                        pages,
                        "memory-server failed ({why}); its pages cannot be fetched and will raise SIGBUS"
                    );
                }
            }
        }
    }
}

/// Opens a control session with the lender at `addr`. A lender that cannot be reached or refuses
/// the session is an error; one that grants it and then does not answer the round-trip probe (a
/// stall, a lost connection) starts as failed, and is tried again like any failed lender.
pub(super) fn open_lender(addr: SocketAddr, client: &ClientOptions) -> Result<Lender, PagerError> {
    let mut control = ControlClient::connect(addr, client).map_err(|source| PagerError::Server { addr, source })?;
    // A stalled lender must not hold up the heartbeats of the others past their lease.
    let timeout = control_timeout(control.session().lease);
    control.set_timeout(timeout).map_err(|source| PagerError::Server { addr, source })?;
    // Its distance, measured before any page goes to it.
    let mut rtt = proximity::RttWindow::default();
    let mut probe_failure = None;
    for _ in 0..3 {
        let t = Instant::now();
        if let Err(e) = control.heartbeat() {
            probe_failure = Some(e);
            break;
        }
        rtt.record(t.elapsed());
    }
    let alive = probe_failure.is_none();
    match &probe_failure {
        None => tracing::info!(
            %addr,
            lease = ?control.session().lease,
            rtt_us = rtt.median().map_or(0, |t| t.as_micros()),
            "connected to memory-server"
        ),
        Some(e) => tracing::warn!(
            %addr,
            error = %e,
            "memory-server granted a session but did not answer its round-trip probe within {timeout:?}; \
             starting without it, and trying it again every {REVIVE_INTERVAL:?}"
        ),
    }
    Ok(Lender {
        addr,
        control: Mutex::new(control),
        alive: AtomicBool::new(alive),
        full: AtomicBool::new(false),
        full_at: Mutex::new(None),
        full_told: AtomicBool::new(false),
        leaving: AtomicBool::new(false),
        distrusted: AtomicBool::new(false),
        pages: AtomicU64::new(0),
        slots: Mutex::new(ServerSlots::default()),
        generation: AtomicU64::new(0),
        revivals: AtomicU64::new(0),
        // A lender failed at the probe is tried again after a full interval, not at once.
        last_attempt: Mutex::new((!alive).then(Instant::now)),
        rtt: Mutex::new(rtt),
        weight: AtomicU64::new(1f64.to_bits()),
        service: Mutex::new(hedge::ServiceTimes::default()),
    })
}

/// How long a control request may take: a quarter of the lease (100 ms to 5 s), so that the
/// heartbeats of every lender fit in a lease even when one of them stalls.
pub(super) fn control_timeout(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}
