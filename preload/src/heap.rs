//! The two heaps of a preloaded process:
//!
//! - the **application heap**: mimalloc heaps that after set-up may only take memory from the
//!   pager region's arena (`limit_os_alloc`), so the program's heap pages are subject to the local
//!   budget and page out to memory servers;
//! - the **internal heap**: glibc's own allocator (`__libc_malloc` and friends), used by this
//!   library's Rust code (through the global allocator below) and by every pager thread. Pager
//!   threads never enter mimalloc at all: mimalloc purges any arena from whichever thread happens
//!   to call into it, and a purge of the region by a pager thread (an `madvise` that waits for the
//!   fault handler to read its remove event) while that thread holds a pager lock would deadlock.
//!   It also keeps the fault handler's allocations out of the heap it serves.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use libmimalloc_sys as mi;

/// Arena id of the pager region (0: no pager; the program allocates plain memory).
static REGION_ARENA: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// True on pager threads and during set-up: C allocations go to the internal heap.
    static INTERNAL_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread's application heap in the region arena, made on first use.
    static APP_HEAP: Cell<*mut mi::mi_heap_t> = const { Cell::new(std::ptr::null_mut()) };
}

/// glibc's allocator under its internal names (exported by libc.so.6 since glibc 2.2.5), which
/// the exported `malloc` family does not interpose.
pub mod glibc {
    use std::ffi::c_void;

    /// Largest alignment glibc's `malloc` guarantees on 64-bit targets.
    pub const MALLOC_ALIGN: usize = 16;

    extern "C" {
        /// glibc's `malloc`.
        pub fn __libc_malloc(size: usize) -> *mut c_void;
        /// glibc's `calloc`.
        pub fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
        /// glibc's `realloc`.
        pub fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
        /// glibc's `memalign`.
        pub fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
        /// glibc's `free`.
        pub fn __libc_free(p: *mut c_void);
    }
}

/// True if `p` is a block of mimalloc's (the application heap, or memory mimalloc handed out
/// before set-up); false for the internal heap's blocks.
pub fn is_app_block(p: *const c_void) -> bool {
    // SAFETY: a lookup in mimalloc's arena list and segment map; `p` is not dereferenced unless
    // it lies in a segment mimalloc allocated.
    unsafe { mi::mi_is_in_heap_region(p) }
}

/// `mi_option_purge_decommits` (position 5 of `mi_option_e` in mimalloc.h; the -sys crate has no
/// constant for it).
const MI_OPTION_PURGE_DECOMMITS: mi::mi_option_t = 5;

/// Hands the pager region to mimalloc as the application heap's only source of memory.
///
/// # Safety
/// `[base, base + len)` must be a live, read-write mapping that stays mapped for the rest of the
/// process's life and is used by nothing else.
pub unsafe fn adopt_region(base: *mut u8, len: usize) -> Result<(), String> {
    let mut id: mi::mi_arena_id_t = 0;
    // SAFETY: guaranteed by the caller; the region reads as zeros until written.
    let ok = unsafe { mi::mi_manage_os_memory_ex(base.cast(), len, true, false, true, -1, false, &mut id) };
    if !ok {
        return Err("mimalloc refused the pager region as an arena".into());
    }
    // SAFETY: setting a mimalloc option has no memory-safety preconditions.
    unsafe { mi::mi_option_set(mi::mi_option_limit_os_alloc, 1) };
    // Purges must decommit (`MADV_DONTNEED`: a remove event the pager sees), never reset
    // (`MADV_FREE`: the kernel may later drop the page without telling the pager, which then
    // finds a resident page unmapped and must treat it as lost). 1 is mimalloc's default; set it
    // so that MIMALLOC_PURGE_DECOMMITS=0 in the environment cannot change it.
    // SAFETY: as above.
    unsafe { mi::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 1) };
    // Application threads allocate from heaps bound to this arena (see `app_heap`): mimalloc's
    // default heaps could otherwise keep filling segments of ordinary memory reserved before set-up.
    REGION_ARENA.store(id, Ordering::Release);
    Ok(())
}

/// The calling thread's application heap in the region arena, or null when there is no pager.
pub fn app_heap() -> *mut mi::mi_heap_t {
    APP_HEAP.with(|h| {
        let cur = h.get();
        if !cur.is_null() {
            return cur;
        }
        let arena = REGION_ARENA.load(Ordering::Acquire);
        if arena == 0 {
            return std::ptr::null_mut();
        }
        // SAFETY: `arena` is the region arena made by `adopt_region`.
        let heap = unsafe { mi::mi_heap_new_in_arena(arena) };
        h.set(heap);
        heap
    })
}

/// Marks the calling thread internal: its C allocations go to the internal heap from now on.
pub fn mark_internal_thread() {
    INTERNAL_THREAD.with(|c| c.set(true));
}

/// Ends the internal mark of the calling thread (after set-up on the main thread).
pub fn unmark_internal_thread() {
    INTERNAL_THREAD.with(|c| c.set(false));
}

/// True on internal threads.
pub fn is_internal_thread() -> bool {
    INTERNAL_THREAD.with(Cell::get)
}

/// The global allocator of this library's Rust code: always the internal heap (glibc).
#[derive(Debug)]
pub struct InternalAllocator;

// SAFETY: every method forwards to glibc with the layout's size and alignment (memalign for
// alignments beyond malloc's); glibc returns suitably aligned blocks or null.
unsafe impl GlobalAlloc for InternalAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding a valid size/alignment to glibc.
        unsafe {
            if layout.align() <= glibc::MALLOC_ALIGN {
                glibc::__libc_malloc(layout.size()).cast()
            } else {
                glibc::__libc_memalign(layout.align(), layout.size()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= glibc::MALLOC_ALIGN {
            // SAFETY: as for `alloc`.
            return unsafe { glibc::__libc_calloc(1, layout.size()).cast() };
        }
        // SAFETY: as for `alloc`; the block has `layout.size()` writable bytes.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the methods here, all of which allocate from glibc.
        unsafe { glibc::__libc_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= glibc::MALLOC_ALIGN {
            // SAFETY: `ptr` is a glibc block of this allocator.
            return unsafe { glibc::__libc_realloc(ptr.cast(), new_size).cast() };
        }
        // SAFETY: a fresh block of the same alignment; the old one holds `layout.size()` bytes.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                new.copy_from_nonoverlapping(ptr, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
