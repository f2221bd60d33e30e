//! What bounds a peer before and after it proves a session: how many connections one address may
//! hold (`--max-connections-per-peer`, beside the server-wide `--max-connections`), and how many
//! failed proofs it may make (a data connection with a wrong session secret, a hello naming a
//! live client id without its secret) before it is refused for a while. Malformed or late frames
//! are not proofs: they are refused and counted as malformed, not penalised. Guessing a 64-bit secret is hopeless anyway; the limit keeps
//! the attempt cheap for the server and loud in its log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failed proofs allowed per address within [`FAILURE_WINDOW`].
pub const FAILURE_LIMIT: u32 = 20;
/// The window over which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10);
/// How long an address that went past the limit is refused.
pub const PENALTY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct PeerState {
    open: usize,
    failures: u32,
    window_start: Option<Instant>,
    refused_until: Option<Instant>,
}

impl PeerState {
    fn idle(&self, now: Instant) -> bool {
        self.open == 0
            && self.refused_until.is_none_or(|t| t <= now)
            && self.window_start.is_none_or(|t| now.saturating_duration_since(t) > FAILURE_WINDOW)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address holds its share of connections already.
    TooManyConnections,
    /// The address failed too many proofs recently.
    Penalised,
}

/// Per-address bookkeeping of one server.
#[derive(Debug)]
pub struct Peers {
    max_per_peer: usize,
    state: Mutex<HashMap<IpAddr, PeerState>>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Admission {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.peers.state();
        if let Some(p) = state.get_mut(&self.ip) {
            p.open = p.open.saturating_sub(1);
        }
    }
}

impl Peers {
    /// Bookkeeping allowing `max_per_peer` open connections per address.
    pub fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self { max_per_peer, state: Mutex::new(HashMap::new()) })
    }

    fn state(&self) -> MutexGuard<'_, HashMap<IpAddr, PeerState>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Admission, Refused> {
        let mut state = self.state();
        let p = state.entry(ip).or_default();
        if p.refused_until.is_some_and(|t| t > now) {
            return Err(Refused::Penalised);
        }
        if p.open >= self.max_per_peer {
            return Err(Refused::TooManyConnections);
        }
        p.open += 1;
        Ok(Admission { peers: Arc::clone(self), ip })
    }

    /// Counts a failed proof by `ip`; returns true when this failure put it past the limit (it is
    /// refused for [`PENALTY`] from now on).
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut state = self.state();
        let p = state.entry(ip).or_default();
        match p.window_start {
            Some(start) if now.saturating_duration_since(start) <= FAILURE_WINDOW => p.failures += 1,
            _ => {
                p.window_start = Some(now);
                p.failures = 1;
            }
        }
        if p.failures >= FAILURE_LIMIT && p.refused_until.is_none_or(|t| t <= now) {
            p.refused_until = Some(now + PENALTY);
            p.failures = 0;
            p.window_start = None;
            return true;
        }
        false
    }

    /// Forgets addresses with nothing open, no penalty and no recent failure.
    pub fn prune(&self, now: Instant) {
        self.state().retain(|_, p| !p.idle(now));
    }

    /// Addresses tracked (for tests and stats).
    pub fn tracked(&self) -> usize {
        self.state().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_of_connections_and_gives_them_back() {
        let peers = Peers::new(2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let now = Instant::now();
        let a = peers.admit(ip, now).expect("first");
        let _b = peers.admit(ip, now).expect("second");
        assert_eq!(peers.admit(ip, now).expect_err("third"), Refused::TooManyConnections);
        assert!(peers.admit([10, 0, 0, 2].into(), now).is_ok(), "another address is not affected");
        drop(a);
        assert!(peers.admit(ip, now).is_ok());
    }

    #[test]
    fn too_many_failures_are_refused_for_a_while_then_forgotten() {
        let peers = Peers::new(100);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t0 = Instant::now();
        for i in 1..FAILURE_LIMIT {
            assert!(!peers.failed(ip, t0), "failure {i} is within the limit");
        }
        assert!(peers.admit(ip, t0).is_ok());
        assert!(peers.failed(ip, t0), "the limit is reached");
        assert_eq!(peers.admit(ip, t0).expect_err("penalised"), Refused::Penalised);
        let later = t0 + PENALTY + Duration::from_secs(1);
        assert!(peers.admit(ip, later).is_ok(), "the penalty ends");
        // Failures spread wider than the window never add up.
        let mut t = later;
        for _ in 0..3 * FAILURE_LIMIT {
            t += FAILURE_WINDOW / 2;
            assert!(!peers.failed(ip, t), "a slow trickle of failures is not penalised");
        }
        peers.prune(t + PENALTY + FAILURE_WINDOW * 2);
        assert_eq!(peers.tracked(), 0);
    }
}
