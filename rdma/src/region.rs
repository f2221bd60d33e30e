//! Registered local memory: the buffers that one-sided READs land in and WRITEs send from.
//!
//! The "NIC" (a provider's receive path) writes into a region behind Rust's back, so a region
//! hands out no lasting references; callers copy in and out with [`LocalRegion::write_at`] and
//! [`LocalRegion::read_at`], take raw pointers for zero-copy use (e.g. `UFFDIO_COPY`), or work on
//! a range in place for the length of one call to the unsafe [`LocalRegion::modify_at`], whose
//! caller vouches that nothing else touches the range meanwhile.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::TransportError;

static NEXT_LKEY: AtomicU32 = AtomicU32::new(1);

/// A page-aligned, registered local buffer.
#[derive(Debug)]
pub struct LocalRegion {
    map: MmapMut,
    lkey: u32,
}

impl LocalRegion {
    /// Maps and registers `len` bytes of zeroed, page-aligned memory.
    pub fn new(len: usize) -> Result<Arc<Self>, TransportError> {
        if len == 0 {
            return Err(TransportError::InvalidArgument("a local region needs at least one byte".into()));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|e| TransportError::Io { context: "mapping a local region", source: e })?;
        let lkey = NEXT_LKEY.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Self { map, lkey }))
    }

    /// Local key of the registration.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    /// Checks that `[offset, offset + len)` lies inside the region.
    pub fn check(&self, offset: usize, len: usize) -> Result<(), TransportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(TransportError::LocalBounds { offset, len, region_len: self.len() }),
        }
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// Writing bytes that an outstanding READ also targets leaves them unspecified, as on a NIC.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), TransportError> {
        self.check(offset, src.len())?;
        // SAFETY: the range was bounds-checked against the live mapping above; the mapping is raw
        // memory that no lasting Rust reference aliases (only `modify_at` lends a slice, whose
        // caller promised that nothing else, this call included, touches that range meanwhile),
        // so `src` cannot overlap the destination range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    /// Copies bytes at `offset` out of the region into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), TransportError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; `dst` is an exclusive borrow and cannot alias the source
        // range (a slice lent by `modify_at` may be `dst` only for another range, or another
        // region: its caller promised that nothing else touches the lent range meanwhile).
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Runs `f` on `[offset, offset + len)` as a mutable slice: work in place, without copying
    /// the bytes out and back (e.g. opening a sealed page where it landed).
    ///
    /// # Safety
    ///
    /// While `f` runs, nothing else may read or write the range: no other thread, no outstanding
    /// work request (a READ landing there or a WRITE sending from there), and no access through
    /// this region's own methods from inside `f`.
    pub unsafe fn modify_at<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, TransportError> {
        self.check(offset, len)?;
        // SAFETY: the range was bounds-checked against the live mapping (which `&self` keeps
        // mapped for the whole call), and the caller guarantees that nothing else accesses it
        // while the slice lives; the slice does not outlive `f`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(offset), len) };
        Ok(f(bytes))
    }
}

/// A byte range of a registered region, as named in a work request.
#[derive(Debug, Clone)]
pub struct LocalSlice {
    /// The region (kept alive until the work request completes).
    pub region: Arc<LocalRegion>,
    /// Offset of the first byte in the region.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Most slices [`LocalSlice::receive_into`] fills in one system call.
const MAX_IOVECS: usize = 128;

impl LocalSlice {
    /// Names `[offset, offset + len)` of `region`, checking bounds.
    pub fn new(region: &Arc<LocalRegion>, offset: usize, len: usize) -> Result<Self, TransportError> {
        region.check(offset, len)?;
        Ok(Self { region: Arc::clone(region), offset, len })
    }

    /// Receives up to `max` bytes from the stream socket `fd` straight into `slices` in order,
    /// starting `skip` bytes into the first: one `recvmsg(2)` (`MSG_DONTWAIT`) fills as many
    /// slices as have data waiting (at most 128), where one `recv` per slice would cost a system
    /// call per page. Returns the bytes received (0: end of stream); `WouldBlock` when none are
    /// waiting; `InvalidInput` when there is no room to receive into.
    pub(crate) fn receive_into(
        slices: &[LocalSlice],
        skip: usize,
        max: usize,
        fd: BorrowedFd<'_>,
    ) -> std::io::Result<usize> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS];
        let mut count = 0;
        let (mut skip, mut left) = (skip, max);
        for s in slices {
            if left == 0 || count == MAX_IOVECS {
                break;
            }
            let len = s.len.checked_sub(skip).ok_or_else(|| invalid("receive past the end of a slice"))?.min(left);
            let at = s.offset.checked_add(skip).ok_or_else(|| invalid("slice offset overflows"))?;
            s.region.check(at, len).map_err(std::io::Error::other)?;
            if len > 0 {
                iov[count] = libc::iovec { iov_base: s.region.as_ptr().wrapping_add(at).cast(), iov_len: len };
                count += 1;
            }
            left -= len;
            skip = 0;
        }
        if count == 0 {
            return Err(invalid("no room to receive into"));
        }
        // SAFETY: `msghdr` is plain data for which all zeroes is a valid value (no name, no
        // control data, no flags).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = count;
        // SAFETY: every iovec names a bounds-checked range of a live mapping (each slice holds
        // its region alive) that no Rust reference aliases; recvmsg writes at most `iov_len`
        // bytes into each, and `iov` outlives the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_in_and_out_and_checks_bounds() {
        let r = LocalRegion::new(8192).expect("map");
        r.write_at(4090, b"hello").expect("in bounds");
        let mut out = [0u8; 5];
        r.read_at(4090, &mut out).expect("in bounds");
        assert_eq!(&out, b"hello");
        assert!(r.write_at(8190, b"abc").is_err());
        assert!(r.read_at(usize::MAX, &mut out).is_err());
        assert!(LocalSlice::new(&r, 8192, 1).is_err());
        assert!(LocalRegion::new(0).is_err());
    }

    #[test]
    fn modifies_a_range_in_place_and_checks_bounds() {
        let r = LocalRegion::new(8192).expect("map");
        r.write_at(4096, b"abcd").expect("in bounds");
        // SAFETY: this test is the region's only user.
        let sum = unsafe {
            r.modify_at(4097, 2, |bytes| {
                bytes.make_ascii_uppercase();
                bytes.iter().map(|&b| u32::from(b)).sum::<u32>()
            })
        };
        assert_eq!(sum.expect("in bounds"), u32::from(b'B') + u32::from(b'C'));
        let mut out = [0u8; 4];
        r.read_at(4096, &mut out).expect("in bounds");
        assert_eq!(&out, b"aBCd");
        // SAFETY: as above; out of bounds, `f` never runs.
        assert!(unsafe { r.modify_at::<()>(8190, 3, |_| unreachable!("out of bounds")) }.is_err());
        // SAFETY: as above.
        assert!(unsafe { r.modify_at::<()>(usize::MAX, 2, |_| unreachable!("overflow")) }.is_err());
    }

    #[test]
    fn receives_across_slices_of_several_regions_in_one_call_and_never_past_max() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let (a, b) = (LocalRegion::new(4096).expect("map"), LocalRegion::new(4096).expect("map"));
        let slices = vec![
            LocalSlice::new(&a, 100, 10).expect("in bounds"),
            LocalSlice::new(&b, 0, 0).expect("in bounds"),
            LocalSlice::new(&b, 4000, 20).expect("in bounds"),
            LocalSlice::new(&a, 0, 30).expect("in bounds"),
        ];
        let sent: Vec<u8> = (1..=56).collect();
        tx.write_all(&sent).expect("send");
        // Skip 4 bytes of the first slice, and stop 2 bytes short of the last one.
        let n = LocalSlice::receive_into(&slices, 4, 6 + 20 + 28, rx.as_fd()).expect("receive");
        assert_eq!(n, 54);
        let mut got = [0u8; 30];
        a.read_at(104, &mut got[..6]).expect("read");
        assert_eq!(&got[..6], &sent[..6]);
        b.read_at(4000, &mut got[..20]).expect("read");
        assert_eq!(&got[..20], &sent[6..26]);
        a.read_at(0, &mut got).expect("read");
        assert_eq!(&got[..28], &sent[26..54]);
        assert_eq!(&got[28..], &[0, 0], "nothing received past max");
        // The rest is still in the socket.
        let n = LocalSlice::receive_into(&slices[3..], 28, 2, rx.as_fd()).expect("receive");
        assert_eq!(n, 2);
        a.read_at(28, &mut got[..2]).expect("read");
        assert_eq!(&got[..2], &sent[54..56]);
        // Nothing waiting: would block. Bad positions: refused before any system call.
        let e = LocalSlice::receive_into(&slices, 0, 10, rx.as_fd()).expect_err("nothing waiting");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        let e = LocalSlice::receive_into(&slices, 11, 10, rx.as_fd()).expect_err("past the slice");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e = LocalSlice::receive_into(&slices, 0, 0, rx.as_fd()).expect_err("no room");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let forged = [LocalSlice { region: Arc::clone(&a), offset: 4090, len: 10 }];
        assert!(LocalSlice::receive_into(&forged, 0, 10, rx.as_fd()).is_err(), "out of the region's bounds");
        drop(tx);
        assert_eq!(LocalSlice::receive_into(&slices, 0, 10, rx.as_fd()).expect("end of stream"), 0);
    }
}
