//! Polling a completion queue without allocating: `ibv_poll_cq` into an array on the caller's
//! stack. A busy wait polls an empty queue thousands of times per request, and sideway's poller
//! allocates a vector of work completions on every call, empty or not.

use std::mem::MaybeUninit;

use rdma_mummy_sys::ibv_wc;
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionQueue};

/// Work completions taken per call.
pub(super) const BATCH: usize = 16;

/// What this provider reads of one work completion.
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkCompletion {
    pub(super) wr_id: u64,
    pub(super) status: u32,
}

/// Takes up to `max` (at most `BATCH`) completions from `cq` into `out`; returns how many (0 when
/// the queue is empty or the provider reports an error, which a queue pair in the error state
/// shows through its flushed completions instead).
pub(super) fn poll(cq: &BasicCompletionQueue, out: &mut [WorkCompletion; BATCH], max: usize) -> usize {
    let max = max.min(BATCH);
    let mut wcs: [MaybeUninit<ibv_wc>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    // SAFETY: `cq` is a live completion queue (borrowed for the call); the provider writes at
    // most `max` (no more than `BATCH`) entries into `wcs`, which has room for `BATCH`.
    let n = unsafe { rdma_mummy_sys::ibv_poll_cq(cq.cq().as_ptr(), max as i32, wcs.as_mut_ptr().cast()) };
    let n = usize::try_from(n).unwrap_or(0).min(max);
    for (wc, slot) in wcs.iter().take(n).zip(out.iter_mut()) {
        // SAFETY: the provider initialised the first `n` entries.
        let wc = unsafe { wc.assume_init_ref() };
        *slot = WorkCompletion { wr_id: wc.wr_id, status: wc.status };
    }
    n
}
