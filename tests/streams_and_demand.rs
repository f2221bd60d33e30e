//! A stream's prefetch windows beside demand faults (issue #12), against a real `memory-server`
//! at LAN distance (`--link lan`): a stream alone has its windows fetched by the fault handler
//! with its faults; while another region takes demand faults (random pages, no stream), the
//! handler hands the stream's windows to the prefetch-ahead thread and fetches the faulting page
//! alone, so a demand fault does not wait behind a window. Every word reads back right either
//! way, and with `PagerConfig::demand_first` off no window is handed ahead. (How much sooner demand faults are served is measured by
//! `cargo bench -p coalesce-benches --bench region_objective`, BENCHMARKS.md.)

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, PagerStats, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;

fn fill_pages(words: &mut [u64], seed: u64) {
    for p in 0..words.len() / WORDS {
        words[p * WORDS] = p as u64 ^ seed;
    }
}

fn read_in_order(words: &[u64], seed: u64) {
    for p in 0..words.len() / WORDS {
        assert_eq!(words[p * WORDS], p as u64 ^ seed, "stream page {p}");
    }
}

/// Maps a 32 MiB stream region and a 4 MiB region read at random over a 4 MiB budget; reads the
/// stream once alone, then twice while another thread reads the random region. Returns the
/// statistics after the stream alone and after the mixed passes.
fn stream_beside_demand(demand_first: bool) -> (PagerStats, PagerStats) {
    let lender = ServerProcess::start(&["--capacity", "256MiB", "--link", "lan"]);
    let mut config = PagerConfig::new(vec![lender.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::None);
    config.demand_first = demand_first;
    let pager = Pager::new(config).unwrap();
    let mut stream = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    let scattered = RegionOptions { prefetch: Some(false), ..RegionOptions::default() };
    let mut demand = pager.map(4 * MIB, scattered).unwrap();
    fill_pages(bytemuck::cast_slice_mut(demand.as_mut_slice()), 7);
    fill_pages(bytemuck::cast_slice_mut(stream.as_mut_slice()), 3);

    read_in_order(bytemuck::cast_slice(stream.as_slice()), 3);
    let alone = pager.stats();

    // A thread reads the other region's pages in a scrambled order (each a remote fault: the
    // region is as large as the budget) until the stream's two passes end.
    let done = AtomicBool::new(false);
    let demand_words: &[u64] = bytemuck::cast_slice(demand.as_slice());
    let demand_reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let pages = demand_words.len() / WORDS;
            let mut reads = 0usize;
            while !done.load(Ordering::Relaxed) {
                // 389 is prime and does not divide the page count: a permutation of the pages.
                let p = (reads * 389) % pages;
                assert_eq!(demand_words[p * WORDS], p as u64 ^ 7, "demand page {p}");
                reads += 1;
            }
            reads
        });
        for _ in 0..2 {
            read_in_order(bytemuck::cast_slice(stream.as_slice()), 3);
        }
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    read_in_order(bytemuck::cast_slice(stream.as_slice()), 3);
    let mixed = pager.stats();
    eprintln!("demand first {demand_first}: {demand_reads} demand reads beside two passes of the stream\n{mixed}");
    assert!(alone.prefetched_pages > 4096, "the stream was prefetched: {alone}");
    assert!(mixed.remote_faults - alone.remote_faults > 100, "the demand reads faulted: {mixed}");
    assert_eq!(mixed.fetch_failures, 0, "{mixed}");
    assert_eq!(mixed.state_violations, 0, "{mixed}");
    (alone, mixed)
}

#[test]
fn a_stream_hands_its_windows_ahead_while_another_region_takes_demand_faults() {
    let (alone, mixed) = stream_beside_demand(true);
    // Alone, its windows come with its faults; beside demand faults some go ahead.
    assert_eq!(alone.windows_handed_ahead, 0, "{alone}");
    assert!(mixed.windows_handed_ahead > 0, "no window was handed ahead: {mixed}");
    assert!(mixed.prefetched_ahead > alone.prefetched_ahead, "{mixed}");
}

#[test]
fn with_demand_first_off_a_stream_keeps_its_windows() {
    let (_, mixed) = stream_beside_demand(false);
    assert_eq!(mixed.windows_handed_ahead, 0, "{mixed}");
}
