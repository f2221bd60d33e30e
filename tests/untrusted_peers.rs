//! End-to-end tests of a real `memory-server` facing hostile peers (issue #10): session takeover
//! by naming a client id, guessed secrets, headers announcing huge bodies, trickled frames, one
//! address holding every connection, one client taking all capacity, capacity beyond the machine,
//! and secrets in logs. Each was possible before the fix.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{pattern, wait_ok, ServerProcess};
use rdma::client::{ClientError, ClientOptions, ControlClient};
use rdma::control::{ControlResponse, ErrorCode, SessionProof, KIND_ERROR, KIND_HELLO};
use rdma::frame::{read_frame, Header, MAX_BODY_LEN};
use rdma::{Endpoint, EndpointOptions, LocalRegion, LocalSlice, ProviderKind, Segment, WorkRequest};

/// A raw connection that has sent nothing yet.
fn raw(server: &ServerProcess) -> TcpStream {
    let s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The error frame the server answered on `s` with (panics on anything else).
fn error_reply(s: &mut TcpStream) -> (ErrorCode, String) {
    let mut body = Vec::new();
    let header = read_frame(s, &mut body).expect("a reply frame");
    assert_eq!(header.kind, KIND_ERROR);
    match rdma::control::decode_response(header.kind, &body).unwrap() {
        ControlResponse::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn naming_another_clients_id_does_not_take_its_session() {
    let server = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "1MiB"]);
    let mut victim = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = victim.alloc_slab().unwrap();
    let ep = victim.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    let buf = LocalRegion::new(4096).unwrap();
    buf.write_at(0, &pattern(11, 0)).unwrap();
    let seg = Segment { local: LocalSlice::new(&buf, 0, 4096).unwrap(), remote_addr: slab.addr, rkey: slab.rkey };
    ep.post(&WorkRequest::write(1, vec![seg.clone()])).unwrap();
    wait_ok(&ep);

    // The attacker knows the victim's client id (logged, leaked) but not its secret.
    let session = *victim.session();
    let named = ClientOptions { client_id: Some(victim.client_id()), ..ClientOptions::default() };
    let wrong = SessionProof { session_id: session.session_id, secret: session.secret ^ 0x5555 };
    let guessed = ClientOptions { resume: Some(wrong), ..named.clone() };
    for attempt in [named, guessed] {
        match ControlClient::connect(server.addr, &attempt) {
            Err(ClientError::Refused { code: ErrorCode::SessionInUse, message, .. }) => {
                assert!(message.contains("secret"), "{message}");
            }
            other => panic!("a hello without the session's secret must be refused: {other:?}"),
        }
    }
    // A data connection with a guessed secret is refused too.
    let forged =
        Endpoint::connect(ProviderKind::Shim, server.addr, session.session_id, !session.secret, &Default::default());
    assert!(forged.is_err(), "a data connection with a wrong secret was accepted");

    // The victim's page is intact and its session still its own.
    buf.write_at(0, &[0u8; 4096]).unwrap();
    ep.post(&WorkRequest::read(2, vec![seg])).unwrap();
    wait_ok(&ep);
    let mut page = vec![0u8; 4096];
    buf.read_at(0, &mut page).unwrap();
    assert!(page == pattern(11, 0), "the victim's page changed");
    victim.free_slab(slab.slab_id).unwrap();
}

#[test]
fn an_address_that_keeps_guessing_is_refused_for_a_while() {
    let server = ServerProcess::start(&[]);
    let owner = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let session_id = owner.session().session_id;
    for guess in 0..u64::from(lender::peers::FAILURE_LIMIT) {
        let attempt = Endpoint::connect(ProviderKind::Shim, server.addr, session_id, guess, &Default::default());
        assert!(attempt.is_err(), "guess {guess} was accepted");
    }
    // Every connection from this address is now turned away with a typed error, before it can
    // try anything.
    let (code, message) = error_reply(&mut raw(&server));
    assert_eq!(code, ErrorCode::TooManyFailures, "{message}");
}

#[test]
fn headers_announcing_huge_bodies_cost_the_server_nothing() {
    let server = ServerProcess::start(&[]);
    let before = server.rss_bytes();
    // 128 connections each announce the largest body the protocol allows as their first frame
    // (before the fix the server allocated and zeroed all of it, 2 GiB in all, before reading).
    let mut conns: Vec<TcpStream> = (0..128)
        .map(|_| {
            let mut s = raw(&server);
            s.write_all(&Header::encode(KIND_HELLO, MAX_BODY_LEN)).unwrap();
            s
        })
        .collect();
    for s in &mut conns {
        let (code, message) = error_reply(s);
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("limit of 4096"), "{message}");
    }
    let grown = server.rss_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "the server grew by {grown} bytes for 128 empty frames");
}

#[test]
fn a_peer_trickling_its_first_frame_is_dropped_at_the_handshake_deadline() {
    let server = ServerProcess::start(&["--handshake-timeout", "1s"]);
    let mut s = raw(&server);
    s.write_all(&Header::encode(KIND_HELLO, 100)).unwrap();
    // One byte every 100 ms: every read returns quickly, the frame would complete after 10 s.
    let started = Instant::now();
    let mut sent = 0;
    while sent < 100 && s.write_all(&[0]).is_ok() {
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sent < 100, "the server waited {:?} for a trickled frame", started.elapsed());
    // The server closed the connection without a reply.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn one_address_cannot_hold_every_connection() {
    let server = ServerProcess::start(&["--max-connections", "16", "--max-connections-per-peer", "3"]);
    let held: Vec<TcpStream> = (0..3).map(|_| raw(&server)).collect();
    let (_, message) = error_reply(&mut raw(&server));
    assert!(message.contains("--max-connections-per-peer"), "{message}");
    drop(held);
    // Once they are gone (the server notices the close), the address is welcome again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ControlClient::connect(server.addr, &ClientOptions::default()) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the address stayed refused after closing its connections: {e}"),
        }
    }
}

#[test]
fn a_quota_keeps_one_client_from_taking_everything() {
    let server = ServerProcess::start(&["--capacity", "8MiB", "--slab-size", "1MiB", "--quota", "2MiB"]);
    let mut greedy = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    greedy.alloc_slab().unwrap();
    greedy.alloc_slab().unwrap();
    match greedy.alloc_slab() {
        Err(ClientError::CapacityExhausted { message, .. }) => assert!(message.contains("--quota"), "{message}"),
        other => panic!("expected the quota to refuse, got {other:?}"),
    }
    let mut other = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    other.alloc_slab().unwrap();
}

#[test]
fn capacity_beyond_the_machine_is_offered_only_with_overcommit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memory-server"))
        .args(["--listen", "127.0.0.1:0", "--capacity", "100TiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than this machine can back") && err.contains("--overcommit"), "{err}");
    let server = ServerProcess::start(&["--capacity", "100TiB", "--overcommit"]);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    assert_eq!(client.stats().unwrap().capacity, 100 << 40);
}

#[test]
fn logs_carry_no_secret_and_no_whole_id() {
    let log = std::env::temp_dir().join(format!("coalesce-untrusted-log-{}", std::process::id()));
    let server = ServerProcess::start_logging_to(&["--capacity", "8MiB", "--slab-size", "1MiB"], &log);
    let mut client = ControlClient::connect(server.addr, &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = client.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    drop(ep);
    let session = *client.session();
    // A refused takeover and a refused data connection are logged too.
    let named = ClientOptions { client_id: Some(client.client_id()), ..ClientOptions::default() };
    assert!(ControlClient::connect(server.addr, &named).is_err());
    assert!(Endpoint::connect(ProviderKind::Shim, server.addr, session.session_id, 7, &Default::default()).is_err());
    client.free_slab(slab.slab_id).unwrap();
    drop(client);
    let _ = server.terminate();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("client hello"), "the log has the hello: {text}");
    for (what, value) in
        [("secret", session.secret), ("session id", session.session_id), ("client id", named.client_id.unwrap())]
    {
        for shown in [value.to_string(), format!("{value:x}"), format!("{value:#018x}")] {
            assert!(!text.contains(&shown), "the log shows the {what} ({shown}):\n{text}");
        }
    }
}

/// A new key file made by `coalesce keygen`, and the key in it.
fn keygen(name: &str) -> (std::path::PathBuf, rdma::secure::ClusterKey) {
    let path = std::env::temp_dir().join(format!("coalesce-test-key-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coalesce")).arg("keygen").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = rdma::secure::ClusterKey::from_file(&path).unwrap();
    (path, key)
}

#[test]
fn with_a_cluster_key_only_its_holders_get_in() {
    let (path, key) = keygen("members");
    let (_, other) = keygen("strangers");
    let server =
        ServerProcess::start(&["--key-file", path.to_str().unwrap(), "--capacity", "8MiB", "--slab-size", "1MiB"]);
    match ControlClient::connect(server.addr, &ClientOptions::default()) {
        Err(ClientError::Refused { message, .. }) => assert!(message.contains("--key-file"), "{message}"),
        other => panic!("a client without the key got {other:?}"),
    }
    let stranger = ClientOptions { key: Some(other), ..ClientOptions::default() };
    assert!(matches!(ControlClient::connect(server.addr, &stranger), Err(ClientError::Handshake { .. })));

    let member = ClientOptions { key: Some(key), ..ClientOptions::default() };
    let mut client = ControlClient::connect(server.addr, &member).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = client.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    let buf = LocalRegion::new(4096).unwrap();
    buf.write_at(0, &pattern(5, 0)).unwrap();
    let seg = Segment { local: LocalSlice::new(&buf, 0, 4096).unwrap(), remote_addr: slab.addr, rkey: slab.rkey };
    ep.post(&WorkRequest::write(1, vec![seg.clone()])).unwrap();
    wait_ok(&ep);
    buf.write_at(0, &[0u8; 4096]).unwrap();
    ep.post(&WorkRequest::read(2, vec![seg])).unwrap();
    wait_ok(&ep);
    let mut page = vec![0u8; 4096];
    buf.read_at(0, &mut page).unwrap();
    assert!(page == pattern(5, 0));
    // A data connection must authenticate too, even with the right session secret.
    let session = *client.session();
    let plain =
        Endpoint::connect(ProviderKind::Shim, server.addr, session.session_id, session.secret, &Default::default());
    assert!(plain.is_err(), "a data connection without the key was accepted");
    let _ = std::fs::remove_file(&path);
}

/// Forwards one connection at a time to `target`, keeping every byte the server sent.
fn recording_proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(target) else { return };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            let log = std::sync::Arc::clone(&log);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 || client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn with_a_cluster_key_the_session_secret_never_crosses_the_wire_in_the_clear() {
    let (path, key) = keygen("wire");
    for keyed in [true, false] {
        let mut args = vec!["--capacity", "8MiB", "--slab-size", "1MiB"];
        if keyed {
            args.extend(["--key-file", path.to_str().unwrap()]);
        }
        let server = ServerProcess::start(&args);
        let (proxy, seen) = recording_proxy(server.addr);
        let options = ClientOptions { key: keyed.then(|| key.clone()), ..ClientOptions::default() };
        let mut client = ControlClient::connect(proxy, &options).unwrap();
        client.heartbeat().unwrap();
        let secret = client.session().secret.to_le_bytes();
        let wire = seen.lock().unwrap().clone();
        let visible = wire.windows(8).any(|w| w == secret);
        // Without a key the secret is plainly there: the check can fail.
        assert_eq!(visible, !keyed, "keyed={keyed}: the secret {} on the wire", if visible { "is" } else { "is not" });
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn without_a_key_the_lender_serves_loopback_only_unless_told_otherwise() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memory-server"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--key-file") && err.contains("--insecure"), "{err}");
}
