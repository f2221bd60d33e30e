//! `coalesce stress`: the contended stress harness. Several application threads fill a region
//! bigger than the local budget, then read and rewrite its pages at random and in sequential runs
//! while CPU hogs keep every core busy, over a matrix of budgets and fault-thread counts. Every
//! page's expected content is known (a shadow version per page, outside the region), every
//! access checks the whole page, and the first wrong word stops the run with the page's history
//! (each page-table transition, which thread made it) from the pager's history log.
//!
//! A page's content is a function of (page, version): version 0 is the never-written zero page
//! (and a discarded page), every later version has no zero word, so a page that comes back as
//! zeros, as an older version, or as another page is told apart in the report. Discards
//! (`--discards`) race the prefetch windows of the faults just before them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coalesce_pager::history::Record;
use coalesce_pager::{PageEntry as Entry, Pager, PagerConfig, PagerStats, RegionOptions, PAGE_SIZE};

const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
const LOCKED: u32 = 1 << 31;

/// What to run.
#[derive(Debug, Clone)]
pub struct StressOptions {
    /// Region size in bytes.
    pub size: usize,
    /// Local budgets to run, as fractions of the region (8 means 1/8).
    pub fractions: Vec<usize>,
    /// Fault-thread counts to run.
    pub fault_threads: Vec<usize>,
    /// Evictor threads in every configuration.
    pub evictor_threads: usize,
    /// Application threads.
    pub app_threads: usize,
    /// Total time over every configuration of the matrix.
    pub duration: Duration,
    /// CPU hog threads (busy loops) running beside the workload.
    pub hogs: usize,
    /// Percentage of page accesses that rewrite the page.
    pub write_percent: u32,
    /// Seed of the access pattern.
    pub seed: u64,
    /// memory-servers (empty, without `discover`: an embedded one on 127.0.0.1).
    pub servers: Vec<SocketAddr>,
    /// Find lenders besides `servers` (mDNS or etcd), waiting this long for the first ones at
    /// the start of each configuration; later ones are adopted while it runs.
    pub discover: Option<(coalesce_pager::discover::Method, Duration)>,
    /// Pages travel and rest in plaintext (no sealing).
    pub trusted_lenders: bool,
    /// The cluster key, for lenders that require one (an embedded lender then does too).
    pub key: Option<rdma::secure::ClusterKey>,
    /// Copies or shards of each page (`None`: the pager's default for the number of lenders).
    pub redundancy: Option<coalesce_pager::store::Redundancy>,
    /// Background re-replication rate in bytes per second (0: off).
    pub repair_rate: usize,
    /// The backup tier (`--backup`), if any.
    pub backup: Option<SocketAddr>,
    /// The longest a page waits to be written behind.
    pub backup_lag: std::time::Duration,
    /// Hedged reads of replicated pages.
    pub hedged_reads: bool,
    /// A service-level objective (the local share moves under the checks).
    pub slo: Option<coalesce_pager::Slo>,
    /// The stressed region's own objective: while at risk its pages are spared by the evictor
    /// and evicted only when nothing else can go.
    pub region_slo: Option<coalesce_pager::Slo>,
    /// Page-table transitions kept in the history log.
    pub history: usize,
    /// Prefetch window in pages.
    pub prefetch_window: usize,
    /// Percentage of forward sequential runs in which a page check is followed at once by a
    /// discard (`madvise(MADV_DONTNEED)`) of the pages just ahead: the pages the fault's prefetch
    /// window is still installing.
    pub discard_percent: u32,
}

/// Bad options or a set-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// The embedded server failed.
    #[error(transparent)]
    Server(#[from] lender::ServerError),
    /// The pager failed.
    #[error(transparent)]
    Pager(#[from] coalesce_pager::PagerError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

/// One configuration of the matrix and what it did.
#[derive(Debug, Clone)]
pub struct ConfigReport {
    /// Budget as a fraction of the region.
    pub fraction: usize,
    /// Fault threads.
    pub fault_threads: usize,
    /// Time it ran.
    pub elapsed: Duration,
    /// Whole-page checks done.
    pub pages_checked: u64,
    /// Whole-page rewrites done.
    pub pages_written: u64,
    /// Pages discarded with `madvise`.
    pub pages_discarded: u64,
    /// The pager's statistics at the end.
    pub stats: PagerStats,
}

/// A page that did not read back as it was left.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// The configuration it happened in.
    pub config: ConfigReport,
    /// Application thread that found it.
    pub thread: usize,
    /// Page index in the region.
    pub page: usize,
    /// First wrong word in the page.
    pub word: usize,
    /// Version the page should hold.
    pub expected_version: u32,
    /// Word expected.
    pub expected: u64,
    /// Word read.
    pub found: u64,
    /// What the page holds instead.
    pub looks_like: String,
    /// The page's recorded transitions, oldest first.
    pub history: Vec<Record>,
    /// Its page-table entry when the report was made.
    pub entry_now: Entry,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "WRONG WORD: page {} word {} (byte offset {:#x}) found by app thread {} with 1/{} local, {} fault thread(s), {:.1} s in",
            self.page,
            self.word,
            self.page * PAGE_SIZE + self.word * 8,
            self.thread,
            self.config.fraction,
            self.config.fault_threads,
            self.config.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  expected version {} ({:#018x}), read {:#018x}: the page holds {}",
            self.expected_version, self.expected, self.found, self.looks_like
        )?;
        writeln!(f, "  page-table entry now: {}", self.entry_now)?;
        writeln!(f, "  history of the page ({} transitions kept):", self.history.len())?;
        for r in &self.history {
            writeln!(f, "    {r}")?;
        }
        write!(f, "  pager: {}", self.config.stats)
    }
}

/// The content of word `i` of `page` at `version` (0 for version 0; never 0 otherwise).
pub fn pattern(page: usize, version: u32, i: usize) -> u64 {
    if version == 0 {
        return 0;
    }
    let mut x = (page as u64) << 32 ^ u64::from(version) << 12 ^ i as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}

/// What an access does to a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Check every word.
    Check,
    /// Check every word, then write a new version.
    CheckWrite,
    /// Write a new version without reading first.
    BlindWrite,
}

/// The first wrong word: thread, page, word, expected version, word read.
#[derive(Debug, Clone, Copy)]
struct Finding {
    thread: usize,
    page: usize,
    word: usize,
    version: u32,
    found: u64,
}

/// Shared state of one configuration's run.
struct Run<'a> {
    words: &'a [AtomicU64],
    versions: Vec<AtomicU32>,
    stop: AtomicBool,
    deadline: Instant,
    checked: AtomicU64,
    written: AtomicU64,
    found: Mutex<Option<Finding>>,
    write_percent: u32,
    discard_percent: u32,
    discarded: AtomicU64,
}

impl Run<'_> {
    fn lock_page(&self, page: usize) -> u32 {
        let v = &self.versions[page];
        let mut spins = 0u32;
        loop {
            let cur = v.load(Ordering::Acquire);
            if cur & LOCKED == 0
                && v.compare_exchange_weak(cur, cur | LOCKED, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                return cur;
            }
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            }
        }
    }

    fn page_words(&self, page: usize) -> &[AtomicU64] {
        &self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE]
    }

    /// Checks or rewrites one page; false (after recording the finding) on a wrong word. A blind
    /// write does not read the page first (its first access is a write: the write-fault paths).
    fn access(&self, thread: usize, page: usize, op: Op) -> bool {
        let version = self.lock_page(page);
        let words = self.page_words(page);
        let mut ok = true;
        let write = op != Op::Check;
        for (i, w) in words.iter().enumerate().take(if op == Op::BlindWrite { 0 } else { WORDS_PER_PAGE }) {
            let found = w.load(Ordering::Relaxed);
            if found != pattern(page, version, i) {
                self.stop.store(true, Ordering::Release);
                let mut slot = self.found.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                slot.get_or_insert(Finding { thread, page, word: i, version, found });
                ok = false;
                break;
            }
        }
        let mut next = version;
        if ok && write {
            next = if version >= LOCKED - 1 { 1 } else { version + 1 };
            for (i, w) in words.iter().enumerate() {
                w.store(pattern(page, next, i), Ordering::Relaxed);
            }
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        self.checked.fetch_add(1, Ordering::Relaxed);
        self.versions[page].store(next, Ordering::Release);
        ok
    }

    /// Discards `pages` (a range of whole pages) with `madvise(MADV_DONTNEED)`: they read as
    /// zeros (version 0) from now on.
    fn discard(&self, pages: std::ops::Range<usize>) {
        let pages = pages.start..pages.end.min(self.versions.len());
        if pages.is_empty() {
            return;
        }
        // In ascending order; other threads hold at most one page lock at a time.
        for page in pages.clone() {
            self.lock_page(page);
        }
        let addr = self.page_words(pages.start).as_ptr();
        // SAFETY: the range lies inside the live region mapping (clamped to its pages above);
        // the region is only accessed through atomics, for which a discard is a store of zeros,
        // and every page of the range is locked against this harness's other threads.
        let rc = unsafe { libc::madvise(addr.cast_mut().cast(), pages.len() * PAGE_SIZE, libc::MADV_DONTNEED) };
        let ok = rc == 0;
        if ok {
            self.discarded.fetch_add(pages.len() as u64, Ordering::Relaxed);
        } else {
            tracing::error!(error = %std::io::Error::last_os_error(), "stress: madvise failed");
        }
        for page in pages {
            let v = &self.versions[page];
            v.store(if ok { 0 } else { v.load(Ordering::Relaxed) & !LOCKED }, Ordering::Release);
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && Instant::now() < self.deadline
    }

    /// Application thread `t` of `n`: writes its stripe of the region (the fill), then mixes
    /// sequential runs and random pages, reads and rewrites.
    fn app_thread(&self, t: usize, n: usize, seed: u64) {
        let pages = self.versions.len();
        // The fill and one sequential check of this thread's contiguous share: long single-thread
        // streams (write trends, then read trends) as `coalesce demo` makes them.
        let share = pages.div_ceil(n);
        let mine = t * share..((t + 1) * share).min(pages);
        for op in [Op::BlindWrite, Op::Check] {
            for page in mine.clone() {
                if !self.running() || !self.access(t, page, op) {
                    return;
                }
            }
        }
        let mut rng = fastrand::Rng::with_seed(seed ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        while self.running() {
            let (start, len, stride) = if rng.u32(..100) < 40 {
                (rng.usize(..pages), rng.usize(16..=512), if rng.bool() { 1 } else { -1isize })
            } else {
                (0, 64, 0)
            };
            // In a forward run, once: check a page, then discard the pages right after it.
            let discard_at = (stride == 1 && rng.u32(..100) < self.discard_percent).then(|| rng.usize(..len));
            for k in 0..len {
                let page = if stride == 0 {
                    rng.usize(..pages)
                } else {
                    let p = start.cast_signed() + stride * k.cast_signed();
                    if p < 0 || p.cast_unsigned() >= pages {
                        break;
                    }
                    p.cast_unsigned()
                };
                let op = match rng.u32(..100) {
                    x if x >= self.write_percent => Op::Check,
                    x if x % 2 == 0 => Op::BlindWrite,
                    _ => Op::CheckWrite,
                };
                if discard_at == Some(k) {
                    if !self.access(t, page, Op::Check) {
                        return;
                    }
                    self.discard(page + 1..page + 1 + rng.usize(1..=64));
                    continue;
                }
                if !self.access(t, page, op) {
                    return;
                }
            }
        }
    }

    /// Reads every page once more (after the threads stopped).
    fn final_check(&self) {
        for page in 0..self.versions.len() {
            if self.stop.load(Ordering::Acquire) || !self.access(usize::MAX, page, Op::Check) {
                return;
            }
        }
    }
}

/// Describes what a wrong page holds: zeros, an older version of itself, or something else.
fn looks_like(words: &[AtomicU64], page: usize, version: u32) -> String {
    let got: Vec<u64> = words.iter().map(|w| w.load(Ordering::Relaxed)).collect();
    let zeros = got.iter().filter(|&&w| w == 0).count();
    if zeros == got.len() {
        return "all zeros (a zero page)".into();
    }
    for back in 1..=64u32 {
        let Some(v) = version.checked_sub(back) else { break };
        if got.iter().enumerate().all(|(i, &w)| w == pattern(page, v, i)) {
            return format!("version {v}, {back} write(s) old (a stale copy)");
        }
    }
    let right = got.iter().enumerate().filter(|&(i, &w)| w == pattern(page, version, i)).count();
    format!("{zeros} zero words, {right} right words of {}", got.len())
}

/// Runs one configuration; `Err` carries the finding.
fn run_config(
    opts: &StressOptions,
    servers: &[SocketAddr],
    fraction: usize,
    fault_threads: usize,
    time: Duration,
) -> Result<Result<ConfigReport, Box<Mismatch>>, StressError> {
    let mut config = PagerConfig::new(servers.to_vec(), opts.size / fraction);
    config.fault_threads = fault_threads;
    config.evictor_threads = opts.evictor_threads;
    config.history = opts.history;
    config.prefetch_window = opts.prefetch_window;
    config.trusted_lenders = opts.trusted_lenders;
    config.key = opts.key.clone();
    config.redundancy = opts.redundancy;
    config.repair_rate = opts.repair_rate;
    config.backup = opts.backup;
    config.backup_max_lag = opts.backup_lag;
    config.hedged_reads = opts.hedged_reads;
    config.slo = opts.slo;
    if let Some((method, wait)) = &opts.discover {
        config.discovery = Some(method.clone());
        config.discovery_wait = *wait;
    }
    let pager = Pager::new(config)?;
    let region = pager.map(opts.size, RegionOptions { slo: opts.region_slo, ..RegionOptions::default() })?;
    let pages = region.len() / PAGE_SIZE;
    // SAFETY: the region is a live, page-aligned mapping of `len` bytes that outlives `words`
    // (dropped at the end of this function, after every thread has been joined); it is only
    // accessed through these atomics while they exist.
    let words: &[AtomicU64] =
        unsafe { std::slice::from_raw_parts(region.as_ptr().cast::<AtomicU64>(), region.len() / 8) };
    let started = Instant::now();
    let run = Run {
        words,
        versions: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        stop: AtomicBool::new(false),
        deadline: started + time,
        checked: AtomicU64::new(0),
        written: AtomicU64::new(0),
        found: Mutex::new(None),
        write_percent: opts.write_percent,
        discard_percent: opts.discard_percent,
        discarded: AtomicU64::new(0),
    };
    let hogs_stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..opts.hogs {
            s.spawn(|| {
                let mut x = 0u64;
                while !hogs_stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            });
        }
        // Streams' windows handed ahead (as beside demand faults) a quarter-second out of two.
        let (pager, stop) = (&pager, &hogs_stop);
        s.spawn(move || {
            let mut ticks = 0u32;
            while !stop.load(Ordering::Relaxed) {
                pager.force_windows_ahead(ticks % 10 < 5);
                ticks = ticks.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let workers: Vec<_> = (0..opts.app_threads)
            .map(|t| {
                let run = &run;
                s.spawn(move || run.app_thread(t, opts.app_threads, opts.seed))
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        hogs_stop.store(true, Ordering::Relaxed);
    });
    run.final_check();
    let report = ConfigReport {
        fraction,
        fault_threads,
        elapsed: started.elapsed(),
        pages_checked: run.checked.load(Ordering::Relaxed),
        pages_written: run.written.load(Ordering::Relaxed),
        pages_discarded: run.discarded.load(Ordering::Relaxed),
        stats: pager.stats(),
    };
    let found = *run.found.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(Finding { thread, page, word, version, found }) = found {
        let (history, entry_now) = region.page_history(page * PAGE_SIZE);
        let mismatch = Mismatch {
            config: report,
            thread,
            page,
            word,
            expected_version: version,
            expected: pattern(page, version, word),
            found,
            looks_like: looks_like(run.page_words(page), page, version),
            history,
            entry_now,
        };
        tracing::error!(page, word, "stress: a page did not read back as it was left");
        return Ok(Err(Box::new(mismatch)));
    }
    Ok(Ok(report))
}

/// Runs the matrix; stops at the first wrong word.
pub fn run(opts: &StressOptions) -> Result<Result<Vec<ConfigReport>, Box<Mismatch>>, StressError> {
    if opts.app_threads == 0 || opts.app_threads > 256 {
        return Err(StressError::Options("--app-threads must be between 1 and 256".into()));
    }
    if opts.fractions.is_empty() || opts.fractions.iter().any(|&f| f < 2 || opts.size / f < 16 * PAGE_SIZE) {
        return Err(StressError::Options(
            "--fractions must each be at least 2 and leave at least 64 KiB of local memory".into(),
        ));
    }
    if opts.fault_threads.is_empty() {
        return Err(StressError::Options("--fault-threads needs at least one count".into()));
    }
    if opts.write_percent > 100 {
        return Err(StressError::Options("--writes is a percentage (0..=100)".into()));
    }
    if opts.discard_percent > 100 {
        return Err(StressError::Options("--discards is a percentage (0..=100)".into()));
    }
    let embedded = if opts.servers.is_empty() && opts.discover.is_none() {
        let capacity = (opts.size as u64 * 2).max(256 << 20);
        Some(lender::start(lender::ServerConfig { key: opts.key.clone(), ..lender::ServerConfig::embedded(capacity) })?)
    } else {
        None
    };
    let servers = embedded.as_ref().map_or_else(|| opts.servers.clone(), |s| vec![s.addr()]);
    let configs: Vec<(usize, usize)> =
        opts.fractions.iter().flat_map(|&f| opts.fault_threads.iter().map(move |&t| (f, t))).collect();
    let per = opts.duration / u32::try_from(configs.len()).unwrap_or(u32::MAX);
    let mut reports = Vec::new();
    for (fraction, threads) in configs {
        eprintln!(
            "stress: 1/{fraction} local, {threads} fault thread(s), {} evictor thread(s), {} app threads, {} hogs, {:.0} s",
            opts.evictor_threads,
            opts.app_threads,
            opts.hogs,
            per.as_secs_f64()
        );
        match run_config(opts, &servers, fraction, threads, per)? {
            Ok(r) => {
                eprintln!(
                    "  ok: {} page checks, {} page writes, {} pages discarded ({} installs skipped), {} remote faults ({} pages prefetched, {} of them a window ahead; {} windows handed ahead; {} faults set aside while their page was held), {} dirty evictions, {} write faults, {} hot pages moved nearer, {} migrated, {} hedged reads ({} won), local share grown by {} pages",
                    r.pages_checked,
                    r.pages_written,
                    r.pages_discarded,
                    r.stats.installs_skipped,
                    r.stats.remote_faults,
                    r.stats.prefetched_pages,
                    r.stats.prefetched_ahead,
                    r.stats.windows_handed_ahead,
                    r.stats.faults_postponed,
                    r.stats.evictions_dirty,
                    r.stats.write_faults,
                    r.stats.hot_pages_moved_nearer,
                    r.stats.pages_migrated,
                    r.stats.hedged_reads,
                    r.stats.hedge_wins,
                    r.stats.slo_local_grown_pages
                );
                reports.push(r);
            }
            Err(m) => return Ok(Err(m)),
        }
    }
    if let Some(s) = embedded {
        s.shutdown();
    }
    Ok(Ok(reports))
}
