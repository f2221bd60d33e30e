//! Pager settings ([`PagerConfig`]), their defaults and the ranges they are checked against.

use std::net::SocketAddr;
use std::time::Duration;

use rdma::{LinkProfile, ProviderKind};

use crate::{store, PagerError, PAGE_SIZE};

/// The largest prefetch window: with its faulting page, sealed (a segment per page and one per
/// trailer), it fits one request of at most `rdma::wire::MAX_SEGMENTS` (1024) segments.
pub const MAX_PREFETCH_WINDOW: usize = rdma::wire::MAX_SEGMENTS / 2 - 1;
const _: () = assert!((1 + MAX_PREFETCH_WINDOW) * 2 <= rdma::wire::MAX_SEGMENTS);

/// The longest fetch timeout accepted (a longer one is a typo, and deadlines must not overflow).
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(3600);

/// The highest background re-replication rate accepted, in bytes per second.
pub const MAX_REPAIR_RATE: usize = 64 << 30;

/// Pager settings.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Memory servers; pages are spread over all of them.
    pub servers: Vec<SocketAddr>,
    /// Find lenders besides `servers` (`None`, the default: only those): announced on the local
    /// network (mDNS) or registered in etcd. Those found within `discovery_wait` are used from the
    /// start, later ones adopted as they are announced (see [`crate::discover`]).
    pub discovery: Option<crate::discover::Method>,
    /// With `discovery`: how long [`crate::Pager::new`] waits for the first lenders (default 2 s,
    /// at most 10 minutes).
    pub discovery_wait: Duration,
    /// Data-path provider.
    pub provider: ProviderKind,
    /// RDMA device of the verbs provider (`None`: the first one).
    pub device: Option<String>,
    /// Local memory budget in bytes (resident pages of all regions together).
    pub local_budget: usize,
    /// How far past the budget pages may stay local when no lender can take them (see
    /// [`LocalMax`]; default: twice the budget).
    pub local_max: LocalMax,
    /// Fault-handling threads.
    pub fault_threads: usize,
    /// Evictor threads (1..=8; default 1). Each evicts batches on its own: while one waits for
    /// a write-back to complete, another moves pages out, so dirty pages leave faster (writing
    /// 1 GiB into a 256 MiB budget took about 25% less time with two than with one). But each
    /// scattered page an evictor moves out interrupts every CPU the program runs on, and two
    /// evictors do that twice as often: random reads over the same region took about 20% longer
    /// and their p99.9 went from about 0.5 ms to 4 ms (BENCHMARKS.md, "Streams at memory speed").
    /// Each costs a staging buffer of 512 pages.
    pub evictor_threads: usize,
    /// Prefetch along detected trends.
    pub prefetch: bool,
    /// Pages fetched ahead along a trend, in the same request as the faulting page (1..=256).
    /// The window a stream starts with; see `prefetch_window_max`.
    pub prefetch_window: usize,
    /// The window a confirmed stream grows to: it doubles every time the stream uses a whole
    /// window, up to this (at least `prefetch_window`, at most an eighth of the budget; default
    /// and largest 511, so that a window and its faulting page, sealed, fit one request: a
    /// segment per page and one per trailer, at most 1024). Costs `(1 + prefetch_window_max)`
    /// pages of staging per fault thread and for the prefetch-ahead thread.
    pub prefetch_window_max: usize,
    /// While a stream goes on, fetch the window after the one a fault fetches, on a thread of
    /// its own, so that the stream meets installed pages instead of a fault (default on; with
    /// `prefetch` only). Costs one more thread and its staging buffer.
    pub prefetch_ahead: bool,
    /// Demand faults first (default on; with `prefetch_ahead` only): while demand faults (in a
    /// region, continuing no stream) were served within the last 20 ms, a stream's fault in
    /// another region hands its window to the prefetch-ahead thread too and the fault handler
    /// fetches the faulting page alone ([`crate::PagerStats::windows_handed_ahead`]), so that a
    /// demand fault waits for one page of the stream's rather than a whole window (at LAN
    /// distance beside a stream: p50 0.63 ms instead of 2.2 ms, the stream 0.64x as fast;
    /// BENCHMARKS.md, "Demand faults first"). Off: the stream keeps its pace, and demand faults
    /// wait behind its windows.
    pub demand_first: bool,
    /// A fetch not completed within this time fails (the access gets SIGBUS).
    pub fetch_timeout: Duration,
    /// With copies on several lenders: a read whose pages all have another copy on a reachable
    /// lender waits this long (at most the fetch timeout) for a stalled lender, then reads the
    /// other copies, and a write-back waits this long, then keeps its pages local to write them
    /// to the lenders that answer. The stalled lender is tried again a second later and trusted
    /// again if it kept its session. Default 500 ms.
    pub failover_timeout: Duration,
    /// How long an idle handler thread polls before it sleeps in the kernel (yielding the CPU
    /// between polls to any thread that wants it).
    pub spin: Duration,
    /// How long a thread waiting for a lender's reply (a fault's read, a write-back) polls before
    /// it sleeps in the kernel (default 200 us, at most 1 s; on the shim it yields the CPU
    /// between polls, see [`rdma::PollMode::SpinThenBlock`]). A reply that comes while the
    /// thread sleeps costs a wake-up, slow on virtual machines: on a 2-vCPU test machine 200 us
    /// instead of 50 us lowered the faulted-read p99 by 13-26% in four of five alternated pairs
    /// (BENCHMARKS.md, "Spinning for the reply"). The price is CPU time, only while a reply is
    /// late.
    pub reply_spin: Duration,
    /// Link emulation on every data connection.
    pub link: LinkProfile,
    /// Client id presented to servers (`None`, the default: a fresh one from the OS CSPRNG for
    /// every lender).
    pub client_id: Option<u64>,
    /// Trust the lenders with plaintext: pages are not sealed (faster; a lender can then read
    /// every page and change one unnoticed). Default `false`: every page is sealed
    /// ([`store::SealedStore`]).
    pub trusted_lenders: bool,
    /// How pages are kept on distinct lenders: copies or erasure-coded shards (`None`:
    /// `replicate:2` from two lenders on, else one copy; see [`store::Redundancy`]).
    pub redundancy: Option<store::Redundancy>,
    /// With erasure coding (`ec:K+M`), shards read beyond the K a page needs (late binding: a
    /// fault uses the first K to arrive, so that many slow or failed lenders cost it nothing).
    /// 0 to M; default 1. Each costs a read of `1/K` of a page per fault (measured here with
    /// `ec:4+2`: 0 is about 7% faster at the median, and a stalled lender then costs the
    /// failover timeout).
    pub extra_shard_reads: usize,
    /// With copies (`replicate:N`): hedge reads, reading a page again from its next copy when the
    /// first lender has not answered within its recent 95th-percentile service time and taking
    /// the first answer. Default `true`; costs about 5% more reads and a copy of each page read.
    pub hedged_reads: bool,
    /// A service-level objective on remote-fault service time, e.g. `p99=500us` (`None`, the
    /// default: none). The pager counts the faults that meet it and, when a second's faults
    /// miss it, grows the local share toward the local maximum (see [`crate::slo`]); with
    /// copies, a read is hedged sooner than its lender's 95th percentile when a later hedge
    /// would answer past the target.
    pub slo: Option<crate::Slo>,
    /// A backup tier: a `memory-server --persist` to which every page the lenders take is
    /// written behind (see [`store::BackupStore`]). `None` (the default): no backup.
    pub backup: Option<std::net::SocketAddr>,
    /// How long a page may wait to be written behind (default 1 s).
    pub backup_max_lag: Duration,
    /// How many pages may wait to be written behind (default 4096, 16 MiB); a write-back waits
    /// for room past it.
    pub backup_max_lag_pages: usize,
    /// How often a checkpoint is made: every page written back before it is then in the backup
    /// and on its disk (default 10 s; [`crate::Pager::checkpoint`] makes one at once).
    pub backup_checkpoint_interval: Duration,
    /// The cluster key, for lenders that require one (`coalesce keygen`): connections
    /// authenticate with it and control traffic is encrypted.
    pub key: Option<rdma::secure::ClusterKey>,
    /// Bytes per second copied in the background to give pages back the copies a lost lender
    /// held (0: no background re-replication; pages of a group that lost a copy then get a new
    /// copy only as they pass through local memory). Default 256 MiB/s.
    pub repair_rate: usize,
    /// Keep a history of this many page-table transitions (0: none, the default). For finding
    /// races: see [`history`] and `coalesce stress`.
    pub history: usize,
    /// Called first thing on every thread the pager starts (the LD_PRELOAD allocator uses it to
    /// route those threads' allocations away from the heap the pager serves).
    pub thread_start: Option<fn()>,
}

impl PagerConfig {
    /// Defaults for `servers` and a budget: one fault thread, prefetch on with a 64-page window,
    /// 5 s fetch timeout, 50 us idle spin and 200 us spin for a reply, shim provider, no link
    /// emulation.
    pub fn new(servers: Vec<SocketAddr>, local_budget: usize) -> Self {
        Self {
            servers,
            discovery: None,
            discovery_wait: Duration::from_secs(2),
            provider: ProviderKind::Shim,
            device: None,
            local_budget,
            local_max: LocalMax::default(),
            fault_threads: 1,
            evictor_threads: 1,
            prefetch: true,
            prefetch_window: 64,
            prefetch_window_max: MAX_PREFETCH_WINDOW,
            prefetch_ahead: true,
            demand_first: true,
            fetch_timeout: Duration::from_secs(5),
            failover_timeout: Duration::from_millis(500),
            extra_shard_reads: 1,
            hedged_reads: true,
            slo: None,
            backup: None,
            backup_max_lag: Duration::from_secs(1),
            backup_max_lag_pages: 4096,
            backup_checkpoint_interval: Duration::from_secs(10),
            spin: Duration::from_micros(50),
            reply_spin: Duration::from_micros(200),
            link: LinkProfile::loopback(),
            client_id: None,
            trusted_lenders: false,
            redundancy: None,
            key: None,
            repair_rate: 256 << 20,
            history: 0,
            thread_start: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), PagerError> {
        if self.local_budget < 16 * PAGE_SIZE {
            return Err(PagerError::Config(format!(
                "local budget {} bytes is below the minimum of 16 pages (64 KiB)",
                self.local_budget
            )));
        }
        if let LocalMax::Bytes(max) = self.local_max {
            if max < self.local_budget {
                return Err(PagerError::Config(format!(
                    "local maximum {max} bytes is below the local budget of {} bytes: it must be at least the budget",
                    self.local_budget
                )));
            }
        }
        if self.fault_threads == 0 || self.fault_threads > 64 {
            return Err(PagerError::Config("fault_threads must be between 1 and 64".into()));
        }
        if self.evictor_threads == 0 || self.evictor_threads > 8 {
            return Err(PagerError::Config("evictor_threads must be between 1 and 8".into()));
        }
        if self.prefetch_window == 0 || self.prefetch_window > 256 {
            return Err(PagerError::Config("prefetch_window must be between 1 and 256 pages".into()));
        }
        if self.prefetch_window_max == 0 || self.prefetch_window_max > MAX_PREFETCH_WINDOW {
            return Err(PagerError::Config(format!(
                "prefetch_window_max must be between 1 and {MAX_PREFETCH_WINDOW} pages"
            )));
        }
        if self.history > 1 << 24 {
            return Err(PagerError::Config(format!(
                "history of {} records is above the maximum of 16,777,216 (40 bytes each)",
                self.history
            )));
        }
        if self.fetch_timeout.is_zero() || self.fetch_timeout > MAX_FETCH_TIMEOUT {
            return Err(PagerError::Config(format!(
                "fetch timeout {:?} is out of range: it must be positive and at most 1 hour",
                self.fetch_timeout
            )));
        }
        if self.failover_timeout.is_zero() || self.failover_timeout > MAX_FETCH_TIMEOUT {
            return Err(PagerError::Config(format!(
                "failover timeout {:?} is out of range: it must be positive and at most 1 hour",
                self.failover_timeout
            )));
        }
        if let Some(store::Redundancy::Erasure { parity, .. }) = self.redundancy {
            if self.extra_shard_reads > parity {
                return Err(PagerError::Config(format!(
                    "{} extra shard reads with {parity} parity shards: there are only {parity} shards beyond \
                     the ones a page needs",
                    self.extra_shard_reads
                )));
            }
        }
        if self.backup_max_lag.is_zero() || self.backup_max_lag > MAX_FETCH_TIMEOUT {
            return Err(PagerError::Config(format!(
                "backup lag {:?} is out of range: it must be positive and at most 1 hour",
                self.backup_max_lag
            )));
        }
        if self.backup_checkpoint_interval.is_zero() || self.backup_checkpoint_interval > MAX_FETCH_TIMEOUT {
            return Err(PagerError::Config(format!(
                "backup checkpoint interval {:?} is out of range: it must be positive and at most 1 hour",
                self.backup_checkpoint_interval
            )));
        }
        if self.backup_max_lag_pages == 0 || self.backup_max_lag_pages > 1 << 20 {
            return Err(PagerError::Config(format!(
                "backup lag of {} pages is out of range: 1 to 1048576",
                self.backup_max_lag_pages
            )));
        }
        if self.repair_rate > MAX_REPAIR_RATE {
            return Err(PagerError::Config(format!(
                "repair rate {} bytes/s is above the maximum of {MAX_REPAIR_RATE} (64 GiB/s); 0 turns it off",
                self.repair_rate
            )));
        }
        if self.discovery_wait > crate::discover::MAX_DISCOVERY_WAIT {
            return Err(PagerError::Config(format!(
                "discovery wait {:?} is above the maximum of 10 minutes",
                self.discovery_wait
            )));
        }
        if self.spin > Duration::from_secs(1) {
            return Err(PagerError::Config(format!("spin {:?} is above the maximum of 1 s", self.spin)));
        }
        if self.reply_spin > Duration::from_secs(1) {
            return Err(PagerError::Config(format!("reply spin {:?} is above the maximum of 1 s", self.reply_spin)));
        }
        if let Some(slo) = &self.slo {
            slo.validate().map_err(PagerError::Config)?;
        }
        Ok(())
    }
}

/// How many bytes may stay resident, at most, when no lender can take a page (all full or
/// down): the budget is then exceeded, best effort, up to this bound and no further. At the bound
/// an access that needs a new local page waits for room (a lender that frees space or comes back)
/// for up to the fetch timeout, then fails with SIGBUS and a log line; under the LD_PRELOAD
/// allocator, `malloc` fails with `ENOMEM` first.
///
/// Parsed from `unlimited`, `default` or a size such as `512MiB`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LocalMax {
    /// Twice the local budget.
    #[default]
    Default,
    /// This many bytes (at least the budget).
    Bytes(usize),
    /// No bound: pages stay local as long as no lender takes them (the OOM killer decides).
    Unlimited,
}

impl LocalMax {
    /// The bound in pages for a budget of `budget` pages.
    pub fn pages(self, budget: usize) -> usize {
        match self {
            Self::Default => budget.saturating_mul(2),
            Self::Bytes(b) => (b / PAGE_SIZE).max(budget),
            Self::Unlimited => usize::MAX,
        }
    }
}

impl std::str::FromStr for LocalMax {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "unlimited" => Ok(Self::Unlimited),
            "default" => Ok(Self::Default),
            other => {
                let bytes: bytesize::ByteSize = other.parse().map_err(|e| {
                    format!("{other:?} is not a size like 512MiB, nor \"unlimited\" or \"default\": {e}")
                })?;
                usize::try_from(bytes.as_u64())
                    .map(Self::Bytes)
                    .map_err(|_| format!("{other:?} does not fit this machine's address space"))
            }
        }
    }
}

impl std::fmt::Display for LocalMax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Bytes(b) => write!(f, "{b}"),
            Self::Unlimited => f.write_str("unlimited"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_max_parses_and_bounds() {
        assert_eq!("unlimited".parse::<LocalMax>(), Ok(LocalMax::Unlimited));
        assert_eq!("1MiB".parse::<LocalMax>(), Ok(LocalMax::Bytes(1 << 20)));
        assert!("lots".parse::<LocalMax>().expect_err("not a size").contains("not a size"));
        assert_eq!(LocalMax::Default.pages(100), 200);
        assert_eq!(LocalMax::Bytes(1 << 20).pages(100), 256);
        assert_eq!(LocalMax::Bytes(4096).pages(100), 100);
        let mut c = PagerConfig::new(Vec::new(), 1 << 20);
        c.local_max = LocalMax::Bytes(1 << 19);
        assert!(c.validate().expect_err("below the budget").to_string().contains("below the local budget"));
    }

    #[test]
    fn the_largest_prefetch_window_is_the_default_and_fits_one_sealed_request() {
        let mut c = PagerConfig::new(Vec::new(), 1 << 30);
        assert_eq!(c.prefetch_window_max, MAX_PREFETCH_WINDOW);
        assert!(c.validate().is_ok());
        c.prefetch_window_max = MAX_PREFETCH_WINDOW + 1;
        let e = c.validate().expect_err("past the largest window").to_string();
        assert!(e.contains("prefetch_window_max must be between 1 and 511"), "{e}");
    }

    #[test]
    fn evictor_threads_are_one_by_default_and_bounded() {
        let mut c = PagerConfig::new(Vec::new(), 1 << 30);
        assert_eq!(c.evictor_threads, 1);
        for bad in [0, 9] {
            c.evictor_threads = bad;
            let e = c.validate().expect_err("out of range").to_string();
            assert!(e.contains("evictor_threads must be between 1 and 8"), "{e}");
        }
        c.evictor_threads = 8;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_reply_is_spun_for_longer_than_an_idle_handler_and_both_spins_are_bounded() {
        let mut c = PagerConfig::new(Vec::new(), 1 << 30);
        assert_eq!((c.spin, c.reply_spin), (Duration::from_micros(50), Duration::from_micros(200)));
        c.reply_spin = Duration::from_secs(2);
        let e = c.validate().expect_err("a two-second spin").to_string();
        assert!(e.contains("reply spin 2s is above the maximum of 1 s"), "{e}");
        c.reply_spin = Duration::ZERO;
        assert!(c.validate().is_ok(), "zero: sleep at once");
    }
}
