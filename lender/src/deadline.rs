//! Reading frames from a TCP connection under deadlines: an idle wait for a frame's first byte,
//! then one deadline for the whole frame, so that a peer trickling a byte at a time cannot hold
//! a connection thread (a per-read timeout would restart with every byte).

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdma::frame::{read_frame_within, Header, ReadFrameError};

/// A reader that fails with `TimedOut` once `until` has passed, however the bytes trickle in.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
    within: Duration,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(self.within));
        }
        self.stream.set_read_timeout(Some(left))?;
        match (&mut &*self.stream).read(buf) {
            Err(e) if is_timeout(&e) => Err(timed_out(self.within)),
            other => other,
        }
    }
}

fn timed_out(within: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the frame did not arrive complete within {} ms", within.as_millis()),
    )
}

/// True for the errors a socket read timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A reader of `stream` whose reads fail with `TimedOut` once `within` from now has passed.
pub fn reader(stream: &TcpStream, within: Duration) -> impl Read + '_ {
    Deadline { stream, until: Instant::now() + within, within }
}

/// Reads one frame whose body is at most `max_body` bytes and which must arrive complete within
/// `within` from now.
pub fn read_frame_by(
    stream: &TcpStream,
    body: &mut Vec<u8>,
    max_body: u32,
    within: Duration,
) -> Result<Header, ReadFrameError> {
    let mut reader = Deadline { stream, until: Instant::now() + within, within };
    read_frame_within(&mut reader, body, max_body)
}

/// Waits up to `idle` for the next byte to arrive, without consuming it. `Ok(false)`: the peer
/// closed the connection; a `TimedOut` error: nothing came.
pub fn wait_for_data(stream: &TcpStream, idle: Duration) -> io::Result<bool> {
    stream.set_read_timeout(Some(idle))?;
    let mut one = [0u8; 1];
    loop {
        match stream.peek(&mut one) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing received for {} s", idle.as_secs()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn a_trickled_frame_fails_at_the_deadline_not_per_byte() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            // A valid header announcing 64 bytes, then one byte every 50 ms.
            let _ = s.write_all(&rdma::frame::Header::encode(0x01, 64));
            for _ in 0..40 {
                if s.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (server, _) = listener.accept().expect("accept");
        let mut body = Vec::new();
        let err = read_frame_by(&server, &mut body, 4096, Duration::from_millis(300)).expect_err("trickled");
        // Each byte came well within 300 ms of the last: only a whole-frame deadline stops this
        // before the writer gives up (which would be an early end, not a timeout).
        assert!(matches!(err, ReadFrameError::Io(ref e) if e.kind() == io::ErrorKind::TimedOut), "{err}");
        drop(server);
        let _ = writer.join();
    }
}
