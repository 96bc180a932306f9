//! Per-user question limit (GCRA from `governor`): a burst, then a steady rate per minute.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct UserLimiter {
    limiter: DefaultKeyedRateLimiter<u64>,
}

impl UserLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self { limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)) }
    }

    /// Whether `user` may ask now (counts the question when it may).
    pub fn allow(&self, user: u64) -> bool {
        let ok = self.limiter.check_key(&user).is_ok();
        if self.limiter.len() > 10_000 {
            // Forget users whose budget is full again, so the map stays small.
            self.limiter.retain_recent();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusals_per_user() {
        let l = UserLimiter::new(1, 3);
        let got: Vec<bool> = (0..5).map(|_| l.allow(7)).collect();
        assert_eq!(got, vec![true, true, true, false, false]);
        assert!(l.allow(8), "another user has their own budget");
    }
}
