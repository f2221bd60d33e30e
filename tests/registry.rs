//! The etcd registry (issue #11), end to end with a real etcd (Debian's `etcd-server`, started
//! here on 127.0.0.1 with a temporary data directory) and real `memory-server --registry`
//! processes: a `coalesce demo --registry` finds them and places by proximity; a lender whose
//! lease expires (stopped with SIGSTOP) leaves the registry, and registers again when it resumes.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ServerProcess;

/// A real etcd on 127.0.0.1, killed (and its data removed) on drop.
struct Etcd {
    child: Child,
    client: SocketAddr,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// `None` (the test skips) without an etcd binary, unless `COALESCE_REQUIRE_PROGRAMS` is set.
    fn start(tag: &str) -> Option<Self> {
        let bin = std::env::var("COALESCE_ETCD").unwrap_or_else(|_| "etcd".into());
        if Command::new(&bin).arg("--version").output().is_err() {
            assert!(std::env::var_os("COALESCE_REQUIRE_PROGRAMS").is_none(), "etcd is not installed (etcd-server)");
            eprintln!("skipped: etcd is not installed (Debian package etcd-server)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("coalesce-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&bin)
            .args(["--name", "coalesce-test", "--data-dir", dir.to_str().unwrap()])
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("coalesce-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = Self { child, client: SocketAddr::from(([127, 0, 0, 1], client)), dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(etcd.client).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(etcd)
    }

    fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn registered(etcd: &Etcd, link: &str, ttl: &str) -> ServerProcess {
    let url = etcd.url();
    ServerProcess::start(&[
        "--capacity",
        "512MiB",
        "--slab-size",
        "4MiB",
        "--registry",
        &url,
        "--registry-ttl",
        ttl,
        "--announce-interval",
        "500ms",
        "--link",
        link,
    ])
}

/// The addresses `coalesce lenders --registry` lists.
fn listed(etcd: &Etcd) -> Vec<SocketAddr> {
    let out = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["lenders", "--registry", &etcd.url(), "--discover-wait", "300ms", "--pings", "1"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_demo_finds_registered_lenders_and_places_most_pages_on_the_nearest() {
    let Some(etcd) = Etcd::start("place") else { return };
    let (lan, far) = (registered(&etcd, "lan", "10s"), registered(&etcd, "5g-urllc", "10s"));
    let out = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["demo", "--registry", &etcd.url(), "--discover-wait", "500ms", "--redundancy", "none"])
        .args(["--size", "32MiB", "--local", "8MiB", "--random-reads", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let pages = |s: &ServerProcess| -> u64 {
        let line = stdout.lines().find(|l| l.starts_with(&format!("server {}:", s.addr))).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let (on_lan, on_far) = (pages(&lan), pages(&far));
    assert!(on_lan * 100 >= (on_lan + on_far) * 85, "{stdout}");
}

#[test]
fn a_lender_whose_lease_expires_leaves_the_registry_and_comes_back_when_it_resumes() {
    let Some(etcd) = Etcd::start("lease") else { return };
    let (steady, stalled) = (registered(&etcd, "lan", "10s"), registered(&etcd, "lan", "2s"));
    let mut now = listed(&etcd);
    now.sort();
    let mut both = vec![steady.addr, stalled.addr];
    both.sort();
    assert_eq!(now, both);
    // Stopped, it renews nothing: its lease expires within its TTL and the key goes.
    stalled.signal(libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(15);
    while listed(&etcd).contains(&stalled.addr) {
        assert!(Instant::now() < deadline, "the stalled lender is still registered");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(listed(&etcd), vec![steady.addr]);
    // Resumed, it finds its lease gone and registers again.
    stalled.signal(libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !listed(&etcd).contains(&stalled.addr) {
        assert!(Instant::now() < deadline, "the resumed lender never registered again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deletes `key` from etcd through its JSON gateway (as an operator's `etcdctl del` would).
fn etcd_delete(etcd: &Etcd, key: &str) {
    use std::io::{Read, Write};
    let b64 = |s: &str| {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in s.as_bytes().chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= chunk.len() { char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]) } else { '=' });
            }
        }
        out
    };
    let body = format!("{{\"key\":\"{}\"}}", b64(key));
    let mut s = TcpStream::connect(etcd.client).unwrap();
    write!(
        s,
        "POST /v3/kv/deleterange HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        etcd.client,
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"deleted\":\"1\""), "etcd did not delete {key}: {reply}");
}

#[test]
fn a_pager_retires_a_lender_whose_key_goes_and_takes_it_back_when_it_registers_again() {
    use coalesce_pager::discover::Method;
    use coalesce_pager::{Pager, PagerConfig, RegionOptions};
    let Some(etcd) = Etcd::start("readopt") else { return };
    let (a, b) = (registered(&etcd, "lan", "10s"), registered(&etcd, "lan", "10s"));
    let mut config = PagerConfig::new(Vec::new(), 4 << 20);
    config.discovery = Some(Method::Registry(etcd.url().parse().unwrap()));
    config.discovery_wait = Duration::from_secs(1);
    config.redundancy = Some(coalesce_pager::store::Redundancy::None);
    let pager = Pager::new(config).unwrap();
    let info = |s: &ServerProcess| pager.lenders().into_iter().find(|l| l.addr == s.addr).unwrap();
    assert!(!info(&a).leaving && !info(&b).leaving, "{:?}", pager.lenders());
    let mut first = pager.map(16 << 20, RegionOptions::default()).unwrap();
    let words: &mut [u64] = bytemuck::cast_slice_mut(first.as_mut_slice());
    for (i, w) in words.iter_mut().enumerate().step_by(512) {
        *w = i as u64 ^ 0xabcd;
    }
    assert!(info(&a).pages > 500 && info(&b).pages > 500, "{:?}", pager.lenders());

    // Its key deleted: the pager retires it and moves its pages; the lender puts its key back at
    // its next announcement, and once its pages have moved the pager takes it back.
    etcd_delete(&etcd, &format!("/coalesce/lenders/{}", a.addr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_leaving = false;
    loop {
        let now = info(&a);
        seen_leaving |= now.leaving;
        if seen_leaving && !now.leaving {
            break;
        }
        assert!(Instant::now() < deadline, "never retired and taken back: {:?}", pager.lenders());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(info(&a).pages, 0, "taken back before its pages moved: {:?}", pager.lenders());
    // New pages go to it again.
    let mut second = pager.map(16 << 20, RegionOptions::default()).unwrap();
    second.as_mut_slice().chunks_mut(4096).for_each(|p| p[0] = 1);
    assert!(info(&a).pages > 500, "{:?}", pager.lenders());
    let words: &[u64] = bytemuck::cast_slice(first.as_slice());
    for (i, w) in words.iter().enumerate().step_by(512) {
        assert_eq!(*w, i as u64 ^ 0xabcd, "word {i}");
    }
    drop(b);
}

#[test]
fn a_program_under_coalesce_run_borrows_from_lenders_in_the_registry() {
    let Some(etcd) = Etcd::start("run") else { return };
    let _lender = registered(&etcd, "loopback", "10s");
    let out = Command::new(env!("CARGO_BIN_EXE_coalesce"))
        .args(["run", "--registry", &etcd.url(), "--discover-wait", "1s", "--local", "16MiB", "--"])
        .args(common::SORT_PIPELINE)
        .output()
        .unwrap();
    assert!(common::sort_pipeline_faults(&out) > 0, "sort paged nothing");
}
