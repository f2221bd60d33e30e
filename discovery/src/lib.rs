//! Finding lenders on a local network with zero configuration: DNS-SD over multicast DNS
//! (through the `mdns-sd` crate). A lender (`memory-server --announce`) publishes a
//! `_coalesce._tcp.local.` service whose TXT record carries the protocol version, the data-path
//! provider, its free capacity and its class; a borrower (`--discover`) browses for it and adopts
//! lenders as they appear.
//!
//! What crosses the network: the lender answers queries and re-announces itself every
//! announcement interval (with its current free capacity); the browser queries when it starts
//! and as `mdns-sd` refreshes its cache. Record TTLs are `mdns-sd`'s defaults (120 s for address
//! and SRV records, 4500 s for PTR and TXT); a lender that leaves on purpose withdraws its
//! records (a goodbye), one that crashes is found out by its lease, not by discovery.
//!
//! An announcement is only a hint: the borrower still says hello on the control protocol (and,
//! with a cluster key, authenticates) before it trusts a lender with a page. The lender announces
//! only on the interface it listens on (loopback when it listens on 127.0.0.1).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type of Coalesce lenders.
pub const SERVICE_TYPE: &str = "_coalesce._tcp.local.";

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon could not start or refused a request.
    #[error("mDNS: {0} (multicast must be enabled on the interface: `ip link set DEV multicast on`)")]
    Mdns(String),
    /// An announcement that cannot be made.
    #[error("cannot announce {addr}: {reason}")]
    Announcement {
        /// The lender's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

fn mdns(e: mdns_sd::Error) -> DiscoveryError {
    DiscoveryError::Mdns(e.to_string())
}

/// What a lender says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LenderAd {
    /// Where its control and data connections go.
    pub addr: SocketAddr,
    /// Its control protocol version.
    pub version: u8,
    /// Its data-path provider (`shim` or `verbs`).
    pub provider: String,
    /// Memory it can still lend, in bytes.
    pub free_bytes: u64,
    /// Its class (free text chosen by its operator, e.g. `edge`, `rack`, `phone`).
    pub class: String,
}

impl LenderAd {
    fn properties(&self) -> [(&'static str, String); 4] {
        [
            ("v", self.version.to_string()),
            ("provider", self.provider.clone()),
            ("free", self.free_bytes.to_string()),
            ("class", self.class.clone()),
        ]
    }

    /// Reads an announcement back; `None` (logged) when it is not one of ours.
    fn from_resolved(s: &mdns_sd::ResolvedService) -> Option<Self> {
        let prop = |k: &str| s.get_property_val_str(k);
        let version = prop("v")?.parse().ok()?;
        let ip = s.get_addresses_v4().into_iter().min()?;
        Some(Self {
            addr: SocketAddr::new(IpAddr::V4(ip), s.get_port()),
            version,
            provider: prop("provider").unwrap_or("shim").to_owned(),
            free_bytes: prop("free").and_then(|f| f.parse().ok()).unwrap_or(0),
            class: prop("class").unwrap_or("").to_owned(),
        })
    }
}

/// A lender's announcement, published while this lives (withdrawn by [`Announcer::stop`] or
/// on drop).
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
    instance: String,
}

impl Announcer {
    /// Publishes `ad` on the interface of its address (every interface when it listens on all).
    pub fn start(ad: &LenderAd) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(mdns)?;
        let ip = ad.addr.ip();
        if !ip.is_unspecified() {
            daemon.disable_interface(IfKind::All).map_err(mdns)?;
            let kind = if ip.is_loopback() { IfKind::LoopbackV4 } else { IfKind::Addr(ip) };
            daemon.enable_interface(kind).map_err(mdns)?;
        }
        let instance =
            format!("lender-{}-{}-{}", ip.to_string().replace(['.', ':'], "-"), ad.addr.port(), std::process::id());
        let mut announcer = Self { daemon, fullname: String::new(), instance };
        announcer.fullname = announcer.publish(ad)?;
        tracing::info!(service = %announcer.fullname, addr = %ad.addr, "announcing this lender over mDNS");
        Ok(announcer)
    }

    fn publish(&self, ad: &LenderAd) -> Result<String, DiscoveryError> {
        let host = format!("{}.local.", self.instance);
        let ip = ad.addr.ip();
        let info = if ip.is_unspecified() {
            ServiceInfo::new(SERVICE_TYPE, &self.instance, &host, "", ad.addr.port(), &ad.properties()[..])
                .map(ServiceInfo::enable_addr_auto)
        } else {
            ServiceInfo::new(SERVICE_TYPE, &self.instance, &host, ip, ad.addr.port(), &ad.properties()[..])
        }
        .map_err(|e| DiscoveryError::Announcement { addr: ad.addr, reason: e.to_string() })?;
        let fullname = info.get_fullname().to_owned();
        self.daemon.register(info).map_err(mdns)?;
        Ok(fullname)
    }

    /// Announces `ad` again (its free capacity changed): browsers see the new TXT record.
    pub fn update(&self, ad: &LenderAd) -> Result<(), DiscoveryError> {
        self.publish(ad).map(|_| ())
    }

    /// Withdraws the announcement (browsers see the lender go) and stops the daemon.
    pub fn stop(self) {
        drop(self);
    }
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer").field("fullname", &self.fullname).finish_non_exhaustive()
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        if let Ok(done) = self.daemon.unregister(&self.fullname) {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// What a browser saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lender announced itself (again, perhaps with new free capacity).
    Announced(LenderAd),
    /// A lender withdrew its announcement (it is leaving); by its DNS-SD instance name.
    Withdrawn(String),
}

/// How often a browser asks again who is there (one query packet each time): the longest a
/// lender that appears goes unseen.
pub const QUERY_INTERVAL: Duration = Duration::from_secs(1);

/// Browses for lenders on every interface.
pub struct Browser {
    daemon: ServiceDaemon,
    events: std::sync::Mutex<(mdns_sd::Receiver<ServiceEvent>, Instant)>,
}

impl Browser {
    /// Starts browsing. Announcements a lender multicasts on its own (when it starts, and every
    /// announcement interval) are taken as they come, not only answers to this browser's
    /// queries (which `mdns-sd` spaces out exponentially): a new lender is seen at once.
    pub fn start() -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(mdns)?;
        daemon.accept_unsolicited(true).map_err(mdns)?;
        let events = daemon.browse(SERVICE_TYPE).map_err(mdns)?;
        Ok(Self { daemon, events: std::sync::Mutex::new((events, Instant::now())) })
    }

    /// The next event, waiting at most `timeout`; `None` when nothing came.
    pub fn next(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            // Ask again now and then: `mdns-sd` spaces its own queries out exponentially.
            if events.1.elapsed() >= QUERY_INTERVAL {
                match self.daemon.browse(SERVICE_TYPE) {
                    Ok(fresh) => *events = (fresh, Instant::now()),
                    Err(e) => tracing::warn!("browsing again failed: {e}"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now()).min(QUERY_INTERVAL);
            let event = match events.0.recv_timeout(left) {
                Ok(e) => e,
                Err(_) if Instant::now() < deadline => continue,
                Err(_) => return None,
            };
            match event {
                ServiceEvent::ServiceResolved(s) => match LenderAd::from_resolved(&s) {
                    Some(ad) => return Some(Event::Announced(ad)),
                    None => {
                        tracing::warn!(service = %s.get_fullname(), "ignoring an announcement that is not a Coalesce lender's")
                    }
                },
                ServiceEvent::ServiceRemoved(_, name) => return Some(Event::Withdrawn(name)),
                _ => {}
            }
        }
    }

    /// Every lender announced within `within` (the first wait of a borrower), each once.
    pub fn collect(&self, within: Duration) -> Vec<LenderAd> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<LenderAd> = Vec::new();
        while let Some(event) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if let Event::Announced(ad) = event {
                match seen.iter_mut().find(|s| s.addr == ad.addr) {
                    Some(s) => *s = ad,
                    None => seen.push(ad),
                }
            }
        }
        seen
    }
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").finish_non_exhaustive()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}
