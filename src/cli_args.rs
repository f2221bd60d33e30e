//! The `coalesce` command's arguments, as clap parses them: one struct per subcommand, and the
//! groups several share (where lenders are found, how pages are kept). Part of the binary, not of
//! the library; `main.rs` runs the commands.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use coalesce::bench;
use rdma::{LinkProfile, ProviderKind};

#[derive(Debug, Parser)]
#[command(name = "coalesce", version, about = "Borrow memory from nearby machines: tools for Coalesce")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run an unmodified program with its heap on borrowed memory (LD_PRELOAD of libcoalesce.so).
    ///
    /// Forwards the program's exit status (128 + signal if it was killed) and prints the pager's
    /// statistics, the run time and the peak resident memory on exit. Starts no server unless
    /// --embedded-server is given; with no server at all the program runs on plain local memory.
    Run(RunArgs),
    /// Compare with Linux swap: one workload run in local memory, under swap (cgroup limit plus a
    /// temporary swapfile; root only) and on Coalesce, with the same local budget. Prints a table,
    /// writes CSV and an SVG chart.
    Bench(BenchArgs),
    /// Internal: one run of the bench workload (started by `coalesce bench`).
    #[command(hide = true)]
    BenchWorker(BenchWorkerArgs),
    /// Borrow memory end to end: map a region bigger than the local budget, write a pattern, read it
    /// back sequentially and randomly with verification, and print what the pager did.
    ///
    /// Without --servers, starts a memory-server inside this process on 127.0.0.1.
    Demo(DemoArgs),
    /// The contended stress harness: application threads fill a region bigger than the local
    /// budget, then check and rewrite whole pages at random and in sequential runs, with CPU hogs
    /// on every core, over a matrix of budgets and fault-thread counts. Stops at the first wrong
    /// word and prints the page's history (every page-table transition and the thread that made
    /// it). Exit status 0: no wrong word; 1: a wrong word (the report says which); 2: set-up error.
    ///
    /// Without --servers, starts a memory-server inside this process on 127.0.0.1.
    Stress(StressArgs),
    /// Make a cluster key: 32 random bytes as 64 hex digits in FILE (mode 600; an existing file is
    /// never overwritten). Give the same file to every lender (`memory-server --key-file`) and
    /// borrower (`--key-file`, `COALESCE_KEY_FILE`) of the cluster.
    Keygen(KeygenArgs),
    /// The lenders this machine can see: named with --servers and/or announced on the local
    /// network (--discover), each with its class, control round trip (min, median), the
    /// placement weight a pager would give it, free capacity, memory lent and clients.
    Lenders(LendersArgs),
    /// Measure one-sided READ and WRITE round trips (minimum, median, p99, p99.9), blocking and busy-polling.
    ///
    /// Without --server, --discover or --registry, starts a memory-server inside this process on
    /// 127.0.0.1. With --discover or --registry, measures every lender found (and --server).
    Latency(LatencyArgs),
}

/// The arguments of `coalesce run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// memory-servers, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    /// Start a memory-server on 127.0.0.1 inside this command for the run.
    #[arg(long)]
    pub(crate) embedded_server: bool,
    /// Local memory budget of the program's heap.
    #[arg(long, default_value = "256MiB")]
    pub(crate) local: ByteSize,
    /// When no lender can take a page (all full or down), pages stay local past the budget up
    /// to this size and no further (a size, `default`: twice the budget, or `unlimited`).
    #[arg(long, default_value = "default")]
    pub(crate) local_max: coalesce_pager::LocalMax,
    /// Heap size limit (allocations beyond it fail with ENOMEM).
    #[arg(long, default_value = "16GiB")]
    pub(crate) heap_size: ByteSize,
    /// Data-path provider: shim or verbs.
    #[arg(long, default_value = "shim")]
    pub(crate) provider: ProviderKind,
    /// Do not print statistics on exit.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Fault-handling threads of each process (1 to 64; `COALESCE_FAULT_THREADS`). Default: 2
    /// on machines with 4 or more CPUs, else 1.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub(crate) fault_threads: Option<u8>,
    /// A service-level objective on remote-fault service time, e.g. p99=500us: when a
    /// second's faults miss it, the local share grows (up to --local-max), and replicated
    /// reads are hedged soon enough for the other copy to answer within it; the statistics
    /// say what share of faults met it.
    #[arg(long)]
    pub(crate) slo: Option<coalesce_pager::Slo>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
    #[command(flatten)]
    pub(crate) lenders: LenderChoices,
    /// The program and its arguments (after --).
    #[arg(trailing_var_arg = true, required = true)]
    pub(crate) command: Vec<std::ffi::OsString>,
}

/// The arguments of `coalesce bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Working set.
    #[arg(long, default_value = "1GiB")]
    pub(crate) size: ByteSize,
    /// Local memory (cgroup limit for swap, pager budget for Coalesce).
    #[arg(long, default_value = "256MiB")]
    pub(crate) local: ByteSize,
    /// Sequential passes.
    #[arg(long, default_value_t = 3)]
    pub(crate) passes: usize,
    /// Random 8-byte reads.
    #[arg(long, default_value_t = 786_432)]
    pub(crate) random_reads: usize,
    /// Swapfile to create (and remove) for the swap run.
    #[arg(long, default_value = "/var/tmp/coalesce-bench.swap")]
    pub(crate) swapfile: PathBuf,
    /// CSV output.
    #[arg(long, default_value = "coalesce-bench.csv")]
    pub(crate) csv: PathBuf,
    /// SVG chart output.
    #[arg(long, default_value = "coalesce-bench.svg")]
    pub(crate) chart: PathBuf,
    /// Trust the lenders with plaintext pages (faster; by default every page is sealed:
    /// encrypted and authenticated before it leaves this machine).
    #[arg(long)]
    pub(crate) trusted_lenders: bool,
    /// How the Coalesce run keeps pages: none, replicate:N or ec:K+M; without --servers,
    /// --discover or --registry it starts as many embedded lenders on 127.0.0.1 as the choice
    /// needs (one for none).
    #[arg(long, default_value = "none")]
    pub(crate) redundancy: coalesce_pager::store::Redundancy,
    /// memory-servers for the Coalesce run, comma-separated (default: embedded ones).
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
}

/// The arguments of `coalesce bench-worker`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchWorkerArgs {
    #[arg(long, value_enum)]
    pub(crate) mode: bench::Mode,
    #[arg(long)]
    pub(crate) size: usize,
    #[arg(long)]
    pub(crate) local: usize,
    #[arg(long)]
    pub(crate) passes: usize,
    #[arg(long)]
    pub(crate) random_reads: usize,
    #[arg(long)]
    pub(crate) trusted_lenders: bool,
    #[arg(long, default_value = "none")]
    pub(crate) redundancy: coalesce_pager::store::Redundancy,
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
}

/// The arguments of `coalesce demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Region size.
    #[arg(long, default_value = "1GiB")]
    pub(crate) size: ByteSize,
    /// Local memory budget.
    #[arg(long, default_value = "128MiB")]
    pub(crate) local: ByteSize,
    /// When no lender can take a page (all full or down), pages stay local past the budget up
    /// to this size and no further (a size, `default`: twice the budget, or `unlimited`).
    #[arg(long, default_value = "default")]
    pub(crate) local_max: coalesce_pager::LocalMax,
    /// memory-servers to use, comma-separated (default: an embedded one on loopback).
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    /// Data-path provider: shim or verbs.
    #[arg(long, default_value = "shim")]
    pub(crate) provider: ProviderKind,
    /// RDMA device for --provider verbs, e.g. rxe0 (default: the first device).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// With --provider verbs: if this build, host or device has no verbs, say so and run on the
    /// shim instead of failing.
    #[arg(long)]
    pub(crate) fallback_to_shim: bool,
    /// Link emulation: loopback, lan, 5g-urllc, wifi, or e.g. delay=1ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%.
    #[arg(long, default_value = "loopback")]
    pub(crate) link: LinkProfile,
    /// Sequential read passes.
    #[arg(long, default_value_t = 1)]
    pub(crate) passes: usize,
    /// Random 8-byte reads.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) random_reads: usize,
    /// Turn prefetch off.
    #[arg(long)]
    pub(crate) no_prefetch: bool,
    /// Fetch only the window a fault asks for, not also the next one ahead of a stream (on a
    /// thread of its own) while the program reads it.
    #[arg(long)]
    pub(crate) no_prefetch_ahead: bool,
    /// Let a stream's faults fetch their window even while other regions take demand faults
    /// (which then wait behind it); by default the window goes to the prefetch-ahead thread then.
    #[arg(long)]
    pub(crate) no_demand_first: bool,
    /// Fault-handling threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) fault_threads: usize,
    /// Pages fetched ahead along a detected trend at first (1..=256); a stream that uses its
    /// whole window gets twice as many next time, up to 256.
    #[arg(long, default_value_t = 64)]
    pub(crate) prefetch_window: usize,
    /// Keep this many page-table transitions and print the history of a page that fails
    /// verification (40 bytes each; 0: off).
    #[arg(long, default_value_t = 0)]
    pub(crate) history: usize,
    /// A service-level objective on remote-fault service time, e.g. p99=500us: when a
    /// second's faults miss it, the local share grows (up to --local-max), and replicated
    /// reads are hedged soon enough for the other copy to answer within it; the statistics
    /// say what share of faults met it.
    #[arg(long)]
    pub(crate) slo: Option<coalesce_pager::Slo>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
    #[command(flatten)]
    pub(crate) lenders: LenderChoices,
}

/// The arguments of `coalesce stress`.
#[derive(Debug, clap::Args)]
pub(crate) struct StressArgs {
    /// Region size.
    #[arg(long, default_value = "256MiB")]
    pub(crate) size: ByteSize,
    /// Local budgets to run, as fractions of the region, comma-separated (8 = 1/8).
    #[arg(long, value_delimiter = ',', default_value = "8,16")]
    pub(crate) fractions: Vec<usize>,
    /// Fault-thread counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) fault_threads: Vec<usize>,
    /// Evictor threads in every configuration (1..=8).
    #[arg(long, default_value_t = 1)]
    pub(crate) evictor_threads: usize,
    /// Application threads.
    #[arg(long, default_value_t = 4)]
    pub(crate) app_threads: usize,
    /// Total run time, shared by the configurations of the matrix.
    #[arg(long, default_value = "60s")]
    pub(crate) duration: humantime::Duration,
    /// CPU hog threads (default: one per core).
    #[arg(long)]
    pub(crate) hogs: Option<usize>,
    /// Percentage of page accesses that rewrite the page.
    #[arg(long, default_value_t = 30)]
    pub(crate) writes: u32,
    /// Seed of the access pattern (default: random, printed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// memory-servers to use, comma-separated (default: an embedded one on loopback).
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    /// Page-table transitions kept for the report (40 bytes each).
    #[arg(long, default_value_t = 4_000_000)]
    pub(crate) history: usize,
    /// Pages fetched ahead along a detected trend at first (1..=256); a stream that uses its
    /// whole window gets twice as many next time, up to 256.
    #[arg(long, default_value_t = 64)]
    pub(crate) prefetch_window: usize,
    /// Percentage of forward sequential runs that discard (madvise) the pages just after a
    /// checked page, racing that fault's prefetch window.
    #[arg(long, default_value_t = 10)]
    pub(crate) discards: u32,
    /// A service-level objective (e.g. p99=1ms): the local share then moves under the
    /// checks as the controller grows and shrinks it, and replicated reads are hedged sooner.
    #[arg(long)]
    pub(crate) slo: Option<coalesce_pager::Slo>,
    /// An objective of the stressed region's own (e.g. p99=50us): while it is at risk the
    /// evictor spares the region's pages and takes them only because nothing else can go.
    #[arg(long)]
    pub(crate) region_slo: Option<coalesce_pager::Slo>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
    #[command(flatten)]
    pub(crate) lenders: LenderChoices,
}

/// The arguments of `coalesce keygen`.
#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the key.
    pub(crate) file: PathBuf,
}

/// The arguments of `coalesce lenders`.
#[derive(Debug, clap::Args)]
pub(crate) struct LendersArgs {
    /// memory-servers to measure, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) servers: Vec<SocketAddr>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
    /// Control round trips measured per lender.
    #[arg(long, default_value_t = 8)]
    pub(crate) pings: usize,
    /// Data-path provider to say hello with: shim or verbs.
    #[arg(long, default_value = "shim")]
    pub(crate) provider: ProviderKind,
    /// The cluster key file, for lenders that require one.
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
}

/// The arguments of `coalesce latency`.
#[derive(Debug, clap::Args)]
pub(crate) struct LatencyArgs {
    /// memory-server to measure against (default: an embedded one on loopback).
    #[arg(long)]
    pub(crate) server: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) found: DiscoveryChoice,
    /// Round trips per measurement (at most 10,000,000).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) ops: usize,
    /// Bytes per request.
    #[arg(long, default_value = "4KiB")]
    pub(crate) size: ByteSize,
    /// Link emulation: loopback, lan, 5g-urllc, wifi, or e.g. delay=1ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%.
    #[arg(long, default_value = "loopback")]
    pub(crate) link: LinkProfile,
    /// Data-path provider: shim or verbs.
    #[arg(long, default_value = "shim")]
    pub(crate) provider: ProviderKind,
    /// RDMA device for --provider verbs, e.g. rxe0 (default: the first device).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// The cluster key file (`coalesce keygen`), for a lender that requires one; an embedded
    /// lender then requires it too.
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// Send every request to the same remote page, as perftest's ib_read_lat does (for a
    /// like-for-like comparison with it); by default each goes to a random page of the slab,
    /// as a pager's faults do.
    #[arg(long)]
    pub(crate) same_page: bool,
}

/// How a borrowing command treats its lenders (shared by `run`, `demo` and `stress`).
#[derive(Debug, clap::Args)]
pub(crate) struct LenderChoices {
    /// Trust the lenders with plaintext pages (faster; by default every page is sealed:
    /// encrypted and authenticated before it leaves this machine).
    #[arg(long)]
    pub(crate) trusted_lenders: bool,
    /// The cluster key file (`coalesce keygen`), for lenders that require one; an embedded
    /// lender then requires it too.
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// How pages are kept on distinct lenders: none, replicate:N (N copies) or ec:K+M (K data
    /// plus M parity shards, Reed-Solomon: survives M lost lenders at (K+M)/K the memory).
    /// Default: replicate:2 with two or more --servers, else none.
    #[arg(long)]
    pub(crate) redundancy: Option<coalesce_pager::store::Redundancy>,
    /// How fast copies lost with a lender (or on a leaving one) are rebuilt on the others in the
    /// background, per second (0: not in the background; pages then get new copies only as they
    /// pass through local memory).
    #[arg(long, default_value = "256MiB")]
    pub(crate) repair_rate: ByteSize,
    /// A backup tier: a `memory-server --persist DIR` to which every page the lenders take is
    /// written behind; when every lender copy of a page is lost, it comes back from there (a page
    /// written again after its last write-behind fails loudly instead).
    #[arg(long)]
    pub(crate) backup: Option<std::net::SocketAddr>,
    /// With --backup: the longest a page waits to be written behind, e.g. 1s or 200ms.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) backup_lag: std::time::Duration,
    /// With copies (replicate:N): do not hedge reads. By default a read not answered within its
    /// lender's recent 95th percentile is posted again to the next copy, and the first answer
    /// wins (about 5% more reads; a lender that pauses is read around).
    #[arg(long)]
    pub(crate) no_hedge: bool,
}

/// Where a command finds lenders besides --servers (shared by every command that borrows or
/// measures lenders).
#[derive(Debug, clap::Args)]
pub(crate) struct DiscoveryChoice {
    /// Find lenders announced on the local network (`memory-server --announce`, DNS-SD over
    /// mDNS): those announced within --discover-wait, and any announced later while the pager
    /// runs. Combines with --servers.
    #[arg(long)]
    pub(crate) discover: bool,
    /// Find lenders registered in etcd (`memory-server --registry`): etcd://HOST:PORT[/PREFIX]
    /// (default prefix /coalesce/lenders/), watched while the pager runs.
    #[arg(long, conflicts_with = "discover")]
    pub(crate) registry: Option<discovery::RegistryAddr>,
    /// With --discover or --registry: how long to wait for the first lenders (at most 10m).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) discover_wait: std::time::Duration,
}

impl DiscoveryChoice {
    /// [`Self::choice`], saying why not on stderr after `who: `.
    pub(crate) fn choice_or_say(
        self,
        who: &str,
    ) -> Result<Option<(coalesce_pager::discover::Method, std::time::Duration)>, ()> {
        self.choice().map_err(|e| eprintln!("{who}: {e}"))
    }

    /// Where to look and how long (`None`: neither flag given), or why the flags cannot be used.
    pub(crate) fn choice(self) -> Result<Option<(coalesce_pager::discover::Method, std::time::Duration)>, String> {
        if self.discover_wait > std::time::Duration::from_secs(600) {
            return Err(format!("--discover-wait {:?} is out of range: at most 10m", self.discover_wait));
        }
        let how = match self.registry {
            Some(r) => Some(coalesce_pager::discover::Method::Registry(r)),
            None => self.discover.then_some(coalesce_pager::discover::Method::Mdns),
        };
        Ok(how.map(|d| (d, self.discover_wait)))
    }
}
