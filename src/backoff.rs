//! Backoff: how long to wait before trying again.
//!
//! Task retries use exponential backoff with *full jitter*
//! (`random(0, min(cap, base * 2^(attempt-1)))`), which spreads a burst of
//! failures out instead of synchronising their retries. Infrastructure
//! reconnects use `backon`'s exponential builder with jitter.

use std::time::Duration;

use rand::Rng;

/// The upper bound of the delay after failed attempt `attempt` (1-based).
pub fn ceiling(attempt: u32, base_ms: u64, cap_ms: u64) -> u64 {
    let exp = attempt.saturating_sub(1).min(62);
    base_ms.saturating_mul(1u64 << exp).min(cap_ms)
}

/// A full-jitter delay after failed attempt `attempt`.
pub fn retry_delay(attempt: u32, base_ms: u64, cap_ms: u64, rng: &mut impl Rng) -> Duration {
    let max = ceiling(attempt, base_ms, cap_ms);
    Duration::from_millis(if max == 0 {
        0
    } else {
        rng.random_range(0..=max)
    })
}

/// A generator seeded from a claim (FNV-1a over job, task, attempt, fence).
pub fn claim_rng(claim: &crate::store::ClaimRef) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(claim.job.as_bytes());
    eat(&claim.idx.to_le_bytes());
    eat(&claim.attempt.to_le_bytes());
    eat(&claim.fence.to_le_bytes());
    rand::rngs::StdRng::seed_from_u64(h)
}

/// Reconnect backoff for broker and store outages: 100 ms doubling to 5 s,
/// jittered, forever (the caller stops on shutdown).
pub fn reconnect() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_then_stops_at_the_cap() {
        assert_eq!(ceiling(1, 100, 1000), 100);
        assert_eq!(ceiling(2, 100, 1000), 200);
        assert_eq!(ceiling(4, 100, 1000), 800);
        assert_eq!(ceiling(5, 100, 1000), 1000);
        assert_eq!(ceiling(200, 100, 1000), 1000);
    }

    proptest::proptest! {
        #[test]
        fn delays_stay_within_zero_and_the_ceiling(attempt in 1u32..100, base in 0u64..10_000, cap in 0u64..100_000, seed: u64) {
            use rand::SeedableRng;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = retry_delay(attempt, base, cap, &mut rng).as_millis() as u64;
            proptest::prop_assert!(d <= ceiling(attempt, base, cap));
            proptest::prop_assert!(d <= cap);
        }
    }
}
