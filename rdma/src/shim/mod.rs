//! The `shim` provider: a software NIC over TCP. [`endpoint`] is the initiator (queue pair and
//! completion queue), [`target`] the server side that executes one-sided operations against
//! registered memory.

pub mod endpoint;
pub mod target;
