//! Fault throughput with several application threads faulting at once (issue #12): 1, 2 and 4
//! threads reading random pages of a region eight times the local budget, each from a slice of
//! its own (distinct pages) or all from the whole region (shared pages), with 1 and 2 fault
//! handler threads, over an embedded loopback memory-server. Prefetch is off, so that every
//! access to a remote page is one fault. Prints one line per configuration: remote faults per
//! second, and the fault service time p50/p99/p99.9.
//!
//! `cargo bench -p coalesce-benches --bench threads [-- SECONDS]` (default 5 s per configuration).

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coalesce_benches::server;
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};

const REGION: usize = 256 << 20;
const BUDGET: usize = 32 << 20;

fn run(app_threads: usize, fault_threads: usize, shared: bool, secs: u64) {
    let server = server(1 << 30);
    let mut config = PagerConfig::new(vec![server.addr()], BUDGET);
    config.fault_threads = fault_threads;
    config.prefetch = false;
    let pager = Pager::new(config).unwrap();
    let options = RegionOptions { prefetch: Some(false), ..RegionOptions::default() };
    let mut region = pager.map(REGION, options).unwrap();
    let pages = region.len() / PAGE_SIZE;
    for (p, chunk) in region.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
        chunk[0] = u8::try_from(p % 251).unwrap();
    }
    let before = pager.stats();
    let base = region.as_ptr() as usize;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..app_threads {
            let stop = &stop;
            s.spawn(move || {
                let (first, span) = if shared { (0, pages) } else { (t * pages / app_threads, pages / app_threads) };
                let mut rng = fastrand::Rng::with_seed(t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let p = first + rng.usize(..span);
                    // SAFETY: a byte inside the live region (mapped until the scope ends).
                    let v = unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u8) };
                    assert_eq!(usize::from(v), p % 251, "page {p}");
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let took = start.elapsed().as_secs_f64();
    let after = pager.stats();
    let faults = after.remote_faults - before.remote_faults;
    println!(
        "app threads {app_threads}, fault threads {fault_threads}, {:<8} pages: {:>8.0} remote faults/s  (service p50 {:>6.1} us, p99 {:>7.1} us, p99.9 {:>8.1} us over the run)",
        if shared { "shared" } else { "distinct" },
        faults as f64 / took,
        after.remote_fault_p50.as_secs_f64() * 1e6,
        after.remote_fault_p99.as_secs_f64() * 1e6,
        after.remote_fault_p999.as_secs_f64() * 1e6,
    );
    drop(region);
    drop(pager);
    server.shutdown();
}

fn main() {
    let secs = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    for shared in [false, true] {
        for fault_threads in [1, 2] {
            for app_threads in [1, 2, 4] {
                run(app_threads, fault_threads, shared, secs);
            }
        }
    }
}
