//! Pager statistics: counters updated on the fault and eviction paths, a fault service-time
//! histogram, and the snapshot type the API returns and the CLI prints.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Live counters.
#[derive(Debug)]
pub struct Counters {
    pub(crate) zero_faults: AtomicU64,
    pub(crate) remote_faults: AtomicU64,
    pub(crate) write_faults: AtomicU64,
    pub(crate) prefetched: AtomicU64,
    pub(crate) prefetch_hits: AtomicU64,
    pub(crate) prefetched_ahead: AtomicU64,
    pub(crate) prefetch_ahead_dropped: AtomicU64,
    pub(crate) faults_postponed: AtomicU64,
    pub(crate) windows_handed_ahead: AtomicU64,
    pub(crate) prefetch_wasted: AtomicU64,
    pub(crate) evictions_clean: AtomicU64,
    pub(crate) evictions_dirty: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) fetch_failures: AtomicU64,
    pub(crate) copies_rejected: AtomicU64,
    pub(crate) removed_pages: AtomicU64,
    pub(crate) remote_freed: AtomicU64,
    pub(crate) writeback_failures: AtomicU64,
    pub(crate) lost_pages: AtomicU64,
    pub(crate) unshared: AtomicU64,
    pub(crate) refills: AtomicU64,
    pub(crate) found_unmapped: AtomicU64,
    pub(crate) installs_skipped: AtomicU64,
    pub(crate) state_violations: AtomicU64,
    pub(crate) move_miscounts: AtomicU64,
    pub(crate) rereplicated: AtomicU64,
    pub(crate) held_pages: AtomicU64,
    remote_latency: Mutex<Histogram<u64>>,
}

impl Default for Counters {
    fn default() -> Self {
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| std::process::abort());
        Self {
            zero_faults: AtomicU64::new(0),
            remote_faults: AtomicU64::new(0),
            write_faults: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
            prefetched_ahead: AtomicU64::new(0),
            prefetch_ahead_dropped: AtomicU64::new(0),
            faults_postponed: AtomicU64::new(0),
            windows_handed_ahead: AtomicU64::new(0),
            prefetch_wasted: AtomicU64::new(0),
            evictions_clean: AtomicU64::new(0),
            evictions_dirty: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            fetch_failures: AtomicU64::new(0),
            copies_rejected: AtomicU64::new(0),
            removed_pages: AtomicU64::new(0),
            remote_freed: AtomicU64::new(0),
            writeback_failures: AtomicU64::new(0),
            lost_pages: AtomicU64::new(0),
            unshared: AtomicU64::new(0),
            refills: AtomicU64::new(0),
            found_unmapped: AtomicU64::new(0),
            installs_skipped: AtomicU64::new(0),
            state_violations: AtomicU64::new(0),
            move_miscounts: AtomicU64::new(0),
            rereplicated: AtomicU64::new(0),
            held_pages: AtomicU64::new(0),
            remote_latency: Mutex::new(hist),
        }
    }
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_remote_fault(&self, service: Duration) {
        let ns = u64::try_from(service.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.remote_latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner).saturating_record(ns);
    }

    pub(crate) fn snapshot(&self) -> PagerStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let h = self.remote_latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = |x: f64| if h.is_empty() { Duration::ZERO } else { Duration::from_nanos(h.value_at_quantile(x)) };
        PagerStats {
            zero_faults: r(&self.zero_faults),
            remote_faults: r(&self.remote_faults),
            write_faults: r(&self.write_faults),
            prefetched_pages: r(&self.prefetched),
            prefetch_hits: r(&self.prefetch_hits),
            prefetched_ahead: r(&self.prefetched_ahead),
            prefetch_ahead_dropped: r(&self.prefetch_ahead_dropped),
            faults_postponed: r(&self.faults_postponed),
            windows_handed_ahead: r(&self.windows_handed_ahead),
            prefetch_wasted: r(&self.prefetch_wasted),
            evictions_clean: r(&self.evictions_clean),
            evictions_dirty: r(&self.evictions_dirty),
            bytes_in: r(&self.bytes_in),
            bytes_out: r(&self.bytes_out),
            fetch_failures: r(&self.fetch_failures),
            copies_rejected: r(&self.copies_rejected),
            removed_pages: r(&self.removed_pages),
            remote_freed: r(&self.remote_freed),
            writeback_failures: r(&self.writeback_failures),
            lost_pages: r(&self.lost_pages),
            unshared_pages: r(&self.unshared),
            refilled_pages: r(&self.refills),
            found_unmapped: r(&self.found_unmapped),
            installs_skipped: r(&self.installs_skipped),
            state_violations: r(&self.state_violations),
            move_miscounts: r(&self.move_miscounts),
            rereplicated_pages: r(&self.rereplicated),
            held_pages: r(&self.held_pages),
            remote_fault_p50: q(0.5),
            remote_fault_p99: q(0.99),
            remote_fault_p999: q(0.999),
            remote_fault_max: if h.is_empty() { Duration::ZERO } else { Duration::from_nanos(h.max()) },
            ..PagerStats::default()
        }
    }
}

/// A snapshot of the pager's statistics. A fault is counted just after the faulting thread
/// resumes (the install wakes it), so a snapshot taken right after an access may not count it yet.
///
/// As data: `serde` (JSON through `serde_json`, as `COALESCE_STATS` files hold it); durations
/// are `{"secs": u64, "nanos": u32}`. As text: `Display`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PagerStats {
    /// First touches served with a zero page (no network).
    pub zero_faults: u64,
    /// Faults served by fetching the page from a memory server.
    pub remote_faults: u64,
    /// Write-protect faults: first write to a clean page (marks it dirty).
    pub write_faults: u64,
    /// Pages brought in ahead of use by prefetch.
    pub prefetched_pages: u64,
    /// Prefetched pages later used.
    pub prefetch_hits: u64,
    /// Of the prefetched pages, those fetched one window ahead of a stream, while it read the
    /// window before (`PagerConfig::prefetch_ahead`).
    #[serde(default)]
    pub prefetched_ahead: u64,
    /// Windows ahead not fetched for want of room in the budget.
    #[serde(default)]
    pub prefetch_ahead_dropped: u64,
    /// Faults on a page another thread held (a prefetch fetching it, the evictor writing it
    /// out), set aside while the fault handler served others instead of waiting for it.
    #[serde(default)]
    pub faults_postponed: u64,
    /// Stream faults whose window the fault handler handed to the prefetch-ahead thread,
    /// fetching the faulting page alone, because demand faults (in another region, continuing
    /// no stream) were being served: they do not wait behind the window.
    #[serde(default)]
    pub windows_handed_ahead: u64,
    /// Prefetched pages evicted or discarded unused.
    pub prefetch_wasted: u64,
    /// Evictions of clean pages (dropped, no network).
    pub evictions_clean: u64,
    /// Evictions of dirty pages (written back first).
    pub evictions_dirty: u64,
    /// Bytes fetched from servers.
    pub bytes_in: u64,
    /// Bytes written back to servers.
    pub bytes_out: u64,
    /// Pages that could not be fetched (the access got SIGBUS).
    pub fetch_failures: u64,
    /// Pages whose copy came back from a lender changed (sealed pages that failed
    /// authentication: a flipped bit, another page's copy, an older version): refused, never
    /// handed to the program; read from another copy when there is one, else failed.
    #[serde(default)]
    pub copies_rejected: u64,
    /// Pages are sealed (encrypted and authenticated) before they leave the process.
    #[serde(default)]
    pub sealed: bool,
    /// Pages discarded by `madvise` in a region.
    pub removed_pages: u64,
    /// Remote copies freed because their page was discarded.
    pub remote_freed: u64,
    /// Write-backs that failed (the page stayed resident; nothing was lost unless it is also
    /// counted in [`PagerStats::lost_pages`]).
    pub writeback_failures: u64,
    /// Dirty pages whose write-back failed and that could not be put back into local memory
    /// either (the kernel refused the copy): poisoned, every access raises SIGBUS.
    pub lost_pages: u64,
    /// Pages resident now.
    pub resident_pages: u64,
    /// Most pages resident at once.
    pub peak_resident_pages: u64,
    /// The local budget in pages.
    pub budget_pages: u64,
    /// Times the budget was exceeded: no server could take a dirty page, or the evictor made no
    /// room for 2 s.
    pub overshoot_events: u64,
    /// The local maximum in pages (see `PagerConfig::local_max`; `u64::MAX`: unlimited).
    #[serde(default)]
    pub local_max_pages: u64,
    /// Accesses failed (SIGBUS) and allocations refused (ENOMEM) at the local maximum.
    #[serde(default)]
    pub local_max_refusals: u64,
    /// Pages the evictor had to unshare (copy-on-write shared with a forked child) before it
    /// could evict them; each was then written back as dirty.
    pub unshared_pages: u64,
    /// Missing faults on pages the table called resident (discarded by `madvise` before the
    /// remove event was handled): refilled with zeros.
    pub refilled_pages: u64,
    /// Pages the evictor found unmapped where the table called them resident (discarded by
    /// `madvise` before the remove event was handled).
    pub found_unmapped: u64,
    /// Pages about to be installed (by a fault, a prefetch, or a write-back put back) when a
    /// discard of them was read: the discard was applied instead, so they read as zeros as it
    /// promises.
    pub installs_skipped: u64,
    /// Bugs caught by the page-state invariants (a written page about to be filled with zeros,
    /// or lost): each page was poisoned (SIGBUS on access) and logged instead. Always 0 unless
    /// Coalesce has a bug.
    pub state_violations: u64,
    /// Times `UFFDIO_MOVE` moved other pages than it reported (the evictor trusts what it finds
    /// in its staging buffer instead): a kernel quirk, counted to make it visible.
    pub move_miscounts: u64,
    /// Records held by memory servers: one per copy of each remote page (with `ec:K+M`, one per
    /// shard).
    pub remote_pages: u64,
    /// Median service time of a remote fault (event read to page installed).
    pub remote_fault_p50: Duration,
    /// 99th percentile of the same.
    pub remote_fault_p99: Duration,
    /// 99.9th percentile of the same.
    #[serde(default)]
    pub remote_fault_p999: Duration,
    /// Largest.
    pub remote_fault_max: Duration,
    /// The service-level objective, if one was set.
    #[serde(default)]
    pub slo: Option<crate::Slo>,
    /// Remote faults counted against it.
    #[serde(default)]
    pub slo_faults: u64,
    /// Of those, the faults served within its target.
    #[serde(default)]
    pub slo_faults_met: u64,
    /// Pages the local share grew by, in all, to keep the pager's objective or its regions' (it
    /// may have shrunk since).
    #[serde(default)]
    pub slo_local_grown_pages: u64,
    /// Resident pages allowed now: the budget, or more while an objective needs it.
    #[serde(default)]
    pub local_limit_pages: u64,
    /// Bytes of pager metadata (page tables, slab table, free lists).
    pub metadata_bytes: u64,
    /// Records (page copies, or shards rebuilt with `ec:K+M`) written to another lender in the
    /// background to restore their redundancy after a lender was lost or left.
    #[serde(default)]
    pub rereplicated_pages: u64,
    /// Remote pages with fewer copies (or shards) than asked for that are waiting for them.
    #[serde(default)]
    pub rereplication_pending_pages: u64,
    /// Pages moved toward nearer lenders (the lenders moved, or a nearer one appeared); their
    /// copies count in `rereplicated_pages` too.
    #[serde(default)]
    pub pages_migrated: u64,
    /// Hot pages (faulted back, then evicted again) written to a lender at least four times
    /// heavier (half the round trip) than the one their copy was on.
    #[serde(default)]
    pub hot_pages_moved_nearer: u64,
    /// Pages read again from their next copy because the first lender had not answered within
    /// its recent 95th percentile (hedged reads, `replicate:N`).
    #[serde(default)]
    pub hedged_reads: u64,
    /// Of those, pages the second read brought first.
    #[serde(default)]
    pub hedge_wins: u64,
    /// Pages made resident while eviction was held (around `fork`, which must see the whole
    /// heap locally): the budget does not apply to them; each reservation of them past the budget
    /// is also an over-budget event.
    #[serde(default)]
    pub held_pages: u64,
    /// Pages are written behind to a backup tier (`--backup`); the `backup_*` fields count it.
    #[serde(default)]
    pub backup: bool,
    /// Pages written behind to the backup server.
    #[serde(default)]
    pub backup_written_pages: u64,
    /// Pages waiting to be written behind.
    #[serde(default)]
    pub backup_lag_pages: u64,
    /// How long the oldest waiting page has waited.
    #[serde(default)]
    pub backup_lag: Duration,
    /// Pages read back from the backup because every lender copy was gone.
    #[serde(default)]
    pub backup_read_pages: u64,
    /// Pages whose lender copies were gone and whose backup was older than the page (failed).
    #[serde(default)]
    pub backup_stale_pages: u64,
    /// Requests to the backup server that failed.
    #[serde(default)]
    pub backup_failures: u64,
    /// Pages dropped from the write-behind queue (full while the backup server was down or slow).
    #[serde(default)]
    pub backup_dropped_pages: u64,
    /// Checkpoints made: epochs every backup page is consistent with.
    #[serde(default)]
    pub backup_checkpoints: u64,
    /// How long ago the last checkpoint was made (`None`: none yet).
    #[serde(default)]
    pub backup_last_checkpoint: Option<Duration>,
    /// Pages written back since the newest checkpoint (the backup may not have them yet).
    #[serde(default)]
    pub backup_pages_since_checkpoint: u64,
}

impl PagerStats {
    /// Metadata bytes per page held remotely (0 when none is).
    pub fn metadata_per_remote_page(&self) -> f64 {
        if self.remote_pages == 0 {
            0.0
        } else {
            #[allow(clippy::cast_precision_loss)]
            let r = self.metadata_bytes as f64 / self.remote_pages as f64;
            r
        }
    }
}

impl fmt::Display for PagerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mib = |b: u64| {
            #[allow(clippy::cast_precision_loss)]
            let m = b as f64 / 1048576.0;
            m
        };
        writeln!(
            f,
            "faults: {} zero, {} remote, {} first-write; {} set aside while their page was held",
            self.zero_faults, self.remote_faults, self.write_faults, self.faults_postponed
        )?;
        writeln!(
            f,
            "prefetch: {} pages ({} one window ahead; {} windows handed ahead for demand faults; {} windows ahead dropped for want of room), {} hits, {} wasted",
            self.prefetched_pages,
            self.prefetched_ahead,
            self.windows_handed_ahead,
            self.prefetch_ahead_dropped,
            self.prefetch_hits,
            self.prefetch_wasted
        )?;
        writeln!(
            f,
            "evictions: {} clean (no network), {} dirty (written back); {} write-back failures; {} unshared after fork",
            self.evictions_clean, self.evictions_dirty, self.writeback_failures, self.unshared_pages
        )?;
        writeln!(f, "traffic: {:.1} MiB in, {:.1} MiB out", mib(self.bytes_in), mib(self.bytes_out))?;
        let grown = if self.local_limit_pages > self.budget_pages {
            format!(" (grown to {} pages for the objective)", self.local_limit_pages)
        } else {
            String::new()
        };
        writeln!(
            f,
            "resident: {} pages now, peak {} of a {}-page budget{grown}; {} over-budget events",
            self.resident_pages, self.peak_resident_pages, self.budget_pages, self.overshoot_events
        )?;
        if self.held_pages > 0 {
            writeln!(
                f,
                "held: {} pages brought local while eviction was held (fork), outside the budget",
                self.held_pages
            )?;
        }
        if self.local_max_refusals > 0 {
            writeln!(
                f,
                "local maximum: {} pages; {} accesses or allocations refused there",
                self.local_max_pages, self.local_max_refusals
            )?;
        }
        writeln!(
            f,
            "remote fault service time: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            us(self.remote_fault_p50),
            us(self.remote_fault_p99),
            us(self.remote_fault_p999),
            us(self.remote_fault_max)
        )?;
        if let Some(slo) = self.slo {
            #[allow(clippy::cast_precision_loss)]
            let met =
                if self.slo_faults == 0 { 100.0 } else { self.slo_faults_met as f64 * 100.0 / self.slo_faults as f64 };
            writeln!(
                f,
                "objective {slo}: {met:.1}% of {} remote faults within {} us; local share grown by {} pages in all, {} of {} pages allowed now",
                self.slo_faults,
                slo.target.as_micros(),
                self.slo_local_grown_pages,
                self.local_limit_pages,
                self.budget_pages
            )?;
        } else if self.slo_local_grown_pages > 0 {
            writeln!(
                f,
                "regions' objectives: local share grown by {} pages in all, {} of {} pages allowed now",
                self.slo_local_grown_pages, self.local_limit_pages, self.budget_pages
            )?;
        }
        writeln!(
            f,
            "remote: {} pages; metadata {} bytes ({:.2} bytes per remote page)",
            self.remote_pages,
            self.metadata_bytes,
            self.metadata_per_remote_page()
        )?;
        if self.rereplicated_pages > 0 || self.rereplication_pending_pages > 0 {
            writeln!(
                f,
                "re-replication: {} pages copied to restore their redundancy, {} waiting",
                self.rereplicated_pages, self.rereplication_pending_pages
            )?;
        }
        if self.hedged_reads > 0 {
            writeln!(
                f,
                "hedged reads: {} pages read again from another copy after a slow first answer, {} of them answered first there",
                self.hedged_reads, self.hedge_wins
            )?;
        }
        if self.pages_migrated > 0 || self.hot_pages_moved_nearer > 0 {
            writeln!(
                f,
                "migration: {} pages moved toward nearer lenders in the background, {} hot pages as they left local memory",
                self.pages_migrated, self.hot_pages_moved_nearer
            )?;
        }
        if self.backup {
            writeln!(
                f,
                "backup: {} pages written behind, {} waiting (oldest {} ms), {} dropped from a full queue; {} checkpoints (last {}, {} pages since); {} read back after every lender copy was lost, {} too old to use; {} failed requests",
                self.backup_written_pages,
                self.backup_lag_pages,
                self.backup_lag.as_millis(),
                self.backup_dropped_pages,
                self.backup_checkpoints,
                self.backup_last_checkpoint.map_or_else(|| "none yet".to_string(), |d| format!("{} ms ago", d.as_millis())),
                self.backup_pages_since_checkpoint,
                self.backup_read_pages,
                self.backup_stale_pages,
                self.backup_failures
            )?;
        }
        writeln!(
            f,
            "discards: {} pages by madvise ({} remote copies freed); {} refilled and {} found unmapped before their remove event; {} installs skipped",
            self.removed_pages, self.remote_freed, self.refilled_pages, self.found_unmapped, self.installs_skipped
        )?;
        write!(
            f,
            "failures: {} pages could not be fetched ({} copies refused as changed by their lender; pages {}); {} pages lost (neither written back nor put back); {} page-state violations (bugs, caught and poisoned); {} move miscounts",
            self.fetch_failures,
            self.copies_rejected,
            if self.sealed { "sealed" } else { "in plaintext" },
            self.lost_pages,
            self.state_violations,
            self.move_miscounts
        )
    }
}

/// What a process that borrowed memory through the preload library reports when it exits
/// (`COALESCE_STATS`): the pager's statistics and the process's peak resident set.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExitReport {
    /// The pager's statistics at exit.
    pub pager: PagerStats,
    /// The process's peak resident set (`VmHWM`) in bytes, 0 if unknown.
    pub peak_rss_bytes: u64,
    /// The process id (0 if unknown).
    #[serde(default)]
    pub pid: u32,
    /// The program's name (`/proc/self/comm`; empty if unknown).
    #[serde(default)]
    pub program: String,
    /// The parent process id (0 if unknown).
    #[serde(default)]
    pub ppid: u32,
    /// The command line, arguments separated by spaces (empty if unknown).
    #[serde(default)]
    pub command: String,
    /// What the preload library did besides `malloc`: anonymous mappings, refusals, forks.
    #[serde(default)]
    pub preload: PreloadStats,
}

/// What the preload library did with a program's anonymous mappings (`mmap`) and forks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreloadStats {
    /// Anonymous mappings served from the paged heap.
    pub mmaps_served: u64,
    /// Most bytes mapped that way at one time.
    pub mmap_peak_bytes: u64,
    /// Anonymous mappings too large for what was left of the heap's address space, mapped by the
    /// kernel outside the budget.
    #[serde(default)]
    pub mmaps_too_large: u64,
    /// Calls refused because they would have changed the pager's region behind its back
    /// (`mprotect` to other than read-write, `munmap` of `malloc`'s memory, ...).
    pub calls_refused: u64,
    /// `fork`s refused (`ENOMEM`) because the child would have needed more of the heap brought
    /// back than `COALESCE_FORK_MAX` allows.
    #[serde(default)]
    pub forks_refused: u64,
}

impl ExitReport {
    /// One line: the process, its peak resident set and what its pager did.
    pub fn summary(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
        let mib = self.peak_rss_bytes as f64 / 1048576.0;
        let p = &self.pager;
        let mut line = format!(
            "pid {} ({}, parent {}): peak RSS {mib:.1} MiB, {} remote faults, {} over-budget events, {} pages written \
             back, {} pages could not be fetched",
            self.pid, self.program, self.ppid, p.remote_faults, p.overshoot_events, p.evictions_dirty, p.fetch_failures
        );
        if p.held_pages > 0 {
            line += &format!(", {} pages brought local for a fork", p.held_pages);
        }
        let m = &self.preload;
        if m.mmaps_served > 0 {
            #[allow(clippy::cast_precision_loss)]
            let peak = m.mmap_peak_bytes as f64 / 1048576.0;
            line += &format!(", {} mmaps served from the heap (peak {peak:.1} MiB)", m.mmaps_served);
        }
        if m.forks_refused > 0 {
            line += &format!(", {} forks refused", m.forks_refused);
        }
        line
    }
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "coalesce pager statistics:\n{}", self.pager)?;
        #[allow(clippy::cast_precision_loss)]
        let mib = self.peak_rss_bytes as f64 / 1048576.0;
        writeln!(f, "process peak RSS: {mib:.1} MiB (VmHWM)")?;
        let m = &self.preload;
        #[allow(clippy::cast_precision_loss)]
        let peak = m.mmap_peak_bytes as f64 / 1048576.0;
        writeln!(
            f,
            "anonymous mappings served from the paged heap: {} (peak {peak:.1} MiB), {} too large for it; {} calls on \
             it refused, {} forks refused",
            m.mmaps_served, m.mmaps_too_large, m.calls_refused, m.forks_refused
        )
    }
}
