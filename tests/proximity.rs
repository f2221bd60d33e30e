//! Placement by proximity (issue #11), end to end against real `memory-server` processes on
//! 127.0.0.1 that emulate links of different distance (`--link lan|5g-urllc` and Wi-Fi's distance): the pager
//! measures each lender's round trip and puts most pages on the nearest one while it has room,
//! the rest in proportion to the weights; a lender that moves away (`--link-file` and SIGHUP)
//! stops getting new pages once its round trips say so.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, Instant};

use coalesce_pager::store::{LenderInfo, Redundancy};
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::ServerProcess;

const MIB: usize = 1 << 20;
/// The `wifi` profile's distance without its stalls. Its 1% of replies stalled 100 ms on
/// average (exponentially) would exceed, about once in 300 replies, the 150 ms control timeout
/// that these lenders' 600 ms lease gives the pager (a quarter of the lease), and a timed-out
/// heartbeat at connect fails `Pager::new`; these tests are about distance, not stalls.
const WIFI: &str = "delay=20ms,jitter=5ms,bandwidth=50Mbit";
const WORDS: usize = PAGE_SIZE / 8;

fn word(seed: u64, p: usize, w: usize) -> u64 {
    (seed << 48) ^ ((p as u64) << 12) ^ (w as u64 + 1)
}

/// A lender emulating `link`, with `capacity` in 4 MiB slabs, leasing for 600 ms (so that its
/// heartbeat, and the round trip measured with it, comes every 200 ms).
fn lender(link: &str, capacity: &str) -> ServerProcess {
    ServerProcess::start(&["--capacity", capacity, "--slab-size", "4MiB", "--lease", "600ms", "--link", link])
}

fn one_copy(servers: &[&ServerProcess], budget: usize) -> Pager {
    let mut config = PagerConfig::new(servers.iter().map(|s| s.addr).collect(), budget);
    config.redundancy = Some(Redundancy::None);
    Pager::new(config).unwrap()
}

fn fill_and_verify(words: &mut [u64], seed: u64) {
    let pages = words.len() / WORDS;
    for p in 0..pages {
        for w in [0, WORDS / 2, WORDS - 1] {
            words[p * WORDS + w] = word(seed, p, w);
        }
    }
    for p in 0..pages {
        for w in [0, WORDS / 2, WORDS - 1] {
            assert_eq!(words[p * WORDS + w], word(seed, p, w), "page {p}, word {w}");
        }
    }
}

fn held(lenders: &[LenderInfo], server: &ServerProcess) -> u64 {
    lenders.iter().find(|l| l.addr == server.addr).map(|l| l.pages).unwrap()
}

#[test]
fn most_pages_go_to_the_nearest_lender_and_the_rest_follow_the_weights() {
    let (lan, g5, wifi) = (lender("lan", "1GiB"), lender("5g-urllc", "1GiB"), lender(WIFI, "1GiB"));
    let pager = one_copy(&[&wifi, &g5, &lan], 4 * MIB);
    let mut region = pager.map(32 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(region.as_mut_slice()), 1);
    let lenders = pager.lenders();
    let (on_lan, on_5g, on_wifi) = (held(&lenders, &lan), held(&lenders, &g5), held(&lenders, &wifi));
    let total = on_lan + on_5g + on_wifi;
    assert!(total >= 6000, "{lenders:?}");
    // Weights about 1 : 0.05 : 0.0001: the LAN lender holds nearly all, Wi-Fi next to nothing.
    assert!(on_lan * 100 >= total * 85, "{lenders:?}");
    assert!(on_5g > on_wifi && on_wifi * 100 <= total, "{lenders:?}");
    let weight = |s: &ServerProcess| lenders.iter().find(|l| l.addr == s.addr).unwrap().weight;
    assert!(weight(&lan) == 1.0 && weight(&g5) < 0.2 && weight(&wifi) < weight(&g5), "{lenders:?}");
    let rtt = |s: &ServerProcess| lenders.iter().find(|l| l.addr == s.addr).unwrap().rtt_median.unwrap();
    assert!(rtt(&lan) < rtt(&g5) && rtt(&g5) < rtt(&wifi), "{lenders:?}");
}

#[test]
fn when_the_nearest_lender_fills_the_next_nearest_takes_the_rest() {
    let (lan, g5, wifi) = (lender("lan", "8MiB"), lender("5g-urllc", "1GiB"), lender(WIFI, "1GiB"));
    let pager = one_copy(&[&lan, &g5, &wifi], 4 * MIB);
    let mut region = pager.map(40 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(region.as_mut_slice()), 2);
    let lenders = pager.lenders();
    let (on_lan, on_5g, on_wifi) = (held(&lenders, &lan), held(&lenders, &g5), held(&lenders, &wifi));
    // The LAN lender's two slabs are full; 5G takes nearly all of the rest.
    assert!(on_lan > 1900 && on_lan <= 2 * 1024, "{lenders:?}");
    assert!(on_5g >= 4000 && on_wifi * 20 <= on_5g, "{lenders:?}");
}

/// A lender at LAN distance whose link is read from a file (`--link-file`), to be moved with
/// [`move_to`]; the file is returned too.
fn lender_at_lan_distance(tag: &str) -> (ServerProcess, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("coalesce-link-{tag}-{}", std::process::id()));
    std::fs::write(&file, "lan\n").unwrap();
    let args = ["--capacity", "1GiB", "--slab-size", "4MiB", "--lease", "600ms", "--link-file", file.to_str().unwrap()];
    (ServerProcess::start(&args), file)
}

/// Moves the lender to the distance of `link` (the file rewritten, then SIGHUP).
fn move_to(lender: &ServerProcess, file: &std::path::Path, link: &str) {
    std::fs::write(file, format!("{link}\n")).unwrap();
    lender.signal(libc::SIGHUP);
}

#[test]
fn a_lender_that_moves_away_stops_getting_new_pages() {
    let (moving, file) = lender_at_lan_distance("moves");
    let other = lender("5g-urllc", "1GiB");
    let pager = one_copy(&[&moving, &other], 4 * MIB);
    let mut first = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(first.as_mut_slice()), 3);
    let before = pager.lenders();
    assert!(held(&before, &moving) > 10 * held(&before, &other), "{before:?}");

    // The lender moves to Wi-Fi distance: once its round trips say so, it weighs less than 5G.
    move_to(&moving, &file, WIFI);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = pager.lenders();
        let weight = |s: &ServerProcess| now.iter().find(|l| l.addr == s.addr).unwrap().weight;
        if weight(&moving) < 0.01 && weight(&other) == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the move was never seen: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // New pages now go to the 5G lender, and the old ones still read back.
    let mut second = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(second.as_mut_slice()), 4);
    let after = pager.lenders();
    let new_on_other = held(&after, &other) - held(&before, &other);
    let new_on_moving = held(&after, &moving).saturating_sub(held(&before, &moving));
    assert!(new_on_other > 10 * new_on_moving.max(1), "before {before:?}, after {after:?}");
    let words: &[u64] = bytemuck::cast_slice(first.as_slice());
    // (A sample: each of its remote pages now costs a Wi-Fi round trip.)
    for p in (0..words.len() / WORDS).step_by(61) {
        assert_eq!(words[p * WORDS], word(3, p, 0), "page {p} of the first region");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_retired_lender_gets_no_new_pages_and_its_pages_move_to_the_others() {
    let (a, b) = (lender("lan", "1GiB"), lender("lan", "1GiB"));
    let pager = one_copy(&[&a, &b], 4 * MIB);
    let mut region = pager.map(24 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(region.as_mut_slice()), 5);
    assert!(held(&pager.lenders(), &a) > 1000, "{:?}", pager.lenders());
    // As when its registration expires: its pages move to `b` while it still serves them.
    pager.retire_lender(a.addr).unwrap();
    assert!(pager.retire_lender("127.0.0.1:9".parse().unwrap()).is_err());
    let deadline = Instant::now() + Duration::from_secs(60);
    while held(&pager.lenders(), &a) > 0 {
        assert!(Instant::now() < deadline, "pages stay on the retired lender: {:?}", pager.lenders());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a);
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for p in 0..words.len() / WORDS {
        assert_eq!(words[p * WORDS + WORDS / 2], word(5, p, WORDS / 2), "page {p}");
    }
}

#[test]
fn pages_migrate_from_a_lender_that_moved_away_to_the_nearest_one() {
    let (moving, file) = lender_at_lan_distance("migrates");
    let other = lender("5g-urllc", "1GiB");
    let pager = one_copy(&[&moving, &other], 4 * MIB);
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(region.as_mut_slice()), 6);
    let before = pager.lenders();
    assert!(held(&before, &moving) > 10 * held(&before, &other), "{before:?}");

    // The LAN lender moves to Wi-Fi distance: its slabs move to the (now nearest) 5G lender.
    move_to(&moving, &file, WIFI);
    let deadline = Instant::now() + Duration::from_secs(60);
    while held(&pager.lenders(), &moving) > 0 {
        assert!(Instant::now() < deadline, "pages stay on the far lender: {:?}", pager.lenders());
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = pager.stats();
    assert!(stats.pages_migrated >= held(&before, &moving) / 2, "{stats}");
    // Nothing is left there: stopping it costs nothing, and every page reads back.
    drop(moving);
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for p in 0..words.len() / WORDS {
        assert_eq!(words[p * WORDS + WORDS - 1], word(6, p, WORDS - 1), "page {p}");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn hot_pages_on_a_lender_that_moved_away_are_written_to_the_nearest_one_as_they_leave() {
    let (moving, file) = lender_at_lan_distance("hot");
    let other = lender("5g-urllc", "1GiB");
    let mut config = PagerConfig::new(vec![moving.addr, other.addr], 4 * MIB);
    config.redundancy = Some(Redundancy::None);
    // No background migration: only pages in use move.
    config.repair_rate = 0;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 * MIB, RegionOptions::default()).unwrap();
    fill_and_verify(bytemuck::cast_slice_mut(region.as_mut_slice()), 7);
    let before = pager.lenders();
    assert!(held(&before, &moving) > 10 * held(&before, &other), "{before:?}");

    move_to(&moving, &file, WIFI);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pager.lenders().iter().find(|l| l.addr == moving.addr).unwrap().weight >= 0.01 {
        assert!(Instant::now() < deadline, "the move was never seen: {:?}", pager.lenders());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first half is in use again (read only: clean pages move too); the second half not.
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    let pages = words.len() / WORDS;
    for _ in 0..2 {
        for p in 0..pages / 2 {
            assert_eq!(words[p * WORDS], word(7, p, 0), "page {p}");
        }
    }
    let after = pager.lenders();
    let stats = pager.stats();
    let moved = stats.hot_pages_moved_nearer;
    assert!(moved >= (pages / 4) as u64, "{moved} hot pages moved: {stats}");
    assert!(held(&after, &other) >= held(&before, &other) + moved / 2, "before {before:?}, after {after:?}");
    // Pages not in use stay where they are (about the second half, less what was resident).
    assert!(held(&after, &moving) >= (pages / 4) as u64, "before {before:?}, after {after:?}");
    assert_eq!(stats.pages_migrated, 0, "{stats}");
    for p in 0..pages {
        assert_eq!(words[p * WORDS + WORDS / 2], word(7, p, WORDS / 2), "page {p}");
    }
    let _ = std::fs::remove_file(&file);
}
