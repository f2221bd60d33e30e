//! Finding lenders: two mechanisms behind one interface ([`Source`]).
//!
//! - **mDNS** (`mdns.rs`, zero configuration on a local network, through the `mdns-sd` crate): a
//!   lender (`memory-server --announce`) publishes a `_coalesce._tcp.local.` DNS-SD service whose
//!   TXT record carries its protocol version, data-path provider, free capacity and class; a
//!   borrower (`--discover`) browses for it.
//! - **etcd** (`registry.rs`, data-centre scale, through the `etcd-client` crate): a lender
//!   (`memory-server --registry etcd://HOST:PORT[/PREFIX]`) keeps a key under the prefix alive
//!   with an etcd lease, its value the same fields; a borrower (`--registry`) reads the prefix and
//!   watches it. A lender whose lease expires (it died, stalled or lost etcd) disappears.
//!
//! An announcement is only a hint: the borrower still says hello on the control protocol (and,
//! with a cluster key, authenticates) before it trusts a lender with a page.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod mdns;
mod registry;

pub use mdns::{Announcer, Browser, QUERY_INTERVAL, SERVICE_TYPE};
pub use registry::{Registrar, Registry, RegistryAddr, Watcher};

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
    /// A registry address that is not `etcd://HOST:PORT[/PREFIX]`.
    #[error("{0:?} is not a registry address like etcd://127.0.0.1:2379 or etcd://HOST:PORT/PREFIX")]
    BadRegistry(String),
    /// The etcd registry failed.
    #[error("etcd registry {endpoint}: {reason}; is etcd running there?")]
    Etcd {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        reason: String,
    },
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

    /// Reads the fields back from `key=value` pairs (`v` is required).
    fn from_properties<'a>(addr: SocketAddr, prop: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        Some(Self {
            addr,
            version: prop("v")?.parse().ok()?,
            provider: prop("provider").unwrap_or("shim").to_owned(),
            free_bytes: prop("free").and_then(|f| f.parse().ok()).unwrap_or(0),
            class: prop("class").unwrap_or("").to_owned(),
        })
    }
}

/// What a source saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lender announced itself (again, perhaps with new free capacity).
    Announced(LenderAd),
    /// A lender withdrew its announcement (it is leaving), or its registration expired.
    Withdrawn {
        /// Its DNS-SD instance name or registry key.
        name: String,
        /// Its address, when known.
        addr: Option<SocketAddr>,
    },
}

/// How a borrower finds lenders: `--discover` (mDNS on the local network) or `--registry URL`
/// (etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Lenders announced on the local network (DNS-SD over mDNS).
    Mdns,
    /// Lenders registered in etcd.
    Registry(RegistryAddr),
}

impl Method {
    /// Starts looking: an mDNS [`Browser`] or an etcd [`Watcher`].
    pub fn open(&self) -> Result<Box<dyn Source>, DiscoveryError> {
        Ok(match self {
            Self::Mdns => Box::new(Browser::start()?),
            Self::Registry(r) => Box::new(Watcher::start(r)?),
        })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mdns => f.write_str("mdns"),
            Self::Registry(r) => write!(f, "{r}"),
        }
    }
}

/// Where a borrower learns of lenders: an mDNS [`Browser`] or an etcd [`Watcher`].
pub trait Source: Send + Sync + std::fmt::Debug {
    /// The next event, waiting at most `timeout`; `None` when nothing came.
    fn next(&self, timeout: Duration) -> Option<Event>;

    /// Every lender announced within `within` (a borrower's first wait), each once.
    fn collect(&self, within: Duration) -> Vec<LenderAd> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<LenderAd> = Vec::new();
        while let Some(event) = self.next(deadline.saturating_duration_since(Instant::now())) {
            match event {
                Event::Announced(ad) => match seen.iter_mut().find(|s| s.addr == ad.addr) {
                    Some(s) => *s = ad,
                    None => seen.push(ad),
                },
                Event::Withdrawn { addr: Some(addr), .. } => seen.retain(|s| s.addr != addr),
                Event::Withdrawn { .. } => {}
            }
        }
        seen
    }
}
