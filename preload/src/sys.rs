//! The kernel's memory-mapping calls, made as raw system calls. The exported `mmap` family of
//! [`crate::mappings`] interposes glibc's wrappers for the whole process, including this library's
//! own callers (mimalloc, the pager); what it passes through, or does itself, goes straight to the
//! kernel here, never back through the interposed symbols. Each returns what the wrapper would:
//! `MAP_FAILED` or -1 with `errno` set on failure.

use std::ffi::{c_int, c_void};

/// `mmap(2)`.
pub fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: libc::off_t) -> *mut c_void {
    // SAFETY: the system call only changes the address space as asked; a caller asking to
    // replace memory it uses (MAP_FIXED) is the caller's contract, as with glibc's wrapper.
    let r = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    if r == -1 {
        libc::MAP_FAILED
    } else {
        r as *mut c_void
    }
}

/// `munmap(2)`.
pub fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: as for `mmap`: unmapping is what the caller asked for.
    let r = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
    if r == 0 {
        0
    } else {
        -1
    }
}

/// `mremap(2)`; `new_addr` is read by the kernel only with `MREMAP_FIXED`.
pub fn mremap(old: *mut c_void, old_len: usize, new_len: usize, flags: c_int, new_addr: *mut c_void) -> *mut c_void {
    // SAFETY: as for `mmap`.
    let r = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
    if r == -1 {
        libc::MAP_FAILED
    } else {
        r as *mut c_void
    }
}

/// `madvise(2)`.
pub fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    // SAFETY: as for `mmap`: discarding pages (MADV_DONTNEED) is what the caller asked for.
    let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
    if r == 0 {
        0
    } else {
        -1
    }
}

/// `mprotect(2)`.
pub fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    // SAFETY: as for `mmap`.
    let r = unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) };
    if r == 0 {
        0
    } else {
        -1
    }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}
