//! Fault-handling threads: read userfaultfd messages (spinning briefly, then sleeping), and serve
//! missing faults (zero page, or remote fetch with a prefetch window in one batched READ per
//! server), write-protect faults (mark dirty, unprotect) and remove events (discard, free remote
//! copy). Handles the known races: `EEXIST` still wakes, `EAGAIN` drains pending events first.
//!
//! A handler never touches region memory itself (only ioctls do) and never blocks on a page lock
//! held by an operation that needs this thread to make progress.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::{CompletionStatus, Endpoint, LocalRegion, LocalSlice, PollMode, Segment, WorkRequest};

use crate::region::{ActiveRegion as RegionState, FetchFailure};
use crate::stats::Counters;
use crate::table::{self, DIRTY, HAS_SLOT, POISONED, PREFETCHED, REFERENCED, REMOTE_VALID, RESIDENT};
use crate::uffd::{Event, MSG_SIZE};
use crate::{PagerError, Shared, PAGE_SIZE};

/// One fault-handling thread.
#[derive(Debug)]
pub(crate) struct Handler {
    shared: Arc<Shared>,
    endpoints: Vec<Option<Endpoint>>,
    staging: Arc<LocalRegion>,
    zero: Vec<u8>,
    deferred: VecDeque<Event>,
    next_wr: u64,
}

/// A page taken for one fetch.
struct Fetch {
    page: usize,
    entry: u64,
    staging: usize,
    ok: bool,
    failure: Option<String>,
}

impl Handler {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, PagerError> {
        let endpoints = shared.placement.endpoints()?;
        let staging = LocalRegion::new((1 + shared.config.prefetch_window) * PAGE_SIZE)
            .map_err(|source| PagerError::Transport { addr: shared.config.servers[0], source })?;
        Ok(Self { shared, endpoints, staging, zero: vec![0; PAGE_SIZE], deferred: VecDeque::new(), next_wr: 0 })
    }

    pub(crate) fn run(mut self) {
        let mut buf = [[0u8; MSG_SIZE]; 64];
        let mut idle_since: Option<Instant> = None;
        while !self.shared.shutdown.load(Ordering::Acquire) {
            if let Some(ev) = self.deferred.pop_front() {
                self.handle(ev);
                continue;
            }
            match self.shared.uffd.read_events(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    idle_since = None;
                    for raw in &buf[..n] {
                        self.deferred.push_back(Event::decode(raw));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading userfaultfd failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.shared.config.spin {
                std::hint::spin_loop();
            } else {
                let _ = self.shared.uffd.wait_readable(Duration::from_millis(50));
            }
        }
    }

    /// Reads pending messages into the deferred queue (what `EAGAIN` asks for).
    fn drain_events(&mut self) {
        let mut buf = [[0u8; MSG_SIZE]; 16];
        while let Ok(n) = self.shared.uffd.read_events(&mut buf) {
            if n == 0 {
                break;
            }
            self.deferred.extend(buf[..n].iter().map(Event::decode));
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Fault { addr, write, wp } => {
                let Some((region, page)) = self.shared.lookup(addr) else {
                    tracing::warn!(addr = format_args!("{addr:#x}"), "fault outside every region; waking it");
                    let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                    return;
                };
                let Some(region) = region.enter() else { return };
                if wp {
                    self.write_fault(&region, page);
                } else {
                    self.missing_fault(&region, page, write);
                }
            }
            Event::Remove { start, end } => self.remove(start, end),
            Event::Other(kind) => tracing::debug!(kind, "ignoring userfaultfd event"),
        }
    }

    /// Reserves room for `n` resident pages; while waiting for the evictor, keeps reading events so
    /// that an `madvise` blocking on its remove event (and an eviction blocked on that) can finish.
    fn reserve(&mut self, n: usize) {
        let mut waited = 0u32;
        while !self.shared.try_reserve(n, waited) {
            self.drain_events();
            waited += 1;
        }
    }

    /// Runs an ioctl, retrying while events are pending (`EAGAIN`).
    fn retry(&mut self, mut op: impl FnMut(&Self) -> io::Result<()>) -> io::Result<()> {
        loop {
            match op(self) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    self.drain_events();
                    std::thread::yield_now();
                }
                other => return other,
            }
        }
    }

    /// Installs `src` at `addr`; `EEXIST` (someone mapped it) wakes instead. Returns whether this
    /// call installed the page.
    fn install(&mut self, addr: usize, src: *const u8, wp: bool) -> bool {
        match self.retry(|h| h.shared.uffd.copy(addr, src, PAGE_SIZE, wp)) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                false
            }
            Err(e) => {
                tracing::error!(addr = format_args!("{addr:#x}"), error = %e, "UFFDIO_COPY failed");
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                false
            }
        }
    }

    fn missing_fault(&mut self, region: &RegionState, page: usize, write: bool) {
        let t = &region.table;
        let addr = region.page_addr(page);
        loop {
            let e = t.wait_idle(page);
            if e & POISONED != 0 {
                let _ = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE));
                return;
            }
            if e & RESIDENT != 0 {
                // Mapped already (a race), or dropped behind our back by madvise: a zero page is
                // the right content in the second case, and EEXIST tells us it is the first.
                let Some(e) = t.try_lock(page, |e| e & RESIDENT != 0) else { continue };
                let zero = self.zero.as_ptr();
                if self.install(addr, zero, false) {
                    t.unlock(page, (e | DIRTY | REFERENCED) & !(REMOTE_VALID | PREFETCHED));
                } else {
                    t.unlock(page, e);
                }
                return;
            }
            if e & REMOTE_VALID != 0 {
                let Some(e) = t.try_lock(page, |e| e & (RESIDENT | REMOTE_VALID) == REMOTE_VALID) else { continue };
                self.remote_fault(region, page, e, write);
                return;
            }
            let Some(e) = t.try_lock(page, |e| e & (RESIDENT | REMOTE_VALID) == 0) else { continue };
            self.reserve(1);
            let zero = self.zero.as_ptr();
            if self.install(addr, zero, !write) {
                let dirty = if write { DIRTY } else { 0 };
                t.unlock(page, e | RESIDENT | REFERENCED | dirty);
                self.shared.push_clock(region.id, page);
                Counters::add(&self.shared.stats.zero_faults, 1);
            } else {
                self.shared.unreserve(1);
                t.unlock(page, e);
            }
            return;
        }
    }

    fn write_fault(&mut self, region: &RegionState, page: usize) {
        let t = &region.table;
        let addr = region.page_addr(page);
        let e = loop {
            let e = t.wait_idle(page);
            if e & RESIDENT == 0 {
                // Evicted meanwhile: the retried access will fault as missing.
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
                return;
            }
            if let Some(e) = t.try_lock(page, |e| e & RESIDENT != 0) {
                break e;
            }
        };
        match self.retry(|h| h.shared.uffd.write_protect(addr, PAGE_SIZE, false)) {
            Ok(()) => {}
            Err(err) => {
                tracing::warn!(addr = format_args!("{addr:#x}"), error = %err, "un-write-protecting failed");
                let _ = self.shared.uffd.wake(addr, PAGE_SIZE);
            }
        }
        if e & PREFETCHED != 0 {
            Counters::add(&self.shared.stats.prefetch_hits, 1);
        }
        t.unlock(page, (e | DIRTY | REFERENCED) & !PREFETCHED);
        Counters::add(&self.shared.stats.write_faults, 1);
    }

    /// Pages to fetch along with `page`: up to the window along the region's trend, each locked.
    fn prefetch_window(&mut self, region: &RegionState, page: usize) -> Vec<(usize, u64)> {
        let stride = {
            let mut trend = region.trend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let stride = trend.record(page);
            // Pages of the previous window that the stream has now passed were used.
            if let Some((start, s, count)) = trend.last_window.take() {
                let mut hits = 0;
                for k in 0..count {
                    let q = start.wrapping_add_signed(s * k.cast_signed());
                    let passed = if s > 0 { q < page } else { q > page };
                    if q < region.table.len() && passed {
                        let old = region.table.update(q, 0, PREFETCHED);
                        if old & PREFETCHED != 0 && old & RESIDENT != 0 {
                            hits += 1;
                        }
                    }
                }
                Counters::add(&self.shared.stats.prefetch_hits, hits);
            }
            stride
        };
        let Some(stride) = stride.filter(|_| region.prefetch_enabled(self.shared.config.prefetch)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut q = page;
        for _ in 0..self.shared.prefetch_window() {
            match q.checked_add_signed(stride) {
                Some(n) if n < region.table.len() => q = n,
                _ => break,
            }
            let want = |e: u64| e & (RESIDENT | REMOTE_VALID | POISONED) == REMOTE_VALID;
            if let Some(e) = region.table.try_lock(q, want) {
                out.push((q, e));
            }
        }
        if let Some(&(first, _)) = out.first() {
            let mut trend = region.trend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            trend.last_window = Some((first, stride, out.len()));
        }
        out
    }

    fn remote_fault(&mut self, region: &RegionState, page: usize, entry: u64, write: bool) {
        let started = Instant::now();
        let extra = self.prefetch_window(region, page);
        let mut fetches: Vec<Fetch> = std::iter::once((page, entry))
            .chain(extra)
            .enumerate()
            .map(|(i, (page, entry))| Fetch { page, entry, staging: i, ok: false, failure: None })
            .collect();
        self.reserve(fetches.len());
        self.fetch(&mut fetches);
        let t = &region.table;
        let mut installed = 0usize;
        for (i, f) in fetches.iter().enumerate() {
            let addr = region.page_addr(f.page);
            if !f.ok {
                if i == 0 {
                    self.fail_page(region, f);
                } else {
                    t.unlock(f.page, f.entry);
                }
                continue;
            }
            let faulting_write = i == 0 && write;
            // SAFETY: the staging slot lies inside the staging region (sized for the window).
            let src = unsafe { self.staging.as_ptr().add(f.staging * PAGE_SIZE) };
            if self.install(addr, src, !faulting_write) {
                let mut e = f.entry | RESIDENT | REFERENCED;
                if faulting_write {
                    e |= DIRTY;
                }
                if i > 0 {
                    e |= PREFETCHED;
                }
                t.unlock(f.page, e);
                self.shared.push_clock(region.id, f.page);
                installed += 1;
            } else {
                t.unlock(f.page, f.entry);
            }
        }
        self.shared.unreserve(fetches.len() - installed);
        let ok = fetches.iter().filter(|f| f.ok).count() as u64;
        Counters::add(&self.shared.stats.bytes_in, ok * PAGE_SIZE as u64);
        if fetches[0].ok {
            Counters::add(&self.shared.stats.remote_faults, 1);
            Counters::add(&self.shared.stats.prefetched, ok - 1);
            let elapsed = started.elapsed();
            self.shared.stats.record_remote_fault(elapsed);
            region.record_fetch(elapsed);
        }
    }

    /// Reads every page of `fetches` into its staging slot: one request per server, all posted
    /// before any is waited for.
    fn fetch(&mut self, fetches: &mut [Fetch]) {
        let mut per_server: Vec<Vec<usize>> = vec![Vec::new(); self.endpoints.len()];
        for (i, f) in fetches.iter_mut().enumerate() {
            match self.shared.placement.locate(table::slot_of(f.entry)) {
                Some(loc) if f.entry & HAS_SLOT != 0 => per_server[loc.server].push(i),
                _ => f.failure = Some("the page table names no remote slot".into()),
            }
        }
        let deadline = Instant::now() + self.shared.config.fetch_timeout;
        let mut posted: Vec<(usize, u64)> = Vec::new();
        for (server, idxs) in per_server.iter().enumerate() {
            if idxs.is_empty() {
                continue;
            }
            let Some(ep) =
                self.endpoints[server].as_ref().filter(|_| self.shared.placement.servers()[server].is_alive())
            else {
                for &i in idxs {
                    fetches[i].failure = Some("the server is marked failed".into());
                }
                continue;
            };
            let segments: Vec<Segment> = idxs
                .iter()
                .filter_map(|&i| {
                    let loc = self.shared.placement.locate(table::slot_of(fetches[i].entry))?;
                    let local = LocalSlice::new(&self.staging, fetches[i].staging * PAGE_SIZE, PAGE_SIZE).ok()?;
                    Some(Segment { local, remote_addr: loc.addr, rkey: loc.rkey })
                })
                .collect();
            self.next_wr += 1;
            let wr_id = self.next_wr;
            match ep.post(&WorkRequest::read(wr_id, segments)) {
                Ok(()) => posted.push((server, wr_id)),
                Err(e) => {
                    for &i in idxs {
                        fetches[i].failure = Some(e.to_string());
                    }
                    self.endpoint_failed(server, &e.to_string());
                }
            }
        }
        let mut done = Vec::new();
        for (server, wr_id) in posted {
            let idxs = &per_server[server];
            let status = self.wait_for(server, wr_id, deadline, &mut done);
            for &i in idxs {
                match &status {
                    Ok(()) => fetches[i].ok = true,
                    Err(why) => fetches[i].failure = Some(why.clone()),
                }
            }
        }
    }

    fn wait_for(
        &mut self,
        server: usize,
        wr_id: u64,
        deadline: Instant,
        done: &mut Vec<rdma::Completion>,
    ) -> Result<(), String> {
        let spin = self.shared.config.spin;
        loop {
            let Some(ep) = self.endpoints[server].as_ref() else { return Err("connection closed".into()) };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!("no reply within {:?}", self.shared.config.fetch_timeout);
                self.endpoint_failed(server, &why);
                return Err(why);
            }
            done.clear();
            match ep.wait(done, 16, left, PollMode::SpinThenBlock(spin)) {
                Ok(_) => {
                    if let Some(c) = done.iter().find(|c| c.wr_id == wr_id) {
                        return match c.status {
                            CompletionStatus::Success => Ok(()),
                            CompletionStatus::Flushed => {
                                self.endpoint_failed(server, "connection lost");
                                Err("connection lost".into())
                            }
                            other => Err(format!("the server refused the read ({other:?}): its copy is gone")),
                        };
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    self.endpoint_failed(server, &why);
                    return Err(why);
                }
            }
        }
    }

    fn endpoint_failed(&mut self, server: usize, why: &str) {
        // A late completion must never land in a reused staging slot: drop the connection.
        self.endpoints[server] = None;
        self.shared.placement.mark_failed(server, why);
    }

    fn fail_page(&mut self, region: &RegionState, f: &Fetch) {
        let addr = region.page_addr(f.page);
        let loc = self.shared.placement.locate(table::slot_of(f.entry));
        let server = loc
            .and_then(|l| self.shared.placement.servers().get(l.server))
            .map_or_else(|| "0.0.0.0:0".parse().unwrap_or(std::net::SocketAddr::from(([0, 0, 0, 0], 0))), |s| s.addr);
        let reason = f.failure.clone().unwrap_or_else(|| "unknown".into());
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
        region.table.unlock(f.page, f.entry | POISONED);
        if let Err(e) = self.retry(|h| h.shared.uffd.poison(addr, PAGE_SIZE)) {
            tracing::error!(error = %e, "UFFDIO_POISON failed; the faulting thread stays blocked");
        }
    }

    fn remove(&mut self, start: usize, end: usize) {
        let mut addr = start & !(PAGE_SIZE - 1);
        while addr < end {
            let Some((region, first)) = self.shared.lookup(addr) else {
                addr += PAGE_SIZE;
                continue;
            };
            let Some(region) = region.enter() else { return };
            let last = ((end.min(region.base + region.len) - region.base).div_ceil(PAGE_SIZE)).min(region.table.len());
            let mut freed_resident = 0;
            for page in first..last {
                let e = region.table.lock(page);
                if e & RESIDENT != 0 {
                    freed_resident += 1;
                    if e & PREFETCHED != 0 {
                        Counters::add(&self.shared.stats.prefetch_wasted, 1);
                    }
                }
                if e & HAS_SLOT != 0 {
                    self.shared.placement.free_slot(table::slot_of(e));
                    Counters::add(&self.shared.stats.remote_freed, 1);
                }
                Counters::add(&self.shared.stats.removed_pages, 1);
                region.table.unlock(page, 0);
            }
            self.shared.unreserve(freed_resident);
            addr = region.base + last * PAGE_SIZE;
        }
    }
}
