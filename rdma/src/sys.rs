//! Thin, checked wrappers over the system calls the providers need beyond `std`: per-call
//! non-blocking `recv`/`send` (so the socket stays blocking for everything else), `ppoll` with a
//! microsecond timeout, and the target's gathered send of READ payloads from where they lie.

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

/// The most buffers one `sendmsg(2)` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Sends `head`, then the bytes of every `(address, length)` in `segments`, in order, with
/// `sendmsg(2)` (`MSG_NOSIGNAL`: a closed peer gives `EPIPE`, never `SIGPIPE`), blocking until all
/// are sent; the kernel copies them straight from where they lie.
///
/// # Safety
///
/// Every segment must be memory readable for its whole length that stays mapped until the call
/// returns (it may change meanwhile: the bytes sent are then some mix, as with a NIC).
pub unsafe fn send_all_from(fd: BorrowedFd<'_>, head: &[u8], segments: &[(usize, usize)]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = std::iter::once((head.as_ptr() as usize, head.len()))
        .chain(segments.iter().copied())
        .filter(|&(_, len)| len > 0)
        .map(|(addr, len)| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len })
        .collect();
    let mut at = 0;
    while at < iov.len() {
        let end = (at + IOV_MAX).min(iov.len());
        let batch = &mut iov[at..end];
        // SAFETY: an all-zero msghdr is valid (no address, no control data, no buffers).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = batch.as_mut_ptr();
        msg.msg_iovlen = batch.len();
        // SAFETY: `msg` points at `batch.len()` iovecs, each naming readable memory that stays
        // mapped for the call (`head` is borrowed; the segments by this function's contract), and
        // `fd` is a live borrowed descriptor. The kernel only reads the buffers.
        let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        let Ok(mut sent) = usize::try_from(sent) else {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        };
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Skip what went out; a buffer sent in part keeps its rest.
        while sent > 0 {
            // The kernel never reports more than it was given; stop rather than index past.
            let Some(first) = iov.get_mut(at) else { break };
            if sent >= first.iov_len {
                sent -= first.iov_len;
                at += 1;
            } else {
                first.iov_base = first.iov_base.cast::<u8>().wrapping_add(sent).cast();
                first.iov_len -= sent;
                sent = 0;
            }
        }
    }
    Ok(())
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
