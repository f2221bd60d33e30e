//! Trend detection for prefetch: a majority vote over the last deltas between faulting pages of a
//! region (as Leap does). A stride that wins more than half of the recent deltas is a trend; the
//! pager then fetches a window of pages along it in the same batched request as the faulting page.
//!
//! Hits and waste: a prefetched page counts as a hit when it is written, or when a later fault of
//! the same trend lands beyond it (the stream went past it without faulting, so it was used); it
//! counts as wasted when it is evicted or discarded before either.

/// Deltas remembered per region.
const HISTORY: usize = 8;

/// Fault history of one region.
#[derive(Debug, Default)]
pub struct TrendDetector {
    last: Option<usize>,
    deltas: [isize; HISTORY],
    len: usize,
    pos: usize,
    /// The last window fetched: first page, stride, count.
    pub last_window: Option<(usize, isize, usize)>,
}

impl TrendDetector {
    /// Records a fault at `page`; returns the stride of the current trend, if any.
    pub fn record(&mut self, page: usize) -> Option<isize> {
        if let Some(last) = self.last {
            let delta = page.wrapping_sub(last).cast_signed();
            self.deltas[self.pos] = delta;
            self.pos = (self.pos + 1) % HISTORY;
            self.len = (self.len + 1).min(HISTORY);
        }
        self.last = Some(page);
        self.trend()
    }

    /// The majority delta over the history (Boyer-Moore vote, then verified), if it is a stride.
    pub fn trend(&self) -> Option<isize> {
        if self.len < 2 {
            return None;
        }
        let window = &self.deltas[..self.len];
        let mut candidate = 0isize;
        let mut count = 0usize;
        for &d in window {
            if count == 0 {
                candidate = d;
                count = 1;
            } else if d == candidate {
                count += 1;
            } else {
                count -= 1;
            }
        }
        let votes = window.iter().filter(|&&d| d == candidate).count();
        (votes * 2 > self.len && candidate != 0 && candidate.unsigned_abs() <= 1024).then_some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sequential_and_strided_trends_and_ignores_noise() {
        let mut t = TrendDetector::default();
        assert_eq!(t.record(10), None);
        assert_eq!(t.record(11), None, "one delta is not a trend");
        assert_eq!(t.record(12), Some(1));
        let mut s = TrendDetector::default();
        for p in [100, 96, 92, 88, 84] {
            s.record(p);
        }
        assert_eq!(s.trend(), Some(-4));
        // A stray fault does not break a majority.
        s.record(5000);
        assert_eq!(s.record(80), Some(-4), "four of six deltas agree: {:?}", s.deltas);
        let mut r = TrendDetector::default();
        let mut rng = 12345usize;
        let mut found = 0;
        for _ in 0..200 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if r.record((rng >> 33) % 100_000).is_some() {
                found += 1;
            }
        }
        assert!(found < 5, "random faults should not look like a trend ({found})");
    }
}
