//! End-to-end tests of the shim transport against a real `memory-server` process on 127.0.0.1:
//! bulk data integrity with many requests in flight, access checks, isolation between clients,
//! hostile input, and link emulation.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, wait_ok, wait_one, ServerProcess};
use rdma::client::{ClientOptions, ControlClient};
use rdma::{
    CompletionStatus, EndpointOptions, LinkProfile, LocalRegion, LocalSlice, PollMode, ProviderKind, Segment,
    WorkRequest,
};

const PAGE: usize = 4096;

fn endpoint(client: &mut ControlClient) -> rdma::Endpoint {
    client.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap()
}

fn seg(buf: &Arc<LocalRegion>, slot: usize, addr: u64, rkey: u32) -> Segment {
    Segment { local: LocalSlice::new(buf, slot * PAGE, PAGE).unwrap(), remote_addr: addr, rkey }
}

#[test]
fn ten_thousand_random_pages_round_trip_with_32_outstanding() {
    const DEPTH: usize = 32;
    const PAGES: usize = 10_000;
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "64MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = endpoint(&mut client);
    let slab_pages = usize::try_from(slab.len).unwrap() / PAGE;
    // 10,000 distinct random pages of the 16,384 in the slab.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut all: Vec<usize> = (0..slab_pages).collect();
    rng.shuffle(&mut all);
    let pages = &all[..PAGES];
    let buf = LocalRegion::new(DEPTH * PAGE).unwrap();
    let addr_of = |p: usize| slab.addr + (p * PAGE) as u64;

    // Write phase: keep DEPTH writes in flight, reuse a slot when its write completes.
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut next = 0usize;
    let mut free_slots: Vec<usize> = (0..DEPTH).collect();
    let mut max_outstanding = 0;
    while next < PAGES || !in_flight.is_empty() {
        while next < PAGES && !free_slots.is_empty() {
            let slot = free_slots.pop().unwrap();
            buf.write_at(slot * PAGE, &pattern(1, pages[next] as u64)).unwrap();
            let wr_id = next as u64;
            ep.post(&WorkRequest::write(wr_id, vec![seg(&buf, slot, addr_of(pages[next]), slab.rkey)])).unwrap();
            in_flight.insert(wr_id, slot);
            next += 1;
        }
        max_outstanding = max_outstanding.max(ep.outstanding());
        let c = wait_ok(&ep);
        free_slots.push(in_flight.remove(&c.wr_id).expect("known wr_id"));
    }
    assert_eq!(max_outstanding, DEPTH, "the test must really pipeline");

    // Read phase, in another random order, verifying every page.
    let mut order: Vec<usize> = (0..PAGES).collect();
    rng.shuffle(&mut order);
    let mut next = 0usize;
    let mut verified = 0usize;
    let mut page_buf = vec![0u8; PAGE];
    while next < PAGES || !in_flight.is_empty() {
        while next < PAGES && !free_slots.is_empty() {
            let slot = free_slots.pop().unwrap();
            buf.write_at(slot * PAGE, &[0xEE; PAGE]).unwrap();
            let p = pages[order[next]];
            ep.post(&WorkRequest::read(p as u64, vec![seg(&buf, slot, addr_of(p), slab.rkey)])).unwrap();
            in_flight.insert(p as u64, slot);
            next += 1;
        }
        let c = wait_ok(&ep);
        assert_eq!(c.byte_len, PAGE);
        let slot = in_flight.remove(&c.wr_id).expect("known wr_id");
        buf.read_at(slot * PAGE, &mut page_buf).unwrap();
        assert!(page_buf == pattern(1, c.wr_id), "page {} read back wrong", c.wr_id);
        verified += 1;
        free_slots.push(slot);
    }
    assert_eq!(verified, PAGES);
    // A page never written reads back as the zeros of a fresh slab.
    let unwritten = all[PAGES];
    ep.post(&WorkRequest::read(1, vec![seg(&buf, 0, addr_of(unwritten), slab.rkey)])).unwrap();
    wait_ok(&ep);
    buf.read_at(0, &mut page_buf).unwrap();
    assert!(page_buf.iter().all(|&b| b == 0));
    let stats = client.stats().unwrap();
    assert!(stats.writes >= PAGES as u64 && stats.reads > PAGES as u64, "{stats:?}");
}

/// One request at a time, with pauses longer and shorter than the server's spin: a data
/// connection's thread that checks for the next request (`--poll-spin`, yielding between checks)
/// and then sleeps serves every request and every byte, whether the request comes while it
/// spins, after it fell asleep, or never spins at all (`0s`); so does a client that yields
/// while it waits (`PollMode::SpinThenBlock`).
#[test]
fn requests_one_at_a_time_round_trip_whether_the_server_spins_or_sleeps() {
    const PAGES: usize = 300;
    for spin in ["0s", "200us", "10ms"] {
        let server = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "4MiB", "--poll-spin", spin]);
        let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
        let slab = client.alloc_slab().unwrap();
        let ep = endpoint(&mut client);
        let buf = LocalRegion::new(PAGE).unwrap();
        let mut page_buf = vec![0u8; PAGE];
        let mode = PollMode::SpinThenBlock(Duration::from_micros(100));
        let one = |wr: WorkRequest| {
            let mut out = Vec::new();
            assert_eq!(ep.wait(&mut out, 1, Duration::ZERO, PollMode::Block).unwrap(), 0, "nothing is in flight");
            ep.post(&wr).unwrap();
            assert_eq!(ep.wait(&mut out, 1, Duration::from_secs(10), mode).unwrap(), 1, "--poll-spin {spin}: no reply");
            assert_eq!(out[0].status, CompletionStatus::Success, "--poll-spin {spin}: {:?}", out[0]);
        };
        for p in 0..PAGES {
            buf.write_at(0, &pattern(3, p as u64)).unwrap();
            one(WorkRequest::write(p as u64, vec![seg(&buf, 0, slab.addr + (p * PAGE) as u64, slab.rkey)]));
            // Every seventh request comes after the server's thread has gone back to sleep.
            if p % 7 == 0 {
                std::thread::sleep(Duration::from_millis(12));
            }
        }
        for p in (0..PAGES).rev() {
            buf.write_at(0, &[0xEE; PAGE]).unwrap();
            one(WorkRequest::read(p as u64, vec![seg(&buf, 0, slab.addr + (p * PAGE) as u64, slab.rkey)]));
            buf.read_at(0, &mut page_buf).unwrap();
            assert!(page_buf == pattern(3, p as u64), "--poll-spin {spin}: page {p} read back wrong");
            if p % 11 == 0 {
                std::thread::sleep(Duration::from_millis(12));
            }
        }
    }
}

#[test]
fn batches_move_many_pages_in_one_request() {
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "4MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let a = client.alloc_slab().unwrap();
    let b = client.alloc_slab().unwrap();
    let ep = endpoint(&mut client);
    let buf = LocalRegion::new(64 * PAGE).unwrap();
    // 64 scattered pages over two slabs, written in one post.
    let place = |i: usize| {
        if i.is_multiple_of(2) {
            (a.addr + (i * 3 * PAGE) as u64, a.rkey)
        } else {
            (b.addr + (i * 5 * PAGE) as u64, b.rkey)
        }
    };
    let segs: Vec<Segment> = (0..64)
        .map(|i| {
            buf.write_at(i * PAGE, &pattern(2, i as u64)).unwrap();
            let (addr, rkey) = place(i);
            seg(&buf, i, addr, rkey)
        })
        .collect();
    ep.post(&WorkRequest::write(1, segs.clone())).unwrap();
    assert_eq!(wait_ok(&ep).byte_len, 64 * PAGE);
    buf.write_at(0, &vec![0u8; 64 * PAGE]).unwrap();
    ep.post(&WorkRequest::read(2, segs)).unwrap();
    assert_eq!(wait_ok(&ep).byte_len, 64 * PAGE);
    let mut page = vec![0u8; PAGE];
    for i in 0..64 {
        buf.read_at(i * PAGE, &mut page).unwrap();
        assert!(page == pattern(2, i as u64), "batched page {i}");
    }
}

/// The server sends long READ payloads straight from the slab (gathered, up to 1,024 buffers per
/// system call) and appends short ones to their response: a READ of the most segments a request
/// may have, of odd lengths over two slabs, pipelined between short READs, comes back whole and
/// in order.
#[test]
fn a_read_of_the_most_segments_comes_back_whole_and_between_short_reads() {
    let server = ServerProcess::start(&["--capacity", "64MiB", "--slab-size", "8MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slabs = [client.alloc_slab().unwrap(), client.alloc_slab().unwrap()];
    let ep = endpoint(&mut client);
    // Fill both slabs with a pattern that differs at every byte of every page.
    let buf = LocalRegion::new(64 * PAGE).unwrap();
    for (s, slab) in slabs.iter().enumerate() {
        for chunk in 0..usize::try_from(slab.len).unwrap() / (64 * PAGE) {
            for p in 0..64 {
                buf.write_at(p * PAGE, &pattern(s as u64 + 10, (chunk * 64 + p) as u64)).unwrap();
            }
            let at = slab.addr + (chunk * 64 * PAGE) as u64;
            ep.post(&WorkRequest::write(
                0,
                vec![Segment { local: LocalSlice::new(&buf, 0, 64 * PAGE).unwrap(), remote_addr: at, rkey: slab.rkey }],
            ))
            .unwrap();
            wait_ok(&ep);
        }
    }
    let expected = |s: usize, offset: usize, len: usize| -> Vec<u8> {
        (offset..offset + len).map(|b| pattern(s as u64 + 10, (b / PAGE) as u64)[b % PAGE]).collect()
    };
    // 1,024 segments of 1..=3,000 bytes at scattered offsets, alternating slabs.
    let mut rng = fastrand::Rng::with_seed(11);
    let mut wanted = Vec::new();
    let mut local_at = 0usize;
    for i in 0..rdma::wire::MAX_SEGMENTS {
        let s = i % 2;
        let len = rng.usize(1..=3000);
        let offset = rng.usize(0..usize::try_from(slabs[s].len).unwrap() - len);
        wanted.push((s, offset, len, local_at));
        local_at += len;
    }
    let big = LocalRegion::new(local_at.next_multiple_of(PAGE)).unwrap();
    let segs: Vec<Segment> = wanted
        .iter()
        .map(|&(s, offset, len, at)| Segment {
            local: LocalSlice::new(&big, at, len).unwrap(),
            remote_addr: slabs[s].addr + offset as u64,
            rkey: slabs[s].rkey,
        })
        .collect();
    let small = LocalRegion::new(2 * PAGE).unwrap();
    let short = |slot: usize, offset: usize| Segment {
        local: LocalSlice::new(&small, slot * PAGE, 100).unwrap(),
        remote_addr: slabs[0].addr + offset as u64,
        rkey: slabs[0].rkey,
    };
    ep.post(&WorkRequest::read(1, vec![short(0, 5000)])).unwrap();
    ep.post(&WorkRequest::read(2, segs)).unwrap();
    ep.post(&WorkRequest::read(3, vec![short(1, 7000)])).unwrap();
    let ids: Vec<(u64, usize)> = (0..3)
        .map(|_| {
            let c = wait_ok(&ep);
            (c.wr_id, c.byte_len)
        })
        .collect();
    assert_eq!(ids, vec![(1, 100), (2, local_at), (3, 100)]);
    let mut got = vec![0u8; 100];
    small.read_at(0, &mut got).unwrap();
    assert!(got == expected(0, 5000, 100), "the short READ before");
    small.read_at(PAGE, &mut got).unwrap();
    assert!(got == expected(0, 7000, 100), "the short READ after");
    for (i, &(s, offset, len, at)) in wanted.iter().enumerate() {
        let mut got = vec![0u8; len];
        big.read_at(at, &mut got).unwrap();
        assert!(got == expected(s, offset, len), "segment {i} ({len} bytes at {offset} of slab {s})");
    }
}

#[test]
fn wrong_rkey_and_out_of_bounds_fail_cleanly_and_the_server_keeps_serving() {
    let server = ServerProcess::start(&["--capacity", "16MiB", "--slab-size", "1MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = endpoint(&mut client);
    let buf = LocalRegion::new(4 * PAGE).unwrap();
    buf.write_at(0, &pattern(3, 0)).unwrap();
    ep.post(&WorkRequest::write(1, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
    wait_ok(&ep);

    let end = slab.addr + slab.len;
    let bad: Vec<(&str, WorkRequest)> = vec![
        ("wrong rkey read", WorkRequest::read(10, vec![seg(&buf, 1, slab.addr, slab.rkey ^ 1)])),
        ("wrong rkey write", WorkRequest::write(11, vec![seg(&buf, 1, slab.addr, slab.rkey.wrapping_add(7))])),
        ("read across the end", WorkRequest::read(12, vec![seg(&buf, 1, end - 2048, slab.rkey)])),
        ("read past the end", WorkRequest::read(13, vec![seg(&buf, 1, end, slab.rkey)])),
        ("read before the start", WorkRequest::read(14, vec![seg(&buf, 1, slab.addr - PAGE as u64, slab.rkey)])),
        ("address wraps", WorkRequest::read(15, vec![seg(&buf, 1, u64::MAX - 100, slab.rkey)])),
        // A batch whose second segment is bad must not apply its first one either.
        (
            "half-bad write batch",
            WorkRequest::write(16, vec![seg(&buf, 1, slab.addr, slab.rkey), seg(&buf, 2, end, slab.rkey)]),
        ),
    ];
    buf.write_at(PAGE, &[0xAB; PAGE]).unwrap();
    for (what, wr) in &bad {
        ep.post(wr).unwrap();
        let c = wait_one(&ep);
        assert_eq!(c.wr_id, wr.wr_id);
        assert_eq!(c.status, CompletionStatus::RemoteAccessError, "{what}");
    }
    // The page written first is intact and the connection still works.
    ep.post(&WorkRequest::read(20, vec![seg(&buf, 3, slab.addr, slab.rkey)])).unwrap();
    wait_ok(&ep);
    let mut page = vec![0u8; PAGE];
    buf.read_at(3 * PAGE, &mut page).unwrap();
    assert!(page == pattern(3, 0), "a refused request touched memory");
    let stats = client.stats().unwrap();
    assert_eq!(stats.access_errors, bad.len() as u64);
}

#[test]
fn one_client_cannot_reach_another_clients_slab() {
    let server = ServerProcess::start(&["--capacity", "16MiB", "--slab-size", "1MiB"]);
    let mut alice = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let mut bob = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = alice.alloc_slab().unwrap();
    let alice_ep = endpoint(&mut alice);
    let bob_ep = endpoint(&mut bob);
    let buf = LocalRegion::new(PAGE).unwrap();
    buf.write_at(0, &pattern(4, 0)).unwrap();
    alice_ep.post(&WorkRequest::write(1, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
    wait_ok(&alice_ep);
    // Bob knows Alice's address and rkey but they do not open her slab for him.
    bob_ep.post(&WorkRequest::read(2, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
    assert_eq!(wait_one(&bob_ep).status, CompletionStatus::RemoteAccessError);
    bob_ep.post(&WorkRequest::write(3, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
    assert_eq!(wait_one(&bob_ep).status, CompletionStatus::RemoteAccessError);
    // Nor can Bob bind a data connection to Alice's session without her secret.
    let s = alice.session();
    let err = rdma::Endpoint::connect_shim(server.addr, s.session_id, s.secret ^ 1, &EndpointOptions::default())
        .expect_err("wrong secret must be refused");
    assert!(matches!(err, rdma::TransportError::Refused(_)), "{err}");
}

#[test]
fn garbage_on_one_socket_does_not_disturb_another_client() {
    let server = ServerProcess::start(&["--capacity", "16MiB", "--slab-size", "1MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = endpoint(&mut client);
    let buf = LocalRegion::new(2 * PAGE).unwrap();
    buf.write_at(0, &pattern(5, 0)).unwrap();
    ep.post(&WorkRequest::write(1, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
    wait_ok(&ep);

    // A well-behaved client keeps reading and verifying while others send garbage.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = Arc::clone(&stop);
        let buf = Arc::clone(&buf);
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            let mut page = vec![0u8; PAGE];
            while !stop.load(Ordering::Relaxed) || rounds < 100 {
                ep.post(&WorkRequest::read(rounds, vec![seg(&buf, 1, slab.addr, slab.rkey)])).unwrap();
                wait_ok(&ep);
                buf.read_at(PAGE, &mut page).unwrap();
                assert!(page == pattern(5, 0));
                rounds += 1;
            }
            rounds
        })
    };

    let mut rng = fastrand::Rng::with_seed(99);
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply); // the server closes the connection
        reply
    };
    for _ in 0..20 {
        let len = rng.usize(1..2000);
        let junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        send(&junk);
    }
    // Right magic, wrong version: the server answers with an ERROR frame, code 5.
    let mut frame = rdma::frame::Header::encode(rdma::control::KIND_HELLO, 0).to_vec();
    frame[4] = 99;
    let reply = send(&frame);
    assert!(reply.len() > rdma::frame::HEADER_LEN, "expected an ERROR frame");
    let body = &reply[rdma::frame::HEADER_LEN..];
    match rdma::control::decode_response(reply[5], body).unwrap() {
        rdma::control::ControlResponse::Error { code, message } => {
            assert_eq!(code, rdma::control::ErrorCode::UnsupportedVersion);
            assert!(message.contains("version 99"), "{message}");
        }
        other => panic!("unexpected reply {other:?}"),
    }
    // A header that claims a 4 GiB body is refused before anything is allocated.
    send(&rdma::frame::Header::encode(rdma::wire::KIND_READ, u32::MAX));
    // A bound data connection that then sends nonsense.
    {
        let s = client.session();
        let mut out = Vec::new();
        rdma::wire::encode_connect(&mut out, s.session_id, s.secret);
        out.extend_from_slice(&rdma::frame::Header::encode(rdma::wire::KIND_READ, 3));
        out.extend_from_slice(&[1, 2, 3]);
        send(&out);
    }
    // A control connection whose second frame is truncated garbage.
    {
        let mut out = Vec::new();
        rdma::control::encode_request(
            &mut out,
            &rdma::control::ControlRequest::Hello {
                client_id: 5,
                provider: ProviderKind::Shim,
                resume: None,
                token: vec![],
            },
        );
        out.extend_from_slice(&rdma::frame::Header::encode(rdma::control::KIND_FREE_SLAB, 2));
        out.extend_from_slice(&[0, 0]);
        send(&out);
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = worker.join().expect("the good client saw no error");
    assert!(rounds >= 100);
    let stats = client.stats().unwrap();
    assert!(stats.malformed_connections >= 22, "{stats:?}");
}

#[test]
fn link_profiles_add_the_delay_they_claim() {
    let server = ServerProcess::start(&["--capacity", "16MiB", "--slab-size", "1MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let mut measure = |profile: &str, pings: u64| {
        let link: LinkProfile = profile.parse().unwrap();
        let ep = client
            .connect_endpoint(ProviderKind::Shim, &EndpointOptions { link, ..EndpointOptions::default() })
            .unwrap();
        let buf = LocalRegion::new(PAGE).unwrap();
        for i in 0..pings {
            ep.ping(i).unwrap();
            wait_ok(&ep);
            ep.post(&WorkRequest::read(i, vec![seg(&buf, 0, slab.addr, slab.rkey)])).unwrap();
            wait_ok(&ep);
        }
        ep.rtt_stats()
    };
    let loopback = measure("loopback", 20);
    assert_eq!(loopback.samples, 40);
    let urllc = measure("5g-urllc", 10);
    // 1 ms each way: never under 2 ms (lower bound only; a loaded machine may add more).
    assert!(urllc.min >= Duration::from_millis(2), "{urllc:?}");
    let custom = measure("delay=3ms,jitter=1ms", 5);
    assert!(custom.min >= Duration::from_millis(6), "{custom:?}");
    assert!(custom.p50 > loopback.p50);
    // Busy-polling honours the emulated delay too.
    let link: LinkProfile = "delay=2ms".parse().unwrap();
    let ep =
        client.connect_endpoint(ProviderKind::Shim, &EndpointOptions { link, ..EndpointOptions::default() }).unwrap();
    ep.ping(1).unwrap();
    let mut out = Vec::new();
    ep.wait(&mut out, 1, Duration::from_secs(5), PollMode::Spin).unwrap();
    assert!(out[0].rtt >= Duration::from_millis(4), "{:?}", out[0]);
}

#[test]
fn a_dead_server_flushes_outstanding_requests_instead_of_hanging() {
    let server = ServerProcess::start(&["--capacity", "16MiB", "--slab-size", "1MiB"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let link: LinkProfile = "delay=200ms".parse().unwrap();
    let ep =
        client.connect_endpoint(ProviderKind::Shim, &EndpointOptions { link, ..EndpointOptions::default() }).unwrap();
    let buf = LocalRegion::new(PAGE).unwrap();
    drop(server); // SIGKILL
    std::thread::sleep(Duration::from_millis(100));
    let mut out = Vec::new();
    match ep.post(&WorkRequest::read(1, vec![seg(&buf, 0, slab.addr, slab.rkey)])) {
        Ok(()) => {
            let got = ep.wait(&mut out, 1, Duration::from_secs(5), PollMode::Block);
            match got {
                Ok(1) => assert_eq!(out[0].status, CompletionStatus::Flushed),
                other => assert!(matches!(other, Err(rdma::TransportError::Disconnected { .. })), "{other:?}"),
            }
        }
        Err(e) => assert!(matches!(e, rdma::TransportError::Disconnected { .. }), "{e}"),
    }
    assert!(client.heartbeat().is_err(), "the control session must notice too");
}
