//! Redis's clock as this process reads it, for scoring the cross-job
//! indexes, and this process's own.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in ms by this process's clock. The store's indexes are
/// scored by `RedisClock` instead, and transitions use Redis's `TIME`.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Redis's clock, as this process reads it: the local clock plus an
/// offset measured against `TIME` with every epoch read (at connect, on a
/// fresh connection, with each ping) and at least every
/// [`CLOCK_REFRESH_MS`]. The cross-job indexes (retries due, lease
/// expiries, the job index) are scored and read by it, so hosts whose
/// clocks disagree still agree on when a retry is due or a lease lapsed:
/// the transitions inside Redis use its `TIME` already.
#[derive(Debug, Default)]
pub(super) struct RedisClock {
    /// Redis's time minus the local clock's, ms.
    offset_ms: AtomicI64,
    /// When (by the local clock) the offset was last measured.
    measured_at_ms: AtomicU64,
    /// A refresh is under way.
    pub(super) refreshing: AtomicBool,
    /// Added to the system clock: how tests give a process a wrong clock.
    pub(super) skew_ms: AtomicI64,
}

/// How old the measured offset may grow before a refresh is started.
pub(super) const CLOCK_REFRESH_MS: u64 = 30_000;
/// An offset past this is logged as a warning: the host's clock is off.
const CLOCK_WARN_MS: i64 = 1_000;

impl RedisClock {
    pub(super) fn local_ms(&self) -> u64 {
        unix_ms().saturating_add_signed(self.skew_ms.load(Ordering::Relaxed))
    }

    /// Redis's time when the local clock reads `local`.
    pub(super) fn at(&self, local: u64) -> u64 {
        local.saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Whether, the local clock reading `local`, a refresh should start
    /// (and this caller starts it): the offset is old, or the local clock
    /// went back past the moment it was measured (a clock set back).
    pub(super) fn claim_refresh(&self, local: u64) -> bool {
        let age = local.abs_diff(self.measured_at_ms.load(Ordering::Relaxed));
        age > CLOCK_REFRESH_MS
            && self
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Note Redis's `TIME` (`secs`, `micros`) read between the local
    /// moments `sent` and `answered`: the reading is taken to be from the
    /// middle of the round trip.
    pub(super) fn observe(&self, sent: u64, answered: u64, secs: u64, micros: u64) {
        let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let local_ms = sent + answered.saturating_sub(sent) / 2;
        let offset = redis_ms as i64 - local_ms as i64;
        let before = self.offset_ms.swap(offset, Ordering::Relaxed);
        self.measured_at_ms.store(answered, Ordering::Relaxed);
        self.refreshing.store(false, Ordering::Release);
        if offset.abs() > CLOCK_WARN_MS && (offset - before).abs() > CLOCK_WARN_MS {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from Redis's by more than {CLOCK_WARN_MS} ms; \
                 retries and leases are scheduled by Redis's clock, but check the \
                 host's time service (NTP)"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn redis_time_is_read_as_of_the_middle_of_the_round_trip() {
        let clock = RedisClock::default();
        // Sent at local 1,000 ms, answered at 1,010: Redis said 2.005 s.
        clock.observe(1_000, 1_010, 2, 5_000);
        assert_eq!(clock.offset_ms.load(Ordering::Relaxed), 2_005 - 1_005);
        assert_eq!(clock.at(5_000), 6_000);
    }

    #[test]
    fn one_caller_refreshes_a_stale_offset_at_a_time() {
        let clock = RedisClock::default();
        let now = clock.local_ms();
        assert!(clock.claim_refresh(now), "never measured: stale");
        assert!(!clock.claim_refresh(now), "a refresh is under way");
        clock.observe(now, now, now / 1000, (now % 1000) * 1000);
        assert!(!clock.claim_refresh(now), "just measured");
        assert!(
            clock.claim_refresh(now + CLOCK_REFRESH_MS + 1),
            "stale again {CLOCK_REFRESH_MS} ms later"
        );
        clock.observe(now, now, now / 1000, (now % 1000) * 1000);
        assert!(
            clock.claim_refresh(now - 3_600_000),
            "stale at once when the local clock is set back an hour"
        );
    }
}
