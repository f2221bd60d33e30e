//! # memory-server: the lender
//!
//! A daemon that donates memory to Coalesce pagers. The pool is reserved lazily: each slab is its
//! own anonymous mapping (no swap reservation), made when a client asks for it and unmapped when
//! it is freed or its lease runs out, so a new owner always starts from zeros and never sees another
//! client's data. Clients speak the control protocol (tabled in the `rdma` crate docs) on the same
//! port as the shim's data connections.
//!
//! - [`start`] runs a server in this process (the `coalesce` command embeds one this way);
//! - [`run_cli`] is the `memory-server` binary;
//! - [`client::ControlClient`] is the client side, used by the pager and by tests.
//!
//! ```no_run
//! use remote_mem_server::{client::{ClientOptions, ControlClient}, ServerConfig};
//! let server = remote_mem_server::start(ServerConfig::loopback())?;
//! let mut client = ControlClient::connect(server.addr(), &ClientOptions::default())?;
//! let slab = client.alloc_slab()?;
//! assert_eq!(slab.len, server.stats().slab_size);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Parser;
use rdma::ProviderKind;

pub mod client;
mod server;
pub mod sessions;

pub use server::{start, ServerHandle};

/// Errors that stop a server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick another --listen address or stop whatever holds the port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a server thread: {source}")]
    Thread {
        /// Cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The verbs provider could not be set up.
    #[error("cannot offer the verbs provider: {0}")]
    Verbs(#[source] rdma::TransportError),
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on for control and data connections.
    pub listen: SocketAddr,
    /// Bytes this server may hand out in all.
    pub capacity: u64,
    /// Size of each slab (a multiple of 4 KiB).
    pub slab_size: u64,
    /// A client whose heartbeats stop for this long loses its slabs.
    pub lease: Duration,
    /// Data-path provider offered.
    pub provider: ProviderKind,
    /// Most connections open at once.
    pub max_connections: usize,
    /// RDMA device for the verbs provider (`None`: the first one).
    pub device: Option<String>,
}

impl ServerConfig {
    /// Defaults on 127.0.0.1 with an OS-chosen port: 4 GiB in 64 MiB slabs, 30 s lease.
    pub fn loopback() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            capacity: 4 << 30,
            slab_size: 64 << 20,
            lease: Duration::from_secs(30),
            provider: ProviderKind::Shim,
            max_connections: 4096,
            device: None,
        }
    }

    /// Checks the settings for consistency.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.slab_size < 4096 || !self.slab_size.is_multiple_of(4096) {
            return Err(ServerError::Config(format!(
                "--slab-size {} must be a positive multiple of 4 KiB",
                ByteSize(self.slab_size)
            )));
        }
        if usize::try_from(self.slab_size).is_err() {
            return Err(ServerError::Config("--slab-size does not fit this machine's address space".into()));
        }
        if self.capacity < self.slab_size {
            return Err(ServerError::Config(format!(
                "--capacity {} is smaller than one slab ({}); raise --capacity or lower --slab-size",
                ByteSize(self.capacity),
                ByteSize(self.slab_size)
            )));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(ServerError::Config("--lease must be at least 100ms".into()));
        }
        Ok(())
    }
}

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
        for more); the bound address is printed on stdout as `listening on ADDR`. SIGINT or SIGTERM \
        stops the server cleanly."
)]
pub struct Cli {
    /// Address to listen on for control and data connections (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,
    /// Memory to donate in all, e.g. 4GiB or 512MiB. Reserved lazily, slab by slab.
    #[arg(long, default_value = "4GiB")]
    pub capacity: ByteSize,
    /// Size of each slab handed to clients (a multiple of 4KiB), e.g. 64MiB.
    #[arg(long, default_value = "64MiB")]
    pub slab_size: ByteSize,
    /// Reclaim the slabs of a client whose heartbeats stop for this long, e.g. 30s or 500ms.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Data-path provider to offer: shim (software NIC over TCP) or verbs.
    #[arg(long, default_value = "shim")]
    pub provider: ProviderKind,
    /// Most connections (control and data) open at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// RDMA device for --provider verbs, e.g. rxe0 or mlx5_0 (default: the first device).
    #[arg(long)]
    pub device: Option<String>,
}

impl Cli {
    /// The configuration these flags describe.
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            capacity: self.capacity.as_u64(),
            slab_size: self.slab_size.as_u64(),
            lease: self.lease,
            provider: self.provider,
            max_connections: self.max_connections,
            device: self.device.clone(),
        }
    }
}

/// Installs the `tracing` subscriber used by the binaries: stderr, filtered by `RUST_LOG`
/// (default: `default_level`, e.g. `info`).
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Entry point of the `memory-server` binary.
pub fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    let mut signals =
        match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("memory-server: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
    let handle = match start(cli.config()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("memory-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", handle.addr());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
    }
    handle.shutdown();
    ExitCode::SUCCESS
}
