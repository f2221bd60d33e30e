//! Registered local memory: the buffers that one-sided READs land in and WRITEs send from.
//!
//! The "NIC" (a provider's receive path) writes into a region behind Rust's back, so a region never
//! hands out `&mut [u8]`; callers copy in and out with [`LocalRegion::write_at`] and
//! [`LocalRegion::read_at`], or take raw pointers for zero-copy use (e.g. `UFFDIO_COPY`).

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
        // memory that no Rust reference aliases (the region never hands out slices), and `src`
        // cannot overlap it because it is a distinct borrow of ordinary memory or another region.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    /// Receives up to `len` bytes from the stream socket `fd` straight into `[offset, offset +
    /// len)` (`recv(2)` with `MSG_DONTWAIT`): the shim's READ payloads land here without an
    /// intermediate buffer. Returns the bytes received (0: end of stream); `WouldBlock` when none
    /// are waiting.
    pub(crate) fn receive_at(&self, offset: usize, len: usize, fd: BorrowedFd<'_>) -> std::io::Result<usize> {
        self.check(offset, len).map_err(std::io::Error::other)?;
        // SAFETY: the range was bounds-checked against the live mapping above; the mapping is raw
        // memory that no Rust reference aliases, and recv writes at most `len` bytes into it.
        let n = unsafe { libc::recv(fd.as_raw_fd(), self.as_ptr().add(offset).cast(), len, libc::MSG_DONTWAIT) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// Copies bytes at `offset` out of the region into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), TransportError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; `dst` is an exclusive borrow and cannot alias the mapping
        // (the region never hands out references into itself).
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
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

impl LocalSlice {
    /// Names `[offset, offset + len)` of `region`, checking bounds.
    pub fn new(region: &Arc<LocalRegion>, offset: usize, len: usize) -> Result<Self, TransportError> {
        region.check(offset, len)?;
        Ok(Self { region: Arc::clone(region), offset, len })
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
}
