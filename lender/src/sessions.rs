//! Session bookkeeping of the memory-server: who holds which slabs, capacity and quota accounting,
//! and leases (a session whose client stops renewing is reclaimed; a client that comes back with
//! the proof of a session that is gone learns that its slabs are gone, instead of trusting stale
//! addresses). Session ids and secrets come from the OS CSPRNG; a hello resumes a live session
//! only with that session's secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use rdma::control::{ErrorCode, QpAddress, SessionOutcome, SessionProof, SlabGrant};
use rdma::ids;
use rdma::shim::target::{MemoryRegistry, RegisteredMemory};
use rdma::verbs::{VerbsDevice, VerbsDomain, VerbsRegistration};

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

impl From<ids::RandomError> for Refusal {
    fn from(e: ids::RandomError) -> Self {
        Self::new(ErrorCode::Other(100), e.to_string())
    }
}

/// What the sessions of one server may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes handed out to all sessions together.
    pub capacity: u64,
    /// Size of each slab.
    pub slab_size: u64,
    /// A session not renewed for this long is reclaimed.
    pub lease: Duration,
    /// Bytes one session may hold (`None`: up to the capacity).
    pub quota: Option<u64>,
}

/// Fields drop in declaration order: verbs registrations before the domain, and both before the
/// slab mappings they cover.
struct Session {
    session_id: u64,
    secret: u64,
    last_seen: Instant,
    verbs_slabs: HashMap<u64, VerbsRegistration>,
    verbs: Option<VerbsDomain>,
    slabs: HashMap<u64, RegisteredMemory>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &ids::short(self.session_id))
            .field("secret", &"<hidden>")
            .field("last_seen", &self.last_seen)
            .field("slabs", &self.slabs.len())
            .finish_non_exhaustive()
    }
}

/// The result of a hello.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HelloGrant {
    /// Session id.
    pub session_id: u64,
    /// Session secret (binds data connections).
    pub secret: u64,
    /// What happened to an earlier session.
    pub outcome: SessionOutcome,
}

impl std::fmt::Debug for HelloGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloGrant")
            .field("session_id", &ids::short(self.session_id))
            .field("secret", &"<hidden>")
            .field("outcome", &self.outcome)
            .finish()
    }
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
    limits: Limits,
    by_client: HashMap<u64, Session>,
    client_of_session: HashMap<u64, u64>,
    allocated: u64,
    next_slab_id: u64,
    /// Sessions reclaimed since start.
    pub leases_expired: u64,
    /// The RDMA device when the verbs provider is offered.
    verbs: Option<Arc<VerbsDevice>>,
}

impl Sessions {
    /// Empty bookkeeping for a server donating what `limits` say.
    pub fn new(registry: Arc<MemoryRegistry>, limits: Limits) -> Self {
        Self {
            registry,
            limits,
            by_client: HashMap::new(),
            client_of_session: HashMap::new(),
            allocated: 0,
            next_slab_id: 1,
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

    /// Opens a session for `client_id`, or resumes its live one if `resume` proves it. A hello
    /// for a live client id without that proof is refused ([`ErrorCode::SessionInUse`]): it would
    /// otherwise hand the session's secret, and its memory, to whoever names the id. A `resume`
    /// of a session that is not here (its lease ran out, or the server restarted) gets a new
    /// session and [`SessionOutcome::Expired`]: the old slabs are gone.
    pub fn hello(&mut self, client_id: u64, resume: Option<SessionProof>, now: Instant) -> Result<HelloGrant, Refusal> {
        if let Some(s) = self.by_client.get_mut(&client_id) {
            let proven = resume.is_some_and(|p| p.session_id == s.session_id && ids::secrets_equal(p.secret, s.secret));
            if !proven {
                return Err(Refusal::new(
                    ErrorCode::SessionInUse,
                    "this client id belongs to a live session and the hello did not carry that session's \
                     secret; a new client must pick a new random id",
                ));
            }
            s.last_seen = now;
            return Ok(HelloGrant { session_id: s.session_id, secret: s.secret, outcome: SessionOutcome::Resumed });
        }
        let outcome = if resume.is_some() { SessionOutcome::Expired } else { SessionOutcome::New };
        let session_id = loop {
            let id = ids::random_u64()?;
            if !self.client_of_session.contains_key(&id) {
                break id;
            }
        };
        let secret = ids::random_u64()?;
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
        Ok(HelloGrant { session_id, secret, outcome })
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
                    self.limits.lease.as_millis()
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
        let Limits { capacity, slab_size, quota, .. } = self.limits;
        let allocated = self.allocated;
        if let Some(quota) = quota {
            let held: u64 = self.session(client_id, session_id, now)?.slabs.values().map(|m| m.len() as u64).sum();
            if held + slab_size > quota {
                return Err(Refusal::new(
                    ErrorCode::CapacityExhausted,
                    format!(
                        "quota reached: this client holds {held} bytes and may hold at most {quota} on this \
                         memory-server (--quota); free slabs or add another memory-server"
                    ),
                ));
            }
        }
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
        let registered = registry.register(map, session.session_id)?;
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

    /// True when `client_id` has a live session.
    pub fn has_session(&self, client_id: u64) -> bool {
        self.by_client.contains_key(&client_id)
    }

    /// True when `secret` opens live session `session_id`.
    pub fn check_secret(&self, session_id: u64, secret: u64) -> bool {
        self.client_of_session
            .get(&session_id)
            .and_then(|c| self.by_client.get(c))
            .is_some_and(|s| ids::secrets_equal(s.secret, secret))
    }

    /// Reclaims every session not renewed within the lease.
    pub fn reap(&mut self, now: Instant) -> Vec<Reclaimed> {
        let lease = self.limits.lease;
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

    fn sessions(capacity: u64, quota: Option<u64>) -> Sessions {
        let limits = Limits { capacity, slab_size: 1 << 20, lease: Duration::from_secs(1), quota };
        Sessions::new(MemoryRegistry::new(), limits)
    }

    fn proof(h: &HelloGrant) -> Option<SessionProof> {
        Some(SessionProof { session_id: h.session_id, secret: h.secret })
    }

    #[test]
    fn capacity_is_enforced_and_freed_memory_is_reusable() {
        let mut s = sessions(2 << 20, None);
        let now = Instant::now();
        let h = s.hello(7, None, now).expect("hello");
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
    fn a_quota_bounds_one_client_and_leaves_room_for_others() {
        let mut s = sessions(8 << 20, Some(2 << 20));
        let now = Instant::now();
        let a = s.hello(1, None, now).expect("hello");
        s.alloc(1, a.session_id, now).expect("first");
        s.alloc(1, a.session_id, now).expect("second");
        let err = s.alloc(1, a.session_id, now).expect_err("over quota");
        assert_eq!(err.code, ErrorCode::CapacityExhausted);
        assert!(err.message.contains("--quota"), "{}", err.message);
        let b = s.hello(2, None, now).expect("hello");
        s.alloc(2, b.session_id, now).expect("another client still gets room");
    }

    #[test]
    fn leases_expire_and_a_returning_client_is_told() {
        let mut s = sessions(4 << 20, None);
        let t0 = Instant::now();
        let h = s.hello(9, None, t0).expect("hello");
        s.alloc(9, h.session_id, t0).expect("slab");
        assert!(s.reap(t0 + Duration::from_millis(500)).is_empty());
        let reclaimed = s.reap(t0 + Duration::from_secs(2));
        assert_eq!(reclaimed, vec![Reclaimed { client_id: 9, slabs: 1, bytes: 1 << 20 }]);
        assert_eq!(s.allocated(), 0);
        assert!(!s.check_secret(h.session_id, h.secret));
        assert_eq!(s.alloc(9, h.session_id, t0).expect_err("gone").code, ErrorCode::SessionExpired);
        let again = s.hello(9, proof(&h), t0 + Duration::from_secs(3)).expect("hello");
        assert_eq!(again.outcome, SessionOutcome::Expired);
        assert_ne!(again.session_id, h.session_id);
        let resumed = s.hello(9, proof(&again), t0 + Duration::from_secs(3)).expect("resume");
        assert_eq!(resumed.outcome, SessionOutcome::Resumed);
        assert_eq!((resumed.session_id, resumed.secret), (again.session_id, again.secret));
    }

    #[test]
    fn a_live_session_is_resumed_only_with_its_secret() {
        let mut s = sessions(4 << 20, None);
        let now = Instant::now();
        let victim = s.hello(42, None, now).expect("hello");
        let slab = s.alloc(42, victim.session_id, now).expect("slab");
        // Naming the id alone, or with a wrong secret, or with another session's proof: refused.
        let wrong = Some(SessionProof { session_id: victim.session_id, secret: victim.secret ^ 1 });
        let other = s.hello(43, None, now).expect("hello");
        for attempt in [None, wrong, proof(&other)] {
            let err = s.hello(42, attempt, now).expect_err("takeover");
            assert_eq!(err.code, ErrorCode::SessionInUse);
        }
        // The victim's session is untouched.
        assert!(s.check_secret(victim.session_id, victim.secret));
        s.free(42, victim.session_id, slab.slab_id, now).expect("still the victim's");
    }

    #[test]
    fn sessions_are_isolated_and_ids_unpredictable() {
        let mut s = sessions(4 << 20, None);
        let now = Instant::now();
        let a = s.hello(1, None, now).expect("hello");
        let b = s.hello(2, None, now).expect("hello");
        let slab = s.alloc(1, a.session_id, now).expect("slab");
        assert_eq!(s.free(2, b.session_id, slab.slab_id, now).expect_err("not b's").code, ErrorCode::UnknownSlab);
        assert_eq!(s.alloc(2, a.session_id, now).expect_err("wrong session").code, ErrorCode::SessionExpired);
        assert!(!s.check_secret(a.session_id, b.secret));
        assert_ne!(b.session_id.wrapping_sub(a.session_id), 1, "session ids are not sequential");
        assert!(!format!("{a:?} {s:?}").contains(&a.secret.to_string()), "no secret in debug output");
    }
}
