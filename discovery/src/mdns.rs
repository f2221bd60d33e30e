//! DNS-SD over multicast DNS: a lender's [`Announcer`] and a borrower's [`Browser`].
//!
//! What crosses the network: the lender answers queries and re-announces itself every
//! announcement interval (with its current free capacity); a browser asks again every
//! [`QUERY_INTERVAL`] and takes unsolicited announcements as they come. Record TTLs are
//! `mdns-sd`'s defaults (120 s for address and SRV records, 4500 s for PTR and TXT); a lender
//! that leaves on purpose withdraws its records (a goodbye), one that crashes is found out by its
//! lease, not by discovery. The lender announces only on the interface it listens on (loopback
//! when it listens on 127.0.0.1).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::{DiscoveryError, Event, LenderAd, Source};

/// The DNS-SD service type of Coalesce lenders.
pub const SERVICE_TYPE: &str = "_coalesce._tcp.local.";

fn mdns(e: mdns_sd::Error) -> DiscoveryError {
    DiscoveryError::Mdns(e.to_string())
}

/// Reads an mDNS announcement back; `None` when it is not one of ours.
fn from_resolved(s: &mdns_sd::ResolvedService) -> Option<LenderAd> {
    let ip = s.get_addresses_v4().into_iter().min()?;
    LenderAd::from_properties(SocketAddr::new(IpAddr::V4(ip), s.get_port()), |k| s.get_property_val_str(k))
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

/// How often a browser asks again who is there (one query packet each time): the longest a
/// lender that appears goes unseen.
pub const QUERY_INTERVAL: Duration = Duration::from_secs(1);

/// Browses for lenders on every interface.
pub struct Browser {
    daemon: ServiceDaemon,
    /// The current browse's events, when it was started, and the address of every instance
    /// resolved (so that a withdrawal names it).
    state: std::sync::Mutex<BrowseState>,
}

struct BrowseState {
    events: mdns_sd::Receiver<ServiceEvent>,
    since: Instant,
    addrs: HashMap<String, SocketAddr>,
}

impl Browser {
    /// Starts browsing. Announcements a lender multicasts on its own (when it starts, and every
    /// announcement interval) are taken as they come, not only answers to this browser's
    /// queries (which `mdns-sd` spaces out exponentially).
    pub fn start() -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(mdns)?;
        daemon.accept_unsolicited(true).map_err(mdns)?;
        let events = daemon.browse(SERVICE_TYPE).map_err(mdns)?;
        let state = BrowseState { events, since: Instant::now(), addrs: HashMap::new() };
        Ok(Self { daemon, state: std::sync::Mutex::new(state) })
    }
}

impl Source for Browser {
    fn next(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            // Ask again now and then: `mdns-sd` spaces its own queries out exponentially.
            if state.since.elapsed() >= QUERY_INTERVAL {
                match self.daemon.browse(SERVICE_TYPE) {
                    Ok(fresh) => (state.events, state.since) = (fresh, Instant::now()),
                    Err(e) => tracing::warn!("browsing again failed: {e}"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now()).min(QUERY_INTERVAL);
            let event = match state.events.recv_timeout(left) {
                Ok(e) => e,
                Err(_) if Instant::now() < deadline => continue,
                Err(_) => return None,
            };
            match event {
                ServiceEvent::ServiceResolved(s) => match from_resolved(&s) {
                    Some(ad) => {
                        state.addrs.insert(s.get_fullname().to_owned(), ad.addr);
                        return Some(Event::Announced(ad));
                    }
                    None => {
                        tracing::warn!(service = %s.get_fullname(), "ignoring an announcement that is not a Coalesce lender's")
                    }
                },
                ServiceEvent::ServiceRemoved(_, name) => {
                    let addr = state.addrs.remove(&name);
                    return Some(Event::Withdrawn { name, addr });
                }
                _ => {}
            }
        }
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
