//! Surviving the loss of lenders (issue #9), end to end against real `memory-server` processes on
//! 127.0.0.1: with two copies of every page on distinct lenders, a lender killed with SIGKILL in
//! the middle of a read pass costs the program nothing: every word reads back, no fault fails.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;

fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) ^ ((p as u64) << 12) ^ (w as u64 + 1)
}

fn lenders(n: usize) -> Vec<ServerProcess> {
    (0..n).map(|_| ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"])).collect()
}

#[test]
fn two_copies_survive_a_lender_killed_during_a_read_pass() {
    coalesce::init_logging("warn");
    let mut servers = lenders(3);
    let mut config = PagerConfig::new(servers.iter().map(|s| s.addr).collect(), 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config.fault_threads = 2;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(48 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for p in 0..pages {
        for w in 0..WORDS {
            words[p * WORDS + w] = word(1, p, w);
        }
    }
    let held: Vec<u64> = pager.server_pages().iter().map(|&(_, n, _)| n).collect();
    let total: u64 = held.iter().sum();
    assert!(total as usize >= 2 * (pages - 1024), "every evicted page is held twice: {held:?} for {pages} pages");

    // Kill the middle lender while a pass reads everything back.
    let victim = servers.remove(1);
    let victim_addr = victim.addr;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        drop(victim); // SIGKILL
    });
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for pass in 0..3 {
        for p in 0..pages {
            for w in [0, WORDS / 2, WORDS - 1] {
                assert_eq!(words[p * WORDS + w], word(1, p, w), "pass {pass}, page {p}, word {w}");
            }
        }
    }
    killer.join().unwrap();
    let stats = pager.stats();
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    let dead: Vec<_> = pager.server_pages().into_iter().filter(|&(_, _, alive)| !alive).map(|(a, _, _)| a).collect();
    assert_eq!(dead, vec![victim_addr], "the killed lender is the one marked failed");

    // New pages still get two copies (on the two lenders left), and read back.
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for p in 0..pages {
        words[p * WORDS] = word(2, p, 0);
    }
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for p in 0..pages {
        assert_eq!(words[p * WORDS], word(2, p, 0), "page {p} after the loss");
    }
    assert_eq!(pager.stats().fetch_failures, 0);
}

#[test]
fn with_one_copy_the_default_for_one_lender_and_an_explicit_choice_is_honoured() {
    let servers = lenders(2);
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    assert_eq!(Redundancy::default_for(1), Redundancy::None);
    assert_eq!(Redundancy::default_for(addrs.len()), Redundancy::Replicate(2));
    let mut config = PagerConfig::new(addrs.clone(), 2 * MIB);
    config.redundancy = Some(Redundancy::Replicate(3));
    let err = Pager::new(config).expect_err("three copies on two lenders").to_string();
    assert!(err.contains("replicate:3") && err.contains("2 configured"), "{err}");
    for bad in ["replicate:1", "replicate:9", "ec:4+2", "mirror"] {
        assert!(bad.parse::<Redundancy>().is_err(), "{bad} was accepted");
    }
    assert_eq!("replicate:2".parse::<Redundancy>(), Ok(Redundancy::Replicate(2)));
}

/// A free port on 127.0.0.1 (bound and released).
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Waits until the pager sees `addr` alive again (at most 20 s).
fn wait_alive(pager: &Pager, addr: std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pager.server_pages().iter().any(|&(a, _, alive)| a == addr && alive) {
        assert!(std::time::Instant::now() < deadline, "{addr} was never taken back: {:?}", pager.server_pages());
        std::thread::sleep(Duration::from_millis(50));
    }
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

const ARGS: [&str; 6] = ["--capacity", "256MiB", "--slab-size", "16MiB", "--lease", "5s"];

#[test]
fn a_restarted_lender_is_taken_back_and_a_second_loss_is_survived() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b_listen = free_port();
    let b = ServerProcess::start_at(&b_listen, &ARGS);
    let b_addr = b.addr;
    let mut config = PagerConfig::new(vec![a.addr, b.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config.fetch_timeout = Duration::from_secs(1);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);

    drop(b); // SIGKILL: every copy on it is gone
    check(&region, 1, "after losing b");
    let b = ServerProcess::start_at(&b_listen, &ARGS); // a new process: a new session
    wait_alive(&pager, b_addr);
    // Pages passing through local memory are written again to whole groups, on a and b.
    check(&region, 1, "after b came back");
    let on_b = pager.server_pages().iter().find(|&&(addr, _, _)| addr == b_addr).map(|&(_, n, _)| n).unwrap();
    assert!(on_b > 1000, "b holds no new copies: {:?}", pager.server_pages());

    drop(a); // the second loss
    check(&region, 1, "after losing a too");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
    drop(region);
    drop(b);
}

#[test]
fn a_lender_stalled_past_the_fetch_timeout_is_survived_and_trusted_again() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b = ServerProcess::start(&ARGS);
    let mut config = PagerConfig::new(vec![a.addr, b.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config.fetch_timeout = Duration::from_millis(500);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);

    b.signal(libc::SIGSTOP); // shorter than its 5 s lease, longer than the fetch timeout
    check(&region, 1, "while b is stopped");
    std::thread::sleep(Duration::from_millis(1500));
    b.signal(libc::SIGCONT);
    wait_alive(&pager, b.addr);
    check(&region, 1, "after b resumed");
    fill(&mut region, 2);
    check(&region, 2, "rewritten after b resumed");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
}
