//! Authenticated, encrypted connections for a cluster that shares a key.
//!
//! Lenders and borrowers of one cluster share a 256-bit key ([`ClusterKey`], a file made by
//! `coalesce keygen`). A connection to a lender that has one starts with a Noise handshake
//! (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, through `snow`): both sides prove they hold the key,
//! and fresh ephemeral keys give the connection its own traffic keys (a recorded connection stays
//! unreadable even if the cluster key leaks later). A peer without the key learns nothing and gets
//! nothing: the lender closes the connection.
//!
//! After the handshake, a control connection carries every frame sealed ([`KIND_SEALED`]: one
//! Noise transport message holding one whole inner frame), so the session secret granted at
//! HELLO never crosses the network in the clear. A data connection sends its `DATA_CONNECT`
//! (which carries that secret) and receives the reply sealed, then moves pages in the clear:
//! pages are sealed by the borrower itself ([`crate`] users: the pager's sealing store), and the
//! lender's CPU must not be in the data path.
//!
//! | kind | name | body |
//! |---|---|---|
//! | `0x20` | NOISE_INIT | the initiator's first handshake message (`-> psk, e`) |
//! | `0x21` | NOISE_REPLY | the responder's handshake message (`<- e, ee`) |
//! | `0x22` | SEALED | a Noise transport message whose plaintext is one complete frame (header and body) |

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;

use crate::frame::{encode_frame, read_frame_within, Header, ReadFrameError, HEADER_LEN};

/// Frame kind: the first handshake message.
pub const KIND_NOISE_INIT: u8 = 0x20;
/// Frame kind: the responder's handshake message.
pub const KIND_NOISE_REPLY: u8 = 0x21;
/// Frame kind: one sealed frame.
pub const KIND_SEALED: u8 = 0x22;

/// The Noise protocol spoken.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message (the protocol's limit): a sealed frame is at most this long.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// The Noise tag on every transport message.
const NOISE_TAG: usize = 16;

/// Why a key file could not be used, or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The key file could not be read or written.
    #[error("cannot use the key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("the key file {path} does not hold a cluster key (64 hex digits, as `coalesce keygen` writes)")]
    NotAKey {
        /// The file.
        path: String,
    },
    /// The key file can be read by others.
    #[error("the key file {path} can be read by other users (mode {mode:o}); chmod 600 it")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The OS random generator failed.
    #[error(transparent)]
    Random(#[from] crate::ids::RandomError),
    /// The peer refused the handshake, and said why.
    #[error("the peer refused the handshake: {0}")]
    Refused(String),
    /// The peer does not hold the same key, or is not speaking this protocol.
    #[error("the handshake failed: the peer does not hold this cluster's key, or is not a Coalesce peer")]
    Handshake,
    /// The connection failed during the handshake.
    #[error("the connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was malformed.
    #[error("malformed frame during the handshake: {0}")]
    Frame(#[from] crate::frame::FrameError),
}

impl From<ReadFrameError> for SecureError {
    fn from(e: ReadFrameError) -> Self {
        match e {
            ReadFrameError::Io(e) => Self::Io(e),
            ReadFrameError::Frame(f) => Self::Frame(f),
        }
    }
}

/// A cluster's shared 256-bit key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<hidden>)")
    }
}

impl ClusterKey {
    /// A new random key from the OS CSPRNG.
    pub fn generate() -> Result<Self, SecureError> {
        let mut k = [0u8; 32];
        for chunk in k.chunks_mut(8) {
            chunk.copy_from_slice(&crate::ids::random_u64()?.to_le_bytes());
        }
        Ok(Self(k))
    }

    /// Reads a key file (64 hex digits; whitespace around them is ignored). A file that other
    /// users can read is refused.
    pub fn from_file(path: &Path) -> Result<Self, SecureError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecureError::KeyFile { path: shown.clone(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecureError::Exposed { path: shown, mode });
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| SecureError::KeyFile { path: shown.clone(), source })?;
        Self::from_hex(text.trim()).ok_or(SecureError::NotAKey { path: shown })
    }

    /// Writes a new random key to `path` (mode 600; an existing file is not overwritten).
    pub fn write_new(path: &Path) -> Result<Self, SecureError> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = Self::generate()?;
        let shown = path.display().to_string();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| SecureError::KeyFile { path: shown.clone(), source })?;
        writeln!(file, "{}", key.to_hex()).map_err(|source| SecureError::KeyFile { path: shown, source })?;
        Ok(key)
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(k))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn builder(key: &ClusterKey) -> Result<snow::Builder<'_>, SecureError> {
    let params = NOISE_PARAMS.parse().map_err(|_| SecureError::Handshake)?;
    snow::Builder::new(params).psk(0, &key.0).map_err(|_| SecureError::Handshake)
}

/// One side of an authenticated connection, after the handshake.
pub struct SecureChannel {
    transport: snow::TransportState,
    plain: Vec<u8>,
    cipher: Vec<u8>,
}

impl fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecureChannel")
    }
}

impl SecureChannel {
    fn new(transport: snow::TransportState) -> Self {
        Self { transport, plain: vec![0; MAX_NOISE_MESSAGE], cipher: vec![0; MAX_NOISE_MESSAGE] }
    }

    /// Runs the initiator's side of the handshake on `stream` (a fresh connection).
    pub fn initiate<S: Read + Write>(stream: &mut S, key: &ClusterKey) -> Result<Self, SecureError> {
        let mut hs = builder(key)?.build_initiator().map_err(|_| SecureError::Handshake)?;
        let mut msg = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut msg).map_err(|_| SecureError::Handshake)?;
        let mut out = Vec::new();
        encode_frame(&mut out, KIND_NOISE_INIT, |e| {
            e.raw(&msg[..n]);
        });
        stream.write_all(&out)?;
        let mut body = Vec::new();
        let header = match read_frame_within(stream, &mut body, 4096) {
            Ok(h) => h,
            // A lender that cannot authenticate us closes the connection.
            Err(ReadFrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(SecureError::Handshake)
            }
            Err(e) => return Err(e.into()),
        };
        if header.kind == crate::control::KIND_ERROR {
            return Err(match crate::control::decode_response(header.kind, &body) {
                Ok(crate::control::ControlResponse::Error { message, .. }) => SecureError::Refused(message),
                _ => SecureError::Handshake,
            });
        }
        if header.kind != KIND_NOISE_REPLY {
            return Err(SecureError::Handshake);
        }
        let mut ignored = vec![0u8; 1024];
        hs.read_message(&body, &mut ignored).map_err(|_| SecureError::Handshake)?;
        let transport = hs.into_transport_mode().map_err(|_| SecureError::Handshake)?;
        Ok(Self::new(transport))
    }

    /// Runs the responder's side: `init` is the body of the peer's `NOISE_INIT` frame, already
    /// read. Fails (and sends nothing) when the peer does not hold `key`.
    pub fn accept<S: Write>(stream: &mut S, key: &ClusterKey, init: &[u8]) -> Result<Self, SecureError> {
        let mut hs = builder(key)?.build_responder().map_err(|_| SecureError::Handshake)?;
        let mut ignored = vec![0u8; 1024];
        hs.read_message(init, &mut ignored).map_err(|_| SecureError::Handshake)?;
        let mut msg = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut msg).map_err(|_| SecureError::Handshake)?;
        let mut out = Vec::new();
        encode_frame(&mut out, KIND_NOISE_REPLY, |e| {
            e.raw(&msg[..n]);
        });
        stream.write_all(&out)?;
        let transport = hs.into_transport_mode().map_err(|_| SecureError::Handshake)?;
        Ok(Self::new(transport))
    }

    /// Seals one complete frame (header and body, as `encode_*` functions write it) and sends it.
    pub fn send<S: Write>(&mut self, stream: &mut S, frame: &[u8]) -> std::io::Result<()> {
        if frame.len() + NOISE_TAG > MAX_NOISE_MESSAGE {
            return Err(std::io::Error::other("frame too large to seal"));
        }
        let n = self
            .transport
            .write_message(frame, &mut self.cipher)
            .map_err(|_| std::io::Error::other("sealing a frame failed"))?;
        let mut out = Vec::with_capacity(HEADER_LEN + n);
        encode_frame(&mut out, KIND_SEALED, |e| {
            e.raw(&self.cipher[..n]);
        });
        stream.write_all(&out)
    }

    /// Receives one sealed frame and opens it: returns the inner frame's header, its body in
    /// `body`. A frame that is not sealed, or fails to open, is an error (the connection must
    /// then be closed).
    pub fn recv<S: Read>(&mut self, stream: &mut S, body: &mut Vec<u8>) -> Result<Header, ReadFrameError> {
        let mut sealed = Vec::new();
        let max = u32::try_from(MAX_NOISE_MESSAGE).unwrap_or(u32::MAX);
        let outer = read_frame_within(stream, &mut sealed, max)?;
        if outer.kind != KIND_SEALED {
            return Err(crate::frame::FrameError::UnexpectedKind(outer.kind).into());
        }
        let n = self
            .transport
            .read_message(&sealed, &mut self.plain)
            .map_err(|_| invalid("sealed frame", "failed to open: changed in transit, or out of order"))?;
        let inner = &self.plain[..n];
        let head: [u8; HEADER_LEN] = inner
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| invalid("sealed frame", "too short"))?;
        let header = Header::decode(&head)?;
        let rest = &inner[HEADER_LEN..];
        if rest.len() != crate::frame::usize_from(header.body_len) {
            return Err(invalid("sealed frame", "its inner length does not match"));
        }
        body.clear();
        body.extend_from_slice(rest);
        Ok(header)
    }
}

fn invalid(field: &'static str, reason: &str) -> ReadFrameError {
    crate::frame::FrameError::Invalid { field, reason: reason.into() }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe-like stream for one direction of a test.
    fn pair(key_a: &ClusterKey, key_b: &ClusterKey) -> Result<(SecureChannel, SecureChannel), SecureError> {
        let mut to_b = Vec::new();
        // Step 1: a writes its init into `to_b`; b reads it and answers; a reads the answer.
        let mut a_side = std::io::Cursor::new(Vec::new());
        let mut hs = builder(key_a)?.build_initiator().map_err(|_| SecureError::Handshake)?;
        let mut msg = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut msg).map_err(|_| SecureError::Handshake)?;
        to_b.extend_from_slice(&msg[..n]);
        let b = SecureChannel::accept(&mut a_side, key_b, &to_b)?;
        let reply = a_side.into_inner();
        let mut body = Vec::new();
        let header = read_frame_within(&mut reply.as_slice(), &mut body, 1024)?;
        assert_eq!(header.kind, KIND_NOISE_REPLY);
        let mut ignored = vec![0u8; 1024];
        hs.read_message(&body, &mut ignored).map_err(|_| SecureError::Handshake)?;
        let a = SecureChannel::new(hs.into_transport_mode().map_err(|_| SecureError::Handshake)?);
        Ok((a, b))
    }

    #[test]
    fn frames_cross_sealed_and_a_wrong_key_is_refused() {
        let key = ClusterKey::generate().expect("key");
        let (mut a, mut b) = pair(&key, &key).expect("handshake");
        let mut frame = Vec::new();
        encode_frame(&mut frame, 0x07, |e| {
            e.u64(0x1122_3344_5566_7788);
        });
        let mut wire = Vec::new();
        a.send(&mut wire, &frame).expect("send");
        assert!(!wire.windows(8).any(|w| w == 0x1122_3344_5566_7788u64.to_le_bytes()), "plaintext on the wire");
        let mut body = Vec::new();
        let h = b.recv(&mut wire.as_slice(), &mut body).expect("recv");
        assert_eq!((h.kind, body.as_slice()), (0x07, &0x1122_3344_5566_7788u64.to_le_bytes()[..]));
        // A changed byte fails to open.
        a.send(&mut wire, &frame).expect("send");
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut rest = &wire[wire.len() - (HEADER_LEN + frame.len() + NOISE_TAG)..];
        assert!(b.recv(&mut rest, &mut body).is_err());
        let other = ClusterKey::generate().expect("key");
        assert!(matches!(pair(&key, &other), Err(SecureError::Handshake)));
    }

    #[test]
    fn key_files_round_trip_and_exposed_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("coalesce-key-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let key = ClusterKey::write_new(&path).expect("write");
        assert_eq!(ClusterKey::from_file(&path).expect("read"), key);
        assert!(ClusterKey::write_new(&path).is_err(), "an existing key is never overwritten");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(ClusterKey::from_file(&path), Err(SecureError::Exposed { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(ClusterKey::from_file(&path), Err(SecureError::NotAKey { .. })));
        let _ = std::fs::remove_file(&path);
        assert!(!format!("{key:?}").contains(&key.to_hex()[..8]));
    }
}
