//! The verbs provider end to end, on a real RDMA device (Soft-RoCE in the test VM of
//! `soft-roce-setup/`): a transport test (READ and WRITE of many pages through a `memory-server`
//! process, a wrong rkey failing cleanly while the server keeps serving), blocking waits woken by
//! the device's completion events (on one queue pair and over two), no completion lost when more
//! complete at once than a poll asks for, a READ from a killed lender
//! failing instead of hanging, and pager tests (data verified under eviction; two copies and a
//! lender killed mid-pass). Without a device (or a build without `--features verbs`) each test
//! says why and passes, unless `COALESCE_REQUIRE_VERBS=1` (set in the VM) makes that a failure.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::{pattern, wait_ok, wait_one, ServerProcess};
use rdma::client::{ClientOptions, ControlClient};
use rdma::{CompletionStatus, EndpointOptions, LocalRegion, LocalSlice, PollMode, ProviderKind, Segment, WorkRequest};

/// The device to test on, or `None` (after saying why) when there is none and none is required.
fn device() -> Option<String> {
    let name = std::env::var("COALESCE_VERBS_DEVICE").ok();
    match rdma::verbs::VerbsDevice::open(name.as_deref()) {
        Ok(d) => Some(d.name().to_owned()),
        Err(e) => {
            assert!(std::env::var_os("COALESCE_REQUIRE_VERBS").is_none(), "a verbs device is required: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn verbs_server(device: &str) -> ServerProcess {
    ServerProcess::start(&["--capacity", "1GiB", "--slab-size", "16MiB", "--provider", "verbs", "--device", device])
}

/// A control client of `server` that asks for the verbs provider.
fn verbs_client(server: &ServerProcess) -> ControlClient {
    let options = ClientOptions { provider: ProviderKind::Verbs, ..ClientOptions::default() };
    ControlClient::connect(server.addr, &options).unwrap()
}

/// A new verbs queue pair of `client` on `device`.
fn verbs_endpoint(client: &mut ControlClient, device: &str) -> rdma::Endpoint {
    let options = EndpointOptions { device: Some(device.to_owned()), ..EndpointOptions::default() };
    client.connect_endpoint(ProviderKind::Verbs, &options).unwrap()
}

#[test]
fn verbs_reads_and_writes_many_pages_and_a_wrong_rkey_fails_cleanly() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let options = ClientOptions { provider: ProviderKind::Verbs, ..ClientOptions::default() };
    let mut client = ControlClient::connect(server.addr, &options).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep_options = EndpointOptions { device: Some(device.clone()), ..EndpointOptions::default() };
    let ep = client.connect_endpoint(ProviderKind::Verbs, &ep_options).unwrap();
    assert_eq!(ep.provider(), ProviderKind::Verbs);
    let pages = (slab.len / PAGE_SIZE as u64).min(4096);
    const BATCH: u64 = 32;
    let buf = LocalRegion::new(BATCH as usize * PAGE_SIZE).unwrap();
    // WRITE every page in batches of 32 pages per request (a scatter list), then READ them back.
    for first in (0..pages).step_by(BATCH as usize) {
        let n = BATCH.min(pages - first);
        let mut segments = Vec::new();
        for k in 0..n {
            buf.write_at(k as usize * PAGE_SIZE, &pattern(3, first + k)).unwrap();
            let local = LocalSlice::new(&buf, k as usize * PAGE_SIZE, PAGE_SIZE).unwrap();
            segments.push(Segment { local, remote_addr: slab.addr + (first + k) * PAGE_SIZE as u64, rkey: slab.rkey });
        }
        ep.post(&WorkRequest::write(first, segments)).unwrap();
        assert_eq!(wait_ok(&ep).wr_id, first);
    }
    let mut page = vec![0u8; PAGE_SIZE];
    for first in (0..pages).step_by(BATCH as usize) {
        let n = BATCH.min(pages - first);
        let segments = (0..n)
            .map(|k| Segment {
                local: LocalSlice::new(&buf, k as usize * PAGE_SIZE, PAGE_SIZE).unwrap(),
                remote_addr: slab.addr + (first + k) * PAGE_SIZE as u64,
                rkey: slab.rkey,
            })
            .collect();
        ep.post(&WorkRequest::read(first, segments)).unwrap();
        assert_eq!(wait_ok(&ep).wr_id, first);
        for k in 0..n {
            buf.read_at(k as usize * PAGE_SIZE, &mut page).unwrap();
            assert!(page == pattern(3, first + k), "page {} read back wrong", first + k);
        }
    }
    // Many single-page READs outstanding at once.
    let one = LocalRegion::new(64 * PAGE_SIZE).unwrap();
    for k in 0..64u64 {
        let local = LocalSlice::new(&one, k as usize * PAGE_SIZE, PAGE_SIZE).unwrap();
        let seg = Segment { local, remote_addr: slab.addr + (k * 7 % pages) * PAGE_SIZE as u64, rkey: slab.rkey };
        ep.post(&WorkRequest::read(1000 + k, vec![seg])).unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 64 {
        let n = ep.wait(&mut done, 64, Duration::from_secs(10), PollMode::Spin).unwrap();
        assert!(n > 0, "outstanding READs did not complete");
    }
    assert!(done.iter().all(|c| c.status == CompletionStatus::Success), "{done:?}");
    for k in 0..64u64 {
        one.read_at(k as usize * PAGE_SIZE, &mut page).unwrap();
        assert!(page == pattern(3, k * 7 % pages), "pipelined READ {k} wrong");
    }
    // A wrong rkey fails with a remote access error and touches nothing.
    buf.write_at(0, &[0xEE; PAGE_SIZE]).unwrap();
    let bad = Segment {
        local: LocalSlice::new(&buf, 0, PAGE_SIZE).unwrap(),
        remote_addr: slab.addr,
        rkey: slab.rkey ^ 0x5A5A,
    };
    ep.post(&WorkRequest::write(77, vec![bad])).unwrap();
    let c = wait_one(&ep);
    assert_eq!((c.wr_id, c.status), (77, CompletionStatus::RemoteAccessError), "{c:?}");
    // The server keeps serving: a new queue pair reads page 0 intact.
    let ep2 = client.connect_endpoint(ProviderKind::Verbs, &ep_options).unwrap();
    let seg = Segment { local: LocalSlice::new(&buf, 0, PAGE_SIZE).unwrap(), remote_addr: slab.addr, rkey: slab.rkey };
    ep2.post(&WorkRequest::read(78, vec![seg])).unwrap();
    assert_eq!(wait_ok(&ep2).wr_id, 78);
    buf.read_at(0, &mut page).unwrap();
    assert!(page == pattern(3, 0), "the failed WRITE changed the slab");
    // Another session's rkey opens nothing of this one.
    let other_options = ClientOptions { provider: ProviderKind::Verbs, ..ClientOptions::default() };
    let mut other = ControlClient::connect(server.addr, &other_options).unwrap();
    let ep3 = other.connect_endpoint(ProviderKind::Verbs, &ep_options).unwrap();
    let seg = Segment { local: LocalSlice::new(&buf, 0, PAGE_SIZE).unwrap(), remote_addr: slab.addr, rkey: slab.rkey };
    ep3.post(&WorkRequest::read(79, vec![seg])).unwrap();
    assert_eq!(wait_one(&ep3).status, CompletionStatus::RemoteAccessError);
    eprintln!("verbs READ round trip: {:?}", ep2.rtt_stats());
}

/// A blocking wait sleeps on the endpoint's completion channel: with nothing outstanding it
/// times out without a wake-up; waiting for a READ of 4 MiB (far longer than the wait's first
/// polls) it arms the queue, sleeps, and the device's completion event wakes it.
#[test]
fn a_blocking_wait_sleeps_until_the_device_reports_the_completion() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let mut client = verbs_client(&server);
    let slab = client.alloc_slab().unwrap();
    let ep = verbs_endpoint(&mut client, &device);
    let mut out = Vec::new();
    assert_eq!(ep.wait(&mut out, 1, Duration::from_millis(100), PollMode::Block).unwrap(), 0);
    assert_eq!(ep.completion_event_wakeups(), 0, "a wake-up with nothing outstanding");

    const PAGES: usize = rdma::wire::MAX_SEGMENTS;
    let buf = LocalRegion::new(PAGES * PAGE_SIZE).unwrap();
    for k in 0..PAGES {
        buf.write_at(k * PAGE_SIZE, &pattern(5, k as u64)).unwrap();
    }
    let segments = |buf: &std::sync::Arc<LocalRegion>| -> Vec<Segment> {
        (0..PAGES)
            .map(|k| Segment {
                local: LocalSlice::new(buf, k * PAGE_SIZE, PAGE_SIZE).unwrap(),
                remote_addr: slab.addr + (k * PAGE_SIZE) as u64,
                rkey: slab.rkey,
            })
            .collect()
    };
    ep.post(&WorkRequest::write(1, segments(&buf))).unwrap();
    assert_eq!(wait_ok(&ep).wr_id, 1);
    let back = LocalRegion::new(PAGES * PAGE_SIZE).unwrap();
    let woken_before = ep.completion_event_wakeups();
    ep.post(&WorkRequest::read(2, segments(&back))).unwrap();
    out.clear();
    assert_eq!(ep.wait(&mut out, 1, Duration::from_secs(10), PollMode::Block).unwrap(), 1, "no completion in 10 s");
    assert_eq!((out[0].wr_id, out[0].status), (2, CompletionStatus::Success), "{:?}", out[0]);
    assert!(ep.completion_event_wakeups() > woken_before, "the wait was not woken by a completion event");
    let mut page = vec![0u8; PAGE_SIZE];
    for k in 0..PAGES {
        back.read_at(k * PAGE_SIZE, &mut page).unwrap();
        assert!(page == pattern(5, k as u64), "page {k} read back wrong");
    }
}

/// A wait over several queue pairs (`Endpoint::wait_any`, as erasure-coded and hedged reads use)
/// sleeps on their completion channels together: it returns once one of them has a completion,
/// not after a few microseconds with nothing (as when verbs endpoints could only be polled).
#[test]
fn a_wait_over_two_queue_pairs_sleeps_until_one_has_a_completion() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let mut client = verbs_client(&server);
    let slab = client.alloc_slab().unwrap();
    let idle = verbs_endpoint(&mut client, &device);
    let busy = verbs_endpoint(&mut client, &device);
    const PAGES: usize = rdma::wire::MAX_SEGMENTS;
    let buf = LocalRegion::new(PAGES * PAGE_SIZE).unwrap();
    for round in 0..3u64 {
        let segments = (0..PAGES)
            .map(|k| Segment {
                local: LocalSlice::new(&buf, k * PAGE_SIZE, PAGE_SIZE).unwrap(),
                remote_addr: slab.addr + (k * PAGE_SIZE) as u64,
                rkey: slab.rkey,
            })
            .collect();
        busy.post(&WorkRequest::read(round, segments)).unwrap();
        rdma::Endpoint::wait_any(&[&idle, &busy], Duration::from_secs(10)).unwrap();
        let mut out = Vec::new();
        let n = idle.poll(&mut out, 16) + busy.poll(&mut out, 16);
        assert_eq!(n, 1, "round {round}: the wait returned with nothing completed");
        assert_eq!((out[0].wr_id, out[0].status), (round, CompletionStatus::Success), "{:?}", out[0]);
    }
}

/// Completions are taken from the queue only as many as the caller asks for: 48 READs complete
/// together and are collected four at a time, every one of them (sideway's poller took 32 from
/// the queue at each poll, and those beyond what the caller asked for were lost: their requests
/// never completed).
#[test]
fn completions_beyond_what_a_poll_asks_for_stay_queued_for_the_next() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let mut client = verbs_client(&server);
    let slab = client.alloc_slab().unwrap();
    let ep = verbs_endpoint(&mut client, &device);
    const REQUESTS: u64 = 48;
    let buf = LocalRegion::new(PAGE_SIZE).unwrap();
    for wr_id in 0..REQUESTS {
        let local = LocalSlice::new(&buf, 0, PAGE_SIZE).unwrap();
        let remote_addr = slab.addr + wr_id * PAGE_SIZE as u64;
        ep.post(&WorkRequest::read(wr_id, vec![Segment { local, remote_addr, rkey: slab.rkey }])).unwrap();
    }
    // Let them complete before the first poll, so that the queue holds more than one poll takes.
    std::thread::sleep(Duration::from_millis(300));
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < REQUESTS as usize && std::time::Instant::now() < deadline {
        let mut out = Vec::new();
        let n = ep.wait(&mut out, 4, Duration::from_secs(1), PollMode::Block).unwrap();
        assert!(n <= 4, "a wait for at most 4 completions returned {n}");
        for c in out {
            assert_eq!(c.status, CompletionStatus::Success, "{c:?}");
            seen.push(c.wr_id);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..REQUESTS).collect::<Vec<_>>(), "completions were lost");
    assert_eq!(ep.outstanding(), 0);
}

/// A lender that dies mid-session: its queue pairs are gone, so the device gets no answer to a
/// READ; the RC transport retries (6 times, about 67 ms apart) and then completes the request
/// with an error, well within the wait's 10 s, instead of leaving it outstanding (with a retry
/// count of 7, which Soft-RoCE takes as "forever", it never completed).
#[test]
fn a_read_from_a_dead_lender_completes_with_an_error_instead_of_hanging() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let mut client = verbs_client(&server);
    let slab = client.alloc_slab().unwrap();
    let ep = verbs_endpoint(&mut client, &device);
    let buf = LocalRegion::new(PAGE_SIZE).unwrap();
    let read = |wr_id| {
        let local = LocalSlice::new(&buf, 0, PAGE_SIZE).unwrap();
        WorkRequest::read(wr_id, vec![Segment { local, remote_addr: slab.addr, rkey: slab.rkey }])
    };
    ep.post(&read(1)).unwrap();
    assert_eq!(wait_ok(&ep).wr_id, 1);
    server.signal(libc::SIGKILL);
    let _ = server.wait();
    let started = std::time::Instant::now();
    ep.post(&read(2)).unwrap();
    let c = wait_one(&ep);
    assert_eq!(c.wr_id, 2);
    assert_ne!(c.status, CompletionStatus::Success, "a READ from a dead lender succeeded: {c:?}");
    assert_eq!(ep.outstanding(), 0);
    eprintln!("dead lender reported after {:?} as {:?}", started.elapsed(), c.status);
}

#[test]
fn pager_over_verbs_keeps_data_intact_under_eviction() {
    let Some(device) = device() else { return };
    let server = verbs_server(&device);
    let mut config = PagerConfig::new(vec![server.addr], 16 << 20);
    config.provider = ProviderKind::Verbs;
    config.device = Some(device);
    config.fault_threads = 2;
    let pager = Pager::new(config).unwrap();
    let region = pager.map(128 << 20, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    std::thread::scope(|s| {
        for t in 0..2usize {
            s.spawn(move || {
                for p in (t..pages).step_by(2) {
                    let data = pattern(9, p as u64);
                    // SAFETY: each thread writes only its own pages of the live region.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr(), (base + p * PAGE_SIZE) as *mut u8, PAGE_SIZE)
                    };
                }
            });
        }
    });
    for pass in 0..2 {
        for p in 0..pages {
            // SAFETY: reads of the live region.
            let got = unsafe { std::slice::from_raw_parts((base + p * PAGE_SIZE) as *const u8, PAGE_SIZE) };
            assert!(got == pattern(9, p as u64).as_slice(), "pass {pass}: page {p} read back wrong");
        }
    }
    let stats = pager.stats();
    eprintln!("{stats}");
    assert!(stats.remote_faults > 0 && stats.evictions_dirty as usize >= pages - (16 << 20) / PAGE_SIZE, "{stats}");
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    assert!(stats.peak_resident_pages <= stats.budget_pages, "{stats}");
}

/// Two copies of every page over verbs, and one lender killed while a pass reads everything back:
/// the pager notices (its control connection breaks, or the RC transport gives up on a READ after
/// about 0.5 s), marks it failed and reads the other copies; every page reads back and no fault
/// fails.
#[test]
fn pager_over_verbs_with_two_copies_survives_a_lender_killed_mid_pass() {
    let Some(device) = device() else { return };
    let lender = || {
        ServerProcess::start(&[
            "--capacity",
            "256MiB",
            "--slab-size",
            "16MiB",
            "--provider",
            "verbs",
            "--device",
            &device,
        ])
    };
    let (keep, victim) = (lender(), lender());
    let victim_addr = victim.addr;
    let mut config = PagerConfig::new(vec![keep.addr, victim.addr], 8 << 20);
    config.provider = ProviderKind::Verbs;
    config.device = Some(device.clone());
    config.redundancy = Some(Redundancy::Replicate(2));
    let pager = Pager::new(config).unwrap();
    let region = pager.map(48 << 20, RegionOptions::default()).unwrap();
    let base = region.as_ptr() as usize;
    let pages = region.len() / PAGE_SIZE;
    for p in 0..pages {
        let data = pattern(11, p as u64);
        // SAFETY: writes of the live region's own pages.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (base + p * PAGE_SIZE) as *mut u8, PAGE_SIZE) };
    }
    let stats = pager.stats();
    assert_eq!(stats.writeback_failures, 0, "both lenders took every write: {stats}");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(victim); // SIGKILL
    });
    for pass in 0..2 {
        for p in 0..pages {
            // SAFETY: reads of the live region.
            let got = unsafe { std::slice::from_raw_parts((base + p * PAGE_SIZE) as *const u8, PAGE_SIZE) };
            assert!(got == pattern(11, p as u64).as_slice(), "pass {pass}: page {p} read back wrong");
        }
    }
    killer.join().unwrap();
    let stats = pager.stats();
    eprintln!("{stats}");
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    let dead: Vec<_> = pager.server_pages().into_iter().filter(|&(_, _, alive)| !alive).map(|(a, _, _)| a).collect();
    assert_eq!(dead, vec![victim_addr], "the killed lender is the one marked failed");
    eprintln!("longest remote fault: {:?}", stats.remote_fault_max);
    drop(keep);
}
