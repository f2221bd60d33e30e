//! Scans over a 64 MiB region with 1/2 and 1/4 of it in local memory: one sequential pass, and
//! 10,000 random 8-byte reads, per iteration.

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use coalesce_benches::{server, Tails};
use coalesce_pager::{Pager, PagerConfig, RegionOptions};
use criterion::{criterion_group, criterion_main, Criterion};

const SIZE: usize = 64 << 20;

fn scan(c: &mut Criterion) {
    let tails = Tails::default();
    let server = server(1 << 30);
    let mut g = c.benchmark_group("scan");
    g.sample_size(10);
    for (fraction, budget) in [("half", SIZE / 2), ("quarter", SIZE / 4)] {
        let pager = Pager::new(PagerConfig::new(vec![server.addr()], budget)).unwrap();
        let mut region = pager.map(SIZE, RegionOptions::default()).unwrap();
        for (i, w) in region.as_mut_slice().chunks_mut(8).enumerate() {
            w.copy_from_slice(&(i as u64).to_le_bytes());
        }
        let words: &[u64] = {
            let s = region.as_slice();
            // SAFETY: the region is page aligned and its length a multiple of 8.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u64>(), s.len() / 8) }
        };
        g.bench_function(format!("sequential_{fraction}_local"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let sum: u64 = words.iter().sum();
                    let d = t.elapsed();
                    assert_eq!(sum, (words.len() as u64) * (words.len() as u64 - 1) / 2);
                    tails.record(&format!("scan/sequential_{fraction}_local"), d);
                    total += d;
                }
                total
            });
        });
        let mut rng = fastrand::Rng::with_seed(5);
        g.bench_function(format!("random_10k_reads_{fraction}_local"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    for _ in 0..10_000 {
                        let i = rng.usize(..words.len());
                        // SAFETY: `i` is in bounds; volatile keeps the read.
                        assert_eq!(unsafe { std::ptr::read_volatile(&raw const words[i]) }, i as u64);
                    }
                    let d = t.elapsed();
                    tails.record(&format!("scan/random_10k_reads_{fraction}_local"), d);
                    total += d;
                }
                total
            });
        });
        drop(region);
        drop(pager);
    }
    g.finish();
    tails.report();
}

criterion_group!(benches, scan);
criterion_main!(benches);
