//! Time arithmetic that never panics, and the one way npd writes a wall-clock time.
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

/// A `Duration` of at least `min` and at most `max`, as a clap value parser for duration flags
/// (`5m`, `1h30m`): a flag outside the range is an error at start that says the range.
pub fn parse_bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
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
