//! Hedged reads of replicated pages (`replicate:N`, [`crate::PagerConfig::hedged_reads`]).
//!
//! A read goes to the nearest copy of each page; when it has not answered within that lender's
//! recent 95th-percentile service time, the pages still missing are read again from their next
//! copy, and each page takes whichever answer comes first. One slow answer in twenty then costs
//! about the 95th percentile plus a second round trip instead of its own tail (jitter, a queue,
//! a lender pausing for a moment), at the price of about 5% more reads.
//!
//! Both reads land in staging areas of the thread (`coded_io.rs` keeps them), never in the
//! caller's buffer: the read that lost is still in flight and may still write, so its area is
//! reused only once it has landed or its connection was dropped. The winner's bytes are copied
//! out (one copy of a page, about a microsecond, beside a fault of 100 us or more).
//!
//! With a service-level objective ([`crate::PagerConfig::slo`], or the faulting region's,
//! [`crate::RegionOptions::slo`]: the tighter of the two; target T) a hedge must also come
//! back in time: when the 95th percentile plus the other copies' median service time (this
//! lender's own until they have been timed) would pass T, the read is hedged at T minus that
//! median instead, so that a slow first copy costs at most
//! about T (on a link whose round trip is far above its median one time in fifty, that is most of
//! its p99). A target the other copies' median cannot meet changes nothing (hedging sooner could
//! not help, and would double the reads).
//!
//! Service times are kept per lender over its last [`WINDOW`] reads (every thread's); until a
//! lender has [`MIN_SAMPLES`] of them, reads from it are not hedged. The hedge delay is at least
//! [`MIN_DELAY`] (below it, hedging would double the reads of a healthy lender for nothing) and at
//! most the failover time (past which the read fails over anyway).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::{LocalRegion, LocalSlice, Segment};

use super::io::{Direction, LenderIo};
use super::Location;
use crate::store::{PageTransfer, TransferError};
use crate::PAGE_SIZE;

/// Read service times kept per lender.
pub(super) const WINDOW: usize = 128;

/// Reads a lender must have served before reads from it are hedged.
pub(super) const MIN_SAMPLES: usize = 16;

/// The shortest hedge delay.
pub const MIN_DELAY: Duration = Duration::from_micros(200);

/// The last [`WINDOW`] read service times of one lender, and their median and 95th percentile
/// (recomputed every [`MIN_SAMPLES`] samples).
#[derive(Debug, Default)]
pub(super) struct ServiceTimes {
    samples: VecDeque<Duration>,
    fresh: usize,
    p50: Option<Duration>,
    p95: Option<Duration>,
}

impl ServiceTimes {
    /// Records one read's time from post to completion.
    pub(super) fn record(&mut self, t: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(t);
        self.fresh += 1;
        if self.fresh >= MIN_SAMPLES {
            self.fresh = 0;
            let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
            sorted.sort_unstable();
            self.p50 = sorted.get(sorted.len() / 2).copied();
            self.p95 = sorted.get(sorted.len() * 95 / 100).copied();
        }
    }

    /// The 95th percentile, once [`MIN_SAMPLES`] reads were timed.
    pub(super) fn p95(&self) -> Option<Duration> {
        self.p95
    }

    /// The median, once [`MIN_SAMPLES`] reads were timed.
    pub(super) fn p50(&self) -> Option<Duration> {
        self.p50
    }
}

/// The delay after which a read is hedged: `p95` of its lender, or sooner when a hedge after it
/// would come back (in about `other_p50`, the other copies' median) later than `within` and a
/// sooner one would not; never below [`MIN_DELAY`] nor above `limit` (the failover time).
pub(super) fn hedge_delay(
    p95: Duration,
    within: Option<Duration>,
    other_p50: Option<Duration>,
    limit: Duration,
) -> Duration {
    let in_time = match (within, other_p50) {
        (Some(within), Some(p50)) if within > p50 => p95.min(within - p50),
        _ => p95,
    };
    in_time.clamp(MIN_DELAY, limit.max(MIN_DELAY))
}

/// Hedges posted and won, for the statistics.
#[derive(Debug, Default)]
pub(super) struct HedgeCounters {
    /// Pages read again from another copy because the first was slow.
    pub(super) posted: AtomicU64,
    /// Of those, pages whose second read answered first.
    pub(super) won: AtomicU64,
}

/// One work request of a hedged batch: which pages, from which lender, into which area.
struct CopyRead {
    lender: usize,
    area: usize,
    pages: Vec<usize>,
    wr_id: Option<u64>,
    /// When it was posted, and how long it may take: the failover time when each of its pages
    /// has a copy left to try, else the request timeout.
    posted: Instant,
    limit: Duration,
    outcome: Option<Result<(), TransferError>>,
    hedge: bool,
}

impl CopyRead {
    fn deadline(&self) -> Instant {
        self.posted + self.limit
    }

    /// Still in flight, and some page of it still waits for it.
    fn needed(&self, plans: &[PagePlan]) -> bool {
        self.outcome.is_none() && self.pages.iter().any(|&i| plans[i].done_by.is_none())
    }

    /// Records the read's outcome; its pages no longer wait for it.
    fn settle(&mut self, outcome: Result<(), TransferError>, plans: &mut [PagePlan]) {
        if self.outcome.is_none() {
            for &i in &self.pages {
                plans[i].in_flight -= 1;
            }
        }
        self.outcome = Some(outcome);
    }
}

/// Per page of a batch: its copies nearest first, and which read filled it.
struct PagePlan {
    copies: Vec<Location>,
    /// Index in `copies` of the next copy to read from.
    next: usize,
    /// The read (index into the batch's reads) that brought it, first.
    done_by: Option<usize>,
    /// Its reads still in flight.
    in_flight: u32,
}

impl PagePlan {
    /// Not brought yet, and a read of it is still in flight.
    fn waiting(&self) -> bool {
        self.done_by.is_none() && self.in_flight > 0
    }
}

impl LenderIo {
    /// The delay after which a read from `lender` is hedged (`None`: not yet known).
    fn hedge_delay(&self, lender: usize) -> Option<Duration> {
        let (p95, own_p50) = {
            let times = super::lock(&self.store.lenders.get(lender)?.service);
            (times.p95()?, times.p50())
        };
        // The tighter of the store's target and the one the reads were given (a region's).
        let within = match (self.store.hedge_within, self.read_within) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The soonest answer a hedge could get: the smallest median of the other live lenders,
        // or, while none has been timed (reads go to the nearest copy), this lender's own.
        let other_p50 = within.and_then(|_| {
            self.store
                .lenders
                .iter()
                .filter(|&(j, s)| j != lender && s.is_alive())
                .filter_map(|(_, s)| super::lock(&s.service).p50())
                .min()
                .or(own_p50)
        });
        Some(hedge_delay(p95, within, other_p50, self.store.failover))
    }

    /// Reads every page from its nearest copy, hedged (see the module comment).
    pub(super) fn read_hedged(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.begin(out, pages.len());
        self.poll_late();
        self.read_from.clear();
        let stride = PAGE_SIZE + self.store.trailer;
        let mut plans = self.plan_copies(pages, out);
        let mut reads: Vec<CopyRead> = Vec::new();
        let first: Vec<usize> = (0..pages.len()).filter(|&i| out[i].is_ok()).collect();
        let start = Instant::now();
        if let Err(e) = self.post_copies(&first, &mut plans, pages, stride, false, &mut reads) {
            return out.iter_mut().for_each(|o| *o = Err(e.clone()));
        }
        let hedge_at = reads.iter().filter_map(|r| self.hedge_delay(r.lender)).min().map(|d| start + d);
        let mut hedged = false;
        loop {
            self.gather_copies(&mut reads, &mut plans);
            // Pages whose every read so far failed go to their next copy at once (failover).
            let failed: Vec<usize> = (0..pages.len())
                .filter(|&i| out[i].is_ok() && plans[i].done_by.is_none() && plans[i].in_flight == 0)
                .filter(|&i| plans[i].next < plans[i].copies.len())
                .collect();
            let slow: Vec<usize> = if !hedged && hedge_at.is_some_and(|t| Instant::now() >= t) {
                hedged = true;
                (0..pages.len())
                    .filter(|&i| out[i].is_ok() && plans[i].waiting())
                    .filter(|&i| plans[i].next < plans[i].copies.len())
                    .collect()
            } else {
                Vec::new()
            };
            for (list, hedge) in [(failed, false), (slow, true)] {
                if list.is_empty() {
                    continue;
                }
                if let Err(e) = self.post_copies(&list, &mut plans, pages, stride, hedge, &mut reads) {
                    // A hedge that finds no free staging area is simply not made.
                    if !hedge {
                        list.iter().for_each(|&i| out[i] = Err(e.clone()));
                    }
                }
            }
            let open = (0..pages.len()).any(|i| out[i].is_ok() && plans[i].waiting());
            if !open {
                break;
            }
            // Each read is given its own time from when it was posted.
            let Some(deadline) = reads.iter().filter(|r| r.needed(&plans)).map(CopyRead::deadline).min() else { break };
            if Instant::now() >= deadline {
                self.time_out(&mut reads, &mut plans);
                continue;
            }
            let until = match hedge_at.filter(|_| !hedged) {
                Some(t) => t.min(deadline),
                None => deadline,
            };
            self.wait_copies(&reads, &plans, start, until);
        }
        self.finish_hedged(buf, pages, stride, &reads, &plans, out);
    }

    /// Every page's usable copies, nearest first; a page with none fails at once.
    fn plan_copies(&self, pages: &[PageTransfer], out: &mut [Result<(), TransferError>]) -> Vec<PagePlan> {
        pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut copies: Vec<Location> = match self.store.locate(p.slot) {
                    Some(places) => places.copies().iter().copied().filter(|loc| self.usable(loc)).collect(),
                    None => {
                        out[i] = Err(TransferError::NoSuchSlot);
                        Vec::new()
                    }
                };
                // Nearest first; among equals, one without reads still in flight.
                copies.sort_by(|a, b| {
                    let (wa, wb) = (self.store.weight_of(a.lender), self.store.weight_of(b.lender));
                    wb.total_cmp(&wa).then_with(|| self.coded.lagging(a.lender).cmp(&self.coded.lagging(b.lender)))
                });
                if copies.is_empty() && out[i].is_ok() {
                    out[i] = Err(TransferError::LenderDown);
                }
                PagePlan { copies, next: 0, done_by: None, in_flight: 0 }
            })
            .collect()
    }

    /// Posts reads of `list`'s pages from each one's next copy, one work request per lender,
    /// into a fresh staging area.
    fn post_copies(
        &mut self,
        list: &[usize],
        plans: &mut [PagePlan],
        pages: &[PageTransfer],
        stride: usize,
        hedge: bool,
        reads: &mut Vec<CopyRead>,
    ) -> Result<(), TransferError> {
        if list.is_empty() {
            return Ok(());
        }
        let len = pages.len() * stride;
        // Not an area this batch reads into already: both answers may still land.
        let busy: Vec<usize> = reads.iter().map(|r| r.area).collect();
        let area = if hedge {
            self.free_area(len, &busy)?
                .ok_or_else(|| TransferError::Local("no free staging area for a hedge".into()))?
        } else {
            self.area_besides(len, &busy)?
        };
        if hedge {
            self.store.hedges.posted.fetch_add(list.len() as u64, Ordering::Relaxed);
        }
        let region = Arc::clone(&self.coded.areas[area]);
        let mut batch: Vec<(usize, Vec<usize>, Vec<Segment>)> = Vec::new();
        for &i in list {
            let plan = &mut plans[i];
            let Some(&loc) = plan.copies.get(plan.next) else { continue };
            plan.next += 1;
            let slice = |at, len| LocalSlice::new(&region, at, len).map_err(|e| TransferError::Local(e.to_string()));
            let mut segments =
                vec![Segment { local: slice(i * stride, PAGE_SIZE)?, remote_addr: loc.addr, rkey: loc.rkey }];
            if pages[i].trailer.is_some() {
                let local = slice(i * stride + PAGE_SIZE, self.store.trailer)?;
                segments.push(Segment { local, remote_addr: loc.addr + PAGE_SIZE as u64, rkey: loc.rkey });
            }
            match batch.iter_mut().find(|(l, _, _)| *l == loc.lender) {
                Some((_, idx, segs)) => {
                    idx.push(i);
                    segs.append(&mut segments);
                }
                None => batch.push((loc.lender, vec![i], segments)),
            }
        }
        for (lender, idx, segments) in batch {
            let spare = idx.iter().all(|&i| plans[i].next < plans[i].copies.len());
            let limit = if spare { self.store.failover } else { self.store.timeout };
            let (wr_id, outcome) = match self.post(Direction::Read, lender, segments) {
                Ok(id) => {
                    idx.iter().for_each(|&i| plans[i].in_flight += 1);
                    (Some(id), None)
                }
                Err(e) => (None, Some(Err(e))),
            };
            reads.push(CopyRead { lender, area, pages: idx, wr_id, posted: Instant::now(), limit, outcome, hedge });
        }
        Ok(())
    }

    /// Takes the completions that have arrived for the batch's reads; a page is filled by the
    /// first read that brings it.
    fn gather_copies(&mut self, reads: &mut [CopyRead], plans: &mut [PagePlan]) {
        let mut lenders: Vec<usize> = reads.iter().filter(|r| r.outcome.is_none()).map(|r| r.lender).collect();
        lenders.sort_unstable();
        lenders.dedup();
        let mut got = Vec::new();
        for lender in lenders {
            got.clear();
            if let Err(e) = self.gather(lender, &mut got) {
                for r in reads.iter_mut().filter(|r| r.lender == lender && r.outcome.is_none()) {
                    r.settle(Err(e.clone()), plans);
                }
                continue;
            }
            for &(wr_id, status) in &got {
                let Some(k) = reads.iter().position(|r| r.lender == lender && r.wr_id == Some(wr_id)) else { continue };
                let outcome = self.outcome(lender, status);
                if outcome.is_ok() {
                    let took = reads[k].posted.elapsed();
                    if let Some(s) = self.store.lenders.get(lender) {
                        super::lock(&s.service).record(took);
                    }
                    for &i in &reads[k].pages {
                        plans[i].done_by.get_or_insert(k);
                    }
                }
                reads[k].settle(outcome, plans);
            }
        }
    }

    /// Sleeps until a read of the batch has something, or `until`.
    fn wait_copies(&self, reads: &[CopyRead], plans: &[PagePlan], start: Instant, until: Instant) {
        let now = Instant::now();
        if now >= until || now < start + self.store.spin {
            return; // still spinning
        }
        let endpoints: Vec<&rdma::Endpoint> =
            reads.iter().filter(|r| r.needed(plans)).filter_map(|r| self.endpoint(r.lender)).collect();
        let _ = rdma::Endpoint::wait_any(&endpoints, super::coded_io::WAIT_SLICE.min(until - now));
    }

    /// Reads that pages still wait for and that have had their time fail, and their lenders
    /// are marked failed (as any timeout does); their pages then go to their next copy.
    fn time_out(&mut self, reads: &mut [CopyRead], plans: &mut [PagePlan]) {
        let now = Instant::now();
        for r in reads.iter_mut() {
            if r.needed(plans) && now >= r.deadline() {
                let limit = r.limit;
                self.fail_lender(r.lender, &format!("read: no reply within {limit:?}"));
                r.settle(Err(TransferError::Timeout(limit)), plans);
            }
        }
    }

    /// Copies each filled page out of the area of the read that brought it; the others get
    /// their first error. Reads still in flight keep their areas (`coded_io.rs`).
    fn finish_hedged(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        stride: usize,
        reads: &[CopyRead],
        plans: &[PagePlan],
        out: &mut [Result<(), TransferError>],
    ) {
        let mut bytes = vec![0u8; stride];
        for (i, p) in pages.iter().enumerate() {
            if out[i].is_err() {
                continue;
            }
            let Some(k) = plans[i].done_by else {
                let error = reads.iter().filter(|r| r.pages.contains(&i)).find_map(|r| r.outcome.clone()?.err());
                out[i] = Err(error.unwrap_or(TransferError::LenderDown));
                continue;
            };
            let r = &reads[k];
            let area = &self.coded.areas[r.area];
            let copied =
                area.read_at(i * stride, &mut bytes).and_then(|()| buf.write_at(p.offset, &bytes[..PAGE_SIZE]));
            let copied = match p.trailer {
                Some(at) => copied.and_then(|()| buf.write_at(at, &bytes[PAGE_SIZE..])),
                None => copied,
            };
            if let Err(e) = copied {
                out[i] = Err(TransferError::Local(e.to_string()));
                continue;
            }
            if r.hedge {
                self.store.hedges.won.fetch_add(1, Ordering::Relaxed);
            }
            self.read_from.push((p.slot, r.lender));
        }
        for r in reads {
            if let (None, Some(wr_id)) = (&r.outcome, r.wr_id) {
                self.coded.late.push(super::coded_io::Late::new(r.lender, wr_id, r.area));
            }
        }
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_95th_percentile_is_known_after_enough_samples_and_follows_the_window() {
        let mut s = ServiceTimes::default();
        for _ in 0..MIN_SAMPLES - 1 {
            s.record(Duration::from_micros(100));
        }
        assert_eq!(s.p95(), None);
        s.record(Duration::from_micros(100));
        assert_eq!(s.p95(), Some(Duration::from_micros(100)));
        // 5% slow reads are at the 95th percentile's edge; 10% move it.
        for k in 0..WINDOW {
            s.record(Duration::from_micros(if k % 10 == 0 { 5000 } else { 100 }));
        }
        assert_eq!(s.p95(), Some(Duration::from_micros(5000)));
        for _ in 0..WINDOW {
            s.record(Duration::from_micros(300));
        }
        assert_eq!(s.p95(), Some(Duration::from_micros(300)));
        assert_eq!(s.p50(), Some(Duration::from_micros(300)));
    }

    #[test]
    fn an_objective_hedges_sooner_only_when_a_hedge_can_still_meet_it() {
        let ms = Duration::from_millis;
        let limit = ms(1000);
        // No objective: the 95th percentile, within its bounds.
        assert_eq!(hedge_delay(ms(50), None, Some(ms(46)), limit), ms(50));
        assert_eq!(hedge_delay(Duration::from_micros(20), None, None, limit), MIN_DELAY);
        assert_eq!(hedge_delay(ms(5000), None, None, limit), limit);
        // 50 + 46 would answer past 60: hedge at 60 - 46.
        assert_eq!(hedge_delay(ms(50), Some(ms(60)), Some(ms(46)), limit), ms(14));
        // The p95 hedge answers in time anyway: unchanged.
        assert_eq!(hedge_delay(ms(10), Some(ms(60)), Some(ms(46)), limit), ms(10));
        // Out of the other copies' reach, or their median unknown: unchanged.
        assert_eq!(hedge_delay(ms(50), Some(ms(40)), Some(ms(46)), limit), ms(50));
        assert_eq!(hedge_delay(ms(50), Some(ms(60)), None, limit), ms(50));
        // Never below the shortest delay.
        assert_eq!(hedge_delay(ms(50), Some(ms(46)), Some(Duration::from_micros(45_950)), limit), MIN_DELAY);
    }
}
