//! The target side of the software NIC: a registry of remotely accessible memory (rkey -> region,
//! owner) and the per-connection thread that executes one-sided READ/WRITE against it after the rkey,
//! owner and bounds checks, without calling into server application code.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::frame::{read_frame, ReadFrameError};
use crate::link::SharedLink;
use crate::wire::{
    decode_request, encode_completion, encode_read_completion_head, DataRequest, Opcode, RemoteSegment, RemoteStatus,
    KIND_DATA_CONNECT_OK, KIND_DATA_CONNECT_REFUSED,
};

mod read_payload;
use read_payload::ReadPayload;

/// READ payloads of at least this many bytes are sent straight from registered memory (one copy,
/// in the kernel); shorter ones are copied behind their head so that a burst of small responses
/// still goes out in one write.
const SEND_IN_PLACE_MIN: usize = 32 * 1024;

#[derive(Debug, Clone)]
struct RegionEntry {
    base: usize,
    len: usize,
    owner: u64,
    /// The mapping itself: a READ being sent from it keeps it mapped after deregistration.
    map: Arc<MmapMut>,
}

/// Counters of the target, shared by every data connection.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// READ requests executed.
    pub reads: AtomicU64,
    /// WRITE requests executed.
    pub writes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Requests refused for a bad rkey, owner or bounds.
    pub access_errors: AtomicU64,
    /// Connections closed for a malformed frame.
    pub malformed_connections: AtomicU64,
}

/// Memory that one-sided operations may reach, by rkey.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    regions: RwLock<HashMap<u32, RegionEntry>>,
    /// Counters of every connection served against this registry.
    pub stats: TargetStats,
}

/// A mapping registered for remote access. Dropping it deregisters the rkey first, so no new
/// access can reach the memory; it is unmapped then, or once the last READ being sent from it is
/// sent.
#[derive(Debug)]
pub struct RegisteredMemory {
    registry: Arc<MemoryRegistry>,
    rkey: u32,
    map: Arc<MmapMut>,
}

impl RegisteredMemory {
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    /// Remote address of the first byte.
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }
    /// Pointer to the first byte (for registering the slab with an RDMA device).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Drop for RegisteredMemory {
    fn drop(&mut self) {
        // Taking the write lock waits for every in-flight access to finish.
        let mut regions = self.registry.regions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        regions.remove(&self.rkey);
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers `map` for one-sided access by sessions whose id is `owner`. Each registration gets
    /// a fresh, unguessable rkey from the OS CSPRNG (an rkey alone grants nothing: every access
    /// is also checked against its owner session).
    pub fn register(self: &Arc<Self>, map: MmapMut, owner: u64) -> Result<RegisteredMemory, crate::ids::RandomError> {
        let mut regions = self.regions.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rkey = loop {
            let candidate = crate::ids::random_u32()?;
            if !regions.contains_key(&candidate) {
                break candidate;
            }
        };
        let map = Arc::new(map);
        regions.insert(rkey, RegionEntry { base: map.as_ptr() as usize, len: map.len(), owner, map: Arc::clone(&map) });
        drop(regions);
        Ok(RegisteredMemory { registry: Arc::clone(self), rkey, map })
    }

    /// Number of live registrations.
    pub fn len(&self) -> usize {
        self.regions.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves every segment to a local address, or fails without touching anything.
fn resolve(regions: &HashMap<u32, RegionEntry>, owner: u64, segments: &[RemoteSegment]) -> Option<Vec<(usize, usize)>> {
    segments
        .iter()
        .map(|s| {
            let e = regions.get(&s.rkey).filter(|e| e.owner == owner)?;
            let addr = usize::try_from(s.addr).ok()?;
            let len = usize::try_from(s.len).ok()?;
            let offset = addr.checked_sub(e.base)?;
            (offset.checked_add(len)? <= e.len).then_some((addr, len))
        })
        .collect()
}

/// What a data connection must prove before it may issue work requests, and for how long.
pub trait SessionCheck: Send + Sync {
    /// True when `secret` is the secret of live session `session_id`.
    fn check(&self, session_id: u64, secret: u64) -> bool;

    /// Called when a data connection from `peer` was refused for a wrong proof (a server counts
    /// these per peer to rate-limit guessing).
    fn refused(&self, _peer: SocketAddr) {}

    /// How long a data connection may stay silent before the server checks that its session is
    /// still alive (a connection does not outlive its session); also the longest pause allowed
    /// inside a frame.
    fn idle_check_period(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// Checks a DATA_CONNECT and encodes the reply frame to send (`DATA_CONNECT_OK`, or
/// `DATA_CONNECT_REFUSED` with a reason); true when the connection may go on.
pub fn connect_reply(session_id: u64, secret: u64, peer: SocketAddr, sessions: &dyn SessionCheck) -> (bool, Vec<u8>) {
    let mut out = Vec::new();
    if !sessions.check(session_id, secret) {
        sessions.refused(peer);
        tracing::warn!(%peer, session = %crate::ids::short(session_id), "refusing data connection: unknown session or wrong secret");
        crate::frame::encode_frame(&mut out, KIND_DATA_CONNECT_REFUSED, |e| {
            e.bytes16(b"unknown session or wrong secret; send a new hello on the control connection");
        });
        return (false, out);
    }
    crate::frame::encode_frame(&mut out, KIND_DATA_CONNECT_OK, |_| {});
    (true, out)
}

/// Serves a data connection whose DATA_CONNECT was already accepted and answered: executes
/// requests until the peer closes, sends a malformed frame, or stays silent after its session
/// ended.
///
/// With `link` (server-side link emulation), a second thread sends each response when the link
/// would deliver it (requests are stamped as they are read, so a pipeline keeps its overlap);
/// the link's profile may change while the connection runs.
pub fn serve_bound_connection(
    stream: TcpStream,
    session_id: u64,
    secret: u64,
    registry: &MemoryRegistry,
    sessions: &dyn SessionCheck,
    link: Option<&SharedLink>,
    poll_spin: Duration,
) {
    let Ok(peer) = stream.peer_addr() else { return };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(sessions.idle_check_period()));
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::with_capacity(256 * 1024, read_half);
    let mut writer = BufWriter::with_capacity(256 * 1024, stream);
    let conn = Connection { peer, session_id, secret, registry, sessions, poll_spin };
    tracing::debug!(%peer, session = %crate::ids::short(session_id), "data connection open");
    match link {
        None => {
            conn.serve(&mut reader, |out, payload, _, _, more_buffered| match payload {
                // A long READ payload goes from where it lies, behind the responses buffered so far.
                Some(p) if p.len() >= SEND_IN_PLACE_MIN => {
                    writer.flush().is_ok() && p.send(out, writer.get_ref().as_fd()).is_ok()
                }
                _ => {
                    if let Some(p) = payload {
                        p.append_to(out);
                    }
                    // Flush only when no further request is already buffered: responses to a
                    // burst go out in one write.
                    writer.write_all(out).is_ok() && (more_buffered || writer.flush().is_ok())
                }
            });
        }
        Some(link) => std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(Option<Instant>, Vec<u8>)>();
            let sender = std::thread::Builder::new()
                .name("link-emulation".into())
                .spawn_scoped(scope, || send_when_due(rx, &mut writer));
            if sender.is_err() {
                tracing::warn!(%peer, "cannot start the link emulation thread; closing the connection");
                return;
            }
            let mut follower = link.follower();
            conn.serve(&mut reader, |out, payload, arrival, request_len, _| {
                if let Some(p) = payload {
                    p.append_to(out);
                }
                let at = follower.deliver_at(arrival, request_len, out.len());
                tx.send((at, out.to_vec())).is_ok()
            });
            drop(tx);
        }),
    }
    let _ = writer.flush();
    let _ = writer.get_ref().shutdown(Shutdown::Both);
}

/// Sends each response once it is due, in order, until the channel closes or the peer is gone.
fn send_when_due(rx: std::sync::mpsc::Receiver<(Option<Instant>, Vec<u8>)>, writer: &mut BufWriter<TcpStream>) {
    while let Ok((at, out)) = rx.recv() {
        if let Some(at) = at {
            let now = Instant::now();
            if at > now {
                if writer.flush().is_err() {
                    return;
                }
                std::thread::sleep(at - now);
            }
        }
        if writer.write_all(&out).is_err() {
            return;
        }
        if writer.flush().is_err() {
            return;
        }
    }
}

/// One data connection as its serving thread sees it.
struct Connection<'a> {
    peer: SocketAddr,
    session_id: u64,
    secret: u64,
    registry: &'a MemoryRegistry,
    sessions: &'a dyn SessionCheck,
    /// How long to keep checking for the next request before sleeping (see
    /// [`spin_for_request`]).
    poll_spin: Duration,
}

impl Connection<'_> {
    /// Reads and executes requests, handing each encoded response to `respond` (with a READ's
    /// payload to send after it, the instant its request was read, the request's length and
    /// whether more requests are buffered); stops when `respond` returns false or the connection
    /// ends.
    fn serve(
        &self,
        reader: &mut BufReader<TcpStream>,
        mut respond: impl FnMut(&mut Vec<u8>, Option<&ReadPayload>, Instant, usize, bool) -> bool,
    ) {
        let (peer, shown_session) = (self.peer, crate::ids::short(self.session_id));
        let mut out = Vec::new();
        let mut body = Vec::new();
        loop {
            if reader.buffer().is_empty() && !self.poll_spin.is_zero() {
                spin_for_request(reader.get_ref(), self.poll_spin);
            }
            if !wait_for_frame(reader, peer, self.session_id, self.secret, self.sessions) {
                break;
            }
            let header = match read_frame(reader, &mut body) {
                Ok(h) => h,
                Err(ReadFrameError::Io(e)) => {
                    tracing::debug!(%peer, session = %shown_session, error = %e, "data connection closed");
                    break;
                }
                Err(ReadFrameError::Frame(e)) => {
                    self.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, session = %shown_session, reason = %e, "closing data connection: malformed frame");
                    break;
                }
            };
            let arrival = Instant::now();
            out.clear();
            let payload = match decode_request(header.kind, &body) {
                Ok(req) => execute(self.registry, self.session_id, &req, &mut out),
                Err(e) => {
                    self.registry.stats.malformed_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, session = %shown_session, kind = header.kind, reason = %e, "closing data connection: malformed request");
                    break;
                }
            };
            if !respond(&mut out, payload.as_ref(), arrival, body.len(), !reader.buffer().is_empty()) {
                break;
            }
        }
    }
}

/// Checks `stream` for the next request until one arrives or `spin` passes, yielding the CPU
/// between checks to any thread that wants it. A borrower faulting page after page then finds
/// this thread awake: in `recv` it would have slept, and its wake-up (an idle CPU's, tens of
/// microseconds in a VM) would have been part of every fault. Yielding keeps the spin from
/// delaying the borrower's own threads when they share the CPUs (a lender on loopback).
fn spin_for_request(stream: &TcpStream, spin: Duration) {
    let start = Instant::now();
    loop {
        // A readable socket, or one that cannot be polled: the blocking read that follows says
        // which.
        if !matches!(crate::sys::wait_fd(stream.as_fd(), false, Duration::ZERO), Ok(false)) {
            return;
        }
        if start.elapsed() >= spin {
            return;
        }
        std::thread::yield_now();
    }
}

/// Waits until the next frame starts arriving (true), or the connection ends (false): closed by
/// the peer, broken, or silent for a period after which its session is no longer alive.
fn wait_for_frame(
    reader: &mut BufReader<TcpStream>,
    peer: SocketAddr,
    session_id: u64,
    secret: u64,
    sessions: &dyn SessionCheck,
) -> bool {
    loop {
        if !reader.buffer().is_empty() {
            return true;
        }
        match reader.fill_buf() {
            Ok([]) => return false,
            Ok(_) => return true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if !sessions.check(session_id, secret) {
                    tracing::debug!(%peer, session = %crate::ids::short(session_id), "closing idle data connection: its session ended");
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Executes one request, encoding its response into `out`; a successful READ's payload is left
/// where it lies, returned for the caller to send after `out`.
fn execute(registry: &MemoryRegistry, owner: u64, req: &DataRequest<'_>, out: &mut Vec<u8>) -> Option<ReadPayload> {
    let stats = &registry.stats;
    match req {
        DataRequest::Ping { wr_id } => encode_completion(out, *wr_id, RemoteStatus::Success, Opcode::Ping, 0, |_| {}),
        DataRequest::Connect { .. } => {
            // A second connect on a bound connection is a protocol error reported as a bad request.
            encode_completion(out, 0, RemoteStatus::InvalidRequest, Opcode::Ping, 0, |_| {});
        }
        DataRequest::Read { wr_id, segments } => {
            let regions = registry.regions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(resolved) = resolve(&regions, owner, segments) else {
                stats.access_errors.fetch_add(1, Ordering::Relaxed);
                encode_completion(out, *wr_id, RemoteStatus::AccessError, Opcode::Read, 0, |_| {});
                return None;
            };
            // Every mapping the segments lie in (they resolved, so each rkey is registered).
            let mut mappings: Vec<Arc<MmapMut>> = Vec::new();
            for e in segments.iter().filter_map(|s| regions.get(&s.rkey)) {
                if !mappings.iter().any(|m| Arc::ptr_eq(m, &e.map)) {
                    mappings.push(Arc::clone(&e.map));
                }
            }
            drop(regions);
            let payload = ReadPayload::new(resolved, mappings);
            encode_read_completion_head(out, *wr_id, payload.len());
            stats.reads.fetch_add(1, Ordering::Relaxed);
            stats.bytes_read.fetch_add(payload.len() as u64, Ordering::Relaxed);
            return Some(payload);
        }
        DataRequest::Write { wr_id, segments, payload } => {
            let regions = registry.regions.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(resolved) = resolve(&regions, owner, segments) else {
                stats.access_errors.fetch_add(1, Ordering::Relaxed);
                encode_completion(out, *wr_id, RemoteStatus::AccessError, Opcode::Write, 0, |_| {});
                return None;
            };
            let mut at = 0;
            for &(addr, len) in &resolved {
                // SAFETY: bounds proved by `resolve`, mapping kept alive by the read lock (a
                // `RegisteredMemory` deregisters under the write lock before it unmaps). Concurrent
                // accesses to the same bytes by the same session give unspecified bytes, exactly
                // as with a NIC. The payload length equals the sum of the segment lengths (checked by the
                // decoder), so `payload[at..at + len]` is in bounds.
                unsafe { std::ptr::copy_nonoverlapping(payload[at..at + len].as_ptr(), addr as *mut u8, len) };
                at += len;
            }
            drop(regions);
            stats.writes.fetch_add(1, Ordering::Relaxed);
            stats.bytes_written.fetch_add(at as u64, Ordering::Relaxed);
            encode_completion(out, *wr_id, RemoteStatus::Success, Opcode::Write, at, |_| {});
        }
    }
    None
}

/// Reads the first frame of a fresh connection, for a dispatcher that accepts both control and data
/// connections on one port.
pub fn read_first_frame<R: Read>(stream: &mut R, body: &mut Vec<u8>) -> Result<u8, ReadFrameError> {
    read_frame(stream, body).map(|h| h.kind)
}
