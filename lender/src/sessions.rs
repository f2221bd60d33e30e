//! Session bookkeeping of the memory-server: who holds which slabs, capacity accounting, and leases
//! (a session whose client stops renewing is reclaimed; its client id is remembered so that a
//! returning client learns its slabs are gone instead of trusting stale addresses).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use rdma::control::{ErrorCode, QpAddress, SessionOutcome, SlabGrant};
use rdma::shim::target::{MemoryRegistry, RegisteredMemory};
use rdma::verbs::{VerbsDevice, VerbsDomain, VerbsRegistration};

/// How many expired client ids are remembered.
const EXPIRED_MEMORY: usize = 65_536;

/// A refused control request: a typed code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Typed reason.
    pub code: ErrorCode,
    /// What the client should know or do.
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Fields drop in declaration order: verbs registrations before the domain, and both before the
/// slab mappings they cover.
#[derive(Debug)]
struct Session {
    session_id: u64,
    secret: u64,
    last_seen: Instant,
    verbs_slabs: HashMap<u64, VerbsRegistration>,
    verbs: Option<VerbsDomain>,
    slabs: HashMap<u64, RegisteredMemory>,
}

/// The result of a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloGrant {
    /// Session id.
    pub session_id: u64,
    /// Session secret (binds data connections).
    pub secret: u64,
    /// What happened to an earlier session.
    pub outcome: SessionOutcome,
}

/// A session reclaimed because its lease ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// The client whose session it was.
    pub client_id: u64,
    /// Slabs freed.
    pub slabs: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// Every session of one server.
#[derive(Debug)]
pub struct Sessions {
    registry: Arc<MemoryRegistry>,
    capacity: u64,
    slab_size: u64,
    lease: Duration,
    by_client: HashMap<u64, Session>,
    client_of_session: HashMap<u64, u64>,
    expired: HashSet<u64>,
    expired_order: VecDeque<u64>,
    allocated: u64,
    next_slab_id: u64,
    next_session_id: u64,
    /// Sessions reclaimed since start.
    pub leases_expired: u64,
    /// The RDMA device when the verbs provider is offered.
    verbs: Option<Arc<VerbsDevice>>,
}

impl Sessions {
    /// Empty bookkeeping for a server donating `capacity` bytes in slabs of `slab_size`.
    pub fn new(registry: Arc<MemoryRegistry>, capacity: u64, slab_size: u64, lease: Duration) -> Self {
        Self {
            registry,
            capacity,
            slab_size,
            lease,
            by_client: HashMap::new(),
            client_of_session: HashMap::new(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
            allocated: 0,
            next_slab_id: 1,
            next_session_id: fastrand::u64(1..u64::MAX / 2),
            leases_expired: 0,
            verbs: None,
        }
    }

    /// Serves the verbs provider on `device`: every session gets its own protection domain, its
    /// slabs are registered there and their grants carry the registration's rkey.
    pub fn enable_verbs(&mut self, device: Arc<VerbsDevice>) {
        self.verbs = Some(device);
    }

    /// The session's verbs domain, made on first use.
    fn domain<'s>(device: Option<&Arc<VerbsDevice>>, session: &'s mut Session) -> Result<&'s VerbsDomain, Refusal> {
        let Some(device) = device else {
            return Err(Refusal::new(ErrorCode::UnsupportedProvider, "this memory-server does not offer verbs"));
        };
        if session.verbs.is_none() {
            let domain = VerbsDomain::new(device).map_err(|e| {
                Refusal::new(ErrorCode::Other(100), format!("cannot set up verbs for the session: {e}"))
            })?;
            session.verbs = Some(domain);
        }
        session.verbs.as_ref().ok_or_else(|| Refusal::new(ErrorCode::Other(100), "no verbs domain"))
    }

    /// Makes a responder queue pair for the session, connected to the client's `qp`.
    pub fn verbs_accept(
        &mut self,
        client_id: u64,
        session_id: u64,
        qp: &QpAddress,
        now: Instant,
    ) -> Result<QpAddress, Refusal> {
        let device = self.verbs.clone();
        let session = self.session(client_id, session_id, now)?;
        let domain = Self::domain(device.as_ref(), session)?;
        domain
            .accept(qp)
            .map_err(|e| Refusal::new(ErrorCode::Other(100), format!("cannot connect the queue pair: {e}")))
    }

    /// Opens, resumes or replaces the session of `client_id`.
    pub fn hello(&mut self, client_id: u64, now: Instant) -> HelloGrant {
        if let Some(s) = self.by_client.get_mut(&client_id) {
            s.last_seen = now;
            return HelloGrant { session_id: s.session_id, secret: s.secret, outcome: SessionOutcome::Resumed };
        }
        let outcome = if self.expired.remove(&client_id) {
            self.expired_order.retain(|&c| c != client_id);
            SessionOutcome::Expired
        } else {
            SessionOutcome::New
        };
        let session_id = self.next_session_id;
        self.next_session_id += 1;
        let secret = fastrand::u64(..);
        self.by_client.insert(
            client_id,
            Session {
                session_id,
                secret,
                last_seen: now,
                verbs_slabs: HashMap::new(),
                verbs: None,
                slabs: HashMap::new(),
            },
        );
        self.client_of_session.insert(session_id, client_id);
        HelloGrant { session_id, secret, outcome }
    }

    fn session(&mut self, client_id: u64, session_id: u64, now: Instant) -> Result<&mut Session, Refusal> {
        match self.by_client.get_mut(&client_id) {
            Some(s) if s.session_id == session_id => {
                s.last_seen = now;
                Ok(s)
            }
            _ => Err(Refusal::new(
                ErrorCode::SessionExpired,
                format!(
                    "the session's lease ({} ms) ran out and its slabs were reclaimed; send a new HELLO",
                    self.lease.as_millis()
                ),
            )),
        }
    }

    /// Renews the lease of a session.
    pub fn touch(&mut self, client_id: u64, session_id: u64, now: Instant) -> Result<(), Refusal> {
        self.session(client_id, session_id, now).map(|_| ())
    }

    /// Allocates one slab for a session.
    pub fn alloc(&mut self, client_id: u64, session_id: u64, now: Instant) -> Result<SlabGrant, Refusal> {
        let (allocated, capacity, slab_size) = (self.allocated, self.capacity, self.slab_size);
        if allocated + slab_size > capacity {
            // Check the session first so an expired client hears about its lease, not capacity.
            self.session(client_id, session_id, now)?;
            return Err(Refusal::new(
                ErrorCode::CapacityExhausted,
                format!(
                    "capacity exhausted: {allocated} of {capacity} bytes handed out in slabs of {slab_size}; \
                     free slabs or add another memory-server"
                ),
            ));
        }
        let len = usize::try_from(slab_size)
            .map_err(|_| Refusal::new(ErrorCode::CapacityExhausted, "slab size does not fit in memory"))?;
        let map = MmapOptions::new().len(len).no_reserve_swap().map_anon().map_err(|e| {
            Refusal::new(ErrorCode::CapacityExhausted, format!("the server could not map a {slab_size}-byte slab: {e}"))
        })?;
        let slab_id = self.next_slab_id;
        let registry = Arc::clone(&self.registry);
        let device = self.verbs.clone();
        let session = self.session(client_id, session_id, now)?;
        let registered = registry.register(map, session.session_id);
        let mut grant = SlabGrant { slab_id, addr: registered.addr(), rkey: registered.rkey(), len: slab_size };
        if device.is_some() {
            let domain = Self::domain(device.as_ref(), session)?;
            let addr = registered.as_mut_ptr();
            // SAFETY: the slab's mapping lives in `session.slabs` until the slab is freed or the
            // session reclaimed, and its registration (in `verbs_slabs`, dropped first) goes before.
            let reg = unsafe { domain.register(addr, registered.len()) }.map_err(|e| {
                Refusal::new(ErrorCode::CapacityExhausted, format!("the server could not register the slab: {e}"))
            })?;
            grant.rkey = reg.rkey();
            session.verbs_slabs.insert(slab_id, reg);
        }
        session.slabs.insert(slab_id, registered);
        self.next_slab_id += 1;
        self.allocated += slab_size;
        Ok(grant)
    }

    /// Frees one slab of a session (deregistering it first, so no access can reach it after).
    pub fn free(&mut self, client_id: u64, session_id: u64, slab_id: u64, now: Instant) -> Result<(), Refusal> {
        let session = self.session(client_id, session_id, now)?;
        session.verbs_slabs.remove(&slab_id);
        let slab = session.slabs.remove(&slab_id).ok_or_else(|| {
            Refusal::new(ErrorCode::UnknownSlab, format!("slab {slab_id} is not one of this session's"))
        })?;
        self.allocated -= slab.len() as u64;
        drop(slab);
        Ok(())
    }

    /// True when `secret` opens live session `session_id`.
    pub fn check_secret(&self, session_id: u64, secret: u64) -> bool {
        self.client_of_session.get(&session_id).and_then(|c| self.by_client.get(c)).is_some_and(|s| s.secret == secret)
    }

    /// Reclaims every session not renewed within the lease.
    pub fn reap(&mut self, now: Instant) -> Vec<Reclaimed> {
        let lease = self.lease;
        let stale: Vec<u64> = self
            .by_client
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > lease)
            .map(|(&c, _)| c)
            .collect();
        let mut out = Vec::with_capacity(stale.len());
        for client_id in stale {
            let Some(session) = self.by_client.remove(&client_id) else { continue };
            self.client_of_session.remove(&session.session_id);
            let bytes: u64 = session.slabs.values().map(|s| s.len() as u64).sum();
            self.allocated -= bytes;
            out.push(Reclaimed { client_id, slabs: session.slabs.len(), bytes });
            drop(session);
            self.leases_expired += 1;
            if self.expired.insert(client_id) {
                self.expired_order.push_back(client_id);
            }
            while self.expired_order.len() > EXPIRED_MEMORY {
                if let Some(old) = self.expired_order.pop_front() {
                    self.expired.remove(&old);
                }
            }
        }
        out
    }

    /// Bytes handed out.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }
    /// Slabs handed out.
    pub fn slab_count(&self) -> usize {
        self.by_client.values().map(|s| s.slabs.len()).sum()
    }
    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(capacity: u64) -> Sessions {
        Sessions::new(MemoryRegistry::new(), capacity, 1 << 20, Duration::from_secs(1))
    }

    #[test]
    fn capacity_is_enforced_and_freed_memory_is_reusable() {
        let mut s = sessions(2 << 20);
        let now = Instant::now();
        let h = s.hello(7, now);
        assert_eq!(h.outcome, SessionOutcome::New);
        let a = s.alloc(7, h.session_id, now).expect("first slab");
        s.alloc(7, h.session_id, now).expect("second slab");
        let err = s.alloc(7, h.session_id, now).expect_err("full");
        assert_eq!(err.code, ErrorCode::CapacityExhausted);
        s.free(7, h.session_id, a.slab_id, now).expect("free");
        assert_eq!(s.free(7, h.session_id, a.slab_id, now).expect_err("twice").code, ErrorCode::UnknownSlab);
        s.alloc(7, h.session_id, now).expect("room again");
        assert_eq!(s.allocated(), 2 << 20);
    }

    #[test]
    fn leases_expire_and_the_client_is_told() {
        let mut s = sessions(4 << 20);
        let t0 = Instant::now();
        let h = s.hello(9, t0);
        s.alloc(9, h.session_id, t0).expect("slab");
        assert!(s.reap(t0 + Duration::from_millis(500)).is_empty());
        let reclaimed = s.reap(t0 + Duration::from_secs(2));
        assert_eq!(reclaimed, vec![Reclaimed { client_id: 9, slabs: 1, bytes: 1 << 20 }]);
        assert_eq!(s.allocated(), 0);
        assert!(!s.check_secret(h.session_id, h.secret));
        assert_eq!(s.alloc(9, h.session_id, t0).expect_err("gone").code, ErrorCode::SessionExpired);
        let again = s.hello(9, t0 + Duration::from_secs(3));
        assert_eq!(again.outcome, SessionOutcome::Expired);
        assert_ne!(again.session_id, h.session_id);
        assert_eq!(s.hello(9, t0 + Duration::from_secs(3)).outcome, SessionOutcome::Resumed);
    }

    #[test]
    fn sessions_are_isolated() {
        let mut s = sessions(4 << 20);
        let now = Instant::now();
        let a = s.hello(1, now);
        let b = s.hello(2, now);
        let slab = s.alloc(1, a.session_id, now).expect("slab");
        assert_eq!(s.free(2, b.session_id, slab.slab_id, now).expect_err("not b's").code, ErrorCode::UnknownSlab);
        assert_eq!(s.alloc(2, a.session_id, now).expect_err("wrong session").code, ErrorCode::SessionExpired);
        assert!(!s.check_secret(a.session_id, b.secret));
    }
}
