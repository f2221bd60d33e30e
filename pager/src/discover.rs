//! Lenders found rather than named ([`PagerConfig::discovery`]): `--discover` (announced on the
//! local network over mDNS) or `--registry etcd://...` (registered in etcd), through the
//! `coalesce-discovery` crate. Those announced within [`PagerConfig::discovery_wait`] join the
//! named ones when the pager starts; a `discover` thread then adopts any announced later
//! ([`crate::Pager::add_lender`]) and retires one that withdraws or whose registration expires
//! ([`crate::Pager::retire_lender`]: its pages move to the others while it still serves them). A
//! retired lender that announces itself again is taken back once its pages have moved away.
//! A lender speaking another protocol version or offering another provider is skipped, said once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use discovery::{DiscoveryError, Event, LenderAd, Method, RegistryAddr, Source};
use rdma::ProviderKind;

use crate::{PagerConfig, PagerError, Shared};

/// The longest first wait accepted.
pub const MAX_DISCOVERY_WAIT: Duration = Duration::from_secs(600);

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

/// Starts looking for lenders as `config.discovery` says, and adds those announced within
/// `config.discovery_wait` to `config.servers`. Returns the source to keep watching (`None`
/// without discovery). Fails when looking cannot start, or when no lender at all is known.
pub(crate) fn start(config: &mut PagerConfig) -> Result<Option<Box<dyn Source>>, PagerError> {
    let Some(method) = &config.discovery else { return Ok(None) };
    let source = method.open()?;
    let wait = config.discovery_wait;
    let found: Vec<SocketAddr> =
        source.collect(wait).into_iter().filter(|ad| usable(ad, config.provider)).map(|ad| ad.addr).collect();
    tracing::info!(%method, lenders = found.len(), ?wait, "lenders discovered");
    for addr in found {
        if !config.servers.contains(&addr) {
            config.servers.push(addr);
        }
    }
    if config.servers.is_empty() {
        let hint = match method {
            Method::Mdns => "is a `memory-server --announce` running on this network, with multicast on its interface?",
            Method::Registry(_) => "is a `memory-server --registry` registered there?",
        };
        return Err(PagerError::NoLenders(format!("none was announced within {wait:?} ({method}): {hint}")));
    }
    Ok(Some(source))
}

/// Adopts lenders announced while the pager runs, until it shuts down.
pub(crate) fn adopt(source: &dyn Source, shared: &Shared) {
    let store = &shared.store;
    let provider = shared.config.provider;
    let mut retired: HashSet<SocketAddr> = HashSet::new();
    let mut skipped: HashSet<SocketAddr> = HashSet::new();
    while !shared.shutdown.load(Ordering::Acquire) {
        let Some(event) = source.next(Duration::from_millis(100)) else { continue };
        tracing::debug!(?event, "discovery");
        match event {
            Event::Announced(ad) if !skipped.contains(&ad.addr) => {
                let known = store.lenders().iter().any(|l| l.addr == ad.addr);
                if known && !retired.contains(&ad.addr) {
                    continue;
                }
                if !usable(&ad, provider) {
                    skipped.insert(ad.addr);
                    continue;
                }
                // A retired lender comes back through `add_lender` too (once it holds nothing).
                match store.add_lender(ad.addr) {
                    Ok(()) => {
                        tracing::info!(addr = %ad.addr, class = %ad.class, free_bytes = ad.free_bytes, "adopted a discovered lender");
                        retired.remove(&ad.addr);
                    }
                    // Tried again at its next announcement.
                    Err(e) => tracing::warn!(addr = %ad.addr, "cannot adopt a discovered lender: {e}"),
                }
            }
            Event::Withdrawn { name, addr: Some(addr) } if store.lenders().iter().any(|l| l.addr == addr) => {
                tracing::warn!(%addr, %name, "a lender withdrew (or its registration expired): moving its pages to the others");
                match store.retire_lender(addr) {
                    Ok(()) => {
                        retired.insert(addr);
                    }
                    Err(e) => tracing::warn!(%addr, "cannot retire it: {e}"),
                }
            }
            _ => {}
        }
    }
}
