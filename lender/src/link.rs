//! One connection to the lender as the server sees it: its stream and, once the peer proved the
//! cluster key, its sealed channel. The handshake's refusals (no key on one side, a wrong key)
//! are decided here; every frame of a sealed connection goes through the channel.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rdma::control::{self, ControlResponse, ErrorCode};
use rdma::frame::{Header, ReadFrameError};
use rdma::secure::{SecureChannel, KIND_NOISE_INIT};

use crate::deadline::read_frame_by;
use crate::server::Shared;

/// A connection's stream and, once it authenticated with the cluster key, its sealed channel
/// (every control frame then travels sealed).
pub(crate) struct Link {
    pub(crate) stream: TcpStream,
    pub(crate) channel: Option<SecureChannel>,
}

impl Link {
    /// Runs the handshake the first frame (of `kind`, body `init`) starts; false (and the
    /// connection is to be closed) when it is refused: no key on either side where the other has
    /// one, or a wrong key.
    pub(crate) fn authenticate(&mut self, kind: u8, init: &[u8], peer: SocketAddr, shared: &Shared) -> bool {
        let Some(key) = &shared.config.key else {
            tracing::warn!(%peer, "refusing connection: it authenticates with a cluster key and this lender has none");
            self.send_error(ErrorCode::BadRequest, "this memory-server has no cluster key; connect without --key-file");
            return false;
        };
        if kind != KIND_NOISE_INIT {
            tracing::warn!(%peer, "refusing connection: it did not authenticate with the cluster key");
            let msg = "this memory-server requires the cluster key: connect with --key-file (the file the lender uses)";
            self.send_error(ErrorCode::BadRequest, msg);
            return false;
        }
        match SecureChannel::accept(&mut &self.stream, key, init) {
            Ok(channel) => {
                self.channel = Some(channel);
                true
            }
            Err(e) => {
                shared.failed(peer, "handshake without the cluster key");
                tracing::warn!(%peer, error = %e, "refusing connection: the cluster-key handshake failed");
                self.send_error(
                    ErrorCode::BadRequest,
                    "the handshake failed: this memory-server holds another cluster key",
                );
                false
            }
        }
    }

    /// Sends one encoded frame (sealed if the connection is).
    pub(crate) fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match &mut self.channel {
            Some(channel) => channel.send(&mut &self.stream, frame),
            None => (&self.stream).write_all(frame),
        }
    }

    pub(crate) fn send_error(&mut self, code: ErrorCode, message: &str) {
        let mut out = Vec::new();
        control::encode_response(&mut out, &ControlResponse::Error { code, message: message.into() });
        let _ = self.send(&out);
    }

    /// Receives one frame (of at most `max_body` bytes) that must arrive complete within `within`.
    pub(crate) fn recv(
        &mut self,
        body: &mut Vec<u8>,
        max_body: u32,
        within: Duration,
    ) -> Result<Header, ReadFrameError> {
        match &mut self.channel {
            Some(channel) => channel.recv(&mut crate::deadline::reader(&self.stream, within), body),
            None => read_frame_by(&self.stream, body, max_body, within),
        }
    }
}
