//! A lender that lies, end to end (issue #10): a real `memory-server` behind a proxy that flips
//! one bit in the payload of every READ completion once armed, as a dishonest lender (or anything
//! on the path) would. A sealed pager (the default) refuses the copy before the program reads a
//! byte: the access fails (`EFAULT` for a kernel read, SIGBUS for a load), the lender is dropped,
//! `copies_rejected` counts it. A pager that trusts its lenders reads the flipped bit: that half
//! shows the lie is real and the test can fail.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use common::{kernel_read, ServerProcess};
use rdma::frame::{Header, HEADER_LEN};
use rdma::wire::KIND_COMPLETION;

/// Forwards connections to `target`; while `lie` is set, flips a bit in every READ payload.
struct LyingProxy {
    addr: SocketAddr,
    lie: Arc<AtomicBool>,
}

impl LyingProxy {
    fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let lie = Arc::new(AtomicBool::new(false));
        let armed = Arc::clone(&lie);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else { return };
                // Frames are relayed as they come: Nagle's wait for an ACK would stall each one.
                let _ = client.set_nodelay(true).and_then(|()| server.set_nodelay(true));
                let (mut up_from, mut up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                    let _ = up_to.shutdown(std::net::Shutdown::Write);
                });
                let armed = Arc::clone(&armed);
                std::thread::spawn(move || relay_replies(server, client, &armed));
            }
        });
        Self { addr, lie }
    }
}

/// Copies frames from the lender to the borrower, lying in READ completions when armed.
fn relay_replies(mut from: TcpStream, mut to: TcpStream, lie: &AtomicBool) {
    let mut head = [0u8; HEADER_LEN];
    let mut frame = Vec::new();
    while from.read_exact(&mut head).is_ok() {
        let Ok(header) = Header::decode(&head) else { return };
        frame.clear();
        frame.extend_from_slice(&head);
        frame.resize(HEADER_LEN + header.body_len as usize, 0);
        let body = &mut frame[HEADER_LEN..];
        if from.read_exact(body).is_err() {
            return;
        }
        // A completion: wr_id u64, status u8 (0: success), opcode u8 (1: READ), u16, length u32,
        // then the payload.
        let read_payload = header.kind == KIND_COMPLETION && body.len() > 16 + 100 && body[8] == 0 && body[9] == 1;
        if read_payload && lie.load(Ordering::SeqCst) {
            body[16 + 100] ^= 0x04;
        }
        if to.write_all(&frame).is_err() {
            return;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn word(p: usize, w: usize) -> u64 {
    ((p as u64) << 20) | (w as u64 + 1)
}

/// Fills a region four times the budget through a lying lender, arms the lie, and reads one page
/// that went remote. Returns what the read did and the pager.
fn read_through_a_lie(server: &ServerProcess, trusted: bool) -> (std::io::Result<bool>, Pager) {
    let proxy = LyingProxy::start(server.addr);
    let mut config = PagerConfig::new(vec![proxy.addr], 4 << 20);
    config.trusted_lenders = trusted;
    config.prefetch = false;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 << 20, RegionOptions::default()).unwrap();
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(i / (PAGE_SIZE / 8), i % (PAGE_SIZE / 8));
    }
    let base = region.as_ptr() as usize;
    // The first page was written first: long evicted.
    assert_eq!(region.evict(0, PAGE_SIZE), 1);
    proxy.lie.store(true, Ordering::SeqCst);
    let outcome = kernel_read(base).map(|()| {
        let words: &[u64] = bytemuck::cast_slice(&region.as_slice()[..PAGE_SIZE]);
        words.iter().enumerate().all(|(w, &v)| v == word(0, w))
    });
    drop(region);
    (outcome, pager)
}

#[test]
fn a_sealed_pager_refuses_a_changed_copy_and_a_trusting_one_reads_it() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);

    let (outcome, pager) = read_through_a_lie(&server, false);
    let err = outcome.expect_err("a changed copy reached the program");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    let stats = pager.stats();
    assert!(stats.sealed && stats.copies_rejected == 1 && stats.fetch_failures == 1, "{stats}");
    assert!(pager.server_pages().iter().all(|&(_, _, alive)| !alive), "the lying lender is still trusted");
    drop(pager);

    let (outcome, pager) = read_through_a_lie(&server, true);
    assert!(!outcome.expect("a trusting pager serves the copy"), "the lie did not reach the plaintext pager");
    assert!(!pager.stats().sealed);
}

#[test]
fn an_erasure_coded_page_is_rebuilt_around_a_lying_lender_and_the_liar_is_dropped() {
    coalesce::init_logging("error");
    let servers: Vec<ServerProcess> =
        (0..4).map(|_| ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "8MiB"])).collect();
    // Every lender behind a proxy, so that none is farther than the others by construction; the
    // liar is chosen once the pages are placed (a farther lender would hold only parity shards,
    // which a read without spare shard reads never touches).
    let proxies: Vec<LyingProxy> = servers.iter().map(|s| LyingProxy::start(s.addr)).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let mut config = PagerConfig::new(addrs.clone(), 4 << 20);
    config.redundancy = Some(coalesce_pager::store::Redundancy::Erasure { data: 2, parity: 2 });
    // Only the K data shards are read, so the lender of a page's first data shard is always read.
    config.extra_shard_reads = 0;
    config.prefetch = false;
    let pager = Pager::new(config).unwrap();
    let mut region = pager.map(16 << 20, RegionOptions::default()).unwrap();
    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(i / (PAGE_SIZE / 8), i % (PAGE_SIZE / 8));
    }
    // The first page was written first: long evicted.
    assert_eq!(region.evict(0, PAGE_SIZE), 1);
    let liar_addr = region.lender_of(0).expect("the first page has no remote copy");
    let liar = addrs.iter().position(|&a| a == liar_addr).expect("a lender the pager was not given");
    proxies[liar].lie.store(true, Ordering::SeqCst);
    // Every page comes back right (the kernel reads it: a refused page would be EFAULT here).
    let base = region.as_ptr() as usize;
    for p in 0..region.len() / PAGE_SIZE {
        kernel_read(base + p * PAGE_SIZE).unwrap_or_else(|e| panic!("page {p}: {e}"));
    }
    let words: &[u64] = bytemuck::cast_slice(region.as_slice());
    for (i, &w) in words.iter().enumerate() {
        assert_eq!(w, word(i / (PAGE_SIZE / 8), i % (PAGE_SIZE / 8)), "word {i}");
    }
    let stats = pager.stats();
    assert!(
        stats.copies_rejected >= 1,
        "no changed shard was ever used: the test proves nothing\n{stats}\n{:?}",
        pager.server_pages()
    );
    assert_eq!(stats.fetch_failures, 0, "{stats}");
    let only_liar_dropped: Vec<bool> = (0..addrs.len()).map(|i| i != liar).collect();
    let alive: Vec<bool> = pager.server_pages().iter().map(|&(_, _, alive)| alive).collect();
    assert_eq!(alive, only_liar_dropped, "only the lying lender ({liar_addr}) is dropped");
    // Failed lenders are tried again every second and taken back if they kept their session; a
    // liar never is.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let alive: Vec<bool> = pager.server_pages().iter().map(|&(_, _, alive)| alive).collect();
    assert_eq!(alive, only_liar_dropped, "the lying lender ({liar_addr}) was taken back");
}
