//! `coalesce demo`: maps a region bigger than the local budget over (by default) an embedded
//! loopback memory-server, writes a checkable pattern, reads it back sequentially and randomly with
//! verification, and reports faults, evictions, latencies, throughput and residency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coalesce_pager::{Pager, PagerConfig, PagerStats, RegionOptions, PAGE_SIZE};
use rdma::{LinkProfile, ProviderKind};

use crate::workload::{self, Corrupt, WorkloadOptions};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Region size in bytes.
    pub size: usize,
    /// Local budget in bytes.
    pub local: usize,
    /// How far past the budget pages may stay local when no lender takes them.
    pub local_max: coalesce_pager::LocalMax,
    /// Servers; empty starts an embedded one on 127.0.0.1.
    pub servers: Vec<SocketAddr>,
    /// Data-path provider.
    pub provider: ProviderKind,
    /// RDMA device for the verbs provider (`None`: the first one).
    pub device: Option<String>,
    /// Link emulation.
    pub link: LinkProfile,
    /// Sequential read passes.
    pub passes: usize,
    /// Random 8-byte reads.
    pub random_reads: usize,
    /// Prefetch on.
    pub prefetch: bool,
    /// Fetch the next window of a stream ahead, meanwhile (`PagerConfig::prefetch_ahead`).
    pub prefetch_ahead: bool,
    /// Demand faults first (`PagerConfig::demand_first`).
    pub demand_first: bool,
    /// Fault-handling threads.
    pub fault_threads: usize,
    /// Prefetch window in pages.
    pub prefetch_window: usize,
    /// Page-table transitions kept to explain a wrong word (0: none).
    pub history: usize,
    /// Pages travel and rest in plaintext (no sealing).
    pub trusted_lenders: bool,
    /// The cluster key, for lenders that require one (an embedded lender then does too).
    pub key: Option<rdma::secure::ClusterKey>,
    /// Copies or shards of each page (`None`: the pager's default for the number of lenders).
    pub redundancy: Option<coalesce_pager::store::Redundancy>,
    /// Background re-replication rate in bytes per second (0: off).
    pub repair_rate: usize,
    /// The backup tier (`--backup`), if any.
    pub backup: Option<std::net::SocketAddr>,
    /// The longest a page waits to be written behind.
    pub backup_lag: std::time::Duration,
    /// Hedged reads of replicated pages.
    pub hedged_reads: bool,
    /// A service-level objective on remote-fault service time.
    pub slo: Option<coalesce_pager::Slo>,
    /// Find lenders (`--discover` on the local network, or `--registry`): wait this long for
    /// the first ones, then adopt any announced while the demo runs.
    pub discover: Option<(coalesce_pager::discover::Method, Duration)>,
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded server failed.
    #[error(transparent)]
    Server(#[from] lender::ServerError),
    /// The pager failed.
    #[error(transparent)]
    Pager(#[from] coalesce_pager::PagerError),
    /// Data read back differs from what was written: a bug, reported loudly.
    #[error(transparent)]
    Corrupt(#[from] Corrupt),
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

impl DemoError {
    /// True when the error is that the verbs provider is missing (no build support, library or
    /// device): the case `--fallback-to-shim` covers.
    pub fn is_provider_unavailable(&self) -> bool {
        let unavailable = |e: &rdma::TransportError| matches!(e, rdma::TransportError::ProviderUnavailable { .. });
        match self {
            DemoError::Server(lender::ServerError::Verbs(e)) => unavailable(e),
            DemoError::Pager(coalesce_pager::PagerError::Transport { source, .. }) => unavailable(source),
            _ => false,
        }
    }
}

/// Figures of one demo run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Time to write the pattern.
    pub fill: Duration,
    /// Time of each sequential pass.
    pub passes: Vec<Duration>,
    /// Time of the random phase.
    pub random: Duration,
    /// Random reads done.
    pub random_reads: usize,
    /// App-observed latency of random reads that missed locally (> 2 us): p50, p99, p99.9, count.
    pub random_fault_latency: (Duration, Duration, Duration, u64),
    /// Most region pages resident at once (sampled with mincore, see [`SAMPLER_DUTY`]).
    pub max_resident_pages: usize,
    /// How many residency samples were taken.
    pub resident_samples: usize,
    /// Pager statistics at the end.
    pub stats: PagerStats,
    /// Pages per server at the end.
    pub lenders: Vec<coalesce_pager::store::LenderInfo>,
}

/// The residency sampler waits this many times as long as its last `mincore` took (at least
/// 5 ms) before the next: one pass over a large region costs a few hundred microseconds, and
/// sampling every 5 ms regardless took about 7% of this machine's two cores and doubled the random
/// reads' p99 it was there to watch.
const SAMPLER_DUTY: u32 = 50;

/// Samples how many pages of `[base, base + len)` are resident, without touching them.
fn resident_pages(base: usize, len: usize, vec: &mut [u8]) -> usize {
    // SAFETY: mincore only reads page-table state of our own mapping (which stays mapped while the
    // sampler runs: it is stopped before the region is dropped) and writes one byte per page into
    // `vec`, which has exactly that many bytes.
    let rc = unsafe { libc::mincore(base as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// The pager's configuration for the demo's options, over `servers`.
fn pager_config(opts: &DemoOptions, servers: Vec<std::net::SocketAddr>) -> PagerConfig {
    let mut config = PagerConfig::new(servers, opts.local);
    config.local_max = opts.local_max;
    config.provider = opts.provider;
    config.device = opts.device.clone();
    config.link = opts.link.clone();
    config.prefetch = opts.prefetch;
    config.prefetch_ahead = opts.prefetch_ahead;
    config.demand_first = opts.demand_first;
    config.fault_threads = opts.fault_threads;
    config.prefetch_window = opts.prefetch_window;
    config.history = opts.history;
    config.trusted_lenders = opts.trusted_lenders;
    config.key = opts.key.clone();
    config.redundancy = opts.redundancy;
    config.repair_rate = opts.repair_rate;
    config.backup = opts.backup;
    config.backup_max_lag = opts.backup_lag;
    config.hedged_reads = opts.hedged_reads;
    config.slo = opts.slo;
    if let Some((method, wait)) = &opts.discover {
        config.discovery = Some(method.clone());
        config.discovery_wait = *wait;
    }
    config
}

/// Samples the region's resident pages (`mincore`) until `stop`, keeping the largest count in
/// `max_resident`, at a pace that keeps its own cost small; returns how many samples it took.
fn start_sampler(
    region: &coalesce_pager::Region<'_>,
    stop: Arc<AtomicBool>,
    max_resident: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    let (base, len) = (region.as_ptr() as usize, region.len());
    let pages = len / PAGE_SIZE;
    std::thread::spawn(move || {
        let mut vec = vec![0u8; pages];
        let mut samples = 0usize;
        while !stop.load(Ordering::Acquire) {
            let started = Instant::now();
            max_resident.fetch_max(resident_pages(base, len, &mut vec), Ordering::Relaxed);
            samples += 1;
            let pause = (started.elapsed() * SAMPLER_DUTY).clamp(Duration::from_millis(5), Duration::from_millis(100));
            std::thread::sleep(pause);
        }
        samples
    })
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    if opts.size < PAGE_SIZE * 16 || opts.local < PAGE_SIZE * 16 {
        return Err(DemoError::Options("--size and --local must be at least 64 KiB".into()));
    }
    let servers = opts.servers.clone();
    let embedded = if servers.is_empty() && opts.discover.is_none() {
        let capacity = (opts.size as u64 * 2).max(256 << 20);
        let config = lender::ServerConfig {
            provider: opts.provider,
            device: opts.device.clone(),
            key: opts.key.clone(),
            ..lender::ServerConfig::embedded(capacity)
        };
        Some(lender::start(config)?)
    } else {
        None
    };
    let servers = match &embedded {
        Some(s) => vec![s.addr()],
        None => servers,
    };
    let config = pager_config(opts, servers);
    let pager = Pager::new(config)?;
    let mut region = pager.map(opts.size, RegionOptions::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let max_resident = Arc::new(AtomicUsize::new(0));
    let sampler = start_sampler(&region, Arc::clone(&stop), Arc::clone(&max_resident));

    let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
    let workload = WorkloadOptions { passes: opts.passes, random_reads: opts.random_reads, progress: true };
    let result = workload::run(words, &workload);
    stop.store(true, Ordering::Release);
    let resident_samples = sampler.join().unwrap_or(0);
    if let Err(corrupt) = &result {
        let (history, now) = region.page_history(corrupt.offset);
        if !history.is_empty() {
            eprintln!("history of page {} (entry now {now}):", corrupt.offset / PAGE_SIZE);
            for r in history {
                eprintln!("  {r}");
            }
        }
    }
    let result = result?;
    let hist = &result.faulted;
    let q = |x: f64| if hist.is_empty() { Duration::ZERO } else { Duration::from_nanos(hist.value_at_quantile(x)) };
    let report = DemoReport {
        fill: result.fill,
        passes: result.passes.clone(),
        random: result.random,
        random_reads: opts.random_reads,
        random_fault_latency: (q(0.5), q(0.99), q(0.999), hist.len()),
        max_resident_pages: max_resident.load(Ordering::Relaxed),
        resident_samples,
        stats: pager.stats(),
        lenders: pager.lenders(),
    };
    drop(region);
    drop(pager);
    if let Some(s) = embedded {
        s.shutdown();
    }
    Ok(report)
}

impl DemoReport {
    /// Prints the summary.
    pub fn print(&self, opts: &DemoOptions) {
        let mib = |b: usize| {
            #[allow(clippy::cast_precision_loss)]
            let m = b as f64 / 1048576.0;
            m
        };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "region {:.0} MiB, local budget {:.0} MiB (1/{:.0}), link {}",
            mib(opts.size),
            mib(opts.local),
            mib(opts.size) / mib(opts.local),
            opts.link.name
        );
        println!(
            "fill (write pattern)      {:>8.3} s  {:>8.0} MiB/s",
            self.fill.as_secs_f64(),
            mib(opts.size) / self.fill.as_secs_f64()
        );
        for (i, p) in self.passes.iter().enumerate() {
            println!(
                "sequential read pass {}   {:>8.3} s  {:>8.0} MiB/s  (verified)",
                i + 1,
                p.as_secs_f64(),
                mib(opts.size) / p.as_secs_f64()
            );
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = self.random_reads as f64 / self.random.as_secs_f64();
        println!(
            "random 8-byte reads       {:>8.3} s  {:>8.0} reads/s ({} reads, verified)",
            self.random.as_secs_f64(),
            rate,
            self.random_reads
        );
        let (p50, p99, p999, count) = self.random_fault_latency;
        println!(
            "random reads that faulted: {count}, app-observed latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            us(p50),
            us(p99),
            us(p999)
        );
        let slack = self.max_resident_pages.saturating_sub(usize::try_from(self.stats.budget_pages).unwrap_or(0));
        println!(
            "region resident (mincore, {} samples): max {} pages = {:.1} MiB; budget {} pages; above budget: {} pages",
            self.resident_samples,
            self.max_resident_pages,
            mib(self.max_resident_pages * PAGE_SIZE),
            self.stats.budget_pages,
            slack
        );
        for l in &self.lenders {
            let us =
                |t: Option<std::time::Duration>| t.map_or_else(|| "-".to_owned(), |t| format!("{} us", t.as_micros()));
            println!(
                "server {}: {} pages{} (rtt min {}, median {}, weight {:.4})",
                l.addr,
                l.pages,
                if l.alive { "" } else { " (failed)" },
                us(l.rtt_min),
                us(l.rtt_median),
                l.weight
            );
        }
        println!("{}", self.stats);
    }
}
