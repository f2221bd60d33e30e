//! The cluster-key handshake as a lender runs it: any first message is refused without a panic
//! (nothing but a peer holding the key can complete it), and so is any sealed frame that
//! follows a completed handshake.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rdma::secure::{ClusterKey, SecureChannel};

fn key() -> &'static ClusterKey {
    static KEY: OnceLock<ClusterKey> = OnceLock::new();
    KEY.get_or_init(|| ClusterKey::generate().expect("a key"))
}

fuzz_target!(|data: &[u8]| {
    let mut reply = Vec::new();
    assert!(SecureChannel::accept(&mut reply, key(), data).is_err(), "a handshake without the key completed");
    // A real handshake, then the bytes as what the peer sends next.
    let mut to_responder = Vec::new();
    let mut no_reply = std::io::Cursor::new(Vec::new());
    // The initiator writes its first message, then finds no reply (and fails): only that first
    // message is needed.
    let _ = SecureChannel::initiate(&mut Pipe { written: &mut to_responder, reply: &mut no_reply }, key());
    let mut body = Vec::new();
    if let Ok(mut responder) = SecureChannel::accept(&mut Vec::new(), key(), frame_body(&to_responder)) {
        let _ = responder.recv(&mut &data[..], &mut body);
    }
});

/// Strips the frame header the initiator wrote.
fn frame_body(frame: &[u8]) -> &[u8] {
    frame.get(rdma::frame::HEADER_LEN..).unwrap_or(&[])
}

/// Writes go to `written`; reads come from `reply` (empty: the initiator's handshake fails,
/// which is fine: only its first message is used).
struct Pipe<'a> {
    written: &'a mut Vec<u8>,
    reply: &'a mut std::io::Cursor<Vec<u8>>,
}

impl std::io::Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reply.read(buf)
    }
}
