//! The exported `mmap` family: `mmap`/`mmap64`, `munmap`, `mremap`, `madvise` and `mprotect`.
//!
//! Each decides whether a call concerns the paged heap and otherwise passes it to the kernel
//! unchanged ([`crate::sys`]). Passed through untouched: every call on a pager thread or during
//! set-up, every call made while this thread is already inside one of these functions (mimalloc
//! purging under [`crate::mappings`]'s lock), every call before the pager runs or without one, and
//! every mapping that is not private, anonymous, read-write and at least `COALESCE_MMAP_MIN` bytes
//! (file and shared mappings, stacks, `MAP_FIXED` outside the region, huge-page and locked
//! mappings, executable memory).
//!
//! Within the region:
//! - `mmap` of a qualifying mapping is served from the heap ([`crate::mappings::map`]);
//!   `MAP_FIXED` over a served mapping zero-fills it, over other region pages is refused;
//! - `munmap`/`mremap` of served mappings are handled there; of other region pages refused
//!   (`EINVAL`): they are `malloc`'s;
//! - `madvise`: `MADV_DONTNEED` and `MADV_FREE` discard (`MADV_FREE` becomes `MADV_DONTNEED`: a
//!   lazily freed page could vanish behind the pager's back), the fork and populate advice go to
//!   the kernel, every other hint is accepted and ignored (the pager decides residency);
//! - `mprotect` to read-write is accepted (the region always is); any other protection is refused
//!   with `EACCES` and one log line: the pager must be able to move every page of its region.

#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::{heap, mappings, setup, sys};

/// Smallest mapping served from the heap (`usize::MAX`: none; set from `COALESCE_MMAP_MIN`).
static MIN_LEN: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Default of `COALESCE_MMAP_MIN`.
pub const DEFAULT_MIN_LEN: usize = 64 << 10;

thread_local! {
    /// True while this thread runs one of the functions here.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Sets the smallest mapping served from the heap (`None`: none).
pub fn set_min_len(min: Option<usize>) {
    MIN_LEN.store(min.unwrap_or(usize::MAX), Ordering::Release);
}

/// The region's bounds when calls of this thread are to be looked at, else `None` (pass through).
fn region_for_this_call() -> Option<(usize, usize)> {
    if heap::is_internal_thread() || INSIDE.with(Cell::get) {
        return None;
    }
    setup::region_bounds()
}

/// Runs `f` with this thread marked inside.
fn inside<T>(f: impl FnOnce() -> T) -> T {
    INSIDE.with(|c| c.set(true));
    let r = f();
    INSIDE.with(|c| c.set(false));
    r
}

fn overlaps((base, end): (usize, usize), addr: usize, len: usize) -> bool {
    addr < end && addr.saturating_add(len) > base
}

fn within((base, end): (usize, usize), addr: usize, len: usize) -> bool {
    addr >= base && addr.checked_add(len).is_some_and(|e| e <= end)
}

/// True for a mapping the heap serves: private, anonymous, read-write, large enough, and no flag
/// beyond `MAP_NORESERVE` and `MAP_POPULATE` (the pages come on demand either way).
fn served(len: usize, prot: c_int, flags: c_int) -> bool {
    let plain = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    flags & plain == plain
        && flags & !(plain | libc::MAP_NORESERVE | libc::MAP_POPULATE) == 0
        && prot == libc::PROT_READ | libc::PROT_WRITE
        && len >= MIN_LEN.load(Ordering::Acquire)
}

fn fail<T>(e: c_int, failed: T) -> T {
    sys::set_errno(e);
    failed
}

/// Says once per kind why a call on the paged heap was refused.
fn refused(what: &str, addr: usize, len: usize, errno: c_int, said: &AtomicBool) {
    mappings::count_refusal();
    if !said.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            address = format_args!("{addr:#x}"),
            len,
            errno,
            "{what} on the paged heap refused (further ones are counted, not logged); set COALESCE_MMAP_MIN=off if \
             the program needs it on its own mappings"
        );
    }
}

static SAID_TOO_LARGE: AtomicBool = AtomicBool::new(false);
static SAID_MMAP: AtomicBool = AtomicBool::new(false);
static SAID_MUNMAP: AtomicBool = AtomicBool::new(false);
static SAID_MREMAP: AtomicBool = AtomicBool::new(false);
static SAID_MPROTECT: AtomicBool = AtomicBool::new(false);

/// `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let Some(region) = region_for_this_call() else { return sys::mmap(addr, len, prot, flags, fd, off) };
    if flags & libc::MAP_FIXED != 0 {
        if !overlaps(region, addr as usize, len) {
            return sys::mmap(addr, len, prot, flags, fd, off);
        }
        let fixed = flags & !libc::MAP_FIXED;
        let result = if served(usize::MAX, prot, fixed) && within(region, addr as usize, len) {
            inside(|| mappings::map_fixed(addr as usize, len))
        } else {
            Err(libc::EINVAL)
        };
        return result.unwrap_or_else(|e| {
            refused("mmap(MAP_FIXED)", addr as usize, len, e, &SAID_MMAP);
            fail(e, libc::MAP_FAILED)
        });
    }
    if !served(len, prot, flags) {
        return sys::mmap(addr, len, prot, flags, fd, off);
    }
    // An address hint is a hint: the heap chooses.
    match inside(|| mappings::map(len)) {
        Ok(Some(p)) => p,
        Ok(None) => {
            mappings::count_too_large();
            if !SAID_TOO_LARGE.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    len,
                    "an anonymous mapping does not fit what is left of the paged heap; the kernel maps it, outside \
                     the budget (further ones are counted, not logged; raise COALESCE_HEAP_SIZE to serve them)"
                );
            }
            sys::mmap(addr, len, prot, flags, fd, off)
        }
        Err(e) => fail(e, libc::MAP_FAILED),
    }
}

/// `mmap64(2)` (the same call on 64-bit targets).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the same contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let Some(region) = region_for_this_call() else { return sys::munmap(addr, len) };
    if !overlaps(region, addr as usize, len) {
        return sys::munmap(addr, len);
    }
    let result = if within(region, addr as usize, len) {
        inside(|| mappings::unmap(addr as usize, len))
    } else {
        Err(libc::EINVAL)
    };
    result.map_or_else(
        |e| {
            refused("munmap", addr as usize, len, e, &SAID_MUNMAP);
            fail(e, -1)
        },
        |()| 0,
    )
}

/// `mremap(2)`. The C function is variadic (`new_address` follows `flags` only with
/// `MREMAP_FIXED`); on the x86-64 and AArch64 Linux calling conventions a variadic caller passes
/// it where this five-argument definition reads it, and it is only read with that flag.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let Some(region) = region_for_this_call() else { return sys::mremap(old, old_len, new_len, flags, new_addr) };
    if !overlaps(region, old as usize, old_len.max(1)) {
        return sys::mremap(old, old_len, new_len, flags, new_addr);
    }
    let result = if within(region, old as usize, old_len) {
        inside(|| mappings::remap(old as usize, old_len, new_len, flags))
    } else {
        Err(libc::EINVAL)
    };
    result.unwrap_or_else(|e| {
        if e != libc::ENOMEM {
            refused("mremap", old as usize, old_len, e, &SAID_MREMAP);
        }
        fail(e, libc::MAP_FAILED)
    })
}

/// `madvise(2)`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let Some(region) = region_for_this_call() else { return sys::madvise(addr, len, advice) };
    if !overlaps(region, addr as usize, len) {
        return sys::madvise(addr, len, advice);
    }
    match advice {
        libc::MADV_DONTNEED | libc::MADV_FREE => sys::madvise(addr, len, libc::MADV_DONTNEED),
        libc::MADV_DONTFORK
        | libc::MADV_DOFORK
        | libc::MADV_WIPEONFORK
        | libc::MADV_KEEPONFORK
        | libc::MADV_REMOVE
        | MADV_POPULATE_READ
        | MADV_POPULATE_WRITE => sys::madvise(addr, len, advice),
        _ => 0,
    }
}

/// `MADV_POPULATE_READ` (Linux 5.14; not in every libc crate version).
const MADV_POPULATE_READ: c_int = 22;
/// `MADV_POPULATE_WRITE`.
const MADV_POPULATE_WRITE: c_int = 23;

/// `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let Some(region) = region_for_this_call() else { return sys::mprotect(addr, len, prot) };
    if !overlaps(region, addr as usize, len) {
        return sys::mprotect(addr, len, prot);
    }
    if prot == libc::PROT_READ | libc::PROT_WRITE {
        return 0;
    }
    refused("mprotect", addr as usize, len, libc::EACCES, &SAID_MPROTECT);
    fail(libc::EACCES, -1)
}
