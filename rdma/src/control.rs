//! Control-protocol messages (hello, slab alloc/free, heartbeat, stats, errors) spoken between a
//! pager and a `memory-server` over TCP for every provider. Layouts are tabled in the crate docs.

use crate::frame::{encode_frame, Decoder, FrameError};
use crate::ProviderKind;

/// Frame kind: client hello.
pub const KIND_HELLO: u8 = 0x01;
/// Frame kind: server accepts the hello.
pub const KIND_HELLO_OK: u8 = 0x02;
/// Frame kind: allocate one slab.
pub const KIND_ALLOC_SLAB: u8 = 0x03;
/// Frame kind: a slab was granted.
pub const KIND_SLAB_GRANTED: u8 = 0x04;
/// Frame kind: free one slab.
pub const KIND_FREE_SLAB: u8 = 0x05;
/// Frame kind: the slab was freed.
pub const KIND_SLAB_FREED: u8 = 0x06;
/// Frame kind: heartbeat (renews the lease).
pub const KIND_HEARTBEAT: u8 = 0x07;
/// Frame kind: heartbeat acknowledged.
pub const KIND_HEARTBEAT_ACK: u8 = 0x08;
/// Frame kind: ask for server statistics.
pub const KIND_STATS: u8 = 0x09;
/// Frame kind: server statistics.
pub const KIND_STATS_REPLY: u8 = 0x0A;
/// Frame kind: a typed error reply.
pub const KIND_ERROR: u8 = 0x0F;
/// `VERBS_CONNECT` request kind: the client's queue pair, to be connected to a new server one.
pub const KIND_VERBS_CONNECT: u8 = 0x0B;
/// `VERBS_ACCEPTED` response kind: the server's queue pair, connected to the client's.
pub const KIND_VERBS_ACCEPTED: u8 = 0x0C;

/// `BACKUP_PUT` request kind: pages to keep in the server's backup log.
pub const KIND_BACKUP_PUT: u8 = 0x10;
/// `BACKUP_STORED` response kind: the pages were appended to the log.
pub const KIND_BACKUP_STORED: u8 = 0x11;
/// `BACKUP_GET` request kind: the newest backup of one page.
pub const KIND_BACKUP_GET: u8 = 0x12;
/// `BACKUP_PAGE` response kind: a page's backup.
pub const KIND_BACKUP_PAGE: u8 = 0x13;
/// `BACKUP_SYNC` request kind: make every stored page durable (fsync) before answering.
pub const KIND_BACKUP_SYNC: u8 = 0x14;
/// `BACKUP_SYNCED` response kind: every page stored so far is on disk.
pub const KIND_BACKUP_SYNCED: u8 = 0x15;
/// `BACKUP_FORGET` request kind: drop every backup of this client.
pub const KIND_BACKUP_FORGET: u8 = 0x16;
/// `BACKUP_FORGOTTEN` response kind: how many pages were dropped.
pub const KIND_BACKUP_FORGOTTEN: u8 = 0x17;

/// Longest token accepted in a hello.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Most pages in one `BACKUP_PUT`.
pub const MAX_BACKUP_PAGES: usize = 64;

/// Longest page (with its seal's tag) a backup keeps.
pub const MAX_BACKUP_PAGE_LEN: usize = 8192;

/// One page in the backup tier: which page of which region, which version, and its bytes (as the
/// client sent them: sealed, unless the client trusts its lenders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPage {
    /// The client's region id.
    pub region: u32,
    /// The page's index in the region.
    pub page: u32,
    /// The page's version (write-back count).
    pub version: u32,
    /// The page's bytes (at most [`MAX_BACKUP_PAGE_LEN`]).
    pub data: Vec<u8>,
}

/// Proof that a client owns a session: its id and the secret the server granted with it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionProof {
    /// The session id.
    pub session_id: u64,
    /// The session's secret.
    pub secret: u64,
}

impl std::fmt::Debug for SessionProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, in any log or panic message.
        write!(f, "SessionProof {{ session_id: {}, secret: <hidden> }}", crate::ids::short(self.session_id))
    }
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// Opens or resumes the session of `client_id`; must be the first frame of a control connection.
    Hello {
        /// Id the client picks (random per process, from the OS CSPRNG). An id held by a live
        /// session is refused unless `resume` proves the session is the client's.
        client_id: u64,
        /// Data-path provider the client will use.
        provider: ProviderKind,
        /// The session this client had with the server, to resume it after a reconnect: the
        /// session id and the secret granted at its hello. `None`: a new session.
        resume: Option<SessionProof>,
        /// Authentication token (opaque; not checked by this version of the server).
        token: Vec<u8>,
    },
    /// Allocate one slab.
    AllocSlab,
    /// Free one slab.
    FreeSlab {
        /// The slab to free.
        slab_id: u64,
    },
    /// Renew the lease.
    Heartbeat,
    /// Ask for statistics.
    Stats,
    /// Connect a verbs queue pair: the server makes one in the session's protection domain,
    /// connects it to `qp` and answers with its own address.
    VerbsConnect {
        /// The client's queue pair.
        qp: QpAddress,
    },
    /// Keep these pages in the backup log (servers started with `--persist`).
    BackupPut {
        /// The pages (1 to [`MAX_BACKUP_PAGES`]).
        pages: Vec<BackupPage>,
    },
    /// The newest backup of one page.
    BackupGet {
        /// The client's region id.
        region: u32,
        /// The page's index.
        page: u32,
    },
    /// Make every page stored so far durable before answering.
    BackupSync,
    /// Drop every backup of this client (it is done with them).
    BackupForget,
}

/// The address of a reliable-connected verbs queue pair, exchanged over the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpAddress {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number the owner sends (24 bits).
    pub psn: u32,
    /// The owner's GID (for RoCE, its IPv4-mapped or IPv6 address).
    pub gid: [u8; 16],
}

/// What happened to the client's earlier session at hello time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    /// No earlier session: a fresh one was made.
    New,
    /// The earlier session was still leased: its slabs are intact.
    Resumed,
    /// The earlier session's lease ran out and its slabs were reclaimed: every page the client
    /// kept there is lost. A fresh, empty session was made.
    Expired,
}

/// A slab handed to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabGrant {
    /// Server-unique slab id.
    pub slab_id: u64,
    /// Remote address of the first byte.
    pub addr: u64,
    /// Key that opens the slab for one-sided access by this session only.
    pub rkey: u32,
    /// Length in bytes.
    pub len: u64,
}

/// Server statistics. Encoded as a count-prefixed list of `u64` so that fields can be added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerStats {
    /// Bytes the server may donate.
    pub capacity: u64,
    /// Slab size.
    pub slab_size: u64,
    /// Bytes currently handed out.
    pub allocated: u64,
    /// Slabs currently handed out.
    pub slabs: u64,
    /// Live sessions.
    pub sessions: u64,
    /// One-sided READ requests served.
    pub reads: u64,
    /// One-sided WRITE requests served.
    pub writes: u64,
    /// Bytes served by READs.
    pub bytes_read: u64,
    /// Bytes stored by WRITEs.
    pub bytes_written: u64,
    /// Requests refused for a bad rkey or bounds.
    pub access_errors: u64,
    /// Sessions reclaimed because their lease ran out.
    pub leases_expired: u64,
    /// Connections closed because of a malformed frame.
    pub malformed_connections: u64,
    /// Pages kept in the backup log (`--persist`).
    #[serde(default)]
    pub backup_pages: u64,
    /// Bytes of the backup log file.
    #[serde(default)]
    pub backup_log_bytes: u64,
}

impl ServerStats {
    fn fields(&self) -> [u64; 14] {
        [
            self.capacity,
            self.slab_size,
            self.allocated,
            self.slabs,
            self.sessions,
            self.reads,
            self.writes,
            self.bytes_read,
            self.bytes_written,
            self.access_errors,
            self.leases_expired,
            self.malformed_connections,
            self.backup_pages,
            self.backup_log_bytes,
        ]
    }

    fn from_fields(f: &[u64]) -> Self {
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        Self {
            capacity: g(0),
            slab_size: g(1),
            allocated: g(2),
            slabs: g(3),
            sessions: g(4),
            reads: g(5),
            writes: g(6),
            bytes_read: g(7),
            bytes_written: g(8),
            access_errors: g(9),
            leases_expired: g(10),
            malformed_connections: g(11),
            backup_pages: g(12),
            backup_log_bytes: g(13),
        }
    }
}

/// Typed error codes of the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The server has no capacity left for another slab.
    CapacityExhausted,
    /// The slab id is not one of this session's slabs.
    UnknownSlab,
    /// The session's lease ran out; its slabs are gone. Send a new hello.
    SessionExpired,
    /// The request was malformed or out of order.
    BadRequest,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// The server does not offer the requested provider.
    UnsupportedProvider,
    /// The server is shutting down.
    ShuttingDown,
    /// The hello's client id belongs to a live session and the hello did not prove it owns it.
    SessionInUse,
    /// The peer failed too many checks (wrong secrets, refused hellos) and is refused for a while.
    TooManyFailures,
    /// The server has no backup of the page asked for.
    NotFound,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// The code's wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            ErrorCode::CapacityExhausted => 1,
            ErrorCode::UnknownSlab => 2,
            ErrorCode::SessionExpired => 3,
            ErrorCode::BadRequest => 4,
            ErrorCode::UnsupportedVersion => 5,
            ErrorCode::UnsupportedProvider => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::SessionInUse => 8,
            ErrorCode::TooManyFailures => 9,
            ErrorCode::NotFound => 10,
            ErrorCode::Other(c) => c,
        }
    }
    /// Decodes a wire value; unknown values are kept as [`ErrorCode::Other`].
    pub fn from_wire(v: u16) -> Self {
        match v {
            1 => ErrorCode::CapacityExhausted,
            2 => ErrorCode::UnknownSlab,
            3 => ErrorCode::SessionExpired,
            4 => ErrorCode::BadRequest,
            5 => ErrorCode::UnsupportedVersion,
            6 => ErrorCode::UnsupportedProvider,
            7 => ErrorCode::ShuttingDown,
            8 => ErrorCode::SessionInUse,
            9 => ErrorCode::TooManyFailures,
            10 => ErrorCode::NotFound,
            c => ErrorCode::Other(c),
        }
    }
}

/// A reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlResponse {
    /// The hello was accepted.
    HelloOk {
        /// Session id, used to bind data connections.
        session_id: u64,
        /// Secret that proves ownership of the session on a data connection.
        secret: u64,
        /// Size of every slab this server hands out.
        slab_size: u64,
        /// Lease length in milliseconds: heartbeat well within it.
        lease_ms: u64,
        /// What happened to an earlier session of the same client id.
        outcome: SessionOutcome,
    },
    /// A slab was granted.
    SlabGranted(SlabGrant),
    /// A slab was freed.
    SlabFreed {
        /// The freed slab.
        slab_id: u64,
    },
    /// The lease was renewed.
    HeartbeatAck {
        /// Lease length in milliseconds from now.
        lease_ms: u64,
        /// The server is draining: it leaves in this many milliseconds (at least 1), and the
        /// client should move its pages elsewhere before then. `None`: not leaving.
        leaving_in_ms: Option<u64>,
    },
    /// Statistics.
    Stats(ServerStats),
    /// A verbs queue pair was made and connected.
    VerbsAccepted {
        /// The server's queue pair.
        qp: QpAddress,
    },
    /// The pages of a `BackupPut` were appended to the log (durable at the next sync).
    BackupStored {
        /// Pages stored.
        count: u32,
    },
    /// The newest backup of the page asked for.
    BackupPage(BackupPage),
    /// Every page stored so far is on disk.
    BackupSynced,
    /// The client's backups were dropped.
    BackupForgotten {
        /// Pages dropped.
        pages: u64,
    },
    /// The request failed.
    Error {
        /// Typed reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

fn encode_qp(e: &mut crate::frame::Encoder<'_>, qp: &QpAddress) {
    e.u32(qp.qpn).u32(qp.psn).raw(&qp.gid);
}

fn decode_qp(d: &mut Decoder<'_>) -> Result<QpAddress, FrameError> {
    let qpn = d.u32("queue pair number")?;
    let psn = d.u32("packet sequence number")?;
    for (v, field) in [(qpn, "queue pair number"), (psn, "packet sequence number")] {
        if v >= 1 << 24 {
            return Err(FrameError::Invalid { field, reason: format!("{v} does not fit in 24 bits") });
        }
    }
    let mut gid = [0u8; 16];
    gid.copy_from_slice(d.raw(16, "gid")?);
    Ok(QpAddress { qpn, psn, gid })
}

/// Appends a request frame to `out`.
pub fn encode_request(out: &mut Vec<u8>, req: &ControlRequest) {
    match req {
        ControlRequest::Hello { client_id, provider, resume, token } => encode_frame(out, KIND_HELLO, |e| {
            e.u64(*client_id).u8(provider.to_wire());
            match resume {
                Some(p) => e.u8(1).u64(p.session_id).u64(p.secret),
                None => e.u8(0),
            };
            e.bytes16(token);
        }),
        ControlRequest::AllocSlab => encode_frame(out, KIND_ALLOC_SLAB, |_| {}),
        ControlRequest::FreeSlab { slab_id } => encode_frame(out, KIND_FREE_SLAB, |e| {
            e.u64(*slab_id);
        }),
        ControlRequest::Heartbeat => encode_frame(out, KIND_HEARTBEAT, |_| {}),
        ControlRequest::Stats => encode_frame(out, KIND_STATS, |_| {}),
        ControlRequest::VerbsConnect { qp } => encode_frame(out, KIND_VERBS_CONNECT, |e| encode_qp(e, qp)),
        ControlRequest::BackupPut { pages } => encode_frame(out, KIND_BACKUP_PUT, |e| {
            e.u16(u16::try_from(pages.len()).unwrap_or(u16::MAX));
            for p in pages {
                encode_backup_page(e, p);
            }
        }),
        ControlRequest::BackupGet { region, page } => encode_frame(out, KIND_BACKUP_GET, |e| {
            e.u32(*region).u32(*page);
        }),
        ControlRequest::BackupSync => encode_frame(out, KIND_BACKUP_SYNC, |_| {}),
        ControlRequest::BackupForget => encode_frame(out, KIND_BACKUP_FORGET, |_| {}),
    }
}

fn encode_backup_page(e: &mut crate::frame::Encoder<'_>, p: &BackupPage) {
    e.u32(p.region).u32(p.page).u32(p.version).bytes16(&p.data);
}

fn decode_backup_page(d: &mut Decoder<'_>) -> Result<BackupPage, FrameError> {
    let region = d.u32("backup region")?;
    let page = d.u32("backup page")?;
    let version = d.u32("backup version")?;
    let data = d.bytes16("backup data")?;
    if data.is_empty() || data.len() > MAX_BACKUP_PAGE_LEN {
        return Err(FrameError::Invalid {
            field: "backup data",
            reason: format!("{} bytes is not 1 to {MAX_BACKUP_PAGE_LEN}", data.len()),
        });
    }
    Ok(BackupPage { region, page, version, data: data.to_vec() })
}

/// Decodes a request body of the given kind.
pub fn decode_request(kind: u8, body: &[u8]) -> Result<ControlRequest, FrameError> {
    let mut d = Decoder::new(body);
    let req = match kind {
        KIND_HELLO => {
            let client_id = d.u64("client id")?;
            let provider = ProviderKind::from_wire(d.u8("provider")?)?;
            let resume = match d.u8("resume flag")? {
                0 => None,
                1 => Some(SessionProof { session_id: d.u64("resumed session id")?, secret: d.u64("resume secret")? }),
                other => {
                    return Err(FrameError::Invalid {
                        field: "resume flag",
                        reason: format!("{other} is neither 0 nor 1"),
                    })
                }
            };
            let token = d.bytes16("token")?;
            if token.len() > MAX_TOKEN_LEN {
                return Err(FrameError::Invalid {
                    field: "token",
                    reason: format!("{} bytes exceeds {MAX_TOKEN_LEN}", token.len()),
                });
            }
            ControlRequest::Hello { client_id, provider, resume, token: token.to_vec() }
        }
        KIND_ALLOC_SLAB => ControlRequest::AllocSlab,
        KIND_FREE_SLAB => ControlRequest::FreeSlab { slab_id: d.u64("slab id")? },
        KIND_HEARTBEAT => ControlRequest::Heartbeat,
        KIND_STATS => ControlRequest::Stats,
        KIND_VERBS_CONNECT => ControlRequest::VerbsConnect { qp: decode_qp(&mut d)? },
        KIND_BACKUP_PUT => {
            let n = usize::from(d.u16("backup page count")?);
            if n == 0 || n > MAX_BACKUP_PAGES {
                return Err(FrameError::Invalid {
                    field: "backup page count",
                    reason: format!("{n} is not 1 to {MAX_BACKUP_PAGES}"),
                });
            }
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                pages.push(decode_backup_page(&mut d)?);
            }
            ControlRequest::BackupPut { pages }
        }
        KIND_BACKUP_GET => ControlRequest::BackupGet { region: d.u32("backup region")?, page: d.u32("backup page")? },
        KIND_BACKUP_SYNC => ControlRequest::BackupSync,
        KIND_BACKUP_FORGET => ControlRequest::BackupForget,
        other => return Err(FrameError::UnexpectedKind(other)),
    };
    d.finish()?;
    Ok(req)
}

/// Appends a response frame to `out`.
pub fn encode_response(out: &mut Vec<u8>, resp: &ControlResponse) {
    match resp {
        ControlResponse::HelloOk { session_id, secret, slab_size, lease_ms, outcome } => {
            encode_frame(out, KIND_HELLO_OK, |e| {
                let o = match outcome {
                    SessionOutcome::New => 0,
                    SessionOutcome::Resumed => 1,
                    SessionOutcome::Expired => 2,
                };
                e.u64(*session_id).u64(*secret).u64(*slab_size).u64(*lease_ms).u8(o);
            })
        }
        ControlResponse::SlabGranted(g) => encode_frame(out, KIND_SLAB_GRANTED, |e| {
            e.u64(g.slab_id).u64(g.addr).u32(g.rkey).u64(g.len);
        }),
        ControlResponse::SlabFreed { slab_id } => encode_frame(out, KIND_SLAB_FREED, |e| {
            e.u64(*slab_id);
        }),
        ControlResponse::HeartbeatAck { lease_ms, leaving_in_ms } => encode_frame(out, KIND_HEARTBEAT_ACK, |e| {
            e.u64(*lease_ms).u64(leaving_in_ms.unwrap_or(0));
        }),
        ControlResponse::Stats(s) => encode_frame(out, KIND_STATS_REPLY, |e| {
            let fields = s.fields();
            e.u16(u16::try_from(fields.len()).unwrap_or(u16::MAX));
            for f in fields {
                e.u64(f);
            }
        }),
        ControlResponse::VerbsAccepted { qp } => encode_frame(out, KIND_VERBS_ACCEPTED, |e| encode_qp(e, qp)),
        ControlResponse::BackupStored { count } => encode_frame(out, KIND_BACKUP_STORED, |e| {
            e.u32(*count);
        }),
        ControlResponse::BackupPage(p) => encode_frame(out, KIND_BACKUP_PAGE, |e| encode_backup_page(e, p)),
        ControlResponse::BackupSynced => encode_frame(out, KIND_BACKUP_SYNCED, |_| {}),
        ControlResponse::BackupForgotten { pages } => encode_frame(out, KIND_BACKUP_FORGOTTEN, |e| {
            e.u64(*pages);
        }),
        ControlResponse::Error { code, message } => encode_frame(out, KIND_ERROR, |e| {
            e.u16(code.to_wire()).bytes16(message.as_bytes());
        }),
    }
}

/// Decodes a response body of the given kind.
pub fn decode_response(kind: u8, body: &[u8]) -> Result<ControlResponse, FrameError> {
    let mut d = Decoder::new(body);
    let resp = match kind {
        KIND_HELLO_OK => {
            let session_id = d.u64("session id")?;
            let secret = d.u64("secret")?;
            let slab_size = d.u64("slab size")?;
            let lease_ms = d.u64("lease")?;
            let outcome = match d.u8("session outcome")? {
                0 => SessionOutcome::New,
                1 => SessionOutcome::Resumed,
                2 => SessionOutcome::Expired,
                v => {
                    return Err(FrameError::Invalid { field: "session outcome", reason: format!("unknown value {v}") })
                }
            };
            ControlResponse::HelloOk { session_id, secret, slab_size, lease_ms, outcome }
        }
        KIND_SLAB_GRANTED => ControlResponse::SlabGranted(SlabGrant {
            slab_id: d.u64("slab id")?,
            addr: d.u64("slab address")?,
            rkey: d.u32("rkey")?,
            len: d.u64("slab length")?,
        }),
        KIND_SLAB_FREED => ControlResponse::SlabFreed { slab_id: d.u64("slab id")? },
        KIND_HEARTBEAT_ACK => {
            let lease_ms = d.u64("lease")?;
            let leaving = d.u64("leaving in")?;
            ControlResponse::HeartbeatAck { lease_ms, leaving_in_ms: (leaving > 0).then_some(leaving) }
        }
        KIND_VERBS_ACCEPTED => ControlResponse::VerbsAccepted { qp: decode_qp(&mut d)? },
        KIND_BACKUP_STORED => ControlResponse::BackupStored { count: d.u32("stored count")? },
        KIND_BACKUP_PAGE => ControlResponse::BackupPage(decode_backup_page(&mut d)?),
        KIND_BACKUP_SYNCED => ControlResponse::BackupSynced,
        KIND_BACKUP_FORGOTTEN => ControlResponse::BackupForgotten { pages: d.u64("forgotten pages")? },
        KIND_STATS_REPLY => {
            let n = usize::from(d.u16("stats count")?);
            let mut fields = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                fields.push(d.u64("stats field")?);
            }
            ControlResponse::Stats(ServerStats::from_fields(&fields))
        }
        KIND_ERROR => ControlResponse::Error {
            code: ErrorCode::from_wire(d.u16("error code")?),
            message: d.string16("error message")?,
        },
        other => return Err(FrameError::UnexpectedKind(other)),
    };
    d.finish()?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{usize_from, Header, HEADER_LEN};
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let head: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header");
        let h = Header::decode(&head).expect("valid header");
        assert_eq!(usize_from(h.body_len), frame.len() - HEADER_LEN);
        (h.kind, &frame[HEADER_LEN..])
    }

    fn request_strategy() -> impl Strategy<Value = ControlRequest> {
        prop_oneof![
            (
                any::<u64>(),
                any::<bool>(),
                proptest::option::of((any::<u64>(), any::<u64>())),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(c, v, r, t)| ControlRequest::Hello {
                    client_id: c,
                    provider: if v { ProviderKind::Verbs } else { ProviderKind::Shim },
                    resume: r.map(|(session_id, secret)| SessionProof { session_id, secret }),
                    token: t,
                }),
            Just(ControlRequest::AllocSlab),
            any::<u64>().prop_map(|slab_id| ControlRequest::FreeSlab { slab_id }),
            Just(ControlRequest::Heartbeat),
            Just(ControlRequest::Stats),
            (0u32..1 << 24, 0u32..1 << 24, any::<[u8; 16]>())
                .prop_map(|(qpn, psn, gid)| ControlRequest::VerbsConnect { qp: QpAddress { qpn, psn, gid } }),
            proptest::collection::vec(backup_page_strategy(), 1..4)
                .prop_map(|pages| ControlRequest::BackupPut { pages }),
            (any::<u32>(), any::<u32>()).prop_map(|(region, page)| ControlRequest::BackupGet { region, page }),
            Just(ControlRequest::BackupSync),
            Just(ControlRequest::BackupForget),
        ]
    }

    fn backup_page_strategy() -> impl Strategy<Value = BackupPage> {
        (any::<u32>(), any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(region, page, version, data)| BackupPage { region, page, version, data })
    }

    fn response_strategy() -> impl Strategy<Value = ControlResponse> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), 0u8..3).prop_map(|(a, b, c, d, o)| {
                ControlResponse::HelloOk {
                    session_id: a,
                    secret: b,
                    slab_size: c,
                    lease_ms: d,
                    outcome: [SessionOutcome::New, SessionOutcome::Resumed, SessionOutcome::Expired][usize::from(o)],
                }
            }),
            (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(slab_id, addr, rkey, len)| {
                ControlResponse::SlabGranted(SlabGrant { slab_id, addr, rkey, len })
            }),
            any::<u64>().prop_map(|slab_id| ControlResponse::SlabFreed { slab_id }),
            (any::<u64>(), proptest::option::of(1..u64::MAX))
                .prop_map(|(lease_ms, leaving_in_ms)| ControlResponse::HeartbeatAck { lease_ms, leaving_in_ms }),
            (0u32..1 << 24, 0u32..1 << 24, any::<[u8; 16]>())
                .prop_map(|(qpn, psn, gid)| ControlResponse::VerbsAccepted { qp: QpAddress { qpn, psn, gid } }),
            proptest::array::uniform14(any::<u64>()).prop_map(|f| ControlResponse::Stats(ServerStats::from_fields(&f))),
            any::<u32>().prop_map(|count| ControlResponse::BackupStored { count }),
            backup_page_strategy().prop_map(ControlResponse::BackupPage),
            Just(ControlResponse::BackupSynced),
            any::<u64>().prop_map(|pages| ControlResponse::BackupForgotten { pages }),
            (1u16..20, "[a-z ]{0,40}")
                .prop_map(|(c, m)| ControlResponse::Error { code: ErrorCode::from_wire(c), message: m }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request_strategy()) {
            let mut out = Vec::new();
            encode_request(&mut out, &req);
            let (kind, body) = split(&out);
            prop_assert_eq!(decode_request(kind, body).expect("decodes"), req);
        }

        #[test]
        fn responses_round_trip(resp in response_strategy()) {
            let mut out = Vec::new();
            encode_response(&mut out, &resp);
            let (kind, body) = split(&out);
            prop_assert_eq!(decode_response(kind, body).expect("decodes"), resp);
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_request(kind, &body);
            let _ = decode_response(kind, &body);
        }
    }

    #[test]
    fn stats_from_a_newer_peer_with_more_fields_still_decode() {
        let mut out = Vec::new();
        encode_frame(&mut out, KIND_STATS_REPLY, |e| {
            e.u16(14);
            for i in 0..14 {
                e.u64(i);
            }
        });
        let (kind, body) = split(&out);
        match decode_response(kind, body).expect("decodes") {
            ControlResponse::Stats(s) => assert_eq!((s.capacity, s.malformed_connections), (0, 11)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
