//! The borrower's side of discovery (`--discover`): lenders announced on the local network
//! (`memory-server --announce`, DNS-SD over mDNS) become the pager's lenders: those seen within
//! the first wait when it starts, and any announced later while it runs (`Pager::add_lender`).
//! A lender speaking another protocol version or offering another provider is skipped, said once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coalesce_pager::Pager;
use discovery::{Browser, Event, LenderAd};
use rdma::ProviderKind;

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
pub fn initial(browser: &Browser, wait: Duration, provider: ProviderKind) -> Vec<SocketAddr> {
    let found: Vec<SocketAddr> =
        browser.collect(wait).into_iter().filter(|ad| usable(ad, provider)).map(|ad| ad.addr).collect();
    tracing::info!(lenders = found.len(), ?wait, "lenders discovered");
    found
}

/// Adopts lenders announced while the pager runs, until `stop` is set.
pub fn adopt(browser: &Browser, pager: &Pager, provider: ProviderKind, stop: &AtomicBool) {
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
            Some(Event::Withdrawn(name)) => {
                tracing::info!(service = %name, "a lender withdrew its announcement (it drains: its pages move away)");
            }
            _ => {}
        }
    }
}
