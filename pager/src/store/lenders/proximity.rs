//! Proximity: how near each lender is, measured, and what that makes of placement.
//!
//! Every control round trip to a lender (three when it is connected, then its heartbeat, at least
//! once a second) is a sample of its distance; the last [`WINDOW`] samples give a minimum and a
//! median. A lender's **weight** is `(reference / rtt)²`, where `rtt` is its smallest recent round
//! trip and `reference` the nearest live lender's, both raised to [`NEAR_ENOUGH`]: lenders nearer
//! than that count as equally near (weight 1), and one ten times farther than the nearest weighs
//! 1/100. The minimum, not the median: load on either machine only ever adds to a round trip, so
//! the minimum is the distance and the rest is noise (on a loaded 2-core machine the median of
//! loopback round trips wanders from 0.1 to over 1 ms; the minimum stays near 0.1-0.3 ms). A
//! lender that moves away is seen once its window has only new samples ([`WINDOW`] heartbeats:
//! 8 s with the default 30 s lease, whose heartbeat comes every second); one that comes nearer
//! at its next heartbeat.
//!
//! What the weights decide:
//! - **Shares**: a new slot goes to the usable lender whose `pages / weight` is smallest, so the
//!   remote pages each lender holds follow the weights: nearly all go to the nearest lenders while
//!   they have room, and when they fill, the rest go to the next nearest in proportion. Equally
//!   near lenders share evenly (ties are broken by a rotation), as round-robin did.
//! - **Groups**: the copies or shards of a new group go to the nearest lenders with room after its
//!   leader.
//! - **Reads**: a page with several copies is read from the nearest live one.
//! - **Hot pages**: a page faulted back from a lender (it is in use again) that the evictor
//!   takes out once more is written to the nearest lender that can take it, instead of going back
//!   to its old slot, when that lender weighs at least [`MIN_GAIN`] times as much as the nearest
//!   copy (its round trip is at most half); a clean page then costs one write it would otherwise
//!   not need. Pages evicted for the first time (cold) take their slot by share, so the farther
//!   lenders hold the cold ones. Erasure-coded pages stay where they are (each read needs K
//!   lenders whatever their order).
//!
//! The square makes distance dominate (a 5G hop ten times farther than a LAN lender gets 1% of
//! the pages) while keeping far lenders usable when near ones are full. [`NEAR_ENOUGH`] is 500 us:
//! below that, the control path's own noise on a loaded 2-core machine (100-400 us on loopback)
//! would split equally near lenders unevenly.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::lock;
use super::migrate::MIN_GAIN;

/// Round-trip samples kept per lender.
pub(super) const WINDOW: usize = 8;

/// Round trips below this count as equally near.
pub const NEAR_ENOUGH: Duration = Duration::from_micros(500);

/// The last [`WINDOW`] round trips to one lender.
#[derive(Debug, Default, Clone)]
pub(super) struct RttWindow {
    samples: VecDeque<Duration>,
}

impl RttWindow {
    /// Records one round trip.
    pub(super) fn record(&mut self, rtt: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt);
    }

    /// The smallest round trip in the window.
    pub(super) fn min(&self) -> Option<Duration> {
        self.samples.iter().min().copied()
    }

    /// The median round trip in the window (the lower middle one of an even count).
    pub(super) fn median(&self) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }
}

/// The weight of a lender whose smallest recent round trip is `rtt`, when the nearest live lender's is
/// `nearest`: 1 for the nearest (and anything within [`NEAR_ENOUGH`]), `(nearest / rtt)²` beyond.
/// A lender not measured yet weighs 1 (it is tried, and measured, like a near one).
pub fn weight(rtt: Option<Duration>, nearest: Option<Duration>) -> f64 {
    let Some(rtt) = rtt else { return 1.0 };
    let reference = nearest.unwrap_or(rtt).max(NEAR_ENOUGH).as_secs_f64();
    let rtt = rtt.max(NEAR_ENOUGH).as_secs_f64();
    (reference / rtt).min(1.0).powi(2)
}

/// Where a hot page should go: the heaviest of `candidates` (index, weight, can take a slot),
/// when it weighs at least [`MIN_GAIN`] times as much as the heaviest of the page's live copies
/// (`here`); `None`: it stays.
pub(super) fn hot_home(
    here: impl Iterator<Item = f64>,
    candidates: impl Iterator<Item = (usize, f64, bool)>,
) -> Option<usize> {
    let here = here.fold(0.0, f64::max);
    if here <= 0.0 {
        return None; // no live copy: the page is written anew anyway
    }
    let (best, w) = candidates.filter(|c| c.2).map(|(i, w, _)| (i, w)).max_by(|a, b| a.1.total_cmp(&b.1))?;
    (w >= MIN_GAIN * here).then_some(best)
}

/// A candidate for the next slot: how many pages it holds, its weight, and whether it can take
/// a slot now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    pub(super) pages: u64,
    pub(super) weight: f64,
    pub(super) usable: bool,
}

/// The candidate that should take the next page: the usable one with the smallest
/// `(pages + 1) / weight`; among equals, the first at or after `start` (a rotation, so that
/// equally near lenders share evenly). `skip(i)` excludes candidates tried already.
pub(super) fn next_lender(
    candidates: impl Iterator<Item = (usize, Candidate)>,
    n: usize,
    start: usize,
    skip: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64, usize)> = None;
    for (i, c) in candidates {
        if !c.usable || skip(i) || c.weight <= 0.0 {
            continue;
        }
        // Precision loss past 2^52 pages is irrelevant.
        #[allow(clippy::cast_precision_loss)]
        let load = (c.pages as f64 + 1.0) / c.weight;
        let turn = (i + n - start % n.max(1)) % n.max(1);
        let better = match best {
            None => true,
            Some((_, best_load, best_turn)) => load < best_load || (load == best_load && turn < best_turn),
        };
        if better {
            best = Some((i, load, turn));
        }
    }
    best.map(|(i, _, _)| i)
}

impl super::LenderStore {
    /// Recomputes every lender's placement weight from its smallest recent round trip and the
    /// nearest live lender's (`proximity.rs`).
    pub(super) fn update_weights(&self) {
        let rtts: Vec<Option<Duration>> = self.lenders.iter().map(|(_, s)| lock(&s.rtt).min()).collect();
        let nearest = self
            .lenders
            .iter()
            .zip(&rtts)
            .filter(|((_, s), _)| s.is_alive() && !s.leaving.load(Ordering::Acquire))
            .filter_map(|(_, m)| *m)
            .min();
        for ((_, s), m) in self.lenders.iter().zip(&rtts) {
            s.weight.store(weight(*m, nearest).to_bits(), Ordering::Relaxed);
        }
    }

    /// The lender a hot page at `places` should move to (see [`hot_home`]), among those that can
    /// take a new slot and are `usable` from the calling thread.
    pub(super) fn hot_home(&self, places: &super::Places, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.code.is_some() || self.lenders.len() < 2 {
            return None;
        }
        let here = places.copies().iter().filter(|loc| self.copy_valid(loc)).map(|loc| self.weight_of(loc.lender));
        let candidates = self.lenders.iter().map(|(i, s)| {
            let open =
                s.is_alive() && !s.full.load(Ordering::Acquire) && !s.leaving.load(Ordering::Acquire) && usable(i);
            (i, self.weight_of(i), open)
        });
        hot_home(here, candidates)
    }

    /// Lender `i`'s placement weight (1 for the nearest).
    pub(super) fn weight_of(&self, i: usize) -> f64 {
        self.lenders.get(i).map_or(0.0, |s| f64::from_bits(s.weight.load(Ordering::Relaxed)))
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn the_window_keeps_the_last_samples_and_gives_min_and_median() {
        let mut w = RttWindow::default();
        assert_eq!((w.min(), w.median()), (None, None));
        for t in [300, 100, 200] {
            w.record(us(t));
        }
        assert_eq!((w.min(), w.median()), (Some(us(100)), Some(us(200))));
        for _ in 0..WINDOW {
            w.record(us(5000));
        }
        assert_eq!((w.min(), w.median()), (Some(us(5000)), Some(us(5000))));
    }

    #[test]
    fn weights_fall_with_the_square_of_distance_and_near_lenders_are_equal() {
        let lan = Some(us(240));
        assert!((weight(lan, lan) - 1.0).abs() < 1e-9);
        // Within NEAR_ENOUGH of each other: equal.
        assert!((weight(Some(us(450)), lan) - 1.0).abs() < 1e-9);
        // 5G URLLC at 2.2 ms against a LAN lender: (0.5 / 2.2)^2.
        let g5 = weight(Some(us(2200)), lan);
        assert!((g5 - (0.5f64 / 2.2).powi(2)).abs() < 1e-9, "{g5}");
        // Wi-Fi at 40 ms: 1/6400.
        assert!((weight(Some(us(40_000)), lan) - 1.0 / 6400.0).abs() < 1e-9);
        // Relative to the nearest: when every lender is far, the nearest still weighs 1.
        assert!((weight(Some(us(40_000)), Some(us(40_000))) - 1.0).abs() < 1e-9);
        assert!((weight(Some(us(80_000)), Some(us(40_000))) - 0.25).abs() < 1e-9);
        // Not measured yet: like a near one.
        assert!((weight(None, lan) - 1.0).abs() < 1e-9);
    }

    /// Hands out `pages` slots one by one, each lender taking at most `room[i]`.
    fn place(weights: &[f64], room: &[u64], pages: u64) -> Vec<u64> {
        let n = weights.len();
        let mut held = vec![0u64; n];
        for p in 0..usize::try_from(pages).expect("a test size") {
            let candidates =
                (0..n).map(|i| (i, Candidate { pages: held[i], weight: weights[i], usable: held[i] < room[i] }));
            let i = next_lender(candidates, n, p, |_| false).expect("room somewhere");
            held[i] += 1;
        }
        held
    }

    #[test]
    fn shares_follow_the_weights_and_the_nearest_takes_most_while_it_has_room() {
        let lan = Some(us(240));
        let weights: Vec<f64> = [us(240), us(2200), us(40_000)].iter().map(|&t| weight(Some(t), lan)).collect();
        let held = place(&weights, &[u64::MAX; 3], 10_000);
        // Shares proportional to 1 : 0.0517 : 0.00016.
        assert!(held[0] > 9400 && held[1] > 400 && held[1] < 560 && held[2] <= 3, "{held:?}");
        // The LAN lender full at 4,000: the rest go mostly to 5G, in proportion to the weights.
        let held = place(&weights, &[4000, u64::MAX, u64::MAX], 10_000);
        assert_eq!(held[0], 4000);
        assert!(held[1] > 5900 && held[2] < 100 && held[2] >= 1, "{held:?}");
    }

    #[test]
    fn a_hot_page_moves_only_to_a_lender_at_least_four_times_heavier() {
        let open = |w: &[f64]| w.iter().enumerate().map(|(i, &w)| (i, w, true)).collect::<Vec<_>>();
        // On the 5G lender (0.05) with the LAN lender (1.0) open: to the LAN lender.
        assert_eq!(hot_home([0.05].into_iter(), open(&[1.0, 0.05]).into_iter()), Some(0));
        // Already on the nearest, or on one nearly as near: stays.
        assert_eq!(hot_home([1.0].into_iter(), open(&[1.0, 0.05]).into_iter()), None);
        assert_eq!(hot_home([0.3].into_iter(), open(&[1.0, 0.3]).into_iter()), None);
        // Exactly MIN_GAIN heavier: moves.
        assert_eq!(hot_home([0.25].into_iter(), open(&[1.0, 0.25]).into_iter()), Some(0));
        // Two copies: the nearer copy counts.
        assert_eq!(hot_home([0.01, 0.5].into_iter(), open(&[1.0, 0.5, 0.01]).into_iter()), None);
        // The nearest cannot take a slot: the next heaviest that can, if heavy enough.
        let c = [(0, 1.0, false), (1, 0.5, true), (2, 0.01, true)];
        assert_eq!(hot_home([0.01].into_iter(), c.into_iter()), Some(1));
        assert_eq!(hot_home([0.2].into_iter(), c.into_iter()), None);
        // No live copy: not a move (the page is written anew anyway).
        assert_eq!(hot_home(std::iter::empty(), open(&[1.0]).into_iter()), None);
    }

    #[test]
    fn equally_near_lenders_share_evenly_and_skipped_or_unusable_ones_are_passed_over() {
        let held = place(&[1.0; 4], &[u64::MAX; 4], 1000);
        assert_eq!(held, vec![250; 4]);
        let candidates = [
            (0, Candidate { pages: 0, weight: 1.0, usable: false }),
            (1, Candidate { pages: 5, weight: 1.0, usable: true }),
            (2, Candidate { pages: 9, weight: 1.0, usable: true }),
        ];
        assert_eq!(next_lender(candidates.into_iter(), 3, 0, |_| false), Some(1));
        assert_eq!(next_lender(candidates.into_iter(), 3, 0, |i| i == 1), Some(2));
        assert_eq!(next_lender(candidates.into_iter(), 3, 0, |i| i > 0), None);
    }
}
