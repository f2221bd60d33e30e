//! The service-level objective ([`PagerConfig::slo`]): a quantile of remote-fault service time
//! that should stay within a target, say `p99=500us`, and the controller that acts for it.
//!
//! Every remote fault's service time is counted against the target (the share that met it is
//! in the statistics) and kept in a window of one [`PERIOD`]. At the end of a period with at
//! least [`MIN_FAULTS`] faults, the controller compares the window's quantile with the target:
//! - **at risk** (above the target): the local share grows by an eighth of the budget, up to the
//!   local maximum ([`crate::LocalMax`]): fewer pages are remote, fewer faults go to the network.
//!   Logged, and counted in `slo_local_grown_pages`.
//! - **comfortable** (below half the target for [`CALM_PERIODS`] periods in a row): the local
//!   share shrinks back by the same step, never below the budget.
//!
//! A region may have an objective of its own ([`crate::RegionOptions::slo`]), judged the same
//! way over its own faults: while it is at risk (from a period over its target until one within
//! it) the region's pages stay local (evicted only when nothing else can go, as under a latency
//! bound), and the local share grows as for the pager's objective. The share grows when any
//! objective is at risk, and shrinks only when one has been comfortable long enough and none is
//! at risk ([`Steering`]).
//!
//! The actions that need no objective run all the time beneath it: hot pages move to nearer
//! lenders as they leave local memory, pages migrate toward nearer lenders, and reads of
//! replicated pages are hedged (sooner when a hedge after the 95th percentile would answer past
//! the target: `store/lenders/hedge.rs`). When the network cannot meet the objective at all, the local
//! share ends at the local maximum: the program then runs from local memory as far as it may,
//! best effort, as the coalescent model asks.
//!
//! [`PagerConfig::slo`]: crate::PagerConfig::slo

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::budget::Budget;

/// How often the controller looks at the window.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Faults a window needs before the controller acts on it.
pub const MIN_FAULTS: u64 = 20;

/// Comfortable periods in a row before the local share shrinks.
pub const CALM_PERIODS: u32 = 10;

/// A service-level objective: the `quantile` of remote-fault service time within `target`.
/// Parsed from `pQ=DURATION`, e.g. `p99=300us`, `p99.9=2ms`, `p50=100us`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Slo {
    /// The quantile, in (0, 1): 0.99 for `p99`.
    pub quantile: f64,
    /// The service time it should stay within.
    pub target: Duration,
}

impl std::str::FromStr for Slo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("{s:?} is not an objective like p99=300us ({why})");
        let (q, t) = s.trim().split_once('=').ok_or_else(|| bad("no '='"))?;
        let q: f64 = q
            .trim()
            .strip_prefix('p')
            .ok_or_else(|| bad("the quantile starts with p"))?
            .parse()
            .map_err(|_| bad("the quantile is not a number"))?;
        let t = t.trim();
        let (num, unit) =
            t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| bad("the time has no unit"))?);
        let num: f64 = num.trim().parse().map_err(|_| bad("the time is not a number"))?;
        let secs = match unit {
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            _ => return Err(bad("the unit is ns, us, ms or s")),
        };
        let target = Duration::try_from_secs_f64(num * secs).map_err(|_| bad("the time is out of range"))?;
        let slo = Self { quantile: q / 100.0, target };
        slo.validate().map_err(|why| bad(&why))?;
        Ok(slo)
    }
}

impl Slo {
    /// Checks an objective (parsing calls it too): the quantile inside (0, 1), the target
    /// between 1 us and 60 s.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.quantile > 0.0 && self.quantile < 1.0) {
            return Err(format!("the objective's quantile {} is not inside (0, 1): p99 is 0.99", self.quantile));
        }
        if self.target < Duration::from_micros(1) || self.target > Duration::from_secs(60) {
            return Err(format!("the objective's target {:?} is not between 1us and 60s", self.target));
        }
        Ok(())
    }
}

impl std::fmt::Display for Slo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}={}us", self.quantile * 100.0, self.target.as_micros())
    }
}

/// What the controller decided for one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Too few faults to judge, or nothing to do.
    Hold,
    /// Above the target: grow the local share.
    Grow,
    /// Comfortable long enough: shrink it.
    Shrink,
}

/// The decision for a window whose quantile is `observed` over `faults` faults, after `calm`
/// comfortable periods before it; returns the step and the new count of comfortable periods.
pub(crate) fn decide(slo: &Slo, observed: Duration, faults: u64, calm: u32) -> (Step, u32) {
    if faults < MIN_FAULTS {
        return (Step::Hold, calm);
    }
    if observed > slo.target {
        return (Step::Grow, 0);
    }
    if observed * 2 <= slo.target {
        let calm = calm + 1;
        return if calm >= CALM_PERIODS { (Step::Shrink, 0) } else { (Step::Hold, calm) };
    }
    (Step::Hold, 0)
}

/// One period's verdict on an objective.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verdict {
    slo: Slo,
    step: Step,
    /// The period's quantile.
    observed: Duration,
    faults: u64,
}

/// One objective's state, shared by the fault threads (which record) and the heartbeat thread
/// (which judges once a period).
#[derive(Debug)]
pub(crate) struct Controller {
    slo: Slo,
    /// The period's service times, when it began, and the comfortable periods in a row before it.
    window: Mutex<(Histogram<u64>, Instant, u32)>,
    met: AtomicU64,
    faults: AtomicU64,
    at_risk: AtomicBool,
}

impl Controller {
    pub(crate) fn new(slo: Slo) -> Self {
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 2)
            .or_else(|_| Histogram::new(2))
            .unwrap_or_else(|_| std::process::abort());
        Self {
            slo,
            window: Mutex::new((hist, Instant::now(), 0)),
            met: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            at_risk: AtomicBool::new(false),
        }
    }

    /// The objective.
    pub(crate) fn slo(&self) -> Slo {
        self.slo
    }

    /// Counts one remote fault's service time.
    pub(crate) fn record(&self, service: Duration) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        if service <= self.slo.target {
            self.met.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(service.as_nanos()).unwrap_or(u64::MAX).max(1);
        crate::lock(&self.window).0.saturating_record(ns);
    }

    /// Once a period has passed since the last verdict: judges the period's faults and starts a
    /// new one. The objective is at risk from a period over its target until a period within it
    /// (a period with too few faults to judge changes nothing).
    pub(crate) fn judge(&self) -> Option<Verdict> {
        let mut w = crate::lock(&self.window);
        if w.1.elapsed() < PERIOD {
            return None;
        }
        let observed = Duration::from_nanos(w.0.value_at_quantile(self.slo.quantile));
        let faults = w.0.len();
        w.0.reset();
        w.1 = Instant::now();
        let (step, calm) = decide(&self.slo, observed, faults, w.2);
        w.2 = calm;
        if faults >= MIN_FAULTS {
            self.at_risk.store(observed > self.slo.target, Ordering::Relaxed);
        }
        Some(Verdict { slo: self.slo, step, observed, faults })
    }

    /// True from a period over the target until a period within it.
    pub(crate) fn at_risk(&self) -> bool {
        self.at_risk.load(Ordering::Relaxed)
    }

    /// Faults counted, and those within the target.
    pub(crate) fn figures(&self) -> (u64, u64) {
        (self.faults.load(Ordering::Relaxed), self.met.load(Ordering::Relaxed))
    }
}

/// The local share, steered for every objective of a pager: its own and its regions'.
#[derive(Debug, Default)]
pub(crate) struct Steering {
    grown: AtomicU64,
}

impl Steering {
    /// Acts on one round of verdicts, each with the region it belongs to (`None`: the pager's
    /// own objective): when any calls for it, the local share grows by an eighth of the budget,
    /// up to the local maximum; otherwise, when one has been comfortable long enough and no
    /// objective is at risk (`any_at_risk`, over every objective, judged this round or not), it
    /// shrinks back by as much, never below the budget.
    pub(crate) fn apply(&self, verdicts: &[(Verdict, Option<u32>)], any_at_risk: bool, budget: &Budget) {
        let step_pages = (budget.base() / 8).max(1);
        let before = budget.limit();
        // Whose objective: the pager's, or region N's.
        let whose = |region: &Option<u32>| region.map_or_else(|| "pager".to_string(), |id| format!("region {id}"));
        if let Some((v, region)) = verdicts.iter().find(|(v, _)| v.step == Step::Grow) {
            let (objective, observed_us, faults) = (v.slo, v.observed.as_micros(), v.faults);
            let of = whose(region);
            let after = budget.set_limit(before.saturating_add(step_pages));
            if after > before {
                self.grown.fetch_add((after - before) as u64, Ordering::Relaxed);
            }
            if after > before && before == budget.base() {
                tracing::warn!(
                    %objective,
                    %of,
                    observed_us,
                    faults,
                    local_pages = after,
                    budget_pages = budget.base(),
                    "service-level objective at risk: growing the local share past the budget"
                );
            } else if after > before {
                tracing::info!(%objective, %of, observed_us, faults, local_pages = after, "objective still at risk: growing the local share");
            } else {
                tracing::debug!(%objective, %of, observed_us, "objective at risk and the local share is at its maximum");
            }
            return;
        }
        let Some((v, region)) = verdicts.iter().find(|(v, _)| v.step == Step::Shrink) else { return };
        if any_at_risk {
            return;
        }
        let after = budget.set_limit(before.saturating_sub(step_pages));
        if after < before {
            tracing::info!(objective = %v.slo, of = %whose(region), observed_us = v.observed.as_micros(), local_pages = after, "objective comfortably met: shrinking the local share");
        }
    }

    /// Pages the local share grew by in all.
    pub(crate) fn grown(&self) -> u64 {
        self.grown.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(coalesce_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_second_objective_at_risk_keeps_the_share_from_shrinking() {
        let budget = Budget::new(800, 25, 1000);
        let (mine, region) = (
            Controller::new("p99=1ms".parse().expect("an objective")),
            Controller::new("p99=1ms".parse().expect("an objective")),
        );
        let steering = Steering::default();
        let round = |mine_service: Duration, region_service: Option<Duration>| {
            let mut verdicts = Vec::new();
            for (c, service, id) in [(&mine, Some(mine_service), None), (&region, region_service, Some(1))] {
                let Some(service) = service else { continue };
                for _ in 0..50 {
                    c.record(service);
                }
                crate::lock(&c.window).1 -= PERIOD;
                verdicts.push((c.judge().expect("a period has passed"), id));
            }
            steering.apply(&verdicts, mine.at_risk() || region.at_risk(), &budget);
        };
        // The region's objective alone is missed: the share grows.
        round(Duration::from_micros(50), Some(Duration::from_millis(5)));
        assert_eq!(budget.limit(), 900);
        assert!(region.at_risk() && !mine.at_risk());
        // The region's faults stop (its pages stay local); the pager's objective is comfortable
        // for long, but the region's is still at risk: no shrinking.
        for _ in 0..3 * CALM_PERIODS {
            round(Duration::from_micros(50), None);
        }
        assert_eq!(budget.limit(), 900);
        // Once a period shows the region within its target, the share may shrink again.
        round(Duration::from_micros(50), Some(Duration::from_micros(100)));
        for _ in 0..CALM_PERIODS {
            round(Duration::from_micros(50), None);
        }
        assert_eq!(budget.limit(), 800);
    }

    #[test]
    fn hand_built_objectives_are_checked() {
        assert!(Slo { quantile: 0.99, target: Duration::from_millis(1) }.validate().is_ok());
        for bad in [
            Slo { quantile: 1.5, target: Duration::from_millis(1) },
            Slo { quantile: f64::NAN, target: Duration::from_millis(1) },
            Slo { quantile: 0.99, target: Duration::ZERO },
            Slo { quantile: 0.99, target: Duration::from_secs(3600) },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn objectives_parse_and_bad_ones_say_why() {
        let s: Slo = "p99=300us".parse().expect("an objective");
        assert!((s.quantile - 0.99).abs() < 1e-12 && s.target == Duration::from_micros(300));
        let s: Slo = "p99.9=2ms".parse().expect("an objective");
        assert!((s.quantile - 0.999).abs() < 1e-12 && s.target == Duration::from_millis(2));
        for bad in ["99=1ms", "p100=1ms", "p0=1ms", "p99", "p99=1", "p99=1h", "p99=0us", "p99=2m", "p99=-1ms"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad} was accepted");
        }
        assert!("p99=1parsec".parse::<Slo>().expect_err("not a unit").contains("the unit is"));
    }

    #[test]
    fn the_share_grows_when_at_risk_and_shrinks_only_after_calm_periods() {
        let slo: Slo = "p99=1ms".parse().expect("an objective");
        let ms = Duration::from_millis;
        assert_eq!(decide(&slo, ms(5), MIN_FAULTS - 1, 3), (Step::Hold, 3));
        assert_eq!(decide(&slo, ms(5), MIN_FAULTS, 3), (Step::Grow, 0));
        // Met but not comfortably: the calm count starts over.
        assert_eq!(decide(&slo, Duration::from_micros(800), 100, 5), (Step::Hold, 0));
        let mut calm = 0;
        for _ in 0..CALM_PERIODS - 1 {
            let (step, c) = decide(&slo, Duration::from_micros(100), 100, calm);
            assert_eq!(step, Step::Hold);
            calm = c;
        }
        assert_eq!(decide(&slo, Duration::from_micros(100), 100, calm), (Step::Shrink, 0));
    }

    #[test]
    fn the_controller_grows_the_limit_up_to_the_maximum_and_back_down_to_the_budget() {
        let budget = Budget::new(800, 25, 1000);
        let (c, steering) = (Controller::new("p99=1ms".parse().expect("an objective")), Steering::default());
        let period = |service: Duration| {
            for _ in 0..50 {
                c.record(service);
            }
            crate::lock(&c.window).1 -= PERIOD;
            let verdict = c.judge().expect("a period has passed");
            steering.apply(&[(verdict, None)], c.at_risk(), &budget);
        };
        for _ in 0..5 {
            period(Duration::from_millis(3));
        }
        assert!(c.at_risk());
        assert_eq!(budget.limit(), 1000, "grown by 100 pages a period, to the maximum");
        assert_eq!((c.figures(), steering.grown()), ((250, 0), 200));
        for _ in 0..3 * CALM_PERIODS {
            period(Duration::from_micros(50));
        }
        assert!(!c.at_risk());
        assert_eq!(budget.limit(), 800, "back to the budget, no lower");
    }
}
