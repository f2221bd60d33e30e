//! `coalesce bench`: one workload (fill, sequential passes, random 8-byte reads) run three ways in
//! one go: all in local memory, under Linux swap (a memory cgroup limit plus a swapfile this tool
//! creates and removes; root only), and on Coalesce over the shim on loopback with the same local
//! budget. Each way runs in a fresh child process (`coalesce bench-worker`). Prints a table with
//! ratios, writes CSV, and draws an SVG chart of the phase times and the random-read latency
//! distribution.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use coalesce_pager::store::Redundancy;
use coalesce_pager::{Pager, PagerConfig, RegionOptions};
use memmap2::MmapOptions;

use crate::workload::{self, WorkloadOptions, WorkloadResult};

/// How the workload's memory is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Plain anonymous memory, no limit.
    Local,
    /// Plain anonymous memory in a memory cgroup limited to the local budget, with a swapfile.
    Swap,
    /// A Coalesce region with the local budget, over embedded loopback memory-servers (or the
    /// lenders named or found).
    Coalesce,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Swap => "swap",
            Mode::Coalesce => "coalesce",
        }
    }
}

/// Comparison settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Working set in bytes.
    pub size: usize,
    /// Local memory budget in bytes (cgroup limit for swap, pager budget for Coalesce).
    pub local: usize,
    /// Sequential passes.
    pub passes: usize,
    /// Random 8-byte reads.
    pub random_reads: usize,
    /// Where the swapfile goes (created and removed by the run).
    pub swapfile: PathBuf,
    /// CSV output.
    pub csv: PathBuf,
    /// SVG chart output.
    pub chart: PathBuf,
    /// Coalesce runs with plaintext pages (no sealing).
    pub trusted_lenders: bool,
    /// How the Coalesce run keeps pages (as many embedded lenders as it needs).
    pub redundancy: Redundancy,
    /// Lenders for the Coalesce run instead of embedded ones.
    pub lenders: Lenders,
}

/// Lenders named (`--servers`) or found (`--discover`, `--registry`) for the Coalesce run; with
/// neither, it starts embedded ones on 127.0.0.1.
#[derive(Debug, Clone, Default)]
pub struct Lenders {
    /// Named lenders.
    pub servers: Vec<std::net::SocketAddr>,
    /// Found lenders, and the first wait.
    pub discover: Option<(coalesce_pager::discover::Method, Duration)>,
}

impl Lenders {
    fn embedded(&self) -> bool {
        self.servers.is_empty() && self.discover.is_none()
    }

    /// Arguments that give a bench worker the same lenders.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if !self.servers.is_empty() {
            let list: Vec<String> = self.servers.iter().map(ToString::to_string).collect();
            args.extend(["--servers".to_owned(), list.join(",")]);
        }
        match &self.discover {
            Some((coalesce_pager::discover::Method::Mdns, wait)) => {
                args.extend(["--discover".to_owned(), format!("--discover-wait={}ms", wait.as_millis())]);
            }
            Some((coalesce_pager::discover::Method::Registry(r), wait)) => {
                args.extend([format!("--registry={r}"), format!("--discover-wait={}ms", wait.as_millis())]);
            }
            None => {}
        }
        args
    }
}

/// What one bench worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Working set in bytes.
    pub size: usize,
    /// Local memory budget in bytes.
    pub local: usize,
    /// Sequential passes.
    pub passes: usize,
    /// Random 8-byte reads.
    pub random_reads: usize,
    /// Coalesce runs with plaintext pages.
    pub trusted_lenders: bool,
    /// How the Coalesce run keeps pages.
    pub redundancy: Redundancy,
    /// Lenders named or found (none: embedded ones).
    pub lenders: Lenders,
}

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A worker failed.
    #[error("the {mode} run failed: {reason}")]
    Worker {
        /// Which run.
        mode: &'static str,
        /// What happened.
        reason: String,
    },
    /// Writing results failed.
    #[error("cannot write {path}: {source}")]
    Output {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The worker's own failure.
    #[error("{0}")]
    Setup(String),
}

/// Figures of one way of running the workload.
#[derive(Debug, Clone, Default)]
pub struct ModeResult {
    /// Fill time.
    pub fill: Duration,
    /// Pass times.
    pub passes: Vec<Duration>,
    /// Random phase time.
    pub random: Duration,
    /// (quantile, latency) points of all random reads.
    pub latency_cdf: Vec<(f64, Duration)>,
    /// p50, p99 and p99.9 of random reads that faulted, and how many did.
    pub faulted: (Duration, Duration, Duration, u64),
    /// Extra facts (pager stats line, swap device).
    pub note: String,
}

const QUANTILES: [f64; 24] = [
    0.001, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99,
    0.995, 0.999, 0.9999, 1.0,
];

fn encode(r: &WorkloadResult, note: &str) -> String {
    let passes: Vec<String> = r.passes.iter().map(|d| d.as_nanos().to_string()).collect();
    let cdf: Vec<String> = QUANTILES.iter().map(|&q| format!("{q}:{}", r.latency.value_at_quantile(q))).collect();
    let f = &r.faulted;
    let q = |x: f64| if f.is_empty() { 0 } else { f.value_at_quantile(x) };
    let (p50, p99, p999) = (q(0.5), q(0.99), q(0.999));
    format!(
        "RESULT {} {} {} {} {} {} {} {} {}",
        r.fill.as_nanos(),
        if passes.is_empty() { "-".into() } else { passes.join(",") },
        r.random.as_nanos(),
        cdf.join(";"),
        p50,
        p99,
        p999,
        f.len(),
        note.replace(' ', "_")
    )
}

fn decode(line: &str) -> Option<ModeResult> {
    let mut it = line.strip_prefix("RESULT ")?.split(' ');
    let ns = |s: &str| s.parse::<u64>().ok().map(Duration::from_nanos);
    let fill = ns(it.next()?)?;
    let passes_s = it.next()?;
    let passes = if passes_s == "-" { Vec::new() } else { passes_s.split(',').map(ns).collect::<Option<Vec<_>>>()? };
    let random = ns(it.next()?)?;
    let latency_cdf = it
        .next()?
        .split(';')
        .map(|kv| {
            let (q, v) = kv.split_once(':')?;
            Some((q.parse().ok()?, ns(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    let faulted = (ns(it.next()?)?, ns(it.next()?)?, ns(it.next()?)?, it.next()?.parse().ok()?);
    let note = it.next().unwrap_or("").replace('_', " ");
    Some(ModeResult { fill, passes, random, latency_cdf, faulted, note })
}

/// The worker side: runs the workload once in this process and prints one `RESULT` line.
pub fn worker(mode: Mode, w: &WorkerOptions) -> Result<(), BenchError> {
    let WorkerOptions { size, local, passes, random_reads, trusted_lenders, redundancy, ref lenders } = *w;
    let opts = WorkloadOptions { passes, random_reads, progress: false };
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let (result, note) = match mode {
        Mode::Local | Mode::Swap => {
            let mut map = MmapOptions::new().len(size).map_anon().map_err(|e| setup(&e))?;
            let words: &mut [u64] = bytemuck::cast_slice_mut(&mut map[..]);
            (workload::run(words, &opts).map_err(|e| setup(&e))?, String::new())
        }
        Mode::Coalesce => {
            // Each lender holds its share of every page (a copy, or a shard), with room to spare.
            let capacity = (size as u64 * 2).max(256 << 20);
            let embedded = if lenders.embedded() { redundancy.lenders() } else { 0 };
            let servers = (0..embedded)
                .map(|_| lender::start(lender::ServerConfig::embedded(capacity)).map_err(|e| setup(&e)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut named = lenders.servers.clone();
            named.extend(servers.iter().map(lender::ServerHandle::addr));
            let mut config = PagerConfig::new(named, local);
            config.trusted_lenders = trusted_lenders;
            config.redundancy = Some(redundancy);
            if let Some((method, wait)) = &lenders.discover {
                config.discovery = Some(method.clone());
                config.discovery_wait = *wait;
            }
            let pager = Pager::new(config).map_err(|e| setup(&e))?;
            let mut region = pager.map(size, RegionOptions::default()).map_err(|e| setup(&e))?;
            let words: &mut [u64] = bytemuck::cast_slice_mut(region.as_mut_slice());
            let r = workload::run(words, &opts).map_err(|e| setup(&e))?;
            let s = pager.stats();
            let note = format!(
                "{} remote faults, {} prefetched, {} dirty + {} clean evictions, peak {} of {} pages, {:.2} metadata B/remote page",
                s.remote_faults,
                s.prefetched_pages,
                s.evictions_dirty,
                s.evictions_clean,
                s.peak_resident_pages,
                s.budget_pages,
                s.metadata_per_remote_page()
            );
            drop(region);
            drop(pager);
            servers.into_iter().for_each(lender::ServerHandle::shutdown);
            (r, note)
        }
    };
    println!("{}", encode(&result, &note));
    Ok(())
}

/// A memory cgroup (v2 or v1) limited to the local budget, removed on drop.
#[derive(Debug)]
struct Cgroup {
    dir: PathBuf,
    procs: PathBuf,
}

impl Cgroup {
    fn create(limit: usize) -> Result<Self, String> {
        let name = format!("coalesce-bench-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let v2_has_memory = std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let (dir, limit_file, procs) = if v2_has_memory {
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            (dir.clone(), dir.join("memory.max"), dir.join("cgroup.procs"))
        } else if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            let dir = Path::new("/sys/fs/cgroup/memory").join(&name);
            (dir.clone(), dir.join("memory.limit_in_bytes"), dir.join("cgroup.procs"))
        } else {
            return Err("no memory cgroup controller (v1 or v2) is mounted".into());
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
        let cg = Self { dir, procs };
        std::fs::write(&limit_file, limit.to_string())
            .map_err(|e| format!("cannot set {}: {e}", limit_file.display()))?;
        Ok(cg)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A swapfile that is active while this lives.
#[derive(Debug)]
struct Swapfile {
    path: PathBuf,
    active: bool,
}

fn run_cmd(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Swapfile {
    fn create(path: &Path, size: usize) -> Result<Self, String> {
        let p = path.to_str().ok_or("the swapfile path is not UTF-8")?;
        let mut sf = Self { path: path.to_path_buf(), active: false };
        let mib = size.div_ceil(1 << 20).to_string();
        run_cmd("dd", &["if=/dev/zero", &format!("of={p}"), "bs=1M", &format!("count={mib}"), "status=none"])?;
        run_cmd("chmod", &["600", p])?;
        run_cmd("mkswap", &[p])?;
        run_cmd("swapon", &[p])?;
        sf.active = true;
        Ok(sf)
    }
}

impl Drop for Swapfile {
    fn drop(&mut self) {
        if self.active {
            if let Some(p) = self.path.to_str() {
                if let Err(e) = run_cmd("swapoff", &[p]) {
                    eprintln!("coalesce bench: {e}");
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn spawn_worker(mode: Mode, opts: &BenchOptions, cgroup: Option<&Cgroup>) -> Result<ModeResult, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "bench-worker",
        "--mode",
        mode.name(),
        "--size",
        &opts.size.to_string(),
        "--local",
        &opts.local.to_string(),
        "--passes",
        &opts.passes.to_string(),
        "--random-reads",
        &opts.random_reads.to_string(),
    ]);
    if opts.trusted_lenders {
        cmd.arg("--trusted-lenders");
    }
    cmd.args(["--redundancy", &opts.redundancy.to_string()]);
    cmd.args(opts.lenders.args());
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    if let Some(cg) = cgroup {
        use std::os::unix::ffi::OsStrExt;
        let procs = std::ffi::CString::new(cg.procs.as_os_str().as_bytes())
            .map_err(|e| BenchError::Setup(format!("cgroup path: {e}")))?;
        let join = move || -> std::io::Result<()> {
            // SAFETY: open/write/close on a C string prepared before the fork: async-signal-safe
            // system calls, no allocation in the forked child.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: `join` only makes async-signal-safe system calls (see above).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, join);
        }
    }
    let out = cmd.output().map_err(|e| BenchError::Worker { mode: mode.name(), reason: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // The worker said why on stderr (inherited); add only what it printed on stdout, if anything.
        let status = out.status.code().map_or_else(|| format!("{}", out.status), |c| format!("exit status {c}"));
        let reason = if stdout.trim().is_empty() {
            format!("{status} (its error is above)")
        } else {
            format!("{status}: {}", stdout.trim())
        };
        return Err(BenchError::Worker { mode: mode.name(), reason });
    }
    stdout
        .lines()
        .find_map(decode)
        .ok_or_else(|| BenchError::Worker { mode: mode.name(), reason: format!("no result line in {stdout:?}") })
}

/// Each mode with its result, or why it was skipped.
pub type Results = Vec<(Mode, Result<ModeResult, String>)>;

/// Runs the comparison; returns each mode's result or why it was skipped.
pub fn run(opts: &BenchOptions) -> Result<Results, BenchError> {
    let mut results = Vec::new();
    eprintln!("running the workload in local memory...");
    results.push((Mode::Local, Ok(spawn_worker(Mode::Local, opts, None)?)));
    eprintln!("running it under Linux swap...");
    results.push((Mode::Swap, run_swap(opts)));
    eprintln!("running it on Coalesce...");
    results.push((Mode::Coalesce, Ok(spawn_worker(Mode::Coalesce, opts, None)?)));
    Ok(results)
}

fn run_swap(opts: &BenchOptions) -> Result<ModeResult, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("skipped: the swap run needs root (swapon and a memory cgroup)".into());
    }
    let swap = Swapfile::create(&opts.swapfile, opts.size + (256 << 20))?;
    let cgroup = Cgroup::create(opts.local)?;
    let mut r = spawn_worker(Mode::Swap, opts, Some(&cgroup)).map_err(|e| e.to_string())?;
    r.note = format!("swapfile {} on the local disk, cgroup limit {} bytes", swap.path.display(), opts.local);
    drop(cgroup);
    drop(swap);
    Ok(r)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mean(d: &[Duration]) -> Duration {
    if d.is_empty() {
        Duration::ZERO
    } else {
        d.iter().sum::<Duration>() / u32::try_from(d.len()).unwrap_or(u32::MAX)
    }
}

/// Formats the table.
pub fn table(opts: &BenchOptions, results: &[(Mode, Result<ModeResult, String>)]) -> String {
    let get = |m: Mode| results.iter().find(|(k, _)| *k == m).and_then(|(_, r)| r.as_ref().ok());
    let (local, swap, co) = (get(Mode::Local), get(Mode::Swap), get(Mode::Coalesce));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workload: {} MiB working set, {} MiB local ({}x less), {} sequential passes, {} random 8-byte reads",
        opts.size >> 20,
        opts.local >> 20,
        opts.size / opts.local.max(1),
        opts.passes,
        opts.random_reads
    );
    let over = if opts.lenders.embedded() {
        format!("{} embedded lender(s) on 127.0.0.1", opts.redundancy.lenders())
    } else {
        let mut over: Vec<String> = opts.lenders.servers.iter().map(ToString::to_string).collect();
        if let Some((method, _)) = &opts.lenders.discover {
            over.push(format!("lenders found with {method}"));
        }
        over.join(", ")
    };
    let _ = writeln!(
        out,
        "coalesce: redundancy {} over {over}, pages {}",
        opts.redundancy,
        if opts.trusted_lenders { "in plaintext" } else { "sealed" }
    );
    let _ = writeln!(
        out,
        "{:<26} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "phase", "local", "swap", "coalesce", "swap/coalesce", "coalesce/local"
    );
    let cell =
        |r: Option<&ModeResult>, f: &dyn Fn(&ModeResult) -> f64| r.map_or("-".to_string(), |r| format!("{:.3}", f(r)));
    let ratio = |a: Option<&ModeResult>, b: Option<&ModeResult>, f: &dyn Fn(&ModeResult) -> f64| match (a, b) {
        (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}x", f(a) / f(b)),
        _ => "-".into(),
    };
    let mut row = |name: String, f: &dyn Fn(&ModeResult) -> f64| {
        let _ = writeln!(
            out,
            "{:<26} {:>10} {:>10} {:>10} {:>14} {:>14}",
            name,
            cell(local, f),
            cell(swap, f),
            cell(co, f),
            ratio(swap, co, f),
            ratio(co, local, f)
        );
    };
    row("fill (s)".into(), &|r| secs(r.fill));
    for i in 0..opts.passes {
        row(format!("sequential pass {} (s)", i + 1), &|r| r.passes.get(i).map_or(0.0, |d| secs(*d)));
    }
    row("sequential passes, all (s)".into(), &|r| r.passes.iter().map(|d| secs(*d)).sum());
    row("random reads (s)".into(), &|r| secs(r.random));
    row("faulted read p50 (us)".into(), &|r| secs(r.faulted.0) * 1e6);
    row("faulted read p99 (us)".into(), &|r| secs(r.faulted.1) * 1e6);
    row("faulted read p99.9 (us)".into(), &|r| secs(r.faulted.2) * 1e6);
    row("reads that faulted".into(), &|r| {
        #[allow(clippy::cast_precision_loss)]
        let n = r.faulted.3 as f64;
        n
    });
    for (m, r) in results {
        match r {
            Ok(r) if !r.note.is_empty() => {
                let _ = writeln!(out, "{}: {}", m.name(), r.note);
            }
            Err(why) => {
                let _ = writeln!(out, "{}: {why}", m.name());
            }
            Ok(_) => {}
        }
    }
    out
}

/// Writes the CSV file.
pub fn write_csv(opts: &BenchOptions, results: &[(Mode, Result<ModeResult, String>)]) -> Result<(), BenchError> {
    let mut s = String::from("mode,metric,value\n");
    for (m, r) in results {
        let Ok(r) = r else { continue };
        let _ = writeln!(s, "{},fill_s,{}", m.name(), secs(r.fill));
        for (i, p) in r.passes.iter().enumerate() {
            let _ = writeln!(s, "{},pass{}_s,{}", m.name(), i + 1, secs(*p));
        }
        let _ = writeln!(s, "{},pass_mean_s,{}", m.name(), secs(mean(&r.passes)));
        let _ = writeln!(s, "{},random_s,{}", m.name(), secs(r.random));
        let _ = writeln!(s, "{},faulted_p50_us,{}", m.name(), secs(r.faulted.0) * 1e6);
        let _ = writeln!(s, "{},faulted_p99_us,{}", m.name(), secs(r.faulted.1) * 1e6);
        let _ = writeln!(s, "{},faulted_p999_us,{}", m.name(), secs(r.faulted.2) * 1e6);
        for (q, v) in &r.latency_cdf {
            let _ = writeln!(s, "{},read_latency_q{q}_us,{}", m.name(), secs(*v) * 1e6);
        }
    }
    std::fs::File::create(&opts.csv)
        .and_then(|mut f| f.write_all(s.as_bytes()))
        .map_err(|source| BenchError::Output { path: opts.csv.clone(), source })
}

/// Draws the SVG chart: phase times per mode, and the random-read latency CDF.
pub fn write_chart(opts: &BenchOptions, results: &[(Mode, Result<ModeResult, String>)]) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| BenchError::Output {
        path: opts.chart.clone(),
        source: std::io::Error::other(e.to_string()),
    };
    let ok: Vec<(Mode, &ModeResult)> = results.iter().filter_map(|(m, r)| r.as_ref().ok().map(|r| (*m, r))).collect();
    let colors = [RGBColor(90, 90, 90), RGBColor(200, 60, 40), RGBColor(30, 110, 200)];
    let root = SVGBackend::new(&opts.chart, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let phases = ["fill", "pass (mean)", "random"];
    let value = |r: &ModeResult, i: usize| match i {
        0 => secs(r.fill),
        1 => secs(mean(&r.passes)),
        _ => secs(r.random),
    };
    let max = ok.iter().flat_map(|(_, r)| (0..3).map(|i| value(r, i))).fold(0.1, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("time per phase (s)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..3f64, 0f64..max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(7)
        .x_label_formatter(&|x| {
            // Labels sit at the middle of each group (0.5, 1.5, 2.5); truncation is the intent.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let i = x.floor().max(0.0) as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                phases.get(i).map_or(String::new(), |s| (*s).to_string())
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    #[allow(clippy::cast_precision_loss)]
    let width = 0.8 / ok.len().max(1) as f64;
    for (k, (m, r)) in ok.iter().enumerate() {
        let color = colors[k % colors.len()];
        #[allow(clippy::cast_precision_loss)]
        let bars = (0..3).map(|i| {
            let x0 = i as f64 + 0.1 + k as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, value(r, i))], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(m.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;

    let max_us = ok.iter().flat_map(|(_, r)| r.latency_cdf.iter().map(|(_, d)| secs(*d) * 1e6)).fold(10.0, f64::max);
    let mut cdf = ChartBuilder::on(&right)
        .caption("random 8-byte read latency (CDF)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..max_us * 1.5).log_scale(), 0f64..1f64)
        .map_err(|e| err(&e))?;
    cdf.configure_mesh().x_desc("microseconds (log)").y_desc("fraction of reads").draw().map_err(|e| err(&e))?;
    for (k, (m, r)) in ok.iter().enumerate() {
        let color = colors[k % colors.len()];
        let points: Vec<(f64, f64)> = r.latency_cdf.iter().map(|(q, d)| ((secs(*d) * 1e6).max(0.01), *q)).collect();
        cdf.draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
