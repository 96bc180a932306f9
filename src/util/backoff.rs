//! The one retry schedule: exponential backoff with "equal jitter" (half of each wait fixed,
//! half random), so clients that failed together do not retry in lockstep. Used by the forum
//! fetcher and by Discord writes; each decides for itself what is worth retrying.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Wait before the first retry (before jitter).
    pub base: Duration,
    /// Longest wait, however many retries came before.
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (1 = the first): `base · 2^(attempt-1)`, capped at
    /// `max`, of which the upper half is random.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_within_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_millis(1000) };
        for _ in 0..200 {
            for (attempt, full) in [(1u32, 100u64), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)] {
                let d = b.delay(attempt);
                assert!(d >= Duration::from_millis(full / 2) && d <= Duration::from_millis(full), "attempt {attempt}: {d:?}");
            }
        }
        assert_eq!(Backoff { base: Duration::ZERO, max: Duration::from_secs(1) }.delay(3), Duration::ZERO);
    }
}
