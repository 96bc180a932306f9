//! Rebuild posts from the stored raw HTML, without the network: after the cleaner changes
//! (see [`CleanOptions::fingerprint`]) or for the parse benchmark. Streams the pages in
//! bounded batches and parses each batch on a rayon pool.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rayon::prelude::*;
use url::Url;

use super::clean::CleanOptions;
use super::parse::{decode_body, parse_thread_page};
use super::progress::Progress;
use crate::store::forum::decompress;
use crate::store::{RawPage, Store, StoredPost};

/// Meta key holding the fingerprint of the cleaning that produced the stored posts.
pub const FINGERPRINT_KEY: &str = "cleaner_fingerprint";

/// Pages parsed per batch: enough to keep every core busy, small enough to bound memory.
const BATCH: usize = 256;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReparseReport {
    pub pages: u64,
    pub posts: u64,
    pub parse_errors: u64,
    pub html_bytes: u64,
    pub elapsed: Duration,
}

impl ReparseReport {
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Re-parse if the stored posts were made by other cleaning settings (or none were recorded
/// while pages exist). Returns the report when it did.
pub fn ensure_current(store: &mut Store, clean: &CleanOptions, jobs: usize, progress: bool) -> Result<Option<ReparseReport>> {
    let clean = &clean.for_store();
    let want = clean.fingerprint();
    let have = store.meta_get(FINGERPRINT_KEY)?;
    if have.as_deref() == Some(want.as_str()) {
        return Ok(None);
    }
    if store.raw_thread_page_count()? == 0 {
        store.meta_set(FINGERPRINT_KEY, &want)?;
        return Ok(None);
    }
    tracing::info!(stored = have.as_deref().unwrap_or("none"), current = %want, "cleaning changed; re-parsing stored pages");
    reparse_all(store, clean, jobs, progress).map(Some)
}

type ParsedBatch = Vec<(RawPage, std::result::Result<Vec<StoredPost>, String>)>;

/// Parse every stored thread page again and replace its posts. `jobs` = 0 uses all cores.
pub fn reparse_all(store: &mut Store, clean: &CleanOptions, jobs: usize, progress: bool) -> Result<ReparseReport> {
    let clean = &clean.for_store();
    let started = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs).build().context("starting parse threads")?;
    let total = store.raw_thread_page_count()?;
    let bar = Progress::new(progress, total, "pages");
    let mut report = ReparseReport::default();
    let mut after = 0i64;
    // Parse batch k+1 while batch k is written: SQLite writes are single-threaded, parsing
    // is not, so overlapping them keeps the cores busy.
    let mut written: Option<ParsedBatch> = None;
    loop {
        let batch = store.raw_thread_pages(after, BATCH)?;
        if let Some(last) = batch.last() {
            after = last.rowid;
        }
        let done = batch.is_empty();
        let to_write = written.take();
        let (parsed, write) = pool.install(|| {
            rayon::join(
                || batch.into_par_iter().map(|page| parse_raw(page, clean)).collect::<Vec<_>>(),
                || match &to_write {
                    Some(results) => store.replace_parsed(results).map(|()| results.len()),
                    None => Ok(0),
                },
            )
        });
        let n = write?;
        bar.inc(n as u64);
        bar.note("posts", report.posts, "");
        if done {
            break;
        }
        let mut results = Vec::with_capacity(parsed.len());
        for (page, result, bytes) in parsed {
            report.pages += 1;
            report.html_bytes += bytes;
            match &result {
                Ok(posts) => report.posts += posts.len() as u64,
                Err(_) => report.parse_errors += 1,
            }
            results.push((page, result));
        }
        written = Some(results);
    }
    bar.finish();
    store.meta_set(FINGERPRINT_KEY, &clean.fingerprint())?;
    report.elapsed = started.elapsed();
    Ok(report)
}

fn parse_raw(mut page: RawPage, clean: &CleanOptions) -> (RawPage, std::result::Result<Vec<StoredPost>, String>, u64) {
    let html = match decompress(&page.html_zstd) {
        Ok(h) => h,
        Err(e) => return (page, Err(format!("{e:#}")), 0),
    };
    page.html_zstd = Vec::new(); // not needed any more; keep the batch small
    let bytes = html.len() as u64;
    let result = Url::parse(&page.url)
        .map_err(|e| format!("stored URL {:?}: {e}", page.url))
        .and_then(|url| decode_body(&html).and_then(|text| parse_thread_page(&text, &url, clean)).map_err(|e| e.to_string()))
        .map(|tp| tp.posts);
    (page, result, bytes)
}
