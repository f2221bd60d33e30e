//! End-to-end tests of the `memory-server` daemon: capacity, leases, the command line and signals.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{pattern, wait_ok, ServerProcess};
use rdma::client::{ClientError, ClientOptions, ControlClient};
use rdma::control::{ErrorCode, SessionOutcome};
use rdma::{CompletionStatus, EndpointOptions, LocalRegion, LocalSlice, ProviderKind, Segment, WorkRequest};

#[test]
fn capacity_exhaustion_returns_the_typed_error_and_freeing_makes_room() {
    let server = ServerProcess::start(&["--capacity", "4MiB", "--slab-size", "1MiB"]);
    let mut a = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let mut b = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let mut slabs = vec![a.alloc_slab().unwrap(), a.alloc_slab().unwrap(), b.alloc_slab().unwrap()];
    slabs.push(b.alloc_slab().unwrap());
    for client in [&mut a, &mut b] {
        match client.alloc_slab() {
            Err(ClientError::CapacityExhausted { addr, message }) => {
                assert_eq!(addr, server.addr);
                assert!(message.contains("capacity exhausted"), "{message}");
            }
            other => panic!("expected CapacityExhausted, got {other:?}"),
        }
    }
    // Another client's slab cannot be freed by a.
    match a.free_slab(slabs[2].slab_id) {
        Err(ClientError::Refused { code: ErrorCode::UnknownSlab, .. }) => {}
        other => panic!("expected UnknownSlab, got {other:?}"),
    }
    b.free_slab(slabs[3].slab_id).unwrap();
    let again = a.alloc_slab().unwrap();
    assert_eq!(again.len, 1 << 20);
    let stats = a.stats().unwrap();
    assert_eq!((stats.allocated, stats.slabs, stats.sessions), (4 << 20, 4, 2));
}

#[test]
fn a_silent_clients_slabs_are_reclaimed_after_the_lease_and_it_is_told() {
    let server = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "1MiB", "--lease", "600ms"]);
    let mut silent = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    assert_eq!(silent.session().outcome, SessionOutcome::New);
    assert_eq!(silent.session().lease, Duration::from_millis(600));
    let slab = silent.alloc_slab().unwrap();
    silent.alloc_slab().unwrap();
    let ep = silent.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    let buf = LocalRegion::new(4096).unwrap();
    buf.write_at(0, &pattern(6, 0)).unwrap();
    let seg = Segment { local: LocalSlice::new(&buf, 0, 4096).unwrap(), remote_addr: slab.addr, rkey: slab.rkey };
    ep.post(&WorkRequest::write(1, vec![seg.clone()])).unwrap();
    wait_ok(&ep);

    // A second client heartbeats throughout and keeps its slab.
    let mut loyal = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    loyal.alloc_slab().unwrap();
    let start = Instant::now();
    let mut expired_seen = false;
    while start.elapsed() < Duration::from_secs(5) {
        loyal.heartbeat().unwrap();
        let s = loyal.stats().unwrap();
        if s.leases_expired == 1 {
            assert_eq!(s.slabs, 1, "only the loyal client's slab is left: {s:?}");
            assert_eq!(s.allocated, 1 << 20);
            expired_seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(expired_seen, "the lease never expired");

    // The silent client's data connection does not outlive its session: a read on it fails.
    let c = match ep.post(&WorkRequest::read(2, vec![seg.clone()])) {
        Ok(()) => common::wait_one(&ep).status,
        Err(_) => CompletionStatus::RemoteAccessError,
    };
    assert_ne!(c, CompletionStatus::Success, "a data connection outlived its session");
    // Its control connection is told the session is gone...
    assert!(matches!(silent.alloc_slab(), Err(ClientError::SessionExpired { .. })));
    // ...and so is a reconnect that resumes it.
    let resume =
        ClientOptions { client_id: Some(silent.client_id()), resume: Some(silent.proof()), ..Default::default() };
    let mut back = ControlClient::connect(server.addr, &resume).unwrap();
    assert_eq!(back.session().outcome, SessionOutcome::Expired);
    // The old rkey opens nothing for anyone, the new session included.
    let ep2 = back.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    ep2.post(&WorkRequest::read(3, vec![seg])).unwrap();
    assert_eq!(common::wait_one(&ep2).status, CompletionStatus::RemoteAccessError);
    // The loyal client's slab is still there.
    assert_eq!(loyal.stats().unwrap().slabs, 1);
}

#[test]
fn reconnecting_within_the_lease_resumes_the_session() {
    let server = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "1MiB", "--lease", "10s"]);
    let mut first = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = first.alloc_slab().unwrap();
    let resume =
        ClientOptions { client_id: Some(first.client_id()), resume: Some(first.proof()), ..Default::default() };
    drop(first);
    let mut again = ControlClient::connect(server.addr, &resume).unwrap();
    assert_eq!(again.session().outcome, SessionOutcome::Resumed);
    again.free_slab(slab.slab_id).unwrap();
}

#[test]
fn a_provider_the_server_does_not_offer_is_refused_with_a_clear_message() {
    let server = ServerProcess::start(&[]);
    let options = ClientOptions { provider: ProviderKind::Verbs, ..ClientOptions::default() };
    match ControlClient::connect(server.addr, &options) {
        Err(ClientError::Refused { code: ErrorCode::UnsupportedProvider, message, .. }) => {
            assert!(message.contains("--provider shim"), "{message}");
        }
        other => panic!("expected UnsupportedProvider, got {other:?}"),
    }
}

#[test]
fn sigterm_drains_the_server_which_exits_once_its_clients_freed_their_slabs() {
    let server = ServerProcess::start(&["--drain-timeout", "20s"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    server.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let leaving_in = loop {
        if let Some(d) = client.heartbeat().unwrap().leaving_in {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "the heartbeats never said the server is leaving");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(leaving_in <= Duration::from_secs(20) && leaving_in > Duration::from_secs(5), "{leaving_in:?}");
    match client.alloc_slab() {
        Err(ClientError::Refused { code: ErrorCode::ShuttingDown, message, .. }) => {
            assert!(message.contains("draining"), "{message}");
        }
        other => panic!("a draining server must refuse new slabs, got {other:?}"),
    }
    match ControlClient::connect(server.addr, &ClientOptions::default()) {
        Err(ClientError::Refused { code: ErrorCode::ShuttingDown, .. }) => {}
        other => panic!("a draining server must refuse new clients, got {:?}", other.map(|_| ())),
    }
    // Still serving: the slab is freed, and the server leaves at once (long before its deadline).
    let freed = std::time::Instant::now();
    client.free_slab(slab.slab_id).unwrap();
    let status = server.wait();
    assert!(status.success(), "exit status {status:?}");
    assert!(freed.elapsed() < Duration::from_secs(5), "left {:?} after the last slab was freed", freed.elapsed());
}

#[test]
fn with_drain_timeout_zero_sigterm_exits_at_once() {
    let server = ServerProcess::start(&["--drain-timeout", "0s"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    client.alloc_slab().unwrap();
    let start = std::time::Instant::now();
    let status = server.terminate();
    assert!(status.success() && start.elapsed() < Duration::from_secs(5), "{status:?} after {:?}", start.elapsed());
}

#[test]
fn the_command_line_explains_itself_and_refuses_bad_flags() {
    let bin = env!("CARGO_BIN_EXE_memory-server");
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    let flags = [
        "--listen",
        "--capacity",
        "--overcommit",
        "--quota",
        "--slab-size",
        "--lease",
        "--provider",
        "--max-connections",
        "--max-connections-per-peer",
        "--handshake-timeout",
        "--poll-spin",
    ];
    for flag in flags {
        assert!(text.contains(flag), "--help does not explain {flag}");
    }
    let cases: [(&[&str], &str); 10] = [
        (&["--capacity", "lots"], "capacity"),
        (&["--capacity", "100TiB"], "--overcommit"),
        (&["--quota", "4KiB"], "--quota"),
        (&["--max-connections", "8", "--max-connections-per-peer", "9"], "--max-connections-per-peer"),
        (&["--handshake-timeout", "1ms"], "--handshake-timeout"),
        (&["--capacity", "1MiB", "--slab-size", "64MiB"], "smaller than one slab"),
        (&["--slab-size", "1000"], "multiple of 4 KiB"),
        (&["--lease", "soon"], "lease"),
        (&["--poll-spin", "20ms"], "--poll-spin 20ms is out of range"),
        (&["--poll-spin", "briefly"], "poll-spin"),
    ];
    for (args, expected) in cases {
        let out = Command::new(bin).args(["--listen", "127.0.0.1:0"]).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A port that is taken gives a clear error, not a panic.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let out = Command::new(bin).args(["--listen", &taken]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
}

/// `coalesce latency --same-page` against a real memory-server: four measurements, each labelled
/// as reading one page, with the minimum and median the Soft-RoCE guest script compares with
/// perftest's `t_min` and `t_typical` (it parses them from these lines).
#[test]
fn latency_reports_minimum_and_median_and_says_when_it_reads_one_page() {
    let server = ServerProcess::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["latency", "--server", &server.addr.to_string(), "--ops", "200", "--same-page"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let figure = |line: &str, name: &str| -> f64 {
        let rest =
            &line[line.find(&format!(" {name} ")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 2..];
        rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {line}"))
    };
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(" n=")).collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (line, label) in lines.iter().zip(["WRITE blocking", "WRITE busy-poll", "READ blocking", "READ busy-poll"]) {
        assert!(line.starts_with(&format!("4 KiB {label}, same page")), "{line}");
        assert!(line.contains("n=200 "), "{line}");
        let (min, median, p99) = (figure(line, "min"), figure(line, "median"), figure(line, "p99"));
        assert!(min > 0.0 && min <= median && median <= p99, "{line}");
    }
    let random = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["latency", "--server", &server.addr.to_string(), "--ops", "50"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&random.stdout);
    assert!(random.status.success() && !stdout.contains("same page") && stdout.contains("READ busy-poll "), "{stdout}");
    // Every round trip's timing is kept until the measurement ends: an absurd count is refused,
    // not allocated.
    let absurd = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["latency", "--server", &server.addr.to_string(), "--ops", "100000000000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&absurd.stderr);
    assert!(!absurd.status.success() && stderr.contains("--ops 100000000000: at most 10000000"), "{stderr}");
}
