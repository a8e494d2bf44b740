//! Backoff: how long to wait before trying again.
//!
//! Task retries use exponential backoff with *full jitter*
//! (`random(0, min(cap, base * 2^(attempt-1)))`), which spreads a burst of
//! failures out instead of synchronising their retries. Tries again after
//! an outage (connecting, subscribing, a publish the broker did not take,
//! a dispatcher or worker interrupted) wait by [`Reconnect`]: `backon`'s
//! exponential backoff with jitter, so that the processes a broker restart
//! cut off do not all come back in the same instant.

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
    let mut bytes = claim.job.as_bytes().to_vec();
    bytes.extend_from_slice(&claim.idx.to_le_bytes());
    bytes.extend_from_slice(&claim.attempt.to_le_bytes());
    bytes.extend_from_slice(&claim.fence.to_le_bytes());
    rand::rngs::StdRng::seed_from_u64(fnv1a(&bytes))
}

/// FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The waits between tries of something an outage stopped: doubling from
/// about `min` to about `max`, each between half of its step and the whole
/// (backon's jitter adds up to the step again to a half-sized one), for
/// ever: the caller stops on shutdown. [`Reconnect::succeeded`] starts
/// again from `min`.
pub struct Reconnect {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Reconnect {
    /// From about `min` to about `max`, jittered at random.
    pub fn new(min: Duration, max: Duration) -> Reconnect {
        Self::with_seed(min, max, rand::random())
    }

    /// [`Reconnect::new`], jittered by a generator seeded from `seed`:
    /// spread like random across the processes (and tasks) whose names
    /// differ, and the same every time for the same name, so that a
    /// simulation replays exactly.
    pub fn seeded(min: Duration, max: Duration, seed: &str) -> Reconnect {
        Self::with_seed(min, max, fnv1a(seed.as_bytes()))
    }

    fn with_seed(min: Duration, max: Duration, seed: u64) -> Reconnect {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(min / 2)
            .with_max_delay(max / 2)
            .with_jitter()
            .with_jitter_seed(seed)
            .without_max_times();
        Reconnect {
            delays: backon::BackoffBuilder::build(builder),
            builder,
            max,
        }
    }

    /// For broker and store outages: from about 100 ms to about 5 s,
    /// seeded from `seed` (see [`Reconnect::seeded`]).
    pub fn after_outage(seed: &str) -> Reconnect {
        Reconnect::seeded(Duration::from_millis(100), Duration::from_secs(5), seed)
    }

    /// How long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// The try went through: the next outage starts from `min` again.
    pub fn succeeded(&mut self) {
        self.delays = backon::BackoffBuilder::build(self.builder);
    }
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

    #[test]
    fn waits_after_an_outage_double_within_their_bounds_and_start_over_after_a_success() {
        let ms = Duration::from_millis;
        let mut waits = Reconnect::new(ms(100), ms(800));
        let first: Vec<Duration> = (0..6).map(|_| waits.next_delay()).collect();
        // Steps of 50, 100, 200, 400, 400, 400 ms, each jittered up to
        // twice its size.
        for (wait, step) in first.iter().zip([50, 100, 200, 400, 400, 400]) {
            assert!(*wait >= ms(step) && *wait <= ms(2 * step), "{first:?}");
        }
        waits.succeeded();
        let again = waits.next_delay();
        assert!(again >= ms(50) && again <= ms(100), "{again:?}");
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
