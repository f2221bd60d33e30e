//! Page faults through the pager: a first-touch zero fault (served from a local zero page: the
//! pager's own floor, no network) and a remote fault (page evicted to the server, then touched).
//! The remote fault's target is floor + one 4 KiB shim READ round trip (see the transport bench).

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use coalesce_benches::{server, Tails};
use coalesce_pager::{Pager, PagerConfig, RegionOptions, PAGE_SIZE};
use criterion::{criterion_group, criterion_main, Criterion};

fn fault(c: &mut Criterion) {
    let tails = Tails::default();
    let server = server(1 << 30);
    let pager = Pager::new(PagerConfig::new(vec![server.addr()], 64 << 20)).unwrap();
    let options = RegionOptions { prefetch: Some(false), ..RegionOptions::default() };
    let mut region = pager.map(64 << 20, options).unwrap();
    let pages = region.len() / PAGE_SIZE;
    let mut g = c.benchmark_group("fault");
    g.bench_function("zero_first_touch", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let page = usize::try_from(i).unwrap() % pages;
                region.discard(page * PAGE_SIZE, PAGE_SIZE).unwrap(); // untimed: make it never-written
                let p = region.as_ptr().wrapping_add(page * PAGE_SIZE);
                let t = Instant::now();
                // SAFETY: a byte inside the live region.
                unsafe { std::ptr::read_volatile(p) };
                let d = t.elapsed();
                tails.record("fault/zero_first_touch", d);
                total += d;
            }
            total
        });
    });
    // Give every page content so that evicted pages really live on the server.
    for chunk in region.as_mut_slice().chunks_mut(PAGE_SIZE) {
        chunk[0] = 1;
    }
    g.bench_function("remote_evicted_then_touched", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let page = usize::try_from(i).unwrap() % pages;
                assert_eq!(region.evict(page * PAGE_SIZE, PAGE_SIZE), 1, "untimed: page it out");
                let p = region.as_ptr().wrapping_add(page * PAGE_SIZE);
                let t = Instant::now();
                // SAFETY: a byte inside the live region.
                let v = unsafe { std::ptr::read_volatile(p) };
                let d = t.elapsed();
                assert_eq!(v, 1);
                tails.record("fault/remote_evicted_then_touched", d);
                total += d;
            }
            total
        });
    });
    g.finish();
    tails.report();
    println!("{}", pager.stats());
}

criterion_group!(benches, fault);
criterion_main!(benches);
