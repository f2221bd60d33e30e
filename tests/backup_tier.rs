//! The backup tier (issue #9), end to end against real `memory-server` processes on 127.0.0.1:
//! two edge lenders with two copies of every page, and a farther `memory-server --persist DIR`
//! to which every page is written behind. When every edge lender is lost, pages come back from
//! the backup; a page written again after its last write-behind fails loudly, never as an older
//! version. A backup server killed with SIGKILL and started again replays its log. The backups of
//! a borrower that crashed expire.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{LocalMax, Pager, PagerConfig, Region, RegionOptions, PAGE_SIZE};
use common::{kernel_read, wait_stats, ServerProcess};

const MIB: usize = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;
const LENDER: [&str; 4] = ["--capacity", "128MiB", "--slab-size", "8MiB"];

fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) ^ ((p as u64) << 12) ^ (w as u64 + 1)
}

fn fill(region: &mut Region<'_>, pages: std::ops::Range<usize>, seed: u64) {
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for p in pages {
        for w in 0..WORDS {
            words[p * WORDS + w] = word(seed, p, w);
        }
    }
}

/// Reads every page of `pages` through the kernel (a page that cannot be served is `EFAULT`,
/// not SIGBUS), then checks every word; returns the pages that failed.
fn read_back(region: &Region<'_>, pages: std::ops::Range<usize>, seed: u64) -> Vec<usize> {
    let base = region.as_ptr() as usize;
    let failed: Vec<usize> = pages.clone().filter(|p| kernel_read(base + p * PAGE_SIZE).is_err()).collect();
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for p in pages.filter(|p| !failed.contains(p)) {
        for w in 0..WORDS {
            assert_eq!(words[p * WORDS + w], word(seed, p, w), "page {p}, word {w}");
        }
    }
    failed
}

/// The text without its terminal colour sequences (`ESC [ ... m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coalesce-backup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn backup_args(dir: &Path) -> Vec<String> {
    ["--capacity", "64MiB", "--slab-size", "8MiB", "--persist"]
        .iter()
        .map(|s| (*s).to_string())
        .chain([dir.display().to_string()])
        .collect()
}

fn config(lenders: &[&ServerProcess], backup: &ServerProcess, lag: Duration) -> PagerConfig {
    let mut config = PagerConfig::new(lenders.iter().map(|s| s.addr).collect(), 4 * MIB);
    config.redundancy = Some(Redundancy::Replicate(2));
    config.backup = Some(backup.addr);
    config.backup_max_lag = lag;
    config.fetch_timeout = Duration::from_secs(2);
    // With every lender gone nothing can be evicted: pages read back stay local.
    config.local_max = LocalMax::Unlimited;
    config
}

#[test]
fn pages_come_back_from_the_backup_when_every_lender_is_lost_and_a_newer_page_fails_loudly() {
    coalesce::init_logging("error");
    let dir = temp_dir("loss");
    let (a, b) = (ServerProcess::start(&LENDER), ServerProcess::start(&LENDER));
    let args = backup_args(&dir);
    let backup = ServerProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A long lag: nothing is written behind but by the checkpoint. The default local maximum
    // (twice the budget): pages read back from the backup must leave local memory again.
    let mut config = config(&[&a, &b], &backup, Duration::from_secs(60));
    config.local_max = LocalMax::Default;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    fill(&mut region, 0..pages, 1);
    // Every page out (written back), then behind: the checkpoint covers them all.
    region.evict(0, region.len());
    pager.checkpoint(Duration::from_secs(30)).unwrap();
    let stats = pager.stats();
    assert!(stats.backup && stats.backup_written_pages >= pages as u64, "{stats}");

    // Page 0 written again and evicted: on the lenders, not yet behind.
    fill(&mut region, 0..1, 2);
    assert_eq!(region.evict(0, PAGE_SIZE), 1);
    assert!(pager.stats().backup_lag_pages >= 1, "{}", pager.stats());

    drop(a);
    drop(b); // every lender copy is gone
    assert_eq!(read_back(&region, 1..pages, 1), Vec::<usize>::new(), "pages the backup holds came back");
    let err = kernel_read(region.as_ptr() as usize).expect_err("a page newer than its backup was served");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    let stats = pager.stats();
    assert!(stats.backup_read_pages >= (pages - 1024) as u64, "{stats}");
    assert!(stats.backup_stale_pages >= 1 && stats.fetch_failures == 1, "{stats}");
    assert!(stats.peak_resident_pages <= 2048, "pages held by the backup were kept local: {stats}");
    drop(region);
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backup_server_killed_and_started_again_replays_its_log() {
    coalesce::init_logging("error");
    let dir = temp_dir("replay");
    let (a, b) = (ServerProcess::start(&LENDER), ServerProcess::start(&LENDER));
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let args = backup_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let backup = ServerProcess::start_at(&listen, &args);
    let mut config = config(&[&a, &b], &backup, Duration::from_millis(50));
    config.backup_checkpoint_interval = Duration::from_millis(200);
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    fill(&mut region, 0..pages, 1);
    // No explicit checkpoint: a periodic one covers every page written back.
    wait_stats(&pager, "a periodic checkpoint covering the fill", |s| {
        s.backup_checkpoints >= 1 && s.backup_pages_since_checkpoint == 0
    });

    drop(backup); // SIGKILL
    let log = dir.with_extension("log");
    let backup = ServerProcess::start_at_logging_to(&listen, &args, &log);
    let text = strip_colours(&std::fs::read_to_string(&log).unwrap());
    let replayed = text.lines().find(|l| l.contains("backup log replayed")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        replayed.contains("corrupt_records_skipped=0") && replayed.contains("torn_tail_bytes_dropped=0"),
        "{replayed}"
    );

    // The pages come back from the replayed log once the lenders are gone.
    drop(a);
    drop(b);
    assert_eq!(read_back(&region, 0..pages, 1), Vec::<usize>::new());
    let stats = pager.stats();
    assert!(stats.backup_read_pages >= (pages - 1024) as u64, "{stats}");
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    drop(region);
    drop(pager);
    drop(backup);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_backup_server_without_persist_is_refused_at_start() {
    let a = ServerProcess::start(&LENDER);
    let not_a_backup = ServerProcess::start(&LENDER);
    let mut config = PagerConfig::new(vec![a.addr], 4 * MIB);
    config.backup = Some(not_a_backup.addr);
    let err = Pager::new(config).expect_err("a server without --persist").to_string();
    assert!(err.contains("--persist"), "{err}");
}

#[test]
fn a_lost_backup_server_bounds_the_queue_and_costs_the_lenders_nothing() {
    coalesce::init_logging("error");
    let dir = temp_dir("lost");
    let (a, b) = (ServerProcess::start(&LENDER), ServerProcess::start(&LENDER));
    let args = backup_args(&dir);
    let backup = ServerProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut config = config(&[&a, &b], &backup, Duration::from_millis(20));
    config.backup_max_lag_pages = 64;
    config.local_max = LocalMax::Default;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    drop(backup); // SIGKILL: nothing more is written behind
    for seed in 1..4 {
        fill(&mut region, 0..pages, seed);
        assert_eq!(read_back(&region, 0..pages, seed), Vec::<usize>::new());
    }
    let stats = pager.stats();
    assert!(stats.backup_dropped_pages > 0 && stats.backup_lag_pages <= 64, "{stats}");
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    drop(region);
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pages the backup server holds (of every client), as its statistics say.
fn backup_pages(backup: &ServerProcess) -> u64 {
    let mut client =
        rdma::client::ControlClient::connect(backup.addr, &rdma::client::ClientOptions::default()).unwrap();
    client.stats().unwrap().backup_pages
}

/// Polls `backup_pages` until `done` holds, for at most 60 s.
fn wait_backup_pages(backup: &ServerProcess, what: &str, done: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = backup_pages(backup);
        if done(n) {
            return n;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: the backup server holds {n} pages");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A borrower killed with SIGKILL leaves its backups behind, and nothing can ever read them:
/// once it has had no session for `--backup-expiry` they are dropped. A live borrower's backups
/// stay however long it writes nothing, and go when it exits cleanly.
#[test]
fn the_backups_of_a_crashed_borrower_expire_and_a_live_ones_stay() {
    coalesce::init_logging("error");
    let dir = temp_dir("expiry");
    let (a, b) = (ServerProcess::start(&LENDER), ServerProcess::start(&LENDER));
    let mut args = backup_args(&dir);
    args.extend(["--backup-expiry", "2s", "--lease", "1s"].map(String::from));
    let backup = ServerProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let servers = format!("{},{}", a.addr, b.addr);
    let mut crashing = std::process::Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["demo", "--servers", &servers, "--backup", &backup.addr.to_string(), "--backup-lag", "50ms"])
        .args(["--size", "16MiB", "--local", "4MiB", "--passes", "100000", "--random-reads", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_backup_pages(&backup, "the demo's pages written behind", |n| n >= 1024);
    crashing.kill().unwrap();
    let _ = crashing.wait();
    let crashed = backup_pages(&backup);

    let pager = Pager::new(config(&[&a, &b], &backup, Duration::from_millis(50))).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    let pages = region.len() / PAGE_SIZE;
    fill(&mut region, 0..pages, 3);
    region.evict(0, region.len());
    pager.checkpoint(Duration::from_secs(30)).unwrap();
    let live = pager.stats().backup_written_pages;
    assert!(live >= pages as u64, "{}", pager.stats());

    // The crashed borrower's session lapses (1 s) and its backups expire (2 s more); the live
    // one's stay, idle, for several expiry periods.
    let left = wait_backup_pages(&backup, "the crashed borrower's backups expiring", |n| n < crashed + live);
    assert_eq!(left, live, "only the live borrower's pages are left");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(backup_pages(&backup), live, "the live, idle borrower's backups were dropped");
    assert_eq!(read_back(&region, 0..pages, 3), Vec::<usize>::new());
    drop(region);
    drop(pager);
    wait_backup_pages(&backup, "the live borrower's backups dropped at its clean exit", |n| n == 0);
    let _ = std::fs::remove_dir_all(&dir);
}
