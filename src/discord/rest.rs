//! Retrying Discord writes. With `discord.api_base` set, serenity's rate limiter (which would
//! retry 429s) is off, and serenity never retries a 5xx: a post or edit that fails with a server
//! error or a connection error is retried here, a bounded number of times with backoff.

use std::future::Future;

use serenity::http::HttpError;

use crate::util::backoff::Backoff;

/// Whether an error is worth retrying: 5xx, 429 or a transport failure (not 4xx: those repeat).
pub fn retryable(e: &serenity::Error) -> bool {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => r.status_code.is_server_error() || r.status_code.as_u16() == 429,
        serenity::Error::Http(HttpError::Request(_)) => true,
        serenity::Error::Io(_) => true,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries: u32,
    pub backoff: Backoff,
}

/// Run `op` until it succeeds, fails with a non-retryable error, or `policy.retries` retries
/// are spent. `what` names the call in logs.
pub async fn with_retries<T, F, Fut>(policy: RetryPolicy, what: &str, mut op: F) -> serenity::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = serenity::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < policy.retries && retryable(&e) => {
                attempt += 1;
                let wait = policy.backoff.delay(attempt);
                tracing::warn!(error = %e, attempt, "{what} failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}
