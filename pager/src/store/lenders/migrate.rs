//! Migration toward the best placement (the lenders moved, or a nearer one appeared): when no
//! group needs repair, the repair thread moves one slab at a time from the lender whose pages
//! are furthest above its weighted share to a much nearer lender with room, through the same
//! copy as a repair (rate-limited by `--repair-rate`, in the stats as pages migrated).
//!
//! Policy: a lender's load is its pages over its weight (`proximity.rs`). A slab moves from the
//! most loaded lender `s` to the heaviest lender `t` that holds no slab of its group and has room
//! when `t` weighs at least [`MIN_GAIN`] times as much as `s` (its round trip is at least half as
//! long, beyond `NEAR_ENOUGH`) and `t`'s load, with the slab, stays under half of `s`'s: equally
//! near lenders never trade slabs, and a move is never undone by the next one.
//!
//! Safety is the repair's: while a slab moves, its group is marked (`migrating`) and counts as
//! not whole, so no page is written to it; the copy starts once the writes placed before the
//! mark have landed (`quiesce.rs`); the new slab replaces the old one only if both are still
//! there, and the old one is then freed.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::LenderStore;

/// How many times heavier the target must be than the slab's lender.
pub(super) const MIN_GAIN: f64 = 4.0;

/// No slab is moving.
const NONE: u64 = 0;

impl LenderStore {
    /// The group and slab index being migrated, if any.
    pub(super) fn migrating(&self) -> Option<(usize, usize)> {
        let v = self.migrating.load(Ordering::SeqCst);
        (v != NONE).then(|| (usize::try_from((v >> 8) - 1).unwrap_or(usize::MAX), (v & 0xff) as usize))
    }

    /// True when slab `at` of group `group` is the one moving.
    pub(super) fn is_migrating(&self, group: usize) -> bool {
        self.migrating().is_some_and(|(g, _)| g == group)
    }

    /// Ends the migration in progress (done or dropped).
    pub(super) fn end_migration(&self) {
        self.migrating.store(NONE, Ordering::SeqCst);
    }

    /// Picks the next slab to move, if the placement is far enough from the weights, and marks
    /// its group (`SeqCst`, before the repair snapshots the writes in flight). Returns the
    /// target lender's minimum weight for the move.
    pub(super) fn start_migration(&self) -> Option<f64> {
        if self.migrating().is_some() {
            return None;
        }
        let usable = |s: &super::Lender| s.is_alive() && !s.leaving.load(Ordering::Acquire);
        let load = |s: &super::Lender| {
            // Precision loss past 2^52 pages is irrelevant.
            #[allow(clippy::cast_precision_loss)]
            let pages = s.pages.load(Ordering::Relaxed) as f64;
            pages / f64::from_bits(s.weight.load(Ordering::Relaxed)).max(f64::MIN_POSITIVE)
        };
        let weight = |i: usize| self.weight_of(i);
        let (from, from_load) = self
            .lenders
            .iter()
            .filter(|(_, s)| usable(s) && s.pages.load(Ordering::Relaxed) > 0)
            .map(|(i, s)| (i, load(s)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let count = self.groups.read().unwrap_or_else(PoisonError::into_inner).len();
        for gi in 0..count {
            // One group at a time, copied out: `records_used` takes slot locks, which are taken
            // before the groups' lock elsewhere.
            let Some(g) = self.groups.read().unwrap_or_else(PoisonError::into_inner).get(gi).copied() else { break };
            let g = &g;
            let Some(at) = g.slabs().iter().position(|s| s.server == from) else { continue };
            let used = self.records_used(gi, g);
            if used == 0 {
                continue;
            }
            // A much nearer lender with room, outside the group, whose load stays well below.
            let better = self.lenders.iter().any(|(t, s)| {
                #[allow(clippy::cast_precision_loss)]
                let after = (s.pages.load(Ordering::Relaxed) + used) as f64 / weight(t).max(f64::MIN_POSITIVE);
                usable(s)
                    && !s.full.load(Ordering::Acquire)
                    && !g.slabs().iter().any(|x| x.server == t)
                    && weight(t) >= MIN_GAIN * weight(from)
                    && after < from_load / 2.0
            });
            if !better {
                continue;
            }
            let mark = ((u64::try_from(gi).unwrap_or(u64::MAX - 1) + 1) << 8) | u64::try_from(at).unwrap_or(0);
            if self.migrating.compare_exchange(NONE, mark, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                return None;
            }
            tracing::debug!(group = gi, from = %self.lenders[from].addr, pages = used, "migrating a slab toward a nearer lender");
            return Some(MIN_GAIN * weight(from));
        }
        None
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::super::proximity;
    use super::*;

    #[test]
    fn the_gain_threshold_means_half_the_round_trip() {
        // A lender at twice the round trip of another (both beyond NEAR_ENOUGH) weighs a quarter.
        let near = Some(std::time::Duration::from_millis(2));
        let w = proximity::weight(Some(std::time::Duration::from_millis(4)), near);
        assert!((MIN_GAIN * w - 1.0).abs() < 1e-9);
    }
}
