//! The client side of one RC queue pair ([`VerbsEndpoint`]): posting READs and WRITEs as chained
//! work requests, taking their completions (busy-polling, or sleeping on the completion channel),
//! and timing one request in [`RTT_SAMPLE_EVERY`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::BasicCompletionQueue;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags};

use super::events::CompletionEvents;
use super::{poll, register, VerbsDevice, SEND_QUEUE_DEPTH};
use crate::control::QpAddress;
use crate::link::{RttRecorder, RttStats};
use crate::region::LocalRegion;
use crate::{Completion, CompletionStatus, Opcode, PollMode, TransportError, WorkRequest};

/// How long a blocking wait sleeps between polls of the completion queue when the endpoint has no
/// completion channel.
const BLOCK_POLL_INTERVAL: Duration = Duration::from_micros(5);

/// `ibv_wc_status` values this provider tells apart.
const WC_SUCCESS: u32 = 0;
const WC_REM_INV_REQ_ERR: u32 = 9;
const WC_REM_ACCESS_ERR: u32 = 10;

/// A local region registered with the endpoint's protection domain (kept alive with it).
type Registered = (Arc<LocalRegion>, Arc<MemoryRegion>);

/// What a posted request is waiting for.
#[derive(Debug, Clone, Copy)]
struct Pending {
    opcode: Opcode,
    bytes: usize,
    /// Post time, on the requests whose round trip is sampled.
    posted: Option<Instant>,
}

/// One request in this many has its round trip timed: a clock read costs real time on some
/// hosts (a slow clock source, an emulated guest), and every request would pay it twice.
const RTT_SAMPLE_EVERY: u64 = 16;

/// What a wait over several endpoints may do about one verbs endpoint.
#[derive(Debug)]
pub enum Readiness<'a> {
    /// A completion is ready: do not sleep.
    Now,
    /// Sleep until this descriptor (the armed completion channel) is readable.
    Channel(std::os::fd::BorrowedFd<'a>),
    /// No channel: sleep at most a few microseconds, then poll.
    Poll,
}

/// The client side of one RC queue pair.
#[derive(Debug)]
pub struct VerbsEndpoint {
    device: Arc<VerbsDevice>,
    pd: Arc<ProtectionDomain>,
    cq: Arc<BasicCompletionQueue>,
    /// What blocking waits sleep on (`None`: they poll).
    events: Option<CompletionEvents>,
    /// Completions taken from the queue by `readiness`, for the next `poll`.
    ready: Mutex<Vec<Completion>>,
    /// Blocking waits woken by a completion event.
    event_wakeups: std::sync::atomic::AtomicU64,
    qp: Mutex<BasicQueuePair>,
    /// Local regions used so far, by base address, with their registrations.
    registrations: Mutex<HashMap<usize, Registered>>,
    /// Requests in flight (few: a linear scan beats hashing).
    pending: Mutex<Vec<(u64, Pending)>>,
    outstanding: AtomicUsize,
    max_outstanding: usize,
    rtt: Mutex<RttRecorder>,
    peer: SocketAddr,
    failed: AtomicU32,
    posts: std::sync::atomic::AtomicU64,
}

impl VerbsEndpoint {
    fn sample_rtt(&self) -> bool {
        self.posts.fetch_add(1, Ordering::Relaxed).is_multiple_of(RTT_SAMPLE_EVERY)
    }

    /// Makes a queue pair on `device` and connects it through `exchange`, which sends this side's
    /// address to the target (over the control connection) and returns the target's.
    pub fn connect(
        device: &Arc<VerbsDevice>,
        peer: SocketAddr,
        max_outstanding: usize,
        exchange: impl FnOnce(QpAddress) -> Result<QpAddress, TransportError>,
    ) -> Result<Self, TransportError> {
        let pd = device.alloc_pd()?;
        let events = device.completion_events();
        let cq = device.create_cq(SEND_QUEUE_DEPTH, events.as_ref())?;
        let (mut qp, psn) = device.create_qp(&pd, &cq)?;
        let remote = exchange(device.address(&qp, psn))?;
        device.connect_qp(&mut qp, psn, &remote)?;
        Ok(Self {
            device: Arc::clone(device),
            pd,
            cq,
            events,
            ready: Mutex::new(Vec::new()),
            event_wakeups: std::sync::atomic::AtomicU64::new(0),
            qp: Mutex::new(qp),
            registrations: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            max_outstanding: max_outstanding.max(1),
            rtt: Mutex::new(RttRecorder::new()),
            peer,
            failed: AtomicU32::new(0),
            posts: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The device this endpoint runs on.
    pub fn device(&self) -> &VerbsDevice {
        &self.device
    }

    /// The local key of `region`, registering it on first use.
    fn lkey(&self, region: &Arc<LocalRegion>) -> Result<u32, TransportError> {
        let mut regs = self.registrations.lock().unwrap_or_else(PoisonError::into_inner);
        let base = region.as_ptr() as usize;
        if let Some((_, mr)) = regs.get(&base) {
            return Ok(mr.lkey());
        }
        // SAFETY: the region is kept alive in the map for as long as the registration.
        let mr = unsafe { register(&self.pd, region.as_ptr(), region.len()) }?;
        let lkey = mr.lkey();
        regs.insert(base, (Arc::clone(region), mr));
        Ok(lkey)
    }

    /// Posts `wr`: one chained work request per segment, the last one signaled.
    pub fn post(&self, wr: &WorkRequest) -> Result<(), TransportError> {
        let bytes = wr.validate()?;
        if self.outstanding.load(Ordering::Acquire) >= self.max_outstanding {
            return Err(TransportError::InvalidArgument(format!(
                "{} requests outstanding: poll completions before posting more",
                self.max_outstanding
            )));
        }
        let mut sges = Vec::with_capacity(wr.segments.len());
        for s in &wr.segments {
            let lkey = self.lkey(&s.local.region)?;
            let addr = s.local.region.as_ptr() as u64 + s.local.offset as u64;
            let len =
                u32::try_from(s.local.len).map_err(|_| TransportError::InvalidArgument("segment too long".into()))?;
            sges.push((lkey, addr, len, s.rkey, s.remote_addr));
        }
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((wr.wr_id, Pending { opcode: wr.opcode, bytes, posted: self.sample_rtt().then(Instant::now) }));
        let mut qp = self.qp.lock().unwrap_or_else(PoisonError::into_inner);
        let mut guard = qp.start_post_send();
        let last = sges.len() - 1;
        for (i, &(lkey, addr, len, rkey, remote)) in sges.iter().enumerate() {
            let flags = if i == last { WorkRequestFlags::Signaled } else { WorkRequestFlags::none() };
            let handle = guard.construct_wr(wr.wr_id, flags);
            let handle = match wr.opcode {
                Opcode::Read => handle.setup_read(rkey, remote),
                _ => handle.setup_write(rkey, remote),
            };
            // SAFETY: `addr..addr + len` lies in a registered local region (bounds checked by
            // `LocalSlice`) that the caller keeps alive until the completion.
            unsafe { handle.setup_sge(lkey, addr, len) };
        }
        match guard.post() {
            Ok(()) => {
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                drop(qp);
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(k) = pending.iter().rposition(|(id, _)| *id == wr.wr_id) {
                    pending.swap_remove(k);
                }
                Err(TransportError::Io {
                    context: "posting to the send queue",
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }

    /// Appends up to `max` completions without blocking: those [`VerbsEndpoint::readiness`] set
    /// aside first, then the queue's.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        let taken = {
            let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
            let take = ready.len().min(max);
            out.extend(ready.drain(..take));
            take
        };
        if taken == max {
            return taken;
        }
        taken + self.poll_queue(out, max - taken)
    }

    /// Whether a wait over several endpoints ([`crate::Endpoint::wait_any`]) should not sleep,
    /// may sleep on this endpoint's completion channel (armed here), or must poll it.
    pub fn readiness(&self) -> Readiness<'_> {
        if !self.ready.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            return Readiness::Now;
        }
        let Some(events) = &self.events else { return Readiness::Poll };
        if events.arm(&self.cq).is_err() {
            return Readiness::Poll;
        }
        // A completion that came before the arming raises no event: set it aside for `poll`.
        let mut found = Vec::new();
        if self.poll_queue(&mut found, 16) > 0 {
            self.ready.lock().unwrap_or_else(PoisonError::into_inner).extend(found);
            return Readiness::Now;
        }
        Readiness::Channel(events.fd())
    }

    /// Appends up to `max` completions from the completion queue.
    fn poll_queue(&self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut wcs = [poll::WorkCompletion { wr_id: 0, status: 0 }; poll::BATCH];
        let mut n = 0;
        while n < max {
            let want = (max - n).min(poll::BATCH);
            let found = poll::poll(&self.cq, &mut wcs, want);
            if found == 0 {
                break;
            }
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            for wc in &wcs[..found] {
                // Every work request of a failed chain (and every later one) completes with an
                // error; the first completion of a request reports it, the rest are dropped.
                let Some(k) = pending.iter().position(|(id, _)| *id == wc.wr_id) else { continue };
                let (_, p) = pending.swap_remove(k);
                out.push(self.completion(wc, p));
                n += 1;
            }
            if found < want {
                break;
            }
        }
        n
    }

    /// The completion of the request `p` that `wc` reports.
    fn completion(&self, wc: &poll::WorkCompletion, p: Pending) -> Completion {
        let status = match wc.status {
            WC_SUCCESS => CompletionStatus::Success,
            WC_REM_ACCESS_ERR => CompletionStatus::RemoteAccessError,
            WC_REM_INV_REQ_ERR => CompletionStatus::RemoteInvalidRequest,
            other => {
                if self.failed.swap(other, Ordering::AcqRel) == 0 {
                    tracing::warn!(peer = %self.peer, status = other, "verbs request failed; the queue pair is now in the error state");
                }
                CompletionStatus::Flushed
            }
        };
        let rtt = p.posted.map_or(Duration::ZERO, |t| t.elapsed());
        if status == CompletionStatus::Success && p.posted.is_some() {
            self.rtt.lock().unwrap_or_else(PoisonError::into_inner).record(rtt);
        }
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        Completion {
            wr_id: wc.wr_id,
            opcode: p.opcode,
            status,
            byte_len: if status == CompletionStatus::Success { p.bytes } else { 0 },
            rtt,
        }
    }

    /// Waits up to `timeout` for completions: polls while `mode` says to spin, then sleeps on the
    /// completion channel.
    pub fn wait(&self, out: &mut Vec<Completion>, max: usize, timeout: Duration, mode: PollMode) -> usize {
        // The clock is first read after 64 empty polls: a short wait never reads it.
        let mut start: Option<Instant> = None;
        let spin_for = match mode {
            PollMode::Spin => timeout,
            PollMode::Block => Duration::ZERO,
            PollMode::SpinThenBlock(d) => d.min(timeout),
        };
        let mut spins = 0u32;
        loop {
            let n = self.poll(out, max);
            if n > 0 {
                return n;
            }
            // Reading the clock is not free (least of all in an emulated guest): every 64 polls.
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                continue;
            }
            let elapsed = start.get_or_insert_with(Instant::now).elapsed();
            if elapsed >= timeout {
                return 0;
            }
            if elapsed >= spin_for {
                let n = self.sleep_until_completion(out, max, timeout - elapsed);
                if n > 0 {
                    return n;
                }
            }
        }
    }

    /// Sleeps until the device reports a completion or `left` passes: arms the queue, polls it
    /// once more (a completion that came before the arming raises no event), then waits for the
    /// event. Returns the completions that the last poll found. Without a channel (or if arming
    /// fails) it sleeps a few microseconds instead.
    fn sleep_until_completion(&self, out: &mut Vec<Completion>, max: usize, left: Duration) -> usize {
        let Some(events) = &self.events else {
            std::thread::sleep(BLOCK_POLL_INTERVAL);
            return 0;
        };
        if let Err(e) = events.arm(&self.cq) {
            tracing::debug!(peer = %self.peer, error = %e, "arming the completion queue failed; polling");
            std::thread::sleep(BLOCK_POLL_INTERVAL);
            return 0;
        }
        let n = self.poll(out, max);
        if n > 0 {
            return n;
        }
        match events.wait(left) {
            Ok(true) => {
                self.event_wakeups.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "waiting on the completion channel failed; polling");
                std::thread::sleep(BLOCK_POLL_INTERVAL);
            }
        }
        0
    }

    /// Blocking waits so far that slept until a completion event woke them.
    pub fn event_wakeups(&self) -> u64 {
        self.event_wakeups.load(Ordering::Relaxed)
    }

    /// Requests posted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Measured round trips (post to completion) of successful requests.
    pub fn rtt_stats(&self) -> RttStats {
        self.rtt.lock().unwrap_or_else(PoisonError::into_inner).stats()
    }

    /// The target's control address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}
