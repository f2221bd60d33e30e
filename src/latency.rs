//! `coalesce latency`: measures the 4 KiB one-sided READ/WRITE round trip through the transport,
//! blocking and busy-polling, against a given, discovered or embedded loopback memory-server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdma::client::{ClientOptions, ControlClient};
use rdma::{
    CompletionStatus, EndpointOptions, LinkProfile, LocalRegion, LocalSlice, Opcode, PollMode, Segment, WorkRequest,
};

/// Most round trips per measurement (their timings are kept until the measurement ends, 16 bytes
/// each, so that nothing but the next request runs between a completion and the next post).
pub const MAX_OPS: usize = 10_000_000;

/// What to measure.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// Server to use; `None` starts one in this process on 127.0.0.1.
    pub server: Option<SocketAddr>,
    /// Round trips per measurement, 1 to [`MAX_OPS`].
    pub ops: usize,
    /// Bytes per request.
    pub size: usize,
    /// Link emulation.
    pub link: LinkProfile,
    /// Data-path provider.
    pub provider: rdma::ProviderKind,
    /// RDMA device for the verbs provider (`None`: the first one).
    pub device: Option<String>,
    /// The cluster key, for a lender that requires one (an embedded lender then does too).
    pub key: Option<rdma::secure::ClusterKey>,
    /// Every request goes to the slab's first `size` bytes, as perftest's `ib_read_lat` does;
    /// otherwise each goes to a random `size`-aligned place in the slab (as a pager's faults do).
    pub same_page: bool,
}

/// The lenders to measure: `server` (`None`: an embedded one) or, with `discover`, every lender
/// found within its wait plus `server`. Fails when discovery cannot start or finds none.
pub fn targets(
    server: Option<SocketAddr>,
    discover: Option<&(coalesce_pager::discover::Method, Duration)>,
) -> Result<Vec<Option<SocketAddr>>, String> {
    let Some((method, wait)) = discover else { return Ok(vec![server]) };
    let source = method.open().map_err(|e| e.to_string())?;
    let mut found: Vec<SocketAddr> = server.into_iter().collect();
    for ad in source.collect(*wait) {
        if !found.contains(&ad.addr) {
            found.push(ad.addr);
        }
    }
    if found.is_empty() {
        return Err(format!("no lender was found within {wait:?} ({method})"));
    }
    Ok(found.into_iter().map(Some).collect())
}

/// Figures of one measurement.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// What was measured.
    pub label: String,
    /// Shortest round trip (perftest's `t_min`: the path's cost without scheduling delays).
    pub min: Duration,
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Mean.
    pub mean: Duration,
    /// Largest.
    pub max: Duration,
    /// Operations.
    pub ops: u64,
}

impl std::fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<40} n={:<7} min {:>7.1} us   median {:>8.1} us   p99 {:>8.1} us   p99.9 {:>8.1} us   mean {:>8.1} us   max {:>9.1} us",
            self.label,
            self.ops,
            self.min.as_secs_f64() * 1e6,
            self.p50.as_secs_f64() * 1e6,
            self.p99.as_secs_f64() * 1e6,
            self.p999.as_secs_f64() * 1e6,
            self.mean.as_secs_f64() * 1e6,
            self.max.as_secs_f64() * 1e6
        )
    }
}

/// Error of a latency run.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    /// The embedded server failed to start.
    #[error(transparent)]
    Server(#[from] lender::ServerError),
    /// The control session failed.
    #[error(transparent)]
    Client(#[from] rdma::client::ClientError),
    /// The data path failed.
    #[error(transparent)]
    Transport(#[from] rdma::TransportError),
    /// A request did not complete successfully.
    #[error("a work request completed with {0:?}")]
    Failed(CompletionStatus),
    /// More round trips were asked for than a measurement keeps.
    #[error("--ops {0}: at most {MAX_OPS} round trips per measurement")]
    TooManyOps(usize),
    /// A request did not complete in time.
    #[error("a work request did not complete within 10 s")]
    Timeout,
}

/// Runs READ and WRITE round trips in blocking and spinning modes; returns one report per
/// combination.
pub fn run(opts: &LatencyOptions) -> Result<Vec<LatencyReport>, LatencyError> {
    if opts.ops > MAX_OPS {
        return Err(LatencyError::TooManyOps(opts.ops));
    }
    let embedded = match opts.server {
        Some(_) => None,
        None => Some(lender::start(lender::ServerConfig {
            provider: opts.provider,
            device: opts.device.clone(),
            key: opts.key.clone(),
            ..lender::ServerConfig::loopback()
        })?),
    };
    let addr = opts.server.or(embedded.as_ref().map(lender::ServerHandle::addr)).unwrap_or_else(|| {
        // Unreachable: one of the two is set above.
        SocketAddr::from(([127, 0, 0, 1], 7470))
    });
    let options = ClientOptions { provider: opts.provider, key: opts.key.clone(), ..ClientOptions::default() };
    let mut client = ControlClient::connect(addr, &options)?;
    let slab = client.alloc_slab()?;
    let ep = client.connect_endpoint(
        opts.provider,
        &EndpointOptions { link: opts.link.clone(), device: opts.device.clone(), ..EndpointOptions::default() },
    )?;
    let buf = LocalRegion::new(opts.size)?;
    let pages = (slab.len / opts.size as u64).max(1);
    let mut reports = Vec::new();
    for (opcode, op_name) in [(Opcode::Write, "WRITE"), (Opcode::Read, "READ")] {
        for (mode, mode_name) in [(PollMode::Block, "blocking"), (PollMode::Spin, "busy-poll")] {
            let label = format!(
                "{} {} {}{}",
                human(opts.size),
                op_name,
                mode_name,
                if opts.same_page { ", same page" } else { "" }
            );
            reports.push(measure(&ep, &buf, slab.addr, slab.rkey, pages, opcode, mode, opts, label)?);
        }
    }
    drop(ep);
    let _ = client.free_slab(slab.slab_id);
    if let Some(server) = embedded {
        server.shutdown();
    }
    Ok(reports)
}

fn human(size: usize) -> String {
    if size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    ep: &rdma::Endpoint,
    buf: &Arc<LocalRegion>,
    base: u64,
    rkey: u32,
    pages: u64,
    opcode: Opcode,
    mode: PollMode,
    opts: &LatencyOptions,
    label: String,
) -> Result<LatencyReport, LatencyError> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|_| LatencyError::Timeout)?;
    let warmup = (opts.ops / 10).max(10);
    let mut rng = fastrand::Rng::with_seed(42);
    let remote: Vec<u64> = (0..warmup + opts.ops)
        .map(|_| if opts.same_page { base } else { base + rng.u64(0..pages) * opts.size as u64 })
        .collect();
    // Everything a request needs is made before the loop, and the loop reads the clock once per
    // request: a round trip runs from the previous request's completion to this one's (perftest
    // times from post to post, the same span). Under Soft-RoCE in an emulated guest a READ takes
    // longer the later it is posted after the previous completion (the device's kernel worker has
    // gone idle), so work in between would be measured as the transport's.
    let mut wr = WorkRequest {
        wr_id: 0,
        opcode,
        segments: vec![Segment { local: LocalSlice::new(buf, 0, opts.size)?, remote_addr: base, rkey }],
    };
    let mut done = Vec::with_capacity(4);
    let mut samples = Vec::with_capacity(opts.ops);
    let mut start = Instant::now();
    for (i, &remote_addr) in remote.iter().enumerate() {
        wr.wr_id = i as u64;
        wr.segments[0].remote_addr = remote_addr;
        ep.post(&wr)?;
        done.clear();
        if ep.wait(&mut done, 1, Duration::from_secs(10), mode)? == 0 {
            return Err(LatencyError::Timeout);
        }
        let end = Instant::now();
        if done[0].status != CompletionStatus::Success {
            return Err(LatencyError::Failed(done[0].status));
        }
        if i >= warmup {
            samples.push(end - start);
        }
        start = end;
    }
    for rtt in samples {
        hist.saturating_record(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
    }
    let d = Duration::from_nanos;
    Ok(LatencyReport {
        label,
        min: d(hist.min()),
        p50: d(hist.value_at_quantile(0.5)),
        p99: d(hist.value_at_quantile(0.99)),
        p999: d(hist.value_at_quantile(0.999)),
        // Rounding the mean to whole nanoseconds is intended.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        mean: d(hist.mean() as u64),
        max: d(hist.max()),
        ops: hist.len(),
    })
}
