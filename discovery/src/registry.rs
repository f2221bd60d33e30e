//! Lenders in an etcd registry, for data-centre scale: a lender's [`Registrar`] keeps the key
//! `PREFIX/IP:PORT` alive under an etcd lease (TTL `ttl`, renewed every third of it), its value
//! the announcement's fields (`v=3 provider=shim free=... class=edge`), written again every
//! announcement interval; a borrower's [`Watcher`] reads the prefix, then watches it: a put is
//! an announcement, a delete (the lender left, or its lease expired because it died, stalled or
//! lost etcd) a withdrawal. A lease that expired under a live lender is granted anew and the key
//! written again, so a lender that was only stalled comes back.
//!
//! `etcd-client` is asynchronous (tokio and tonic); each registrar and watcher runs a
//! single-threaded tokio runtime on a thread of its own, and talks to the rest of the program
//! through channels, so nothing else here needs an async runtime.

use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};

use crate::{DiscoveryError, Event, LenderAd, Source};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/coalesce/lenders/";

/// Where the registry is: `etcd://HOST:PORT[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAddr {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    /// Key prefix, ending in `/`.
    pub prefix: String,
}

impl FromStr for RegistryAddr {
    type Err = DiscoveryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DiscoveryError::BadRegistry(s.to_owned());
        let rest = s.strip_prefix("etcd://").ok_or_else(bad)?;
        let (host_port, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_PREFIX),
        };
        let (host, port) = host_port.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || prefix.len() > 256 {
            return Err(bad());
        }
        let prefix = if prefix.ends_with('/') { prefix.to_owned() } else { format!("{prefix}/") };
        Ok(Self { endpoint: format!("http://{host_port}"), prefix })
    }
}

impl std::fmt::Display for RegistryAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoint.trim_start_matches("http://"), self.prefix)
    }
}

fn encode(ad: &LenderAd) -> String {
    ad.properties().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn decode(prefix: &str, key: &str, value: &str) -> Option<LenderAd> {
    let addr = key.strip_prefix(prefix)?.parse().ok()?;
    LenderAd::from_properties(addr, |k| {
        value.split_whitespace().find_map(|kv| kv.split_once('=').filter(|(key, _)| *key == k).map(|(_, v)| v))
    })
}

fn runtime(endpoint: &str) -> Result<tokio::runtime::Runtime, DiscoveryError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DiscoveryError::Etcd { endpoint: endpoint.to_owned(), reason: format!("no async runtime: {e}") })
}

fn etcd_error(endpoint: &str) -> impl Fn(etcd_client::Error) -> DiscoveryError + '_ {
    move |e| DiscoveryError::Etcd { endpoint: endpoint.to_owned(), reason: e.to_string() }
}

async fn connect(endpoint: &str) -> Result<Client, DiscoveryError> {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
    Client::connect([endpoint], Some(options)).await.map_err(etcd_error(endpoint))
}

/// A lender's registration, kept alive while this lives (deleted by [`Registrar::stop`] or on
/// drop).
#[derive(Debug)]
pub struct Registrar {
    updates: Option<mpsc::Sender<LenderAd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registrar {
    /// Registers `ad` under `registry` with a lease of `ttl` (at least 2 s). Fails when etcd
    /// cannot be reached now; later outages are logged and ridden out.
    pub fn start(registry: &RegistryAddr, ad: &LenderAd, ttl: Duration) -> Result<Self, DiscoveryError> {
        let ttl_s = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let (registry, ad) = (registry.clone(), ad.clone());
        let rt = runtime(&registry.endpoint)?;
        let mut client = rt.block_on(connect(&registry.endpoint))?;
        let key = format!("{}{}", registry.prefix, ad.addr);
        let lease = rt.block_on(register(&mut client, &key, &ad, ttl_s)).map_err(etcd_error(&registry.endpoint))?;
        tracing::info!(%registry, %key, ttl_s, "registered this lender");
        let (tx, rx) = mpsc::channel::<LenderAd>();
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || rt.block_on(keep_registered(client, key, ad, ttl_s, lease, rx)))
            .map_err(|e| DiscoveryError::Etcd { endpoint: registry.endpoint.clone(), reason: e.to_string() })?;
        Ok(Self { updates: Some(tx), thread: Some(thread) })
    }

    /// Writes `ad` again (its free capacity changed).
    pub fn update(&self, ad: &LenderAd) {
        if let Some(tx) = &self.updates {
            let _ = tx.send(ad.clone());
        }
    }

    /// Deletes the registration (watchers see the lender go).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        drop(self.updates.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn register(client: &mut Client, key: &str, ad: &LenderAd, ttl_s: i64) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(ttl_s, None).await?.id();
    client.put(key, encode(ad), Some(PutOptions::new().with_lease(lease))).await?;
    Ok(lease)
}

/// Renews the lease every third of its TTL and writes updates, until the update channel closes;
/// then revokes the lease (deleting the key).
async fn keep_registered(
    mut client: Client,
    key: String,
    mut ad: LenderAd,
    ttl_s: i64,
    mut lease: i64,
    updates: mpsc::Receiver<LenderAd>,
) {
    let period = Duration::from_millis(u64::try_from(ttl_s).unwrap_or(2) * 1000 / 3);
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut changed = false;
        loop {
            match updates.try_recv() {
                Ok(new) => {
                    ad = new;
                    changed = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = client.lease_revoke(lease).await;
                    tracing::info!(%key, "deleted this lender's registration");
                    return;
                }
            }
        }
        if last_renewal.elapsed() < period && !changed {
            continue;
        }
        last_renewal = tokio::time::Instant::now();
        let alive = match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => {
                keeper.keep_alive().await.is_ok() && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
            }
            Err(_) => false,
        };
        let result = if alive {
            if changed {
                client.put(key.as_str(), encode(&ad), Some(PutOptions::new().with_lease(lease))).await.map(|_| ())
            } else {
                Ok(())
            }
        } else {
            // The lease expired (we stalled, or etcd was away): register anew.
            register(&mut client, &key, &ad, ttl_s).await.map(|l| {
                tracing::warn!(%key, "the registry lease had expired: registered again");
                lease = l;
            })
        };
        if let Err(e) = result {
            tracing::warn!(%key, "keeping the registration failed (tried again): {e}");
        }
    }
}

/// A borrower's view of the registry: the lenders under the prefix now, then every change.
#[derive(Debug)]
pub struct Watcher {
    events: std::sync::Mutex<mpsc::Receiver<Event>>,
}

impl Watcher {
    /// Reads the prefix and starts watching it. Fails when etcd cannot be reached now; a watch
    /// lost later is logged (no more events come).
    pub fn start(registry: &RegistryAddr) -> Result<Self, DiscoveryError> {
        let registry = registry.clone();
        let rt = runtime(&registry.endpoint)?;
        let mut client = rt.block_on(connect(&registry.endpoint))?;
        let (tx, rx) = mpsc::channel();
        let current = rt
            .block_on(client.get(registry.prefix.as_str(), Some(GetOptions::new().with_prefix())))
            .map_err(etcd_error(&registry.endpoint))?;
        let revision = current.header().map_or(0, |h| h.revision());
        for kv in current.kvs() {
            if let Some(ad) =
                kv.key_str().ok().zip(kv.value_str().ok()).and_then(|(k, v)| decode(&registry.prefix, k, v))
            {
                let _ = tx.send(Event::Announced(ad));
            }
        }
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = rt
            .block_on(client.watch(registry.prefix.as_str(), Some(options)))
            .map_err(etcd_error(&registry.endpoint))?;
        std::thread::Builder::new()
            .name("registry-watch".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _client = client;
                    loop {
                        let response = match stream.message().await {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(registry = %registry, "the registry watch ended: {e}");
                                break;
                            }
                        };
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Ok(key) = kv.key_str() else { continue };
                            let sent = match event.event_type() {
                                EventType::Put => {
                                    match kv.value_str().ok().and_then(|v| decode(&registry.prefix, key, v)) {
                                        Some(ad) => tx.send(Event::Announced(ad)),
                                        None => Ok(()),
                                    }
                                }
                                EventType::Delete => {
                                    let addr = key.strip_prefix(registry.prefix.as_str()).and_then(|a| a.parse().ok());
                                    tx.send(Event::Withdrawn { name: key.to_owned(), addr })
                                }
                            };
                            if sent.is_err() {
                                return; // The watcher was dropped.
                            }
                        }
                    }
                });
            })
            .map_err(|e| DiscoveryError::Etcd { endpoint: String::new(), reason: e.to_string() })?;
        Ok(Self { events: std::sync::Mutex::new(rx) })
    }
}

impl Source for Watcher {
    fn next(&self, timeout: Duration) -> Option<Event> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv_timeout(timeout).ok()
    }
}

/// The registry as a borrower's [`Source`] (an alias that reads well at call sites).
pub type Registry = Watcher;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn registry_addresses_parse_and_bad_ones_are_refused() {
        let r: RegistryAddr = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!((r.endpoint.as_str(), r.prefix.as_str()), ("http://127.0.0.1:2379", DEFAULT_PREFIX));
        let r: RegistryAddr = "etcd://etcd.local:2379/lab/lenders".parse().unwrap();
        assert_eq!((r.endpoint.as_str(), r.prefix.as_str()), ("http://etcd.local:2379", "/lab/lenders/"));
        assert_eq!(r.to_string(), "etcd://etcd.local:2379/lab/lenders/");
        for bad in
            ["127.0.0.1:2379", "http://127.0.0.1:2379", "etcd://", "etcd://host", "etcd://host:0", "etcd://:2379"]
        {
            assert!(bad.parse::<RegistryAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn values_round_trip_and_foreign_keys_are_ignored() {
        let ad = LenderAd {
            addr: "10.0.0.7:7470".parse().unwrap(),
            version: 3,
            provider: "shim".into(),
            free_bytes: 1 << 30,
            class: "rack".into(),
        };
        let value = encode(&ad);
        assert_eq!(decode(DEFAULT_PREFIX, "/coalesce/lenders/10.0.0.7:7470", &value), Some(ad));
        assert_eq!(decode(DEFAULT_PREFIX, "/other/10.0.0.7:7470", &value), None);
        assert_eq!(decode(DEFAULT_PREFIX, "/coalesce/lenders/not-an-address", &value), None);
        assert_eq!(decode(DEFAULT_PREFIX, "/coalesce/lenders/10.0.0.7:7470", "provider=shim"), None);
    }
}
