//! # The lender: donate memory to Coalesce pagers
//!
//! The library behind the `memory-server` daemon (whose command line, signal handling and logging
//! set-up live with its binary, `src/bin/memory-server.rs` of the `coalesce` package). The pool is
//! reserved lazily: each slab is its own anonymous mapping (no swap reservation), made when a
//! client asks for it and unmapped when it is freed or its lease runs out, so a new owner always
//! starts from zeros and never sees another client's data. Clients speak the control protocol
//! (tabled in the `rdma` crate docs, client in `rdma::client`) on the same port as the shim's data
//! connections.
//!
//! - [`start`] runs a lender in this process (`memory-server`, and `coalesce demo|run|bench`'s
//!   embedded lender);
//! - [`ServerConfig`] says what it donates and how;
//! - [`ServerHandle::drain`] makes it leave on purpose: no new clients or slabs, clients told in
//!   their heartbeats how long they have to move their pages, and [`ServerHandle::wait_drained`]
//!   returns once they have freed every slab (or at the deadline).
//!
//! ```no_run
//! use rdma::client::{ClientOptions, ControlClient};
//! use lender::ServerConfig;
//! let server = lender::start(ServerConfig::loopback())?;
//! let mut client = ControlClient::connect(server.addr(), &ClientOptions::default())?;
//! let slab = client.alloc_slab()?;
//! assert_eq!(slab.len, server.stats().slab_size);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use rdma::ProviderKind;

mod backup;
mod deadline;
mod link;
pub mod peers;
pub mod persist;
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
    /// The backup log (`--persist`) could not be opened or replayed.
    #[error("cannot keep backups: {0}; check --persist (a writable directory)")]
    Persist(#[from] persist::PersistError),
}

/// The largest slab: 2^20 pages of 4 KiB (the borrower numbers a slab's pages in 20 bits).
pub const MAX_SLAB_SIZE: u64 = 4 << 30;

/// The capacity offered when none is configured, if the machine has room for it.
pub const DEFAULT_CAPACITY: u64 = 4 << 30;

/// Memory this machine can back now: `MemAvailable` from `/proc/meminfo` (free memory plus what
/// the kernel can reclaim without swapping), if it can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The capacity offered when none is configured: [`DEFAULT_CAPACITY`], or half the memory the
/// machine has available if that is less (in whole slabs of `slab_size`, at least one).
pub fn default_capacity(slab_size: u64) -> u64 {
    let half = available_memory().map_or(DEFAULT_CAPACITY, |a| a / 2);
    let capacity = DEFAULT_CAPACITY.min(half);
    (capacity - capacity % slab_size.max(1)).max(slab_size)
}

/// A duration as `--lease` would take it (seconds, or milliseconds below one second).
fn humantime_like(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
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
    /// Most connections open at once from one IP address.
    pub max_connections_per_peer: usize,
    /// Bytes one client (session) may hold (`None`: up to the capacity).
    pub quota: Option<u64>,
    /// Accept a capacity beyond the memory the machine has available (the OOM killer decides what
    /// happens when it is used).
    pub overcommit: bool,
    /// How long a new connection may take to send its complete first frame.
    pub handshake_timeout: Duration,
    /// The cluster key: every connection must authenticate with it, and control frames travel
    /// sealed ([`rdma::secure`]). `None`: no authentication (loopback only, unless `insecure`).
    pub key: Option<rdma::secure::ClusterKey>,
    /// Serve without a cluster key on an address other than loopback.
    pub insecure: bool,
    /// RDMA device for the verbs provider (`None`: the first one).
    pub device: Option<String>,
    /// Keep clients' backup pages in an append-only log in this directory (`--persist`): the
    /// backup tier. `None`: backup requests are refused.
    pub persist: Option<std::path::PathBuf>,
    /// How long a backup page may wait for its fsync when no client asks for one
    /// (`--fsync-interval`; a client's checkpoint syncs at once).
    pub fsync_interval: Duration,
    /// The backups of a client that has had no session here for this long are dropped
    /// (`--backup-expiry`): a borrower that exited cleanly drops its own at once, one that
    /// crashed leaves them behind, and nothing can read them once it is gone.
    pub backup_expiry: Duration,
    /// Emulate this link on everything the server sends, data and control (`--link`): the
    /// distance a borrower measures to this lender. `None`: the real link. Change it while the
    /// server runs with [`ServerHandle::set_link`].
    pub link: Option<rdma::LinkProfile>,
    /// After answering a request, a shim data connection's thread keeps checking its socket for
    /// the next one this long before it sleeps, yielding the CPU between checks to any thread
    /// that wants it (`--poll-spin`; at most 10 ms; zero, the default: sleep at once). A
    /// borrower faulting page after page then finds the thread awake instead of paying its
    /// wake-up; but on a machine whose cores are busy with other work it made replies much slower
    /// (most likely each yield gives a busy core's time slice away; BENCHMARKS.md, "A lender
    /// that polls"). Verbs connections take no thread of the server's.
    pub poll_spin: Duration,
}

/// The longest [`ServerConfig::poll_spin`] accepted.
pub const MAX_POLL_SPIN: Duration = Duration::from_millis(10);

impl ServerConfig {
    /// Defaults on 127.0.0.1 with an OS-chosen port: 4 GiB (or half the available memory, if
    /// less; [`default_capacity`]) in 64 MiB slabs, 30 s lease, 4096 connections (1024 per
    /// address), no quota, 10 s to send the first frame.
    pub fn loopback() -> Self {
        let slab_size = 64 << 20;
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            capacity: default_capacity(slab_size),
            slab_size,
            lease: Duration::from_secs(30),
            provider: ProviderKind::Shim,
            max_connections: 4096,
            max_connections_per_peer: 1024,
            quota: None,
            overcommit: false,
            handshake_timeout: Duration::from_secs(10),
            key: None,
            insecure: false,
            device: None,
            persist: None,
            fsync_interval: Duration::from_secs(1),
            backup_expiry: Duration::from_secs(24 * 3600),
            link: None,
            poll_spin: Duration::ZERO,
        }
    }

    /// A lender embedded in a borrowing process (`coalesce demo|run|bench|stress`), asked for
    /// `wanted` bytes: the [`ServerConfig::loopback`] defaults with that capacity, capped at three
    /// quarters of the memory the machine has available (the embedded lender's slabs share the
    /// machine with the borrower; a borrower that needs more gets "capacity exhausted" and keeps
    /// pages local, loudly, instead of meeting the OOM killer).
    pub fn embedded(wanted: u64) -> Self {
        let base = Self::loopback();
        let room = available_memory().map_or(wanted, |a| a / 4 * 3);
        Self { capacity: wanted.min(room).max(base.slab_size), ..base }
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
        if self.lease < Duration::from_millis(100) || self.lease > Duration::from_secs(86_400) {
            return Err(ServerError::Config(format!(
                "--lease {} is out of range: it must be between 100ms and 24h",
                humantime_like(self.lease)
            )));
        }
        if self.fsync_interval.is_zero() || self.fsync_interval > Duration::from_secs(3600) {
            return Err(ServerError::Config(format!(
                "--fsync-interval {} is out of range: it must be between 1ms and 1h",
                humantime_like(self.fsync_interval)
            )));
        }
        if self.backup_expiry < Duration::from_secs(1) || self.backup_expiry > Duration::from_secs(365 * 86_400) {
            return Err(ServerError::Config(format!(
                "--backup-expiry {} is out of range: it must be between 1s and 365 days",
                humantime_like(self.backup_expiry)
            )));
        }
        if self.poll_spin > MAX_POLL_SPIN {
            return Err(ServerError::Config(format!(
                "--poll-spin {} is out of range: it must be at most {} (0s: sleep at once)",
                humantime_like(self.poll_spin),
                humantime_like(MAX_POLL_SPIN)
            )));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(ServerError::Config(format!(
                "--max-connections {} is out of range: it must be between 1 and 1000000",
                self.max_connections
            )));
        }
        if self.slab_size > MAX_SLAB_SIZE {
            return Err(ServerError::Config(format!(
                "--slab-size {} is above the maximum of {} (a slab's pages are numbered in 20 bits)",
                ByteSize(self.slab_size),
                ByteSize(MAX_SLAB_SIZE)
            )));
        }
        if self.max_connections_per_peer == 0 || self.max_connections_per_peer > self.max_connections {
            return Err(ServerError::Config(format!(
                "--max-connections-per-peer {} is out of range: it must be between 1 and --max-connections ({})",
                self.max_connections_per_peer, self.max_connections
            )));
        }
        if let Some(quota) = self.quota.filter(|&q| q < self.slab_size) {
            return Err(ServerError::Config(format!(
                "--quota {} is smaller than one slab ({}); raise --quota or lower --slab-size",
                ByteSize(quota),
                ByteSize(self.slab_size)
            )));
        }
        if self.handshake_timeout < Duration::from_millis(100) || self.handshake_timeout > Duration::from_secs(600) {
            return Err(ServerError::Config(format!(
                "--handshake-timeout {} is out of range: it must be between 100ms and 10min",
                humantime_like(self.handshake_timeout)
            )));
        }
        if self.key.is_none() && !self.insecure && !self.listen.ip().is_loopback() {
            return Err(ServerError::Config(format!(
                "--listen {} is not a loopback address and there is no --key-file: anyone who can reach it \
                 could borrow this memory; make a key with `coalesce keygen FILE` and pass --key-file FILE \
                 (to every lender and borrower), or pass --insecure",
                self.listen
            )));
        }
        if !self.overcommit {
            if let Some(available) = available_memory().filter(|&a| self.capacity > a) {
                return Err(ServerError::Config(format!(
                    "--capacity {} is more than this machine can back ({} available now); lower --capacity, \
                     or pass --overcommit to offer it anyway (the OOM killer decides when it runs out)",
                    ByteSize(self.capacity),
                    ByteSize(available)
                )));
            }
        }

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_values_are_refused_with_the_flag_named() {
        let ok = ServerConfig::loopback();
        assert!(ok.validate().is_ok());
        let cases = [
            (ServerConfig { lease: Duration::from_secs(10_000_000_000_000_000_000), ..ok.clone() }, "--lease"),
            (ServerConfig { lease: Duration::from_millis(10), ..ok.clone() }, "--lease"),
            (ServerConfig { max_connections: 0, ..ok.clone() }, "--max-connections"),
            (ServerConfig { slab_size: 8 << 60, capacity: u64::MAX, ..ok.clone() }, "--slab-size"),
            (ServerConfig { capacity: 100 << 40, ..ok.clone() }, "--overcommit"),
            (ServerConfig { max_connections_per_peer: 0, ..ok.clone() }, "--max-connections-per-peer"),
            (ServerConfig { quota: Some(4096), ..ok.clone() }, "--quota"),
            (ServerConfig { handshake_timeout: Duration::from_secs(86_400), ..ok.clone() }, "--handshake-timeout"),
            (ServerConfig { backup_expiry: Duration::ZERO, ..ok.clone() }, "--backup-expiry"),
            (ServerConfig { backup_expiry: Duration::from_secs(400 * 86_400), ..ok.clone() }, "--backup-expiry"),
            (ServerConfig { listen: SocketAddr::from(([0, 0, 0, 0], 7470)), ..ok.clone() }, "--key-file"),
            (ServerConfig { poll_spin: Duration::from_millis(11), ..ok.clone() }, "--poll-spin"),
        ];
        for (config, flag) in cases {
            let err = config.validate().expect_err(flag).to_string();
            assert!(err.contains(flag), "{err}");
        }
        let overcommitted = ServerConfig { capacity: 100 << 40, overcommit: true, ..ok.clone() };
        assert!(overcommitted.validate().is_ok(), "--overcommit accepts it");
        let exposed = ServerConfig { listen: SocketAddr::from(([0, 0, 0, 0], 7470)), insecure: true, ..ok.clone() };
        assert!(exposed.validate().is_ok(), "--insecure accepts it");
        let sleeping = ServerConfig { poll_spin: Duration::ZERO, ..ok.clone() };
        assert!(sleeping.validate().is_ok(), "--poll-spin 0s sleeps at once");
    }

    #[test]
    fn the_default_capacity_fits_the_machine() {
        let capacity = default_capacity(64 << 20);
        assert!((64 << 20..=DEFAULT_CAPACITY).contains(&capacity));
        assert_eq!(capacity % (64 << 20), 0);
        if let Some(available) = available_memory() {
            assert!(capacity <= available.max(64 << 20), "{capacity} > {available}");
        }
    }
}
