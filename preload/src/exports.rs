//! The exported C allocation family, with glibc's semantics: overflow checks and `ENOMEM`,
//! `realloc(p, 0)` frees and returns null, `posix_memalign` returns `EINVAL` without touching
//! `errno`, `pvalloc` rounds up to a page, and harmless answers for `malloc_trim`, `mallopt`,
//! `mallinfo` and `mallinfo2`. Internal threads (pager threads, set-up) allocate from the internal
//! heap (glibc's allocator); every other thread from the application heap in the pager region.
//! `free`, `realloc` and `malloc_usable_size` tell the two apart by asking mimalloc whether it
//! owns the block.
//!
//! Nothing here allocates through `malloc` itself, uses `std::env`, or formats strings.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void};

use libmimalloc_sys as mi;

use crate::heap::{app_heap, glibc, is_app_block, is_internal_thread};
use crate::setup::may_allocate;

const PAGE: usize = 4096;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Allocates `size` bytes from the calling thread's heap: glibc on internal threads, else the
/// thread's mimalloc heap in the pager region (mimalloc's default heap before set-up or without a
/// pager). Sets `ENOMEM` on failure, and fails when the pager is at its local maximum with no
/// lender to take pages (`may_allocate`).
#[inline]
fn allocate(
    size: usize,
    internal: impl FnOnce() -> *mut c_void,
    default: impl FnOnce() -> *mut c_void,
    in_heap: impl FnOnce(*mut mi::mi_heap_t) -> *mut c_void,
) -> *mut c_void {
    let p = if is_internal_thread() {
        internal()
    } else {
        let h = app_heap();
        if h.is_null() {
            default()
        } else if may_allocate(size) {
            in_heap(h)
        } else {
            std::ptr::null_mut()
        }
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

#[inline]
unsafe fn alloc(size: usize) -> *mut c_void {
    allocate(
        size,
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { glibc::__libc_malloc(size) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { mi::mi_malloc(size) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        |h| unsafe { mi::mi_heap_malloc(h, size) },
    )
}

#[inline]
unsafe fn alloc_aligned(align: usize, size: usize) -> *mut c_void {
    // `align` is a power of two (checked by callers).
    allocate(
        size,
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { glibc::__libc_memalign(align, size) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { mi::mi_malloc_aligned(size, align) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        |h| unsafe { mi::mi_heap_malloc_aligned(h, size, align) },
    )
}

/// `malloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: plain allocation.
    unsafe { alloc(size) }
}

/// `free(3)`.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: `p` is a block from this allocator (the C contract), owned by whichever heap
    // `release` picks.
    unsafe { release(p) }
}

/// Frees `p` into the heap that owns it.
#[inline]
unsafe fn release(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is a live block of the heap chosen here.
    unsafe {
        if is_app_block(p) {
            mi::mi_free(p);
        } else {
            glibc::__libc_free(p);
        }
    }
}

/// `calloc(3)`: fails with `ENOMEM` when `n * size` overflows.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    // Both allocators return zeroed memory.
    allocate(
        total,
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { glibc::__libc_calloc(n, size) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        || unsafe { mi::mi_zalloc(total) },
        // SAFETY: a plain allocation call; the arguments are the caller's, checked by it.
        |h| unsafe { mi::mi_heap_zalloc(h, total) },
    )
}

/// `realloc(3)`: `realloc(NULL, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and returns null.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: plain allocation.
        return unsafe { alloc(size) };
    }
    if size == 0 {
        // SAFETY: `p` is a live block (the C contract).
        unsafe { release(p) };
        return std::ptr::null_mut();
    }
    let app_block = is_app_block(p);
    let internal = is_internal_thread();
    // SAFETY: `p` is a live block of the heap `app_block` names; on failure it stays untouched.
    let q = unsafe {
        if !app_block {
            // Internal blocks stay internal, whichever thread grows them.
            glibc::__libc_realloc(p, size)
        } else if internal {
            // An internal thread never enters mimalloc's allocation paths: move the block out.
            let q = glibc::__libc_malloc(size);
            if !q.is_null() {
                q.cast::<u8>().copy_from_nonoverlapping(p.cast::<u8>(), mi::mi_usable_size(p).min(size));
                mi::mi_free(p);
            }
            q
        } else {
            let h = app_heap();
            if h.is_null() {
                mi::mi_realloc(p, size)
            } else if may_allocate(size.saturating_sub(mi::mi_usable_size(p))) {
                mi::mi_heap_realloc(h, p, size)
            } else {
                std::ptr::null_mut()
            }
        }
    };
    if q.is_null() {
        set_errno(libc::ENOMEM);
    }
    q
}

/// `reallocarray(3)`: `realloc` with an overflow check (`ENOMEM`).
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as `realloc`.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// `posix_memalign(3)`: `EINVAL` unless `align` is a power of two multiple of `sizeof(void *)`;
/// `ENOMEM` when out of memory. Returns the error; never sets `errno`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    // SAFETY: errno is saved and restored around the allocation.
    let saved = unsafe { *libc::__errno_location() };
    // SAFETY: `align` is a power of two.
    let p = unsafe { alloc_aligned(align, size) };
    set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: `out` is a valid pointer (the C contract).
    unsafe { *out = p };
    0
}

/// `aligned_alloc(3)`: null with `EINVAL` unless `align` is a power of two.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: `align` is a power of two.
    unsafe { alloc_aligned(align, size) }
}

/// `memalign(3)`: a non-power-of-two alignment is rounded up to the next power of two (as glibc).
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(align) = align.max(1).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    // SAFETY: `align` is a power of two.
    unsafe { alloc_aligned(align, size) }
}

/// `valloc(3)`: page-aligned.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: the page size is a power of two.
    unsafe { alloc_aligned(PAGE, size) }
}

/// `pvalloc(3)`: page-aligned, size rounded up to whole pages (0 becomes one page).
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_next_multiple_of(PAGE) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    // SAFETY: the page size is a power of two.
    unsafe { alloc_aligned(PAGE, rounded) }
}

/// `malloc_usable_size(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if is_app_block(p) {
        // SAFETY: `p` is a live mimalloc block (the C contract).
        unsafe { mi::mi_usable_size(p) }
    } else {
        // SAFETY: a live block that mimalloc does not own is the internal heap's (glibc's).
        unsafe { crate::setup::glibc_usable_size(p) }
    }
}

/// `malloc_trim(3)`: nothing to trim through this interface; reports that nothing was released.
#[no_mangle]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    0
}

/// `mallopt(3)`: every parameter is accepted and ignored (mimalloc tunes itself).
#[no_mangle]
pub extern "C" fn mallopt(_param: c_int, _value: c_int) -> c_int {
    1
}

/// `struct mallinfo2` of glibc.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

/// `struct mallinfo` of glibc.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Mallinfo {
    arena: c_int,
    ordblks: c_int,
    smblks: c_int,
    hblks: c_int,
    hblkhd: c_int,
    usmblks: c_int,
    fsmblks: c_int,
    uordblks: c_int,
    fordblks: c_int,
    keepcost: c_int,
}

/// `mallinfo2(3)`: all zeros (the figures glibc reports have no meaning for this allocator).
#[no_mangle]
pub extern "C" fn mallinfo2() -> Mallinfo2 {
    Mallinfo2::default()
}

/// `mallinfo(3)`: all zeros.
#[no_mangle]
pub extern "C" fn mallinfo() -> Mallinfo {
    Mallinfo::default()
}
