//! The preloaded library's configuration: every `COALESCE_*` variable of the environment (the
//! table in the crate docs), read and checked once at start-up, and the pager configuration
//! made from it. An unparsable value is an error naming the variable, never a silent default.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use coalesce_pager::PagerConfig;

/// What the environment asks for.
#[derive(Debug)]
pub(crate) struct Settings {
    servers: Vec<SocketAddr>,
    discovery: Option<coalesce_pager::discover::Method>,
    discovery_wait: Duration,
    local: usize,
    local_max: coalesce_pager::LocalMax,
    pub(crate) heap_size: usize,
    provider: rdma::ProviderKind,
    device: Option<String>,
    fetch_timeout: Duration,
    /// `None`: the pager's default.
    reply_spin: Option<Duration>,
    prefetch: bool,
    prefetch_ahead: bool,
    demand_first: bool,
    fault_threads: usize,
    trusted_lenders: bool,
    key: Option<rdma::secure::ClusterKey>,
    redundancy: Option<coalesce_pager::store::Redundancy>,
    /// `None`: the pager's default.
    repair_rate: Option<usize>,
    backup: Option<SocketAddr>,
    backup_lag: Duration,
    hedged_reads: bool,
    slo: Option<coalesce_pager::Slo>,
    pub(crate) mmap_min: Option<usize>,
    pub(crate) fork_max: ForkMax,
    history: usize,
    pub(crate) log: String,
}

/// How much of the heap a `fork` may bring back from the lenders (`COALESCE_FORK_MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForkMax {
    /// The memory the kernel says is available at the time of the fork (the default): a fork
    /// that would bring back more fails with `ENOMEM` instead of meeting the OOM killer.
    Available,
    /// At most this many bytes.
    Bytes(u64),
    /// No limit.
    Unlimited,
}

impl Settings {
    /// Reads the environment; `None` when it names no lender and no way to find one (the program
    /// then runs on plain local memory).
    pub(crate) fn from_env() -> Result<Option<Self>, String> {
        let discovery = discovery()?;
        let list = var("COALESCE_SERVERS");
        if list.is_none() && discovery.is_none() {
            return Ok(None);
        }
        let servers = list
            .iter()
            .flat_map(|l| l.split(','))
            .map(|s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("COALESCE_SERVERS entry {s:?} is not HOST:PORT: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            servers,
            discovery,
            discovery_wait: duration("COALESCE_DISCOVER_WAIT", "2s or 500ms")?.unwrap_or(Duration::from_secs(2)),
            local: size("COALESCE_LOCAL", "256MiB")?,
            local_max: parsed("COALESCE_LOCAL_MAX")?.unwrap_or(coalesce_pager::LocalMax::Default),
            heap_size: size("COALESCE_HEAP_SIZE", "16GiB")?,
            provider: parsed("COALESCE_PROVIDER")?.unwrap_or(rdma::ProviderKind::Shim),
            device: var("COALESCE_DEVICE"),
            fetch_timeout: duration("COALESCE_FETCH_TIMEOUT", "5s or 500ms")?.unwrap_or(Duration::from_secs(5)),
            reply_spin: duration("COALESCE_REPLY_SPIN", "200us or 0.1ms")?,
            prefetch: switch("COALESCE_PREFETCH", true)?,
            prefetch_ahead: switch("COALESCE_PREFETCH_AHEAD", true)?,
            demand_first: switch("COALESCE_DEMAND_FIRST", true)?,
            fault_threads: count("COALESCE_FAULT_THREADS", 1, 64, "a thread count")?
                .unwrap_or_else(default_fault_threads),
            trusted_lenders: switch("COALESCE_TRUSTED_LENDERS", false)?,
            key: var("COALESCE_KEY_FILE")
                .map(|path| rdma::secure::ClusterKey::from_file(std::path::Path::new(&path)))
                .transpose()
                .map_err(|e| format!("COALESCE_KEY_FILE: {e}"))?,
            redundancy: parsed("COALESCE_REDUNDANCY")?,
            repair_rate: var("COALESCE_REPAIR_RATE").map(|_| size("COALESCE_REPAIR_RATE", "0")).transpose()?,
            backup: var("COALESCE_BACKUP")
                .map(|a| {
                    a.trim()
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("COALESCE_BACKUP={a:?} is not an address like 10.0.0.9:7470: {e}"))
                })
                .transpose()?,
            backup_lag: duration("COALESCE_BACKUP_LAG", "1s or 200ms")?.unwrap_or(Duration::from_secs(1)),
            hedged_reads: switch("COALESCE_HEDGE", true)?,
            slo: parsed("COALESCE_SLO")?,
            mmap_min: mmap_min()?,
            fork_max: fork_max()?,
            history: count("COALESCE_HISTORY", 0, 1 << 24, "a record count")?.unwrap_or(0),
            log: var("COALESCE_LOG").unwrap_or_else(|| "warn".into()),
        }))
    }

    /// The pager's configuration (before this library adds its thread hook).
    pub(crate) fn pager_config(&self) -> PagerConfig {
        let mut config = PagerConfig::new(self.servers.clone(), self.local);
        config.local_max = self.local_max;
        config.provider = self.provider;
        config.device = self.device.clone();
        config.fetch_timeout = self.fetch_timeout;
        if let Some(spin) = self.reply_spin {
            config.reply_spin = spin;
        }
        config.prefetch = self.prefetch;
        config.prefetch_ahead = self.prefetch_ahead;
        config.demand_first = self.demand_first;
        config.fault_threads = self.fault_threads;
        config.history = self.history;
        config.trusted_lenders = self.trusted_lenders;
        config.key = self.key.clone();
        config.redundancy = self.redundancy;
        if let Some(rate) = self.repair_rate {
            config.repair_rate = rate;
        }
        config.backup = self.backup;
        config.backup_max_lag = self.backup_lag;
        config.hedged_reads = self.hedged_reads;
        config.slo = self.slo;
        config.discovery = self.discovery.clone();
        config.discovery_wait = self.discovery_wait;
        config
    }
}

/// A variable's value; unset and empty are the same.
pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A size such as `256MiB`; unset: `default`.
fn size(name: &str, default: &str) -> Result<usize, String> {
    let text = var(name).unwrap_or_else(|| default.into());
    let bytes: bytesize::ByteSize =
        text.trim().parse().map_err(|e| format!("{name}={text:?} is not a size like 256MiB: {e}"))?;
    usize::try_from(bytes.as_u64()).map_err(|_| format!("{name}={text:?} does not fit this machine"))
}

/// An on/off switch: `1`, `on`, `true`, `yes` or `0`, `off`, `false`, `no`; unset: `default`.
fn switch(name: &str, default: bool) -> Result<bool, String> {
    match var(name).as_deref().map(str::trim) {
        None => Ok(default),
        Some("1" | "on" | "true" | "yes") => Ok(true),
        Some("0" | "off" | "false" | "no") => Ok(false),
        Some(other) => Err(format!("{name}={other:?} is neither 1 nor 0")),
    }
}

/// A duration such as `200us`, `5ms` or `2s` (`example` in the error); unset: `None`.
fn duration(name: &str, example: &str) -> Result<Option<Duration>, String> {
    var(name)
        .map(|t| parse_duration(&t).ok_or_else(|| format!("{name}={t:?} is not a duration like {example}")))
        .transpose()
}

/// A value of a type that parses itself (its error says what is wrong); unset: `None`.
fn parsed<T: FromStr>(name: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    var(name).map(|v| v.trim().parse::<T>().map_err(|e| format!("{name}={v:?}: {e}"))).transpose()
}

/// A whole number from `min` to `max` (`what` it counts, in the error); unset: `None`.
fn count(name: &str, min: usize, max: usize, what: &str) -> Result<Option<usize>, String> {
    var(name)
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{name}={n:?} is not {what} from {min} to {max}"))
        })
        .transpose()
}

/// `COALESCE_DISCOVER` (mDNS) or `COALESCE_REGISTRY` (etcd), if either is set.
fn discovery() -> Result<Option<coalesce_pager::discover::Method>, String> {
    use coalesce_pager::discover::Method;
    let mdns = switch("COALESCE_DISCOVER", false)?;
    match var("COALESCE_REGISTRY") {
        Some(_) if mdns => Err("COALESCE_DISCOVER and COALESCE_REGISTRY are both set: choose one".into()),
        Some(r) => r.trim().parse().map(|r| Some(Method::Registry(r))).map_err(|e| format!("COALESCE_REGISTRY: {e}")),
        None => Ok(mdns.then_some(Method::Mdns)),
    }
}

fn fork_max() -> Result<ForkMax, String> {
    Ok(match var("COALESCE_FORK_MAX").as_deref().map(str::trim) {
        None | Some("available") => ForkMax::Available,
        Some("unlimited") => ForkMax::Unlimited,
        Some(_) => ForkMax::Bytes(size("COALESCE_FORK_MAX", "0")? as u64),
    })
}

/// `MemAvailable` of /proc/meminfo in bytes.
pub(crate) fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// `COALESCE_MMAP_MIN`: the smallest anonymous mapping served from the heap, or `off`.
fn mmap_min() -> Result<Option<usize>, String> {
    match var("COALESCE_MMAP_MIN").as_deref().map(str::trim) {
        Some("off" | "0" | "none") => Ok(None),
        Some(_) => {
            let min = size("COALESCE_MMAP_MIN", "")?;
            // Smaller than a page would serve the allocator's own metadata mappings.
            if min < crate::mappings::PAGE {
                return Err(format!("COALESCE_MMAP_MIN={min} is below a page (4096): give a size like 64KiB, or off"));
            }
            Ok(Some(min))
        }
        None => Ok(Some(crate::mapping_calls::DEFAULT_MIN_LEN)),
    }
}

/// Fault-handling threads when `COALESCE_FAULT_THREADS` is not set: 2 with 4 or more CPUs (a
/// second handler, for faults and the allocator's discards, then has a core to run on), else 1
/// (on 2 cores a second handler measured no faster: BENCHMARKS, "Many threads").
fn default_fault_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cpus >= 4 {
        2
    } else {
        1
    }
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us").or_else(|| s.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    // A value too large for a `Duration` is not a duration (no panic); `PagerConfig` refuses zero
    // and bounds the rest.
    (v.is_finite() && v >= 0.0).then(|| Duration::try_from_secs_f64(v * mult).ok()).flatten()
}
