//! Hedged reads of replicated pages (issue #12), against real `memory-server` processes: a
//! lender that pauses now and then (SIGSTOP for 40 ms of every 120 ms, shorter than the failover
//! time) is read around, not failed: the pages come from the other copy, the paused lender's
//! answers that arrive later are dropped, and every word reads back right. Under an objective
//! (the pager's or the faulting region's) that a hedge after the 95th percentile would miss,
//! reads are hedged sooner.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;

fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 40) ^ ((p as u64) << 12) ^ w as u64
}

fn fill(region: &mut coalesce_pager::Region<'_>, seed: u64) {
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(seed, i / WORDS, i % WORDS);
    }
}

fn check(region: &coalesce_pager::Region<'_>, seed: u64, what: &str) {
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for (i, &w) in words.iter().enumerate().step_by(WORDS / 4) {
        assert_eq!(w, word(seed, i / WORDS, i % WORDS), "{what}: word {i}");
    }
}

/// Runs `f` while `lender` is stopped for 40 ms of every 120 ms.
fn while_pausing<T>(lender: &ServerProcess, f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                lender.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(40));
                lender.signal(libc::SIGCONT);
                std::thread::sleep(Duration::from_millis(80));
            }
        });
        let result = f();
        stop.store(true, Ordering::Release);
        result
    })
}

fn pager(a: &ServerProcess, b: &ServerProcess, hedged: bool) -> Pager {
    let mut config = PagerConfig::new(vec![a.addr, b.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config.hedged_reads = hedged;
    Pager::new(config).unwrap()
}

const ARGS: [&str; 6] = ["--capacity", "256MiB", "--slab-size", "16MiB", "--lease", "5s"];

#[test]
fn a_lender_that_pauses_is_read_around_and_its_late_answers_are_dropped() {
    let (a, b) = (ServerProcess::start(&ARGS), ServerProcess::start(&ARGS));
    let pager = pager(&a, &b, true);
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    check(&region, 1, "before the pauses"); // and the lenders' service times are known
    for pass in 0..3 {
        while_pausing(&b, || check(&region, 1, &format!("pass {pass} while b pauses")));
    }
    let stats = pager.stats();
    eprintln!("{stats}");
    assert!(stats.hedged_reads > 0 && stats.hedge_wins > 0, "{stats}");
    assert!(stats.hedge_wins <= stats.hedged_reads, "{stats}");
    // Paused for less than the failover time, it was never failed: its answers came late.
    assert!(pager.lenders().iter().all(|l| l.alive), "{:?}", pager.lenders());
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    // The late answers landed in staging, not in pages: everything reads back, before and
    // after a rewrite.
    check(&region, 1, "after the pauses");
    fill(&mut region, 2);
    check(&region, 2, "rewritten");
}

#[test]
fn without_hedging_no_read_is_posted_twice() {
    let (a, b) = (ServerProcess::start(&ARGS), ServerProcess::start(&ARGS));
    let pager = pager(&a, &b, false);
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 3);
    check(&region, 3, "before the pauses");
    while_pausing(&b, || check(&region, 3, "while b pauses"));
    let stats = pager.stats();
    assert_eq!((stats.hedged_reads, stats.hedge_wins), (0, 0), "{stats}");
    assert_eq!(stats.fetch_failures, 0, "{stats}");
}

#[test]
fn an_objective_that_a_plain_hedge_would_miss_makes_reads_hedged_sooner() {
    // Both lenders 5 ms away each way: a read takes about 10 ms and hardly ever more than its
    // 95th percentile, so plain hedges are few. Under an objective of 13 ms a hedge after the
    // 95th percentile would answer near 20 ms, past it: reads are hedged at about 13 - 10 = 3 ms
    // instead, which is nearly every read.
    let args: Vec<&str> = ARGS.iter().copied().chain(["--link", "delay=5ms"]).collect();
    let (a, b) = (ServerProcess::start(&args), ServerProcess::start(&args));
    // The objective is the pager's, or (`on_region`) the region's own.
    let run = |slo: Option<coalesce_pager::Slo>, on_region: bool| {
        let mut config = PagerConfig::new(vec![a.addr, b.addr], MIB / 4);
        config.redundancy = Some(Redundancy::Replicate(2));
        config.prefetch = false;
        let options = if on_region {
            RegionOptions { slo, ..RegionOptions::default() }
        } else {
            config.slo = slo;
            RegionOptions::default()
        };
        let pager = Pager::new(config).unwrap();
        let mut region = pager.map(MIB, options).unwrap();
        fill(&mut region, 4);
        // Every page once, in a scattered order (37 is prime to the 256 pages).
        let words: &[u64] = bytemuck::cast_slice(region.as_slice());
        let pages = region.len() / PAGE_SIZE;
        for k in 0..pages {
            let p = k * 37 % pages;
            assert_eq!(words[p * WORDS + 5], word(4, p, 5), "page {p}");
        }
        check(&region, 4, "after the scattered reads");
        drop(region);
        pager.stats()
    };
    let plain = run(None, false);
    let sooner = run(Some("p99=13ms".parse().unwrap()), false);
    let region_sooner = run(Some("p99=13ms".parse().unwrap()), true);
    eprintln!(
        "without an objective:\n{plain}\nwith p99=13ms:\n{sooner}\nwith p99=13ms on the region:\n{region_sooner}"
    );
    assert!(plain.remote_faults > 150 && sooner.remote_faults > 150, "too few faults to tell");
    assert!(plain.hedged_reads * 4 < plain.remote_faults, "plain hedges are for the slowest reads only: {plain}");
    assert!(sooner.hedged_reads * 2 > sooner.remote_faults, "the objective did not make hedges sooner: {sooner}");
    // A region's own objective does the same for its faults.
    assert!(region_sooner.remote_faults > 150, "too few faults to tell: {region_sooner}");
    assert!(
        region_sooner.hedged_reads * 2 > region_sooner.remote_faults,
        "the region's objective did not make hedges sooner: {region_sooner}"
    );
    assert_eq!(plain.fetch_failures + sooner.fetch_failures + region_sooner.fetch_failures, 0);
}
