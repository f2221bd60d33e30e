//! End-to-end tests of the userfaultfd pager against real `memory-server` processes on 127.0.0.1:
//! data integrity under heavy eviction and concurrency, clean pages not written back, placement over
//! two servers, discard, a server killed mid-run (the access must die by SIGBUS, never read zeros),
//! missing privileges, and a uffd-stress style race of faults, writes and eviction.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coalesce_pager::{Pager, PagerConfig, PagerError, Region, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;

fn pager(servers: Vec<std::net::SocketAddr>, budget: usize, threads: usize) -> Pager {
    let mut config = PagerConfig::new(servers, budget);
    config.fault_threads = threads;
    Pager::new(config).unwrap()
}

/// The 8-byte word `w` of page `p` as written by writer `t`.
fn word(t: u64, p: usize, w: usize) -> u64 {
    (t << 56) ^ ((p as u64) << 12) ^ (w as u64) ^ 0x5A5A_0000_0000
}

fn fill_page(base: usize, p: usize, t: u64) {
    // SAFETY: the page lies in a live region owned by the caller; plain stores into it.
    let words = unsafe { std::slice::from_raw_parts_mut((base + p * PAGE_SIZE) as *mut u64, PAGE_SIZE / 8) };
    for (w, v) in words.iter_mut().enumerate() {
        *v = word(t, p, w);
    }
}

/// A region of `len` bytes without prefetch, its first `pages` pages written by writer `t`;
/// returns it and its base address.
fn written_region(pager: &Pager, len: usize, pages: usize, t: u64) -> (Region<'_>, usize) {
    let region = pager.map(len, RegionOptions { prefetch: Some(false), ..RegionOptions::default() }).unwrap();
    let base = region.as_ptr() as usize;
    for p in 0..pages {
        fill_page(base, p, t);
    }
    (region, base)
}

fn check_page(base: usize, p: usize, t: u64) -> bool {
    // SAFETY: as above, reads only.
    let words = unsafe { std::slice::from_raw_parts((base + p * PAGE_SIZE) as *const u64, PAGE_SIZE / 8) };
    words.iter().enumerate().all(|(w, &v)| v == word(t, p, w))
}

#[test]
fn four_threads_write_and_verify_disjoint_and_shared_pages_under_heavy_eviction() {
    let server = ServerProcess::start(&["--capacity", "1GiB", "--slab-size", "64MiB"]);
    let budget = 32 * MIB;
    let pager = pager(vec![server.addr], budget, 2);
    let region = pager.map(512 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    const SHARED: usize = 64;
    const INCREMENTS: u64 = 20_000;
    let per_thread = (pages - SHARED) / 4;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let first = SHARED + t as usize * per_thread;
                let mut rng = fastrand::Rng::with_seed(t);
                // Even threads write their pages in order, odd ones in random order.
                let mut order: Vec<usize> = (first..first + per_thread).collect();
                if !t.is_multiple_of(2) {
                    rng.shuffle(&mut order);
                }
                for (k, &p) in order.iter().enumerate() {
                    fill_page(base, p, t);
                    if k.is_multiple_of(64) {
                        // Shared pages: racing atomic increments on words of the first 64 pages.
                        let sp = rng.usize(..SHARED);
                        let w = rng.usize(..PAGE_SIZE / 8);
                        // SAFETY: an aligned word inside the live region, used only atomically.
                        let a = unsafe { &*((base + sp * PAGE_SIZE + w * 8) as *const AtomicU64) };
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for _ in 0..INCREMENTS {
                    let sp = rng.usize(..SHARED);
                    // SAFETY: as above.
                    let a = unsafe { &*((base + sp * PAGE_SIZE) as *const AtomicU64) };
                    a.fetch_add(1, Ordering::Relaxed);
                }
                // Verify this thread's pages (most of them are remote by now).
                for &p in order.iter().rev() {
                    assert!(check_page(base, p, t), "thread {t}: page {p} read back wrong");
                }
            });
        }
    });
    // Every page again, from one thread, after everything was evicted several times.
    for t in 0..4u64 {
        let first = SHARED + t as usize * per_thread;
        for p in first..first + per_thread {
            assert!(check_page(base, p, t), "page {p} of thread {t} read back wrong at the end");
        }
    }
    // SAFETY: the shared pages are inside the region; read as plain words now that writers are done.
    let shared_words = unsafe { std::slice::from_raw_parts(base as *const u64, SHARED * PAGE_SIZE / 8) };
    let total: u64 = shared_words.iter().sum();
    let expected = 4 * INCREMENTS + (0..4).map(|_| per_thread.div_ceil(64) as u64).sum::<u64>();
    assert_eq!(total, expected, "lost or duplicated increments on shared pages");
    let stats = pager.stats();
    eprintln!("{stats}");
    assert!(stats.evictions_dirty as usize >= pages - budget / PAGE_SIZE, "{stats}");
    assert!(stats.remote_faults > 0 && stats.write_faults > 0, "{stats}");
    assert_eq!(stats.overshoot_events, 0, "{stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
    assert_eq!(stats.fetch_failures, 0);
}

#[test]
fn clean_pages_are_dropped_without_writing_them_back() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let budget = 8 * MIB;
    let pager = pager(vec![server.addr], budget, 1);
    let region = pager.map(64 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        fill_page(base, p, 9);
    }
    let after_write = pager.stats();
    for _ in 0..2 {
        for p in 0..pages {
            assert!(check_page(base, p, 9), "page {p}");
        }
    }
    let after_read = pager.stats();
    eprintln!("{after_read}");
    let budget_pages = (budget / PAGE_SIZE) as u64;
    // Only pages still dirty from the write phase (at most a budget's worth) may be written back.
    assert!(
        after_read.evictions_dirty - after_write.evictions_dirty <= budget_pages,
        "reads caused write-backs: {after_write} / {after_read}"
    );
    assert!(after_read.bytes_out - after_write.bytes_out <= budget_pages * PAGE_SIZE as u64);
    assert!(after_read.evictions_clean >= 2 * (pages as u64 - budget_pages), "{after_read}");
}

#[test]
fn a_stream_meets_windows_fetched_ahead_and_every_page_reads_back() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let mut faults = Vec::new();
    for ahead in [true, false] {
        let mut config = PagerConfig::new(vec![server.addr], 8 * MIB);
        config.prefetch_ahead = ahead;
        let pager = Pager::new(config).unwrap();
        let region = pager.map(64 * MIB, RegionOptions::default()).unwrap();
        let base = region.as_ptr() as usize;
        let pages = region.len() / PAGE_SIZE;
        for p in 0..pages {
            fill_page(base, p, 4);
        }
        let before = pager.stats();
        for p in 0..pages {
            assert!(check_page(base, p, 4), "page {p} read back wrong (prefetch ahead: {ahead})");
        }
        // Backwards too: a stream with a negative stride.
        for p in (0..pages).rev() {
            assert!(check_page(base, p, 4), "page {p} read back wrong going down (prefetch ahead: {ahead})");
        }
        let stats = pager.stats();
        eprintln!("prefetch ahead {ahead}:\n{stats}");
        if ahead {
            assert!(stats.prefetched_ahead > 0, "no window was fetched ahead: {stats}");
        } else {
            assert_eq!(stats.prefetched_ahead, 0, "{stats}");
        }
        assert_eq!(stats.state_violations, 0, "{stats}");
        assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
        faults.push(stats.remote_faults - before.remote_faults);
    }
    eprintln!("remote faults of the two passes: {} with windows ahead, {} without", faults[0], faults[1]);
}

#[test]
fn pages_spread_over_two_servers() {
    let a = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let b = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![a.addr, b.addr], 4 * MIB, 1);
    let region = pager.map(64 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        fill_page(base, p, 3);
    }
    for p in 0..pages {
        assert!(check_page(base, p, 3), "page {p}");
    }
    let per_server = pager.server_pages();
    eprintln!("{per_server:?}");
    for (addr, n, alive) in &per_server {
        assert!(*alive);
        assert!(*n as usize > pages / 3, "server {addr} holds only {n} of {pages} pages");
    }
    for server in [&a, &b] {
        let mut c = rdma::client::ControlClient::connect(server.addr, &Default::default()).unwrap();
        let s = c.stats().unwrap();
        assert!(s.writes > 0 && s.reads > 0, "server {} saw no traffic: {s:?}", server.addr);
    }
}

#[test]
fn discarded_pages_read_back_as_zeros_and_free_their_remote_copies() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 2 * MIB, 1);
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        fill_page(base, p, 5);
    }
    // Page 0 was written first and is remote by now; the last page is still resident.
    let before = pager.stats();
    assert!(before.remote_pages > 0);
    region.discard(0, PAGE_SIZE).unwrap();
    region.discard((pages - 1) * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert!(region.as_slice()[..PAGE_SIZE].iter().all(|&b| b == 0), "discarded remote page is not zero");
    assert!(
        region.as_slice()[(pages - 1) * PAGE_SIZE..].iter().all(|&b| b == 0),
        "discarded resident page is not zero"
    );
    for p in 1..pages - 1 {
        assert!(check_page(base, p, 5), "page {p} was disturbed");
    }
    let after = pager.stats();
    eprintln!("{after}");
    assert!(after.removed_pages >= 2, "{after}");
    assert!(after.remote_freed >= 1, "the remote copy of page 0 was not freed: {after}");
    // The discarded pages can be written and read again.
    fill_page(base, 0, 6);
    assert!(check_page(base, 0, 6));
}

/// Child side of the SIGBUS test: map, fill over two servers, say READY, wait, read everything.
fn sigbus_child(servers: &str) -> ! {
    coalesce::init_logging("error");
    let servers: Vec<_> = servers.split(',').map(|s| s.parse().unwrap()).collect();
    let mut config = PagerConfig::new(servers, 2 * MIB);
    config.fetch_timeout = Duration::from_secs(2);
    // One copy of each page: the loss of a lender must be loud (tests/survive_lenders.rs has
    // the replicated side).
    config.redundancy = Some(coalesce_pager::store::Redundancy::None);
    let pager = Pager::new(config).unwrap();
    let on_failure: coalesce_pager::FailureHandler = std::sync::Arc::new(|f: &coalesce_pager::FetchFailure| {
        eprintln!("failure handler: {} lost {:#x}", f.server, f.addr)
    });
    let options = RegionOptions { prefetch: Some(false), on_failure: Some(on_failure), ..RegionOptions::default() };
    let region = pager.map(32 * MIB, options).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        fill_page(base, p, 1);
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    for p in 0..pages {
        if !check_page(base, p, 1) {
            println!("CORRUPT page {p}");
            std::process::exit(3);
        }
    }
    println!("ALL-OK");
    std::process::exit(0);
}

#[test]
fn a_killed_server_makes_the_access_die_by_sigbus_never_read_zeros() {
    if let Ok(servers) = std::env::var("COALESCE_SIGBUS_CHILD") {
        sigbus_child(&servers);
    }
    let a = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let b = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let b_addr = b.addr;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_killed_server_makes_the_access_die_by_sigbus_never_read_zeros", "--nocapture"])
        .env("COALESCE_SIGBUS_CHILD", format!("{},{}", a.addr, b.addr))
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut seen = Vec::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended before READY: {seen:?}");
        seen.push(line.clone());
        if line.trim() == "READY" {
            break;
        }
    }
    drop(b); // SIGKILL: the server and every page it held are gone
    std::thread::sleep(Duration::from_millis(200));
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stdout.contains("CORRUPT") && !stdout.contains("ALL-OK"), "child read wrong data: {stdout}");
    assert_eq!(output.status.signal(), Some(libc::SIGBUS), "child status {:?}; stderr:\n{stderr}", output.status);
    assert!(
        stderr.contains(&b_addr.to_string()) && stderr.contains("cannot fetch page"),
        "the log must name the server and the page:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("failure handler: {b_addr} lost")),
        "the failure handler was not called:\n{stderr}"
    );
}

fn resident_pages(base: usize, len: usize) -> usize {
    let mut vec = vec![0u8; len / PAGE_SIZE];
    // SAFETY: mincore on a live mapping of ours, one output byte per page.
    let rc = unsafe { libc::mincore(base as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn a_region_over_its_latency_bound_keeps_its_pages_local() {
    // With two evictors, one may find only the bounded pages while the other holds every other
    // victim: that is no reason to evict the bounded ones.
    for evictors in [1, 2] {
        bounded_region_keeps_its_pages_local(evictors);
    }
}

fn bounded_region_keeps_its_pages_local(evictors: usize) {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let mut config = PagerConfig::new(vec![server.addr], 2 * MIB);
    config.evictor_threads = evictors;
    let pager = Pager::new(config).unwrap();
    let bounded_options = RegionOptions { latency_bound: Some(Duration::from_nanos(1)), ..RegionOptions::default() };
    let bounded = pager.map(256 * 1024, bounded_options).unwrap();
    let other = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let (a, b) = (bounded.as_ptr() as usize, other.as_ptr() as usize);
    let a_pages = bounded.len() / PAGE_SIZE;
    for p in 0..a_pages {
        fill_page(a, p, 7);
    }
    // Push the bounded region out once, so that its next faults are remote (and too slow).
    for p in 0..other.len() / PAGE_SIZE {
        fill_page(b, p, 8);
    }
    for p in 0..a_pages {
        assert!(check_page(a, p, 7));
    }
    // A fault's statistics are recorded just after the faulting thread resumes: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bounded.stats().latency_bound_violations == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(bounded.stats().latency_bound_violations > 0, "{:?}", bounded.stats());
    // Now heavy pressure from the other region must not evict the bounded one.
    for _ in 0..2 {
        for p in 0..other.len() / PAGE_SIZE {
            assert!(check_page(b, p, 8));
        }
    }
    assert_eq!(
        resident_pages(a, bounded.len()),
        a_pages,
        "pages of the bounded region were evicted ({evictors} evictor(s))"
    );
    assert_eq!(bounded.stats().evicted_over_bound, 0, "{:?}", bounded.stats());
    let stats = pager.stats();
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
}

/// Aborts the test process if `f` has not returned within `limit`: a pager that stops making
/// progress must fail the run, not hang it.
fn within<R>(limit: Duration, what: &str, f: impl FnOnce() -> R) -> R {
    let (done, watched) = std::sync::mpsc::channel::<()>();
    let what = what.to_owned();
    let watchdog = std::thread::spawn(move || {
        if watched.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("{what}: no progress within {limit:?}; aborting");
            std::process::abort();
        }
    });
    let r = f();
    drop(done);
    let _ = watchdog.join();
    r
}

#[test]
fn a_bounded_region_larger_than_the_budget_still_pages_when_nothing_else_can_go() {
    // The latency bound is best effort: when the only pages to evict belong to a region whose
    // fetches are over its bound, the budget wins (this once hung a doctest on a slow machine).
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 2 * MIB, 1);
    let options = RegionOptions { latency_bound: Some(Duration::from_nanos(1)), ..RegionOptions::default() };
    let region = pager.map(16 * MIB, options).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    within(Duration::from_secs(120), "paging a bounded region", || {
        for pass in 0..2 {
            for p in 0..pages {
                if pass > 0 {
                    assert!(check_page(base, p, 3), "page {p} wrong");
                }
                fill_page(base, p, 3);
            }
        }
    });
    let region_stats = region.stats();
    assert!(region_stats.latency_bound_violations > 0 && region_stats.evicted_over_bound > 0, "{region_stats:?}");
    let stats = pager.stats();
    assert!(stats.peak_resident_pages <= stats.local_max_pages, "{stats}");
    assert!(stats.evictions_dirty > 0, "{stats}");
}

#[test]
fn without_userfaultfd_privileges_the_pager_refuses_with_a_clear_error() {
    if std::env::var("COALESCE_UNPRIVILEGED_CHILD").is_ok() {
        let err = Pager::new(PagerConfig::new(vec!["127.0.0.1:9".parse().unwrap()], 4 * MIB)).unwrap_err();
        println!("ERROR: {err}");
        std::process::exit(if matches!(err, PagerError::Userfaultfd(_)) { 0 } else { 4 });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to drop to an unprivileged user");
        return;
    }
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if unprivileged.trim() == "1" {
        eprintln!("skipped: vm.unprivileged_userfaultfd=1 lets every user handle kernel faults");
        return;
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "without_userfaultfd_privileges_the_pager_refuses_with_a_clear_error", "--nocapture"])
        .env("COALESCE_UNPRIVILEGED_CHILD", "1");
    // SAFETY: setgid/setuid in the forked child before exec; both are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("CAP_SYS_PTRACE") && stdout.contains("/dev/userfaultfd"), "{stdout}");
}

#[test]
fn stress_faults_writes_and_eviction_race_on_shared_pages() {
    // In the spirit of the kernel's uffd-stress: threads hammer counters on shared pages while the
    // budget forces constant eviction; no increment may be lost and private data must survive.
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], MIB, 2);
    let region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    const THREADS: u64 = 4;
    let shared_pages = pages / 2;
    let deadline = Instant::now() + Duration::from_secs(3);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(100 + t);
                    let private_first = shared_pages + t as usize * (pages - shared_pages) / THREADS as usize;
                    let private_n = (pages - shared_pages) / THREADS as usize;
                    let mut written = vec![false; private_n];
                    let mut n = 0u64;
                    while Instant::now() < deadline && n < 2_000_000 {
                        let sp = rng.usize(..shared_pages);
                        // SAFETY: counter word 0 of a shared page, only ever used atomically.
                        let c = unsafe { &*((base + sp * PAGE_SIZE) as *const AtomicU64) };
                        c.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        if n.is_multiple_of(16) {
                            let k = rng.usize(..private_n);
                            if written[k] {
                                assert!(check_page(base, private_first + k, t), "private page corrupted");
                            } else {
                                fill_page(base, private_first + k, t);
                                written[k] = true;
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = 0u64;
    for sp in 0..shared_pages {
        // SAFETY: reading the counters after every writer joined.
        total += unsafe { *((base + sp * PAGE_SIZE) as *const u64) };
    }
    let stats = pager.stats();
    eprintln!("{stats}");
    assert_eq!(total, counts.iter().sum::<u64>(), "increments were lost or duplicated");
    assert!(stats.evictions_dirty > 100 && stats.remote_faults > 100, "the test did not stress eviction: {stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages);
}

/// A forked child that waits until [`WaitingChild::release`], then runs its task and exits with
/// the task's code. The task may only call async-signal-safe functions and must not allocate.
struct WaitingChild {
    pid: libc::pid_t,
    fds: [libc::c_int; 2],
}

impl WaitingChild {
    fn fork(task: impl FnOnce() -> libc::c_int) -> Self {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only waits on the pipe, runs the task (async-signal-safe by contract)
        // and ends without running the parent's destructors.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut byte = 0u8;
            // SAFETY: reads one byte into a local.
            unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) };
            let code = task();
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        Self { pid, fds }
    }

    /// Lets the child run its task and reaps it; returns its wait status.
    fn release(self) -> libc::c_int {
        let mut status = 0;
        // SAFETY: writes one byte to our own pipe, reaps our own child, closes our descriptors.
        unsafe {
            libc::write(self.fds[1], [1u8].as_ptr().cast(), 1);
            libc::waitpid(self.pid, &raw mut status, 0);
            libc::close(self.fds[0]);
            libc::close(self.fds[1]);
        }
        status
    }
}

#[test]
fn pages_shared_with_a_forked_child_are_still_evicted_and_the_child_keeps_its_view() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let budget = 4 * MIB;
    let pager = pager(vec![server.addr], budget, 1);
    let region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        fill_page(base, p, 1);
    }
    let mut in_core = vec![0u8; pages];
    let child = WaitingChild::fork(|| {
        // SAFETY: mincore fills the vector allocated before fork.
        if unsafe { libc::mincore(base as *mut libc::c_void, pages * PAGE_SIZE, in_core.as_mut_ptr()) } != 0 {
            return 3;
        }
        // Every page the child has must still hold what it held at fork, whatever the parent did.
        let resident = in_core.iter().filter(|&&b| b & 1 != 0).count();
        let intact = (0..pages).filter(|&p| in_core[p] & 1 != 0).all(|p| check_page(base, p, 1));
        if resident == 0 {
            4
        } else if intact {
            0
        } else {
            5
        }
    });
    // The parent only reads at first: its resident pages stay shared with the child, so the evictor
    // has to unshare them to keep the budget. Then it overwrites everything and checks it.
    for _ in 0..2 {
        for p in 0..pages {
            assert!(check_page(base, p, 1), "page {p} read back wrong after fork");
        }
    }
    for p in 0..pages {
        fill_page(base, p, 2);
    }
    for p in 0..pages {
        assert!(check_page(base, p, 2), "page {p} read back wrong after rewrite");
    }
    let status = child.release();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child saw changed pages: {status:#x}");
    let stats = pager.stats();
    eprintln!("{stats}");
    assert!(stats.unshared_pages > 0, "no shared page was evicted: {stats}");
    assert_eq!(stats.overshoot_events, 0, "{stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
}

/// Child side of the invariant test: writes pages, makes the evictor drop them as if clean (an
/// injected bug), then reads one back.
fn dropped_dirty_child(server: &str) -> ! {
    coalesce::init_logging("error");
    let pager = pager(vec![server.parse().unwrap()], 2 * MIB, 2);
    let region = pager.map(4 * MIB, RegionOptions { prefetch: Some(false), ..RegionOptions::default() }).unwrap();
    let base = region.as_ptr() as usize;
    for p in 0..16 {
        fill_page(base, p, 7);
    }
    pager.inject_bug_drop_dirty_pages(true);
    // The last page's entry may still be in its install when the fill returns (the install wakes
    // the writer before it records the page as resident), so ask again if one was missed.
    let mut gone = 0;
    for _ in 0..10 {
        gone = region.evict(0, 16 * PAGE_SIZE);
        if gone == 16 {
            break;
        }
    }
    pager.inject_bug_drop_dirty_pages(false);
    println!("EVICTED {gone} PAGE3 {:#x}", base + 3 * PAGE_SIZE);
    std::io::stdout().flush().unwrap();
    // The injected bug left page 3 with no copy anywhere. Reading zeros here would be the silent
    // wrong byte; the invariant must raise SIGBUS instead.
    let ok = check_page(base, 3, 7);
    println!("READ-BACK {}", if ok { "RIGHT" } else { "WRONG" });
    std::process::exit(4);
}

#[test]
fn a_written_page_is_never_filled_with_zeros_even_when_a_bug_drops_it() {
    if let Ok(server) = std::env::var("COALESCE_DROPPED_DIRTY_CHILD") {
        dropped_dirty_child(&server);
    }
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "16MiB"]);
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_written_page_is_never_filled_with_zeros_even_when_a_bug_drops_it", "--nocapture"])
        .env("COALESCE_DROPPED_DIRTY_CHILD", server.addr.to_string())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("EVICTED 16"), "the pages were not evicted: {stdout}\n{stderr}");
    assert!(!stdout.contains("READ-BACK"), "the dropped page was read back instead of failing: {stdout}");
    assert_eq!(output.status.signal(), Some(libc::SIGBUS), "child status {:?}; stderr:\n{stderr}", output.status);
    let page3 = stdout.split("PAGE3 ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap();
    assert!(
        stderr.contains("page-state violation") && stderr.contains(page3),
        "the violation must be logged with the page's address {page3}:\n{stderr}"
    );
}

#[test]
fn pages_a_miscounted_move_took_are_found_in_staging_and_nothing_is_lost() {
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 2 * MIB, 2);
    let (region, base) = written_region(&pager, 8 * MIB, 256, 9);
    // Every multi-page move now reports EEXIST with nothing moved although it moved everything:
    // an evictor that believed the count would keep the pages as resident while their only copy
    // sits in the staging buffer it is about to empty.
    pager.inject_move_undercount(true);
    for _ in 0..10 {
        if region.evict(0, 256 * PAGE_SIZE) == 256 {
            break;
        }
    }
    pager.inject_move_undercount(false);
    for p in 0..256 {
        assert!(check_page(base, p, 9), "page {p} lost its data");
    }
    let stats = pager.stats();
    assert!(stats.move_miscounts > 0, "the injected miscount was not noticed: {stats}");
    assert_eq!(stats.state_violations, 0, "{stats}");
    assert!(stats.evictions_dirty >= 256, "{stats}");
}

#[test]
fn a_page_discarded_while_the_evictor_unshares_it_reads_as_zero_and_nothing_deadlocks() {
    // A fork leaves the pages shared; the evictor unshares each by writing to it. A discard
    // (`madvise`) that zaps the page just before that write once made the write fault on a page
    // whose lock the evictor held, while the fault handler waited for that lock: the process hung
    // for ever (seen once in CI, in the preload's fork test). The injected delay puts the zap
    // inside that window every time.
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 16 * MIB, 1);
    let pages = 4 * MIB / PAGE_SIZE;
    let (region, base) = written_region(&pager, 4 * MIB, pages, 3);
    // The child keeps the pages shared until it is released.
    let child = WaitingChild::fork(|| 0);
    pager.inject_evictor_delay(Duration::from_millis(20));
    let not_resident = within(Duration::from_secs(60), "evicting pages discarded while being unshared", || {
        std::thread::scope(|s| {
            let evicting = s.spawn(|| region.evict(0, region.len()));
            std::thread::sleep(Duration::from_millis(70));
            // SAFETY: the range is the region's own mapping; its pages may be zapped at any time.
            let rc = unsafe { libc::madvise(base as *mut libc::c_void, pages * PAGE_SIZE, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0, "madvise failed: {}", std::io::Error::last_os_error());
            evicting.join().unwrap()
        })
    });
    pager.inject_evictor_delay(Duration::ZERO);
    child.release();
    within(Duration::from_secs(60), "reading the discarded pages", || {
        for p in 0..pages {
            // SAFETY: reads a page of the live region.
            let words = unsafe { std::slice::from_raw_parts((base + p * PAGE_SIZE) as *const u64, PAGE_SIZE / 8) };
            assert!(words.iter().all(|&w| w == 0), "page {p} does not read as zero after its discard");
        }
    });
    let stats = pager.stats();
    eprintln!("{not_resident} pages not resident after the eviction\n{stats}");
    assert!(stats.unshared_pages > 0, "the evictor unshared nothing: {stats}");
    assert_eq!(stats.state_violations, 0, "{stats}");
}

#[test]
fn a_page_put_back_while_the_handler_waits_for_it_and_an_madvise_waits_too_is_not_lost() {
    // A dirty page whose write-back fails is put back with UFFDIO_COPY, which fails with EAGAIN
    // while any userfaultfd message is unread. With the fault handler waiting for that very page
    // (the program touched it while it was out) and an madvise elsewhere waiting for its message
    // to be read, nobody read it: the put-back gave up after 100,000 tries and left the page
    // unmapped while counted resident, so it was lost (poisoned, SIGBUS) instead of read back.
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 16 * MIB, 1);
    let (region, base) = written_region(&pager, MIB, 64, 5);
    let (_other, other_base) = written_region(&pager, MIB, 1, 6);
    server.signal(libc::SIGKILL);
    pager.inject_evictor_delay(Duration::from_millis(50));
    let touched = within(Duration::from_secs(60), "putting back a page the program waits for", || {
        std::thread::scope(|s| {
            s.spawn(|| region.evict(0, 64 * PAGE_SIZE));
            std::thread::sleep(Duration::from_millis(15));
            let toucher = s.spawn(|| check_page(base, 0, 5));
            std::thread::sleep(Duration::from_millis(15));
            // SAFETY: a page of our own region; its content may go.
            let rc = unsafe { libc::madvise(other_base as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0, "madvise failed: {}", std::io::Error::last_os_error());
            toucher.join().unwrap()
        })
    });
    pager.inject_evictor_delay(Duration::ZERO);
    assert!(touched, "page 0 read back wrong");
    within(Duration::from_secs(60), "reading the pages back", || {
        for p in 0..64 {
            assert!(check_page(base, p, 5), "page {p} read back wrong");
        }
    });
    let stats = pager.stats();
    eprintln!("{stats}");
    assert!(stats.writeback_failures > 0, "no write-back failed, so nothing was put back: {stats}");
    assert_eq!(stats.state_violations, 0, "{stats}");
}

#[test]
fn a_dirty_page_that_can_be_neither_written_back_nor_put_back_is_poisoned_and_counted_lost() {
    // The lender is gone, so every write-back fails; the put-back that should then keep the page
    // resident fails too (injected: the kernel refusing the copy). The page's contents are gone:
    // every access must fail loudly. It used to be marked resident while unmapped, so the next
    // eviction or access took it for a bug in the page states.
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "16MiB"]);
    let pager = pager(vec![server.addr], 16 * MIB, 1);
    let (region, base) = written_region(&pager, MIB, 64, 7);
    server.signal(libc::SIGKILL);
    pager.inject_put_back_failure(true);
    let not_resident =
        within(Duration::from_secs(60), "evicting pages that cannot be kept", || region.evict(0, 64 * PAGE_SIZE));
    pager.inject_put_back_failure(false);
    assert_eq!(not_resident, 64, "{}", pager.stats());
    for p in 0..64 {
        let read = common::kernel_read(base + p * PAGE_SIZE);
        assert_eq!(read.map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)), "page {p} was readable");
    }
    let stats = pager.stats();
    assert_eq!(stats.lost_pages, 64, "{stats}");
    assert!(stats.writeback_failures >= 64, "{stats}");
    assert_eq!(stats.state_violations, 0, "{stats}");
    assert_eq!(region.stats().fetch_failures, 64, "{stats}");
}

#[test]
fn a_lender_that_was_full_is_asked_again_once_another_client_frees_its_memory() {
    // 32 MiB to lend in 8 MiB slabs: the first pager takes three, the second the last one.
    let server = ServerProcess::start(&["--capacity", "32MiB", "--slab-size", "8MiB"]);
    let budget = 4 * MIB;
    let first = pager(vec![server.addr], budget, 1);
    let first_region = first.map(28 * MIB, RegionOptions::default()).unwrap();
    for p in 0..first_region.len() / PAGE_SIZE {
        fill_page(first_region.as_ptr() as usize, p, 1);
    }
    common::wait_stats(&first, "the first pager's pages going out", |s| {
        s.remote_pages >= (20 * MIB / PAGE_SIZE) as u64
    });

    let mut config = PagerConfig::new(vec![server.addr], budget);
    config.local_max = coalesce_pager::LocalMax::Unlimited;
    let second = Pager::new(config).unwrap();
    let region = second.map(32 * MIB, RegionOptions::default()).unwrap();
    let (base, pages) = (region.as_ptr() as usize, region.len() / PAGE_SIZE);
    for p in 0..pages {
        fill_page(base, p, 2);
    }
    // The lender is full: the second pager's heap stays local past its budget.
    common::wait_stats(&second, "the lender refusing slabs", |s| s.overshoot_events > 0);
    assert!(second.stats().resident_pages > second.stats().budget_pages, "{}", second.stats());

    // The first client leaves; its slabs go back to the lender, which has room again.
    drop(first_region);
    drop(first);
    common::wait_stats(&second, "the second pager using the freed memory", |s| s.resident_pages <= s.budget_pages);
    for p in 0..pages {
        assert!(check_page(base, p, 2), "page {p}");
    }
    eprintln!("{}", second.stats());
}
