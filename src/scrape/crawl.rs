//! The crawl: robots.txt, then the thread list pages, then every thread with work to do.
//!
//! All state lives in the store and every page is committed with the progress it represents,
//! so the crawl can be stopped at any point (cancel token, dropped future, killed process) and
//! the next run continues: an unfinished run skips list pages it already did, and threads
//! resume at `next_page`. A new run revisits the list (conditional GETs) and queues only
//! threads whose list entry changed (new replies) or that are new.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::fetch::{Fetched, Fetcher, Validators};
use super::parse::{decode_body, page_url, parse_list_page, parse_thread_page};
use super::progress::Progress;
use super::robots::Robots;
use super::{reparse, CleanOptions, ScrapeSettings};
use crate::store::forum::content_hash;
use crate::store::{ListedOutcome, PageFailure, PageKind, PageRecord, PageRow, Store, ThreadStatus, ThreadTask};

#[derive(Debug, Clone, Default)]
pub struct CrawlOptions {
    /// Re-check every known thread page with conditional GETs (catches edits of old posts).
    pub revalidate: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What a crawl did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrawlReport {
    pub resumed: bool,
    pub cancelled: bool,
    pub list_pages_fetched: u64,
    pub list_pages_unchanged: u64,
    pub threads_new: u64,
    pub threads_changed: u64,
    pub threads_crawled: u64,
    pub threads_failed: u64,
    pub threads_gone: u64,
    pub threads_blocked: u64,
    pub pages_fetched: u64,
    pub pages_unchanged: u64,
    pub parse_errors: u64,
    pub requests: u64,
    pub retries: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for CrawlReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "crawl {}{}in {:.1}s", if self.resumed { "(resumed) " } else { "" }, if self.cancelled { "CANCELLED " } else { "" }, self.elapsed.as_secs_f64())?;
        writeln!(f, "  list pages: {} fetched, {} unchanged", self.list_pages_fetched, self.list_pages_unchanged)?;
        writeln!(
            f,
            "  threads:    {} new, {} with new replies, {} crawled, {} failed, {} gone, {} blocked by robots.txt",
            self.threads_new, self.threads_changed, self.threads_crawled, self.threads_failed, self.threads_gone, self.threads_blocked
        )?;
        writeln!(f, "  pages:      {} fetched, {} unchanged, {} parse errors", self.pages_fetched, self.pages_unchanged, self.parse_errors)?;
        write!(f, "  requests:   {} ({} retries)", self.requests, self.retries)
    }
}

#[derive(Default)]
struct Counters {
    threads_crawled: AtomicU64,
    threads_failed: AtomicU64,
    threads_gone: AtomicU64,
    threads_blocked: AtomicU64,
    pages_fetched: AtomicU64,
    pages_unchanged: AtomicU64,
    parse_errors: AtomicU64,
}

struct Ctx<'a> {
    settings: &'a ScrapeSettings,
    clean: CleanOptions,
    store: &'a Mutex<Store>,
    fetcher: Fetcher,
    robots: Robots,
    cancel: &'a CancellationToken,
    counters: Counters,
    progress: Progress,
}

impl Ctx<'_> {
    fn store<T>(&self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        let mut guard = self.store.lock().map_err(|_| anyhow::anyhow!("store lock poisoned by an earlier panic"))?;
        f(&mut guard).map_err(|e| guard.named(e))
    }

    fn page_done(&self, unchanged: bool) {
        let c = if unchanged { &self.counters.pages_unchanged } else { &self.counters.pages_fetched };
        c.fetch_add(1, Ordering::Relaxed);
        let pages = self.counters.pages_fetched.load(Ordering::Relaxed) + self.counters.pages_unchanged.load(Ordering::Relaxed);
        let errors = self.counters.threads_failed.load(Ordering::Relaxed) + self.counters.parse_errors.load(Ordering::Relaxed);
        self.progress.note("pages", pages, &format!(", errors {errors}"));
    }
}

fn validators(prev: &Option<PageRow>) -> Option<Validators> {
    prev.as_ref().filter(|p| p.has_html && (p.etag.is_some() || p.last_modified.is_some())).map(|p| Validators { etag: p.etag.clone(), last_modified: p.last_modified.clone() })
}

fn unchanged_body(prev: &Option<PageRow>, body: &[u8]) -> bool {
    prev.as_ref().is_some_and(|p| p.has_html && p.content_hash.as_deref() == Some(content_hash(body).as_str()))
}

/// One page fetched against what the store holds: list pages and thread pages go through the
/// same steps (conditional GET from the stored validators, a body identical to the stored one
/// counts as unchanged), and differ only in how they parse and record.
enum PageFetch {
    /// 304, or the same bytes as stored: `page_count` is the stored pagination.
    Unchanged {
        attempts: u32,
        page_count: Option<u32>,
    },
    /// A new or changed body to parse and store.
    Changed(NewPage),
    Missing {
        status: u16,
        attempts: u32,
    },
    Failed {
        status: Option<u16>,
        reason: String,
        attempts: u32,
    },
}

struct NewPage {
    status: u16,
    body: Vec<u8>,
    etag: Option<String>,
    last_modified: Option<String>,
    attempts: u32,
}

impl NewPage {
    /// The store row for this page once parsed.
    fn record<'a>(&'a self, url: &'a Url, kind: PageKind, thread_id: Option<u64>, page_no: u32, page_count: Option<u32>, parse_error: Option<&'a str>) -> PageRecord<'a> {
        PageRecord {
            url: url.as_str(),
            kind,
            thread_id,
            page_no,
            http_status: self.status,
            attempts: self.attempts,
            etag: self.etag.as_deref(),
            last_modified: self.last_modified.as_deref(),
            html: &self.body,
            page_count,
            parse_error,
        }
    }
}

async fn fetch_page(ctx: &Ctx<'_>, url: &Url) -> Result<PageFetch> {
    let prev = ctx.store(|s| s.page(url.as_str()))?;
    let stored_count = || prev.as_ref().and_then(|p| p.page_count);
    Ok(match ctx.fetcher.get(url, validators(&prev).as_ref()).await {
        Fetched::Body { attempts, body, .. } if unchanged_body(&prev, &body) => PageFetch::Unchanged { attempts, page_count: stored_count() },
        Fetched::Body { status, body, etag, last_modified, attempts } => PageFetch::Changed(NewPage { status, body, etag, last_modified, attempts }),
        Fetched::NotModified { attempts } => PageFetch::Unchanged { attempts, page_count: stored_count() },
        Fetched::Missing { status, attempts } => PageFetch::Missing { status, attempts },
        Fetched::Failed { status, reason, attempts } => PageFetch::Failed { status, reason, attempts },
    })
}

/// Crawl the configured subforum into `store`. Stops early (state saved) when `cancel` fires.
pub async fn scrape(settings: &ScrapeSettings, store: &Mutex<Store>, opts: &CrawlOptions, cancel: &CancellationToken) -> Result<CrawlReport> {
    settings.validate()?;
    let started = Instant::now();
    // Posts are stored with their URLs; `keep_urls` applies when the dataset is built.
    let clean = settings.clean_options().for_store();
    {
        let mut guard = store.lock().map_err(|_| anyhow::anyhow!("store lock poisoned"))?;
        reparse::ensure_current(&mut guard, &clean, 0, false).map_err(|e| guard.named(e))?;
    }
    let mut fetcher = Fetcher::new(settings)?;
    let robots = fetch_robots(&fetcher, settings).await?;
    if let Some(delay) = robots.crawl_delay() {
        fetcher.apply_crawl_delay(delay, settings)?;
    }
    let list_base = settings.list_url()?;
    anyhow::ensure!(robots.allowed(&page_url(&list_base, 1)), "robots.txt of {} disallows the thread list {list_base}; not crawling", settings.base_url);

    let ctx = Ctx { settings, clean, store, fetcher, robots, cancel, counters: Counters::default(), progress: Progress::new(opts.progress, 0, "threads") };
    let run = ctx.store(|s| s.start_or_resume_run())?;
    let mut report = CrawlReport { resumed: run.resumed, ..Default::default() };
    if run.resumed {
        tracing::info!(run = run.id, list_pages_done = run.list_pages_done, "resuming an interrupted crawl");
    }

    crawl_list(&ctx, &list_base, run.id, run.list_pages_done, run.list_pages_total, &mut report).await?;

    if !cancel.is_cancelled() {
        if opts.revalidate && !run.resumed {
            let n = ctx.store(|s| s.requeue_all_threads())?;
            tracing::info!(threads = n, "revalidating all known threads");
        }
        let tasks = ctx.store(|s| s.pending_threads())?;
        tracing::info!(threads = tasks.len(), "threads to crawl");
        ctx.progress.set_len(tasks.len() as u64);
        let mut results = stream::iter(tasks).map(|t| crawl_thread(&ctx, t)).buffer_unordered(settings.concurrency);
        while let Some(res) = results.next().await {
            res?;
            ctx.progress.inc(1);
        }
    }
    ctx.progress.finish();
    report.cancelled = cancel.is_cancelled();
    if !report.cancelled {
        ctx.store(|s| s.finish_run(run.id))?;
    }
    let c = &ctx.counters;
    report.threads_crawled = c.threads_crawled.load(Ordering::Relaxed);
    report.threads_failed = c.threads_failed.load(Ordering::Relaxed);
    report.threads_gone = c.threads_gone.load(Ordering::Relaxed);
    report.threads_blocked = c.threads_blocked.load(Ordering::Relaxed);
    report.pages_fetched = c.pages_fetched.load(Ordering::Relaxed);
    report.pages_unchanged = c.pages_unchanged.load(Ordering::Relaxed);
    report.parse_errors = c.parse_errors.load(Ordering::Relaxed);
    report.requests = ctx.fetcher.stats.requests.load(Ordering::Relaxed);
    report.retries = ctx.fetcher.stats.retries.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn fetch_robots(fetcher: &Fetcher, settings: &ScrapeSettings) -> Result<Robots> {
    let url = settings.base()?.join("/robots.txt").context("robots.txt URL")?;
    Ok(match fetcher.get(&url, None).await {
        Fetched::Body { body, .. } => Robots::parse(&String::from_utf8_lossy(&body), &settings.user_agent),
        // RFC 9309: a missing robots.txt (4xx) allows everything; an unreachable one (5xx,
        // network) must be read as "disallow all", so stop rather than crawl blind.
        Fetched::Missing { .. } | Fetched::Failed { status: Some(400..=499), .. } => Robots::allow_all(),
        Fetched::NotModified { .. } => Robots::allow_all(),
        Fetched::Failed { reason, .. } => {
            anyhow::bail!("robots.txt at {url} is unreachable ({reason}); not crawling, as RFC 9309 requires")
        }
    })
}

async fn crawl_list(ctx: &Ctx<'_>, base: &Url, run_id: i64, done: u32, known_total: Option<u32>, report: &mut CrawlReport) -> Result<()> {
    let cap = ctx.settings.max_list_pages;
    let mut total = known_total;
    let mut n = done + 1;
    loop {
        if total.is_some_and(|t| n > t) || n > cap || ctx.cancel.is_cancelled() {
            return Ok(());
        }
        let url = page_url(base, n);
        let mut last_seen = None;
        match fetch_page(ctx, &url).await? {
            PageFetch::Unchanged { attempts, page_count } => {
                ctx.store(|s| s.record_list_page_unchanged(run_id, url.as_str(), n, attempts))?;
                report.list_pages_unchanged += 1;
                last_seen = page_count;
            }
            PageFetch::Changed(page) => {
                let parsed = decode_body(&page.body).and_then(|html| parse_list_page(&html, &url, &ctx.clean));
                let (listed, page_count, parse_error) = match parsed {
                    Ok(p) => {
                        if p.skipped > 0 {
                            tracing::warn!(%url, skipped = p.skipped, "thread entries without link or title");
                        }
                        (p.threads, p.last_page, None)
                    }
                    Err(e) if n == 1 => anyhow::bail!("thread list {url}: {e}"),
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "list page not understood");
                        (Vec::new(), None, Some(e.to_string()))
                    }
                };
                let record = page.record(&url, PageKind::List, None, n, page_count, parse_error.as_deref());
                let outcomes = ctx.store(|s| s.record_list_page(run_id, &record, &listed))?;
                report.list_pages_fetched += 1;
                report.threads_new += outcomes.iter().filter(|o| **o == ListedOutcome::New).count() as u64;
                report.threads_changed += outcomes.iter().filter(|o| **o == ListedOutcome::Changed).count() as u64;
                if listed.is_empty() && parse_error.is_none() {
                    // An empty list page: we are past the last one.
                    return ctx.store(|s| s.set_run_list_total(run_id, n));
                }
                last_seen = page_count;
            }
            PageFetch::Missing { status, attempts } => {
                anyhow::ensure!(n > 1, "thread list {url} not found (HTTP {status}): check scrape.base_url and scrape.subforum_path");
                ctx.store(|s| {
                    s.record_page_failure(&PageFailure {
                        url: url.as_str(),
                        kind: PageKind::List,
                        thread_id: None,
                        page_no: n,
                        http_status: Some(status),
                        attempts,
                        error: "not found",
                    })
                })?;
                total = Some(n - 1);
            }
            PageFetch::Failed { status, reason, attempts } => {
                anyhow::ensure!(n > 1, "thread list {url}: {reason}");
                tracing::warn!(%url, %reason, "list page failed; its threads are not updated this run");
                ctx.store(|s| {
                    s.record_page_failure(&PageFailure { url: url.as_str(), kind: PageKind::List, thread_id: None, page_no: n, http_status: status, attempts, error: &reason })
                })?;
            }
        }
        // Pagination often shows a window of pages, so the known total can grow as we go.
        let seen = last_seen.unwrap_or(n).min(cap);
        let new_total = match total {
            Some(t) if t < n => t,
            Some(t) => t.max(seen),
            None => seen,
        };
        if total != Some(new_total) {
            total = Some(new_total);
            ctx.store(|s| s.set_run_list_total(run_id, new_total))?;
        }
        n += 1;
    }
}

async fn crawl_thread(ctx: &Ctx<'_>, task: ThreadTask) -> Result<()> {
    let base = Url::parse(&task.url).with_context(|| format!("thread {} has a bad stored URL {:?}", task.id, task.url))?;
    let cap = ctx.settings.max_pages_per_thread;
    let mut p = task.next_page.max(1);
    let mut count = task.page_count;
    if !ctx.robots.allowed(&page_url(&base, 1)) {
        if task.status != ThreadStatus::Blocked {
            tracing::info!(thread = task.id, url = %base, "disallowed by robots.txt; skipping");
        }
        ctx.counters.threads_blocked.fetch_add(1, Ordering::Relaxed);
        return ctx.store(|s| s.finish_thread(task.id, ThreadStatus::Blocked, Some("disallowed by robots.txt"), None));
    }
    loop {
        let last = count.map(|c| c.min(cap));
        if last.is_some_and(|l| p > l) || p > cap {
            ctx.counters.threads_crawled.fetch_add(1, Ordering::Relaxed);
            return ctx.store(|s| s.finish_thread(task.id, ThreadStatus::Done, None, Some(last.unwrap_or(cap).min(p - 1))));
        }
        if ctx.cancel.is_cancelled() {
            return Ok(());
        }
        let url = page_url(&base, p);
        if !ctx.robots.allowed(&url) {
            tracing::info!(%url, "page disallowed by robots.txt; thread ends before it");
            ctx.counters.threads_crawled.fetch_add(1, Ordering::Relaxed);
            return ctx.store(|s| s.finish_thread(task.id, ThreadStatus::Done, None, Some(p - 1)));
        }
        match fetch_page(ctx, &url).await? {
            PageFetch::Unchanged { attempts, page_count } => {
                ctx.store(|s| s.record_thread_page_unchanged(url.as_str(), task.id, p, attempts))?;
                count = page_count.or(count).or(Some(p));
                ctx.page_done(true);
            }
            PageFetch::Changed(page) => {
                // Parse before touching the store: the DOM is not Send and must not live
                // across an await.
                let parsed = decode_body(&page.body).and_then(|html| parse_thread_page(&html, &url, &ctx.clean));
                let (posts, page_count, parse_error) = match parsed {
                    Ok(tp) => (tp.posts, tp.last_page, None),
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "parse error; raw page kept");
                        ctx.counters.parse_errors.fetch_add(1, Ordering::Relaxed);
                        (Vec::new(), None, Some(e.to_string()))
                    }
                };
                let record = page.record(&url, PageKind::Thread, Some(task.id), p, page_count, parse_error.as_deref());
                ctx.store(|s| s.record_thread_page(&record, &posts))?;
                count = page_count.or(count).or(Some(p));
                ctx.page_done(false);
            }
            PageFetch::Missing { status, attempts } => {
                if p == 1 {
                    ctx.store(|s| {
                        s.record_page_failure(&PageFailure {
                            url: url.as_str(),
                            kind: PageKind::Thread,
                            thread_id: Some(task.id),
                            page_no: p,
                            http_status: Some(status),
                            attempts,
                            error: "not found",
                        })?;
                        s.finish_thread(task.id, ThreadStatus::Gone, Some(&format!("HTTP {status}")), None)
                    })?;
                    ctx.counters.threads_gone.fetch_add(1, Ordering::Relaxed);
                } else {
                    // The thread got shorter than its pagination said.
                    ctx.store(|s| s.finish_thread(task.id, ThreadStatus::Done, None, Some(p - 1)))?;
                    ctx.counters.threads_crawled.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            PageFetch::Failed { status, reason, attempts } => {
                tracing::warn!(%url, %reason, "giving up on thread for this run");
                let why = format!("page {p}: {reason}");
                ctx.store(|s| {
                    s.record_page_failure(&PageFailure {
                        url: url.as_str(),
                        kind: PageKind::Thread,
                        thread_id: Some(task.id),
                        page_no: p,
                        http_status: status,
                        attempts,
                        error: &reason,
                    })?;
                    s.finish_thread(task.id, ThreadStatus::Failed, Some(&why), None)
                })?;
                ctx.counters.threads_failed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        p += 1;
    }
}
