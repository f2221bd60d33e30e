//! The receive side of a shim endpoint: completion frames read from the socket and turned into
//! held completions, READ payloads scattered into the work requests' local slices. A long READ
//! payload is received straight into its slices as it arrives (no intermediate buffer).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{lock, sys, Held, Pending, RecvState, ShimEndpoint};
use crate::frame::{usize_from, Header, HEADER_LEN};
use crate::region::LocalSlice;
use crate::wire::{self, Opcode, RemoteStatus};
use crate::{Completion, CompletionStatus};

const RECV_CHUNK: usize = 256 * 1024;
/// READ payloads at least this long are received straight into their local slices (one copy
/// less); shorter ones come with their header in one `recv` (one system call less).
const DIRECT_MIN: usize = 32 * 1024;

/// A READ completion whose header has arrived and whose payload is received into the work
/// request's local slices as it comes, without passing through `rx`.
#[derive(Debug)]
pub(super) struct DirectRead {
    /// What to hold once the payload is in.
    held: Held,
    local: Vec<LocalSlice>,
    /// Payload bytes in place so far.
    received: usize,
    total: usize,
    /// Where the next byte goes: a slice of `local` and the offset in it.
    cursor: (usize, usize),
}

impl DirectRead {
    /// Its completion as flushed: the connection broke before the whole payload came (its
    /// slices hold part of it).
    pub(super) fn flushed(self) -> Held {
        let mut held = self.held;
        held.deliver_at = None;
        held.completion.status = CompletionStatus::Flushed;
        held.completion.byte_len = 0;
        held
    }
}

impl ShimEndpoint {
    /// Receives whatever has arrived and turns complete frames into held completions.
    pub(super) fn pump(&self, recv: &mut RecvState) {
        if self.broken.load(Ordering::Acquire) {
            self.flush_pending(recv);
            return;
        }
        loop {
            let progress = if recv.direct.is_some() { self.receive_direct(recv) } else { self.receive_frames(recv) };
            match progress {
                Ok(true) => {}
                Ok(false) => return,
                Err(reason) => {
                    self.fail(recv, &reason);
                    return;
                }
            }
        }
    }

    /// One `recv` into `rx`, then every complete frame in it handled. `Ok(false)`: nothing more
    /// to read now.
    fn receive_frames(&self, recv: &mut RecvState) -> Result<bool, String> {
        let want = match pending_frame_len(&recv.rx) {
            Some(total) if total > recv.rx.len() => (total - recv.rx.len()).max(RECV_CHUNK),
            Some(_) => RECV_CHUNK,
            // At a frame boundary, before a long READ payload: take only the header and the
            // completion's fields, so that the payload can go straight where it belongs.
            None if recv.rx.is_empty() && self.next_payload_len() >= DIRECT_MIN => {
                HEADER_LEN + wire::COMPLETION_PREFIX_LEN
            }
            None => RECV_CHUNK,
        };
        match sys::recv_into_spare(self.stream.as_fd(), &mut recv.rx, want) {
            Ok(0) => return Err("the memory-server closed the connection".into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(format!("receive failed: {e}")),
        }
        self.complete_frames(recv)?;
        self.start_direct(recv)?;
        Ok(true)
    }

    /// Payload length of the READ that completes next, if that is the oldest outstanding request.
    fn next_payload_len(&self) -> usize {
        lock(&self.pending).front().map_or(0, |p| if p.opcode == Opcode::Read { p.expected_len } else { 0 })
    }

    /// Turns the complete frames at the start of `rx` into held completions.
    fn complete_frames(&self, recv: &mut RecvState) -> Result<(), String> {
        let mut pos = 0;
        while recv.rx.len() - pos >= HEADER_LEN {
            let head: [u8; HEADER_LEN] = match recv.rx[pos..pos + HEADER_LEN].try_into() {
                Ok(h) => h,
                Err(_) => break,
            };
            let header = Header::decode(&head).map_err(|e| format!("malformed frame from the target: {e}"))?;
            let end = pos + HEADER_LEN + usize_from(header.body_len);
            if recv.rx.len() < end {
                break;
            }
            let held = self.complete(header.kind, &recv.rx[pos + HEADER_LEN..end])?;
            recv.held.push_back(held);
            pos = end;
        }
        recv.rx.drain(..pos);
        Ok(())
    }

    /// If `rx` holds the start of a successful READ completion whose long payload has not all
    /// arrived, takes it out of `rx`: the bytes already there are copied into the local slices,
    /// and the rest will be received straight into them (`receive_direct`).
    fn start_direct(&self, recv: &mut RecvState) -> Result<(), String> {
        let fields = HEADER_LEN + wire::COMPLETION_PREFIX_LEN;
        let Some(head) = recv.rx.get(..HEADER_LEN).and_then(|h| <[u8; HEADER_LEN]>::try_from(h).ok()) else {
            return Ok(());
        };
        let header = Header::decode(&head).map_err(|e| format!("malformed frame from the target: {e}"))?;
        if header.kind != wire::KIND_COMPLETION || recv.rx.len() < fields {
            return Ok(());
        }
        let prefix = wire::decode_completion_prefix(&recv.rx[HEADER_LEN..fields])
            .map_err(|e| format!("malformed completion: {e}"))?;
        let total = prefix.payload_len();
        let frame_len = HEADER_LEN + usize_from(header.body_len);
        // Anything unusual (a short payload, a length that disagrees) takes the ordinary path,
        // which checks it in full.
        if total < DIRECT_MIN || frame_len != fields + total || recv.rx.len() >= frame_len {
            return Ok(());
        }
        let p = self.take_pending(prefix.wr_id, prefix.opcode, Some(total))?;
        let arrived = &recv.rx[fields..];
        scatter(&p.local, 0, arrived);
        let received = arrived.len();
        recv.rx.clear();
        let completion = Completion {
            wr_id: p.wr_id,
            opcode: p.opcode,
            status: CompletionStatus::Success,
            byte_len: usize_from(prefix.byte_len),
            rtt: Duration::ZERO,
        };
        let held = Held { deliver_at: p.deliver_at, posted: p.posted, completion };
        let cursor = locate(&p.local, received);
        recv.direct = Some(DirectRead { held, local: p.local, received, total, cursor });
        Ok(())
    }

    /// Receives the rest of a READ payload straight into its local slices; once all of it is in,
    /// holds its completion. `Ok(false)`: nothing more to read now.
    fn receive_direct(&self, recv: &mut RecvState) -> Result<bool, String> {
        let Some(d) = recv.direct.as_mut() else { return Ok(true) };
        while d.received < d.total {
            let (slice, offset) = d.cursor;
            let Some(rest) = d.local.get(slice..).filter(|rest| !rest.is_empty()) else {
                return Err("a READ payload longer than its work request's buffers".into());
            };
            match LocalSlice::receive_into(rest, offset, d.total - d.received, self.stream.as_fd()) {
                Ok(0) => return Err("the memory-server closed the connection".into()),
                Ok(n) => {
                    d.received += n;
                    d.cursor = advance(&d.local, d.cursor, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receive failed: {e}")),
            }
        }
        if let Some(d) = recv.direct.take() {
            recv.held.push_back(d.held);
        }
        Ok(true)
    }

    /// Takes the oldest outstanding request, which the completion for `wr_id` must match, as
    /// must a successful READ's `payload_len`. A mismatch leaves the request queued (flushed with
    /// the connection the caller then fails).
    fn take_pending(&self, wr_id: u64, opcode: Opcode, payload_len: Option<usize>) -> Result<Pending, String> {
        let mut pending = lock(&self.pending);
        let p = pending.front().ok_or("a completion arrived with nothing outstanding")?;
        if p.wr_id != wr_id || p.opcode != opcode {
            return Err(format!(
                "completion out of order: expected wr_id {} ({:?}), got {wr_id} ({opcode:?})",
                p.wr_id, p.opcode
            ));
        }
        if let Some(len) = payload_len.filter(|&len| len != p.expected_len) {
            return Err(format!("READ {wr_id} returned {len} bytes, {} expected", p.expected_len));
        }
        let p = pending.pop_front().ok_or("a completion arrived with nothing outstanding")?;
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        Ok(p)
    }

    fn complete(&self, kind: u8, body: &[u8]) -> Result<Held, String> {
        if kind != wire::KIND_COMPLETION {
            return Err(format!("unexpected frame kind {kind:#04x} on a data connection"));
        }
        let wc = wire::decode_completion(body).map_err(|e| format!("malformed completion: {e}"))?;
        let read_len = (wc.status == RemoteStatus::Success && wc.opcode == Opcode::Read).then_some(wc.payload.len());
        let p = self.take_pending(wc.wr_id, wc.opcode, read_len)?;
        let status = match wc.status {
            RemoteStatus::Success => CompletionStatus::Success,
            RemoteStatus::AccessError => CompletionStatus::RemoteAccessError,
            RemoteStatus::InvalidRequest => CompletionStatus::RemoteInvalidRequest,
        };
        if read_len.is_some() {
            scatter(&p.local, 0, wc.payload);
        }
        let byte_len = usize_from(wc.byte_len);
        Ok(Held {
            deliver_at: p.deliver_at,
            posted: p.posted,
            completion: Completion { wr_id: p.wr_id, opcode: p.opcode, status, byte_len, rtt: Duration::ZERO },
        })
    }
}

/// Copies `bytes`, which start `at` bytes into a payload, into the payload's local slices.
fn scatter(local: &[LocalSlice], mut at: usize, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let (slice, offset) = locate(local, at);
        let Some(s) = local.get(slice) else { return };
        let n = (s.len - offset).min(bytes.len());
        // The slice was bounds-checked at post time; the payload's length was checked against
        // the slices' total.
        let _ = s.region.write_at(s.offset + offset, &bytes[..n]);
        bytes = &bytes[n..];
        at += n;
    }
}

/// The slice holding byte `at` of a payload scattered over `local`, and the offset in it (past
/// the end: `local.len()`).
fn locate(local: &[LocalSlice], at: usize) -> (usize, usize) {
    advance(local, (0, 0), at)
}

/// The position `n` bytes after `(slice, offset)` in `local` (past the end: `local.len()`).
fn advance(local: &[LocalSlice], (mut slice, offset): (usize, usize), n: usize) -> (usize, usize) {
    let mut at = offset + n;
    while let Some(s) = local.get(slice) {
        if at < s.len {
            return (slice, at);
        }
        at -= s.len;
        slice += 1;
    }
    (local.len(), 0)
}

/// Total length of the frame at the start of `rx`, if its header is complete and valid.
fn pending_frame_len(rx: &[u8]) -> Option<usize> {
    let head: [u8; HEADER_LEN] = rx.get(..HEADER_LEN)?.try_into().ok()?;
    Header::decode(&head).ok().map(|h| HEADER_LEN + usize_from(h.body_len))
}
