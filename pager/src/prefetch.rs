//! Trend detection for prefetch: a majority vote over the last deltas between faulting pages of a
//! region (as Leap does). A stride that wins more than half of the recent deltas is a trend; the
//! pager then fetches a window of pages along it in the same batched request as the faulting page.
//!
//! Hits and waste: a prefetched page counts as a hit when it is written, or when a later fault of
//! the same trend lands beyond it (the stream went past it without faulting, so it was used); it
//! counts as wasted when it is evicted or discarded before either.
//!
//! Window size: a stream starts with the configured window; each time its next fault comes just
//! past the window fetched before (it used the whole window), the window doubles, up to the
//! largest allowed (`PagerConfig::prefetch_window_max`); any other fault takes it back to the
//! start. A confirmed stream then costs one fault per 511 pages instead of per 64, while a short
//! or broken one wastes no more than before.

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
    /// Windows in a row that the stream used to their end.
    streak: u32,
    /// The stride of the stream the fault being recorded continues (set by [`Self::confirm`]).
    continuing: Option<isize>,
}

impl TrendDetector {
    /// Records a fault at `page`; returns the stride of the current trend, if any. A fault that
    /// continues a stream (see [`Self::confirm`]) counts as one step of its stride, not as the
    /// distance from the fault before: a stream that skips whole windows without faulting keeps
    /// its trend.
    pub fn record(&mut self, page: usize) -> Option<isize> {
        if let Some(last) = self.last {
            let delta = self.continuing.take().unwrap_or_else(|| page.wrapping_sub(last).cast_signed());
            self.deltas[self.pos] = delta;
            self.pos = (self.pos + 1) % HISTORY;
            self.len = (self.len + 1).min(HISTORY);
        }
        self.last = Some(page);
        self.trend()
    }

    /// Notes whether a fault at `page` continues the stream: just past the last window, or inside
    /// it past its first page (the stream caught up with pages still on their way; before
    /// [`Self::record`] and before `last_window` is taken).
    pub fn confirm(&mut self, page: usize) {
        self.continuing = self.last_window.and_then(|(start, stride, count)| {
            let delta = page.wrapping_sub(start).cast_signed();
            let continues = stride != 0
                && delta % stride == 0
                && (1..=isize::try_from(count).unwrap_or(isize::MAX)).contains(&(delta / stride));
            continues.then_some(stride)
        });
        self.streak = if self.continuing.is_some() { self.streak.saturating_add(1) } else { 0 };
    }

    /// The window to fetch now: `base` doubled for every window the stream used to its end,
    /// at most `max`.
    pub fn window(&self, base: usize, max: usize) -> usize {
        base.checked_shl(self.streak.min(8)).unwrap_or(max).min(max).max(base.min(max)).max(1)
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

    #[test]
    fn the_window_doubles_while_the_stream_uses_it_and_starts_over_when_it_breaks() {
        let mut t = TrendDetector::default();
        assert_eq!(t.window(64, 256), 64);
        // Windows of 64 after faults at 0, 65, 130 (each just past the last window).
        t.last_window = Some((1, 1, 64));
        t.confirm(65);
        assert_eq!(t.window(64, 256), 128);
        t.last_window = Some((66, 1, 128));
        t.confirm(194);
        assert_eq!(t.window(64, 256), 256);
        t.last_window = Some((195, 1, 256));
        t.confirm(451);
        assert_eq!(t.window(64, 256), 256, "never past the maximum");
        // A fault elsewhere: back to the start.
        t.last_window = Some((452, 1, 256));
        t.confirm(10);
        assert_eq!(t.window(64, 256), 64);
        // Downward streams too.
        t.last_window = Some((99, -1, 50));
        t.confirm(49);
        assert_eq!(t.window(64, 256), 128);
        // A maximum below the base wins.
        assert_eq!(t.window(64, 16), 16);
    }

    #[test]
    fn a_stream_that_skips_whole_windows_keeps_its_trend_and_its_window() {
        // Each fault fetches a window and one more window ahead, so the stream's faults are
        // `2 * window + 1` pages apart, a distance that grows with the window: still one stream.
        let mut t = TrendDetector::default();
        let mut page = 1000;
        for p in [997, 998, 999] {
            t.confirm(p);
            t.record(p);
        }
        for _ in 0..20 {
            t.confirm(page);
            assert_eq!(t.record(page), Some(1), "the stream lost its trend at page {page}");
            let window = t.window(64, 256);
            t.last_window = Some((page + 1, 1, 2 * window));
            page += 2 * window + 1;
        }
        assert_eq!(t.window(64, 256), 256);
        // Caught up with pages still on their way (inside the window): the same stream.
        let (start, _, count) = t.last_window.unwrap_or_default();
        let inside = start + count / 2;
        t.confirm(inside);
        assert_eq!(t.record(inside), Some(1));
        assert_eq!(t.window(64, 256), 256);
        // The window's first page again is not progress: back to the start.
        t.last_window = Some((inside + 1, 1, 512));
        t.confirm(inside + 1);
        assert_eq!(t.window(64, 256), 64);
    }
}
