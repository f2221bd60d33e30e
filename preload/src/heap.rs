//! The two heaps of a preloaded process, both run by mimalloc:
//!
//! - the **application heap**: mimalloc's default heaps, which after set-up may only take memory
//!   from the pager region's arena (`disallow_os_alloc`), so the program's heap pages are subject to
//!   the local budget and page out to memory servers;
//! - the **internal heap**: an exclusive arena of ordinary memory, used by this library's own Rust
//!   code (through the global allocator below) and by every pager thread. The thread that serves
//!   faults must never touch the heap it serves; this keeps its allocations out of the region.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use libmimalloc_sys as mi;

/// Arena id of the internal arena (0: not created yet).
static INTERNAL_ARENA: AtomicI32 = AtomicI32::new(0);
/// Arena id of the pager region (0: no pager; the program allocates plain memory).
static REGION_ARENA: AtomicI32 = AtomicI32::new(0);
/// Size of the internal arena's address range (reserved lazily by the kernel).
const INTERNAL_ARENA_SIZE: usize = 2 << 30;

thread_local! {
    /// This thread's heap in the internal arena, made on first use.
    static INTERNAL_HEAP: Cell<*mut mi::mi_heap_t> = const { Cell::new(std::ptr::null_mut()) };
    /// True on pager threads and during set-up: C allocations go to the internal heap too.
    static INTERNAL_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread's application heap in the region arena, made on first use.
    static APP_HEAP: Cell<*mut mi::mi_heap_t> = const { Cell::new(std::ptr::null_mut()) };
}

/// Creates the internal arena. Called once, during set-up, before the pager starts.
pub fn create_internal_arena() -> Result<(), String> {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            INTERNAL_ARENA_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("cannot reserve the internal heap: {}", std::io::Error::last_os_error()));
    }
    let mut id: mi::mi_arena_id_t = 0;
    // SAFETY: the range was just mapped read-write and is handed to mimalloc for good.
    let ok = unsafe { mi::mi_manage_os_memory_ex(base, INTERNAL_ARENA_SIZE, true, false, true, -1, true, &mut id) };
    if !ok {
        return Err("mimalloc refused the internal arena".into());
    }
    INTERNAL_ARENA.store(id, Ordering::Release);
    Ok(())
}

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
    let _ = internal_heap();
}

/// Ends the internal mark of the calling thread (after set-up on the main thread).
pub fn unmark_internal_thread() {
    INTERNAL_THREAD.with(|c| c.set(false));
}

/// True on internal threads.
pub fn is_internal_thread() -> bool {
    INTERNAL_THREAD.with(Cell::get)
}

/// The calling thread's internal heap, or null before the internal arena exists.
pub fn internal_heap() -> *mut mi::mi_heap_t {
    INTERNAL_HEAP.with(|h| {
        let cur = h.get();
        if !cur.is_null() {
            return cur;
        }
        let arena = INTERNAL_ARENA.load(Ordering::Acquire);
        if arena == 0 {
            return std::ptr::null_mut();
        }
        // SAFETY: `arena` is a valid arena id made by `create_internal_arena`.
        let heap = unsafe { mi::mi_heap_new_in_arena(arena) };
        h.set(heap);
        heap
    })
}

/// The global allocator of this library's Rust code: always the internal heap (or mimalloc's
/// default heap before the internal arena exists, i.e. before any pager runs).
#[derive(Debug)]
pub struct InternalAllocator;

// SAFETY: every method forwards to mimalloc with the layout's size and alignment; mimalloc returns
// suitably aligned blocks or null, and `mi_free` accepts any block of any heap.
unsafe impl GlobalAlloc for InternalAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let heap = internal_heap();
        // SAFETY: forwarding a valid size/alignment to mimalloc.
        unsafe {
            if heap.is_null() {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            } else {
                mi::mi_heap_malloc_aligned(heap, layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let heap = internal_heap();
        // SAFETY: as for `alloc`.
        unsafe {
            if heap.is_null() {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            } else {
                mi::mi_heap_zalloc_aligned(heap, layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the methods above.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let heap = internal_heap();
        // SAFETY: `ptr` came from this allocator; size and alignment are the caller's valid ones.
        unsafe {
            if heap.is_null() {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            } else {
                mi::mi_heap_realloc_aligned(heap, ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}
