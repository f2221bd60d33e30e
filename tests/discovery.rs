//! Discovery (issue #11), end to end in a network namespace each test makes (loopback with
//! multicast on): real `memory-server --announce` processes at emulated distances, and a real
//! `coalesce demo --discover` that finds them over mDNS, places most pages on the nearest, and
//! adopts a lender announced while it runs.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Output, Stdio};

use common::{Netns, ServerProcess};

fn announced(ns: &Netns, link: Option<&str>) -> ServerProcess {
    let mut args = vec!["--capacity", "2GiB", "--slab-size", "16MiB", "--announce", "--announce-interval", "500ms"];
    if let Some(link) = link {
        args.extend(["--link", link]);
    }
    ServerProcess::start_in(ns, &args)
}

/// `coalesce demo --discover ARGS` inside `ns`.
fn demo(ns: &Netns, args: &[&str]) -> std::process::Child {
    ns.command(env!("CARGO_BIN_EXE_coalesce"))
        .args(["demo", "--discover", "--discover-wait", "1500ms", "--redundancy", "none"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The pages each lender holds, from the demo's `server ADDR: N pages (...)` lines.
fn pages_by_lender(out: &Output) -> Vec<(SocketAddr, u64)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("server ")?;
            let (addr, rest) = rest.split_once(": ")?;
            let pages = rest.split_whitespace().next()?.parse().ok()?;
            Some((addr.parse().ok()?, pages))
        })
        .collect()
}

fn check_ok(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verified)"),
        "demo failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_discovering_demo_finds_announced_lenders_and_puts_most_pages_on_the_nearest() {
    let Some(ns) = Netns::new("disc") else { return };
    let (lan, g5, wifi) = (announced(&ns, Some("lan")), announced(&ns, Some("5g-urllc")), announced(&ns, Some("wifi")));
    let out = demo(&ns, &["--size", "48MiB", "--local", "8MiB", "--random-reads", "2000"]).wait_with_output().unwrap();
    check_ok(&out);
    let held = pages_by_lender(&out);
    let of = |s: &ServerProcess| held.iter().find(|(a, _)| *a == s.addr).map(|&(_, n)| n);
    let (on_lan, on_5g, on_wifi) = (of(&lan), of(&g5), of(&wifi));
    assert!(on_lan.is_some() && on_5g.is_some() && on_wifi.is_some(), "not every lender was found: {held:?}");
    let total: u64 = held.iter().map(|&(_, n)| n).sum();
    assert!(on_lan.unwrap() * 100 >= total * 85 && on_wifi.unwrap() * 100 <= total, "{held:?}");
    drop((lan, g5, wifi));
}

#[test]
fn a_lender_announced_while_the_demo_runs_is_adopted_and_used() {
    let Some(ns) = Netns::new("adopt") else { return };
    // A LAN at 1 Gbit/s: filling 1 GiB takes at least 8.6 s.
    let first = announced(&ns, Some("delay=100us,bandwidth=1Gbit"));
    // Pages evicted after the late lender appears may go to it.
    let mut child = demo(&ns, &["--size", "1GiB", "--local", "8MiB", "--passes", "0", "--random-reads", "1000"]);
    // Once the demo's first wait is over (it logs what it found), while it fills: another
    // lender appears. The log is read on while the demo runs.
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut head = String::new();
    while !head.contains("lenders discovered") {
        assert!(log.read_line(&mut head).unwrap() > 0, "the demo ended before its first wait: {head}");
    }
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = log.read_to_string(&mut rest);
        rest
    });
    let late = announced(&ns, None);
    let out = child.wait_with_output().unwrap();
    let stderr = head + &reader.join().unwrap();
    let out = Output { stderr: stderr.clone().into_bytes(), ..out };
    check_ok(&out);
    assert!(stderr.contains("adopted a discovered lender"), "{stderr}");
    let held = pages_by_lender(&out);
    let on_late = held.iter().find(|(a, _)| *a == late.addr).map(|&(_, n)| n);
    assert!(on_late.is_some_and(|n| n > 0), "the late lender holds no page: {held:?}");
    eprintln!("pages by lender: {held:?}");
    drop((first, late));
}

#[test]
fn coalesce_lenders_lists_announced_lenders_nearest_first_with_their_weights() {
    let Some(ns) = Netns::new("table") else { return };
    let (wifi, lan) = (announced(&ns, Some("wifi")), announced(&ns, Some("lan")));
    let out = ns
        .command(env!("CARGO_BIN_EXE_coalesce"))
        .args(["lenders", "--discover", "--discover-wait", "1500ms", "--pings", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    // Nearest first, weight 1; the Wi-Fi lender (40-50 ms away) weighs about (0.5 / 40)^2.
    // Columns: address, class, rtt min, "us", rtt median, "us", weight, ...
    let weight = |row: &str| row.split_whitespace().nth(6).and_then(|w| w.parse::<f64>().ok()).unwrap();
    assert!(rows[0].starts_with(&lan.addr.to_string()) && weight(rows[0]) == 1.0, "{stdout}");
    assert!(rows[1].starts_with(&wifi.addr.to_string()) && weight(rows[1]) < 0.001, "{stdout}");
    assert!(rows.iter().all(|r| r.contains("edge") && r.contains("2048 MiB")), "{stdout}");
}
