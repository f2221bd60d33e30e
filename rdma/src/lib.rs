//! # Coalesce transport: a verbs-shaped, one-sided API, and the control protocol
//!
//! The control protocol between a borrower and a lender (its messages in [`control`], framing in
//! [`frame`], the client in [`client`]: hello, slabs, heartbeats, and opening a data endpoint of
//! either provider in one call) lives here beside the data path, so that the pager depends on
//! this crate and not on the lender's.
//!
//! One API for every provider, shaped like RDMA verbs: register local memory ([`LocalRegion`]),
//! connect an [`Endpoint`] (a reliable-connected queue pair with its completion queue), post
//! [`WorkRequest`]s (READ or WRITE of a scatter list of segments, many outstanding at once) and poll
//! tagged [`Completion`]s, blocking or busy-polling ([`PollMode`]).
//!
//! Providers:
//! - `shim` (always built): a software NIC over TCP. On the target a dedicated thread per connection
//!   plays the NIC ([`shim::target`]): it checks rkey, owner and bounds and copies, without calling
//!   server application code. It also emulates links ([`LinkProfile`]: delay, jitter, bandwidth) and
//!   measures each link's round trip ([`RttStats`]).
//! - `verbs` (libibverbs, cargo feature `verbs`): RC queue pairs with one-sided RDMA READ/WRITE on
//!   real RNICs and Soft-RoCE ([`verbs`]); queue pair addresses are exchanged over the control
//!   connection. Without the feature, or without libibverbs or a device at run time, asking for it
//!   gives [`TransportError::ProviderUnavailable`] naming what is missing.
//!
//! ```no_run
//! use std::time::Duration;
//! use rdma::{Endpoint, EndpointOptions, LocalRegion, LocalSlice, PollMode, Segment, WorkRequest};
//! # fn main() -> Result<(), rdma::TransportError> {
//! # let (addr, session_id, secret, remote_addr, rkey) = ("127.0.0.1:7470".parse().unwrap(), 1, 2, 0, 0);
//! // session id and secret come from the control hello, remote_addr and rkey from a slab grant.
//! let ep = Endpoint::connect_shim(addr, session_id, secret, &EndpointOptions::default())?;
//! let buf = LocalRegion::new(4096)?;
//! let seg = Segment { local: LocalSlice::new(&buf, 0, 4096)?, remote_addr, rkey };
//! ep.post(&WorkRequest::read(7, vec![seg]))?;
//! let mut done = Vec::new();
//! ep.wait(&mut done, 1, Duration::from_secs(1), PollMode::Block)?;
//! assert_eq!(done[0].wr_id, 7);
//! # Ok(()) }
//! ```
//!
//! # Wire format
//!
//! Every frame, on control and data connections alike, is a 12-byte header and a body. All integers
//! are little-endian. A frame with a bad magic, an unknown version, reserved flags set, a body longer
//! than 16 MiB + 64 KiB, an unknown kind, a truncated field or trailing bytes closes the connection
//! with a logged reason. A control peer first gets an `ERROR` frame (code 5 for a version mismatch).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"CLSC"` |
//! | 4 | 1 | version, `3` (version 2 added the resume proof to `HELLO`; version 3 the drain notice to `HEARTBEAT_ACK`) |
//! | 5 | 1 | kind (tables below) |
//! | 6 | 2 | flags, must be `0` |
//! | 8 | 4 | body length in bytes |
//!
//! A connection's first frame says what it is: `HELLO` opens a control connection, `DATA_CONNECT` a
//! data connection (one queue pair). Both go to the same port. Before a connection has proved a
//! session (a first frame), a body may be at most 4 KiB and the whole frame must arrive within the
//! server's handshake timeout; a body is read as its bytes arrive, never allocated up front from
//! the declared length.
//!
//! ## Data path (shim)
//!
//! | kind | name | direction | body |
//! |---|---|---|---|
//! | `0x40` | DATA_CONNECT | client -> target | session id u64, secret u64 |
//! | `0x41` | DATA_CONNECT_OK | target -> client | empty |
//! | `0x42` | DATA_CONNECT_REFUSED | target -> client | reason (u16 length + UTF-8) |
//! | `0x50` | READ | client -> target | wr_id u64, segment count u16 (1..=1024), reserved u16 = 0, then per segment: address u64, rkey u32, length u32 (>= 1) |
//! | `0x51` | WRITE | client -> target | as READ, then the payload: the segments' bytes concatenated |
//! | `0x52` | PING | client -> target | wr_id u64 |
//! | `0x58` | COMPLETION | target -> client | wr_id u64, status u8 (0 success, 1 remote access error, 2 invalid request), opcode u8 (1 read, 2 write, 3 ping), reserved u16 = 0, byte length u32, then for a successful READ the data |
//!
//! A request moves at most 16 MiB. The target answers every request with one completion, in order.
//! A segment whose rkey is unknown, belongs to another session, or whose range leaves its region
//! fails the whole request with status 1 before any byte is touched; the connection stays open.
//!
//! ## Control protocol
//!
//! | kind | name | direction | body |
//! |---|---|---|---|
//! | `0x01` | HELLO | client -> server | client id u64, provider u8 (1 shim, 2 verbs), resume u8 (0 none, 1: followed by session id u64 and its secret u64), token (u16 length + bytes, at most 1024) |
//! | `0x02` | HELLO_OK | server -> client | session id u64, secret u64, slab size u64, lease ms u64, outcome u8 (0 new, 1 resumed, 2 expired: earlier slabs were reclaimed) |
//! | `0x03` | ALLOC_SLAB | client -> server | empty |
//! | `0x04` | SLAB_GRANTED | server -> client | slab id u64, address u64, rkey u32, length u64 |
//! | `0x05` | FREE_SLAB | client -> server | slab id u64 |
//! | `0x06` | SLAB_FREED | server -> client | slab id u64 |
//! | `0x07` | HEARTBEAT | client -> server | empty |
//! | `0x08` | HEARTBEAT_ACK | server -> client | lease ms u64, leaving in ms u64 (0: not leaving; else the server is draining and leaves after this long) |
//! | `0x09` | STATS | client -> server | empty |
//! | `0x0A` | STATS_REPLY | server -> client | count u16, then that many u64 (see [`control::ServerStats`]; unknown extra fields are ignored) |
//! | `0x0B` | VERBS_CONNECT | client -> server | queue pair number u32, first PSN u32 (both below 2^24), GID (16 bytes): the client's RC queue pair |
//! | `0x0C` | VERBS_ACCEPTED | server -> client | the same fields for the server's queue pair, made in the session's protection domain and already connected to the client's |
//! | `0x10` | BACKUP_PUT | client -> server | count u16 (1..=64), then per page: region u32, page u32, version u32, data (u16 length + bytes, 1..=8192) |
//! | `0x11` | BACKUP_STORED | server -> client | count u32: the pages were appended to the backup log |
//! | `0x12` | BACKUP_GET | client -> server | region u32, page u32 |
//! | `0x13` | BACKUP_PAGE | server -> client | the newest backup of the page, as in BACKUP_PUT (one page) |
//! | `0x14` | BACKUP_SYNC | client -> server | empty: make every page stored so far durable |
//! | `0x15` | BACKUP_SYNCED | server -> client | empty |
//! | `0x16` | BACKUP_FORGET | client -> server | empty: drop every backup of this client id |
//! | `0x17` | BACKUP_FORGOTTEN | server -> client | pages dropped u64 |
//! | `0x0F` | ERROR | server -> client | code u16 (1 capacity exhausted, 2 unknown slab, 3 session expired, 4 bad request, 5 unsupported version, 6 unsupported provider, 7 shutting down, 8 session in use: the client id is live and the hello did not prove the session, 9 too many failures: the peer is refused for a while, 10 not found: no backup of that page), message (u16 length + UTF-8) |
//!
//! The `BACKUP_*` requests are served by a `memory-server --persist DIR` (others answer "bad
//! request"); backups are keyed by the client id of the session.
//!
//! Every control request renews the session's lease.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

pub mod client;
pub mod control;
pub mod frame;
pub mod ids;
pub mod link;
pub mod region;
pub mod secure;
pub mod shim;
mod sys;
#[cfg(feature = "verbs")]
pub mod verbs;
#[cfg(not(feature = "verbs"))]
#[path = "verbs_unavailable.rs"]
pub mod verbs;
pub mod wire;

pub use link::{LinkProfile, RttStats, SharedLink};
pub use region::{LocalRegion, LocalSlice};
pub use wire::Opcode;

/// Which data-path provider carries one-sided operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderKind {
    /// The software NIC over TCP.
    #[default]
    Shim,
    /// libibverbs (real RNIC or Soft-RoCE).
    Verbs,
}

impl ProviderKind {
    /// Wire value in the control hello.
    pub fn to_wire(self) -> u8 {
        match self {
            ProviderKind::Shim => 1,
            ProviderKind::Verbs => 2,
        }
    }
    /// Decodes the wire value.
    pub fn from_wire(v: u8) -> Result<Self, frame::FrameError> {
        match v {
            1 => Ok(ProviderKind::Shim),
            2 => Ok(ProviderKind::Verbs),
            _ => Err(frame::FrameError::Invalid { field: "provider", reason: format!("unknown provider {v}") }),
        }
    }
}

impl FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shim" => Ok(ProviderKind::Shim),
            "verbs" => Ok(ProviderKind::Verbs),
            other => Err(format!("unknown provider {other:?}: use shim or verbs")),
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Shim => "shim",
            ProviderKind::Verbs => "verbs",
        })
    }
}

/// Transport errors. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not reach the peer.
    #[error("cannot connect to {addr}: {source}; is a memory-server running and listening there?")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The target refused the data connection.
    #[error("the memory-server refused the data connection: {0}")]
    Refused(String),
    /// The peer sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] frame::FrameError),
    /// The connection is gone; outstanding requests completed as [`CompletionStatus::Flushed`].
    #[error("connection to {peer} lost; reconnect (outstanding requests were flushed)")]
    Disconnected {
        /// The peer.
        peer: SocketAddr,
    },
    /// Too many requests outstanding.
    #[error("{max} work requests already outstanding: poll completions before posting more")]
    QueueFull {
        /// The queue depth.
        max: usize,
    },
    /// A local slice does not fit its region.
    #[error("local range {offset}+{len} is outside the {region_len}-byte region")]
    LocalBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// Region length.
        region_len: usize,
    },
    /// A request or argument is not valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The provider cannot run here.
    #[error("provider {provider} is not available: {reason}")]
    ProviderUnavailable {
        /// The provider asked for.
        provider: ProviderKind,
        /// What is missing.
        reason: String,
    },
}

impl TransportError {
    /// True when the cause lies on this side (the provider cannot run here, or the request or its
    /// arguments are wrong), so trying the same peer again cannot help; false when it lies with
    /// the peer or the path to it (unreachable, refused, gone, or a system call on the connection).
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Self::ProviderUnavailable { .. }
                | Self::InvalidArgument(_)
                | Self::LocalBounds { .. }
                | Self::QueueFull { .. }
        )
    }
}

/// One segment of a work request: a local slice and the remote place of the same length.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Local bytes (destination of a READ, source of a WRITE).
    pub local: LocalSlice,
    /// Remote address.
    pub remote_addr: u64,
    /// Key of the remote region.
    pub rkey: u32,
}

/// A work request: one READ or WRITE over a scatter list, completed once.
#[derive(Debug, Clone)]
pub struct WorkRequest {
    /// Caller's tag, returned in the completion.
    pub wr_id: u64,
    /// [`Opcode::Read`] or [`Opcode::Write`].
    pub opcode: Opcode,
    /// Segments, 1 to 1024, at most 16 MiB in all.
    pub segments: Vec<Segment>,
}

impl WorkRequest {
    /// A READ of `segments`.
    pub fn read(wr_id: u64, segments: Vec<Segment>) -> Self {
        Self { wr_id, opcode: Opcode::Read, segments }
    }
    /// A WRITE of `segments`.
    pub fn write(wr_id: u64, segments: Vec<Segment>) -> Self {
        Self { wr_id, opcode: Opcode::Write, segments }
    }

    /// Checks the request's shape; returns its byte count.
    pub fn validate(&self) -> Result<usize, TransportError> {
        if self.opcode == Opcode::Ping {
            return Err(TransportError::InvalidArgument("use Endpoint::ping for a ping".into()));
        }
        if self.segments.is_empty() || self.segments.len() > wire::MAX_SEGMENTS {
            return Err(TransportError::InvalidArgument(format!(
                "{} segments: a work request takes 1 to {}",
                self.segments.len(),
                wire::MAX_SEGMENTS
            )));
        }
        let mut total = 0usize;
        for s in &self.segments {
            if s.local.len == 0 || u32::try_from(s.local.len).is_err() {
                return Err(TransportError::InvalidArgument(format!("segment length {} is not valid", s.local.len)));
            }
            s.local.region.check(s.local.offset, s.local.len)?;
            total = total.saturating_add(s.local.len);
        }
        if total > wire::MAX_TRANSFER {
            return Err(TransportError::InvalidArgument(format!(
                "{total} bytes in one request; the limit is {}",
                wire::MAX_TRANSFER
            )));
        }
        Ok(total)
    }
}

/// Outcome of a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionStatus {
    /// Done.
    Success,
    /// Bad rkey, bounds, or another session's region; nothing was touched.
    RemoteAccessError,
    /// The target could not execute the request; nothing was touched.
    RemoteInvalidRequest,
    /// The connection was lost before the request completed; its effect is unknown.
    Flushed,
}

/// A completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Tag of the work request.
    pub wr_id: u64,
    /// Operation.
    pub opcode: Opcode,
    /// Outcome.
    pub status: CompletionStatus,
    /// Bytes moved.
    pub byte_len: usize,
    /// Time from post to delivery (verbs: timed on one request in 16, zero on the others).
    pub rtt: Duration,
}

/// How `wait` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Sleep in the kernel until data arrives (cheapest CPU, one wake-up per wait).
    Block,
    /// Busy-poll until the deadline (lowest latency, burns a core).
    Spin,
    /// Poll for the given time, then block. On the shim each poll is followed by a yield of the
    /// CPU (`sched_yield`), taken at once by any thread that wants it (the lender's, when it
    /// runs on the same machine, or the program's, woken by the fault just served); on verbs
    /// the completion queue is busy-polled.
    SpinThenBlock(Duration),
}

/// Options of an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Link emulation applied to this endpoint.
    pub link: LinkProfile,
    /// Most work requests outstanding at once.
    pub max_outstanding: usize,
    /// Time allowed to connect and bind.
    pub connect_timeout: Duration,
    /// RDMA device of the verbs provider (`None`: the first one).
    pub device: Option<String>,
    /// The cluster key, for a lender that requires one: the connect (which carries the session
    /// secret) and its reply travel sealed ([`secure`]).
    pub key: Option<secure::ClusterKey>,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        Self {
            link: LinkProfile::loopback(),
            max_outstanding: 256,
            connect_timeout: Duration::from_secs(5),
            device: None,
            key: None,
        }
    }
}

/// A connected queue pair with its completion queue, of whichever provider.
#[derive(Debug)]
pub struct Endpoint {
    inner: Inner,
}

// Endpoints are few (one per thread and server) and never moved in hot paths: size is no concern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Inner {
    Shim(shim::endpoint::ShimEndpoint),
    Verbs(verbs::VerbsEndpoint),
}

impl Endpoint {
    /// Connects a shim endpoint to the memory-server at `addr`, bound to a session from the control
    /// hello.
    pub fn connect_shim(
        addr: SocketAddr,
        session_id: u64,
        secret: u64,
        options: &EndpointOptions,
    ) -> Result<Self, TransportError> {
        Ok(Self { inner: Inner::Shim(shim::endpoint::ShimEndpoint::connect(addr, session_id, secret, options)?) })
    }

    /// Connects a shim endpoint; for `verbs` use [`Endpoint::connect_verbs`], which needs the
    /// control connection to exchange queue pair addresses.
    pub fn connect(
        provider: ProviderKind,
        addr: SocketAddr,
        session_id: u64,
        secret: u64,
        options: &EndpointOptions,
    ) -> Result<Self, TransportError> {
        match provider {
            ProviderKind::Shim => Self::connect_shim(addr, session_id, secret, options),
            ProviderKind::Verbs => Err(TransportError::InvalidArgument(
                "a verbs endpoint is connected through the control session (ControlClient::connect_endpoint)".into(),
            )),
        }
    }

    /// Connects a verbs endpoint on `device` to the target at `peer`: `exchange` sends this
    /// side's queue pair address to the target and returns the target's.
    pub fn connect_verbs(
        device: &std::sync::Arc<verbs::VerbsDevice>,
        peer: SocketAddr,
        options: &EndpointOptions,
        exchange: impl FnOnce(control::QpAddress) -> Result<control::QpAddress, TransportError>,
    ) -> Result<Self, TransportError> {
        if !options.link.is_passthrough() {
            return Err(TransportError::InvalidArgument(
                "link emulation belongs to the shim provider; a verbs link is as fast as the NIC".into(),
            ));
        }
        Ok(Self {
            inner: Inner::Verbs(verbs::VerbsEndpoint::connect(device, peer, options.max_outstanding, exchange)?),
        })
    }

    /// The provider of this endpoint.
    pub fn provider(&self) -> ProviderKind {
        match &self.inner {
            Inner::Shim(_) => ProviderKind::Shim,
            Inner::Verbs(_) => ProviderKind::Verbs,
        }
    }

    /// Posts a work request. Its completion comes back through [`Endpoint::poll`] or
    /// [`Endpoint::wait`]; the local regions stay alive until then.
    pub fn post(&self, wr: &WorkRequest) -> Result<(), TransportError> {
        match &self.inner {
            Inner::Shim(e) => e.post(wr.wr_id, Some(wr)),
            Inner::Verbs(e) => e.post(wr),
        }
    }

    /// Posts a no-op that completes after one round trip (an RTT probe).
    /// Verbs endpoints have no ping (their RTT is measured on every request).
    pub fn ping(&self, wr_id: u64) -> Result<(), TransportError> {
        match &self.inner {
            Inner::Shim(e) => e.post(wr_id, None),
            Inner::Verbs(_) => Err(TransportError::InvalidArgument(
                "verbs endpoints have no ping; every request's round trip is recorded".into(),
            )),
        }
    }

    /// Appends up to `max` ready completions to `out` without blocking; returns how many.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        match &self.inner {
            Inner::Shim(e) => e.poll(out, max),
            Inner::Verbs(e) => e.poll(out, max),
        }
    }

    /// Waits up to `timeout` for completions (see [`PollMode`]); returns how many were appended,
    /// 0 on timeout.
    pub fn wait(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Duration,
        mode: PollMode,
    ) -> Result<usize, TransportError> {
        match &self.inner {
            Inner::Shim(e) => e.wait(out, max, timeout, mode),
            Inner::Verbs(e) => Ok(e.wait(out, max, timeout, mode)),
        }
    }

    /// Waits until any of `endpoints` may have a completion ready (then [`Endpoint::poll`] each),
    /// or `timeout` passes: one sleep for several queue pairs, instead of spinning over them.
    /// Shim endpoints wait on their sockets and verbs endpoints on their completion channels,
    /// all together; a verbs endpoint without a channel (`COALESCE_VERBS_WAIT=poll`) makes the
    /// wait at most 50 us.
    pub fn wait_any(endpoints: &[&Endpoint], timeout: Duration) -> Result<(), TransportError> {
        let mut shims = Vec::with_capacity(endpoints.len());
        let mut channels = Vec::new();
        let mut timeout = timeout;
        for e in endpoints {
            match &e.inner {
                Inner::Shim(s) => shims.push(s),
                Inner::Verbs(v) => match v.readiness() {
                    verbs::Readiness::Now => return Ok(()),
                    verbs::Readiness::Channel(fd) => channels.push(fd),
                    verbs::Readiness::Poll => timeout = timeout.min(Duration::from_micros(50)),
                },
            }
        }
        shim::endpoint::wait_any(&shims, channels, timeout)
    }

    /// Work requests posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        match &self.inner {
            Inner::Shim(e) => e.outstanding(),
            Inner::Verbs(e) => e.outstanding(),
        }
    }

    /// Blocking waits that slept until the device reported a completion (verbs endpoints, which
    /// sleep on a completion channel; 0 for shim endpoints, which sleep on their socket).
    pub fn completion_event_wakeups(&self) -> u64 {
        match &self.inner {
            Inner::Shim(_) => 0,
            Inner::Verbs(e) => e.event_wakeups(),
        }
    }

    /// Measured round trips of this link.
    pub fn rtt_stats(&self) -> RttStats {
        match &self.inner {
            Inner::Shim(e) => e.rtt_stats(),
            Inner::Verbs(e) => e.rtt_stats(),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        match &self.inner {
            Inner::Shim(e) => e.peer(),
            Inner::Verbs(e) => e.peer(),
        }
    }
}
