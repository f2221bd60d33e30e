//! The service-level objective controller (issue #12), against a real `memory-server` at 5G
//! distance (`--link 5g-urllc`, about 2.2 ms a round trip): with an objective the network cannot
//! meet, the pager grows the local share toward the local maximum and says so in its statistics;
//! with one it meets, nothing grows. Every word reads back right either way.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, PagerStats, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;

/// Fills 32 MiB over a 4 MiB budget, then reads random pages for `secs` seconds.
fn run(slo: &str, secs: u64) -> PagerStats {
    let lender = ServerProcess::start(&["--capacity", "256MiB", "--link", "5g-urllc"]);
    let mut config = PagerConfig::new(vec![lender.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::None);
    config.slo = Some(slo.parse().unwrap());
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    let pages = words.len() / WORDS;
    for p in 0..pages {
        words[p * WORDS] = p as u64 ^ 0x5a5a;
    }
    let (start, mut x) = (Instant::now(), 12345u64);
    while start.elapsed() < Duration::from_secs(secs) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let p = usize::try_from(x >> 33).unwrap() % pages;
        assert_eq!(words[p * WORDS], p as u64 ^ 0x5a5a, "page {p}");
    }
    for p in 0..pages {
        assert_eq!(words[p * WORDS], p as u64 ^ 0x5a5a, "page {p}");
    }
    pager.stats()
}

#[test]
fn an_objective_the_network_misses_grows_the_local_share_up_to_the_maximum() {
    let stats = run("p99=500us", 6);
    eprintln!("{stats}");
    assert!(stats.slo_faults > 100 && stats.slo_faults_met * 10 < stats.slo_faults, "{stats}");
    assert!(stats.slo_local_grown_pages > 0, "{stats}");
    assert!(stats.local_limit_pages > stats.budget_pages, "{stats}");
    // Never past the local maximum (twice the budget by default).
    assert!(stats.local_limit_pages <= 2 * stats.budget_pages, "{stats}");
    assert!(stats.peak_resident_pages > stats.budget_pages, "the grown share was not used: {stats}");
    assert!(stats.peak_resident_pages <= 2 * stats.budget_pages, "{stats}");
}

#[test]
fn an_objective_the_network_meets_changes_nothing() {
    let stats = run("p99=10s", 3);
    assert!(stats.slo_faults > 100 && stats.slo_faults_met == stats.slo_faults, "{stats}");
    assert_eq!(stats.slo_local_grown_pages, 0, "{stats}");
    assert_eq!(stats.local_limit_pages, stats.budget_pages, "{stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
}
