//! Anonymous mappings served from the paged heap.
//!
//! A private anonymous read-write `mmap` of at least `COALESCE_MMAP_MIN` bytes becomes a
//! page-aligned block of the application heap (the pager region), so allocators that take memory
//! with `mmap` (CPython's small-object arenas, jemalloc, ...) live within the local budget like
//! `malloc`'s memory. The kernel's semantics are kept where programs rely on them:
//!
//! - a new mapping reads as zeros: its pages are discarded (`MADV_DONTNEED`, which the pager sees
//!   as a remove event: the pages' remote copies are freed and the pages read as zero);
//! - `munmap` of all or part of a mapping discards those pages at once (local and remote memory is
//!   given back); the block returns to the heap when its last page is unmapped;
//! - `mremap` shrinks in place, grows in place when the block has room, otherwise (with
//!   `MREMAP_MAYMOVE`) moves to a new block with the contents copied;
//! - `mmap(MAP_FIXED)` over pages of such a mapping replaces them with zero pages.
//!
//! The table here records each block and which of its pages are still mapped. Every change to it
//! happens under one lock; mimalloc calls made under that lock may call back into the exported
//! family (a purge's `madvise`), which the calling thread's re-entry mark passes straight through.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use libmimalloc_sys as mi;

use crate::sys;

/// Page size of the region.
pub const PAGE: usize = 4096;

/// The blocks serving mappings, by start address.
static TABLE: Mutex<Blocks> = Mutex::new(Blocks { blocks: BTreeMap::new() });

static SERVED: AtomicU64 = AtomicU64::new(0);
static TOO_LARGE: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// What the mapping layer did, for the exit report (`forks_refused` is the caller's).
pub fn stats() -> coalesce_pager::PreloadStats {
    coalesce_pager::PreloadStats {
        mmaps_served: SERVED.load(Ordering::Relaxed),
        mmap_peak_bytes: PEAK_BYTES.load(Ordering::Relaxed) as u64,
        calls_refused: REFUSED.load(Ordering::Relaxed),
        mmaps_too_large: TOO_LARGE.load(Ordering::Relaxed),
        forks_refused: 0,
    }
}

/// Counts a mapping too large for the heap, left to the kernel.
pub fn count_too_large() {
    TOO_LARGE.fetch_add(1, Ordering::Relaxed);
}

/// Counts a call refused because it would break the pager's region.
pub fn count_refusal() {
    REFUSED.fetch_add(1, Ordering::Relaxed);
}

/// One heap block serving a mapping: its capacity and the page ranges still mapped.
#[derive(Debug)]
struct Block {
    end: usize,
    live: Vec<Range<usize>>,
}

/// The table of blocks (opaque outside this module).
#[derive(Debug)]
pub struct Blocks {
    blocks: BTreeMap<usize, Block>,
}

impl Blocks {
    /// The blocks whose capacity overlaps `[a, b)`, with their start addresses.
    fn overlapping(&self, a: usize, b: usize) -> impl Iterator<Item = (usize, &Block)> {
        let first = self.blocks.range(..=a).next_back().filter(|(_, blk)| blk.end > a).map(|(s, _)| *s).unwrap_or(a);
        self.blocks.range(first..b).map(|(s, blk)| (*s, blk))
    }

    /// True when every page of `[a, b)` lies within some block's capacity.
    fn covers(&self, a: usize, b: usize) -> bool {
        let mut at = a;
        for (start, blk) in self.overlapping(a, b) {
            if start > at {
                return false;
            }
            at = at.max(blk.end);
        }
        at >= b
    }

    /// True when every page of `[a, b)` is mapped.
    fn all_live(&self, a: usize, b: usize) -> bool {
        let mut at = a;
        for (_, blk) in self.overlapping(a, b) {
            for r in &blk.live {
                if r.start <= at && r.end > at {
                    at = r.end;
                }
            }
        }
        at >= b
    }

    /// Bytes of `[a, b)` that are mapped.
    fn live_bytes(&self, a: usize, b: usize) -> usize {
        self.overlapping(a, b)
            .flat_map(|(_, blk)| blk.live.iter())
            .map(|r| r.end.min(b).saturating_sub(r.start.max(a)))
            .sum()
    }

    /// Marks `[a, b)` unmapped; returns the pieces that were mapped and the starts of the blocks
    /// left with nothing mapped (removed from the table).
    fn kill(&mut self, a: usize, b: usize) -> (Vec<Range<usize>>, Vec<usize>) {
        let starts: Vec<usize> = self.overlapping(a, b).map(|(s, _)| s).collect();
        let (mut pieces, mut emptied) = (Vec::new(), Vec::new());
        for start in starts {
            let Some(blk) = self.blocks.get_mut(&start) else { continue };
            let mut kept = Vec::with_capacity(blk.live.len() + 1);
            for r in blk.live.drain(..) {
                let (lo, hi) = (r.start.max(a), r.end.min(b));
                if lo >= hi {
                    kept.push(r);
                    continue;
                }
                pieces.push(lo..hi);
                if r.start < lo {
                    kept.push(r.start..lo);
                }
                if hi < r.end {
                    kept.push(hi..r.end);
                }
            }
            blk.live = kept;
            if blk.live.is_empty() {
                self.blocks.remove(&start);
                emptied.push(start);
            }
        }
        (pieces, emptied)
    }

    /// Marks `[a, b)` (within blocks' capacity) mapped again.
    fn revive(&mut self, a: usize, b: usize) {
        let starts: Vec<usize> = self.overlapping(a, b).map(|(s, _)| s).collect();
        for start in starts {
            let Some(blk) = self.blocks.get_mut(&start) else { continue };
            let (lo, hi) = (start.max(a), blk.end.min(b));
            blk.live.push(lo..hi);
            blk.live.sort_by_key(|r| r.start);
            let mut merged: Vec<Range<usize>> = Vec::with_capacity(blk.live.len());
            for r in blk.live.drain(..) {
                match merged.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            blk.live = merged;
        }
    }
}

fn table() -> MutexGuard<'static, Blocks> {
    // A panic never happens under the lock (nothing in it can panic but allocation failure, which
    // aborts); a poisoned lock still holds a consistent table.
    TABLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Held across `fork` so the child never inherits the table locked by another thread.
pub fn lock_for_fork() -> MutexGuard<'static, Blocks> {
    table()
}

fn round_up(len: usize) -> Option<usize> {
    len.checked_add(PAGE - 1).map(|l| l & !(PAGE - 1))
}

/// Discards the pages of `[a, b)`: they read as zero afterwards, and the pager frees their local
/// and remote copies.
fn discard(a: usize, b: usize) -> Result<(), c_int> {
    if sys::madvise(a as *mut c_void, b - a, libc::MADV_DONTNEED) == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
}

fn account(added: usize, removed: usize) {
    let live = if added >= removed {
        LIVE_BYTES.fetch_add(added - removed, Ordering::Relaxed).saturating_add(added - removed)
    } else {
        LIVE_BYTES.fetch_sub(removed - added, Ordering::Relaxed).saturating_sub(removed - added)
    };
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

/// A new mapping of `len` bytes from the heap, zero-filled; `Ok(None)` when the heap's address
/// space cannot hold it (larger than what is left of `COALESCE_HEAP_SIZE`): the caller lets the
/// kernel map it. `ENOMEM` when the pager refuses more memory ([`crate::setup::may_allocate`]).
pub fn map(len: usize) -> Result<Option<*mut c_void>, c_int> {
    let len = round_up(len).filter(|l| *l > 0).ok_or(libc::ENOMEM)?;
    let heap = crate::heap::app_heap();
    if heap.is_null() {
        return Ok(None);
    }
    if !crate::setup::may_allocate(len) {
        return Err(libc::ENOMEM);
    }
    let mut t = table();
    // SAFETY: an allocation from this thread's heap; `PAGE` is a power of two.
    let p = unsafe { mi::mi_heap_malloc_aligned(heap, len, PAGE) };
    if p.is_null() {
        return Ok(None);
    }
    let start = p as usize;
    // SAFETY: `p` is a live block of mimalloc's.
    let usable = unsafe { mi::mi_usable_size(p) } & !(PAGE - 1);
    if let Err(e) = discard(start, start + len) {
        // SAFETY: the block was allocated above and nothing else knows of it.
        unsafe { mi::mi_free(p) };
        return Err(e);
    }
    t.blocks.insert(start, Block { end: start + usable.max(len), live: std::iter::once(start..start + len).collect() });
    drop(t);
    SERVED.fetch_add(1, Ordering::Relaxed);
    account(len, 0);
    Ok(Some(p))
}

/// The end of `[addr, addr + len)` (a whole number of pages) and the locked table, when every
/// page of it lies within blocks serving mappings; `EINVAL` otherwise.
fn served_range(addr: usize, len: usize) -> Result<(usize, MutexGuard<'static, Blocks>), c_int> {
    let end = round_up(len).and_then(|l| addr.checked_add(l)).ok_or(libc::EINVAL)?;
    if !addr.is_multiple_of(PAGE) || end == addr {
        return Err(libc::EINVAL);
    }
    let t = table();
    if !t.covers(addr, end) {
        return Err(libc::EINVAL);
    }
    Ok((end, t))
}

/// `mmap(MAP_FIXED)` of a private anonymous read-write range inside the region: allowed over the
/// pages of mappings served here (they become zero pages, mapped again if they had been
/// unmapped), refused elsewhere (`EINVAL`: the region's other pages are `malloc`'s).
pub fn map_fixed(addr: usize, len: usize) -> Result<*mut c_void, c_int> {
    let (end, mut t) = served_range(addr, len)?;
    let was = t.live_bytes(addr, end);
    discard(addr, end)?;
    t.revive(addr, end);
    drop(t);
    account(end - addr, was);
    Ok(addr as *mut c_void)
}

/// `munmap` of `[addr, addr + len)` inside the region: every page must belong to a mapping served
/// here (`EINVAL` otherwise: the program is unmapping `malloc`'s memory). Mapped pages are
/// discarded; blocks with nothing left mapped go back to the heap.
pub fn unmap(addr: usize, len: usize) -> Result<(), c_int> {
    let (end, mut t) = served_range(addr, len)?;
    let live: Vec<Range<usize>> = t.overlapping(addr, end).flat_map(|(_, b)| b.live.clone()).collect();
    // Discard before the table lets go of the pages: once a block is freed another thread's
    // mapping may take (and write) them.
    for r in &live {
        let (lo, hi) = (r.start.max(addr), r.end.min(end));
        if lo < hi {
            discard(lo, hi)?;
        }
    }
    let (pieces, emptied) = t.kill(addr, end);
    for start in emptied {
        // SAFETY: the block was allocated by `map` and nothing of it is mapped any more.
        unsafe { mi::mi_free(start as *mut c_void) };
    }
    drop(t);
    account(0, pieces.iter().map(|r| r.end - r.start).sum());
    Ok(())
}

/// `mremap` of a mapping served here. `MREMAP_FIXED` and `MREMAP_DONTUNMAP` are refused
/// (`EINVAL`).
pub fn remap(old: usize, old_len: usize, new_len: usize, flags: c_int) -> Result<*mut c_void, c_int> {
    if flags & !libc::MREMAP_MAYMOVE != 0 || !old.is_multiple_of(PAGE) {
        return Err(libc::EINVAL);
    }
    let old_len = round_up(old_len).ok_or(libc::EINVAL)?;
    let new_len = round_up(new_len).filter(|l| *l > 0).ok_or(libc::EINVAL)?;
    let old_end = old.checked_add(old_len).ok_or(libc::EINVAL)?;
    if old_len == 0 || !table().all_live(old, old_end) {
        // Zero old length duplicates shared mappings only; a range not wholly mapped is EFAULT.
        return Err(if old_len == 0 { libc::EINVAL } else { libc::EFAULT });
    }
    if new_len <= old_len {
        if new_len < old_len {
            unmap(old + new_len, old_len - new_len)?;
        }
        return Ok(old as *mut c_void);
    }
    if grow_in_place(old, old_end, old + new_len)? {
        return Ok(old as *mut c_void);
    }
    if flags & libc::MREMAP_MAYMOVE == 0 {
        return Err(libc::ENOMEM);
    }
    let new = map(new_len)?.ok_or(libc::ENOMEM)?;
    // SAFETY: both ranges are mapped pages of distinct blocks; `old_len` bytes are readable at
    // `old` and writable at `new` (`new_len > old_len`).
    unsafe { std::ptr::copy_nonoverlapping(old as *const u8, new.cast::<u8>(), old_len) };
    unmap(old, old_len)?;
    Ok(new)
}

/// Extends the mapping ending at `old_end` to `new_end` when its block has room there that no
/// other mapping uses; the new pages read as zeros.
fn grow_in_place(old: usize, old_end: usize, new_end: usize) -> Result<bool, c_int> {
    let mut t = table();
    let Some((_, blk)) = t.overlapping(old, old + 1).next() else { return Ok(false) };
    if blk.end < new_end || blk.live.iter().any(|r| r.start < new_end && r.end > old_end) {
        return Ok(false);
    }
    discard(old_end, new_end)?;
    t.revive(old_end, new_end);
    drop(t);
    account(new_end - old_end, 0);
    Ok(true)
}
