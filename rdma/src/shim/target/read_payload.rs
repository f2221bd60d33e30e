//! A READ's payload as the target sends it: the registered bytes it names, left where they lie
//! and sent from there by the kernel (one copy), or appended to the response when it is short.
//! The mappings the bytes lie in are held until the payload is sent, so a slab deregistered
//! meanwhile stays mapped until then and no address is reused under a send.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use memmap2::MmapMut;

/// The bytes of one READ, resolved and bounds-checked against their registrations.
#[derive(Debug)]
pub(super) struct ReadPayload {
    /// `(address, length)` of each segment, in order, each inside one of `mappings`.
    segments: Vec<(usize, usize)>,
    /// Bytes in all segments.
    len: usize,
    /// Keeps every mapping the segments lie in mapped.
    _mappings: Vec<Arc<MmapMut>>,
}

impl ReadPayload {
    /// `segments` must have been resolved (`target::resolve`) against the registrations of
    /// `mappings`, which must hold every mapping they lie in.
    /// Segments that continue one another are merged (a stream's pages usually lie in a row).
    pub(super) fn new(segments: Vec<(usize, usize)>, mappings: Vec<Arc<MmapMut>>) -> Self {
        let len = segments.iter().map(|&(_, len)| len).sum();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(segments.len());
        for (addr, seg_len) in segments {
            match merged.last_mut() {
                Some((last, last_len)) if last.checked_add(*last_len) == Some(addr) => *last_len += seg_len,
                _ => merged.push((addr, seg_len)),
            }
        }
        Self { segments: merged, len, _mappings: mappings }
    }

    /// Bytes in the payload.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends the payload's bytes to `out`.
    pub(super) fn append_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        for &(addr, len) in &self.segments {
            let spare = out.spare_capacity_mut();
            debug_assert!(spare.len() >= len);
            // SAFETY: `[addr, addr + len)` lies inside a mapping held by `_mappings` (bounds
            // proved by `resolve`), so it is readable; `spare` has room for it (`len` of the
            // `self.len` bytes reserved above and not yet used), is distinct memory, and the
            // copy initialises exactly the `len` bytes past the old length. Concurrent WRITEs to
            // the same bytes by the same session give unspecified bytes, exactly as with a NIC.
            unsafe {
                std::ptr::copy_nonoverlapping(addr as *const u8, spare.as_mut_ptr().cast::<u8>(), len);
                out.set_len(out.len() + len);
            }
        }
    }

    /// Sends `head`, then the payload straight from the registered memory, blocking until all
    /// of it is sent.
    pub(super) fn send(&self, head: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: every segment lies inside a mapping held by `_mappings` for as long as `self`
        // lives, which outlives the call (bounds proved by `resolve`).
        unsafe { crate::sys::send_all_from(fd, head, &self.segments) }
    }
}
