//! The measured workload shared by `coalesce demo` and `coalesce bench`: fill a region of 64-bit
//! words with a checkable pattern, read it back in sequential passes, then do random 8-byte reads,
//! verifying every word read and timing every random read.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Reads slower than this count as faulted (served from outside local memory).
pub const FAULT_THRESHOLD: Duration = Duration::from_micros(2);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadOptions {
    /// Sequential read passes after the fill.
    pub passes: usize,
    /// Random 8-byte reads after the passes.
    pub random_reads: usize,
    /// Show progress on stderr.
    pub progress: bool,
}

/// Timings of one run.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// Writing the pattern.
    pub fill: Duration,
    /// Each sequential pass.
    pub passes: Vec<Duration>,
    /// The random phase.
    pub random: Duration,
    /// Random reads done.
    pub random_reads: usize,
    /// Latency of every random read, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Latency of random reads slower than [`FAULT_THRESHOLD`].
    pub faulted: Histogram<u64>,
}

/// A word read back differs from what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("verification failed at byte offset {offset}: expected {expected:#x}, read {found:#x}")]
pub struct Corrupt {
    /// Offset in the region.
    pub offset: usize,
    /// Expected word.
    pub expected: u64,
    /// Word read.
    pub found: u64,
}

/// The pattern word at `index`.
pub fn expected(index: usize) -> u64 {
    (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0A1_E5CE
}

struct Progress {
    label: &'static str,
    on: bool,
    tty: bool,
    last: Instant,
}

impl Progress {
    fn new(label: &'static str, on: bool) -> Self {
        Self { label, on, tty: std::io::stderr().is_terminal(), last: Instant::now() }
    }
    fn tick(&mut self, done: usize, total: usize) {
        let every = if self.tty { Duration::from_millis(250) } else { Duration::from_secs(3) };
        if !self.on || self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let pct = done * 100 / total.max(1);
        if self.tty {
            eprint!("\r  {:<12} {pct:>3}%", self.label);
        } else {
            eprintln!("  {:<12} {pct:>3}%", self.label);
        }
        let _ = std::io::stderr().flush();
    }
    fn done(self) {
        if self.on && self.tty {
            eprint!("\r{:40}\r", "");
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| std::process::abort())
}

const CHUNK: usize = 4096 / 8 * 256;

/// Runs the workload over `words`.
pub fn run(words: &mut [u64], opts: &WorkloadOptions) -> Result<WorkloadResult, Corrupt> {
    let n = words.len();
    let t = Instant::now();
    let mut progress = Progress::new("fill", opts.progress);
    for (i, chunk) in words.chunks_mut(CHUNK).enumerate() {
        let base = i * CHUNK;
        for (j, w) in chunk.iter_mut().enumerate() {
            *w = expected(base + j);
        }
        progress.tick(base, n);
    }
    progress.done();
    let fill = t.elapsed();

    let mut passes = Vec::new();
    for _ in 0..opts.passes {
        let t = Instant::now();
        let mut progress = Progress::new("sequential", opts.progress);
        for (i, chunk) in words.chunks(CHUNK).enumerate() {
            let base = i * CHUNK;
            for (j, &w) in chunk.iter().enumerate() {
                if w != expected(base + j) {
                    return Err(Corrupt { offset: (base + j) * 8, expected: expected(base + j), found: w });
                }
            }
            progress.tick(base, n);
        }
        progress.done();
        passes.push(t.elapsed());
    }

    let mut latency = histogram();
    let mut faulted = histogram();
    let mut rng = fastrand::Rng::with_seed(1);
    let t = Instant::now();
    let mut progress = Progress::new("random", opts.progress);
    for k in 0..opts.random_reads {
        let i = rng.usize(..n);
        let start = Instant::now();
        // SAFETY: `i < n` indexes the slice; the volatile read keeps the access (and any fault it
        // takes) inside the timed window.
        let w = unsafe { std::ptr::read_volatile(&raw const words[i]) };
        let took = start.elapsed();
        if w != expected(i) {
            return Err(Corrupt { offset: i * 8, expected: expected(i), found: w });
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        latency.saturating_record(ns);
        if took > FAULT_THRESHOLD {
            faulted.saturating_record(ns);
        }
        if k.is_multiple_of(4096) {
            progress.tick(k, opts.random_reads);
        }
    }
    progress.done();
    Ok(WorkloadResult { fill, passes, random: t.elapsed(), random_reads: opts.random_reads, latency, faulted })
}
