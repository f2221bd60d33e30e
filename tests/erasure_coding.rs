//! Erasure-coded pages (`ec:K+M`, issue #9), end to end against real `memory-server` processes on
//! 127.0.0.1: every page cut into K data and M parity shards on K + M distinct lenders survives
//! the loss of M of them, a lost shard is rebuilt in the background so that a later loss is
//! survived too, and a lender whose shard disagrees with the others is found and dropped.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, Region, RegionOptions, PAGE_SIZE};
use common::{kernel_read, wait_stats, ServerProcess};

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;
const ARGS: [&str; 6] = ["--capacity", "256MiB", "--slab-size", "8MiB", "--lease", "5s"];

fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) ^ ((p as u64) << 12) ^ (w as u64 + 1)
}

fn fill(region: &mut Region<'_>, seed: u64) {
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(seed, i / WORDS, i % WORDS);
    }
}

/// Checks every word of every page.
fn check(region: &Region<'_>, seed: u64, what: &str) {
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for (i, &w) in words.iter().enumerate() {
        assert_eq!(w, word(seed, i / WORDS, i % WORDS), "{what}: word {i}");
    }
}

fn coded(servers: &[ServerProcess], data: usize, parity: usize) -> PagerConfig {
    let mut config = PagerConfig::new(servers.iter().map(|s| s.addr).collect(), 4 * MIB);
    config.redundancy = Some(Redundancy::Erasure { data, parity });
    config.fetch_timeout = Duration::from_secs(2);
    config
}

/// Shards held by every lender (alive or not).
fn held(pager: &Pager) -> u64 {
    pager.server_pages().iter().map(|&(_, n, _)| n).sum()
}

#[test]
fn four_plus_two_survives_two_of_six_lenders_killed_during_a_read_pass() {
    coalesce::init_logging("warn");
    let mut servers: Vec<ServerProcess> = (0..6).map(|_| ServerProcess::start(&ARGS)).collect();
    let mut config = coded(&servers, 4, 2);
    config.fault_threads = 2;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(48 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    fill(&mut region, 1);
    // Six shards of every remote page, one on each lender.
    let shards = held(&pager);
    assert!(shards as usize >= 6 * (pages - 1024), "{shards} shards for {pages} pages: {:?}", pager.server_pages());
    for &(addr, n, _) in &pager.server_pages() {
        assert!(n as usize >= pages / 2, "{addr} holds only {n} shards");
    }

    // Kill two lenders while passes read everything back.
    let (first, second) = (servers.remove(4), servers.remove(1));
    let killed = [first.addr, second.addr];
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(first); // SIGKILL
        std::thread::sleep(Duration::from_millis(300));
        drop(second);
    });
    for pass in 0..3 {
        check(&region, 1, &format!("pass {pass}"));
    }
    killer.join().unwrap();
    check(&region, 1, "after both losses");
    let stats = pager.stats();
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    let mut dead: Vec<_> =
        pager.server_pages().into_iter().filter(|&(_, _, alive)| !alive).map(|(a, _, _)| a).collect();
    dead.sort();
    let mut expected = killed.to_vec();
    expected.sort();
    assert_eq!(dead, expected, "the killed lenders are the ones marked failed");

    // New pages go to the four lenders left (data shards only, said in the log) and read back.
    fill(&mut region, 2);
    check(&region, 2, "rewritten on four lenders");
    assert_eq!(pager.stats().fetch_failures, 0);
}

#[test]
fn a_lost_shard_is_rebuilt_in_the_background_so_a_later_loss_is_survived() {
    coalesce::init_logging("warn");
    let mut servers: Vec<ServerProcess> = (0..4).map(|_| ServerProcess::start(&ARGS)).collect();
    let pager = Pager::new(coded(&servers, 2, 1)).unwrap();
    let mut region = pager.map(48 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    assert_eq!(pager.stats().rereplication_pending_pages, 0, "nothing is missing yet");

    // The pages stay remote, untouched: only the background repair can rebuild their shards.
    let first = servers.remove(0);
    let first_addr = first.addr;
    drop(first); // SIGKILL
    wait_stats(&pager, "noticing the loss", |_| {
        pager.server_pages().iter().any(|&(a, _, alive)| a == first_addr && !alive)
    });
    wait_stats(&pager, "the rebuild", |s| s.rereplicated_pages > 0 && s.rereplication_pending_pages == 0);
    let stats = pager.stats();
    assert!(stats.rereplicated_pages >= 1000, "{stats}");

    // A second loss: with one parity shard, only the rebuilt shards can save the pages that had
    // one on the first lender and one on this one.
    drop(servers.remove(0));
    check(&region, 1, "after losing two of four lenders, one after the other");
    fill(&mut region, 2);
    check(&region, 2, "rewritten after both losses");
    let stats = pager.stats();
    assert_eq!(stats.fetch_failures, 0, "{stats}");
}

#[test]
fn pages_whose_lost_shards_outnumber_the_parity_fail_loudly_not_as_zeros() {
    coalesce::init_logging("error");
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::start(&ARGS)).collect();
    let mut config = coded(&servers, 2, 1);
    config.prefetch = false;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    assert_eq!(region.evict(0, PAGE_SIZE), 1);
    drop(servers.remove(2));
    drop(servers.remove(1)); // two of three shards gone
                             // A kernel read of the page gets EFAULT: the page is poisoned, never filled with zeros.
    let err = kernel_read(region.as_ptr() as usize).expect_err("a page without enough shards was served");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    assert!(pager.stats().fetch_failures >= 1, "{}", pager.stats());
}

#[test]
fn lost_shards_are_rebuilt_on_a_lender_that_joins_after_the_loss() {
    coalesce::init_logging("error");
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::start(&ARGS)).collect();
    let pager = Pager::new(coded(&servers, 2, 1)).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);

    // Every group spans all three lenders: after a loss no lender is left to rebuild on.
    let first = servers.remove(0);
    let first_addr = first.addr;
    drop(first); // SIGKILL
    wait_stats(&pager, "noticing the loss", |s| {
        s.rereplication_pending_pages > 0 && pager.server_pages().iter().any(|&(a, _, alive)| a == first_addr && !alive)
    });
    assert_eq!(pager.stats().rereplicated_pages, 0, "nowhere to rebuild yet: {}", pager.stats());

    // A lender joins: the lost shards are rebuilt there, and a second loss is survived.
    let joined = ServerProcess::start(&ARGS);
    pager.add_lender(joined.addr).unwrap();
    let err = pager.add_lender(joined.addr).expect_err("the same lender twice").to_string();
    assert!(err.contains("already"), "{err}");
    wait_stats(&pager, "the rebuild on the new lender", |s| {
        s.rereplicated_pages > 0 && s.rereplication_pending_pages == 0
    });
    let on_joined = pager.server_pages().iter().find(|&&(a, _, _)| a == joined.addr).map(|&(_, n, _)| n);
    assert!(on_joined.is_some_and(|n| n > 1000), "{:?}", pager.server_pages());
    drop(servers.remove(0));
    check(&region, 1, "after a loss, a join, the rebuild and a second loss");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
}
