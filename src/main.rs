//! The `coalesce` command: measure the transport, and (with later subcommands) run programs on
//! borrowed memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use coalesce::bench;
use coalesce::demo::{self, DemoOptions};
use coalesce::latency::{self, LatencyOptions};
use coalesce::run;
use coalesce::stress::{self, StressOptions};
use rdma::{LinkProfile, ProviderKind};

#[derive(Debug, Parser)]
#[command(name = "coalesce", version, about = "Borrow memory from nearby machines: tools for Coalesce")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an unmodified program with its heap on borrowed memory (LD_PRELOAD of libcoalesce.so).
    ///
    /// Forwards the program's exit status (128 + signal if it was killed) and prints the pager's
    /// statistics, the run time and the peak resident memory on exit. Starts no server unless
    /// --embedded-server is given; with no server at all the program runs on plain local memory.
    Run {
        /// memory-servers, comma-separated.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        /// Start a memory-server on 127.0.0.1 inside this command for the run.
        #[arg(long)]
        embedded_server: bool,
        /// Local memory budget of the program's heap.
        #[arg(long, default_value = "256MiB")]
        local: ByteSize,
        /// When no lender can take a page (all full or down), pages stay local past the budget up
        /// to this size and no further (a size, `default`: twice the budget, or `unlimited`).
        #[arg(long, default_value = "default")]
        local_max: coalesce_pager::LocalMax,
        /// Heap size limit (allocations beyond it fail with ENOMEM).
        #[arg(long, default_value = "16GiB")]
        heap_size: ByteSize,
        /// Data-path provider: shim or verbs.
        #[arg(long, default_value = "shim")]
        provider: ProviderKind,
        /// Do not print statistics on exit.
        #[arg(long)]
        quiet: bool,
        /// Fault-handling threads of each process (1 to 64; `COALESCE_FAULT_THREADS`). Default: 2
        /// on machines with 4 or more CPUs, else 1.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
        fault_threads: Option<u8>,
        /// A service-level objective on remote-fault service time, e.g. p99=500us: when a
        /// second's faults miss it, the local share grows (up to --local-max), and replicated
        /// reads are hedged soon enough for the other copy to answer within it; the statistics
        /// say what share of faults met it.
        #[arg(long)]
        slo: Option<coalesce_pager::Slo>,
        #[command(flatten)]
        found: DiscoveryChoice,
        #[command(flatten)]
        lenders: LenderChoices,
        /// The program and its arguments (after --).
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Compare with Linux swap: one workload run in local memory, under swap (cgroup limit plus a
    /// temporary swapfile; root only) and on Coalesce, with the same local budget. Prints a table,
    /// writes CSV and an SVG chart.
    Bench {
        /// Working set.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        /// Local memory (cgroup limit for swap, pager budget for Coalesce).
        #[arg(long, default_value = "256MiB")]
        local: ByteSize,
        /// Sequential passes.
        #[arg(long, default_value_t = 3)]
        passes: usize,
        /// Random 8-byte reads.
        #[arg(long, default_value_t = 786_432)]
        random_reads: usize,
        /// Swapfile to create (and remove) for the swap run.
        #[arg(long, default_value = "/var/tmp/coalesce-bench.swap")]
        swapfile: PathBuf,
        /// CSV output.
        #[arg(long, default_value = "coalesce-bench.csv")]
        csv: PathBuf,
        /// SVG chart output.
        #[arg(long, default_value = "coalesce-bench.svg")]
        chart: PathBuf,
        /// Trust the lenders with plaintext pages (faster; by default every page is sealed:
        /// encrypted and authenticated before it leaves this machine).
        #[arg(long)]
        trusted_lenders: bool,
        /// How the Coalesce run keeps pages: none, replicate:N or ec:K+M; without --servers,
        /// --discover or --registry it starts as many embedded lenders on 127.0.0.1 as the choice
        /// needs (one for none).
        #[arg(long, default_value = "none")]
        redundancy: coalesce_pager::store::Redundancy,
        /// memory-servers for the Coalesce run, comma-separated (default: embedded ones).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        #[command(flatten)]
        found: DiscoveryChoice,
    },
    /// Internal: one run of the bench workload (started by `coalesce bench`).
    #[command(hide = true)]
    BenchWorker {
        #[arg(long, value_enum)]
        mode: bench::Mode,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        local: usize,
        #[arg(long)]
        passes: usize,
        #[arg(long)]
        random_reads: usize,
        #[arg(long)]
        trusted_lenders: bool,
        #[arg(long, default_value = "none")]
        redundancy: coalesce_pager::store::Redundancy,
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        #[command(flatten)]
        found: DiscoveryChoice,
    },
    /// Borrow memory end to end: map a region bigger than the local budget, write a pattern, read it
    /// back sequentially and randomly with verification, and print what the pager did.
    ///
    /// Without --servers, starts a memory-server inside this process on 127.0.0.1.
    Demo {
        /// Region size.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        /// Local memory budget.
        #[arg(long, default_value = "128MiB")]
        local: ByteSize,
        /// When no lender can take a page (all full or down), pages stay local past the budget up
        /// to this size and no further (a size, `default`: twice the budget, or `unlimited`).
        #[arg(long, default_value = "default")]
        local_max: coalesce_pager::LocalMax,
        /// memory-servers to use, comma-separated (default: an embedded one on loopback).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        /// Data-path provider: shim or verbs.
        #[arg(long, default_value = "shim")]
        provider: ProviderKind,
        /// RDMA device for --provider verbs, e.g. rxe0 (default: the first device).
        #[arg(long)]
        device: Option<String>,
        /// With --provider verbs: if this build, host or device has no verbs, say so and run on the
        /// shim instead of failing.
        #[arg(long)]
        fallback_to_shim: bool,
        /// Link emulation: loopback, lan, 5g-urllc, wifi, or e.g. delay=1ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%.
        #[arg(long, default_value = "loopback")]
        link: LinkProfile,
        /// Sequential read passes.
        #[arg(long, default_value_t = 1)]
        passes: usize,
        /// Random 8-byte reads.
        #[arg(long, default_value_t = 200_000)]
        random_reads: usize,
        /// Turn prefetch off.
        #[arg(long)]
        no_prefetch: bool,
        /// Fetch only the window a fault asks for, not also the next one ahead of a stream (on a
        /// thread of its own) while the program reads it.
        #[arg(long)]
        no_prefetch_ahead: bool,
        /// Fault-handling threads.
        #[arg(long, default_value_t = 1)]
        fault_threads: usize,
        /// Pages fetched ahead along a detected trend at first (1..=256); a stream that uses its
        /// whole window gets twice as many next time, up to 256.
        #[arg(long, default_value_t = 64)]
        prefetch_window: usize,
        /// Keep this many page-table transitions and print the history of a page that fails
        /// verification (40 bytes each; 0: off).
        #[arg(long, default_value_t = 0)]
        history: usize,
        /// A service-level objective on remote-fault service time, e.g. p99=500us: when a
        /// second's faults miss it, the local share grows (up to --local-max), and replicated
        /// reads are hedged soon enough for the other copy to answer within it; the statistics
        /// say what share of faults met it.
        #[arg(long)]
        slo: Option<coalesce_pager::Slo>,
        #[command(flatten)]
        found: DiscoveryChoice,
        #[command(flatten)]
        lenders: LenderChoices,
    },
    /// The contended stress harness: application threads fill a region bigger than the local
    /// budget, then check and rewrite whole pages at random and in sequential runs, with CPU hogs
    /// on every core, over a matrix of budgets and fault-thread counts. Stops at the first wrong
    /// word and prints the page's history (every page-table transition and the thread that made
    /// it). Exit status 0: no wrong word; 1: a wrong word (the report says which); 2: set-up error.
    ///
    /// Without --servers, starts a memory-server inside this process on 127.0.0.1.
    Stress {
        /// Region size.
        #[arg(long, default_value = "256MiB")]
        size: ByteSize,
        /// Local budgets to run, as fractions of the region, comma-separated (8 = 1/8).
        #[arg(long, value_delimiter = ',', default_value = "8,16")]
        fractions: Vec<usize>,
        /// Fault-thread counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        fault_threads: Vec<usize>,
        /// Evictor threads in every configuration (1..=8).
        #[arg(long, default_value_t = 1)]
        evictor_threads: usize,
        /// Application threads.
        #[arg(long, default_value_t = 4)]
        app_threads: usize,
        /// Total run time, shared by the configurations of the matrix.
        #[arg(long, default_value = "60s")]
        duration: humantime::Duration,
        /// CPU hog threads (default: one per core).
        #[arg(long)]
        hogs: Option<usize>,
        /// Percentage of page accesses that rewrite the page.
        #[arg(long, default_value_t = 30)]
        writes: u32,
        /// Seed of the access pattern (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// memory-servers to use, comma-separated (default: an embedded one on loopback).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        /// Page-table transitions kept for the report (40 bytes each).
        #[arg(long, default_value_t = 4_000_000)]
        history: usize,
        /// Pages fetched ahead along a detected trend at first (1..=256); a stream that uses its
        /// whole window gets twice as many next time, up to 256.
        #[arg(long, default_value_t = 64)]
        prefetch_window: usize,
        /// Percentage of forward sequential runs that discard (madvise) the pages just after a
        /// checked page, racing that fault's prefetch window.
        #[arg(long, default_value_t = 10)]
        discards: u32,
        /// A service-level objective (e.g. p99=1ms): the local share then moves under the
        /// checks as the controller grows and shrinks it, and replicated reads are hedged sooner.
        #[arg(long)]
        slo: Option<coalesce_pager::Slo>,
        #[command(flatten)]
        found: DiscoveryChoice,
        #[command(flatten)]
        lenders: LenderChoices,
    },
    /// Make a cluster key: 32 random bytes as 64 hex digits in FILE (mode 600; an existing file is
    /// never overwritten). Give the same file to every lender (`memory-server --key-file`) and
    /// borrower (`--key-file`, `COALESCE_KEY_FILE`) of the cluster.
    Keygen {
        /// Where to write the key.
        file: PathBuf,
    },
    /// The lenders this machine can see: named with --servers and/or announced on the local
    /// network (--discover), each with its class, control round trip (min, median), the
    /// placement weight a pager would give it, free capacity, memory lent and clients.
    Lenders {
        /// memory-servers to measure, comma-separated.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<SocketAddr>,
        #[command(flatten)]
        found: DiscoveryChoice,
        /// Control round trips measured per lender.
        #[arg(long, default_value_t = 8)]
        pings: usize,
        /// Data-path provider to say hello with: shim or verbs.
        #[arg(long, default_value = "shim")]
        provider: ProviderKind,
        /// The cluster key file, for lenders that require one.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Measure one-sided READ and WRITE round trips (median, p99), blocking and busy-polling.
    ///
    /// Without --server, --discover or --registry, starts a memory-server inside this process on
    /// 127.0.0.1. With --discover or --registry, measures every lender found (and --server).
    Latency {
        /// memory-server to measure against (default: an embedded one on loopback).
        #[arg(long)]
        server: Option<SocketAddr>,
        #[command(flatten)]
        found: DiscoveryChoice,
        /// Round trips per measurement.
        #[arg(long, default_value_t = 20_000)]
        ops: usize,
        /// Bytes per request.
        #[arg(long, default_value = "4KiB")]
        size: ByteSize,
        /// Link emulation: loopback, lan, 5g-urllc, wifi, or e.g. delay=1ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%.
        #[arg(long, default_value = "loopback")]
        link: LinkProfile,
        /// Data-path provider: shim or verbs.
        #[arg(long, default_value = "shim")]
        provider: ProviderKind,
        /// RDMA device for --provider verbs, e.g. rxe0 (default: the first device).
        #[arg(long)]
        device: Option<String>,
        /// The cluster key file (`coalesce keygen`), for a lender that requires one; an embedded
        /// lender then requires it too.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Send every request to the same remote page, as perftest's ib_read_lat does (for a
        /// like-for-like comparison with it); by default each goes to a random page of the slab,
        /// as a pager's faults do.
        #[arg(long)]
        same_page: bool,
    },
}

/// How a borrowing command treats its lenders (shared by `run`, `demo` and `stress`).
#[derive(Debug, clap::Args)]
struct LenderChoices {
    /// Trust the lenders with plaintext pages (faster; by default every page is sealed:
    /// encrypted and authenticated before it leaves this machine).
    #[arg(long)]
    trusted_lenders: bool,
    /// The cluster key file (`coalesce keygen`), for lenders that require one; an embedded
    /// lender then requires it too.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// How pages are kept on distinct lenders: none, replicate:N (N copies) or ec:K+M (K data
    /// plus M parity shards, Reed-Solomon: survives M lost lenders at (K+M)/K the memory).
    /// Default: replicate:2 with two or more --servers, else none.
    #[arg(long)]
    redundancy: Option<coalesce_pager::store::Redundancy>,
    /// How fast copies lost with a lender (or on a leaving one) are rebuilt on the others in the
    /// background, per second (0: not in the background; pages then get new copies only as they
    /// pass through local memory).
    #[arg(long, default_value = "256MiB")]
    repair_rate: ByteSize,
    /// A backup tier: a `memory-server --persist DIR` to which every page the lenders take is
    /// written behind; when every lender copy of a page is lost, it comes back from there (a page
    /// written again after its last write-behind fails loudly instead).
    #[arg(long)]
    backup: Option<std::net::SocketAddr>,
    /// With --backup: the longest a page waits to be written behind, e.g. 1s or 200ms.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backup_lag: std::time::Duration,
    /// With copies (replicate:N): do not hedge reads. By default a read not answered within its
    /// lender's recent 95th percentile is posted again to the next copy, and the first answer
    /// wins (about 5% more reads; a lender that pauses is read around).
    #[arg(long)]
    no_hedge: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    coalesce::init_logging("warn");
    match cli.command {
        Command::Run {
            servers,
            embedded_server,
            local,
            local_max,
            heap_size,
            provider,
            quiet,
            fault_threads,
            slo,
            found,
            lenders: LenderChoices { trusted_lenders, key_file, redundancy, repair_rate, backup, backup_lag, no_hedge },
            command,
        } => {
            let Ok(discover) = found.choice_or_say("coalesce") else { return ExitCode::from(125) };
            let opts = run::RunOptions {
                discover,
                slo,
                fault_threads: fault_threads.map(usize::from),
                key_file,
                redundancy,
                backup,
                backup_lag,
                hedged_reads: !no_hedge,
                repair_rate: repair_rate.as_u64(),
                servers,
                embedded_server,
                local: local.as_u64(),
                local_max,
                heap_size: heap_size.as_u64(),
                provider,
                stats: !quiet,
                trusted_lenders,
                command,
            };
            match run::run(&opts) {
                Ok(outcome) => {
                    if !quiet {
                        eprintln!(
                            "coalesce run: exit status {}, {:.3} s, peak resident memory {:.1} MiB (local budget {:.0} MiB per process)",
                            outcome.code,
                            outcome.elapsed.as_secs_f64(),
                            outcome.max_rss as f64 / 1048576.0,
                            opts.local as f64 / 1048576.0
                        );
                        match &outcome.stats {
                            Some(s) => eprint!("{s}"),
                            None => eprintln!(
                                "no statistics from the program itself (it did not borrow memory, or left with \
                                 _exit, as shells do); peak resident memory is the largest of its process tree"
                            ),
                        }
                        if !outcome.others.is_empty() {
                            eprintln!("other processes under the preload (each has a budget of its own):");
                            for r in &outcome.others {
                                eprintln!("  {}", r.summary());
                            }
                            let all: Vec<&coalesce_pager::ExitReport> =
                                outcome.stats.iter().chain(outcome.others.iter()).collect();
                            eprintln!(
                                "  total of {} processes: {:.1} MiB of peak RSS (summed; the peaks need not coincide), {} \
                                 remote faults, {} over-budget events",
                                all.len(),
                                all.iter().map(|r| r.peak_rss_bytes).sum::<u64>() as f64 / 1048576.0,
                                all.iter().map(|r| r.pager.remote_faults).sum::<u64>(),
                                all.iter().map(|r| r.pager.overshoot_events).sum::<u64>()
                            );
                        }
                    }
                    ExitCode::from(u8::try_from(outcome.code).unwrap_or(1))
                }
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    ExitCode::from(125)
                }
            }
        }
        Command::Bench {
            size,
            local,
            passes,
            random_reads,
            swapfile,
            csv,
            chart,
            trusted_lenders,
            redundancy,
            servers,
            found,
        } => {
            let Ok(discover) = found.choice_or_say("coalesce") else { return ExitCode::FAILURE };
            let (Ok(size), Ok(local)) = (usize::try_from(size.as_u64()), usize::try_from(local.as_u64())) else {
                eprintln!("coalesce: --size and --local must fit this machine's address space");
                return ExitCode::FAILURE;
            };
            if size < 1 << 20 || local < 1 << 20 || local >= size {
                eprintln!("coalesce: need 1 MiB <= --local < --size");
                return ExitCode::FAILURE;
            }
            let opts = bench::BenchOptions {
                size,
                local,
                passes,
                random_reads,
                swapfile,
                csv,
                chart,
                trusted_lenders,
                redundancy,
                lenders: bench::Lenders { servers, discover },
            };
            match bench::run(&opts) {
                Ok(results) => {
                    print!("{}", bench::table(&opts, &results));
                    let written = bench::write_csv(&opts, &results).and_then(|()| bench::write_chart(&opts, &results));
                    match written {
                        Ok(()) => {
                            println!("wrote {} and {}", opts.csv.display(), opts.chart.display());
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("coalesce: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::BenchWorker {
            mode,
            size,
            local,
            passes,
            random_reads,
            trusted_lenders,
            redundancy,
            servers,
            found,
        } => {
            let Ok(discover) = found.choice_or_say("coalesce bench-worker") else { return ExitCode::FAILURE };
            let lenders = bench::Lenders { servers, discover };
            let opts = bench::WorkerOptions { size, local, passes, random_reads, trusted_lenders, redundancy, lenders };
            match bench::worker(mode, &opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("coalesce bench-worker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            size,
            local,
            local_max,
            servers,
            provider,
            device,
            fallback_to_shim,
            link,
            passes,
            random_reads,
            no_prefetch,
            no_prefetch_ahead,
            fault_threads,
            prefetch_window,
            history,
            slo,
            found,
            lenders: LenderChoices { trusted_lenders, key_file, redundancy, repair_rate, backup, backup_lag, no_hedge },
        } => {
            let key = match load_key(key_file.as_deref()) {
                Ok(k) => k,
                Err(code) => return code,
            };
            let Ok(discover) = found.choice_or_say("coalesce") else { return ExitCode::FAILURE };
            let (Ok(size), Ok(local)) = (usize::try_from(size.as_u64()), usize::try_from(local.as_u64())) else {
                eprintln!("coalesce: --size and --local must fit this machine's address space");
                return ExitCode::FAILURE;
            };
            let mut opts = DemoOptions {
                size,
                local,
                local_max,
                servers,
                provider,
                device,
                link,
                passes,
                random_reads,
                prefetch: !no_prefetch,
                prefetch_ahead: !no_prefetch_ahead,
                fault_threads,
                prefetch_window,
                history,
                trusted_lenders,
                key,
                redundancy,
                repair_rate: usize::try_from(repair_rate.as_u64()).unwrap_or(usize::MAX),
                backup,
                backup_lag,
                hedged_reads: !no_hedge,
                discover,
                slo,
            };
            let mut result = demo::run(&opts);
            let unavailable = result.as_ref().err().is_some_and(demo::DemoError::is_provider_unavailable);
            if fallback_to_shim && opts.provider == ProviderKind::Verbs && unavailable {
                if let Err(cause) = &result {
                    eprintln!("coalesce: {cause}\ncoalesce: --fallback-to-shim: running on the shim provider instead");
                }
                opts.provider = ProviderKind::Shim;
                opts.device = None;
                result = demo::run(&opts);
            }
            match result {
                Ok(report) => {
                    report.print(&opts);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Stress {
            size,
            fractions,
            fault_threads,
            evictor_threads,
            app_threads,
            duration,
            hogs,
            writes,
            seed,
            servers,
            history,
            prefetch_window,
            discards,
            slo,
            found,
            lenders: LenderChoices { trusted_lenders, key_file, redundancy, repair_rate, backup, backup_lag, no_hedge },
        } => {
            let key = match load_key(key_file.as_deref()) {
                Ok(k) => k,
                Err(_) => return ExitCode::from(2),
            };
            let Ok(discover) = found.choice_or_say("coalesce") else { return ExitCode::from(2) };
            let Ok(size) = usize::try_from(size.as_u64()) else {
                eprintln!("coalesce: --size must fit this machine's address space");
                return ExitCode::from(2);
            };
            let seed = seed.unwrap_or_else(|| fastrand::u64(..));
            let hogs = hogs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
            eprintln!("stress: seed {seed}");
            let opts = StressOptions {
                size,
                fractions,
                fault_threads,
                evictor_threads,
                app_threads,
                duration: duration.into(),
                hogs,
                write_percent: writes,
                seed,
                servers,
                discover,
                slo,
                history,
                prefetch_window,
                discard_percent: discards,
                trusted_lenders,
                key,
                redundancy,
                repair_rate: usize::try_from(repair_rate.as_u64()).unwrap_or(usize::MAX),
                backup,
                backup_lag,
                hedged_reads: !no_hedge,
            };
            match stress::run(&opts) {
                Ok(Ok(reports)) => {
                    let checks: u64 = reports.iter().map(|r| r.pages_checked).sum();
                    println!("stress: no wrong word in {checks} page checks over {} configurations", reports.len());
                    ExitCode::SUCCESS
                }
                Ok(Err(mismatch)) => {
                    println!("{mismatch}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Keygen { file } => match rdma::secure::ClusterKey::write_new(&file) {
            Ok(_) => {
                println!("wrote a new cluster key to {} (mode 600)", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("coalesce keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Lenders { servers, found, pings, provider, key_file } => {
            let key = match load_key(key_file.as_deref()) {
                Ok(k) => k,
                Err(code) => return code,
            };
            let Ok(discover) = found.choice_or_say("coalesce lenders") else { return ExitCode::FAILURE };
            if servers.is_empty() && discover.is_none() {
                eprintln!("coalesce lenders: name lenders with --servers, or find them with --discover or --registry");
                return ExitCode::FAILURE;
            }
            if pings == 0 || pings > 1000 {
                eprintln!("coalesce lenders: --pings must be 1..=1000");
                return ExitCode::FAILURE;
            }
            let opts = coalesce::lenders::LendersOptions { servers, discover, provider, key, pings };
            match coalesce::lenders::survey(&opts) {
                Ok(rows) if rows.is_empty() => {
                    eprintln!("coalesce lenders: no lender found (with --discover: is a `memory-server --announce` running on this network, with multicast on its interface?)");
                    ExitCode::FAILURE
                }
                Ok(rows) => {
                    coalesce::lenders::print(&rows);
                    // Fails only when no lender at all answered.
                    if rows.iter().any(|r| r.rtt.is_some()) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("coalesce lenders: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Latency { server, found, ops, size, link, provider, device, key_file, same_page } => {
            let key = match load_key(key_file.as_deref()) {
                Ok(k) => k,
                Err(code) => return code,
            };
            let Ok(size) = usize::try_from(size.as_u64()) else {
                eprintln!("coalesce: --size is too large for this machine");
                return ExitCode::FAILURE;
            };
            if size == 0 || size > 16 << 20 {
                eprintln!("coalesce: --size must be between 1 byte and 16 MiB");
                return ExitCode::FAILURE;
            }
            let targets = match found.choice().and_then(|d| latency::targets(server, d.as_ref())) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("link: {link}");
            let several = targets.len() > 1;
            for server in targets {
                if let Some(addr) = server.filter(|_| several) {
                    println!("lender {addr}:");
                }
                let opts = LatencyOptions {
                    server,
                    ops: ops.max(1),
                    size,
                    link: link.clone(),
                    provider,
                    device: device.clone(),
                    key: key.clone(),
                    same_page,
                };
                match latency::run(&opts) {
                    Ok(reports) => {
                        for r in reports {
                            println!("{r}");
                        }
                    }
                    Err(e) => {
                        eprintln!("coalesce: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Where a command finds lenders besides --servers (shared by every command that borrows or
/// measures lenders).
#[derive(Debug, clap::Args)]
struct DiscoveryChoice {
    /// Find lenders announced on the local network (`memory-server --announce`, DNS-SD over
    /// mDNS): those announced within --discover-wait, and any announced later while the pager
    /// runs. Combines with --servers.
    #[arg(long)]
    discover: bool,
    /// Find lenders registered in etcd (`memory-server --registry`): etcd://HOST:PORT[/PREFIX]
    /// (default prefix /coalesce/lenders/), watched while the pager runs.
    #[arg(long, conflicts_with = "discover")]
    registry: Option<discovery::RegistryAddr>,
    /// With --discover or --registry: how long to wait for the first lenders (at most 10m).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    discover_wait: std::time::Duration,
}

impl DiscoveryChoice {
    /// [`Self::choice`], saying why not on stderr after `who: `.
    fn choice_or_say(self, who: &str) -> Result<Option<(coalesce_pager::discover::Method, std::time::Duration)>, ()> {
        self.choice().map_err(|e| eprintln!("{who}: {e}"))
    }

    /// Where to look and how long (`None`: neither flag given), or why the flags cannot be used.
    fn choice(self) -> Result<Option<(coalesce_pager::discover::Method, std::time::Duration)>, String> {
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

/// Reads `--key-file`, or says why it cannot be used.
fn load_key(path: Option<&std::path::Path>) -> Result<Option<rdma::secure::ClusterKey>, ExitCode> {
    path.map(rdma::secure::ClusterKey::from_file).transpose().map_err(|e| {
        eprintln!("coalesce: {e}");
        ExitCode::FAILURE
    })
}
