//! One thread's I/O on the lender store: a data endpoint per lender, request ids, one batched
//! work request per lender (all posted, then all waited for under one deadline), and the failure
//! policy applied to every outcome. A write goes to every copy of its page; a read to the first
//! copy on a reachable lender, then, if that fails, to the next.

use std::sync::Arc;
use std::time::Instant;

use rdma::{
    Completion, CompletionStatus, Endpoint, LocalRegion, LocalSlice, PollMode, ProviderKind, Segment, WorkRequest,
};

use super::coded_io::CodedState;
use super::LenderStore;
use crate::store::{PageIo, PageTransfer, Slot, TransferError};
use crate::{PagerError, PAGE_SIZE};

/// A thread's connections to every lender (`None` for one that is down or failed).
#[derive(Debug)]
pub(super) struct LenderIo {
    pub(super) store: Arc<LenderStore>,
    endpoints: Vec<Option<Endpoint>>,
    next_wr: u64,
    /// Staging of erasure-coded pages, and reads still in flight (`coded_io.rs`).
    pub(super) coded: CodedState,
    /// Send buffer for verbs writes. An RDMA registration pins the physical pages a buffer had
    /// when it was registered, and callers' buffers may have their pages replaced between
    /// batches (the evictor's staging buffer is filled by moving pages in and emptied with
    /// `madvise`), so with verbs each page is copied here and written from here.
    bounce: Option<Arc<LocalRegion>>,
    completions: Vec<Completion>,
    /// The lender each slot of the last read batch was read from (for `distrust`).
    pub(super) read_from: Vec<(Slot, usize)>,
    /// The target the next reads should be served within, besides the store's (a region's
    /// objective, [`PageIo::set_read_within`]).
    pub(super) read_within: Option<std::time::Duration>,
    /// Segments of one page, reused.
    scratch: Vec<Segment>,
    /// How many comebacks of each lender this thread has reconnected after.
    revivals_seen: Vec<u64>,
    /// This thread's write batch, open from its first `place` to the end of its `write_pages`
    /// (`quiesce.rs`).
    batch: super::quiesce::Batch,
}

/// The pages of one batch that go to one lender (a page with a trailer takes two segments).
pub(super) struct Group {
    pub(super) lender: usize,
    pub(super) pages: Vec<usize>,
    pub(super) segments: Vec<Segment>,
}

/// Adds page `page`'s `segments` to the work request of `lender` in `groups`.
pub(super) fn add_to(groups: &mut Vec<Group>, lender: usize, page: usize, segments: &mut Vec<Segment>) {
    match groups.iter_mut().find(|g| g.lender == lender) {
        Some(g) => {
            g.pages.push(page);
            g.segments.append(segments);
        }
        None => groups.push(Group { lender, pages: vec![page], segments: std::mem::take(segments) }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Read,
    Write,
}

impl LenderIo {
    /// Opens a data connection to every live lender. A lender whose connection cannot be opened
    /// is marked failed (and reconnected once it is revived), as it would be at run time; only a
    /// cause on this side (e.g. the verbs provider cannot run here) is an error.
    pub(super) fn open(store: Arc<LenderStore>) -> Result<Self, PagerError> {
        let lenders = store.lenders.len();
        // Read before connecting: a lender revived meanwhile is reconnected at the next batch.
        let revivals_seen = (0..lenders).map(|i| store.revivals(i)).collect();
        let batch = store.write_batches.register();
        let mut io = Self {
            store,
            endpoints: (0..lenders).map(|_| None).collect(),
            next_wr: 0,
            coded: CodedState::default(),
            bounce: None,
            completions: Vec::new(),
            read_from: Vec::new(),
            read_within: None,
            scratch: Vec::new(),
            revivals_seen,
            batch,
        };
        for i in 0..lenders {
            if !io.store.is_alive(i) {
                continue;
            }
            let store = Arc::clone(&io.store);
            let s = &store.lenders[i];
            let endpoint = super::lock(&s.control).connect_endpoint(store.provider, &store.endpoint_options);
            match endpoint {
                Ok(ep) => io.endpoints[i] = Some(ep),
                Err(source) if source.is_local() => return Err(PagerError::Transport { addr: s.addr, source }),
                Err(e) => io.fail_lender(i, &format!("opening a data connection: {e}")),
            }
        }
        Ok(io)
    }

    pub(super) fn reachable(&self, lender: usize) -> bool {
        self.store.is_alive(lender) && self.endpoints.get(lender).is_some_and(Option::is_some)
    }

    /// True when the copy at `loc` exists and this thread can reach it.
    pub(super) fn usable(&self, loc: &super::Location) -> bool {
        self.store.copy_valid(loc) && self.reachable(loc.lender)
    }

    /// Starts a batch of `n` pages: every outcome success until said otherwise, and connections
    /// to lenders that came back reopened.
    pub(super) fn begin(&mut self, out: &mut Vec<Result<(), TransferError>>, n: usize) {
        out.clear();
        out.resize(n, Ok(()));
        self.refresh();
    }

    /// Reconnects to lenders that came back since this thread last looked.
    pub(super) fn refresh(&mut self) {
        // Lenders that joined since: no endpoint yet; connected below as if they came back.
        while self.endpoints.len() < self.store.lenders.len() {
            self.endpoints.push(None);
            self.revivals_seen.push(u64::MAX);
        }
        for i in 0..self.endpoints.len() {
            let revivals = self.store.revivals(i);
            if revivals == self.revivals_seen[i] {
                continue;
            }
            self.revivals_seen[i] = revivals;
            if !self.store.is_alive(i) {
                continue;
            }
            let s = &self.store.lenders[i];
            let endpoint = super::lock(&s.control).connect_endpoint(self.store.provider, &self.store.endpoint_options);
            // The old connection (if any) closes here: its reads in flight can no longer land.
            self.coded.forget_lender(i);
            match endpoint {
                Ok(ep) => self.endpoints[i] = Some(ep),
                Err(e) => self.fail_lender(i, &format!("reconnecting after it came back: {e}")),
            }
        }
    }

    /// Groups the pages by lender, naming each page's local bytes in `buf`: a read goes to the
    /// first copy on a reachable lender, a write to every copy. Pages that cannot be sent get
    /// their outcome in `out` at once. Also says whether every page read has a second usable
    /// copy to fail over to.
    fn group(
        &mut self,
        direction: Direction,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut [Result<(), TransferError>],
    ) -> (Vec<Group>, bool) {
        let mut groups: Vec<Group> = Vec::new();
        let mut all_spare = true;
        if direction == Direction::Read {
            self.read_from.clear();
        }
        for (i, p) in pages.iter().enumerate() {
            let Some(places) = self.store.locate(p.slot) else {
                out[i] = Err(TransferError::NoSuchSlot);
                continue;
            };
            let copies = places.copies();
            let targets: &[super::Location] = match direction {
                Direction::Read => {
                    // The nearest usable copy (the first among equally near ones).
                    let mut nearest: Option<(usize, f64)> = None;
                    let mut usable = 0;
                    for (k, loc) in copies.iter().enumerate().filter(|(_, loc)| self.usable(loc)) {
                        usable += 1;
                        let w = self.store.weight_of(loc.lender);
                        if nearest.is_none_or(|(_, best)| w > best) {
                            nearest = Some((k, w));
                        }
                    }
                    all_spare &= usable > 1;
                    match nearest {
                        Some((k, _)) => &copies[k..=k],
                        None => &[],
                    }
                }
                Direction::Write => copies,
            };
            if targets.is_empty() || targets.iter().any(|loc| !self.usable(loc)) {
                out[i] = Err(TransferError::LenderDown);
                continue;
            }
            for &loc in targets {
                let mut segments = std::mem::take(&mut self.scratch);
                segments.clear();
                if let Err(e) = self.add_segments(&mut segments, buf, p, loc) {
                    self.scratch = segments;
                    out[i] = Err(e);
                    break;
                }
                add_to(&mut groups, loc.lender, i, &mut segments);
                self.scratch = segments;
                if direction == Direction::Read {
                    self.read_from.push((p.slot, loc.lender));
                }
            }
        }
        (groups, all_spare)
    }

    /// Appends the segments that move page `p` (and its trailer, if it has one) to or from `loc`.
    fn add_segments(
        &self,
        segments: &mut Vec<Segment>,
        buf: &Arc<LocalRegion>,
        p: &PageTransfer,
        loc: super::Location,
    ) -> Result<(), TransferError> {
        let local = |offset, len| LocalSlice::new(buf, offset, len).map_err(|e| TransferError::Local(e.to_string()));
        let page = Segment { local: local(p.offset, PAGE_SIZE)?, remote_addr: loc.addr, rkey: loc.rkey };
        let trailer = match p.trailer {
            Some(_) if self.store.trailer == 0 => {
                return Err(TransferError::Local("this store keeps no trailers".into()));
            }
            Some(at) => Some(Segment {
                local: local(at, self.store.trailer)?,
                remote_addr: loc.addr + PAGE_SIZE as u64,
                rkey: loc.rkey,
            }),
            None => None,
        };
        segments.push(page);
        segments.extend(trailer);
        Ok(())
    }

    /// Posts one work request per group, then waits for each; every page gets its group's outcome.
    fn transfer(
        &mut self,
        direction: Direction,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.begin(out, pages.len());
        let (groups, all_spare) = self.group(direction, buf, pages, out);
        // With copies on several lenders, a stalled lender is not waited for the full timeout: a
        // read whose every page has a second usable copy fails over to those copies, and a
        // replicated write fails (its pages stay local, to be written to lenders that answer).
        let spare = match direction {
            Direction::Read => all_spare,
            Direction::Write => self.store.width > 1,
        };
        let limit = if spare { self.store.failover } else { self.store.timeout };
        self.run(direction, groups, limit, out);
    }

    /// Posts one work request per group, then waits for each until `limit` from now; every page
    /// gets the first failure of its groups, or success.
    pub(super) fn run(
        &mut self,
        direction: Direction,
        groups: Vec<Group>,
        limit: std::time::Duration,
        out: &mut [Result<(), TransferError>],
    ) {
        let deadline = Instant::now() + limit;
        let mut posted = Vec::with_capacity(groups.len());
        for g in groups {
            match self.post(direction, g.lender, g.segments) {
                Ok(wr_id) => posted.push((g.lender, wr_id, g.pages)),
                Err(e) => {
                    for i in g.pages {
                        keep_first_error(&mut out[i], Err(e.clone()));
                    }
                }
            }
        }
        // A page written to several copies succeeds only if every copy did.
        for (lender, wr_id, idxs) in posted {
            let outcome = self.wait_for(lender, wr_id, deadline, limit, direction);
            for i in idxs {
                keep_first_error(&mut out[i], outcome.clone());
            }
        }
    }

    /// Waits for the completion of `wr_id` on `lender`'s endpoint until `deadline`, applying the
    /// failure policy: anything but success marks the lender failed and drops the connection (so
    /// that a late completion can never land in a reused buffer).
    pub(super) fn wait_for(
        &mut self,
        lender: usize,
        wr_id: u64,
        deadline: Instant,
        limit: std::time::Duration,
        direction: Direction,
    ) -> Result<(), TransferError> {
        let spin = self.store.spin;
        loop {
            let Some(ep) = self.endpoints.get(lender).and_then(Option::as_ref) else {
                return Err(TransferError::ConnectionLost("connection closed".into()));
            };
            let left = deadline.saturating_duration_since(Instant::now());
            self.completions.clear();
            let waited = if left.is_zero() {
                // The deadline may have passed while another lender of the batch was waited
                // for: a reply that is already here still counts.
                Ok(ep.poll(&mut self.completions, 16))
            } else {
                ep.wait(&mut self.completions, 16, left, PollMode::SpinThenBlock(spin))
            };
            match waited {
                Ok(_) => {
                    self.reap_late(lender);
                    if let Some(status) = self.completions.iter().find(|c| c.wr_id == wr_id).map(|c| c.status) {
                        return self.outcome(lender, status);
                    }
                    if left.is_zero() {
                        let what = if direction == Direction::Read { "read" } else { "write-back" };
                        self.fail_lender(lender, &format!("{what}: no reply within {limit:?}"));
                        return Err(TransferError::Timeout(limit));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    self.fail_lender(lender, &why);
                    return Err(TransferError::ConnectionLost(why));
                }
            }
        }
    }

    /// What a completion's status means for the page, with the failure policy applied.
    pub(super) fn outcome(&mut self, lender: usize, status: CompletionStatus) -> Result<(), TransferError> {
        match status {
            CompletionStatus::Success => Ok(()),
            CompletionStatus::Flushed => {
                self.fail_lender(lender, "connection lost");
                Err(TransferError::ConnectionLost("the request was flushed".into()))
            }
            other => {
                self.fail_lender(lender, &format!("it refused a request ({other:?})"));
                Err(TransferError::Refused(format!("{other:?}")))
            }
        }
    }

    /// Moves `len` bytes between `buf` (from offset `at`) and lender `lender`'s memory at
    /// (`remote_addr`, `rkey`), in one work request, waiting up to the store's timeout. For
    /// whole runs of records (the repair of a group); pages go through `read_pages`/`write_pages`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn move_bytes(
        &mut self,
        write: bool,
        buf: &Arc<LocalRegion>,
        at: usize,
        len: usize,
        lender: usize,
        remote_addr: u64,
        rkey: u32,
    ) -> Result<(), TransferError> {
        self.refresh();
        if !self.reachable(lender) {
            return Err(TransferError::LenderDown);
        }
        let local = LocalSlice::new(buf, at, len).map_err(|e| TransferError::Local(e.to_string()))?;
        let direction = if write { Direction::Write } else { Direction::Read };
        let wr_id = self.post(direction, lender, vec![Segment { local, remote_addr, rkey }])?;
        let deadline = Instant::now() + self.store.timeout;
        self.wait_for(lender, wr_id, deadline, self.store.timeout, direction)
    }

    /// Posts one work request of `segments` to `lender`; returns its id. A failed post marks
    /// the lender failed.
    pub(super) fn post(
        &mut self,
        direction: Direction,
        lender: usize,
        segments: Vec<Segment>,
    ) -> Result<u64, TransferError> {
        self.next_wr += 1;
        let wr_id = self.next_wr;
        let wr = match direction {
            Direction::Read => WorkRequest::read(wr_id, segments),
            Direction::Write => WorkRequest::write(wr_id, segments),
        };
        let Some(ep) = self.endpoint(lender) else { return Err(TransferError::LenderDown) };
        match ep.post(&wr) {
            Ok(()) => Ok(wr_id),
            Err(e) => {
                let why = e.to_string();
                self.fail_lender(lender, &why);
                Err(TransferError::ConnectionLost(why))
            }
        }
    }

    /// True when this thread can reach lender `lender` now.
    pub(super) fn can_reach(&mut self, lender: usize) -> bool {
        self.refresh();
        self.reachable(lender)
    }

    /// Drops this thread's connection to `lender` (nothing it posted can land after this) and
    /// marks the lender failed.
    pub(super) fn fail_lender(&mut self, lender: usize, why: &str) {
        if let Some(e) = self.endpoints.get_mut(lender) {
            *e = None;
        }
        self.coded.forget_lender(lender);
        self.store.mark_failed(lender, why);
    }

    /// Drops this thread's connection to `lender` and fails it for good (a copy it served came
    /// back changed).
    pub(super) fn distrust_lender(&mut self, lender: usize, why: &str) {
        if let Some(e) = self.endpoints.get_mut(lender) {
            *e = None;
        }
        self.coded.forget_lender(lender);
        self.store.distrust_lender(lender, why);
    }

    /// This thread's endpoint to `lender`, if it has one.
    pub(super) fn endpoint(&self, lender: usize) -> Option<&Endpoint> {
        self.endpoints.get(lender).and_then(Option::as_ref)
    }

    /// Marks the reads named by the completions just gathered (`self.completions`, from
    /// `lender`) as landed: their staging areas may be reused.
    fn reap_late(&mut self, lender: usize) {
        if !self.coded.late.is_empty() {
            for c in &self.completions {
                self.coded.landed(lender, c.wr_id);
            }
        }
    }

    /// The buffer verbs writes are sent from: `buf`'s pages copied into the bounce buffer.
    fn send_buffer(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer]) -> Arc<LocalRegion> {
        if self.store.provider != ProviderKind::Verbs {
            return Arc::clone(buf);
        }
        let bounce = match &self.bounce {
            Some(b) if b.len() >= buf.len() => Arc::clone(b),
            _ => match LocalRegion::new(buf.len()) {
                Ok(b) => {
                    self.bounce = Some(Arc::clone(&b));
                    b
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot map a send buffer; writing from the caller's buffer");
                    return Arc::clone(buf);
                }
            },
        };
        let mut page = [0u8; PAGE_SIZE];
        for p in pages {
            for (at, len) in std::iter::once((p.offset, PAGE_SIZE)).chain(p.trailer.map(|at| (at, self.store.trailer)))
            {
                let bytes = &mut page[..len];
                if buf.read_at(at, bytes).is_ok() {
                    if let Err(e) = bounce.write_at(at, bytes) {
                        tracing::error!(error = %e, "copying a page to the send buffer failed");
                    }
                }
            }
        }
        bounce
    }
}

impl PageIo for LenderIo {
    fn set_read_within(&mut self, within: Option<std::time::Duration>) {
        self.read_within = within;
    }

    fn read_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>) {
        if self.store.code.is_some() {
            return self.read_coded(buf, pages, out);
        }
        if self.store.width > 1 && self.store.hedged_reads {
            return self.read_hedged(buf, pages, out);
        }
        self.transfer(Direction::Read, buf, pages, out);
        let mut read_from = std::mem::take(&mut self.read_from);
        // A failed read marked its lender failed: read those pages from their next copy.
        for _ in 1..self.store.width {
            let retry: Vec<usize> =
                (0..pages.len()).filter(|&i| out[i].is_err() && self.readable(pages[i].slot)).collect();
            if retry.is_empty() {
                break;
            }
            let again: Vec<PageTransfer> = retry.iter().map(|&i| pages[i]).collect();
            let mut outcomes = Vec::with_capacity(again.len());
            self.transfer(Direction::Read, buf, &again, &mut outcomes);
            for (&i, outcome) in retry.iter().zip(outcomes) {
                if outcome.is_ok() {
                    tracing::debug!(slot = pages[i].slot.raw(), "read a page from another copy");
                }
                out[i] = outcome;
            }
            // The newest source of each slot wins.
            read_from.append(&mut self.read_from);
        }
        self.read_from = read_from;
    }

    fn write_pages(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.batch.open();
        if self.store.code.is_some() {
            self.write_coded(buf, pages, out);
        } else {
            let source = self.send_buffer(buf, pages);
            self.transfer(Direction::Write, &source, pages, out);
        }
        self.batch.close();
    }

    fn readable(&self, slot: Slot) -> bool {
        let needed = self.store.code.as_ref().map_or(1, super::coding::PageCode::data);
        self.store.locate(slot).is_some_and(|p| p.copies().iter().filter(|loc| self.usable(loc)).count() >= needed)
    }

    fn intact(&self, slot: Slot) -> bool {
        self.store.locate(slot).is_some_and(|p| self.store.healthy(&p) && p.copies().iter().all(|loc| self.usable(loc)))
    }

    fn distrust(&mut self, slot: Slot, why: &str) {
        if self.store.code.is_some() {
            return self.find_liar(slot, why);
        }
        if let Some(&(_, lender)) = self.read_from.iter().rev().find(|(s, _)| *s == slot) {
            self.distrust_lender(lender, why);
        }
    }

    fn place(&mut self, current: Option<Slot>) -> Option<Slot> {
        // Before the group is checked: a repair that marks a group then waits for this batch.
        self.batch.open();
        self.refresh();
        let endpoints = &self.endpoints;
        let usable = |lender: usize| endpoints.get(lender).is_some_and(Option::is_some);
        if let Some(slot) = current {
            if self.intact(slot) {
                // A hot page far away moves to the nearest lender with room, if it can.
                let home = self.store.locate(slot).and_then(|p| self.store.hot_home(&p, usable));
                let Some(nearer) = home.and_then(|i| self.store.alloc_slot_on(i)) else { return Some(slot) };
                self.store.moved_nearer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                crate::store::PageStore::free(&*self.store, slot);
                return Some(nearer);
            }
            crate::store::PageStore::free(&*self.store, slot);
        }
        self.store.alloc_slot(usable)
    }

    fn wants_nearer(&self, slot: Slot) -> bool {
        let endpoints = &self.endpoints;
        let usable = |lender: usize| endpoints.get(lender).is_some_and(Option::is_some);
        self.store.locate(slot).is_some_and(|p| self.store.hot_home(&p, usable).is_some())
    }
}

/// Records `outcome` in `slot` unless an earlier copy of the same page already failed.
fn keep_first_error(slot: &mut Result<(), TransferError>, outcome: Result<(), TransferError>) {
    if slot.is_ok() {
        *slot = outcome;
    }
}
