//! Thin, checked wrappers over the socket system calls the shim's client needs beyond `std`:
//! per-call non-blocking `recv`/`send` (so the socket stays blocking for everything else) and
//! `ppoll` with a microsecond timeout.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `send(2)` with `MSG_DONTWAIT | MSG_NOSIGNAL` (a closed peer gives `EPIPE`, never `SIGPIPE`).
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid buffer of `buf.len()` bytes and `fd` a live borrowed descriptor.
    let n =
        unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Waits until any of `fds` is readable or `timeout` passes. Returns whether one is ready.
/// Interrupted waits report "not ready".
pub fn wait_any_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    ppoll(&mut pfds, timeout)
}

/// Waits until `fd` is readable (`want_write`: writable) or `timeout` passes. Returns whether it is
/// ready. Interrupted waits report "not ready" so callers re-check their deadline.
pub fn wait_fd(fd: BorrowedFd<'_>, want_write: bool, timeout: Duration) -> io::Result<bool> {
    let events = if want_write { libc::POLLOUT } else { libc::POLLIN };
    ppoll(&mut [libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }], timeout)
}

/// `ppoll(2)` over `pfds` (live descriptors) for up to `timeout`: whether one is ready; an
/// interrupted wait is "not ready".
fn ppoll(pfds: &mut [libc::pollfd], timeout: Duration) -> io::Result<bool> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos().min(999_999_999).cast_signed()),
    };
    let n = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `pfds` holds `n` valid pollfd entries for descriptors the callers borrow for the
    // call, `ts` is valid for the call, and a null signal mask leaves the mask unchanged.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), n, &ts, std::ptr::null()) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}

/// `recv(2)` with `MSG_DONTWAIT`, reading into the spare capacity of `buf` (at most `max` bytes) and
/// growing its length by the bytes received. `Ok(0)` is end of stream; `WouldBlock` means
/// nothing to read.
pub fn recv_into_spare(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(max);
    // SAFETY: `spare` is the vector's uninitialised tail, valid for writes of `want` bytes; recv
    // writes at most `want` bytes into it and never reads it.
    let n = unsafe { libc::recv(fd.as_raw_fd(), spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialised exactly `n <= want` bytes past the old length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
