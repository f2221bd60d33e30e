//! The memory-server's network side: one listening port, a thread per connection that reads the
//! first frame and becomes either a control session handler or a shim target, and a lease reaper.
//! Before a connection has proved a session, its first frame is bounded (4 KiB, complete within
//! the handshake timeout) and its address must be admitted ([`crate::peers`]); afterwards a
//! control connection is bounded per frame and idle time, and a data connection lives as long
//! as its session.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma::control::{self, ControlRequest, ControlResponse, ErrorCode, ServerStats, SessionProof};
use rdma::frame::{FrameError, ReadFrameError};
use rdma::ids::short;
use rdma::secure::KIND_NOISE_INIT;
use rdma::shim::target::{self, MemoryRegistry, SessionCheck};
use rdma::ProviderKind;

use crate::deadline::{is_timeout, read_frame_by, wait_for_data};
use crate::link::Link;
use crate::peers::{Admission, Peers, Refused};
use crate::sessions::{Limits, Refusal, Sessions};
use crate::{ServerConfig, ServerError};

/// Largest body of a connection's first frame (a HELLO with the longest token is about 1 KiB).
const MAX_FIRST_BODY: u32 = 4096;
/// Largest body of a later control request (all are small but backup puts).
const MAX_CONTROL_BODY: u32 = 4096;
/// Largest body of a later control request to a server that keeps backups (a `BACKUP_PUT` of
/// the most pages).
const MAX_BACKUP_BODY: u32 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    registry: Arc<MemoryRegistry>,
    sessions: Mutex<Sessions>,
    shutting_down: AtomicBool,
    /// Set while draining: the moment the server leaves (see [`ServerHandle::drain`]).
    leaving_at: Mutex<Option<Instant>>,
    connections: AtomicUsize,
    peers: Arc<Peers>,
    /// The backup log (`--persist`).
    backups: Option<crate::backup::Backups>,
    /// The emulated link (`--link`), changeable while the server runs.
    link: Option<rdma::SharedLink>,
}

impl Shared {
    /// Counts a failed proof by `peer`, and says so once when it goes past the limit.
    pub(crate) fn failed(&self, peer: SocketAddr, what: &str) {
        if self.peers.failed(peer.ip(), Instant::now()) {
            tracing::warn!(
                %peer,
                limit = crate::peers::FAILURE_LIMIT,
                window_s = crate::peers::FAILURE_WINDOW.as_secs(),
                refused_for_s = crate::peers::PENALTY.as_secs(),
                last = what,
                "too many failed attempts from this address: refusing its connections for a while"
            );
        }
    }

    /// When draining: how long until the server leaves.
    fn leaving_in(&self, now: Instant) -> Option<Duration> {
        let at = *self.leaving_at.lock().unwrap_or_else(PoisonError::into_inner);
        at.map(|at| at.saturating_duration_since(now))
    }

    fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> ServerStats {
        let s = self.sessions();
        let t = &self.registry.stats;
        let r = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (backup_pages, backup_log_bytes) = self.backups.as_ref().map_or((0, 0), crate::backup::Backups::usage);
        ServerStats {
            capacity: self.config.capacity,
            slab_size: self.config.slab_size,
            allocated: s.allocated(),
            slabs: s.slab_count() as u64,
            sessions: s.session_count() as u64,
            reads: r(&t.reads),
            writes: r(&t.writes),
            bytes_read: r(&t.bytes_read),
            bytes_written: r(&t.bytes_written),
            access_errors: r(&t.access_errors),
            leases_expired: s.leases_expired,
            malformed_connections: r(&t.malformed_connections),
            backup_pages,
            backup_log_bytes,
        }
    }
}

impl SessionCheck for Shared {
    fn check(&self, session_id: u64, secret: u64) -> bool {
        self.sessions().check_secret(session_id, secret)
    }

    fn refused(&self, peer: SocketAddr) {
        self.failed(peer, "data connection with a wrong session secret");
    }

    fn idle_check_period(&self) -> Duration {
        self.config.lease
    }
}

/// A running server. Dropping the handle does not stop it; call [`ServerHandle::shutdown`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    reaper: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data-path provider it offers.
    pub fn provider(&self) -> ProviderKind {
        self.shared.config.provider
    }

    /// Current statistics.
    pub fn stats(&self) -> ServerStats {
        self.shared.stats()
    }

    /// Emulates `profile` from now on on every connection, data and control (the lender moved).
    /// Fails when the server was started without link emulation ([`ServerConfig::link`]).
    pub fn set_link(&self, profile: rdma::LinkProfile) -> Result<(), String> {
        let link = self.shared.link.as_ref().ok_or("this memory-server was started without --link")?;
        tracing::info!(link = %profile, "link emulation changed");
        link.set(profile);
        Ok(())
    }

    /// Starts a drain: the server is leaving within `timeout`. It refuses new sessions and new
    /// slabs from now on, tells its clients (in every heartbeat reply) how long they have to move
    /// their pages elsewhere, and keeps serving their reads, writes and frees meanwhile. See
    /// [`ServerHandle::wait_drained`].
    pub fn drain(&self, timeout: Duration) {
        let now = Instant::now();
        let at = now.checked_add(timeout).unwrap_or(now + Duration::from_secs(86_400));
        *self.shared.leaving_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
        let s = self.shared.stats();
        tracing::info!(
            slabs = s.slabs,
            sessions = s.sessions,
            timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "draining: clients are moving their pages elsewhere; leaving when no slab is left or at the deadline"
        );
    }

    /// Waits until a drain is over: every slab was freed (true), or the deadline passed, or
    /// `stop` became true (false). Without a drain, returns at once whether no slab is held.
    pub fn wait_drained(&self, stop: &AtomicBool) -> bool {
        loop {
            let slabs = self.shared.sessions().slab_count();
            if slabs == 0 {
                return true;
            }
            let left = self.shared.leaving_in(Instant::now());
            if left.is_none_or(|d| d.is_zero()) || stop.load(Ordering::Acquire) {
                if left.is_some() {
                    tracing::warn!(slabs, "drain deadline reached with slabs still held: their pages are lost to clients without another copy");
                }
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops accepting connections and stops the reaper. Open connections are closed when the
    /// process exits.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(r) = &self.reaper {
            r.thread().unpark();
        }
        for t in [self.accept.take(), self.reaper.take()].into_iter().flatten() {
            let _ = t.join();
        }
        let s = self.shared.stats();
        tracing::info!(
            sessions = s.sessions,
            slabs = s.slabs,
            reads = s.reads,
            writes = s.writes,
            "memory-server stopped"
        );
    }
}

/// Binds the listening socket and starts serving in background threads.
pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let listener =
        TcpListener::bind(config.listen).map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let registry = MemoryRegistry::new();
    let limits =
        Limits { capacity: config.capacity, slab_size: config.slab_size, lease: config.lease, quota: config.quota };
    let mut sessions = Sessions::new(Arc::clone(&registry), limits);
    if config.provider == ProviderKind::Verbs {
        let device = rdma::verbs::VerbsDevice::open(config.device.as_deref()).map_err(ServerError::Verbs)?;
        tracing::info!(device = device.name(), "serving the verbs provider");
        sessions.enable_verbs(device);
    }
    let peers = Peers::new(config.max_connections_per_peer);
    let backups = match &config.persist {
        Some(dir) => {
            let (log, replay) = crate::persist::PageLog::open(dir, config.fsync_interval)?;
            tracing::info!(
                dir = %dir.display(),
                records = replay.records,
                pages = replay.pages,
                corrupt_records_skipped = replay.corrupt,
                torn_tail_bytes_dropped = replay.torn_bytes,
                "backup log replayed"
            );
            if replay.corrupt > 0 || replay.torn_bytes > 0 {
                tracing::warn!(
                    corrupt = replay.corrupt,
                    torn_bytes = replay.torn_bytes,
                    "the backup log had damaged records (skipped) or a torn tail (cut off)"
                );
            }
            Some(crate::backup::Backups::new(log, config.backup_expiry))
        }
        None => None,
    };
    let config_link = config.link.clone();
    let shared = Arc::new(Shared {
        config,
        registry,
        sessions: Mutex::new(sessions),
        shutting_down: AtomicBool::new(false),
        leaving_at: Mutex::new(None),
        connections: AtomicUsize::new(0),
        peers,
        backups,
        link: config_link.map(rdma::SharedLink::new),
    });
    tracing::info!(
        %addr,
        capacity = shared.config.capacity,
        slab_size = shared.config.slab_size,
        lease_ms = u64::try_from(shared.config.lease.as_millis()).unwrap_or(u64::MAX),
        provider = %shared.config.provider,
        "memory-server listening"
    );
    let s = Arc::clone(&shared);
    let accept = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&listener, &s))
        .map_err(|source| ServerError::Thread { source })?;
    let s = Arc::clone(&shared);
    let reaper = std::thread::Builder::new()
        .name("lease-reaper".into())
        .spawn(move || reap_loop(&s))
        .map_err(|source| ServerError::Thread { source })?;
    Ok(ServerHandle { addr, shared, accept: Some(accept), reaper: Some(reaper) })
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let (mut stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let admission = match shared.peers.admit(peer.ip(), Instant::now()) {
            Ok(a) => a,
            Err(Refused::Penalised) => {
                tracing::debug!(%peer, "refusing connection: too many failed attempts from this address");
                let msg = "too many failed attempts from this address; try again later";
                send_error(&mut stream, ErrorCode::TooManyFailures, msg);
                continue;
            }
            Err(Refused::TooManyConnections) => {
                let limit = shared.config.max_connections_per_peer;
                tracing::warn!(%peer, limit, "refusing connection: this address holds --max-connections-per-peer");
                let msg = format!("this address holds {limit} connections already (--max-connections-per-peer)");
                send_error(&mut stream, ErrorCode::BadRequest, &msg);
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::take(shared, admission) else {
            tracing::warn!(%peer, limit = shared.config.max_connections, "refusing connection: too many open connections");
            continue;
        };
        // The slot is released when the thread ends, however it ends (a panic unwinds through
        // it), or here if the thread cannot start (the closure owning it is dropped).
        let spawned = std::thread::Builder::new().name(format!("conn-{peer}")).spawn(move || {
            serve(stream, peer, &slot.shared);
            drop(slot);
        });
        if let Err(e) = spawned {
            tracing::error!(%peer, error = %e, "cannot spawn a connection thread");
        }
    }
}

/// One of the `--max-connections` connection slots (and its address's admission), held by a
/// connection's thread. Failure policy of the lender: a panic on a connection thread (a bug:
/// nothing a peer sends may cause one) ends that connection only; the slot is released as the
/// panic unwinds, the panic message goes to stderr, and the lender goes on serving everyone else.
struct ConnectionSlot {
    shared: Arc<Shared>,
    _admission: Admission,
}

impl ConnectionSlot {
    /// Takes a slot, or `None` when all are in use.
    fn take(shared: &Arc<Shared>, admission: Admission) -> Option<Self> {
        let limit = shared.config.max_connections;
        let mut cur = shared.connections.load(Ordering::Acquire);
        loop {
            if cur >= limit {
                return None;
            }
            match shared.connections.compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Self { shared: Arc::clone(shared), _admission: admission }),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn reap_loop(shared: &Shared) {
    let period = (shared.config.lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    while !shared.shutting_down.load(Ordering::Acquire) {
        std::thread::park_timeout(period);
        shared.peers.prune(Instant::now());
        if let Some(b) = &shared.backups {
            b.sync_if_due();
            b.expire(Instant::now(), |client| shared.sessions().has_session(client));
        }
        for r in shared.sessions().reap(Instant::now()) {
            tracing::info!(
                client = %short(r.client_id),
                slabs = r.slabs,
                bytes = r.bytes,
                "lease expired: reclaimed the client's slabs"
            );
        }
    }
}

fn send_error(stream: &mut TcpStream, code: ErrorCode, message: &str) {
    let mut out = Vec::new();
    control::encode_response(&mut out, &ControlResponse::Error { code, message: message.into() });
    let _ = stream.write_all(&out);
}

fn serve(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(shared.config.handshake_timeout));
    let within = shared.config.handshake_timeout;
    let mut link = Link { stream, channel: None };
    let mut body = Vec::new();
    let mut first = read_frame_by(&link.stream, &mut body, MAX_FIRST_BODY, within);
    if let Ok(h) = &first {
        if h.kind == KIND_NOISE_INIT || shared.config.key.is_some() {
            if !link.authenticate(h.kind, &body, peer, shared) {
                return;
            }
            first = link.recv(&mut body, MAX_FIRST_BODY, within);
        }
    }
    let header = match first {
        Ok(h) => h,
        Err(ReadFrameError::Io(e)) if is_timeout(&e) => {
            tracing::debug!(%peer, error = %e, "closing connection: no complete first frame in time");
            return;
        }
        Err(ReadFrameError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "connection closed before its first frame");
            return;
        }
        Err(ReadFrameError::Frame(e)) => {
            shared.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, reason = %e, "closing connection: malformed first frame");
            link.send_error(error_code(&e), &e.to_string());
            return;
        }
    };
    if header.kind == rdma::wire::KIND_DATA_CONNECT {
        match rdma::wire::decode_request(header.kind, &body) {
            Ok(rdma::wire::DataRequest::Connect { session_id, secret }) => {
                let _ = link.stream.set_write_timeout(None);
                // On a sealed connection the reply goes back sealed; the data path itself is
                // plain (pages are sealed by their owner).
                let (accepted, reply) = target::connect_reply(session_id, secret, peer, shared.as_ref());
                if link.send(&reply).is_ok() && accepted {
                    target::serve_bound_connection(
                        link.stream,
                        session_id,
                        secret,
                        &shared.registry,
                        shared.as_ref(),
                        shared.link.as_ref(),
                        shared.config.poll_spin,
                    );
                }
            }
            Ok(_) | Err(_) => {
                shared.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "closing connection: malformed data connect");
            }
        }
        return;
    }
    match control::decode_request(header.kind, &body) {
        Ok(ControlRequest::Hello { client_id, provider, resume, token }) => {
            let hello = Hello { client_id, provider, resume, token_bytes: token.len() };
            serve_control(link, peer, shared, &hello);
        }
        Ok(_) => {
            tracing::warn!(%peer, kind = header.kind, "closing connection: the first request must be HELLO");
            link.send_error(ErrorCode::BadRequest, "send HELLO first");
        }
        Err(e) => {
            shared.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, kind = header.kind, reason = %e, "closing connection: malformed first frame");
            link.send_error(ErrorCode::BadRequest, &e.to_string());
        }
    }
}

/// The error code that tells a peer why its frame was refused.
fn error_code(e: &FrameError) -> ErrorCode {
    match e {
        FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::BadRequest,
    }
}

/// What a control connection's HELLO asked for.
struct Hello {
    client_id: u64,
    provider: ProviderKind,
    resume: Option<SessionProof>,
    token_bytes: usize,
}

fn serve_control(mut link: Link, peer: SocketAddr, shared: &Shared, hello: &Hello) {
    let mut out = Vec::new();
    let provider = hello.provider;
    if provider != shared.config.provider {
        tracing::warn!(%peer, %provider, "refusing hello: provider not offered");
        let msg = format!(
            "this memory-server offers provider {}, not {provider}; connect with --provider {}",
            shared.config.provider, shared.config.provider
        );
        link.send_error(ErrorCode::UnsupportedProvider, &msg);
        return;
    }
    let client_id = hello.client_id;
    if hello.resume.is_none() && shared.leaving_in(Instant::now()).is_some() {
        tracing::info!(%peer, "refusing hello: draining");
        link.send_error(ErrorCode::ShuttingDown, "this memory-server is leaving (draining); use another one");
        return;
    }
    let grant = match shared.sessions().hello(client_id, hello.resume, Instant::now()) {
        Ok(g) => g,
        Err(r) => {
            if r.code == ErrorCode::SessionInUse {
                shared.failed(peer, "hello for a live session without its secret");
            }
            tracing::warn!(%peer, client = %short(client_id), code = ?r.code, "refusing hello: {}", r.message);
            link.send_error(r.code, &r.message);
            return;
        }
    };
    tracing::info!(
        %peer,
        client = %short(client_id),
        session = %short(grant.session_id),
        outcome = ?grant.outcome,
        token_bytes = hello.token_bytes,
        "client hello"
    );
    let lease_ms = u64::try_from(shared.config.lease.as_millis()).unwrap_or(u64::MAX);
    control::encode_response(
        &mut out,
        &ControlResponse::HelloOk {
            session_id: grant.session_id,
            secret: grant.secret,
            slab_size: shared.config.slab_size,
            lease_ms,
            outcome: grant.outcome,
        },
    );
    if link.send(&out).is_err() {
        return;
    }
    // A client that neither heartbeats nor talks for three leases is gone: free the thread. A
    // frame, once started, must arrive complete within the handshake timeout.
    let idle = (shared.config.lease * 3).max(Duration::from_secs(5));
    let max_body = if shared.backups.is_some() { MAX_BACKUP_BODY } else { MAX_CONTROL_BODY };
    let session_id = grant.session_id;
    let mut body = Vec::new();
    let mut follower = shared.link.as_ref().map(rdma::SharedLink::follower);
    loop {
        let header = match wait_for_data(&link.stream, idle).map_err(ReadFrameError::Io).and_then(|open| {
            if open {
                link.recv(&mut body, max_body, shared.config.handshake_timeout)
            } else {
                Err(ReadFrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            }
        }) {
            Ok(h) => h,
            Err(ReadFrameError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "control connection closed");
                return;
            }
            Err(ReadFrameError::Frame(e)) => {
                shared.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, reason = %e, "closing control connection: malformed frame");
                link.send_error(error_code(&e), &e.to_string());
                return;
            }
        };
        let request = match control::decode_request(header.kind, &body) {
            Ok(r) => r,
            Err(e) => {
                shared.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, kind = header.kind, reason = %e, "closing control connection: malformed request");
                link.send_error(ErrorCode::BadRequest, &e.to_string());
                return;
            }
        };
        let arrival = Instant::now();
        let response = handle(shared, client_id, session_id, request, peer);
        out.clear();
        control::encode_response(&mut out, &response);
        if let Some(at) = follower.as_mut().and_then(|f| f.deliver_at(arrival, body.len(), out.len())) {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        if link.send(&out).is_err() {
            return;
        }
    }
}

fn refusal(r: Refusal) -> ControlResponse {
    ControlResponse::Error { code: r.code, message: r.message }
}

fn handle(shared: &Shared, client_id: u64, session_id: u64, req: ControlRequest, peer: SocketAddr) -> ControlResponse {
    let now = Instant::now();
    if shared.shutting_down.load(Ordering::Acquire) {
        return refusal(Refusal {
            code: ErrorCode::ShuttingDown,
            message: "the memory-server is shutting down".into(),
        });
    }
    match req {
        ControlRequest::Hello { .. } => ControlResponse::Error {
            code: ErrorCode::BadRequest,
            message: "HELLO was already sent on this connection".into(),
        },
        ControlRequest::AllocSlab if shared.leaving_in(now).is_some() => refusal(Refusal {
            code: ErrorCode::ShuttingDown,
            message: "this memory-server is leaving (draining): no new slabs; allocate elsewhere".into(),
        }),
        ControlRequest::AllocSlab => match shared.sessions().alloc(client_id, session_id, now) {
            Ok(g) => {
                tracing::debug!(%peer, slab_id = g.slab_id, rkey = g.rkey, "slab allocated");
                ControlResponse::SlabGranted(g)
            }
            Err(r) => {
                tracing::info!(%peer, code = ?r.code, "slab allocation refused: {}", r.message);
                refusal(r)
            }
        },
        ControlRequest::FreeSlab { slab_id } => match shared.sessions().free(client_id, session_id, slab_id, now) {
            Ok(()) => ControlResponse::SlabFreed { slab_id },
            Err(r) => refusal(r),
        },
        ControlRequest::Heartbeat => match shared.sessions().touch(client_id, session_id, now) {
            Ok(()) => ControlResponse::HeartbeatAck {
                lease_ms: u64::try_from(shared.config.lease.as_millis()).unwrap_or(u64::MAX),
                leaving_in_ms: shared.leaving_in(now).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
            },
            Err(r) => refusal(r),
        },
        ControlRequest::Stats => {
            let _ = shared.sessions().touch(client_id, session_id, now);
            ControlResponse::Stats(shared.stats())
        }
        req @ (ControlRequest::BackupPut { .. }
        | ControlRequest::BackupGet { .. }
        | ControlRequest::BackupSync
        | ControlRequest::BackupForget) => {
            if let Err(r) = shared.sessions().touch(client_id, session_id, now) {
                return refusal(r);
            }
            match &shared.backups {
                Some(b) => b.handle(client_id, req, peer),
                None => ControlResponse::Error {
                    code: ErrorCode::BadRequest,
                    message: "this memory-server keeps no backups: start it with --persist DIR".into(),
                },
            }
        }
        ControlRequest::VerbsConnect { qp } => match shared.sessions().verbs_accept(client_id, session_id, &qp, now) {
            Ok(local) => {
                tracing::debug!(%peer, client_qpn = qp.qpn, server_qpn = local.qpn, "verbs queue pair connected");
                ControlResponse::VerbsAccepted { qp: local }
            }
            Err(r) => {
                tracing::warn!(%peer, "verbs connect refused: {}", r.message);
                refusal(r)
            }
        },
    }
}
