//! Accesses that fail loudly: a page whose state breaks an invariant, a page no lender can
//! return, a page that cannot be made local at the local maximum. Each is logged (naming the
//! address and the lender), counted, and poisoned: the access gets SIGBUS, never wrong data.

use std::sync::atomic::Ordering;

use crate::entry::Entry;
use crate::history::Transition;
use crate::region::{ActiveRegion as RegionState, FetchFailure};
use crate::stats::Counters;
use crate::{Shared, PAGE_SIZE};

use super::{Fetch, Handler};

impl Handler {
    /// Poisons a locked, unmapped page whose state breaks an invariant, instead of serving it.
    pub(super) fn state_violation(&mut self, region: &RegionState, page: usize, e: Entry, what: &str) {
        self.report_violation(region, page, e, &format!("{what}; {POISONED_NOTE}"));
        let addr = region.page_addr(page);
        region.table.unlock(page, e.poisoned(), Transition::Poisoned);
        if let Err(err) = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE)) {
            tracing::error!(error = %err, "UFFDIO_POISON failed; the faulting thread stays blocked");
        }
    }

    pub(super) fn report_violation(&self, region: &RegionState, page: usize, e: Entry, what: &str) {
        report_violation(&self.shared, region, page, e, what);
    }

    pub(super) fn fail_page(&mut self, region: &RegionState, f: &Fetch) {
        let addr = region.page_addr(f.page);
        let server = f
            .entry
            .slot()
            .and_then(|slot| self.shared.store.lender_of(slot))
            .unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let reason = f.outcome.as_ref().err().map_or_else(|| "unknown".into(), ToString::to_string);
        tracing::error!(
            server = %server,
            addr = format_args!("{addr:#x}"),
            reason = %reason,
            "cannot fetch page from memory-server; the access gets SIGBUS (never zeros)"
        );
        Counters::add(&self.shared.stats.fetch_failures, 1);
        region.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(handler) = &region.options.on_failure {
            handler(&FetchFailure { addr, offset: addr - region.base, server, reason });
        }
        region.table.unlock(f.page, f.entry.poisoned(), Transition::Poisoned);
        if let Err(e) = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE)) {
            tracing::error!(error = %e, "UFFDIO_POISON failed; the faulting thread stays blocked");
        }
    }

    /// Fails a fault that found no room at the local maximum: the faulting page (first of
    /// `pages`, all locked) is poisoned, so the access gets SIGBUS; the window is left as it was.
    pub(super) fn fail_at_max(&mut self, region: &RegionState, pages: &[(usize, Entry)]) {
        for &(page, e) in &pages[1..] {
            region.table.unlock(page, e, Transition::NotInstalled);
        }
        let (page, e) = pages[0];
        let addr = region.page_addr(page);
        let reason = format!(
            "local memory is at its maximum ({} pages) and no lender took a page within {:?}",
            self.shared.budget.max(),
            self.shared.config.fetch_timeout
        );
        tracing::error!(addr = format_args!("{addr:#x}"), "{reason}; the access gets SIGBUS");
        region.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(handler) = &region.options.on_failure {
            let server = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
            handler(&FetchFailure { addr, offset: addr - region.base, server, reason });
        }
        region.table.unlock(page, e.poisoned(), Transition::Poisoned);
        if let Err(err) = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE)) {
            tracing::error!(error = %err, "UFFDIO_POISON failed; the faulting thread stays blocked");
        }
    }
}

/// What a caller that poisons a page after a violation adds to the log line.
pub(crate) const POISONED_NOTE: &str = "the page is poisoned (SIGBUS on access), never served as zeros";

/// Logs and counts a broken page-state invariant: a bug in Coalesce, made loud. The caller
/// poisons the page, so the program gets SIGBUS on it instead of wrong data.
pub(crate) fn report_violation(shared: &Shared, region: &RegionState, page: usize, e: Entry, what: &str) {
    let addr = region.page_addr(page);
    let server =
        e.slot().and_then(|slot| shared.store.lender_of(slot)).map_or_else(|| "none".into(), |a| a.to_string());
    tracing::error!(
        addr = format_args!("{addr:#x}"),
        page,
        entry = %e,
        lender = %server,
        "page-state violation (a bug in Coalesce): {what}"
    );
    Counters::add(&shared.stats.state_violations, 1);
    if let Some(history) = &shared.history {
        for record in history.of_page(region.id, page) {
            tracing::error!("  page {page} history: {record}");
        }
    }
}
