//! The atomics, locks and spinning of the page table and the budget, from `std` normally and from
//! `loom` when built with `RUSTFLAGS="--cfg coalesce_loom"`, so that the loom models
//! (`loom_models.rs`) explore every interleaving of the real code.

#[cfg(not(coalesce_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(coalesce_loom))]
pub(crate) use std::sync::{Condvar, Mutex};

#[cfg(coalesce_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(coalesce_loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

/// Spin briefly, then yield, then sleep: waits for another thread's short transition.
#[cfg(not(coalesce_loom))]
pub(crate) fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// Under loom, every spin yields to the model's scheduler.
#[cfg(coalesce_loom)]
pub(crate) fn backoff(spins: &mut u32) {
    *spins += 1;
    loom::thread::yield_now();
}
