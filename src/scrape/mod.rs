//! The forum scraper: a polite crawler of the thread list and thread pages into the store,
//! and the parser/cleaner that turns stored pages into posts.
//!
//! - [`fetch`]: HTTP client with rate limit, timeouts, retries with backoff and conditional GETs;
//! - [`robots`]: robots.txt rules;
//! - [`crawl`]: list pages → threads → thread pages, resumable and incremental via the store;
//! - [`parse`] and [`clean`]: HTML → posts → clean text;
//! - [`reparse`]: rebuild all posts from the stored raw HTML (after a cleaner change);
//! - [`synth`]: realistic synthetic pages for the parse benchmark.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use url::Url;

pub mod clean;
pub mod crawl;
pub mod fetch;
pub mod parse;
pub mod progress;
pub mod reparse;
pub mod robots;

pub use clean::CleanOptions;
pub use crawl::{scrape, CrawlOptions, CrawlReport};

/// `[scrape]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeSettings {
    /// Forum origin, e.g. "https://www.newschoolers.com".
    pub base_url: String,
    /// Path of the subforum's thread list, e.g. "/forum/1/Ski-Gabber".
    pub subforum_path: String,
    /// Sent with every request; its first word is the robots.txt product token.
    pub user_agent: String,
    /// Sustained request rate (all requests, retries included).
    pub requests_per_second: f64,
    /// Requests allowed back to back before the rate applies.
    pub burst: u32,
    /// Threads crawled at the same time (each thread's pages go in order).
    pub concurrency: usize,
    pub connect_timeout_ms: u64,
    /// Whole-request limit (headers and body).
    pub request_timeout_ms: u64,
    /// Retries after the first attempt on timeouts, connection errors, 429 and 5xx.
    pub max_retries: u32,
    /// First retry waits about this long; each further retry doubles it (with jitter).
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A Retry-After longer than this makes the crawler give up on the page for this run.
    pub max_retry_after_s: u64,
    pub max_pages_per_thread: u32,
    pub max_list_pages: u32,
    /// Keep links as plain URLs in the training text (true) or drop them (false). Stored posts
    /// keep them either way; a model trained on links learns to invent them.
    pub keep_urls: bool,
    /// Keep emoji in post text.
    pub keep_emoji: bool,
}

impl ScrapeSettings {
    /// Reject values that deserialize but make no sense, naming the key.
    pub fn validate(&self) -> Result<()> {
        let k = "scrape";
        let base = Url::parse(&self.base_url).map_err(|e| anyhow::anyhow!("{k}.base_url {:?} is not a URL: {e}", self.base_url))?;
        anyhow::ensure!(matches!(base.scheme(), "http" | "https"), "{k}.base_url must be http(s), got {:?}", self.base_url);
        anyhow::ensure!(self.subforum_path.starts_with('/'), "{k}.subforum_path must start with '/', got {:?}", self.subforum_path);
        anyhow::ensure!(
            !self.user_agent.trim().is_empty() && !robots::product_token(&self.user_agent).is_empty(),
            "{k}.user_agent must name the crawler (e.g. \"freeski-bot/0.1 (+contact)\")"
        );
        anyhow::ensure!(
            self.requests_per_second.is_finite() && self.requests_per_second > 0.0 && self.requests_per_second <= 1000.0,
            "{k}.requests_per_second must be in (0, 1000], got {}",
            self.requests_per_second
        );
        anyhow::ensure!(self.burst >= 1, "{k}.burst must be at least 1");
        anyhow::ensure!((1..=64).contains(&self.concurrency), "{k}.concurrency must be 1..=64, got {}", self.concurrency);
        anyhow::ensure!(self.connect_timeout_ms > 0, "{k}.connect_timeout_ms must be at least 1");
        anyhow::ensure!(self.request_timeout_ms > 0, "{k}.request_timeout_ms must be at least 1");
        anyhow::ensure!(self.backoff_base_ms > 0, "{k}.backoff_base_ms must be at least 1");
        anyhow::ensure!(self.backoff_max_ms >= self.backoff_base_ms, "{k}.backoff_max_ms must be >= scrape.backoff_base_ms");
        anyhow::ensure!(self.max_pages_per_thread >= 1, "{k}.max_pages_per_thread must be at least 1");
        anyhow::ensure!(self.max_list_pages >= 1, "{k}.max_list_pages must be at least 1");
        Ok(())
    }

    pub fn base(&self) -> Result<Url> {
        Url::parse(&self.base_url).map_err(|e| anyhow::anyhow!("scrape.base_url: {e}"))
    }

    /// Thread list URL without the page parameter.
    pub fn list_url(&self) -> Result<Url> {
        self.base()?.join(&self.subforum_path).map_err(|e| anyhow::anyhow!("scrape.subforum_path: {e}"))
    }

    pub fn clean_options(&self) -> CleanOptions {
        CleanOptions { keep_urls: self.keep_urls, keep_emoji: self.keep_emoji }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl Default for ScrapeSettings {
    /// The committed defaults (config/default.toml holds the same values).
    fn default() -> Self {
        Self {
            base_url: "https://www.newschoolers.com".into(),
            subforum_path: "/forum/1/Ski-Gabber".into(),
            user_agent: "freeski-bot/0.1 (self-hosted freeskiing Q&A bot)".into(),
            requests_per_second: 1.0,
            burst: 1,
            concurrency: 2,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_retries: 4,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            max_retry_after_s: 600,
            max_pages_per_thread: 10,
            max_list_pages: 250,
            keep_urls: false,
            keep_emoji: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        ScrapeSettings::default().validate().unwrap();
        let bad = ScrapeSettings { requests_per_second: 0.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("scrape.requests_per_second"));
        let bad = ScrapeSettings { base_url: "ftp://x".into(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("scrape.base_url"));
        let bad = ScrapeSettings { subforum_path: "forum/1".into(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("scrape.subforum_path"));
        assert_eq!(ScrapeSettings::default().list_url().unwrap().as_str(), "https://www.newschoolers.com/forum/1/Ski-Gabber");
    }
}
