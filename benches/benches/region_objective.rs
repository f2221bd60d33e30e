//! A region's own service-level objective (issue #12, `RegionOptions::slo`): a latency-sensitive
//! region (2 MiB, random reads by one thread) beside a bulk region (64 MiB, sequential passes by
//! another), over one embedded lender at LAN distance (`lan`: 100 us one-way), with a local
//! budget of 8 MiB (local maximum 16 MiB). Without an objective the bulk passes push the
//! sensitive region's pages out; with `p99=150us` on the sensitive region (no LAN round trip
//! meets it) its pages stay local once it is at risk. Prints, for each configuration, the
//! sensitive region's remote faults, its reads over 150 us and their latency quantiles, and the
//! bulk passes' throughput. Configurations alternate, twice; "without" is an
//! objective of 60 s, never at risk, so that the region's faults are counted the same way.
//! Without an objective the sensitive reads are demand faults beside a stream: they run with
//! `PagerConfig::demand_first` off (`p99=60s/streams`: they wait behind the bulk region's
//! windows) and on (the default: the windows go to the prefetch-ahead thread).
//!
//! `cargo bench -p coalesce-benches --bench region_objective [-- SECONDS]` (default 15 s each, after 1.5 s of warm-up).

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use hdrhistogram::Histogram;

const SENSITIVE: usize = 2 << 20;
const BULK: usize = 64 << 20;
const BUDGET: usize = 8 << 20;

fn run(objective: &str, demand_first: bool, secs: u64) {
    let mut config = lender::ServerConfig::embedded(1 << 30);
    config.link = Some("lan".parse().unwrap());
    let server = lender::start(config).unwrap();
    let mut pager_config = PagerConfig::new(vec![server.addr()], BUDGET);
    pager_config.redundancy = Some(coalesce_pager::store::Redundancy::None);
    pager_config.demand_first = demand_first;
    let pager = Pager::new(pager_config).unwrap();
    let options =
        RegionOptions { slo: Some(objective.parse().unwrap()), prefetch: Some(false), ..RegionOptions::default() };
    let mut sensitive = pager.map(SENSITIVE, options).unwrap();
    let mut bulk = pager.map(BULK, RegionOptions::default()).unwrap();
    for r in [&mut sensitive, &mut bulk] {
        for (p, chunk) in r.as_mut_slice().chunks_mut(PAGE_SIZE).enumerate() {
            chunk[0] = u8::try_from(p % 251).unwrap();
        }
    }
    let (s_base, s_pages) = (sensitive.as_ptr() as usize, sensitive.len() / PAGE_SIZE);
    let (b_base, b_pages) = (bulk.as_ptr() as usize, bulk.len() / PAGE_SIZE);
    // The sensitive region is read alone for a while first: its pages come back, and an
    // objective it misses is judged at risk before the bulk passes begin.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(1500) {
        for p in 0..s_pages {
            // SAFETY: a byte inside the live sensitive region.
            let v = unsafe { std::ptr::read_volatile((s_base + ((p * 389) % s_pages) * PAGE_SIZE) as *const u8) };
            assert_eq!(usize::from(v), (p * 389) % s_pages % 251);
        }
    }
    let before = sensitive.stats();
    let stop = AtomicBool::new(false);
    let bulk_pages_read = AtomicU64::new(0);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p = 0;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: a byte inside the live bulk region (mapped until the scope ends).
                let v = unsafe { std::ptr::read_volatile((b_base + p * PAGE_SIZE) as *const u8) };
                assert_eq!(usize::from(v), p % 251, "bulk page {p}");
                bulk_pages_read.fetch_add(1, Ordering::Relaxed);
                p = (p + 1) % b_pages;
            }
        });
        let mut rng = fastrand::Rng::with_seed(7);
        while start.elapsed() < Duration::from_secs(secs) {
            let p = rng.usize(..s_pages);
            let t = Instant::now();
            // SAFETY: a byte inside the live sensitive region.
            let v = unsafe { std::ptr::read_volatile((s_base + p * PAGE_SIZE) as *const u8) };
            hist.saturating_record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1));
            assert_eq!(usize::from(v), p % 251, "sensitive page {p}");
            // About 20,000 reads a second when they hit.
            std::thread::sleep(Duration::from_micros(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let took = start.elapsed().as_secs_f64();
    let after = sensitive.stats();
    let stats = pager.stats();
    let us = |q: f64| Duration::from_nanos(hist.value_at_quantile(q)).as_secs_f64() * 1e6;
    let faults = after.slo_faults - before.slo_faults;
    let slow = hist.len() - hist.count_between(0, 150_000);
    let name = if demand_first { objective.to_string() } else { format!("{objective}/streams") };
    println!(
        "{name:<17} sensitive: {:>7} reads, {:>6} remote faults ({slow} reads over 150 us), read p50 {:>7.1} us \
         p99 {:>8.1} us p99.9 {:>8.1} us; bulk: {:>6.0} MiB/s, {} windows handed ahead; local share {} of {} pages",
        hist.len(),
        faults,
        us(0.5),
        us(0.99),
        us(0.999),
        bulk_pages_read.load(Ordering::Relaxed) as f64 * PAGE_SIZE as f64 / took / f64::from(1 << 20),
        stats.windows_handed_ahead,
        stats.local_limit_pages,
        stats.budget_pages,
    );
    drop(sensitive);
    drop(bulk);
    drop(pager);
    server.shutdown();
}

fn main() {
    let secs = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(15);
    for _ in 0..2 {
        // An objective always met (never at risk) only counts the faults: the region as without one.
        run("p99=60s", false, secs);
        run("p99=60s", true, secs);
        run("p99=150us", true, secs);
    }
}
