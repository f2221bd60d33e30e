//! The `verbs` provider: RC queue pairs and one-sided RDMA READ/WRITE through libibverbs (real
//! RNICs and Soft-RoCE), built on the `sideway` crate, which loads `libibverbs.so.1` at run time:
//! a build runs on hosts without RDMA libraries and reports their absence as
//! [`TransportError::ProviderUnavailable`].
//!
//! - [`VerbsDevice`]: an opened device, its port, and the GID used (the IPv4-mapped one if any).
//! - [`VerbsEndpoint`] (`endpoint.rs`): the client side of one queue pair: its own protection
//!   domain, completion queue, and the registrations of the local regions it has used (made on
//!   first use, kept until the endpoint is dropped).
//! - [`VerbsDomain`]: the target side of one session: a protection domain holding the session's
//!   slab registrations and its responder queue pairs, so one session's rkeys open nothing of
//!   another's. The target's CPU takes no part in READs and WRITEs.
//!
//! Queue pair addresses ([`QpAddress`]) travel over the control connection (`VERBS_CONNECT`).
//! A request of n segments is posted as n chained work requests, only the last signaled; one
//! completion reports it. After a failed request (a wrong rkey, say) the queue pair is in the
//! error state, as on any RNIC: later requests complete as [`crate::CompletionStatus::Flushed`]; connect
//! a new endpoint. Blocking waits sleep on the endpoint's completion channel until the device
//! reports a completion (`events.rs`); where a channel cannot be made, or with
//! `COALESCE_VERBS_WAIT=poll` ([`WAIT_ENV`]), they poll the queue every few microseconds. A poll
//! takes no more completions from the queue than its caller asks for, into an array on the stack
//! (`poll.rs`). One request in 16 has its round trip timed (for [`VerbsEndpoint::rtt_stats`] and
//! the completion's `rtt`; the others report zero): clock reads are not free everywhere.

use std::sync::{Arc, Mutex, PoisonError};

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::BasicCompletionQueue;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;

use crate::control::QpAddress;
use crate::{ProviderKind, TransportError};

mod endpoint;
mod events;
mod poll;
pub use endpoint::{Readiness, VerbsEndpoint};
use events::CompletionEvents;

/// Port used on every device (Soft-RoCE and single-port RNICs).
const PORT: u8 = 1;
/// Reads (and atomics) in flight per queue pair, both directions. 0 makes READs hang.
const MAX_RD_ATOMIC: u8 = 16;
/// The RC transport's retransmission timeout, as the exponent of 4.096 us: 2^14, 67 ms (a request
/// with no acknowledgement is sent again after that). Long enough for a loaded software RoCE
/// responder, short enough that a dead lender is noticed well within the pager's fetch timeout.
const RC_TIMEOUT: u8 = 14;
/// Retransmissions before a request completes with an error. Not 7: Soft-RoCE (like `rnr_retry`
/// on every device) takes 7 as "retry forever", and a READ from a lender that died then never
/// completed at all (found by `tests/verbs.rs`).
const RC_RETRIES: u8 = 6;
/// Send queue depth: every segment of every outstanding request takes one entry.
const SEND_QUEUE_DEPTH: u32 = 8192;
/// `poll` in this environment variable makes blocking waits poll the completion queue between
/// short sleeps instead of sleeping on a completion channel (`events`, the default): a choice for
/// hosts where the device's completion events are slow to arrive (an emulated guest, say).
pub const WAIT_ENV: &str = "COALESCE_VERBS_WAIT";

fn unavailable(reason: String) -> TransportError {
    TransportError::ProviderUnavailable { provider: ProviderKind::Verbs, reason }
}

fn verbs_error(what: &str, e: impl std::fmt::Display) -> TransportError {
    unavailable(format!("{what} failed: {e}"))
}

/// An opened RDMA device with the port and GID this provider uses.
#[derive(Debug)]
pub struct VerbsDevice {
    ctx: Arc<DeviceContext>,
    name: String,
    gid: Gid,
    gid_index: u8,
    mtu: Mtu,
}

impl VerbsDevice {
    /// Opens `name`, or the first device when `None`. Errors name the missing piece: the
    /// library, any device, or the named one (listing those present).
    pub fn open(name: Option<&str>) -> Result<Arc<Self>, TransportError> {
        let list = DeviceList::new().map_err(|e| {
            unavailable(format!(
                "libibverbs could not be loaded or listed devices ({e}); install rdma-core and ibverbs-providers, \
                 or use --provider shim"
            ))
        })?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(unavailable(
                "no RDMA device: load an RNIC driver, or Soft-RoCE with `soft-roce-setup/rxe-host.sh up IFACE`; \
                 or use --provider shim"
                    .into(),
            ));
        }
        let index = match name {
            Some(n) => names
                .iter()
                .position(|d| d == n)
                .ok_or_else(|| unavailable(format!("no RDMA device named {n}; present: {}", names.join(", "))))?,
            None => 0,
        };
        let device = list.get(index).ok_or_else(|| unavailable("the device list changed while opening".into()))?;
        let ctx = device.open().map_err(|e| verbs_error("opening the RDMA device", e))?;
        let port = ctx.query_port(PORT).map_err(|e| verbs_error("querying port 1", e))?;
        let gids = ctx.query_gid_table().map_err(|e| verbs_error("querying the GID table", e))?;
        let on_port: Vec<_> = gids.iter().filter(|g| g.port_num() == u32::from(PORT) && !g.gid().is_zero()).collect();
        // RoCE: the IPv4-mapped GID (::ffff:a.b.c.d) routes; the link-local one does not.
        let ipv4_mapped = |g: &Gid| g.raw[..10].iter().all(|&b| b == 0) && g.raw[10..12] == [0xff, 0xff];
        let entry = on_port
            .iter()
            .find(|g| ipv4_mapped(&g.gid()))
            .or_else(|| on_port.iter().find(|g| !g.gid().is_unicast_link_local()))
            .or_else(|| on_port.first())
            .ok_or_else(|| {
                unavailable(format!("{} has no GID on port 1: give its network interface an address", names[index]))
            })?;
        let gid_index = u8::try_from(entry.gid_index()).map_err(|_| unavailable("GID index above 255".into()))?;
        let mtu = port.active_mtu();
        tracing::info!(device = %names[index], gid = %entry.gid(), gid_index, ?mtu, "verbs device opened");
        Ok(Arc::new(Self { gid: entry.gid(), gid_index, mtu, name: names[index].clone(), ctx }))
    }

    /// The device `name` (or the first one), opened once per process: every connection made
    /// while any user holds it shares one device context.
    pub fn shared(name: Option<&str>) -> Result<Arc<Self>, TransportError> {
        type Opened = Vec<(Option<String>, std::sync::Weak<VerbsDevice>)>;
        static OPENED: std::sync::Mutex<Opened> = std::sync::Mutex::new(Vec::new());
        let mut opened = OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        opened.retain(|(_, device)| device.strong_count() > 0);
        if let Some(device) = opened.iter().find(|(n, _)| n.as_deref() == name).and_then(|(_, d)| d.upgrade()) {
            return Ok(device);
        }
        let device = Self::open(name)?;
        opened.push((name.map(str::to_owned), Arc::downgrade(&device)));
        Ok(device)
    }

    /// The device's name (e.g. `rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn alloc_pd(&self) -> Result<Arc<ProtectionDomain>, TransportError> {
        self.ctx.alloc_pd().map_err(|e| verbs_error("allocating a protection domain", e))
    }

    /// A completion queue of `entries`, reporting its completions as events on `events` if given.
    fn create_cq(
        &self,
        entries: u32,
        events: Option<&CompletionEvents>,
    ) -> Result<Arc<BasicCompletionQueue>, TransportError> {
        let mut builder = self.ctx.create_cq_builder();
        builder.setup_cqe(entries);
        if let Some(events) = events {
            builder.setup_comp_channel(events.channel(), 0);
        }
        builder.build().map_err(|e| verbs_error("creating a completion queue", e))
    }

    /// A completion channel for an endpoint's blocking waits, or `None` (said once) if the device
    /// cannot make one or `COALESCE_VERBS_WAIT=poll` asks for none: the waits then poll.
    fn completion_events(&self) -> Option<CompletionEvents> {
        if std::env::var_os(WAIT_ENV).is_some_and(|v| v == "poll") {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| tracing::info!("{WAIT_ENV}=poll: blocking waits poll the completion queue"));
            return None;
        }
        match CompletionEvents::new(&self.ctx) {
            Ok(events) => Some(events),
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(device = %self.name, error = %e, "no completion channel: blocking waits poll the completion queue");
                });
                None
            }
        }
    }

    /// Makes an RC queue pair in `pd` with `cq` for both queues; returns it with its first PSN.
    fn create_qp(
        &self,
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<BasicCompletionQueue>,
    ) -> Result<(BasicQueuePair, u32), TransportError> {
        let mut builder = pd.create_qp_builder();
        builder
            .setup_max_send_wr(SEND_QUEUE_DEPTH)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(Arc::clone(cq))
            .setup_recv_cq(Arc::clone(cq));
        let mut qp = builder.build().map_err(|e| verbs_error("creating a queue pair", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(PORT)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite);
        qp.modify(&attr).map_err(|e| verbs_error("moving the queue pair to INIT", e))?;
        Ok((qp, fastrand::u32(..1 << 24)))
    }

    /// Moves `qp` to RTR then RTS, connected to `remote`.
    fn connect_qp(&self, qp: &mut BasicQueuePair, local_psn: u32, remote: &QpAddress) -> Result<(), TransportError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(MAX_RD_ATOMIC)
            .setup_min_rnr_timer(12);
        let mut av = AddressHandleAttribute::new();
        av.setup_dest_lid(0)
            .setup_port(PORT)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&av);
        qp.modify(&attr).map_err(|e| verbs_error("moving the queue pair to RTR", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(local_psn)
            // A request with no answer (a lender that died, a lost path) is sent again after
            // 4.096 us x 2^14 = 67 ms, up to 6 times; then it completes with an error (the pager
            // marks the lender failed and fails over) about half a second after it was posted.
            // READ and WRITE never meet receiver-not-ready NAKs (those are for SENDs).
            .setup_timeout(RC_TIMEOUT)
            .setup_retry_cnt(RC_RETRIES)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(MAX_RD_ATOMIC);
        qp.modify(&attr).map_err(|e| verbs_error("moving the queue pair to RTS", e))
    }

    fn address(&self, qp: &BasicQueuePair, psn: u32) -> QpAddress {
        QpAddress { qpn: qp.qp_number(), psn, gid: self.gid.raw }
    }
}

/// Registers `[addr, addr + len)` in `pd` for local writes and remote reads and writes.
///
/// # Safety
/// The range must stay mapped until the returned registration is dropped.
unsafe fn register(pd: &Arc<ProtectionDomain>, addr: *mut u8, len: usize) -> Result<Arc<MemoryRegion>, TransportError> {
    let access = AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite;
    // SAFETY: the caller keeps the range mapped for the registration's life; the NIC writes into
    // it only through requests whose buffers the callers own.
    unsafe { pd.reg_mr(addr as usize, len, access) }.map_err(|e| verbs_error("registering memory", e))
}

/// The target side of one session: its protection domain, slab registrations and queue pairs.
#[derive(Debug)]
pub struct VerbsDomain {
    device: Arc<VerbsDevice>,
    pd: Arc<ProtectionDomain>,
    cq: Arc<BasicCompletionQueue>,
    qps: Mutex<Vec<BasicQueuePair>>,
}

/// A slab registered for one-sided access by one session.
#[derive(Debug)]
pub struct VerbsRegistration {
    mr: Arc<MemoryRegion>,
}

impl VerbsRegistration {
    /// The key that opens the slab to the session's queue pairs (and to no other session's).
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

impl VerbsDomain {
    /// A new domain on `device`.
    pub fn new(device: &Arc<VerbsDevice>) -> Result<Self, TransportError> {
        Ok(Self {
            device: Arc::clone(device),
            pd: device.alloc_pd()?,
            cq: device.create_cq(16, None)?,
            qps: Mutex::new(Vec::new()),
        })
    }

    /// Registers a slab of this session.
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay mapped until the registration is dropped.
    pub unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<VerbsRegistration, TransportError> {
        // SAFETY: forwarded from the caller.
        Ok(VerbsRegistration { mr: unsafe { register(&self.pd, addr, len) }? })
    }

    /// Makes a responder queue pair connected to the client's `remote` one; returns its address.
    pub fn accept(&self, remote: &QpAddress) -> Result<QpAddress, TransportError> {
        let (mut qp, psn) = self.device.create_qp(&self.pd, &self.cq)?;
        self.device.connect_qp(&mut qp, psn, remote)?;
        let local = self.device.address(&qp, psn);
        self.qps.lock().unwrap_or_else(PoisonError::into_inner).push(qp);
        Ok(local)
    }
}
