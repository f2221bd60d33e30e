//! Start-up and shut-down of a preloaded process: start the pager with the configuration the
//! environment gives (`settings.rs`), hand its region to mimalloc as the application heap, print
//! statistics on exit, and make `fork` safe.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

use coalesce_pager::{ExitReport, Pager, Region, RegionOptions};

use crate::heap;
use crate::settings::{memory_available, var, ForkMax, Settings};

/// Exit status when the configuration is unusable: the program is not started.
pub const EXIT_MISCONFIGURED: i32 = 125;

/// The running pager and its heap region (null when no servers are configured).
static PAGER: AtomicPtr<Pager> = AtomicPtr::new(std::ptr::null_mut());
static REGION: AtomicPtr<Region<'static>> = AtomicPtr::new(std::ptr::null_mut());
/// The process that set the pager up (a forked child does not report statistics).
static OWNER_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

static FORK_MAX: std::sync::OnceLock<ForkMax> = std::sync::OnceLock::new();
static FORKS_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn refuse(why: &str) -> ! {
    eprintln!("coalesce: {why}; the program was not started (exit status {EXIT_MISCONFIGURED})");
    // SAFETY: _exit ends the process at once; nothing else runs.
    unsafe { libc::_exit(EXIT_MISCONFIGURED) }
}

/// Runs from `.init_array`, before `main`.
pub extern "C" fn init() {
    let settings = match Settings::from_env() {
        Ok(Some(s)) => s,
        Ok(None) => return, // no servers: the program runs on plain local memory
        Err(e) => refuse(&e),
    };
    heap::mark_internal_thread();
    resolve_glibc_usable_size();
    init_logging(&settings.log);
    let mut config = settings.pager_config();
    config.thread_start = Some(pager_thread_start);
    let pager: &'static Pager = match Pager::new(config) {
        Ok(p) => Box::leak(Box::new(p)),
        Err(e) => refuse(&e.to_string()),
    };
    let threads = pager.thread_count();
    // Every pager thread must have made its internal heap before the region becomes the
    // application heap: mimalloc allocates a new heap's own struct from the thread's default heap,
    // which after that point would be region memory that only a pager thread can fault in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while STARTED_THREADS.load(Ordering::Acquire) < threads {
        if std::time::Instant::now() > deadline {
            refuse("the pager's threads did not start within 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let region: &'static Region<'static> = match pager.map(settings.heap_size, RegionOptions::default()) {
        Ok(r) => Box::leak(Box::new(r)),
        Err(e) => refuse(&e.to_string()),
    };
    // SAFETY: the region stays mapped for the life of the process (leaked above) and nothing else
    // uses it.
    if let Err(e) = unsafe { heap::adopt_region(region.as_ptr(), region.len()) } {
        refuse(&e);
    }
    // SAFETY: getpid has no preconditions.
    OWNER_PID.store(unsafe { libc::getpid() }, Ordering::Release);
    crate::mapping_calls::set_min_len(settings.mmap_min);
    let _ = FORK_MAX.set(settings.fork_max);
    PAGER.store(std::ptr::from_ref(pager).cast_mut(), Ordering::Release);
    REGION.store(std::ptr::from_ref(region).cast_mut(), Ordering::Release);
    heap::unmark_internal_thread();
    // SAFETY: registering a plain extern "C" function with atexit.
    unsafe { libc::atexit(at_exit) };
}

/// glibc's `malloc_usable_size`, for blocks of the internal heap (0: not resolved).
static GLIBC_USABLE_SIZE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn resolve_glibc_usable_size() {
    // SAFETY: looking up the next definition of the symbol (glibc's); the name is a C string.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
    GLIBC_USABLE_SIZE.store(f as usize, Ordering::Release);
}

/// `malloc_usable_size` of a block of the internal heap: glibc's answer, or 0 (which promises no
/// extra bytes) if glibc's function could not be found.
///
/// # Safety
/// `p` must be a live block of glibc's allocator.
pub unsafe fn glibc_usable_size(p: *mut libc::c_void) -> usize {
    let f = GLIBC_USABLE_SIZE.load(Ordering::Acquire);
    if f == 0 {
        return 0;
    }
    // SAFETY: `f` is glibc's `malloc_usable_size`, which has this signature; `p` is a live glibc
    // block (the caller's contract).
    let f: unsafe extern "C" fn(*mut libc::c_void) -> usize = unsafe { std::mem::transmute(f) };
    // SAFETY: as above.
    unsafe { f(p) }
}

static STARTED_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn pager_thread_start() {
    heap::mark_internal_thread();
    STARTED_THREADS.fetch_add(1, Ordering::AcqRel);
}

extern "C" fn at_exit() {
    if var("COALESCE_DEBUG_HEAP").is_some() {
        let h = heap::app_heap();
        // SAFETY: debugging aid: one allocation from the application heap.
        let p = unsafe { libmimalloc_sys::mi_heap_malloc(h, 5000) };
        let r = region().map(|r| (r.as_ptr() as usize, r.len()));
        eprintln!("debug: app heap {h:?} internal {} block {p:?} region {r:x?}", heap::is_internal_thread());
    }
    let Some(pager) = pager() else { return };
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != OWNER_PID.load(Ordering::Acquire) {
        return;
    }
    let Some(dest) = var("COALESCE_STATS") else { return };
    heap::mark_internal_thread();
    let report = ExitReport {
        pager: pager.stats(),
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
        pid: std::process::id(),
        preload: coalesce_pager::PreloadStats {
            forks_refused: FORKS_REFUSED.load(Ordering::Relaxed),
            ..crate::mappings::stats()
        },
        program: std::fs::read_to_string("/proc/self/comm").map(|c| c.trim().to_owned()).unwrap_or_default(),
        // SAFETY: getppid has no preconditions.
        ppid: u32::try_from(unsafe { libc::getppid() }).unwrap_or(0),
        command: std::fs::read("/proc/self/cmdline")
            .map(|c| {
                let words: Vec<String> = c
                    .split(|b| *b == 0)
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect();
                words.join(" ")
            })
            .unwrap_or_default(),
    };
    if dest == "1" || dest == "stderr" {
        eprint!("{report}");
    } else {
        // A directory gets one report per process (every process of a pipeline reports).
        let path = std::path::PathBuf::from(&dest);
        let path = if path.is_dir() { path.join(format!("coalesce-stats-{}.json", report.pid)) } else { path };
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&path, json + "\n"));
        if let Err(e) = written {
            eprintln!("coalesce: cannot write statistics to {}: {e}", path.display());
        }
    }
    heap::unmark_internal_thread();
}

/// The process's peak resident set (`VmHWM` in /proc/self/status) in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn pager() -> Option<&'static Pager> {
    let p = PAGER.load(Ordering::Acquire);
    // SAFETY: the pager was leaked and is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// False when the pager says an allocation of `size` bytes would take the heap past its local
/// maximum while no lender takes pages (`COALESCE_LOCAL_MAX`): the allocation then fails with
/// `ENOMEM`. Allocates nothing.
pub fn may_allocate(size: usize) -> bool {
    pager().is_none_or(|p| p.may_allocate(size))
}

/// The heap region's `[start, end)` once the pager runs.
pub fn region_bounds() -> Option<(usize, usize)> {
    region().map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len()))
}

fn region() -> Option<&'static Region<'static>> {
    let r = REGION.load(Ordering::Acquire);
    // SAFETY: the region was leaked and is never freed.
    (!r.is_null()).then(|| unsafe { &*r })
}

type ForkFn = unsafe extern "C" fn() -> libc::pid_t;

/// `fork(2)` made safe: the child gets no pager (no `UFFD_EVENT_FORK`, which needs
/// CAP_SYS_PTRACE, and no pager threads), so before forking every remote heap page is brought back
/// and eviction is held; the child then owns a complete private copy of the heap, and the parent's
/// later write-backs cannot change what it sees. The parent resumes eviction after the fork.
/// `posix_spawn` and `vfork` share the address space until `exec` and need none of this.
///
/// # Safety
/// The same as glibc's `fork`: in a multi-threaded program the child may only call
/// async-signal-safe functions until it calls `exec`.
#[no_mangle]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    // SAFETY: looking up the next definition of `fork` (glibc's); the name is a valid C string.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"fork".as_ptr()) };
    if real.is_null() {
        // SAFETY: setting errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: `real` is glibc's `fork`, whose signature this is.
    let real: ForkFn = unsafe { std::mem::transmute::<*mut libc::c_void, ForkFn>(real) };
    let (Some(pager), Some(region)) = (pager(), region()) else {
        // SAFETY: calling glibc's fork.
        return unsafe { real() };
    };
    if let Some(refusal) = fork_refusal(pager) {
        FORKS_REFUSED.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{refusal}");
        // SAFETY: setting errno.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return -1;
    }
    pager.hold_resident(true);
    // Pages the evictor was moving out when the hold began become remote a moment later: repeat
    // until a pass finds nothing to fetch twice in a row.
    let mut fetched = 0;
    loop {
        let n = region.fetch_all();
        fetched += n;
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
            let again = region.fetch_all();
            fetched += again;
            if again == 0 {
                break;
            }
        }
    }
    if fetched > 0 {
        let stats = pager.stats();
        tracing::warn!(
            fetched_pages = fetched,
            resident_pages = stats.resident_pages,
            budget_pages = stats.budget_pages,
            "fork: the child needs the whole heap locally; brought {} MiB back from the lenders, past the local \
             budget until the parent evicts again (use posix_spawn or vfork+exec to avoid it)",
            fetched * 4096 / (1 << 20)
        );
    }
    // The child must not inherit the mapping table locked by another thread.
    let table = crate::mappings::lock_for_fork();
    // SAFETY: calling glibc's fork.
    let pid = unsafe { real() };
    drop(table);
    if pid != 0 {
        pager.hold_resident(false);
    }
    pid
}

/// Why a fork now would bring back more of the heap than `COALESCE_FORK_MAX` allows, if it would.
fn fork_refusal(pager: &Pager) -> Option<String> {
    let needed = pager.stats().remote_pages * 4096;
    let (limit, what) = match FORK_MAX.get().copied().unwrap_or(ForkMax::Available) {
        ForkMax::Unlimited => return None,
        ForkMax::Bytes(b) => (b, "COALESCE_FORK_MAX"),
        ForkMax::Available => (memory_available()?, "the memory available (MemAvailable)"),
    };
    (needed > limit).then(|| {
        format!(
            "fork refused (ENOMEM): the child needs the whole heap locally, and {} MiB of it is on lenders, more than \
             {what} ({} MiB); use posix_spawn or vfork+exec, or set COALESCE_FORK_MAX to a larger size or `unlimited`",
            needed >> 20,
            limit >> 20
        )
    })
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` if set, else by `default` (`COALESCE_LOG`).
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
