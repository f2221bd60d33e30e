//! The client side of the control protocol: hello, slab alloc/free, heartbeat and stats over one
//! TCP connection, and opening data endpoints bound to the session.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::control::{
    self, ControlRequest, ControlResponse, ErrorCode, QpAddress, ServerStats, SessionOutcome, SessionProof, SlabGrant,
};
use crate::frame::{read_frame, FrameError, ReadFrameError};
use crate::secure::{ClusterKey, SecureChannel, SecureError};
use crate::{Endpoint, EndpointOptions, ProviderKind, TransportError};

/// A heartbeat's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The lease, renewed from now.
    pub lease: Duration,
    /// The server is draining and leaves after this long: move pages elsewhere before then.
    pub leaving_in: Option<Duration>,
}

/// Errors of the control client. Every variant names the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot connect to memory-server {addr}: {source}; is it running and listening there?")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The authenticated handshake failed: the lender holds another cluster key (or none).
    #[error("cannot authenticate with memory-server {addr}: {source}; check that both use the same --key-file")]
    Handshake {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: SecureError,
    },
    /// The connection failed or timed out.
    #[error("control connection to memory-server {addr} failed: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The server answered with something that is not the protocol.
    #[error("memory-server {addr} broke the protocol: {reason}")]
    Protocol {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The server has no capacity left.
    #[error("memory-server {addr} is out of capacity: {message}")]
    CapacityExhausted {
        /// The server.
        addr: SocketAddr,
        /// The server's detail.
        message: String,
    },
    /// The session's lease ran out and its slabs were reclaimed.
    #[error("memory-server {addr} reclaimed this client's slabs after its lease ran out: {message}")]
    SessionExpired {
        /// The server.
        addr: SocketAddr,
        /// The server's detail.
        message: String,
    },
    /// Any other refusal.
    #[error("memory-server {addr} refused the request ({code:?}): {message}")]
    Refused {
        /// The server.
        addr: SocketAddr,
        /// Typed reason.
        code: ErrorCode,
        /// The server's detail.
        message: String,
    },
}

/// How to open a control session.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Id of this client at the server (`None`: a fresh one from the OS CSPRNG). An id held by a
    /// live session is refused unless `resume` proves that session.
    pub client_id: Option<u64>,
    /// The session to resume (from [`ControlClient::proof`] of an earlier connection), with the
    /// same `client_id`. If the server no longer has it, the hello says
    /// [`SessionOutcome::Expired`]: the session's slabs are gone.
    pub resume: Option<SessionProof>,
    /// Data-path provider.
    pub provider: ProviderKind,
    /// Authentication token (carried, not yet checked by servers).
    pub token: Vec<u8>,
    /// Connect, read and write timeout of the control connection.
    pub timeout: Duration,
    /// The cluster key, for lenders that require one: the connection is authenticated and every
    /// control frame sealed ([`crate::secure`]).
    pub key: Option<ClusterKey>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            resume: None,
            provider: ProviderKind::Shim,
            token: Vec::new(),
            timeout: Duration::from_secs(5),
            key: None,
        }
    }
}

/// What the server said at hello.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: u64,
    /// Secret that binds data connections.
    pub secret: u64,
    /// Size of each slab.
    pub slab_size: u64,
    /// Lease: heartbeat well within it.
    pub lease: Duration,
    /// What happened to an earlier session of this client id.
    pub outcome: SessionOutcome,
}

impl std::fmt::Debug for SessionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionInfo")
            .field("session_id", &crate::ids::short(self.session_id))
            .field("secret", &"<hidden>")
            .field("slab_size", &self.slab_size)
            .field("lease", &self.lease)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// A control session with one memory-server.
#[derive(Debug)]
pub struct ControlClient {
    addr: SocketAddr,
    stream: TcpStream,
    out: Vec<u8>,
    body: Vec<u8>,
    session: SessionInfo,
    client_id: u64,
    channel: Option<SecureChannel>,
    key: Option<ClusterKey>,
}

impl ControlClient {
    /// Connects and says hello.
    pub fn connect(addr: SocketAddr, options: &ClientOptions) -> Result<Self, ClientError> {
        let stream = TcpStream::connect_timeout(&addr, options.timeout)
            .map_err(|source| ClientError::Connect { addr, source })?;
        let io = |source| ClientError::Io { addr, source };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(options.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(options.timeout)).map_err(io)?;
        let placeholder =
            SessionInfo { session_id: 0, secret: 0, slab_size: 0, lease: Duration::ZERO, outcome: SessionOutcome::New };
        let channel = match &options.key {
            Some(key) => Some(
                SecureChannel::initiate(&mut &stream, key).map_err(|source| ClientError::Handshake { addr, source })?,
            ),
            None => None,
        };
        let mut client = Self {
            addr,
            stream,
            out: Vec::new(),
            body: Vec::new(),
            session: placeholder,
            client_id: 0,
            channel,
            key: options.key.clone(),
        };
        let client_id = match options.client_id {
            Some(id) => id,
            None => crate::ids::random_u64()
                .map_err(|e| ClientError::Io { addr, source: std::io::Error::other(e.to_string()) })?,
        };
        client.client_id = client_id;
        let hello = ControlRequest::Hello {
            client_id,
            provider: options.provider,
            resume: options.resume,
            token: options.token.clone(),
        };
        match client.call(&hello)? {
            ControlResponse::HelloOk { session_id, secret, slab_size, lease_ms, outcome } => {
                client.session =
                    SessionInfo { session_id, secret, slab_size, lease: Duration::from_millis(lease_ms), outcome };
                Ok(client)
            }
            other => Err(client.unexpected(&other)),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The session granted at hello.
    pub fn session(&self) -> &SessionInfo {
        &self.session
    }

    /// Sets how long a request may wait for its reply (and its bytes to be sent) from now on.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let addr = self.addr;
        let io = |source| ClientError::Io { addr, source };
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io)
    }

    /// The client id this connection said hello with.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// What a later connection needs to resume this session ([`ClientOptions::resume`], with
    /// the same [`ControlClient::client_id`]).
    pub fn proof(&self) -> SessionProof {
        SessionProof { session_id: self.session.session_id, secret: self.session.secret }
    }

    fn unexpected(&self, resp: &ControlResponse) -> ClientError {
        ClientError::Protocol { addr: self.addr, reason: format!("unexpected reply {resp:?}") }
    }

    fn call(&mut self, req: &ControlRequest) -> Result<ControlResponse, ClientError> {
        let addr = self.addr;
        self.out.clear();
        control::encode_request(&mut self.out, req);
        let sent = match &mut self.channel {
            Some(channel) => channel.send(&mut self.stream, &self.out),
            None => self.stream.write_all(&self.out),
        };
        sent.map_err(|source| ClientError::Io { addr, source })?;
        let received = match &mut self.channel {
            Some(channel) => channel.recv(&mut self.stream, &mut self.body),
            None => read_frame(&mut self.stream, &mut self.body),
        };
        let header = received.map_err(|e| match e {
            ReadFrameError::Io(source) => ClientError::Io { addr, source },
            ReadFrameError::Frame(f) => ClientError::Protocol { addr, reason: f.to_string() },
        })?;
        let resp = control::decode_response(header.kind, &self.body)
            .map_err(|e: FrameError| ClientError::Protocol { addr, reason: e.to_string() })?;
        match resp {
            ControlResponse::Error { code: ErrorCode::CapacityExhausted, message } => {
                Err(ClientError::CapacityExhausted { addr, message })
            }
            ControlResponse::Error { code: ErrorCode::SessionExpired, message } => {
                Err(ClientError::SessionExpired { addr, message })
            }
            ControlResponse::Error { code, message } => Err(ClientError::Refused { addr, code, message }),
            ok => Ok(ok),
        }
    }

    /// Allocates one slab.
    pub fn alloc_slab(&mut self) -> Result<SlabGrant, ClientError> {
        match self.call(&ControlRequest::AllocSlab)? {
            ControlResponse::SlabGranted(g) => Ok(g),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Frees one slab.
    pub fn free_slab(&mut self, slab_id: u64) -> Result<(), ClientError> {
        match self.call(&ControlRequest::FreeSlab { slab_id })? {
            ControlResponse::SlabFreed { slab_id: s } if s == slab_id => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Appends pages to the server's backup log (a `memory-server --persist`); returns how many
    /// it stored.
    pub fn backup_put(&mut self, pages: Vec<crate::control::BackupPage>) -> Result<u32, ClientError> {
        match self.call(&ControlRequest::BackupPut { pages })? {
            ControlResponse::BackupStored { count } => Ok(count),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The newest backup of a page (`Ok(None)`: the server has none).
    pub fn backup_get(&mut self, region: u32, page: u32) -> Result<Option<crate::control::BackupPage>, ClientError> {
        match self.call(&ControlRequest::BackupGet { region, page }) {
            Ok(ControlResponse::BackupPage(p)) => Ok(Some(p)),
            Err(ClientError::Refused { code: ErrorCode::NotFound, .. }) => Ok(None),
            Ok(other) => Err(self.unexpected(&other)),
            Err(e) => Err(e),
        }
    }

    /// Makes every page stored so far durable on the server.
    pub fn backup_sync(&mut self) -> Result<(), ClientError> {
        match self.call(&ControlRequest::BackupSync)? {
            ControlResponse::BackupSynced => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Drops every backup of this client; returns how many pages were dropped.
    pub fn backup_forget(&mut self) -> Result<u64, ClientError> {
        match self.call(&ControlRequest::BackupForget)? {
            ControlResponse::BackupForgotten { pages } => Ok(pages),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Renews the lease; returns its length, and whether the server is leaving.
    pub fn heartbeat(&mut self) -> Result<Heartbeat, ClientError> {
        match self.call(&ControlRequest::Heartbeat)? {
            ControlResponse::HeartbeatAck { lease_ms, leaving_in_ms } => Ok(Heartbeat {
                lease: Duration::from_millis(lease_ms),
                leaving_in: leaving_in_ms.map(Duration::from_millis),
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Fetches the server's statistics.
    pub fn stats(&mut self) -> Result<ServerStats, ClientError> {
        match self.call(&ControlRequest::Stats)? {
            ControlResponse::Stats(s) => Ok(s),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Opens a data endpoint (one queue pair) bound to this session, of either provider: the one
    /// call that picks the provider for a connection. For `verbs`, the device is opened once per
    /// process ([`crate::verbs::VerbsDevice::shared`]) and the queue pair addresses are exchanged
    /// on this control connection (`VERBS_CONNECT`).
    pub fn connect_endpoint(
        &mut self,
        provider: ProviderKind,
        options: &EndpointOptions,
    ) -> Result<Endpoint, TransportError> {
        match provider {
            ProviderKind::Shim => {
                let options = EndpointOptions { key: self.key.clone(), ..options.clone() };
                Endpoint::connect(provider, self.addr, self.session.session_id, self.session.secret, &options)
            }
            ProviderKind::Verbs => {
                let device = crate::verbs::VerbsDevice::shared(options.device.as_deref())?;
                let addr = self.addr;
                Endpoint::connect_verbs(&device, addr, options, |local| self.verbs_connect(local))
            }
        }
    }

    /// Asks the server for a queue pair connected to `local`; returns its address.
    pub fn verbs_connect(&mut self, local: QpAddress) -> Result<QpAddress, TransportError> {
        let to_transport = |e: ClientError| TransportError::Io {
            context: "exchanging queue pair addresses on the control connection",
            source: std::io::Error::other(e.to_string()),
        };
        match self.call(&ControlRequest::VerbsConnect { qp: local }).map_err(to_transport)? {
            ControlResponse::VerbsAccepted { qp } => Ok(qp),
            other => Err(to_transport(self.unexpected(&other))),
        }
    }
}
