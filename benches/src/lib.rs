//! Helpers for the Coalesce criterion benchmarks: an embedded loopback memory-server, and tail
//! latency recording (criterion reports central figures only; every timed operation is also
//! recorded here and p50/p99/p99.9 are printed and appended to `target/coalesce-tails.csv`).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Per-benchmark latency histograms.
#[derive(Debug, Default)]
pub struct Tails {
    hists: Mutex<BTreeMap<String, Histogram<u64>>>,
}

impl Tails {
    /// Records one timed operation of benchmark `name`.
    pub fn record(&self, name: &str, d: Duration) {
        let mut h = self.hists.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let hist = h.entry(name.to_string()).or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| std::process::abort())
        });
        hist.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }

    /// Prints every benchmark's tails and appends them to `target/coalesce-tails.csv`.
    pub fn report(&self) {
        let h = self.hists.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "../target".into());
        let mut csv =
            std::fs::OpenOptions::new().create(true).append(true).open(format!("{dir}/coalesce-tails.csv")).ok();
        for (name, hist) in h.iter() {
            let us = |q: f64| Duration::from_nanos(hist.value_at_quantile(q)).as_secs_f64() * 1e6;
            println!(
                "tails {name:<40} n={:<8} p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us",
                hist.len(),
                us(0.5),
                us(0.99),
                us(0.999)
            );
            if let Some(f) = csv.as_mut() {
                let _ = writeln!(f, "{name},{},{:.3},{:.3},{:.3}", hist.len(), us(0.5), us(0.99), us(0.999));
            }
        }
    }
}

/// Starts a memory-server in this process on 127.0.0.1 with `capacity` bytes.
pub fn server(capacity: u64) -> lender::ServerHandle {
    let config = lender::ServerConfig::embedded(capacity);
    lender::start(config).unwrap_or_else(|e| panic!("cannot start the embedded memory-server: {e}"))
}
