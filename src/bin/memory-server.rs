//! The `memory-server` daemon: its command line, signal handling and logging set-up. The lender
//! itself is the `coalesce-lender` library ([`lender::start`]).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Parser;
use lender::ServerConfig;
use rdma::ProviderKind;

/// The `memory-server` command line.
#[derive(Debug, Parser)]
#[command(
    name = "memory-server",
    version,
    about = "Donate this machine's memory to Coalesce pagers over one-sided RDMA or the software NIC",
    long_about = "Donate this machine's memory to Coalesce pagers.\n\n\
        Clients say hello on the control protocol, receive slabs (address + rkey) and then read and \
        write pages one-sided, without this daemon's application code in the data path. Slabs of a \
        client whose heartbeats stop are reclaimed after the lease. Logs go to stderr (RUST_LOG=debug \
        for more); the bound address is printed on stdout as `listening on ADDR`.\n\n\
        SIGTERM or SIGINT drains the server: it refuses new clients and slabs, tells its clients \
        (within a second, in their heartbeats) that it is leaving, keeps serving them while they move \
        their pages to other lenders, and exits once no slab is left or at --drain-timeout. A second \
        signal exits at once.\n\n\
        --link emulates a link (lan, 5g-urllc, wifi, or delay=..,jitter=..,bandwidth=..,stall=..@..%) on \
        everything this server sends, so that one machine can hold lenders at different distances; \
        with --link-file the profile is read from a file, and again on SIGHUP (the lender moved)."
)]
struct Cli {
    /// Address to listen on for control and data connections (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7470")]
    listen: SocketAddr,
    /// Memory to donate in all, e.g. 4GiB or 512MiB. Reserved lazily, slab by slab. Default: 4GiB,
    /// or half the memory available now if that is less. More than the machine has available is
    /// refused unless --overcommit.
    #[arg(long)]
    capacity: Option<ByteSize>,
    /// Offer a --capacity beyond the memory this machine has available (the OOM killer decides
    /// what happens when clients use it).
    #[arg(long)]
    overcommit: bool,
    /// Most memory one client may hold, e.g. 1GiB (default: no limit below --capacity).
    #[arg(long)]
    quota: Option<ByteSize>,
    /// Size of each slab handed to clients (a multiple of 4KiB), e.g. 64MiB.
    #[arg(long, default_value = "64MiB")]
    slab_size: ByteSize,
    /// Reclaim the slabs of a client whose heartbeats stop for this long, e.g. 30s or 500ms.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Data-path provider to offer: shim (software NIC over TCP) or verbs.
    #[arg(long, default_value = "shim")]
    provider: ProviderKind,
    /// Most connections (control and data) open at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most connections open at once from one IP address (default: 1024, or --max-connections if
    /// that is less).
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// How long a new connection may take to send its complete first frame (HELLO or
    /// DATA_CONNECT), e.g. 10s; also bounds each later control frame once it has started.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// The cluster key (made by `coalesce keygen FILE`; mode 600): every connection must
    /// authenticate with it and control frames travel encrypted. Without it the server listens on
    /// loopback only, unless --insecure.
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
    /// Serve without a cluster key on an address other than loopback (anyone who can reach the
    /// port can borrow memory).
    #[arg(long)]
    insecure: bool,
    /// RDMA device for --provider verbs, e.g. rxe0 or mlx5_0 (default: the first device).
    #[arg(long)]
    device: Option<String>,
    /// On SIGTERM or SIGINT, how long clients get to move their pages elsewhere before the server
    /// exits (0s: exit at once, as on a crash).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Serve as a backup tier: keep clients' backup pages (their `--backup` write-behind) in an
    /// append-only log in this directory, replayed (checksums verified, a torn tail cut off) when
    /// the server starts again.
    #[arg(long)]
    persist: Option<std::path::PathBuf>,
    /// With --persist: how long a stored page may wait for its fsync (a client's checkpoint
    /// syncs at once; a killed server loses nothing, a machine crash at most this much).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    fsync_interval: Duration,
    /// With --persist: drop the backups of a client that has had no session here for this long
    /// (a borrower that crashed leaves its backups behind; one that exits cleanly drops them
    /// at once). Between 1s and 365 days.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    backup_expiry: Duration,
    /// Emulate this link on everything the server sends (data and control): loopback, lan,
    /// 5g-urllc, wifi, or e.g. "delay=2ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%". Borrowers measure it as
    /// this lender's distance.
    #[arg(long, conflicts_with = "link_file")]
    link: Option<rdma::LinkProfile>,
    /// Like --link, the profile read from this file; read again on SIGHUP (a bad profile is
    /// logged and the current one kept).
    #[arg(long)]
    link_file: Option<std::path::PathBuf>,
    /// Announce this lender on the local network (DNS-SD over mDNS, `_coalesce._tcp.local.`,
    /// on the interface of --listen) so that borrowers started with --discover find it; the
    /// announcement is withdrawn when the server starts draining.
    #[arg(long)]
    announce: bool,
    /// Register this lender in etcd (etcd://HOST:PORT[/PREFIX], default prefix
    /// /coalesce/lenders/) under a lease kept alive while it runs, so that borrowers started with
    /// --registry find it; the key is deleted when the server starts draining.
    #[arg(long)]
    registry: Option<discovery::RegistryAddr>,
    /// With --registry: the lease's time to live (renewed every third of it): how long a lender
    /// that died or stalled stays listed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    registry_ttl: Duration,
    /// With --announce or --registry: how often the announcement is repeated with the current
    /// free capacity.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    announce_interval: Duration,
    /// With --announce: this lender's class, for borrowers' tables (e.g. edge, rack, phone).
    #[arg(long, default_value = "edge")]
    class: String,
    /// After answering a request, a data connection's thread keeps checking for the next one
    /// this long before it sleeps, yielding the CPU to anything else that wants it: a borrower
    /// faulting page after page then finds it awake. Worth it only where this machine's cores
    /// are otherwise idle: with busy neighbours it made replies much slower (shim provider;
    /// e.g. 200us; at most 10ms; 0s: sleep at once, using no CPU between requests).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    poll_spin: Duration,
}

/// What this lender announces about itself now.
fn advertisement(handle: &lender::ServerHandle, class: &str) -> discovery::LenderAd {
    let s = handle.stats();
    discovery::LenderAd {
        addr: handle.addr(),
        version: rdma::frame::VERSION,
        provider: handle.provider().to_string(),
        free_bytes: s.capacity.saturating_sub(s.allocated),
        class: class.to_owned(),
    }
}

/// Starts the announcements asked for (mDNS with --announce, etcd with --registry).
fn start_announcements(
    handle: &lender::ServerHandle,
    cli: &Cli,
) -> Result<(Option<discovery::Announcer>, Option<discovery::Registrar>), discovery::DiscoveryError> {
    let ad = advertisement(handle, &cli.class);
    let announcer = cli.announce.then(|| discovery::Announcer::start(&ad)).transpose()?;
    let registrar = cli.registry.as_ref().map(|r| discovery::Registrar::start(r, &ad, cli.registry_ttl)).transpose()?;
    Ok((announcer, registrar))
}

/// Keeps the announcements up until `leaving` is set, repeating them every --announce-interval
/// with the current free capacity; withdraws them when it returns.
fn announce(
    handle: &lender::ServerHandle,
    cli: &Cli,
    (announcer, registrar): (Option<discovery::Announcer>, Option<discovery::Registrar>),
    leaving: &std::sync::atomic::AtomicBool,
) {
    let mut last = std::time::Instant::now();
    while !leaving.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= cli.announce_interval {
            last = std::time::Instant::now();
            let ad = advertisement(handle, &cli.class);
            if let Some(a) = &announcer {
                if let Err(e) = a.update(&ad) {
                    tracing::warn!("announcing again failed: {e}");
                }
            }
            if let Some(r) = &registrar {
                r.update(&ad);
            }
        }
    }
    tracing::info!("withdrawing this lender's announcements");
    if let Some(a) = announcer {
        a.stop();
    }
    if let Some(r) = registrar {
        r.stop();
    }
}

/// The link profile in `path` (one profile, as for --link).
fn read_link_file(path: &std::path::Path) -> Result<rdma::LinkProfile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --link-file {}: {e}", path.display()))?;
    text.trim().parse().map_err(|e| format!("--link-file {}: {e}", path.display()))
}

impl Cli {
    /// The configuration these flags describe.
    fn config(&self) -> Result<ServerConfig, String> {
        let slab_size = self.slab_size.as_u64();
        let key =
            self.key_file.as_deref().map(rdma::secure::ClusterKey::from_file).transpose().map_err(|e| e.to_string())?;
        let link = match &self.link_file {
            Some(path) => Some(read_link_file(path)?),
            None => self.link.clone(),
        };
        Ok(ServerConfig {
            listen: self.listen,
            capacity: self.capacity.map_or_else(|| lender::default_capacity(slab_size), |c| c.as_u64()),
            slab_size,
            lease: self.lease,
            provider: self.provider,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer.unwrap_or(self.max_connections.min(1024)),
            quota: self.quota.map(|q| q.as_u64()),
            overcommit: self.overcommit,
            handshake_timeout: self.handshake_timeout,
            key,
            insecure: self.insecure,
            device: self.device.clone(),
            persist: self.persist.clone(),
            fsync_interval: self.fsync_interval,
            backup_expiry: self.backup_expiry,
            link,
            poll_spin: self.poll_spin,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    coalesce::init_logging("info");
    let mut signals =
        match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("memory-server: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
    if cli.drain_timeout > Duration::from_secs(86_400) {
        eprintln!("memory-server: --drain-timeout {:?} is out of range: it must be at most 24h", cli.drain_timeout);
        return ExitCode::FAILURE;
    }
    if cli.announce_interval < Duration::from_millis(100) || cli.announce_interval > Duration::from_secs(3600) {
        eprintln!("memory-server: --announce-interval {:?} is out of range: 100ms to 1h", cli.announce_interval);
        return ExitCode::FAILURE;
    }
    if cli.registry_ttl < Duration::from_secs(2) || cli.registry_ttl > Duration::from_secs(3600) {
        eprintln!("memory-server: --registry-ttl {:?} is out of range: 2s to 1h", cli.registry_ttl);
        return ExitCode::FAILURE;
    }
    let config = match cli.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("memory-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match lender::start(config) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("memory-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reload = match &cli.link_file {
        Some(path) => match signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) {
            Ok(s) => Some((s, path.clone())),
            Err(e) => {
                eprintln!("memory-server: cannot install the SIGHUP handler: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let announcements = match start_announcements(&handle, &cli) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("memory-server: {e}");
            handle.shutdown();
            return ExitCode::FAILURE;
        }
    };
    // Said once the server is reachable and announced: a registry that cannot be reached is
    // refused above, before anyone is told an address.
    println!("listening on {}", handle.addr());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let leaving = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        if cli.announce || cli.registry.is_some() {
            scope.spawn(|| announce(&handle, &cli, announcements, &leaving));
        }
        let reload_handle = reload.map(|(mut signals, path)| {
            let h = signals.handle();
            let handle = &handle;
            scope.spawn(move || {
                for _ in signals.forever() {
                    match read_link_file(&path).and_then(|p| handle.set_link(p)) {
                        Ok(()) => {}
                        Err(e) => tracing::error!("keeping the current link: {e}"),
                    }
                }
            });
            h
        });
        wait_and_drain(&mut signals, &handle, cli.drain_timeout, &|| {
            leaving.store(true, std::sync::atomic::Ordering::Release);
        });
        leaving.store(true, std::sync::atomic::Ordering::Release);
        if let Some(h) = reload_handle {
            h.close();
        }
    });
    handle.shutdown();
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT, then drains (unless --drain-timeout is 0) until no slab is left,
/// the deadline passes, or a second signal comes.
/// `on_leaving` runs as soon as the first signal comes.
fn wait_and_drain(
    signals: &mut signal_hook::iterator::Signals,
    handle: &lender::ServerHandle,
    drain_timeout: Duration,
    on_leaving: &dyn Fn(),
) {
    let first = signals.forever().next();
    on_leaving();
    if let Some(sig) = first {
        if drain_timeout.is_zero() {
            tracing::info!(signal = sig, "shutting down (--drain-timeout 0s)");
        } else {
            handle.drain(drain_timeout);
            // A second signal ends the drain at once.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = std::sync::Arc::clone(&stop);
            let second = signals.handle();
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    if signals.forever().next().is_some() {
                        flag.store(true, std::sync::atomic::Ordering::Release);
                    }
                });
                if handle.wait_drained(&stop) {
                    tracing::info!("drained: every client moved its pages elsewhere");
                }
                second.close();
            });
        }
    }
}
