//! `coalesce run`: runs an unmodified program with `libcoalesce.so` preloaded, so its heap lives in
//! a pager region over the given memory servers (or an embedded loopback one), forwards its exit
//! status, and prints the pager's statistics, the run time and the peak resident memory on exit.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use coalesce_pager::ExitReport;

use rdma::ProviderKind;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Memory servers.
    pub servers: Vec<SocketAddr>,
    /// Find lenders besides `servers` (`COALESCE_DISCOVER`, `COALESCE_REGISTRY`), waiting this long
    /// for the first ones at the start of each process (`COALESCE_DISCOVER_WAIT`).
    pub discover: Option<(coalesce_pager::discover::Method, std::time::Duration)>,
    /// Start a memory-server in this process on 127.0.0.1 for the run.
    pub embedded_server: bool,
    /// Local budget in bytes.
    pub local: u64,
    /// How far past the budget the heap may stay local when no lender takes pages.
    pub local_max: coalesce_pager::LocalMax,
    /// Heap size limit in bytes.
    pub heap_size: u64,
    /// Data-path provider.
    pub provider: ProviderKind,
    /// Print statistics on exit.
    pub stats: bool,
    /// Pages travel and rest in plaintext (no sealing).
    pub trusted_lenders: bool,
    /// The cluster key file, passed to the program (`COALESCE_KEY_FILE`) and used by the
    /// embedded lender.
    pub key_file: Option<std::path::PathBuf>,
    /// Copies or shards of each page (`None`: the preload's default for the number of lenders).
    pub redundancy: Option<coalesce_pager::store::Redundancy>,
    /// Background re-replication rate in bytes per second (0: off).
    pub repair_rate: u64,
    /// The backup tier (`COALESCE_BACKUP`), if any.
    pub backup: Option<std::net::SocketAddr>,
    /// The longest a page waits to be written behind (`COALESCE_BACKUP_LAG`).
    pub backup_lag: std::time::Duration,
    /// Fault-handling threads per process (`COALESCE_FAULT_THREADS`; `None`: the preload's
    /// default for the machine).
    pub fault_threads: Option<usize>,
    /// A service-level objective (`COALESCE_SLO`).
    pub slo: Option<coalesce_pager::Slo>,
    /// Hedged reads of replicated pages (`COALESCE_HEDGE`).
    pub hedged_reads: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

/// How the program ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Exit status to forward (128 + signal when killed).
    pub code: i32,
    /// Wall time.
    pub elapsed: Duration,
    /// Peak resident memory of the program, in bytes.
    pub max_rss: u64,
    /// The statistics the program's pager reported at exit.
    pub stats: Option<ExitReport>,
    /// The reports of the other processes it started under the preload (a pipeline's, a shell's
    /// children), by pid.
    pub others: Vec<ExitReport>,
}

/// Errors of `coalesce run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The preload library is not where it should be.
    #[error("cannot find libcoalesce.so ({0}); build it with `cargo build --release -p coalesce-preload` or set COALESCE_PRELOAD_LIB")]
    NoLibrary(String),
    /// No program given.
    #[error("no program to run: use `coalesce run [OPTIONS] -- PROGRAM [ARGS...]`")]
    NoProgram,
    /// The embedded server did not start.
    #[error(transparent)]
    Server(#[from] lender::ServerError),
    /// The key file cannot be used.
    #[error(transparent)]
    Key(#[from] rdma::secure::SecureError),
    /// The statistics directory could not be made.
    #[error("cannot make the statistics directory {0}: {1}; set TMPDIR to a writable directory, or use --quiet")]
    Stats(PathBuf, std::io::Error),
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Finds `libcoalesce.so`: `COALESCE_PRELOAD_LIB`, next to this executable, or `../lib/`.
pub fn library_path() -> Result<PathBuf, RunError> {
    if let Some(p) = std::env::var_os("COALESCE_PRELOAD_LIB") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RunError::NoLibrary(format!("COALESCE_PRELOAD_LIB={} does not exist", p.display())))
        };
    }
    let exe = std::env::current_exe().map_err(|e| RunError::NoLibrary(e.to_string()))?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let candidates = [dir.join("libcoalesce.so"), dir.join("../lib/libcoalesce.so")];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        RunError::NoLibrary(format!(
            "looked in {}",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Sets the program's environment: the preload library first in `LD_PRELOAD`, and every
/// `COALESCE_*` variable `opts` decides, set or removed (an inherited one must not override the
/// command line).
fn set_environment(
    cmd: &mut Command,
    opts: &RunOptions,
    lib: std::path::PathBuf,
    servers: &[std::net::SocketAddr],
    stats_dir: Option<&std::path::Path>,
) {
    let mut preload = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    cmd.env("LD_PRELOAD", preload);
    if servers.is_empty() {
        cmd.env_remove("COALESCE_SERVERS");
    } else {
        let list: Vec<String> = servers.iter().map(ToString::to_string).collect();
        cmd.env("COALESCE_SERVERS", list.join(","));
    }
    cmd.env_remove("COALESCE_DISCOVER").env_remove("COALESCE_REGISTRY");
    match &opts.discover {
        Some((coalesce_pager::discover::Method::Mdns, wait)) => {
            cmd.env("COALESCE_DISCOVER", "1").env("COALESCE_DISCOVER_WAIT", format!("{}ms", wait.as_millis()));
        }
        Some((coalesce_pager::discover::Method::Registry(r), wait)) => {
            cmd.env("COALESCE_REGISTRY", r.to_string())
                .env("COALESCE_DISCOVER_WAIT", format!("{}ms", wait.as_millis()));
        }
        None if servers.is_empty() => {
            eprintln!(
                "coalesce: no --servers, --embedded-server, --discover or --registry: the program runs on plain local memory"
            );
        }
        None => {}
    }
    cmd.env("COALESCE_LOCAL", opts.local.to_string())
        .env("COALESCE_LOCAL_MAX", opts.local_max.to_string())
        .env("COALESCE_HEAP_SIZE", opts.heap_size.to_string())
        .env("COALESCE_PROVIDER", opts.provider.to_string())
        .env("COALESCE_TRUSTED_LENDERS", if opts.trusted_lenders { "1" } else { "0" });
    cmd.env("COALESCE_REPAIR_RATE", opts.repair_rate.to_string());
    match opts.redundancy {
        Some(r) => cmd.env("COALESCE_REDUNDANCY", r.to_string()),
        None => cmd.env_remove("COALESCE_REDUNDANCY"),
    };
    match opts.backup {
        Some(addr) => cmd.env("COALESCE_BACKUP", addr.to_string()),
        None => cmd.env_remove("COALESCE_BACKUP"),
    };
    cmd.env("COALESCE_BACKUP_LAG", format!("{}ms", opts.backup_lag.as_millis()));
    cmd.env("COALESCE_HEDGE", if opts.hedged_reads { "1" } else { "0" });
    if let Some(n) = opts.fault_threads {
        cmd.env("COALESCE_FAULT_THREADS", n.to_string());
    }
    match opts.slo {
        Some(slo) => cmd.env("COALESCE_SLO", slo.to_string()),
        None => cmd.env_remove("COALESCE_SLO"),
    };
    match &opts.key_file {
        Some(path) => cmd.env("COALESCE_KEY_FILE", path),
        None => cmd.env_remove("COALESCE_KEY_FILE"),
    };
    if let Some(dir) = stats_dir {
        cmd.env("COALESCE_STATS", dir);
    }
}

/// Runs the program and waits for it.
pub fn run(opts: &RunOptions) -> Result<RunOutcome, RunError> {
    let (program, args) = opts.command.split_first().ok_or(RunError::NoProgram)?;
    let lib = library_path()?;
    let embedded = if opts.embedded_server {
        let capacity = opts.heap_size.max(1 << 30);
        let key = opts.key_file.as_deref().map(rdma::secure::ClusterKey::from_file).transpose()?;
        let config = lender::ServerConfig { key, ..lender::ServerConfig::embedded(capacity) };
        Some(lender::start(config)?)
    } else {
        None
    };
    let mut servers = opts.servers.clone();
    if let Some(s) = &embedded {
        servers.push(s.addr());
    }
    // Every process under the preload writes its own report into this directory.
    let stats_dir = std::env::temp_dir().join(format!("coalesce-run-stats-{}", std::process::id()));
    if opts.stats {
        std::fs::create_dir_all(&stats_dir).map_err(|e| RunError::Stats(stats_dir.clone(), e))?;
    }
    let mut cmd = Command::new(program);
    cmd.args(args);
    set_environment(&mut cmd, opts, lib, &servers, opts.stats.then_some(stats_dir.as_path()));
    let start = Instant::now();
    let child =
        cmd.spawn().map_err(|source| RunError::Spawn { program: program.to_string_lossy().into_owned(), source })?;
    let pid = libc::pid_t::try_from(child.id()).unwrap_or(-1);
    let forwarding = crate::signals::forward_to(pid);
    // Stop forwarding once the program has exited, before it is reaped (its pid is then free).
    wait_exited(pid);
    if let Ok(handle) = forwarding {
        handle.close();
    }
    let (code, max_rss) = wait(pid);
    // The child has been reaped by wait4; `Child` must not wait again.
    std::mem::forget(child);
    let elapsed = start.elapsed();
    let (stats, others) = read_reports(&stats_dir, child_pid(pid));
    let _ = std::fs::remove_dir_all(&stats_dir);
    // The program's own high-water mark, as the preload read it at exit, is exact; `ru_maxrss`
    // also counts this process's address space, which a spawned child shares until exec.
    let max_rss = stats.as_ref().map(|s| s.peak_rss_bytes).filter(|&b| b > 0).unwrap_or(max_rss);
    if let Some(s) = embedded {
        s.shutdown();
    }
    Ok(RunOutcome { code, elapsed, max_rss, stats, others })
}

fn child_pid(pid: libc::pid_t) -> u32 {
    u32::try_from(pid).unwrap_or(0)
}

/// The reports the preloaded processes wrote into `dir`: the program's own (pid `main`), and the
/// others by pid.
fn read_reports(dir: &std::path::Path, main: u32) -> (Option<ExitReport>, Vec<ExitReport>) {
    let mut reports: Vec<ExitReport> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path()).ok()?;
            serde_json::from_str(&text)
                .map_err(|e| tracing::warn!(file = %entry.path().display(), error = %e, "unreadable statistics"))
                .ok()
        })
        .collect();
    reports.sort_by_key(|r| r.pid);
    let own = reports.iter().position(|r| r.pid == main).map(|i| reports.remove(i));
    (own, reports)
}

/// Waits until `pid` has exited, without reaping it.
fn wait_exited(pid: libc::pid_t) {
    let Ok(id) = libc::id_t::try_from(pid) else { return };
    loop {
        // SAFETY: zeroed siginfo is a valid value to be overwritten.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting (without reaping) for our own child with a valid out-pointer.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Waits for `pid`; returns the status to forward and its peak RSS in bytes.
fn wait(pid: libc::pid_t) -> (i32, u64) {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child with valid out-pointers.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return (1, 0);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    };
    (code, u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024)
}
