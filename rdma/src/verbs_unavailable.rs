//! Stand-ins for the `verbs` provider in builds without the `verbs` cargo feature: the same
//! types, whose constructors report [`TransportError::ProviderUnavailable`] with how to get it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::control::QpAddress;
use crate::link::RttStats;
use crate::{Completion, PollMode, ProviderKind, TransportError, WorkRequest};

fn not_built() -> TransportError {
    TransportError::ProviderUnavailable {
        provider: ProviderKind::Verbs,
        reason: "this build has no verbs provider: rebuild with `--features verbs` (needs cmake and libclang-dev; \
                 libibverbs is loaded at run time), or use --provider shim"
            .into(),
    }
}

/// An RDMA device (never opened in this build).
#[derive(Debug)]
pub struct VerbsDevice(());

impl VerbsDevice {
    /// Always fails: this build has no verbs provider.
    pub fn open(_name: Option<&str>) -> Result<Arc<Self>, TransportError> {
        Err(not_built())
    }

    /// Always fails: this build has no verbs provider.
    pub fn shared(_name: Option<&str>) -> Result<Arc<Self>, TransportError> {
        Err(not_built())
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        ""
    }
}

/// What a wait over several endpoints may do about one verbs endpoint (only `Poll` here).
#[derive(Debug)]
pub enum Readiness<'a> {
    /// A completion is ready.
    Now,
    /// Sleep until this descriptor is readable.
    Channel(std::os::fd::BorrowedFd<'a>),
    /// Sleep at most a few microseconds, then poll.
    Poll,
}

/// A session's target side (never made in this build).
#[derive(Debug)]
pub struct VerbsDomain(());

/// A slab registration (never made in this build).
#[derive(Debug)]
pub struct VerbsRegistration(());

impl VerbsRegistration {
    /// The slab's remote key.
    pub fn rkey(&self) -> u32 {
        0
    }
}

impl VerbsDomain {
    /// Always fails: this build has no verbs provider.
    pub fn new(_device: &Arc<VerbsDevice>) -> Result<Self, TransportError> {
        Err(not_built())
    }

    /// Always fails: this build has no verbs provider.
    ///
    /// # Safety
    /// None needed; kept for the same signature as the real provider.
    pub unsafe fn register(&self, _addr: *mut u8, _len: usize) -> Result<VerbsRegistration, TransportError> {
        Err(not_built())
    }

    /// Always fails: this build has no verbs provider.
    pub fn accept(&self, _remote: &QpAddress) -> Result<QpAddress, TransportError> {
        Err(not_built())
    }
}

/// A verbs endpoint (never made in this build).
#[derive(Debug)]
pub struct VerbsEndpoint(());

impl VerbsEndpoint {
    /// Always fails: this build has no verbs provider.
    pub fn connect(
        _device: &Arc<VerbsDevice>,
        _peer: SocketAddr,
        _max_outstanding: usize,
        _exchange: impl FnOnce(QpAddress) -> Result<QpAddress, TransportError>,
    ) -> Result<Self, TransportError> {
        Err(not_built())
    }

    /// Unreachable in this build.
    pub fn post(&self, _wr: &WorkRequest) -> Result<(), TransportError> {
        Err(not_built())
    }

    /// Unreachable in this build.
    pub fn poll(&self, _out: &mut Vec<Completion>, _max: usize) -> usize {
        0
    }

    /// Unreachable in this build.
    pub fn wait(&self, _out: &mut Vec<Completion>, _max: usize, _timeout: Duration, _mode: PollMode) -> usize {
        0
    }

    /// Unreachable in this build.
    pub fn outstanding(&self) -> usize {
        0
    }

    /// Unreachable in this build.
    pub fn readiness(&self) -> Readiness<'_> {
        Readiness::Poll
    }

    /// Unreachable in this build.
    pub fn event_wakeups(&self) -> u64 {
        0
    }

    /// Unreachable in this build.
    pub fn rtt_stats(&self) -> RttStats {
        RttStats::default()
    }

    /// Unreachable in this build.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}
