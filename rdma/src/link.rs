//! Link emulation and latency telemetry for the software NIC.
//!
//! A [`LinkProfile`] describes a link by its one-way delay, jitter, bandwidth cap and occasional
//! stalls (a heavy tail); named profiles reproduce proximity on one machine. [`LinkModel`] schedules when each completion may be delivered
//! (request serialisation + delay + jitter, then the same for the response), keeping completions in
//! order as an RC queue pair does. [`RttStats`] is the per-link telemetry callers read for placement.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Link characteristics: applied by the shim on the client side (`--link` of `coalesce`), or by a
/// lender on everything it sends ([`SharedLink`], `memory-server --link`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkProfile {
    /// Profile name (`custom` for one given by parameters).
    pub name: String,
    /// Added one-way delay, applied to the request and again to the response.
    pub one_way_delay: Duration,
    /// Uniform random extra delay in `[0, jitter]`, drawn per direction.
    pub jitter: Duration,
    /// Bandwidth cap in bits per second per direction (`None`: no cap).
    pub bandwidth_bps: Option<u64>,
    /// Occasional stalls, the heavy tail of a real link (Wi-Fi's retries, contention, power-save
    /// buffering and off-channel scans): each message, in each direction, is held up with this
    /// probability in parts per million ...
    pub stall_ppm: u32,
    /// ... by an extra delay drawn from an exponential distribution of this mean. Messages behind
    /// a held one wait for it (delivery stays in order).
    pub stall_mean: Duration,
}

impl Default for LinkProfile {
    fn default() -> Self {
        Self::loopback()
    }
}

impl LinkProfile {
    /// No emulation at all: the real loopback link.
    pub fn loopback() -> Self {
        Self {
            name: "loopback".into(),
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bps: None,
            stall_ppm: 0,
            stall_mean: Duration::ZERO,
        }
    }

    /// Names of the built-in profiles, with a one-line description each.
    pub const BUILT_IN: [(&'static str, &'static str); 4] = [
        ("loopback", "no added delay"),
        ("lan", "100 us one-way, 20 us jitter, 10 Gbit/s (a rack or campus LAN)"),
        ("5g-urllc", "1 ms one-way, 100 us jitter, 100 Mbit/s (5G ultra-reliable low latency)"),
        ("wifi", "20 ms one-way, 5 ms jitter, 50 Mbit/s, 1% of messages stalled 100 ms on average (a busy Wi-Fi hop)"),
    ];

    /// Looks up a built-in profile by name.
    pub fn named(name: &str) -> Option<Self> {
        let us = Duration::from_micros;
        let (delay, jitter, bw, stall_ppm, stall_mean) = match name {
            "loopback" => return Some(Self::loopback()),
            "lan" => (us(100), us(20), 10_000_000_000, 0, Duration::ZERO),
            "5g-urllc" => (us(1000), us(100), 100_000_000, 0, Duration::ZERO),
            // Wi-Fi's tail: a frame waits out MAC retries and rate adaptation, other stations, a
            // power-save sleep (beacons come every 102.4 ms) or an off-channel scan.
            "wifi" => (us(20_000), us(5_000), 50_000_000, 10_000, us(100_000)),
            _ => return None,
        };
        Some(Self { name: name.into(), one_way_delay: delay, jitter, bandwidth_bps: Some(bw), stall_ppm, stall_mean })
    }

    /// True when the profile adds nothing (the model is skipped entirely).
    pub fn is_passthrough(&self) -> bool {
        self.one_way_delay.is_zero()
            && self.jitter.is_zero()
            && self.bandwidth_bps.is_none()
            && (self.stall_ppm == 0 || self.stall_mean.is_zero())
    }
}

/// Error parsing a link profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid link profile {input:?}: {reason}. Use one of loopback, lan, 5g-urllc, wifi, or e.g. \"delay=2ms,jitter=100us,bandwidth=1Gbit,stall=50ms@1%\"")]
pub struct LinkProfileError {
    input: String,
    reason: String,
}

fn parse_bandwidth(s: &str) -> Option<u64> {
    let lower = s.to_ascii_lowercase();
    let lower = lower.trim_end_matches("/s").trim_end_matches("ps");
    let split = lower.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = lower.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult = match unit {
        "bit" | "b" => 1.0,
        "kbit" | "k" => 1e3,
        "mbit" | "m" => 1e6,
        "gbit" | "g" => 1e9,
        _ => return None,
    };
    let bps = num * mult;
    // Truncation to whole bits per second is intended; a cap below 1 bit/s is refused.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (bps.is_finite() && bps >= 1.0).then_some(bps as u64)
}

/// The longest delay, jitter or mean stall a custom profile may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// `"1%"` or `"0.5%"` as parts per million; `None` unless within 0-100%.
fn parse_share_ppm(s: &str) -> Option<u32> {
    let percent: f64 = s.strip_suffix('%')?.trim().parse().ok()?;
    // Rounded to whole parts per million, within 0..=1e6 (checked first).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (percent.is_finite() && (0.0..=100.0).contains(&percent)).then(|| (percent * 10_000.0).round() as u32)
}

impl FromStr for LinkProfile {
    type Err = LinkProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = Self::named(s) {
            return Ok(p);
        }
        let err = |reason: String| LinkProfileError { input: s.into(), reason };
        if !s.contains('=') {
            return Err(err("unknown profile name".into()));
        }
        let mut p = Self::loopback();
        p.name = "custom".into();
        let bounded = |key: &str, text: &str| {
            let d = humantime::parse_duration(text.trim()).map_err(|e| err(format!("{key}: {e}")))?;
            if d > MAX_DELAY {
                return Err(err(format!("{key} {text:?} is longer than {MAX_DELAY:?}, the most a link may add")));
            }
            Ok(d)
        };
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            let dur = || bounded(key, value);
            match key.trim() {
                "delay" => p.one_way_delay = dur()?,
                "jitter" => p.jitter = dur()?,
                "bandwidth" | "bw" => {
                    p.bandwidth_bps = Some(
                        parse_bandwidth(value.trim())
                            .ok_or_else(|| err(format!("bandwidth {value:?} is not like 100Mbit or 1Gbit")))?,
                    )
                }
                "stall" => {
                    let (mean, rate) = value.trim().split_once('@').ok_or_else(|| {
                        err(format!("stall {value:?} is not like 50ms@1% (mean extra delay @ share of messages)"))
                    })?;
                    p.stall_mean = bounded("stall", mean)?;
                    p.stall_ppm = parse_share_ppm(rate.trim())
                        .ok_or_else(|| err(format!("stall share {rate:?} is not a percentage from 0% to 100%")))?;
                }
                other => return Err(err(format!("unknown key {other:?} (expected delay, jitter, bandwidth, stall)"))),
            }
        }
        Ok(p)
    }
}

impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (delay {:?}, jitter {:?}", self.name, self.one_way_delay, self.jitter)?;
        match self.bandwidth_bps {
            Some(b) => write!(f, ", {} Mbit/s", b / 1_000_000)?,
            None => write!(f, ", no bandwidth cap")?,
        }
        if self.stall_ppm > 0 && !self.stall_mean.is_zero() {
            write!(
                f,
                ", {}% of messages stalled {:?} on average",
                f64::from(self.stall_ppm) / 10_000.0,
                self.stall_mean
            )?;
        }
        write!(f, ")")
    }
}

/// Per-endpoint link state: when each direction is next free, and the last delivery time.
#[derive(Debug)]
pub struct LinkModel {
    profile: LinkProfile,
    rng: fastrand::Rng,
    tx_free: Instant,
    rx_free: Instant,
    last_delivery: Instant,
}

impl LinkModel {
    /// A model for `profile`, starting idle now.
    pub fn new(profile: LinkProfile) -> Self {
        let now = Instant::now();
        Self { profile, rng: fastrand::Rng::new(), tx_free: now, rx_free: now, last_delivery: now }
    }

    /// The profile being emulated.
    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    fn serialisation(&self, bytes: usize) -> Duration {
        match self.profile.bandwidth_bps {
            // Precision loss above 2^52 bytes is irrelevant for frame sizes.
            #[allow(clippy::cast_precision_loss)]
            Some(bps) => Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64),
            None => Duration::ZERO,
        }
    }

    /// The random part of one message's delay: its jitter, and a stall now and then.
    fn jitter(&mut self) -> Duration {
        let j = self.profile.jitter;
        let jitter = if j.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.rng.u64(0..=u64::try_from(j.as_nanos()).unwrap_or(u64::MAX)))
        };
        jitter + self.stall()
    }

    /// An exponentially distributed stall of the profile's mean, for one message in
    /// `1e6 / stall_ppm`; nothing for the others.
    fn stall(&mut self) -> Duration {
        if self.profile.stall_ppm == 0 || self.rng.u32(0..1_000_000) >= self.profile.stall_ppm {
            return Duration::ZERO;
        }
        // Inverse transform: -mean * ln(U) with U uniform in (0, 1]; capped at 100 means (and at
        // 100 times `MAX_DELAY` for a profile built by hand), so that one draw cannot hold a
        // connection for hours.
        let u = 1.0 - self.rng.f64();
        let factor = (-u.ln()).min(100.0);
        Duration::try_from_secs_f64(self.profile.stall_mean.as_secs_f64() * factor)
            .unwrap_or(Duration::MAX)
            .min(MAX_DELAY.saturating_mul(100))
    }

    /// Schedules a request of `request_bytes` posted at `now` whose response carries
    /// `response_bytes`; returns the earliest instant its completion may be delivered, or `None` when
    /// the profile adds nothing.
    pub fn schedule(&mut self, now: Instant, request_bytes: usize, response_bytes: usize) -> Option<Instant> {
        if self.profile.is_passthrough() {
            return None;
        }
        let depart = now.max(self.tx_free);
        self.tx_free = depart + self.serialisation(request_bytes);
        let arrive = self.tx_free + self.profile.one_way_delay + self.jitter();
        let back = arrive.max(self.rx_free);
        self.rx_free = back + self.serialisation(response_bytes);
        let deliver = (self.rx_free + self.profile.one_way_delay + self.jitter()).max(self.last_delivery);
        self.last_delivery = deliver;
        Some(deliver)
    }
}

/// A link profile a server applies to everything it sends (`memory-server --link`), changeable
/// while it runs: the lender moved, or a test moves it. Each connection follows it with its own
/// [`LinkFollower`], which picks up a new profile at its next response.
#[derive(Debug, Default)]
pub struct SharedLink {
    profile: std::sync::RwLock<LinkProfile>,
    version: std::sync::atomic::AtomicU64,
}

impl SharedLink {
    /// A link emulating `profile`.
    pub fn new(profile: LinkProfile) -> Self {
        Self { profile: std::sync::RwLock::new(profile), version: std::sync::atomic::AtomicU64::new(0) }
    }

    /// The profile emulated now.
    pub fn profile(&self) -> LinkProfile {
        self.profile.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Emulates `profile` from now on, on every connection.
    pub fn set(&self, profile: LinkProfile) {
        *self.profile.write().unwrap_or_else(std::sync::PoisonError::into_inner) = profile;
        self.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// A per-connection model following this link.
    pub fn follower(&self) -> LinkFollower<'_> {
        LinkFollower { link: self, version: u64::MAX, model: None }
    }
}

/// One connection's [`LinkModel`] of a [`SharedLink`], rebuilt when the link's profile changes.
#[derive(Debug)]
pub struct LinkFollower<'a> {
    link: &'a SharedLink,
    version: u64,
    model: Option<LinkModel>,
}

impl LinkFollower<'_> {
    /// When the response (`response_bytes`) to a request (`request_bytes`) that arrived at
    /// `arrival` may leave; `None`: at once (the link adds nothing).
    pub fn deliver_at(&mut self, arrival: Instant, request_bytes: usize, response_bytes: usize) -> Option<Instant> {
        let version = self.link.version.load(std::sync::atomic::Ordering::Acquire);
        if version != self.version {
            self.version = version;
            let profile = self.link.profile();
            self.model = (!profile.is_passthrough()).then(|| LinkModel::new(profile));
        }
        self.model.as_mut().and_then(|m| m.schedule(arrival, request_bytes, response_bytes))
    }
}

/// Round-trip telemetry of one link (post to completion, as the caller sees it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RttStats {
    /// Completions measured.
    pub samples: u64,
    /// Smallest round trip.
    pub min: Duration,
    /// Exponentially weighted moving average (weight 1/8, as TCP's SRTT).
    pub smoothed: Duration,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest round trip.
    pub max: Duration,
}

/// Accumulates round-trip samples.
#[derive(Debug)]
pub struct RttRecorder {
    hist: Histogram<u64>,
    smoothed_ns: u64,
}

impl Default for RttRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl RttRecorder {
    /// An empty recorder (1 ns to 60 s, two significant digits).
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 2)
            .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable_histogram()));
        Self { hist, smoothed_ns: 0 }
    }

    /// Records one round trip.
    pub fn record(&mut self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
        self.smoothed_ns = if self.hist.len() == 1 { ns } else { self.smoothed_ns - self.smoothed_ns / 8 + ns / 8 };
    }

    /// A snapshot of the figures so far.
    pub fn stats(&self) -> RttStats {
        if self.hist.is_empty() {
            return RttStats::default();
        }
        let d = Duration::from_nanos;
        RttStats {
            samples: self.hist.len(),
            min: d(self.hist.min()),
            smoothed: d(self.smoothed_ns),
            p50: d(self.hist.value_at_quantile(0.5)),
            p99: d(self.hist.value_at_quantile(0.99)),
            max: d(self.hist.max()),
        }
    }
}

fn unreachable_histogram() -> Histogram<u64> {
    // Both constructors above take constant, valid arguments; this is never reached.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_and_custom_profiles() {
        assert!("loopback".parse::<LinkProfile>().expect("named").is_passthrough());
        let p: LinkProfile = "5g-urllc".parse().expect("named");
        assert_eq!(p.one_way_delay, Duration::from_millis(1));
        let c: LinkProfile = "delay=2ms,jitter=100us,bandwidth=1Gbit".parse().expect("custom");
        assert_eq!(c.one_way_delay, Duration::from_millis(2));
        assert_eq!(c.jitter, Duration::from_micros(100));
        assert_eq!(c.bandwidth_bps, Some(1_000_000_000));
        assert!("moon".parse::<LinkProfile>().is_err());
        assert!("delay=fast".parse::<LinkProfile>().is_err());
        assert!("bandwidth=12parsecs".parse::<LinkProfile>().is_err());
        let s: LinkProfile = "delay=1ms,stall=50ms@0.5%".parse().expect("custom");
        assert_eq!((s.stall_mean, s.stall_ppm), (Duration::from_millis(50), 5_000));
        assert!(s.to_string().contains("0.5% of messages stalled 50ms"), "{s}");
        for bad in [
            "stall=50ms",
            "stall=50ms@101%",
            "stall=50ms@-1%",
            "stall=50ms@NaN%",
            "stall=fast@1%",
            "stall=5ms@1",
            "stall=100000000h@1%",
            "delay=100000000h",
            "jitter=11s",
        ] {
            assert!(bad.parse::<LinkProfile>().is_err(), "{bad}");
        }
        assert!("stall=10ms@1%".parse::<LinkProfile>().is_ok_and(|p| !p.is_passthrough()));
    }

    #[test]
    fn model_adds_two_delays_and_serialisation_and_keeps_order() {
        let mut m = LinkModel::new("delay=1ms,bandwidth=8Mbit".parse().expect("custom"));
        let now = Instant::now();
        // 1000 bytes at 8 Mbit/s = 1 ms each way.
        let t1 = m.schedule(now, 1000, 1000).expect("scheduled");
        assert_eq!(t1 - now, Duration::from_millis(4));
        let t2 = m.schedule(now, 1000, 0).expect("scheduled");
        assert!(t2 >= t1, "completions stay in order");
        assert!(LinkModel::new(LinkProfile::loopback()).schedule(now, 1, 1).is_none());
    }

    #[test]
    fn stalls_hold_about_their_share_of_messages_for_about_their_mean() {
        let mut m = LinkModel::new("stall=10ms@2%".parse().expect("custom"));
        m.rng = fastrand::Rng::with_seed(7);
        let draws: Vec<Duration> = (0..100_000).map(|_| m.stall()).collect();
        let stalled: Vec<&Duration> = draws.iter().filter(|d| !d.is_zero()).collect();
        // 2% of 100,000 (binomial: standard deviation 44); mean 10 ms (standard error 0.07 ms).
        assert!((1_800..2_200).contains(&stalled.len()), "{}", stalled.len());
        let mean = stalled.iter().map(|d| d.as_secs_f64()).sum::<f64>() / stalled.len() as f64;
        assert!((0.009..0.011).contains(&mean), "{mean}");
        assert!(stalled.iter().all(|d| **d <= Duration::from_secs(1)), "capped at 100 means");
        assert!(LinkProfile::named("wifi").is_some_and(|w| w.stall_ppm == 10_000));
    }

    #[test]
    fn recorder_reports_quantiles() {
        let mut r = RttRecorder::new();
        for us in 1..=100 {
            r.record(Duration::from_micros(us));
        }
        let s = r.stats();
        assert_eq!(s.samples, 100);
        assert!(s.p50 >= Duration::from_micros(49) && s.p50 <= Duration::from_micros(51), "{s:?}");
        assert!(s.p99 >= Duration::from_micros(98), "{s:?}");
        assert_eq!(s.min, Duration::from_micros(1));
    }
}
