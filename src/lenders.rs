//! `coalesce lenders`: the lenders this machine can see (named with --servers, or announced on
//! the local network and found with --discover), each measured the way a pager measures it:
//! control round trips (min and median), the placement weight they give, and what the lender
//! says of itself (free capacity, slabs lent, sessions), as `ip neigh` or `consul members` show
//! their tables.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdma::client::{ClientOptions, ControlClient};
use rdma::ProviderKind;

/// What to survey.
#[derive(Debug, Clone)]
pub struct LendersOptions {
    /// Lenders named on the command line.
    pub servers: Vec<SocketAddr>,
    /// Look for lenders (mDNS or a registry) this long (`None`: do not).
    pub discover: Option<(coalesce_pager::discover::Method, Duration)>,
    /// Data-path provider to say hello with.
    pub provider: ProviderKind,
    /// The cluster key, for lenders that require one.
    pub key: Option<rdma::secure::ClusterKey>,
    /// Round trips measured per lender.
    pub pings: usize,
}

/// One lender as surveyed.
#[derive(Debug, Clone)]
pub struct LenderRow {
    /// Its address.
    pub addr: SocketAddr,
    /// Its class, when it announced one.
    pub class: Option<String>,
    /// Smallest and median control round trip (`None`: unreachable).
    pub rtt: Option<(Duration, Duration)>,
    /// The placement weight a pager would give it among these lenders.
    pub weight: f64,
    /// Free capacity in bytes (from its statistics).
    pub free: Option<u64>,
    /// Bytes it lends now, to every client.
    pub lent: Option<u64>,
    /// Its live sessions.
    pub sessions: Option<u64>,
    /// Why it could not be measured.
    pub error: Option<String>,
}

/// Finds and measures the lenders.
pub fn survey(opts: &LendersOptions) -> Result<Vec<LenderRow>, discovery::DiscoveryError> {
    let mut found: Vec<(SocketAddr, Option<String>)> = opts.servers.iter().map(|&a| (a, None)).collect();
    if let Some((how, wait)) = &opts.discover {
        let source = how.open()?;
        for ad in source.collect(*wait) {
            match found.iter_mut().find(|(a, _)| *a == ad.addr) {
                Some(entry) => entry.1 = Some(ad.class),
                None => found.push((ad.addr, Some(ad.class))),
            }
        }
    }
    let mut rows: Vec<LenderRow> = found.into_iter().map(|(addr, class)| measure(addr, class, opts)).collect();
    let nearest = rows.iter().filter_map(|r| r.rtt.map(|(min, _)| min)).min();
    for r in &mut rows {
        r.weight = r.rtt.map_or(0.0, |(min, _)| coalesce_pager::store::proximity_weight(Some(min), nearest));
    }
    rows.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.addr.cmp(&b.addr)));
    Ok(rows)
}

fn measure(addr: SocketAddr, class: Option<String>, opts: &LendersOptions) -> LenderRow {
    let mut row =
        LenderRow { addr, class, rtt: None, weight: 0.0, free: None, lent: None, sessions: None, error: None };
    let client = ClientOptions { provider: opts.provider, key: opts.key.clone(), ..ClientOptions::default() };
    let mut control = match ControlClient::connect(addr, &client) {
        Ok(c) => c,
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    let mut samples = Vec::with_capacity(opts.pings);
    for _ in 0..opts.pings.max(1) {
        let t = Instant::now();
        if let Err(e) = control.heartbeat() {
            row.error = Some(e.to_string());
            return row;
        }
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    row.rtt = Some((samples[0], samples[(samples.len() - 1) / 2]));
    match control.stats() {
        Ok(s) => {
            row.free = Some(s.capacity.saturating_sub(s.allocated));
            row.lent = Some(s.allocated);
            // Our own survey session counts too.
            row.sessions = Some(s.sessions.saturating_sub(1));
        }
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

/// Prints the table.
pub fn print(rows: &[LenderRow]) {
    let mib = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |b| format!("{} MiB", b >> 20));
    let us = |t: Duration| format!("{} us", t.as_micros());
    println!(
        "{:<22} {:<8} {:>10} {:>10} {:>8} {:>12} {:>12} {:>8}",
        "LENDER", "CLASS", "RTT MIN", "RTT MED", "WEIGHT", "FREE", "LENT", "CLIENTS"
    );
    for r in rows {
        let (min, med) = r.rtt.map_or(("-".to_owned(), "-".to_owned()), |(a, b)| (us(a), us(b)));
        println!(
            "{:<22} {:<8} {:>10} {:>10} {:>8.4} {:>12} {:>12} {:>8}",
            r.addr.to_string(),
            r.class.as_deref().unwrap_or("-"),
            min,
            med,
            r.weight,
            mib(r.free),
            mib(r.lent),
            r.sessions.map_or_else(|| "-".to_owned(), |s| s.to_string())
        );
        if let Some(e) = &r.error {
            println!("  {}: {e}", r.addr);
        }
    }
}
