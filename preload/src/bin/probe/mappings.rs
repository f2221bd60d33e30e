//! `probe mmap`: a program that takes its memory with raw anonymous `mmap` and relies on the
//! kernel's semantics: fresh pages read as zeros, `munmap` of part of a mapping leaves the rest
//! intact, `mremap` grows (keeping the contents, zero-filling the rest) and shrinks, `MADV_DONTNEED`
//! zeroes, `MAP_FIXED` over a mapping gives zero pages, a fork child sees the mapping, small and
//! file mappings and a reservation larger than the heap work as ever. Prints what the paged heap
//! refused (`mprotect` to read-only, `munmap` of `malloc`'s memory) and `OK mmap`.

use std::ffi::c_void;

use super::fail;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// The word at `word` of page `page` of mapping `tag`.
fn word(tag: u64, page: usize, word: usize) -> u64 {
    (tag << 48) ^ ((page as u64) << 16) ^ word as u64 ^ 0x9e37_79b9
}

fn map(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(&format!("mmap of {len} bytes failed: {}", std::io::Error::last_os_error()));
    }
    p.cast()
}

/// The pages `[first, first + n)` of the mapping at `base`, as words.
fn pages<'a>(base: *mut u8, first: usize, n: usize) -> &'a mut [u64] {
    // SAFETY: callers pass pages of a live read-write mapping of theirs.
    unsafe { std::slice::from_raw_parts_mut(base.add(first * PAGE).cast::<u64>(), n * PAGE / 8) }
}

fn fill(base: *mut u8, tag: u64, first: usize, n: usize) {
    for (i, w) in pages(base, first, n).iter_mut().enumerate() {
        *w = word(tag, first + i / (PAGE / 8), i % (PAGE / 8));
    }
}

fn check(base: *mut u8, tag: u64, first: usize, n: usize, what: &str) {
    for (i, w) in pages(base, first, n).iter().enumerate() {
        let (page, at) = (first + i / (PAGE / 8), i % (PAGE / 8));
        if *w != word(tag, page, at) {
            fail(&format!("{what}: page {page} word {at} is {w:#x}, not {:#x}", word(tag, page, at)));
        }
    }
}

fn check_zero(base: *mut u8, first: usize, n: usize, what: &str) {
    if let Some(i) = pages(base, first, n).iter().position(|w| *w != 0) {
        fail(&format!("{what}: page {} is not zero", first + i / (PAGE / 8)));
    }
}

fn unmap(p: *mut u8, len: usize, what: &str) {
    // SAFETY: `p..p + len` are pages of a mapping of this program's that it no longer uses.
    if unsafe { libc::munmap(p.cast(), len) } != 0 {
        fail(&format!("munmap {what}: {}", std::io::Error::last_os_error()));
    }
}

/// Runs every check; a failure exits with status 1 and says which.
pub fn run() {
    // A large buffer, several times the test's budget: zero, then written and read back.
    let big_pages = 256 * MIB / PAGE;
    let big = map(big_pages * PAGE);
    check_zero(big, 0, big_pages, "a fresh mapping");
    fill(big, 1, 0, big_pages);
    check(big, 1, 0, big_pages, "the large mapping");

    // munmap of the middle and of the head: what is left is intact.
    unmap(big.wrapping_add(64 * MIB), 64 * MIB, "the middle");
    unmap(big, 16 * MIB, "the head");
    check(big, 1, 16 * MIB / PAGE, 48 * MIB / PAGE, "before the hole");
    check(big, 1, 128 * MIB / PAGE, 128 * MIB / PAGE, "after the hole");

    // MADV_DONTNEED zeroes; the neighbouring pages keep their contents.
    // SAFETY: advice on pages of this program's mapping.
    if unsafe { libc::madvise(big.wrapping_add(130 * MIB).cast(), MIB, libc::MADV_DONTNEED) } != 0 {
        fail("madvise(MADV_DONTNEED)");
    }
    check_zero(big, 130 * MIB / PAGE, MIB / PAGE, "after MADV_DONTNEED");
    check(big, 1, 129 * MIB / PAGE, MIB / PAGE, "beside MADV_DONTNEED");
    check(big, 1, 131 * MIB / PAGE, MIB / PAGE, "beside MADV_DONTNEED");

    // MAP_FIXED over part of the mapping: zero pages there, the rest untouched.
    let at = big.wrapping_add(140 * MIB);
    // SAFETY: replaces pages of this program's own mapping.
    let fixed = unsafe {
        libc::mmap(
            at.cast(),
            MIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if fixed != at.cast::<c_void>() {
        fail(&format!("mmap(MAP_FIXED) over the mapping: {}", std::io::Error::last_os_error()));
    }
    check_zero(big, 140 * MIB / PAGE, MIB / PAGE, "after MAP_FIXED");
    check(big, 1, 141 * MIB / PAGE, MIB / PAGE, "beside MAP_FIXED");

    remaps();
    pass_through();
    let refused = refusals(big);
    unmap(big.wrapping_add(16 * MIB), 48 * MIB, "before the hole");
    unmap(big.wrapping_add(128 * MIB), 128 * MIB, "the rest");
    // A fork child sees a mapping as it was (a fork brings the heap local: a small one here).
    let forked = map(16 * MIB);
    fill(forked, 4, 0, 16 * MIB / PAGE);
    fork_child_checks(forked, 4, 16 * MIB / PAGE);
    unmap(forked, 16 * MIB, "the forked mapping");
    println!("refused: {refused}");
    println!("OK mmap");
}

fn fork_child_checks(base: *mut u8, tag: u64, n: usize) {
    // SAFETY: the child only reads memory and calls _exit.
    match unsafe { libc::fork() } {
        -1 => fail("fork"),
        0 => {
            let ok = pages(base, 0, n).iter().enumerate().all(|(i, w)| *w == word(tag, i / (PAGE / 8), i % (PAGE / 8)));
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if ok { 0 } else { 3 }) }
        }
        child => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                fail(&format!("the fork child saw the mapping changed (status {status})"));
            }
        }
    }
}

/// mremap: growth keeps the contents and zero-fills the rest; shrinking keeps the head.
fn remaps() {
    let small = map(MIB);
    fill(small, 2, 0, MIB / PAGE);
    // SAFETY: growing this program's own mapping; it may move.
    let grown = unsafe { libc::mremap(small.cast(), MIB, 64 * MIB, libc::MREMAP_MAYMOVE) };
    if grown == libc::MAP_FAILED {
        fail(&format!("mremap growth: {}", std::io::Error::last_os_error()));
    }
    let grown = grown.cast::<u8>();
    check(grown, 2, 0, MIB / PAGE, "after mremap growth");
    check_zero(grown, MIB / PAGE, 63 * MIB / PAGE, "the grown part");
    fill(grown, 2, MIB / PAGE, 63 * MIB / PAGE);
    // SAFETY: shrinking it in place.
    let shrunk = unsafe { libc::mremap(grown.cast(), 64 * MIB, 2 * MIB, 0) };
    if shrunk != grown.cast::<c_void>() {
        fail(&format!("mremap shrink: {}", std::io::Error::last_os_error()));
    }
    check(grown, 2, 0, 2 * MIB / PAGE, "after mremap shrink");
    // Growing back in place without MREMAP_MAYMOVE, or moving: either way the contents stay.
    // SAFETY: as above.
    let again = unsafe { libc::mremap(grown.cast(), 2 * MIB, 8 * MIB, libc::MREMAP_MAYMOVE) };
    if again == libc::MAP_FAILED {
        fail(&format!("mremap regrowth: {}", std::io::Error::last_os_error()));
    }
    check(again.cast(), 2, 0, 2 * MIB / PAGE, "after mremap regrowth");
    check_zero(again.cast(), 2 * MIB / PAGE, 6 * MIB / PAGE, "the regrown part");
    unmap(again.cast(), 8 * MIB, "the remapped mapping");
}

/// Small mappings and file mappings work as they always do.
fn pass_through() {
    let small = map(PAGE);
    fill(small, 3, 0, 1);
    check(small, 3, 0, 1, "a one-page mapping");
    unmap(small, PAGE, "a one-page mapping");

    // A sparse reservation larger than the heap (the tests give it 8 GiB): the kernel maps it.
    let huge = 64usize << 30;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            huge,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(&format!("a 64 GiB reservation failed: {}", std::io::Error::last_os_error()));
    }
    let p = p.cast::<u8>();
    fill(p, 5, huge / PAGE - 1, 1);
    check(p, 5, huge / PAGE - 1, 1, "the last page of a 64 GiB reservation");
    unmap(p, huge, "a 64 GiB reservation");

    let path = std::env::temp_dir().join(format!("coalesce-probe-mmap-{}", std::process::id()));
    std::fs::write(&path, vec![7u8; 2 * MIB]).unwrap_or_else(|e| fail(&format!("temp file: {e}")));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(&format!("temp file: {e}")));
    // SAFETY: a read-only private mapping of a file this program made.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * MIB,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail("file mapping");
    }
    // SAFETY: the mapping holds 2 MiB of readable bytes.
    if unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 2 * MIB) }.iter().any(|b| *b != 7) {
        fail("a file mapping reads wrong");
    }
    unmap(p.cast(), 2 * MIB, "the file mapping");
    let _ = std::fs::remove_file(&path);
}

/// Calls the paged heap refuses (the kernel would allow them); returns how many were refused.
fn refusals(big: *mut u8) -> usize {
    let mut refused = 0;
    // SAFETY: a read-only protection on pages of this program's own mapping, restored below.
    if unsafe { libc::mprotect(big.wrapping_add(200 * MIB).cast(), MIB, libc::PROT_READ) } != 0 {
        refused += 1;
    } else {
        // SAFETY: restoring it.
        unsafe { libc::mprotect(big.wrapping_add(200 * MIB).cast(), MIB, libc::PROT_READ | libc::PROT_WRITE) };
    }
    check(big, 1, 200 * MIB / PAGE, MIB / PAGE, "after a refused mprotect");
    // `munmap` of memory that `malloc` handed out: the kernel would unmap it.
    let block = vec![5u8; 4 * MIB];
    let aligned = (block.as_ptr() as usize).next_multiple_of(PAGE);
    // SAFETY: deliberately misusing munmap on the heap; under the preload it is refused, and
    // without it the probe is not run in this mode.
    if unsafe { libc::munmap(aligned as *mut c_void, MIB) } != 0 {
        refused += 1;
    }
    if block.iter().any(|b| *b != 5) {
        fail("a refused munmap changed the heap");
    }
    refused
}
