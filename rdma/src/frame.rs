//! The frame envelope shared by the data path (shim) and the control protocol: a fixed 12-byte header
//! (magic, version, kind, flags, body length) and bounds-checked cursors to encode and decode bodies.
//!
//! Everything here treats its input as hostile: every read is checked, nothing panics, and a body
//! length beyond [`MAX_BODY_LEN`] is refused, and a body's memory grows only as its bytes arrive.

use std::io::{self, Read};

/// Magic number that opens every frame (`b"CLSC"` read as a little-endian `u32`).
pub const MAGIC: u32 = u32::from_le_bytes(*b"CLSC");
/// The only protocol version this build speaks.
pub const VERSION: u8 = 3;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted: 16 MiB of payload plus room for a full scatter list.
pub const MAX_BODY_LEN: u32 = 16 * 1024 * 1024 + 64 * 1024;

/// Why a frame was refused. Each variant names the field that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes were not the Coalesce magic: the peer is not speaking this protocol.
    #[error("bad magic {0:#010x}: the peer does not speak the Coalesce protocol")]
    BadMagic(u32),
    /// The peer speaks a protocol version this build does not know.
    #[error("unsupported protocol version {got} (this build speaks version {VERSION}); upgrade the older side")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u8,
    },
    /// Reserved flag bits were set.
    #[error("reserved flags {0:#06x} are set; the frame is malformed")]
    ReservedFlags(u16),
    /// The declared body length exceeds the limit where it was read ([`MAX_BODY_LEN`], or less
    /// before a connection has proved a session).
    #[error("declared body length {len} exceeds the limit of {limit} bytes here")]
    TooLong {
        /// The declared length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The frame kind is not one this side accepts here.
    #[error("unexpected frame kind {0:#04x}")]
    UnexpectedKind(u8),
    /// The body ended before a field was complete.
    #[error("body truncated while reading {0}")]
    Truncated(&'static str),
    /// The body had bytes left over after its last field.
    #[error("{0} trailing bytes after the last field")]
    Trailing(usize),
    /// A field held a value outside its allowed range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind (see the tables in the crate documentation).
    pub kind: u8,
    /// Length of the body that follows the header.
    pub body_len: u32,
}

impl Header {
    /// Encodes the header for a body of `body_len` bytes.
    pub fn encode(kind: u8, body_len: u32) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = VERSION;
        out[5] = kind;
        // bytes 6..8: flags, zero in versions 1 and 2
        out[8..12].copy_from_slice(&body_len.to_le_bytes());
        out
    }

    /// Decodes and validates a header: magic, version, reserved flags and the length bound.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if bytes[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { got: bytes[4] });
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let body_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if body_len > MAX_BODY_LEN {
            return Err(FrameError::TooLong { len: body_len, limit: MAX_BODY_LEN });
        }
        Ok(Self { kind: bytes[5], body_len })
    }
}

/// Error while reading a frame from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame (header and body) from a blocking stream; the body goes into `body`, whose
/// allocation is reused across calls.
pub fn read_frame<R: Read>(stream: &mut R, body: &mut Vec<u8>) -> Result<Header, ReadFrameError> {
    read_frame_within(stream, body, MAX_BODY_LEN)
}

/// Reads one frame whose body may be at most `max_body` bytes (a tighter bound than
/// [`MAX_BODY_LEN`], for connections that have not proved anything yet). The body's memory grows
/// only as its bytes arrive: a header that announces a large body and sends nothing costs nothing.
pub fn read_frame_within<R: Read>(stream: &mut R, body: &mut Vec<u8>, max_body: u32) -> Result<Header, ReadFrameError> {
    let mut head = [0u8; HEADER_LEN];
    stream.read_exact(&mut head)?;
    let header = Header::decode(&head)?;
    if header.body_len > max_body {
        return Err(FrameError::TooLong { len: header.body_len, limit: max_body.min(MAX_BODY_LEN) }.into());
    }
    read_body(stream, body, usize_from(header.body_len))?;
    Ok(header)
}

/// Reads exactly `len` bytes into `body`: straight into the buffer when an earlier frame already
/// made it large enough, otherwise growing it with the bytes received.
fn read_body<R: Read>(stream: &mut R, body: &mut Vec<u8>, len: usize) -> io::Result<()> {
    body.clear();
    if body.capacity() >= len {
        body.resize(len, 0);
        return stream.read_exact(body);
    }
    let got = stream.take(len as u64).read_to_end(body)?;
    if got < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the frame's body ended early"));
    }
    Ok(())
}

/// Appends a complete frame to `out`: the header is written first with a placeholder length, `fill`
/// writes the body, then the length is patched in.
pub fn encode_frame(out: &mut Vec<u8>, kind: u8, fill: impl FnOnce(&mut Encoder<'_>)) {
    let start = out.len();
    out.extend_from_slice(&Header::encode(kind, 0));
    fill(&mut Encoder { out });
    let body_len = u32::try_from(out.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
    out[start + 8..start + 12].copy_from_slice(&body_len.to_le_bytes());
}

/// Converts a wire `u32` to `usize` (lossless on the 32- and 64-bit targets this crate supports).
pub fn usize_from(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Little-endian body writer.
#[derive(Debug)]
pub struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    /// Writes one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    /// Writes a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Writes a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Writes a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Writes raw bytes with no length prefix.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    /// Writes a byte string with a `u16` length prefix; longer input is cut at `u16::MAX` bytes.
    pub fn bytes16(&mut self, bytes: &[u8]) -> &mut Self {
        let len = bytes.len().min(usize::from(u16::MAX));
        self.u16(u16::try_from(len).unwrap_or(u16::MAX));
        self.raw(&bytes[..len])
    }
    /// Reserves `len` bytes at the end and returns them for the caller to fill.
    pub fn space(&mut self, len: usize) -> &mut [u8] {
        let start = self.out.len();
        self.out.resize(start + len, 0);
        &mut self.out[start..]
    }
}

/// Little-endian, bounds-checked body reader.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Starts reading `buf` from its first byte.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).ok_or(FrameError::Truncated(what))?;
        let slice = self.buf.get(self.pos..end).ok_or(FrameError::Truncated(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(what)?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.array(what).map(u16::from_le_bytes)
    }
    /// Reads a `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.array(what).map(u32::from_le_bytes)
    }
    /// Reads a `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.array(what).map(u64::from_le_bytes)
    }
    /// Reads `n` raw bytes.
    pub fn raw(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        self.take(n, what)
    }
    /// Reads a byte string with a `u16` length prefix.
    pub fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
    /// Reads a UTF-8 string with a `u16` length prefix (invalid UTF-8 is replaced, never refused).
    pub fn string16(&mut self, what: &'static str) -> Result<String, FrameError> {
        Ok(String::from_utf8_lossy(self.bytes16(what)?).into_owned())
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Succeeds only if every byte was consumed.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_large_declared_body_costs_memory_only_as_it_arrives() {
        // A header announcing 16 MiB, then 100 bytes and the end of the stream.
        let mut input = Header::encode(0x21, 16 << 20).to_vec();
        input.extend_from_slice(&[7u8; 100]);
        let mut body = Vec::new();
        let err = read_frame(&mut input.as_slice(), &mut body).expect_err("truncated");
        assert!(matches!(err, ReadFrameError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof), "{err}");
        assert!(body.capacity() < 64 * 1024, "allocated {} bytes for 100 received", body.capacity());
        // Below a tighter limit it is refused before any body byte is read.
        let err = read_frame_within(&mut input.as_slice(), &mut body, 4096).expect_err("too long");
        assert!(err.to_string().contains("limit of 4096"), "{err}");
        // A complete frame still reads, and a reused buffer keeps working.
        let mut ok = Header::encode(0x21, 3).to_vec();
        ok.extend_from_slice(b"abc");
        assert_eq!(read_frame_within(&mut ok.as_slice(), &mut body, 4096).expect("frame").body_len, 3);
        assert_eq!(body, b"abc");
    }

    #[test]
    fn header_round_trip() {
        let h = Header::encode(0x21, 4096);
        assert_eq!(Header::decode(&h), Ok(Header { kind: 0x21, body_len: 4096 }));
    }

    #[test]
    fn header_rejects_each_bad_field() {
        let good = Header::encode(1, 10);
        let mut bad = good;
        bad[0] ^= 0xff;
        assert!(matches!(Header::decode(&bad), Err(FrameError::BadMagic(_))));
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(Header::decode(&bad), Err(FrameError::UnsupportedVersion { got: 9 }));
        let mut bad = good;
        bad[6] = 1;
        assert_eq!(Header::decode(&bad), Err(FrameError::ReservedFlags(1)));
        let bad = Header::encode(1, MAX_BODY_LEN + 1);
        assert_eq!(Header::decode(&bad), Err(FrameError::TooLong { len: MAX_BODY_LEN + 1, limit: MAX_BODY_LEN }));
    }

    #[test]
    fn decoder_reports_truncation_and_trailing_bytes() {
        let mut d = Decoder::new(&[1, 2, 3]);
        assert_eq!(d.u16("a"), Ok(0x0201));
        assert_eq!(d.u16("b"), Err(FrameError::Truncated("b")));
        assert_eq!(d.finish(), Err(FrameError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(bytes in proptest::array::uniform12(any::<u8>())) {
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn read_frame_on_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut body = Vec::new();
            let _ = read_frame(&mut bytes.as_slice(), &mut body);
        }
    }
}
