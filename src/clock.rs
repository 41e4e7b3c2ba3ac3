//! Checked time arithmetic: no deadline or duration computed from a
//! configured value or a timestamp in a file can overflow and panic.

use std::time::{Duration, Instant};

/// A century: further than any deadline the agent can mean.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `at + d`, or a point a century away when that is not representable.
pub fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d.min(FAR))
        .or_else(|| at.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(at)
}

/// A duration in milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The time from `from_ms` to `to_ms` (milliseconds since the epoch),
/// zero when `to_ms` is not later.
pub fn between_ms(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(to_ms.saturating_sub(from_ms)).unwrap_or(0))
}

/// Exponential backoff: `base` after the first failure, doubling, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The wait after `failures` failures in a row (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extremes_saturate() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert_eq!(ms(Duration::MAX), i64::MAX);
        assert_eq!(
            between_ms(i64::MIN, i64::MAX),
            Duration::from_millis(i64::MAX as u64)
        );
        assert_eq!(between_ms(10, 5), Duration::ZERO);
        assert_eq!(between_ms(5, 10), Duration::from_millis(5));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }
}
