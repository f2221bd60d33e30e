//! The borrower's side of discovery (`--discover`: lenders announced on the local network over
//! mDNS; `--registry etcd://...`: lenders registered in etcd): they become the pager's lenders,
//! those seen within the first wait when it starts and any announced later while it runs
//! (`Pager::add_lender`); one that withdraws (or whose registration expires) is retired: its
//! pages move to the others while it still serves them (`Pager::retire_lender`). A lender
//! speaking another protocol version or offering another provider is skipped, said once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coalesce_pager::Pager;
use discovery::{Event, LenderAd, RegistryAddr, Source};
use rdma::ProviderKind;

/// Where lenders are found.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// Announced on the local network (DNS-SD over mDNS).
    Mdns,
    /// Registered in etcd.
    Registry(RegistryAddr),
}

impl Discovery {
    /// Starts looking.
    pub fn open(&self) -> Result<Box<dyn Source>, discovery::DiscoveryError> {
        Ok(match self {
            Self::Mdns => Box::new(discovery::Browser::start()?),
            Self::Registry(r) => Box::new(discovery::Watcher::start(r)?),
        })
    }
}

/// True when this borrower can use the announced lender; logs why not otherwise.
fn usable(ad: &LenderAd, provider: ProviderKind) -> bool {
    if ad.version != rdma::frame::VERSION {
        tracing::warn!(addr = %ad.addr, version = ad.version, ours = rdma::frame::VERSION, "skipping a discovered lender: it speaks another protocol version");
        return false;
    }
    if ad.provider != provider.to_string() {
        tracing::warn!(addr = %ad.addr, provider = %ad.provider, ours = %provider, "skipping a discovered lender: it offers another provider");
        return false;
    }
    true
}

/// The lenders announced within `wait`, usable with `provider`.
pub fn initial(browser: &dyn Source, wait: Duration, provider: ProviderKind) -> Vec<SocketAddr> {
    let found: Vec<SocketAddr> =
        browser.collect(wait).into_iter().filter(|ad| usable(ad, provider)).map(|ad| ad.addr).collect();
    tracing::info!(lenders = found.len(), ?wait, "lenders discovered");
    found
}

/// Adopts lenders announced while the pager runs, until `stop` is set.
pub fn adopt(browser: &dyn Source, pager: &Pager, provider: ProviderKind, stop: &AtomicBool) {
    let mut known: HashSet<SocketAddr> = pager.lenders().into_iter().map(|l| l.addr).collect();
    let mut skipped: HashSet<SocketAddr> = HashSet::new();
    while !stop.load(Ordering::Acquire) {
        let event = browser.next(Duration::from_millis(100));
        if let Some(e) = &event {
            tracing::debug!(event = ?e, "discovery");
        }
        match event {
            Some(Event::Announced(ad)) if !known.contains(&ad.addr) && !skipped.contains(&ad.addr) => {
                if !usable(&ad, provider) {
                    skipped.insert(ad.addr);
                    continue;
                }
                match pager.add_lender(ad.addr) {
                    Ok(()) => {
                        tracing::info!(addr = %ad.addr, class = %ad.class, free_bytes = ad.free_bytes, "adopted a discovered lender");
                        known.insert(ad.addr);
                    }
                    // Tried again at its next announcement.
                    Err(e) => tracing::warn!(addr = %ad.addr, "cannot adopt a discovered lender: {e}"),
                }
            }
            Some(Event::Withdrawn { name, addr: Some(addr) }) if known.contains(&addr) => {
                tracing::warn!(%addr, %name, "a lender withdrew (or its registration expired): moving its pages to the others");
                if let Err(e) = pager.retire_lender(addr) {
                    tracing::warn!(%addr, "cannot retire it: {e}");
                }
            }
            _ => {}
        }
    }
}
