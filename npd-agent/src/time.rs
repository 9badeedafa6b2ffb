//! Time: the kernel's monotonic clock ([`Mono`]), which every window is measured on, its
//! conversion to wall-clock time ([`WallClock`]), time arithmetic that never panics, and the
//! one way npd writes a wall-clock time.
//!
//! Times come from places npd does not control: rule files (windows), the Node object
//! (condition timestamps anyone with `nodes/status patch` can set) and replayed logs (times
//! since boot). Every sum saturates, and every time written out is clamped to what every
//! Kubernetes client can read back: from the Unix epoch to 9999-12-30T22:00:00Z. (RFC 3339
//! goes to the end of year 9999, but jiff, which k8s-openapi uses, stops 26 hours earlier: a
//! later time on a Node makes every Rust client fail to read that Node.)

use std::time::{Duration, SystemTime};

/// The longest window a rule may ask for (`dedupWindow`, `recoverAfter`, `rate.window`): a
/// year. Longer ones are configuration errors.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// 9999-12-30T22:00:00Z, the latest time npd writes: the last one jiff (k8s-openapi's time
/// type) reads.
pub const LATEST_SECS: u64 = 253_402_207_200;

/// The latest time npd ever computes or writes.
pub fn latest() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(LATEST_SECS)
}

/// `t + d`, saturating at [`latest`].
pub fn add(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .map_or_else(latest, |sum| sum.min(latest()))
}

/// A point on the kernel's monotonic clock (`CLOCK_MONOTONIC`, what `bpf_ktime_get_ns()`
/// reads), as time since boot. Every window (de-duplication, rate, recovery) is measured on
/// it, so a wall clock that jumps never shortens or stretches one. Arithmetic saturates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(Duration);

impl Mono {
    /// Boot.
    pub const ZERO: Mono = Mono(Duration::ZERO);

    /// Now (one `clock_gettime`).
    pub fn now() -> Mono {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Mono(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }

    /// `nanos` after boot (a record's `ktime_ns`).
    pub const fn from_nanos(nanos: u64) -> Mono {
        Mono(Duration::from_nanos(nanos))
    }

    /// `since_boot` after boot (a `/dev/kmsg` record's time, a replayed line's).
    pub const fn since_boot(since_boot: Duration) -> Mono {
        Mono(since_boot)
    }

    /// Time since boot.
    pub const fn as_duration(self) -> Duration {
        self.0
    }

    /// `d` later, saturating.
    pub fn saturating_add(self, d: Duration) -> Mono {
        Mono(self.0.saturating_add(d))
    }

    /// How long after `earlier` this is; zero when it is not after it.
    pub fn since(self, earlier: Mono) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// Turns kernel (monotonic) times into wall-clock times: the wall-clock time of boot. Taken
/// again for every burst of events ([`WallClock::system`]), so that a stepped wall clock is
/// followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    boot: SystemTime,
}

impl WallClock {
    /// This system's clocks, now (two clock reads).
    pub fn system() -> WallClock {
        let (mono, wall) = (Mono::now(), SystemTime::now());
        WallClock {
            boot: wall.checked_sub(mono.0).unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// A clock whose boot was at `boot` (`replay`: the Unix epoch).
    pub const fn booted_at(boot: SystemTime) -> WallClock {
        WallClock { boot }
    }

    /// The wall-clock time of `at` (saturating at [`latest`]).
    pub fn wall(&self, at: Mono) -> SystemTime {
        add(self.boot, at.0)
    }
}

/// `t` clamped into what can be written: the Unix epoch to [`latest`]. Returns whether it had
/// to be moved.
pub fn clamp(t: SystemTime) -> (SystemTime, bool) {
    if t < SystemTime::UNIX_EPOCH {
        (SystemTime::UNIX_EPOCH, true)
    } else if t > latest() {
        (latest(), true)
    } else {
        (t, false)
    }
}

/// RFC 3339 in UTC with second precision (Kubernetes' `Time`), of `t` clamped (see [`clamp`]).
/// Never fails.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp(t).0).to_string()
}

/// A duration as Go writes it, as NPD's flags take them (`5m0s`, `1h30m`, `300ms`, `1.5h`,
/// `0`), or as humantime does (`5min`, `1h 30m`). The error names the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Some(d) = go_duration(text.trim()) {
        return Ok(d);
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

/// Go's `time.ParseDuration` for non-negative durations; `None` when `text` is not one.
fn go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per_unit: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let nanos = value * nanos_per_unit;
        if !nanos.is_finite() || nanos > u64::MAX as f64 {
            return None;
        }
        total = total.checked_add(Duration::from_nanos(nanos as u64))?;
        rest = tail;
    }
    Some(total)
}

/// A `Duration` of at least `min` and at most `max`, as a clap value parser for duration flags
/// (`5m`, `1h30m`, `5m0s`): a flag outside the range is an error at start that says the range.
pub fn parse_bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < min || d > max {
        return Err(format!(
            "{text:?} is out of range: give a duration from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(add(t, Duration::from_secs(5)), t + Duration::from_secs(5));
        assert_eq!(add(t, Duration::MAX), latest());
        assert_eq!(add(latest(), Duration::from_secs(1)), latest());
    }

    #[test]
    fn every_time_can_be_written() {
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(3600);
        assert_eq!(rfc3339(before_1970), "1970-01-01T00:00:00Z");
        assert_eq!(clamp(before_1970), (SystemTime::UNIX_EPOCH, true));
        let year_10000 = SystemTime::UNIX_EPOCH + Duration::from_secs(LATEST_SECS + 2 * 86400);
        assert_eq!(rfc3339(year_10000), "9999-12-30T22:00:00Z");
        assert_eq!(rfc3339(latest()), "9999-12-30T22:00:00Z");
        // What npd writes, Kubernetes' Rust types read back.
        assert!(
            rfc3339(latest())
                .parse::<k8s_openapi::jiff::Timestamp>()
                .is_ok()
        );
        let now = SystemTime::now();
        assert_eq!(clamp(now), (now, false));
    }

    #[test]
    fn monotonic_times_and_their_wall_clock() {
        let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = WallClock::booted_at(boot);
        let at = Mono::from_nanos(5_000_000_000);
        assert_eq!(clock.wall(at), boot + Duration::from_secs(5));
        assert_eq!(
            at.saturating_add(Duration::MAX).since(at),
            Duration::MAX - Duration::from_secs(5)
        );
        assert_eq!(Mono::ZERO.since(at), Duration::ZERO);
        assert_eq!(
            clock.wall(Mono::ZERO.saturating_add(Duration::MAX)),
            latest()
        );
    }

    #[test]
    fn durations_as_go_and_humantime_write_them() {
        let d = |t: &str| parse_duration(t);
        assert_eq!(d("5m0s"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(d("2us"), Ok(Duration::from_micros(2)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "5", "-5m", "5x", "1..5h", "h", "."] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
        assert!(d("99999999999999999999h").is_err());
    }

    #[test]
    fn bounded_durations() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(parse_bounded("5m", min, max), Ok(Duration::from_secs(300)));
        assert!(
            parse_bounded("0s", min, max)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            parse_bounded("2h", min, max)
                .unwrap_err()
                .contains("1s to 1h")
        );
        assert!(parse_bounded("soon", min, max).is_err());
        assert!(parse_bounded("400000000000y", min, max).is_err());
    }
}
