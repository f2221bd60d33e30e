//! The `coalesce` command: run programs on borrowed memory (`run`), show and measure what it does
//! (`demo`, `bench`, `latency`, `lenders`), check it under contention (`stress`) and make cluster
//! keys (`keygen`). One function per subcommand; their arguments are in `cli_args.rs`.

use std::process::ExitCode;

use clap::Parser;
use coalesce::bench;
use coalesce::demo::{self, DemoOptions};
use coalesce::latency::{self, LatencyOptions};
use coalesce::run;
use coalesce::stress::{self, StressOptions};
use rdma::ProviderKind;

mod cli_args;
use cli_args::{
    BenchArgs, BenchWorkerArgs, Cli, Command, DemoArgs, KeygenArgs, LatencyArgs, LenderChoices, LendersArgs, RunArgs,
    StressArgs,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    coalesce::init_logging("warn");
    match cli.command {
        Command::Run(args) => run_command(args),
        Command::Bench(args) => bench_command(args),
        Command::BenchWorker(args) => bench_worker_command(args),
        Command::Demo(args) => demo_command(args),
        Command::Stress(args) => stress_command(args),
        Command::Keygen(args) => keygen_command(args),
        Command::Lenders(args) => lenders_command(args),
        Command::Latency(args) => latency_command(args),
    }
}

/// `coalesce run`.
fn run_command(args: RunArgs) -> ExitCode {
    let RunArgs {
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
    } = args;
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

/// `coalesce bench`.
fn bench_command(args: BenchArgs) -> ExitCode {
    let BenchArgs {
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
    } = args;
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

/// `coalesce bench-worker`.
fn bench_worker_command(args: BenchWorkerArgs) -> ExitCode {
    let BenchWorkerArgs { mode, size, local, passes, random_reads, trusted_lenders, redundancy, servers, found } = args;
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

/// `coalesce demo`.
fn demo_command(args: DemoArgs) -> ExitCode {
    let DemoArgs {
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
        no_demand_first,
        fault_threads,
        prefetch_window,
        history,
        slo,
        found,
        lenders: LenderChoices { trusted_lenders, key_file, redundancy, repair_rate, backup, backup_lag, no_hedge },
    } = args;
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
        demand_first: !no_demand_first,
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

/// `coalesce stress`.
fn stress_command(args: StressArgs) -> ExitCode {
    let StressArgs {
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
        region_slo,
        found,
        lenders: LenderChoices { trusted_lenders, key_file, redundancy, repair_rate, backup, backup_lag, no_hedge },
    } = args;
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
        region_slo,
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

/// `coalesce keygen`.
fn keygen_command(args: KeygenArgs) -> ExitCode {
    let KeygenArgs { file } = args;
    match rdma::secure::ClusterKey::write_new(&file) {
        Ok(_) => {
            println!("wrote a new cluster key to {} (mode 600)", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coalesce keygen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `coalesce lenders`.
fn lenders_command(args: LendersArgs) -> ExitCode {
    let LendersArgs { servers, found, pings, provider, key_file } = args;
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

/// `coalesce latency`.
fn latency_command(args: LatencyArgs) -> ExitCode {
    let LatencyArgs { server, found, ops, size, link, provider, device, key_file, same_page } = args;
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
    if ops > latency::MAX_OPS {
        eprintln!("coalesce: {}", latency::LatencyError::TooManyOps(ops));
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

/// Reads `--key-file`, or says why it cannot be used.
fn load_key(path: Option<&std::path::Path>) -> Result<Option<rdma::secure::ClusterKey>, ExitCode> {
    path.map(rdma::secure::ClusterKey::from_file).transpose().map_err(|e| {
        eprintln!("coalesce: {e}");
        ExitCode::FAILURE
    })
}
