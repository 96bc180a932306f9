//! The polite HTTP client: one rate limiter shared by every request (retries included),
//! timeouts, retries with exponential backoff and jitter on timeouts, connection errors, 429
//! (honouring Retry-After) and 5xx, and conditional GETs from stored validators.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{HeaderMap, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER};
use reqwest::StatusCode;
use url::Url;

use super::ScrapeSettings;
use crate::util::backoff::Backoff;

/// Stored validators for a conditional GET.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// How a fetch ended, after any retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Body {
        status: u16,
        body: Vec<u8>,
        etag: Option<String>,
        last_modified: Option<String>,
        attempts: u32,
    },
    NotModified {
        attempts: u32,
    },
    /// 404 or 410: the page does not exist (any more).
    Missing {
        status: u16,
        attempts: u32,
    },
    /// Gave up (retries spent, Retry-After too long) or an error not worth retrying.
    Failed {
        status: Option<u16>,
        reason: String,
        attempts: u32,
    },
}

/// Counters for the progress bar and the report.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub not_modified: AtomicU64,
    pub bytes: AtomicU64,
}

enum Attempt {
    Done(Fetched),
    Retry { status: Option<u16>, reason: String, retry_after: Option<Duration> },
}

pub struct Fetcher {
    client: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    max_retries: u32,
    backoff: Backoff,
    max_retry_after: Duration,
    timeout: Duration,
    pub stats: FetchStats,
}

fn limiter(period: Duration, burst: u32) -> Result<DefaultDirectRateLimiter> {
    let quota = Quota::with_period(period).context("rate limit period must be positive")?;
    let burst = NonZeroU32::new(burst.max(1)).context("burst must be at least 1")?;
    Ok(RateLimiter::direct(quota.allow_burst(burst)))
}

impl Fetcher {
    pub fn new(s: &ScrapeSettings) -> Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(&s.user_agent)
            .connect_timeout(Duration::from_millis(s.connect_timeout_ms))
            .timeout(s.request_timeout())
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .context("building HTTP client")?;
        Ok(Self {
            client,
            limiter: limiter(Duration::from_secs_f64(1.0 / s.requests_per_second), s.burst)?,
            max_retries: s.max_retries,
            backoff: Backoff { base: Duration::from_millis(s.backoff_base_ms), max: Duration::from_millis(s.backoff_max_ms) },
            max_retry_after: Duration::from_secs(s.max_retry_after_s),
            timeout: s.request_timeout(),
            stats: FetchStats::default(),
        })
    }

    /// Slow down to robots.txt's Crawl-delay when it asks for less than our rate.
    pub fn apply_crawl_delay(&mut self, delay: Duration, settings: &ScrapeSettings) -> Result<()> {
        let ours = Duration::from_secs_f64(1.0 / settings.requests_per_second);
        if delay > ours {
            tracing::info!(delay_ms = delay.as_millis() as u64, "robots.txt Crawl-delay is slower than scrape.requests_per_second; using it");
            self.limiter = limiter(delay, 1)?;
        }
        Ok(())
    }

    /// GET `url`, retrying as configured. Never returns an error: every outcome is a
    /// [`Fetched`] the caller records.
    pub async fn get(&self, url: &Url, validators: Option<&Validators>) -> Fetched {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.limiter.until_ready().await;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self.client.get(url.clone());
            if let Some(v) = validators {
                if let Some(etag) = &v.etag {
                    req = req.header(IF_NONE_MATCH, etag);
                }
                if let Some(lm) = &v.last_modified {
                    req = req.header(IF_MODIFIED_SINCE, lm);
                }
            }
            let attempt = match req.send().await {
                Ok(resp) => self.classify(resp).await,
                Err(e) => self.classify_error(&e),
            };
            let (status, reason, retry_after) = match attempt {
                Attempt::Done(mut done) => {
                    set_attempts(&mut done, attempts);
                    if matches!(done, Fetched::Failed { .. }) {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    return done;
                }
                Attempt::Retry { status, reason, retry_after } => (status, reason, retry_after),
            };
            if attempts > self.max_retries {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Fetched::Failed { status, reason: format!("gave up after {attempts} attempts: {reason}"), attempts };
            }
            if let Some(ra) = retry_after.filter(|ra| *ra > self.max_retry_after) {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                return Fetched::Failed { status, reason: format!("{reason}; Retry-After {}s exceeds scrape.max_retry_after_s", ra.as_secs()), attempts };
            }
            let delay = self.backoff.delay(attempts).max(retry_after.unwrap_or_default());
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%url, attempt = attempts, delay_ms = delay.as_millis() as u64, %reason, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn classify(&self, resp: reqwest::Response) -> Attempt {
        let status = resp.status();
        let code = status.as_u16();
        if status.is_success() {
            let (etag, last_modified) = validators_of(resp.headers());
            return match resp.bytes().await {
                Ok(body) => {
                    self.stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    Attempt::Done(Fetched::Body { status: code, body: body.to_vec(), etag, last_modified, attempts: 0 })
                }
                Err(e) => Attempt::Retry { status: Some(code), reason: format!("reading body: {}", self.describe(&e)), retry_after: None },
            };
        }
        match status {
            StatusCode::NOT_MODIFIED => {
                self.stats.not_modified.fetch_add(1, Ordering::Relaxed);
                Attempt::Done(Fetched::NotModified { attempts: 0 })
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => Attempt::Done(Fetched::Missing { status: code, attempts: 0 }),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
                Attempt::Retry { status: Some(code), reason: format!("HTTP {status}"), retry_after: retry_after(resp.headers()) }
            }
            s if s.is_server_error() => Attempt::Retry { status: Some(code), reason: format!("HTTP {status}"), retry_after: retry_after(resp.headers()) },
            _ => Attempt::Done(Fetched::Failed { status: Some(code), reason: format!("HTTP {status}"), attempts: 0 }),
        }
    }

    fn classify_error(&self, e: &reqwest::Error) -> Attempt {
        let reason = self.describe(e);
        if e.is_timeout() || e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
            Attempt::Retry { status: None, reason, retry_after: None }
        } else {
            Attempt::Done(Fetched::Failed { status: None, reason, attempts: 0 })
        }
    }

    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("timed out after {} ms", self.timeout.as_millis());
        }
        // reqwest's Display omits the cause ("error sending request"); add the chain.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

fn set_attempts(f: &mut Fetched, n: u32) {
    match f {
        Fetched::Body { attempts, .. } | Fetched::NotModified { attempts } | Fetched::Missing { attempts, .. } | Fetched::Failed { attempts, .. } => *attempts = n,
    }
}

fn validators_of(h: &HeaderMap) -> (Option<String>, Option<String>) {
    let get = |k| h.get(k).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok()).map(str::to_string);
    (get(ETAG), get(LAST_MODIFIED))
}

/// Retry-After as delta-seconds or an HTTP date.
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_comes_from_the_settings() {
        let s = ScrapeSettings { backoff_base_ms: 100, backoff_max_ms: 1000, ..Default::default() };
        let f = Fetcher::new(&s).unwrap();
        assert_eq!(f.backoff, Backoff { base: Duration::from_millis(100), max: Duration::from_millis(1000) });
    }
}
