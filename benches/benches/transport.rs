//! Transport round trips through the shim on loopback: 4 KiB READ and WRITE, blocking and
//! busy-polling, and a 64-page scattered batch; and the cost of opening a control session, in
//! the clear and with the cluster-key handshake.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use coalesce_benches::{server, Tails};
use criterion::{criterion_group, criterion_main, Criterion};
use rdma::client::{ClientOptions, ControlClient};
use rdma::{EndpointOptions, LocalRegion, LocalSlice, Opcode, PollMode, ProviderKind, Segment, WorkRequest};

fn transport(c: &mut Criterion) {
    let tails = Tails::default();
    let server = server(256 << 20);
    let mut client = ControlClient::connect(server.addr(), &ClientOptions::default()).unwrap();
    let slab = client.alloc_slab().unwrap();
    let ep = client.connect_endpoint(ProviderKind::Shim, &EndpointOptions::default()).unwrap();
    let buf = LocalRegion::new(64 * 4096).unwrap();
    let pages = slab.len / 4096;
    let mut rng = fastrand::Rng::with_seed(3);
    let mut g = c.benchmark_group("transport");
    let cases = [
        ("read_4k_blocking", Opcode::Read, PollMode::Block, 1),
        ("read_4k_busy_poll", Opcode::Read, PollMode::Spin, 1),
        ("write_4k_blocking", Opcode::Write, PollMode::Block, 1),
        ("write_4k_busy_poll", Opcode::Write, PollMode::Spin, 1),
        ("read_64_pages_batch_blocking", Opcode::Read, PollMode::Block, 64),
        ("write_64_pages_batch_blocking", Opcode::Write, PollMode::Block, 64),
    ];
    for (name, opcode, mode, n) in cases {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = Vec::new();
                for i in 0..iters {
                    let segments = (0..n)
                        .map(|k| Segment {
                            local: LocalSlice::new(&buf, k * 4096, 4096).unwrap(),
                            remote_addr: slab.addr + rng.u64(..pages) * 4096,
                            rkey: slab.rkey,
                        })
                        .collect();
                    let wr = WorkRequest { wr_id: i, opcode, segments };
                    let t = Instant::now();
                    ep.post(&wr).unwrap();
                    done.clear();
                    ep.wait(&mut done, 1, Duration::from_secs(5), mode).unwrap();
                    let d = t.elapsed();
                    tails.record(&format!("transport/{name}"), d);
                    total += d;
                }
                total
            });
        });
    }
    g.finish();
    tails.report();
    server.shutdown();
}

/// Opening a control session (connect, HELLO, reply), without a cluster key and with one (the
/// Noise handshake first, then the HELLO sealed).
fn connect(c: &mut Criterion) {
    let tails = Tails::default();
    let key = rdma::secure::ClusterKey::generate().unwrap();
    let mut g = c.benchmark_group("connect");
    for (name, key) in [("control_session_plain", None), ("control_session_cluster_key", Some(key))] {
        let config = lender::ServerConfig {
            key: key.clone(),
            max_connections_per_peer: 4096,
            ..lender::ServerConfig::embedded(256 << 20)
        };
        let server = lender::start(config).unwrap();
        let options = ClientOptions { key, ..ClientOptions::default() };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let client = ControlClient::connect(server.addr(), &options).unwrap();
                    let d = t.elapsed();
                    drop(client);
                    tails.record(&format!("connect/{name}"), d);
                    total += d;
                }
                total
            });
        });
        server.shutdown();
    }
    g.finish();
    tails.report();
}

criterion_group!(benches, transport, connect);
criterion_main!(benches);
