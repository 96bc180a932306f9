//! Wall-clock time as the store, datasets and reports record it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as an integer (0 if the clock is before the epoch).
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
