//! The initiator side of the software NIC: one TCP connection plays a reliable-connected queue pair
//! with its completion queue. Posting encodes and sends a work request; polling receives completions,
//! scatters READ data into the local regions, applies link emulation and records round trips.
//!
//! Completions come back in post order (as on an RC QP). Any thread may post or poll; a poll
//! delivers whichever completions are ready. A send that would block drains the receive side first,
//! so a poster never deadlocks against a peer that waits for its responses to be read.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::frame::{read_frame, Decoder, HEADER_LEN};
use crate::link::{LinkModel, RttRecorder, RttStats};
use crate::region::LocalSlice;
use crate::sys;
use crate::wire::{self, Opcode, RemoteSegment};
use crate::{Completion, CompletionStatus, EndpointOptions, PollMode, TransportError, WorkRequest};

mod receive;

use receive::DirectRead;

#[derive(Debug)]
struct Pending {
    seq: u64,
    wr_id: u64,
    opcode: Opcode,
    posted: Instant,
    deliver_at: Option<Instant>,
    local: Vec<LocalSlice>,
    expected_len: usize,
}

#[derive(Debug)]
struct Held {
    deliver_at: Option<Instant>,
    posted: Instant,
    completion: Completion,
}

#[derive(Debug)]
struct SendState {
    buf: Vec<u8>,
    link: LinkModel,
}

#[derive(Debug, Default)]
struct RecvState {
    rx: Vec<u8>,
    held: VecDeque<Held>,
    /// A READ whose payload is being received straight into its local slices.
    direct: Option<DirectRead>,
}

/// A shim queue pair connected to one memory-server's target.
#[derive(Debug)]
pub struct ShimEndpoint {
    stream: TcpStream,
    peer: SocketAddr,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
    pending: Mutex<VecDeque<Pending>>,
    rtt: Mutex<RttRecorder>,
    broken: AtomicBool,
    outstanding: AtomicUsize,
    next_seq: AtomicU64,
    max_outstanding: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ShimEndpoint {
    /// Connects to the target at `addr` and binds the connection to a session.
    pub fn connect(
        addr: SocketAddr,
        session_id: u64,
        secret: u64,
        options: &EndpointOptions,
    ) -> Result<Self, TransportError> {
        let stream = TcpStream::connect_timeout(&addr, options.connect_timeout)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let io = |context| move |source| TransportError::Io { context, source };
        stream.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
        stream.set_read_timeout(Some(options.connect_timeout)).map_err(io("setting a read timeout"))?;
        let mut out = Vec::new();
        wire::encode_connect(&mut out, session_id, secret);
        let mut body = Vec::new();
        let reply = match &options.key {
            // The connect carries the session secret: with a cluster key it travels sealed.
            Some(key) => {
                let mut channel = crate::secure::SecureChannel::initiate(&mut &stream, key)
                    .map_err(|e| TransportError::Refused(e.to_string()))?;
                channel.send(&mut &stream, &out).map_err(io("sending the data connect"))?;
                channel.recv(&mut &stream, &mut body)
            }
            None => {
                (&stream).write_all(&out).map_err(io("sending the data connect"))?;
                read_frame(&mut &stream, &mut body)
            }
        };
        let header = reply.map_err(|e| match e {
            crate::frame::ReadFrameError::Io(source) => {
                TransportError::Io { context: "reading the connect reply", source }
            }
            crate::frame::ReadFrameError::Frame(f) => TransportError::Protocol(f),
        })?;
        match header.kind {
            wire::KIND_DATA_CONNECT_OK => {}
            wire::KIND_DATA_CONNECT_REFUSED => {
                let reason = Decoder::new(&body).string16("reason").unwrap_or_else(|_| "no reason given".into());
                return Err(TransportError::Refused(reason));
            }
            other => return Err(TransportError::Protocol(crate::frame::FrameError::UnexpectedKind(other))),
        }
        stream.set_read_timeout(None).map_err(io("clearing the read timeout"))?;
        Ok(Self {
            stream,
            peer: addr,
            send: Mutex::new(SendState { buf: Vec::new(), link: LinkModel::new(options.link.clone()) }),
            recv: Mutex::new(RecvState::default()),
            pending: Mutex::new(VecDeque::new()),
            rtt: Mutex::new(RttRecorder::new()),
            broken: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            next_seq: AtomicU64::new(0),
            max_outstanding: options.max_outstanding.max(1),
        })
    }

    /// Address of the target.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Work requests posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Round-trip telemetry of this link.
    pub fn rtt_stats(&self) -> RttStats {
        lock(&self.rtt).stats()
    }

    /// Posts one work request (READ, WRITE or ping when `wr` is `None`).
    pub fn post(&self, wr_id: u64, wr: Option<&WorkRequest>) -> Result<(), TransportError> {
        let (opcode, segments, local, total) = match wr {
            None => (Opcode::Ping, Vec::new(), Vec::new(), 0),
            Some(wr) => {
                let total = wr.validate()?;
                let segs: Vec<RemoteSegment> = wr
                    .segments
                    .iter()
                    .map(|s| RemoteSegment {
                        addr: s.remote_addr,
                        rkey: s.rkey,
                        len: u32::try_from(s.local.len).unwrap_or(u32::MAX),
                    })
                    .collect();
                let local = wr.segments.iter().map(|s| s.local.clone()).collect();
                (wr.opcode, segs, local, total)
            }
        };
        if self.broken.load(Ordering::Acquire) {
            return Err(TransportError::Disconnected { peer: self.peer });
        }
        if self.outstanding.fetch_add(1, Ordering::AcqRel) >= self.max_outstanding {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(TransportError::QueueFull { max: self.max_outstanding });
        }
        let mut send = lock(&self.send);
        let SendState { buf, link } = &mut *send;
        buf.clear();
        match opcode {
            Opcode::Ping => wire::encode_ping(buf, wr_id),
            Opcode::Read => wire::encode_rw(buf, Opcode::Read, wr_id, &segments, |_| {}),
            Opcode::Write => wire::encode_rw(buf, Opcode::Write, wr_id, &segments, |payload| {
                let mut at = 0;
                for s in &local {
                    // Bounds were checked when the slice was made; a failure here cannot happen.
                    let _ = s.region.read_at(s.offset, &mut payload[at..at + s.len]);
                    at += s.len;
                }
            }),
        }
        let response_len = HEADER_LEN + wire::COMPLETION_PREFIX_LEN + if opcode == Opcode::Read { total } else { 0 };
        let now = Instant::now();
        let deliver_at = link.schedule(now, buf.len(), response_len);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let expected_len = total;
        let local = if opcode == Opcode::Read { local } else { Vec::new() };
        lock(&self.pending).push_back(Pending { seq, wr_id, opcode, posted: now, deliver_at, local, expected_len });
        if let Err(e) = self.send_all(buf) {
            self.broken.store(true, Ordering::Release);
            tracing::warn!(peer = %self.peer, error = %e, "shim connection failed while sending");
            let mut pending = lock(&self.pending);
            if pending.back().is_some_and(|p| p.seq == seq) {
                pending.pop_back();
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(TransportError::Disconnected { peer: self.peer });
            }
            // Already flushed by a poller: the caller gets a flushed completion for it.
        }
        Ok(())
    }

    fn send_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match sys::send_nonblocking(self.stream.as_fd(), bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The peer may be blocked sending us completions: read them first.
                    if let Ok(mut recv) = self.recv.try_lock() {
                        self.pump(&mut recv);
                    }
                    sys::wait_fd(self.stream.as_fd(), true, Duration::from_millis(1))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fail(&self, recv: &mut RecvState, reason: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::warn!(peer = %self.peer, reason, "shim connection lost; flushing outstanding requests");
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.flush_pending(recv);
    }

    fn flush_pending(&self, recv: &mut RecvState) {
        // A READ cut off mid-payload: its slices hold part of it, and it completes as flushed.
        if let Some(d) = recv.direct.take() {
            recv.held.push_back(d.flushed());
        }
        let mut pending = lock(&self.pending);
        for p in pending.drain(..) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            recv.held.push_back(Held {
                deliver_at: None,
                posted: p.posted,
                completion: Completion {
                    wr_id: p.wr_id,
                    opcode: p.opcode,
                    status: CompletionStatus::Flushed,
                    byte_len: 0,
                    rtt: Duration::ZERO,
                },
            });
        }
    }

    fn deliver(&self, recv: &mut RecvState, out: &mut Vec<Completion>, max: usize) -> usize {
        let now = Instant::now();
        let mut n = 0;
        let mut rtt = None;
        while n < max {
            let ready = recv.held.front().is_some_and(|h| h.deliver_at.is_none_or(|t| t <= now));
            if !ready {
                break;
            }
            let Some(h) = recv.held.pop_front() else { break };
            let mut c = h.completion;
            c.rtt = now.saturating_duration_since(h.posted);
            if c.status != CompletionStatus::Flushed {
                rtt.get_or_insert_with(|| lock(&self.rtt)).record(c.rtt);
            }
            out.push(c);
            n += 1;
        }
        n
    }

    /// When this endpoint's next completion can be delivered: now (one is held, or the
    /// connection is broken), at an instant (link emulation holds it), or when its socket has
    /// data (its descriptor).
    pub(crate) fn readiness(&self) -> Readiness<'_> {
        let recv = lock(&self.recv);
        if self.broken.load(Ordering::Acquire) {
            return Readiness::Now;
        }
        match recv.held.front().map(|h| h.deliver_at) {
            Some(None) => Readiness::Now,
            Some(Some(t)) => Readiness::At(t),
            None => Readiness::Socket(self.stream.as_fd()),
        }
    }

    /// Appends up to `max` ready completions to `out` without blocking; returns how many.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut recv = lock(&self.recv);
        self.pump(&mut recv);
        self.deliver(&mut recv, out, max)
    }

    /// Waits up to `timeout` for at least one completion, spinning or blocking as `mode` says.
    /// Returns how many were appended (0 on timeout). Fails once the connection is lost and every
    /// flushed completion has been delivered.
    pub fn wait(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Duration,
        mode: PollMode,
    ) -> Result<usize, TransportError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = match mode {
            PollMode::Block => start,
            PollMode::Spin => deadline,
            PollMode::SpinThenBlock(d) => start + d,
        };
        loop {
            let mut recv = lock(&self.recv);
            self.pump(&mut recv);
            let n = self.deliver(&mut recv, out, max);
            if n > 0 {
                return Ok(n);
            }
            if self.broken.load(Ordering::Acquire) && recv.held.is_empty() {
                return Err(TransportError::Disconnected { peer: self.peer });
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(0);
            }
            if now < spin_until {
                drop(recv);
                if mode == PollMode::Spin {
                    std::hint::spin_loop();
                } else {
                    // Spinning while a thread that could answer (a lender on this machine) or
                    // use the answer waits for this CPU would only delay the reply.
                    std::thread::yield_now();
                }
                continue;
            }
            let next_delivery = recv.held.front().and_then(|h| h.deliver_at);
            let until = next_delivery.map_or(deadline, |t| t.min(deadline));
            let nap = until.saturating_duration_since(now);
            if next_delivery.is_some() {
                drop(recv);
                std::thread::sleep(nap);
            } else if let Err(e) = sys::wait_fd(self.stream.as_fd(), false, nap) {
                self.fail(&mut recv, &format!("poll failed: {e}"));
            }
        }
    }
}

/// When an endpoint's next completion can be delivered (see [`ShimEndpoint::readiness`]).
pub(crate) enum Readiness<'a> {
    /// A completion is ready.
    Now,
    /// A completion is held until then.
    At(Instant),
    /// When the socket has data.
    Socket(std::os::fd::BorrowedFd<'a>),
}

/// Waits until any of `endpoints` may have a completion to deliver, any of `more_fds` is
/// readable, or `timeout` passes.
pub(crate) fn wait_any(
    endpoints: &[&ShimEndpoint],
    more_fds: Vec<std::os::fd::BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<(), TransportError> {
    let now = Instant::now();
    let mut until = now + timeout;
    let mut fds = more_fds;
    for e in endpoints {
        match e.readiness() {
            Readiness::Now => return Ok(()),
            Readiness::At(t) => until = until.min(t),
            Readiness::Socket(fd) => fds.push(fd),
        }
    }
    let left = until.saturating_duration_since(now);
    if left.is_zero() {
        return Ok(());
    }
    if fds.is_empty() {
        std::thread::sleep(left);
        return Ok(());
    }
    sys::wait_any_readable(&fds, left)
        .map(|_| ())
        .map_err(|e| TransportError::InvalidArgument(format!("waiting for completions failed: {e}")))
}

impl Drop for ShimEndpoint {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests;
