//! # Coalesce
//!
//! Memory disaggregation in user space: a process borrows memory from nearby machines. This crate
//! is the facade over the workspace: [`rdma`] (the verbs-shaped transport and its software NIC),
//! [`pager`] (the userfaultfd pager and its explicit API) and [`server`] (the `memory-server` daemon
//! and its control client). The `coalesce` command-line tool
//! is built from this package too.

pub use coalesce_pager as pager;
pub use rdma;
pub use remote_mem_server as server;

pub mod bench;
pub mod demo;
pub mod latency;
pub mod run;
pub mod stress;
pub mod workload;
