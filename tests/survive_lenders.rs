//! Surviving the loss of lenders (issue #9), end to end against real `memory-server` processes on
//! 127.0.0.1: with two copies of every page on distinct lenders, a lender killed with SIGKILL in
//! the middle of a read pass costs the program nothing: every word reads back, no fault fails.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::{wait_stats, RefusingProxy, ServerProcess, StallingProxy};

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
    let mut config = replicated(servers.iter().map(|s| s.addr).collect());
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
    for bad in ["replicate:1", "replicate:9", "ec:1+1", "ec:4+0", "ec:9+2", "ec:4+5", "ec:4", "ec:a+b", "mirror"] {
        let err = bad.parse::<Redundancy>().expect_err(bad);
        assert!(err.contains(bad), "{err}");
    }
    assert_eq!("replicate:2".parse::<Redundancy>(), Ok(Redundancy::Replicate(2)));
    assert_eq!("ec:4+2".parse::<Redundancy>(), Ok(Redundancy::Erasure { data: 4, parity: 2 }));
    assert_eq!(Redundancy::Erasure { data: 4, parity: 2 }.to_string(), "ec:4+2");
    let mut config = PagerConfig::new(addrs, 2 * MIB);
    config.redundancy = Some(Redundancy::Erasure { data: 2, parity: 1 });
    let err = Pager::new(config).expect_err("ec:2+1 on two lenders").to_string();
    assert!(err.contains("ec:2+1 needs 3 distinct lenders"), "{err}");
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

/// Two copies of every page on `addrs`, 4 MiB of local memory.
fn replicated(addrs: Vec<std::net::SocketAddr>) -> PagerConfig {
    let mut config = PagerConfig::new(addrs, 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config
}

const ARGS: [&str; 6] = ["--capacity", "256MiB", "--slab-size", "16MiB", "--lease", "5s"];

#[test]
fn a_restarted_lender_is_taken_back_and_a_second_loss_is_survived() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b_listen = free_port();
    let b = ServerProcess::start_at(&b_listen, &ARGS);
    let b_addr = b.addr;
    let mut config = replicated(vec![a.addr, b.addr]);
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
fn a_lender_that_stalls_right_after_granting_its_session_is_started_without_and_taken_in_later() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b = ServerProcess::start(&ARGS);
    // b grants the pager's first session, then answers nothing on it (the round-trip probe times
    // out after a quarter of the 5 s lease); it answers every later connection.
    let proxy = StallingProxy::start(b.addr, 1);
    let pager = Pager::new(PagerConfig::new(vec![a.addr, proxy.addr], 4 * MIB))
        .expect("a lender that stalls at the probe does not stop the pager");
    let at_start = pager.server_pages();
    assert!(at_start.contains(&(a.addr, 0, true)) && at_start.contains(&(proxy.addr, 0, false)), "{at_start:?}");
    wait_alive(&pager, proxy.addr);
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "b was tried again");
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    check(&region, 1, "after b was taken in");
    let held = pager.server_pages();
    assert!(held.iter().all(|&(_, n, alive)| alive && n > 0), "both lenders hold pages: {held:?}");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
}

#[test]
fn a_lender_whose_data_connections_are_refused_is_started_without_and_taken_in_later() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b = ServerProcess::start(&ARGS);
    // b grants the pager's session on the first connection; every later one (the data
    // connections, the attempts to revive it) is closed unanswered until the test says so.
    let proxy = RefusingProxy::start(b.addr);
    let pager = Pager::new(PagerConfig::new(vec![a.addr, proxy.addr], 4 * MIB))
        .expect("a lender whose data connection cannot be opened does not stop the pager");
    let refused = proxy.refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused >= 1, "the data connection was tried");
    assert!(pager.server_pages().contains(&(proxy.addr, 0, false)), "{:?}", pager.server_pages());
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    check(&region, 1, "with a alone");

    proxy.refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_alive(&pager, proxy.addr);
    fill(&mut region, 2);
    check(&region, 2, "after b was taken in");
    let mut more = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill(&mut more, 3);
    check(&more, 3, "a second region after b was taken in");
    let held = pager.server_pages();
    assert!(held.iter().all(|&(_, n, alive)| alive && n > 0), "both lenders hold pages: {held:?}");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
}

#[test]
fn a_lender_stalled_past_the_fetch_timeout_is_survived_and_trusted_again() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b = ServerProcess::start(&ARGS);
    let mut config = replicated(vec![a.addr, b.addr]);
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

#[test]
fn copies_lost_with_a_lender_are_rebuilt_in_the_background_so_a_second_loss_is_survived() {
    coalesce::init_logging("warn");
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::start(&ARGS)).collect();
    let mut config = replicated(servers.iter().map(|s| s.addr).collect());
    config.fetch_timeout = Duration::from_secs(1);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(48 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    assert_eq!(pager.stats().rereplication_pending_pages, 0, "nothing is missing yet");

    // The pages stay remote, untouched: only the background repair can give them new copies.
    let first = servers.remove(0);
    let first_addr = first.addr;
    drop(first); // SIGKILL
    wait_stats(&pager, "noticing the loss", |_| {
        pager.server_pages().iter().any(|&(a, _, alive)| a == first_addr && !alive)
    });
    wait_stats(&pager, "re-replication", |s| s.rereplicated_pages > 0 && s.rereplication_pending_pages == 0);
    let stats = pager.stats();
    assert!(stats.rereplicated_pages >= 1000, "{stats}");
    // Rewritten pages take slots freed meanwhile (parked while their group was not whole).
    fill(&mut region, 2);
    check(&region, 2, "rewritten after the repair");

    drop(servers.remove(0)); // the second loss: every page still has its copy on the third
    check(&region, 2, "after losing two of three lenders");
    let stats = pager.stats();
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    eprintln!("{stats}");
}

#[test]
fn a_draining_lender_is_emptied_before_it_leaves_and_no_page_is_lost() {
    coalesce::init_logging("warn");
    let args = ["--capacity", "256MiB", "--slab-size", "16MiB", "--lease", "5s", "--drain-timeout", "30s"];
    let a = ServerProcess::start(&args);
    let b = ServerProcess::start(&args);
    let b_addr = b.addr;
    let mut config = PagerConfig::new(vec![a.addr, b.addr], 4 * MIB);
    // One copy of each page: only moving b's pages before it leaves can keep them.
    config.redundancy = Some(Redundancy::None);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(48 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    let on_b = pager.server_pages().iter().find(|&&(addr, _, _)| addr == b_addr).map(|&(_, n, _)| n).unwrap();
    assert!(on_b > 1000, "b holds pages: {:?}", pager.server_pages());

    b.signal(libc::SIGTERM);
    let start = std::time::Instant::now();
    let status = b.wait();
    let took = start.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(20), "b left only after {took:?}, near its 30 s deadline");
    check(&region, 1, "after b drained and left");
    let stats = pager.stats();
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    assert!(stats.rereplicated_pages >= on_b, "{stats}");
    eprintln!("b drained in {took:?}\n{stats}");
}

#[test]
fn python3_under_the_preload_survives_the_loss_of_one_of_three_lenders() {
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).is_file() {
        assert!(std::env::var_os("COALESCE_REQUIRE_PROGRAMS").is_none(), "{python} is required but missing");
        eprintln!("skipped: {python} is not installed (apt-get install python3)");
        return;
    }
    // 100 MB of objects above pymalloc's size limit (so they come from malloc: the paged heap),
    // hashed twice over: the loss lands while pages move both ways.
    let script = "import hashlib\n\
        objs = [bytes([i % 251]) * 4000 + str(i).encode() for i in range(25000)]\n\
        h = hashlib.sha256()\n\
        for p in range(2):\n    for o in objs: h.update(o)\n\
        print(len(objs), h.hexdigest())\n";
    let plain = std::process::Command::new(python).args(["-c", script]).output().unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));

    let mut servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::start(&ARGS)).collect();
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["run", "--servers", &list.join(","), "--local", "32MiB", "--", python, "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    drop(servers.remove(1)); // SIGKILL, mid-run
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python3 under coalesce run failed: {stderr}");
    assert_eq!(out.stdout, plain.stdout, "the output differs from a plain run: {stderr}");
    assert!(stderr.contains("failures: 0 pages could not be fetched"), "{stderr}");
    assert!(stderr.contains("memory-server failed"), "the loss happened after the run: {stderr}");
    eprintln!("{stderr}");
}

#[test]
fn a_stalled_lender_costs_a_failover_not_the_fetch_timeout_when_every_page_has_another_copy() {
    coalesce::init_logging("warn");
    let a = ServerProcess::start(&ARGS);
    let b = ServerProcess::start(&ARGS);
    let mut config = replicated(vec![a.addr, b.addr]);
    // A stalled lender would hold a read for 20 s; with a second copy it holds it 250 ms.
    config.fetch_timeout = Duration::from_secs(20);
    config.failover_timeout = Duration::from_millis(250);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);

    b.signal(libc::SIGSTOP);
    let start = std::time::Instant::now();
    check(&region, 1, "while b is stopped");
    let took = start.elapsed();
    b.signal(libc::SIGCONT);
    eprintln!("check pass with b stopped: {took:?}");
    assert!(took < Duration::from_secs(10), "a read waited for the stalled lender: {took:?}");
    assert!(pager.server_pages().iter().any(|&(addr, _, alive)| addr == b.addr && !alive), "b was not failed over");
    assert_eq!(pager.stats().fetch_failures, 0, "{}", pager.stats());
    wait_alive(&pager, b.addr);
    check(&region, 1, "after b resumed");
}

#[test]
fn a_lender_added_while_the_pager_runs_takes_the_pages_the_full_one_could_not() {
    coalesce::init_logging("error");
    // One small lender: it fills, and pages stay local beyond the budget.
    let small = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "8MiB"]);
    let mut config = PagerConfig::new(vec![small.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::None);
    config.local_max = coalesce_pager::LocalMax::Unlimited;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill(&mut region, 1);
    let stats = pager.stats();
    assert!(stats.resident_pages > 4096, "the full lender took everything? {stats}");

    let big = ServerProcess::start(&ARGS);
    pager.add_lender(big.addr).unwrap();
    // Passing through local memory again, pages go to the new lender and the budget holds.
    fill(&mut region, 2);
    check(&region, 2, "with the new lender");
    let on_big = pager.server_pages().iter().find(|&&(a, _, _)| a == big.addr).map(|&(_, n, _)| n);
    assert!(on_big.is_some_and(|n| n > 1000), "{:?}", pager.server_pages());
    wait_stats(&pager, "the budget holding again", |s| s.resident_pages <= 1024 + 128);
    assert_eq!(pager.stats().fetch_failures, 0);
}
