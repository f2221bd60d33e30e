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

/// Reads the first word of every page of `words` in a scrambled order (no stream for prefetch
/// to follow), checking each against `seed`.
fn read_scrambled(words: &[u64], seed: u64) {
    let pages = words.len() / WORDS;
    // 389 is prime and does not divide the page count: a permutation of the pages.
    for i in 0..pages {
        let p = (i * 389) % pages;
        assert_eq!(words[p * WORDS], p as u64 ^ seed, "page {p}");
    }
}

fn fill_pages(words: &mut [u64], seed: u64) {
    for p in 0..words.len() / WORDS {
        words[p * WORDS] = p as u64 ^ seed;
    }
}

#[test]
fn a_region_whose_objective_is_missed_keeps_its_pages_local_and_grows_the_share() {
    let lender = ServerProcess::start(&["--capacity", "256MiB", "--link", "5g-urllc"]);
    let mut config = PagerConfig::new(vec![lender.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::None);
    let pager = Pager::new(config).unwrap();
    let scattered = |slo: &str| RegionOptions {
        slo: Some(slo.parse().unwrap()),
        prefetch: Some(false),
        ..RegionOptions::default()
    };
    // `missed` has an objective no 5G round trip meets; `met` one every fault meets.
    let mut missed = pager.map(2 * MIB, scattered("p99=500us")).unwrap();
    let mut met = pager.map(2 * MIB, scattered("p99=10s")).unwrap();
    let mut other = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill_pages(bytemuck::cast_slice_mut(missed.as_mut_slice()), 1);
    fill_pages(bytemuck::cast_slice_mut(met.as_mut_slice()), 2);
    fill_pages(bytemuck::cast_slice_mut(other.as_mut_slice()), 3);

    // Both small regions were pushed out by the large one: fault them back in until the missed
    // objective has been judged at risk, then once more so that all their pages are local.
    let start = Instant::now();
    while !missed.stats().slo_at_risk {
        assert!(start.elapsed() < Duration::from_secs(20), "never judged at risk: {:?}", missed.stats());
        read_scrambled(bytemuck::cast_slice(missed.as_slice()), 1);
        read_scrambled(bytemuck::cast_slice(met.as_slice()), 2);
    }
    read_scrambled(bytemuck::cast_slice(missed.as_slice()), 1);
    read_scrambled(bytemuck::cast_slice(met.as_slice()), 2);
    let (missed_before, met_before) = (missed.stats(), met.stats());
    assert!(missed_before.slo_faults >= 20 && missed_before.slo_faults_met * 10 < missed_before.slo_faults);
    assert!(!met_before.slo_at_risk && met_before.slo_faults_met == met_before.slo_faults, "{met_before:?}");

    // Two passes over the large region, eight times the budget, push out every page that may go.
    for _ in 0..2 {
        read_scrambled(bytemuck::cast_slice(other.as_slice()), 3);
    }
    read_scrambled(bytemuck::cast_slice(missed.as_slice()), 1);
    read_scrambled(bytemuck::cast_slice(met.as_slice()), 2);
    let (missed_after, met_after) = (missed.stats(), met.stats());
    let pages = (2 * MIB / PAGE_SIZE) as u64;
    let missed_faults = missed_after.slo_faults - missed_before.slo_faults;
    let met_faults = met_after.slo_faults - met_before.slo_faults;
    eprintln!(
        "faults after the passes: {missed_faults} in the region at risk, {met_faults} in the other\n{}",
        pager.stats()
    );
    assert!(missed_faults * 16 < pages, "the region at risk lost its pages: {missed_faults} faults; {missed_after:?}");
    assert!(met_faults * 2 > pages, "the region meeting its objective kept its pages: {met_faults} faults");
    let stats = pager.stats();
    assert!(stats.slo.is_none(), "no objective for the whole pager");
    assert!(stats.slo_local_grown_pages > 0 && stats.local_limit_pages > stats.budget_pages, "{stats}");
    assert!(stats.peak_resident_pages <= 2 * stats.budget_pages, "{stats}");
}

#[test]
fn an_objective_out_of_range_is_refused_with_its_reason() {
    let lender = ServerProcess::start(&["--capacity", "64MiB"]);
    let pager = Pager::new(PagerConfig::new(vec![lender.addr], 4 * MIB)).unwrap();
    let slo = coalesce_pager::Slo { quantile: 99.0, target: Duration::from_millis(1) };
    let err = pager.map(MIB, RegionOptions { slo: Some(slo), ..RegionOptions::default() }).unwrap_err();
    assert!(err.to_string().contains("quantile"), "{err}");
    let mut config = PagerConfig::new(vec![lender.addr], 4 * MIB);
    config.slo = Some(coalesce_pager::Slo { quantile: 0.99, target: Duration::ZERO });
    let err = Pager::new(config).unwrap_err();
    assert!(err.to_string().contains("target"), "{err}");
}
