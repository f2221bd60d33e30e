//! Data-path frames of the software NIC (`shim` provider): connect, one-sided READ/WRITE with a
//! scatter list, ping, and completions. Layouts are tabled in the crate documentation.

use crate::frame::{encode_frame, usize_from, Decoder, FrameError};

/// Frame kind: bind this data connection to a session (first frame on a data connection).
pub const KIND_DATA_CONNECT: u8 = 0x40;
/// Frame kind: the target accepted the data connection.
pub const KIND_DATA_CONNECT_OK: u8 = 0x41;
/// Frame kind: the target refused the data connection (body: reason string).
pub const KIND_DATA_CONNECT_REFUSED: u8 = 0x42;
/// Frame kind: one-sided READ of a scatter list.
pub const KIND_READ: u8 = 0x50;
/// Frame kind: one-sided WRITE of a scatter list, payload follows the list.
pub const KIND_WRITE: u8 = 0x51;
/// Frame kind: no-op that completes immediately (RTT probe).
pub const KIND_PING: u8 = 0x52;
/// Frame kind: completion of one work request.
pub const KIND_COMPLETION: u8 = 0x58;

/// Most segments in one work request.
pub const MAX_SEGMENTS: usize = 1024;
/// Most bytes moved by one work request.
pub const MAX_TRANSFER: usize = 16 * 1024 * 1024;

/// One remote segment of a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSegment {
    /// Remote virtual address.
    pub addr: u64,
    /// Key of the remote memory region that must contain `[addr, addr + len)`.
    pub rkey: u32,
    /// Length in bytes (at least 1).
    pub len: u32,
}

/// Operation that a completion reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// One-sided READ.
    Read,
    /// One-sided WRITE.
    Write,
    /// No-op used to measure the round trip.
    Ping,
}

impl Opcode {
    fn to_wire(self) -> u8 {
        match self {
            Opcode::Read => 1,
            Opcode::Write => 2,
            Opcode::Ping => 3,
        }
    }
    fn from_wire(v: u8) -> Result<Self, FrameError> {
        match v {
            1 => Ok(Opcode::Read),
            2 => Ok(Opcode::Write),
            3 => Ok(Opcode::Ping),
            _ => Err(invalid("opcode", format!("unknown opcode {v}"))),
        }
    }
}

/// Status a target reports for one work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteStatus {
    /// Done; for a READ the payload follows.
    Success,
    /// Bad rkey, a segment outside its region, or a region of another session. Nothing was touched.
    AccessError,
    /// The request was well-formed but not executable (e.g. too large). Nothing was touched.
    InvalidRequest,
}

impl RemoteStatus {
    fn to_wire(self) -> u8 {
        match self {
            RemoteStatus::Success => 0,
            RemoteStatus::AccessError => 1,
            RemoteStatus::InvalidRequest => 2,
        }
    }
    fn from_wire(v: u8) -> Result<Self, FrameError> {
        match v {
            0 => Ok(RemoteStatus::Success),
            1 => Ok(RemoteStatus::AccessError),
            2 => Ok(RemoteStatus::InvalidRequest),
            _ => Err(invalid("status", format!("unknown status {v}"))),
        }
    }
}

fn invalid(field: &'static str, reason: String) -> FrameError {
    FrameError::Invalid { field, reason }
}

/// A decoded request on a data connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataRequest<'a> {
    /// Bind the connection to a session created over the control protocol.
    Connect {
        /// Session id from the control hello.
        session_id: u64,
        /// Secret from the control hello.
        secret: u64,
    },
    /// READ every segment, in order, into one response payload.
    Read {
        /// Caller's tag, echoed in the completion.
        wr_id: u64,
        /// Segments to read.
        segments: Vec<RemoteSegment>,
    },
    /// WRITE the payload to the segments, in order.
    Write {
        /// Caller's tag, echoed in the completion.
        wr_id: u64,
        /// Segments to write.
        segments: Vec<RemoteSegment>,
        /// Concatenated data for every segment.
        payload: &'a [u8],
    },
    /// Complete at once.
    Ping {
        /// Caller's tag, echoed in the completion.
        wr_id: u64,
    },
}

/// Appends a DATA_CONNECT frame.
pub fn encode_connect(out: &mut Vec<u8>, session_id: u64, secret: u64) {
    encode_frame(out, KIND_DATA_CONNECT, |e| {
        e.u64(session_id).u64(secret);
    });
}

/// Appends the header and scatter list of a READ or WRITE; for a WRITE the caller appends exactly
/// the payload bytes through `payload`, which receives the payload area to fill.
pub fn encode_rw(
    out: &mut Vec<u8>,
    opcode: Opcode,
    wr_id: u64,
    segments: &[RemoteSegment],
    payload: impl FnOnce(&mut [u8]),
) {
    let kind = if opcode == Opcode::Write { KIND_WRITE } else { KIND_READ };
    encode_frame(out, kind, |e| {
        e.u64(wr_id).u16(u16::try_from(segments.len()).unwrap_or(u16::MAX)).u16(0);
        let mut total = 0usize;
        for s in segments {
            e.u64(s.addr).u32(s.rkey).u32(s.len);
            total += usize_from(s.len);
        }
        if opcode == Opcode::Write {
            payload(e.space(total));
        }
    });
}

/// Appends a PING frame.
pub fn encode_ping(out: &mut Vec<u8>, wr_id: u64) {
    encode_frame(out, KIND_PING, |e| {
        e.u64(wr_id);
    });
}

fn decode_segments(d: &mut Decoder<'_>) -> Result<(u64, Vec<RemoteSegment>, usize), FrameError> {
    let wr_id = d.u64("wr_id")?;
    let count = usize::from(d.u16("segment count")?);
    if d.u16("reserved")? != 0 {
        return Err(invalid("reserved", "must be zero".into()));
    }
    if count == 0 || count > MAX_SEGMENTS {
        return Err(invalid("segment count", format!("{count} is not in 1..={MAX_SEGMENTS}")));
    }
    let mut segments = Vec::with_capacity(count);
    let mut total = 0usize;
    for _ in 0..count {
        let seg = RemoteSegment {
            addr: d.u64("segment address")?,
            rkey: d.u32("segment rkey")?,
            len: d.u32("segment length")?,
        };
        if seg.len == 0 {
            return Err(invalid("segment length", "zero-length segment".into()));
        }
        total = total.saturating_add(usize_from(seg.len));
        segments.push(seg);
    }
    if total > MAX_TRANSFER {
        return Err(invalid("transfer length", format!("{total} bytes exceeds {MAX_TRANSFER}")));
    }
    Ok((wr_id, segments, total))
}

/// Decodes a request body of the given kind.
pub fn decode_request(kind: u8, body: &[u8]) -> Result<DataRequest<'_>, FrameError> {
    let mut d = Decoder::new(body);
    let req = match kind {
        KIND_DATA_CONNECT => DataRequest::Connect { session_id: d.u64("session id")?, secret: d.u64("secret")? },
        KIND_READ => {
            let (wr_id, segments, _) = decode_segments(&mut d)?;
            DataRequest::Read { wr_id, segments }
        }
        KIND_WRITE => {
            let (wr_id, segments, total) = decode_segments(&mut d)?;
            let payload = d.raw(total, "write payload")?;
            DataRequest::Write { wr_id, segments, payload }
        }
        KIND_PING => DataRequest::Ping { wr_id: d.u64("wr_id")? },
        other => return Err(FrameError::UnexpectedKind(other)),
    };
    d.finish()?;
    Ok(req)
}

/// A decoded completion frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireCompletion<'a> {
    /// Tag of the work request.
    pub wr_id: u64,
    /// What the target did.
    pub status: RemoteStatus,
    /// Which operation this completes.
    pub opcode: Opcode,
    /// Bytes moved.
    pub byte_len: u32,
    /// READ data (empty unless a successful READ).
    pub payload: &'a [u8],
}

/// Appends a completion frame reporting `byte_len` bytes moved. For a successful READ, `payload`
/// fills the data area of `byte_len` bytes that follows; otherwise it is not called.
pub fn encode_completion(
    out: &mut Vec<u8>,
    wr_id: u64,
    status: RemoteStatus,
    opcode: Opcode,
    byte_len: usize,
    payload: impl FnOnce(&mut [u8]),
) {
    encode_frame(out, KIND_COMPLETION, |e| {
        e.u64(wr_id).u8(status.to_wire()).u8(opcode.to_wire()).u16(0).u32(u32::try_from(byte_len).unwrap_or(u32::MAX));
        if status == RemoteStatus::Success && opcode == Opcode::Read {
            payload(e.space(byte_len));
        }
    });
}

/// Appends the head of a successful READ completion (frame header and completion prefix) whose
/// `byte_len`-byte payload the sender writes right after it, straight from the memory it lies in:
/// the head and the payload together are exactly what [`encode_completion`] would append.
pub fn encode_read_completion_head(out: &mut Vec<u8>, wr_id: u64, byte_len: usize) {
    let byte_len = u32::try_from(byte_len).unwrap_or(u32::MAX);
    let body_len = u32::try_from(COMPLETION_PREFIX_LEN).unwrap_or(u32::MAX).saturating_add(byte_len);
    out.extend_from_slice(&crate::frame::Header::encode(KIND_COMPLETION, body_len));
    out.extend_from_slice(&wr_id.to_le_bytes());
    out.push(RemoteStatus::Success.to_wire());
    out.push(Opcode::Read.to_wire());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&byte_len.to_le_bytes());
}

/// Bytes of a completion body before its READ payload.
pub const COMPLETION_PREFIX_LEN: usize = 16;

/// The fields of a completion body before its payload: enough to know where a READ payload goes
/// before it has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionPrefix {
    /// Tag of the work request.
    pub wr_id: u64,
    /// What the target did.
    pub status: RemoteStatus,
    /// Which operation this completes.
    pub opcode: Opcode,
    /// Bytes moved.
    pub byte_len: u32,
}

impl CompletionPrefix {
    /// Length of the payload that follows: `byte_len` for a successful READ, else none.
    pub fn payload_len(&self) -> usize {
        if self.status == RemoteStatus::Success && self.opcode == Opcode::Read {
            usize_from(self.byte_len)
        } else {
            0
        }
    }
}

fn decode_prefix(d: &mut Decoder<'_>) -> Result<CompletionPrefix, FrameError> {
    let wr_id = d.u64("wr_id")?;
    let status = RemoteStatus::from_wire(d.u8("status")?)?;
    let opcode = Opcode::from_wire(d.u8("opcode")?)?;
    if d.u16("reserved")? != 0 {
        return Err(invalid("reserved", "must be zero".into()));
    }
    let byte_len = d.u32("byte length")?;
    Ok(CompletionPrefix { wr_id, status, opcode, byte_len })
}

/// Decodes the first [`COMPLETION_PREFIX_LEN`] bytes of a completion body (the rest is ignored).
pub fn decode_completion_prefix(body: &[u8]) -> Result<CompletionPrefix, FrameError> {
    decode_prefix(&mut Decoder::new(body))
}

/// Decodes a completion body. The payload length must match `byte_len` for a successful READ and
/// be empty otherwise.
pub fn decode_completion(body: &[u8]) -> Result<WireCompletion<'_>, FrameError> {
    let mut d = Decoder::new(body);
    let prefix = decode_prefix(&mut d)?;
    let payload = d.raw(prefix.payload_len(), "read payload")?;
    d.finish()?;
    let CompletionPrefix { wr_id, status, opcode, byte_len } = prefix;
    Ok(WireCompletion { wr_id, status, opcode, byte_len, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Header, HEADER_LEN};
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let head: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header");
        let h = Header::decode(&head).expect("valid header");
        assert_eq!(usize_from(h.body_len), frame.len() - HEADER_LEN);
        (h.kind, &frame[HEADER_LEN..])
    }

    fn seg_strategy() -> impl Strategy<Value = RemoteSegment> {
        (any::<u64>(), any::<u32>(), 1u32..5000).prop_map(|(addr, rkey, len)| RemoteSegment { addr, rkey, len })
    }

    proptest! {
        #[test]
        fn write_round_trips(wr_id in any::<u64>(), segs in proptest::collection::vec(seg_strategy(), 1..8), fill in any::<u8>()) {
            let mut out = Vec::new();
            encode_rw(&mut out, Opcode::Write, wr_id, &segs, |p| p.fill(fill));
            let (kind, body) = split(&out);
            match decode_request(kind, body).expect("decodes") {
                DataRequest::Write { wr_id: w, segments, payload } => {
                    prop_assert_eq!(w, wr_id);
                    prop_assert_eq!(&segments, &segs);
                    let total: usize = segs.iter().map(|s| s.len as usize).sum();
                    prop_assert_eq!(payload.len(), total);
                    prop_assert!(payload.iter().all(|&b| b == fill));
                }
                other => prop_assert!(false, "wrong request {:?}", other),
            }
        }

        #[test]
        fn read_and_ping_round_trip(wr_id in any::<u64>(), segs in proptest::collection::vec(seg_strategy(), 1..8)) {
            let mut out = Vec::new();
            encode_rw(&mut out, Opcode::Read, wr_id, &segs, |_| {});
            let (kind, body) = split(&out);
            prop_assert_eq!(decode_request(kind, body).expect("decodes"), DataRequest::Read { wr_id, segments: segs });
            let mut out = Vec::new();
            encode_ping(&mut out, wr_id);
            let (kind, body) = split(&out);
            prop_assert_eq!(decode_request(kind, body).expect("decodes"), DataRequest::Ping { wr_id });
        }

        #[test]
        fn completion_round_trips(wr_id in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..9000), ok in any::<bool>()) {
            let status = if ok { RemoteStatus::Success } else { RemoteStatus::AccessError };
            let len = if ok { data.len() } else { 0 };
            let mut out = Vec::new();
            encode_completion(&mut out, wr_id, status, Opcode::Read, len, |p| p.copy_from_slice(&data));
            let (kind, body) = split(&out);
            prop_assert_eq!(kind, KIND_COMPLETION);
            let c = decode_completion(body).expect("decodes");
            prop_assert_eq!(c.wr_id, wr_id);
            prop_assert_eq!(c.status, status);
            prop_assert_eq!(c.payload, &data[..len]);
            // The prefix alone says the same, and where the payload starts.
            let prefix = decode_completion_prefix(&body[..COMPLETION_PREFIX_LEN]).expect("prefix decodes");
            prop_assert_eq!((prefix.wr_id, prefix.status, prefix.payload_len()), (wr_id, status, len));
            prop_assert_eq!(&body[COMPLETION_PREFIX_LEN..], &data[..len]);
            // A READ's head followed by its payload is the same frame, byte for byte.
            if ok {
                let mut sent = Vec::new();
                encode_read_completion_head(&mut sent, wr_id, data.len());
                prop_assert_eq!(sent.len(), HEADER_LEN + COMPLETION_PREFIX_LEN);
                sent.extend_from_slice(&data);
                prop_assert_eq!(sent, out);
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(kind, &body);
            let _ = decode_completion(&body);
            let _ = decode_completion_prefix(&body);
        }
    }

    #[test]
    fn rejects_zero_segments_and_oversized_transfers() {
        let mut out = Vec::new();
        encode_rw(&mut out, Opcode::Read, 1, &[], |_| {});
        let (kind, body) = split(&out);
        assert!(decode_request(kind, body).is_err());
        let big = vec![RemoteSegment { addr: 0, rkey: 1, len: u32::MAX }; 2];
        let mut out = Vec::new();
        encode_rw(&mut out, Opcode::Read, 1, &big, |_| {});
        let (kind, body) = split(&out);
        assert!(matches!(decode_request(kind, body), Err(FrameError::Invalid { field: "transfer length", .. })));
    }
}
