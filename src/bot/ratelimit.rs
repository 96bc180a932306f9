//! Per-user question limit (GCRA from `governor`): a burst, then a steady rate per minute.
//! A refused user is told so at most once per [`NOTICE_WINDOW`]: a flood of questions must not
//! turn into a flood of notices (on Discord they share the channel's rate limit with
//! everyone's answers).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Shortest time between two "slow down" notices to one user.
pub const NOTICE_WINDOW: Duration = Duration::from_secs(60);

pub struct UserLimiter {
    limiter: DefaultKeyedRateLimiter<u64>,
    /// When each refused user was last told.
    noticed: Mutex<HashMap<u64, Instant>>,
}

/// What to do with a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused; `notify` is true for the first refusal in a [`NOTICE_WINDOW`].
    Refused {
        notify: bool,
    },
}

impl UserLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self { limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)), noticed: Mutex::new(HashMap::new()) }
    }

    /// [`UserLimiter::allow`], and for a refusal whether the user should be told now.
    pub fn check(&self, user: u64) -> Verdict {
        self.check_at(user, Instant::now())
    }

    fn check_at(&self, user: u64, now: Instant) -> Verdict {
        if self.allow(user) {
            return Verdict::Allowed;
        }
        let mut noticed = self.noticed.lock().unwrap_or_else(|e| e.into_inner());
        let notify = noticed.get(&user).is_none_or(|&t| now.saturating_duration_since(t) >= NOTICE_WINDOW);
        if notify {
            noticed.insert(user, now);
        }
        if noticed.len() > 10_000 {
            noticed.retain(|_, t| now.saturating_duration_since(*t) < NOTICE_WINDOW);
        }
        Verdict::Refused { notify }
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

    #[test]
    fn one_notice_per_user_per_window() {
        let l = UserLimiter::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(l.check_at(7, t0), Verdict::Allowed);
        assert_eq!(l.check_at(7, t0), Verdict::Refused { notify: true });
        for _ in 0..30 {
            assert_eq!(l.check_at(7, t0 + Duration::from_secs(1)), Verdict::Refused { notify: false });
        }
        assert_eq!(l.check_at(8, t0), Verdict::Allowed);
        assert_eq!(l.check_at(8, t0), Verdict::Refused { notify: true }, "each user is told once");
        // `allow` uses the real clock; a window later, a still-refused user is told again.
        let later = t0 + NOTICE_WINDOW;
        assert!(matches!(l.check_at(7, later), Verdict::Refused { notify: true } | Verdict::Allowed));
    }
}
