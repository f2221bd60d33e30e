//! Lenders that come back: a failed lender is tried again now and then; a resumed session makes
//! it (and its copies) usable again, a new session makes its old copies count as gone.

use std::sync::atomic::Ordering;
use std::time::Instant;

use rdma::client::{ClientOptions, ControlClient};
use rdma::control::SessionOutcome;

use super::{control_timeout, lock, LenderStore, REVIVE_INTERVAL};

impl LenderStore {
    /// Frees the slabs of lender `i` that repairs replaced while it was away, if it kept its
    /// session (`resumed`); with a new session they are gone already.
    fn free_orphans(&self, i: usize, resumed: bool) {
        let generation = self.lenders[i].generation.load(Ordering::Acquire);
        let mine: Vec<u64> = {
            let mut orphans = lock(&self.orphans);
            let (mine, rest): (Vec<_>, Vec<_>) = orphans.drain(..).partition(|&(l, _, _)| l == i);
            *orphans = rest;
            mine.into_iter().filter(|&(_, g, _)| resumed && g == generation).map(|(_, _, id)| id).collect()
        };
        if mine.is_empty() {
            return;
        }
        let mut control = lock(&self.lenders[i].control);
        for slab in &mine {
            let _ = control.free_slab(*slab);
        }
        tracing::debug!(server = %self.lenders[i].addr, slabs = mine.len(), "freed slabs replaced while it was away");
    }

    /// Tries a failed lender again (at most every [`REVIVE_INTERVAL`]): resumes its session if it
    /// is still there, else opens a new one (its old copies are then gone).
    pub(super) fn revive(&self, i: usize) {
        let s = &self.lenders[i];
        if s.distrusted.load(Ordering::Acquire) {
            return;
        }
        {
            let mut last = lock(&s.last_attempt);
            if last.is_some_and(|t| t.elapsed() < REVIVE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (client_id, proof) = {
            let c = lock(&s.control);
            (c.client_id(), c.proof())
        };
        let options = ClientOptions {
            client_id: Some(client_id),
            resume: Some(proof),
            timeout: control_timeout(self.min_lease()).min(REVIVE_INTERVAL),
            ..self.client_options.clone()
        };
        let Ok(mut control) = ControlClient::connect(s.addr, &options) else { return };
        if control.set_timeout(control_timeout(control.session().lease)).is_err() {
            return;
        }
        let resumed = control.session().outcome == SessionOutcome::Resumed;
        if !resumed {
            let mut slots = lock(&s.slots);
            slots.free.clear();
            slots.bump = None;
            s.generation.fetch_add(1, Ordering::AcqRel);
            s.pages.store(0, Ordering::Relaxed);
            // A draining lender takes no new session: this is a new process, staying.
            s.leaving.store(false, Ordering::Release);
        }
        *lock(&s.control) = control;
        s.full.store(false, Ordering::Release);
        s.revivals.fetch_add(1, Ordering::AcqRel);
        // SeqCst: see `LenderStore::healthy`.
        s.alive.store(true, Ordering::SeqCst);
        self.free_orphans(i, resumed);
        if resumed {
            self.unpark();
            tracing::warn!(server = %s.addr, "memory-server is back with our session: its copies are used again");
        } else {
            tracing::warn!(
                server = %s.addr,
                "memory-server is back with a new session: its old copies are gone; new pages go to it again"
            );
        }
    }
}
