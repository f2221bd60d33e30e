//! # Coalesce
//!
//! Memory disaggregation in user space: a process borrows memory from nearby machines. This crate
//! is the facade over the workspace: [`rdma`] (the verbs-shaped transport, its software NIC and
//! the control protocol's client), [`pager`] (the userfaultfd pager and its explicit API) and
//! [`lender`] (the lender behind the `memory-server` daemon). The `coalesce` command-line tool and
//! the `memory-server` binary are built from this package too. ARCHITECTURE.md at the repository
//! root maps the crates and follows one page fault and one eviction through the code.

pub use coalesce_pager as pager;
pub use lender;
pub use rdma;

pub mod bench;
pub mod demo;
pub mod latency;
pub mod lenders;
pub mod run;
pub mod signals;
pub mod stress;
pub mod workload;

/// Installs the `tracing` subscriber the binaries use: stderr, filtered by `RUST_LOG` (default:
/// `default_level`, e.g. `info`).
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
