//! Erasure-coded reads and writes on one thread's connections (`ec:K+M`, see `coding.rs`).
//!
//! A write encodes each page into a stripe in a staging buffer and writes shard `s` to slab `s`
//! of the page's group, every shard posted before any is waited for; it succeeds when every
//! shard has been acknowledged, as a replicated write does.
//!
//! A read posts K + `extra_shard_reads` (default 1) shard reads (data shards first, lenders with
//! reads still in flight last) into a staging area and returns as soon as every page of the
//! batch has K shards: *late binding*, so one slow or dead lender costs nothing while the others answer. The page is then
//! copied out of the staging area (decoded first when a data shard is missing). The read left in
//! flight keeps its staging area: a completion may still write into it, so the area is reused
//! only once that read has landed or its connection was dropped (after which nothing lands).
//!
//! A copy that fails authentication above (a sealing layer) cannot say which shard was changed;
//! [`LenderIo::find_liar`] reads every shard of the page and finds the one whose removal makes the
//! rest agree (possible with at least K + 2 shards readable, so with M >= 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::{CompletionStatus, LocalRegion, LocalSlice, PollMode, Segment};

use super::coding::PageCode;
use super::io::{add_to, Direction, Group, LenderIo};
use crate::store::{PageTransfer, Slot, TransferError};
use crate::PAGE_SIZE;

/// Staging areas of one thread: more than this many batches with reads in flight wait for the
/// oldest to land.
const MAX_AREAS: usize = 4;

/// After spinning, the longest one sleep for the lenders' replies lasts before the deadline is
/// checked again.
pub(super) const WAIT_SLICE: Duration = Duration::from_millis(10);

/// A read left in flight after its batch had enough shards without it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Late {
    lender: usize,
    wr_id: u64,
    area: usize,
}

impl Late {
    /// Read `wr_id` from `lender`, still in flight, holds staging area `area`.
    pub(super) fn new(lender: usize, wr_id: u64, area: usize) -> Self {
        Self { lender, wr_id, area }
    }
}

/// One thread's staging for coded pages.
#[derive(Debug, Default)]
pub(super) struct CodedState {
    /// Read staging areas (one stripe per page of a batch).
    pub(super) areas: Vec<Arc<LocalRegion>>,
    /// Reads still in flight, each holding its area.
    pub(super) late: Vec<Late>,
    /// Write staging (writes wait for every shard, so one buffer serves every batch).
    writes: Option<Arc<LocalRegion>>,
    /// One page's stripe, for encoding and decoding.
    stripe: Vec<u8>,
    /// The lenders whose shards built each page of the last read batch.
    pub(super) read_from: Vec<(Slot, Vec<usize>)>,
    /// Completions gathered, reused.
    completions: Vec<rdma::Completion>,
}

impl CodedState {
    /// The read from `lender` with id `wr_id` has landed (if it was a late one).
    pub(super) fn landed(&mut self, lender: usize, wr_id: u64) {
        self.late.retain(|l| !(l.lender == lender && l.wr_id == wr_id));
    }

    /// The connection to `lender` was dropped: none of its reads can land any more.
    pub(super) fn forget_lender(&mut self, lender: usize) {
        self.late.retain(|l| l.lender != lender);
    }

    pub(super) fn lagging(&self, lender: usize) -> bool {
        self.late.iter().any(|l| l.lender == lender)
    }
}

/// A work request reading shards from one lender: which (page, shard) pairs, and its outcome.
struct ShardRead {
    lender: usize,
    wr_id: Option<u64>,
    shards: Vec<(usize, usize)>,
    outcome: Option<Result<(), TransferError>>,
}

fn local(e: impl std::fmt::Display) -> TransferError {
    TransferError::Local(e.to_string())
}

impl LenderIo {
    pub(super) fn code(&self) -> &PageCode {
        self.store.code.as_ref().expect("coded I/O on a store without a code")
    }

    /// Writes every page as K + M shards to its group's slabs.
    pub(super) fn write_coded(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.begin(out, pages.len());
        let store = Arc::clone(&self.store);
        let code = self.code();
        let (stripe_len, shard_len) = (code.stripe_len(), code.shard_len());
        let stage = match self.write_stage(pages.len() * stripe_len) {
            Ok(stage) => stage,
            Err(e) => return out.iter_mut().for_each(|o| *o = Err(e.clone())),
        };
        let mut groups: Vec<Group> = Vec::new();
        let mut stripe = std::mem::take(&mut self.coded.stripe);
        for (i, p) in pages.iter().enumerate() {
            let Some(places) = store.locate(p.slot) else {
                out[i] = Err(TransferError::NoSuchSlot);
                continue;
            };
            if !places.copies().iter().all(|loc| self.usable(loc)) {
                out[i] = Err(TransferError::LenderDown);
                continue;
            }
            if let Err(e) = self.stage_stripe(buf, p, &stage, i * stripe_len, &mut stripe) {
                out[i] = Err(e);
                continue;
            }
            for (s, loc) in places.copies().iter().enumerate() {
                let at = i * stripe_len + s * shard_len;
                match LocalSlice::new(&stage, at, shard_len) {
                    Ok(slice) => {
                        let mut seg = vec![Segment { local: slice, remote_addr: loc.addr, rkey: loc.rkey }];
                        add_to(&mut groups, loc.lender, i, &mut seg);
                    }
                    Err(e) => out[i] = Err(local(e)),
                }
            }
        }
        self.coded.stripe = stripe;
        // A page whose stripe could not be staged must not be half written.
        for g in &mut groups {
            let keep: Vec<bool> = g.pages.iter().map(|&i| out[i].is_ok()).collect();
            let mut k = keep.iter();
            g.segments.retain(|_| *k.next().unwrap_or(&false));
            let mut k = keep.iter();
            g.pages.retain(|_| *k.next().unwrap_or(&false));
        }
        groups.retain(|g| !g.pages.is_empty());
        let limit = if store.width > 1 { store.failover } else { store.timeout };
        self.run(Direction::Write, groups, limit, out);
    }

    /// Encodes page `p` of `buf` into `stage` at `at`.
    fn stage_stripe(
        &self,
        buf: &Arc<LocalRegion>,
        p: &PageTransfer,
        stage: &Arc<LocalRegion>,
        at: usize,
        stripe: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        let code = self.code();
        let mut page = [0u8; PAGE_SIZE];
        buf.read_at(p.offset, &mut page).map_err(local)?;
        let mut trailer = [0u8; crate::store::TRAILER_LEN];
        let trailer = match p.trailer {
            Some(_) if self.store.trailer == 0 => return Err(local("this store keeps no trailers")),
            Some(t) => {
                buf.read_at(t, &mut trailer).map_err(local)?;
                &trailer[..]
            }
            None => &trailer[..self.store.trailer],
        };
        stripe.resize(code.stripe_len(), 0);
        code.encode(&page, trailer, stripe).map_err(TransferError::Local)?;
        stage.write_at(at, stripe).map_err(local)
    }

    fn write_stage(&mut self, len: usize) -> Result<Arc<LocalRegion>, TransferError> {
        match &self.coded.writes {
            Some(stage) if stage.len() >= len => Ok(Arc::clone(stage)),
            _ => {
                let stage = LocalRegion::new(len.next_multiple_of(64 * 1024)).map_err(local)?;
                self.coded.writes = Some(Arc::clone(&stage));
                Ok(stage)
            }
        }
    }

    /// Reads every page from K of its shards (see the module comment), again from other shards
    /// for pages whose reads failed while they have K readable.
    pub(super) fn read_coded(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.read_coded_once(buf, pages, out);
        let rounds = self.code().shards() - self.code().data();
        for _ in 0..rounds {
            let retry: Vec<usize> = (0..pages.len())
                .filter(|&i| out[i].is_err() && crate::store::PageIo::readable(self, pages[i].slot))
                .collect();
            if retry.is_empty() {
                return;
            }
            let read_from = std::mem::take(&mut self.coded.read_from);
            let again: Vec<PageTransfer> = retry.iter().map(|&i| pages[i]).collect();
            let mut outcomes = Vec::with_capacity(again.len());
            self.read_coded_once(buf, &again, &mut outcomes);
            for (&i, outcome) in retry.iter().zip(outcomes) {
                out[i] = outcome;
            }
            let mut newer = std::mem::replace(&mut self.coded.read_from, read_from);
            self.coded.read_from.append(&mut newer);
        }
    }

    fn read_coded_once(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.begin(out, pages.len());
        self.poll_late();
        self.coded.read_from.clear();
        let stripe_len = self.code().stripe_len();
        let area = match self.area(pages.len() * stripe_len) {
            Ok(area) => area,
            Err(e) => return out.iter_mut().for_each(|o| *o = Err(e.clone())),
        };
        let region = Arc::clone(&self.coded.areas[area]);
        let (mut reads, spare) = self.plan_reads(pages, out);
        let limit = if spare { self.store.failover } else { self.store.timeout };
        for r in &mut reads {
            let segments = self.shard_segments(r, &region, pages, stripe_len);
            if r.outcome.is_some() {
                continue;
            }
            match self.post(Direction::Read, r.lender, segments) {
                Ok(wr_id) => r.wr_id = Some(wr_id),
                Err(e) => r.outcome = Some(Err(e)),
            }
        }
        self.await_quorum(&mut reads, pages.len(), limit);
        for r in reads.iter().filter(|r| r.outcome.is_none()) {
            if let Some(wr_id) = r.wr_id {
                self.coded.late.push(Late { lender: r.lender, wr_id, area });
            }
        }
        self.decode_pages(buf, &region, pages, &reads, out);
    }

    /// Chooses K + `extra_shard_reads` usable shards of every page (data shards first, lenders with
    /// reads in flight last). Pages with fewer than K usable shards fail at once. Also says
    /// whether every page has a usable shard beyond the K it needs.
    fn plan_reads(&self, pages: &[PageTransfer], out: &mut [Result<(), TransferError>]) -> (Vec<ShardRead>, bool) {
        let k = self.code().data();
        let mut reads: Vec<ShardRead> = Vec::new();
        let mut spare = true;
        for (i, p) in pages.iter().enumerate() {
            let Some(places) = self.store.locate(p.slot) else {
                out[i] = Err(TransferError::NoSuchSlot);
                continue;
            };
            let mut usable: Vec<usize> = (0..places.len).filter(|&s| self.usable(&places.at[s])).collect();
            if usable.len() < k {
                out[i] = Err(TransferError::LenderDown);
                continue;
            }
            spare &= usable.len() > k;
            usable.sort_by_key(|&s| self.coded.lagging(places.at[s].lender));
            for &s in usable.iter().take(k + self.store.extra_shard_reads) {
                let lender = places.at[s].lender;
                match reads.iter_mut().find(|r| r.lender == lender) {
                    Some(r) => r.shards.push((i, s)),
                    None => reads.push(ShardRead { lender, wr_id: None, shards: vec![(i, s)], outcome: None }),
                }
            }
        }
        (reads, spare)
    }

    /// The segments of one lender's read: each shard into its page's stripe in `region`.
    fn shard_segments(
        &self,
        r: &mut ShardRead,
        region: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        stripe_len: usize,
    ) -> Vec<Segment> {
        let shard_len = self.code().shard_len();
        let mut segments = Vec::with_capacity(r.shards.len());
        for &(i, s) in &r.shards {
            let Some(places) = self.store.locate(pages[i].slot) else { continue };
            let loc = places.at[s];
            if let Ok(slice) = LocalSlice::new(region, i * stripe_len + s * shard_len, shard_len) {
                segments.push(Segment { local: slice, remote_addr: loc.addr, rkey: loc.rkey });
            }
        }
        if segments.len() != r.shards.len() {
            r.outcome = Some(Err(local("a shard's place could not be named")));
            return Vec::new();
        }
        segments
    }

    /// Waits until every page has K shards in (or can no longer get them), up to `limit`; reads
    /// still pending then fail (their lenders are marked failed, as any timeout does).
    fn await_quorum(&mut self, reads: &mut [ShardRead], pages: usize, limit: Duration) {
        let k = self.code().data();
        let start = Instant::now();
        let (deadline, spin_until) = (start + limit, start + self.store.spin);
        let mut got: Vec<(u64, CompletionStatus)> = Vec::new();
        let (mut counts, mut pending) = (Vec::with_capacity(pages), Vec::with_capacity(reads.len()));
        loop {
            if quorum(reads, pages, k, &mut counts) {
                return;
            }
            pending.clear();
            pending.extend((0..reads.len()).filter(|&r| reads[r].outcome.is_none()));
            let now = Instant::now();
            if now >= deadline {
                for &r in &pending {
                    let why = format!("read: no reply within {limit:?}");
                    self.fail_lender(reads[r].lender, &why);
                    reads[r].outcome = Some(Err(TransferError::Timeout(limit)));
                }
                return;
            }
            // Spin over every lender, then sleep until any of them has something.
            if now >= spin_until {
                let endpoints: Vec<&rdma::Endpoint> =
                    pending.iter().filter_map(|&r| self.endpoint(reads[r].lender)).collect();
                let _ = rdma::Endpoint::wait_any(&endpoints, WAIT_SLICE.min(deadline - now));
            }
            for &r in &pending {
                let lender = reads[r].lender;
                got.clear();
                if let Err(e) = self.gather(lender, &mut got) {
                    for read in reads.iter_mut().filter(|x| x.lender == lender && x.outcome.is_none()) {
                        read.outcome = Some(Err(e.clone()));
                    }
                    continue;
                }
                for &(wr_id, status) in &got {
                    if reads[r].wr_id == Some(wr_id) {
                        reads[r].outcome = Some(self.outcome(lender, status));
                    }
                }
            }
        }
    }

    /// Takes the completions that have arrived on `lender`'s endpoint: each reaps a late read and
    /// is appended to `got` as (wr_id, status). A lost connection marks the lender failed.
    pub(super) fn gather(
        &mut self,
        lender: usize,
        got: &mut Vec<(u64, CompletionStatus)>,
    ) -> Result<(), TransferError> {
        let mut completions = std::mem::take(&mut self.coded.completions);
        completions.clear();
        let Some(ep) = self.endpoint(lender) else {
            self.coded.completions = completions;
            return Err(TransferError::ConnectionLost("connection closed".into()));
        };
        // A wait of zero: what has arrived, or the error of a connection found broken.
        let result = ep.wait(&mut completions, 16, Duration::ZERO, PollMode::Spin);
        if let Err(e) = result {
            self.coded.completions = completions;
            let why = e.to_string();
            self.fail_lender(lender, &why);
            return Err(TransferError::ConnectionLost(why));
        }
        for c in &completions {
            self.coded.landed(lender, c.wr_id);
            got.push((c.wr_id, c.status));
        }
        self.coded.completions = completions;
        Ok(())
    }

    /// Reaps late reads that have landed, without waiting.
    pub(super) fn poll_late(&mut self) {
        let mut lenders: Vec<usize> = self.coded.late.iter().map(|l| l.lender).collect();
        lenders.dedup();
        let mut got = Vec::new();
        for lender in lenders {
            let _ = self.gather(lender, &mut got);
        }
    }

    /// A staging area of at least `len` bytes that no read in flight can write into, without
    /// waiting (`None`: every area is held).
    /// Areas in `busy` (the caller's own reads in flight) are not handed out.
    pub(super) fn free_area(&mut self, len: usize, busy: &[usize]) -> Result<Option<usize>, TransferError> {
        let held = |a: usize, late: &[Late]| busy.contains(&a) || late.iter().any(|l| l.area == a);
        if (0..self.coded.areas.len()).all(|a| held(a, &self.coded.late)) && self.coded.areas.len() >= MAX_AREAS {
            return Ok(None);
        }
        self.area_besides(len, busy).map(Some)
    }

    /// A staging area of at least `len` bytes that no read in flight can write into; waits for
    /// the oldest late read when every area is held.
    pub(super) fn area(&mut self, len: usize) -> Result<usize, TransferError> {
        self.area_besides(len, &[])
    }

    /// [`Self::area`], not one of `busy` (the caller's own reads in flight); past [`MAX_AREAS`]
    /// when only those hold the others.
    pub(super) fn area_besides(&mut self, len: usize, busy: &[usize]) -> Result<usize, TransferError> {
        loop {
            let held = |a: usize, late: &[Late]| busy.contains(&a) || late.iter().any(|l| l.area == a);
            let free = (0..self.coded.areas.len()).find(|&a| !held(a, &self.coded.late));
            match free {
                Some(a) if self.coded.areas[a].len() >= len => return Ok(a),
                Some(a) => {
                    self.coded.areas[a] = LocalRegion::new(len.next_multiple_of(64 * 1024)).map_err(local)?;
                    return Ok(a);
                }
                None if self.coded.areas.len() < MAX_AREAS || self.coded.late.is_empty() => {
                    self.coded.areas.push(LocalRegion::new(len.next_multiple_of(64 * 1024)).map_err(local)?);
                    return Ok(self.coded.areas.len() - 1);
                }
                None => {
                    // Every area waits for a read: wait for the oldest (a lender that does not
                    // answer within the failover time is failed, which frees its areas).
                    let Late { lender, wr_id, .. } = self.coded.late[0];
                    let limit = self.store.failover;
                    let _ = self.wait_for(lender, wr_id, Instant::now() + limit, limit, Direction::Read);
                    self.coded.landed(lender, wr_id);
                }
            }
        }
    }

    /// Copies every page that got K shards out of `region` into `buf` (decoding when a data
    /// shard is missing); the others get their first error.
    fn decode_pages(
        &mut self,
        buf: &Arc<LocalRegion>,
        region: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        reads: &[ShardRead],
        out: &mut [Result<(), TransferError>],
    ) {
        let store = Arc::clone(&self.store);
        let code = store.code.as_ref().expect("coded I/O on a store without a code");
        let (n, k, stripe_len) = (code.shards(), code.data(), code.stripe_len());
        let mut stripe = std::mem::take(&mut self.coded.stripe);
        stripe.resize(stripe_len, 0);
        let mut present = vec![false; n];
        // (page, shard, read) of every shard posted, by page: one pass, not one per page.
        let mut posted: Vec<(usize, usize, usize)> =
            reads.iter().enumerate().flat_map(|(r, read)| read.shards.iter().map(move |&(i, s)| (i, s, r))).collect();
        posted.sort_unstable();
        let mut next = 0;
        for (i, p) in pages.iter().enumerate() {
            let start = next;
            while next < posted.len() && posted[next].0 == i {
                next += 1;
            }
            if out[i].is_err() {
                continue;
            }
            present.fill(false);
            let mut first_error = None;
            let mut lenders = Vec::with_capacity(k + self.store.extra_shard_reads);
            for &(_, s, r) in &posted[start..next] {
                match &reads[r].outcome {
                    Some(Ok(())) => {
                        present[s] = true;
                        lenders.push(reads[r].lender);
                    }
                    Some(Err(e)) => first_error = first_error.or(Some(e.clone())),
                    None => {}
                }
            }
            if present.iter().filter(|&&x| x).count() < k {
                out[i] = Err(first_error.unwrap_or(TransferError::LenderDown));
                continue;
            }
            out[i] = self.unstripe(code, buf, region, p, i * stripe_len, &present, &mut stripe);
            if out[i].is_ok() {
                self.coded.read_from.push((p.slot, lenders));
            }
        }
        self.coded.stripe = stripe;
    }

    /// Gathers the present shards of one page from `region` at `at`, rebuilds the missing data
    /// shards, and writes the page (and trailer) into `buf`.
    #[allow(clippy::too_many_arguments)]
    fn unstripe(
        &self,
        code: &PageCode,
        buf: &Arc<LocalRegion>,
        region: &Arc<LocalRegion>,
        p: &PageTransfer,
        at: usize,
        present: &[bool],
        stripe: &mut [u8],
    ) -> Result<(), TransferError> {
        let shard_len = code.shard_len();
        for (s, shard) in stripe.chunks_exact_mut(shard_len).enumerate() {
            if present[s] {
                region.read_at(at + s * shard_len, shard).map_err(local)?;
            }
        }
        if !present[..code.data()].iter().all(|&x| x) {
            code.rebuild(stripe, present, false).map_err(TransferError::Local)?;
        }
        let mut page = [0u8; PAGE_SIZE];
        let mut trailer = [0u8; crate::store::TRAILER_LEN];
        code.split(stripe, &mut page, &mut trailer[..self.store.trailer]);
        buf.write_at(p.offset, &page).map_err(local)?;
        match p.trailer {
            Some(_) if self.store.trailer == 0 => Err(local("this store keeps no trailers")),
            Some(t) => buf.write_at(t, &trailer[..self.store.trailer]).map_err(local),
            None => Ok(()),
        }
    }
}

/// True when every page has K shards in, or can no longer get them.
/// `counts` is scratch: (shards in, shards pending) per page.
fn quorum(reads: &[ShardRead], pages: usize, k: usize, counts: &mut Vec<(usize, usize)>) -> bool {
    counts.clear();
    counts.resize(pages, (0, 0));
    for r in reads {
        for &(i, _) in &r.shards {
            match r.outcome {
                Some(Ok(())) => counts[i].0 += 1,
                None => counts[i].1 += 1,
                Some(Err(_)) => {}
            }
        }
    }
    counts.iter().all(|&(ok, pending)| ok >= k || ok + pending < k)
}
