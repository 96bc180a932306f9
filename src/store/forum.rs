//! Forum crawl state: runs, threads, pages (with compressed raw HTML) and parsed posts.
//!
//! Every page is stored in one transaction together with the crawl progress it represents
//! (`threads.next_page`, `crawl_runs.list_pages_done`), so an interrupted crawl loses at most
//! the pages that were in flight and a restart continues exactly where the store says.

use std::io::Read;

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::Store;
use crate::util::clock::now_secs;

/// zstd level for raw HTML: fast to write, ~8x smaller than the page.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadStatus {
    /// Listed, with pages still to fetch (`next_page` says from where).
    Pending,
    Done,
    /// A page gave up after retries; retried by the next run.
    Failed,
    /// The forum answered 404/410: deleted; its posts stay out of datasets.
    Gone,
    /// robots.txt forbids it; never requested.
    Blocked,
}

impl ThreadStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Gone => "gone",
            Self::Blocked => "blocked",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => Self::Pending,
            "done" => Self::Done,
            "failed" => Self::Failed,
            "gone" => Self::Gone,
            "blocked" => Self::Blocked,
            other => anyhow::bail!("unknown thread status {other:?} in store"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    List,
    Thread,
}

impl PageKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Thread => "thread",
        }
    }
}

/// A `scrape` invocation; unfinished ones are resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrawlRun {
    pub id: i64,
    pub resumed: bool,
    pub list_pages_total: Option<u32>,
    pub list_pages_done: u32,
}

/// What the thread list said about a thread compared with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListedOutcome {
    New,
    Changed,
    Unchanged,
}

/// A thread as seen on a list page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedThread {
    pub id: u64,
    pub url: String,
    pub title: String,
    pub signature: String,
}

/// A thread with pages to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadTask {
    pub id: u64,
    pub url: String,
    pub title: String,
    pub status: ThreadStatus,
    pub next_page: u32,
    pub page_count: Option<u32>,
}

/// A successfully fetched page (HTTP 200) to store.
#[derive(Debug, Clone)]
pub struct PageRecord<'a> {
    pub url: &'a str,
    pub kind: PageKind,
    pub thread_id: Option<u64>,
    pub page_no: u32,
    pub http_status: u16,
    pub attempts: u32,
    pub etag: Option<&'a str>,
    pub last_modified: Option<&'a str>,
    /// Raw body as received; stored compressed.
    pub html: &'a [u8],
    pub page_count: Option<u32>,
    pub parse_error: Option<&'a str>,
}

/// A fetch that ended without a usable body.
#[derive(Debug, Clone, Copy)]
pub struct PageFailure<'a> {
    pub url: &'a str,
    pub kind: PageKind,
    pub thread_id: Option<u64>,
    pub page_no: u32,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub error: &'a str,
}

/// One parsed post of a thread page.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredPost {
    pub position: u32,
    pub post_id: Option<String>,
    pub author: Option<String>,
    pub posted_at: Option<String>,
    pub body: String,
    pub quotes: Vec<String>,
}

/// What the store knows about one page URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRow {
    pub url: String,
    pub thread_id: Option<u64>,
    pub page_no: u32,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub content_hash: Option<String>,
    pub has_html: bool,
    pub page_count: Option<u32>,
    pub fetch_error: Option<String>,
    pub parse_error: Option<String>,
}

/// A stored thread page still compressed, for re-parsing.
#[derive(Debug, Clone)]
pub struct RawPage {
    pub rowid: i64,
    pub url: String,
    pub thread_id: u64,
    pub page_no: u32,
    pub html_zstd: Vec<u8>,
}

/// A thread and all its posts in page order, as the dataset builder reads them.
#[derive(Debug, Clone)]
pub struct ThreadPosts {
    pub id: u64,
    pub title: String,
    pub posts: Vec<(u32, StoredPost)>,
}

/// Totals for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForumCounts {
    pub threads: u64,
    pub threads_done: u64,
    pub threads_failed: u64,
    pub threads_gone: u64,
    pub threads_blocked: u64,
    pub threads_pending: u64,
    pub pages: u64,
    pub pages_with_html: u64,
    pub parse_errors: u64,
    pub posts: u64,
}

pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn compress(bytes: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(bytes, ZSTD_LEVEL).context("compressing page")
}

pub fn decompress(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() * 6);
    zstd::stream::Decoder::new(bytes).and_then(|mut d| d.read_to_end(&mut out)).context("decompressing stored page")?;
    Ok(out)
}

fn opt_u32(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn id_i64(id: u64) -> Result<i64> {
    i64::try_from(id).with_context(|| format!("id {id} does not fit the store"))
}

fn page_row(r: &Row<'_>) -> rusqlite::Result<PageRow> {
    Ok(PageRow {
        url: r.get(0)?,
        thread_id: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
        page_no: r.get::<_, i64>(2)? as u32,
        http_status: r.get::<_, Option<i64>>(3)?.map(|v| v as u16),
        attempts: r.get::<_, i64>(4)? as u32,
        etag: r.get(5)?,
        last_modified: r.get(6)?,
        content_hash: r.get(7)?,
        has_html: r.get(8)?,
        page_count: opt_u32(r.get(9)?),
        fetch_error: r.get(10)?,
        parse_error: r.get(11)?,
    })
}

fn insert_posts(tx: &rusqlite::Connection, thread_id: i64, page_no: u32, posts: &[StoredPost]) -> Result<()> {
    tx.execute("DELETE FROM posts WHERE thread_id = ?1 AND page_no = ?2", params![thread_id, page_no])?;
    let mut ins = tx.prepare_cached("INSERT INTO posts(thread_id, page_no, position, post_id, author, posted_at, body, quotes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
    for p in posts {
        let quotes = serde_json::to_string(&p.quotes)?;
        ins.execute(params![thread_id, page_no, p.position, p.post_id, p.author, p.posted_at, p.body, quotes])
            .with_context(|| format!("storing post {} of thread {thread_id} page {page_no}", p.position))?;
    }
    Ok(())
}

fn upsert_page(tx: &rusqlite::Connection, page: &PageRecord<'_>, now: i64) -> Result<()> {
    let html = compress(page.html)?;
    let thread_id = page.thread_id.map(id_i64).transpose()?;
    tx.execute(
        "INSERT INTO pages(url, kind, thread_id, page_no, http_status, fetched_at, attempts, etag, last_modified, content_hash, html, page_count, fetch_error, parse_error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, ?13)
         ON CONFLICT(url) DO UPDATE SET kind = excluded.kind, thread_id = excluded.thread_id, page_no = excluded.page_no,
           http_status = excluded.http_status, fetched_at = excluded.fetched_at, attempts = excluded.attempts,
           etag = excluded.etag, last_modified = excluded.last_modified, content_hash = excluded.content_hash,
           html = excluded.html, page_count = excluded.page_count, fetch_error = NULL, parse_error = excluded.parse_error",
        params![
            page.url,
            page.kind.as_str(),
            thread_id,
            page.page_no,
            page.http_status,
            now,
            page.attempts,
            page.etag,
            page.last_modified,
            content_hash(page.html),
            html,
            page.page_count,
            page.parse_error
        ],
    )
    .with_context(|| format!("storing page {}", page.url))?;
    Ok(())
}

impl Store {
    /// Resume the latest unfinished run, or start a new one.
    pub fn start_or_resume_run(&self) -> Result<CrawlRun> {
        let open = self
            .conn()
            .query_row("SELECT id, list_pages_total, list_pages_done FROM crawl_runs WHERE finished_at IS NULL ORDER BY id DESC LIMIT 1", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, i64>(2)?))
            })
            .optional()?;
        if let Some((id, total, done)) = open {
            return Ok(CrawlRun { id, resumed: true, list_pages_total: opt_u32(total), list_pages_done: done as u32 });
        }
        self.conn().execute("INSERT INTO crawl_runs(started_at) VALUES (?1)", [now_secs()])?;
        Ok(CrawlRun { id: self.conn().last_insert_rowid(), resumed: false, list_pages_total: None, list_pages_done: 0 })
    }

    pub fn set_run_list_total(&self, run_id: i64, total: u32) -> Result<()> {
        self.conn().execute("UPDATE crawl_runs SET list_pages_total = ?2 WHERE id = ?1", params![run_id, total])?;
        Ok(())
    }

    pub fn finish_run(&self, run_id: i64) -> Result<()> {
        self.conn().execute("UPDATE crawl_runs SET finished_at = ?2 WHERE id = ?1", params![run_id, now_secs()])?;
        Ok(())
    }

    pub fn page(&self, url: &str) -> Result<Option<PageRow>> {
        self.conn()
            .query_row(
                "SELECT url, thread_id, page_no, http_status, attempts, etag, last_modified, content_hash, html IS NOT NULL, page_count, fetch_error, parse_error
                 FROM pages WHERE url = ?1",
                [url],
                page_row,
            )
            .optional()
            .with_context(|| format!("reading page {url}"))
    }

    /// All page rows, ordered by URL (tests compare whole stores with this).
    pub fn pages(&self) -> Result<Vec<PageRow>> {
        let mut st = self.conn().prepare(
            "SELECT url, thread_id, page_no, http_status, attempts, etag, last_modified, content_hash, html IS NOT NULL, page_count, fetch_error, parse_error
             FROM pages ORDER BY url",
        )?;
        let rows = st.query_map([], page_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The raw (decompressed) body stored for `url`.
    pub fn page_html(&self, url: &str) -> Result<Option<Vec<u8>>> {
        let blob: Option<Option<Vec<u8>>> = self.conn().query_row("SELECT html FROM pages WHERE url = ?1", [url], |r| r.get(0)).optional()?;
        blob.flatten().map(|b| decompress(&b)).transpose().with_context(|| format!("page {url}"))
    }

    /// Store a list page and what it lists, and count it done for `run_id`, atomically.
    pub fn record_list_page(&mut self, run_id: i64, page: &PageRecord<'_>, listed: &[ListedThread]) -> Result<Vec<ListedOutcome>> {
        let now = now_secs();
        let tx = self.conn_mut().transaction()?;
        upsert_page(&tx, page, now)?;
        let mut outcomes = Vec::with_capacity(listed.len());
        for t in listed {
            outcomes.push(upsert_listed(&tx, t, now)?);
        }
        tx.execute("UPDATE crawl_runs SET list_pages_done = MAX(list_pages_done, ?2) WHERE id = ?1", params![run_id, page.page_no])?;
        tx.commit()?;
        Ok(outcomes)
    }

    /// A list page answered 304 (or came back byte-identical): nothing it lists changed.
    pub fn record_list_page_unchanged(&self, run_id: i64, url: &str, page_no: u32, attempts: u32) -> Result<()> {
        let tx = self.conn().unchecked_transaction()?;
        tx.execute("UPDATE pages SET fetched_at = ?2, attempts = ?3, fetch_error = NULL WHERE url = ?1", params![url, now_secs(), attempts])?;
        tx.execute("UPDATE crawl_runs SET list_pages_done = MAX(list_pages_done, ?2) WHERE id = ?1", params![run_id, page_no])?;
        tx.commit()?;
        Ok(())
    }

    /// Store a thread page with its posts and advance the thread past it, atomically.
    pub fn record_thread_page(&mut self, page: &PageRecord<'_>, posts: &[StoredPost]) -> Result<()> {
        let thread_id = id_i64(page.thread_id.context("thread page without thread id")?)?;
        let now = now_secs();
        let tx = self.conn_mut().transaction()?;
        upsert_page(&tx, page, now)?;
        insert_posts(&tx, thread_id, page.page_no, posts)?;
        tx.execute("UPDATE threads SET next_page = ?2, page_count = COALESCE(?3, page_count) WHERE id = ?1", params![thread_id, page.page_no + 1, page.page_count])?;
        tx.commit()?;
        Ok(())
    }

    /// A thread page answered 304 or came back identical: keep its posts, advance the thread.
    pub fn record_thread_page_unchanged(&self, url: &str, thread_id: u64, page_no: u32, attempts: u32) -> Result<()> {
        let tx = self.conn().unchecked_transaction()?;
        tx.execute("UPDATE pages SET fetched_at = ?2, attempts = ?3, fetch_error = NULL WHERE url = ?1", params![url, now_secs(), attempts])?;
        tx.execute(
            "UPDATE threads SET next_page = ?2, page_count = COALESCE((SELECT page_count FROM pages WHERE url = ?3), page_count) WHERE id = ?1",
            params![id_i64(thread_id)?, page_no + 1, url],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A fetch that gave up: keep any earlier good copy of the page, record why.
    pub fn record_page_failure(&self, f: &PageFailure<'_>) -> Result<()> {
        let PageFailure { url, kind, thread_id, page_no, http_status, attempts, error } = *f;
        let thread_id = thread_id.map(id_i64).transpose()?;
        self.conn()
            .execute(
                "INSERT INTO pages(url, kind, thread_id, page_no, http_status, fetched_at, attempts, fetch_error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(url) DO UPDATE SET http_status = excluded.http_status, fetched_at = excluded.fetched_at,
                   attempts = excluded.attempts, fetch_error = excluded.fetch_error",
                params![url, kind.as_str(), thread_id, page_no, http_status, now_secs(), attempts, error],
            )
            .with_context(|| format!("recording failure of {url}"))?;
        Ok(())
    }

    /// Close a thread's crawl. For `Done` with a known last page, pages past it (the thread got
    /// shorter, or `max_pages_per_thread` shrank) are dropped with their posts.
    pub fn finish_thread(&self, id: u64, status: ThreadStatus, error: Option<&str>, last_page: Option<u32>) -> Result<()> {
        let id = id_i64(id)?;
        let tx = self.conn().unchecked_transaction()?;
        tx.execute("UPDATE threads SET status = ?2, error = ?3, crawled_at = ?4 WHERE id = ?1", params![id, status.as_str(), error, now_secs()])?;
        if let (ThreadStatus::Done, Some(last)) = (status, last_page) {
            tx.execute("DELETE FROM posts WHERE thread_id = ?1 AND page_no > ?2", params![id, last])?;
            tx.execute("DELETE FROM pages WHERE thread_id = ?1 AND page_no > ?2", params![id, last])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Threads with work to do: pending, failed last time, or blocked (robots.txt may have
    /// changed; the crawler checks again before any request).
    pub fn pending_threads(&self) -> Result<Vec<ThreadTask>> {
        let mut st = self.conn().prepare("SELECT id, url, title, status, next_page, page_count FROM threads WHERE status IN ('pending', 'failed', 'blocked') ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, i64>(4)?, r.get(5)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, url, title, status, next_page, page_count) = row?;
            out.push(ThreadTask { id: id as u64, url, title, status: ThreadStatus::parse(&status)?, next_page: next_page.max(1) as u32, page_count: opt_u32(page_count) });
        }
        Ok(out)
    }

    /// Queue every finished thread again from page 1 (conditional GETs keep this cheap).
    pub fn requeue_all_threads(&self) -> Result<usize> {
        Ok(self.conn().execute("UPDATE threads SET status = 'pending', next_page = 1 WHERE status IN ('done', 'failed')", [])?)
    }

    pub fn thread_status(&self, id: u64) -> Result<Option<(ThreadStatus, Option<String>)>> {
        let row: Option<(String, Option<String>)> =
            self.conn().query_row("SELECT status, error FROM threads WHERE id = ?1", [id_i64(id)?], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        row.map(|(s, e)| Ok((ThreadStatus::parse(&s)?, e))).transpose()
    }

    /// Posts of one thread in page order.
    pub fn thread_posts(&self, id: u64) -> Result<Vec<(u32, StoredPost)>> {
        let mut st = self.conn().prepare("SELECT page_no, position, post_id, author, posted_at, body, quotes FROM posts WHERE thread_id = ?1 ORDER BY page_no, position")?;
        let rows = st.query_map([id_i64(id)?], post_row)?;
        rows.map(|r| r.map_err(anyhow::Error::from).and_then(|(p, post, q)| Ok((p, with_quotes(post, &q)?)))).collect()
    }

    /// Stream every thread that is not gone, with its posts, in thread-id order; memory holds
    /// one thread at a time.
    /// Errors reading the store name its file; errors of `f` pass through as they are.
    pub fn for_each_thread(&self, mut f: impl FnMut(ThreadPosts) -> Result<()>) -> Result<()> {
        let db = |e: rusqlite::Error| self.named(e.into());
        let mut st = self
            .conn()
            .prepare(
                "SELECT p.thread_id, t.title, p.page_no, p.position, p.post_id, p.author, p.posted_at, p.body, p.quotes
             FROM posts p JOIN threads t ON t.id = p.thread_id
             WHERE t.status NOT IN ('gone', 'blocked')
             ORDER BY p.thread_id, p.page_no, p.position",
            )
            .map_err(db)?;
        let mut rows = st.query([]).map_err(db)?;
        let mut current: Option<ThreadPosts> = None;
        while let Some(r) = rows.next().map_err(db)? {
            let id = r.get::<_, i64>(0).map_err(db)? as u64;
            if current.as_ref().is_some_and(|c| c.id != id) {
                if let Some(done) = current.take() {
                    f(done)?;
                }
            }
            let cur = current.get_or_insert_with(|| ThreadPosts { id, title: String::new(), posts: Vec::new() });
            if cur.posts.is_empty() {
                cur.title = r.get(1).map_err(db)?;
            }
            let page_no = r.get::<_, i64>(2).map_err(db)? as u32;
            let quotes: String = r.get(8).map_err(db)?;
            let post = StoredPost {
                position: r.get::<_, i64>(3).map_err(db)? as u32,
                post_id: r.get(4).map_err(db)?,
                author: r.get(5).map_err(db)?,
                posted_at: r.get(6).map_err(db)?,
                body: r.get(7).map_err(db)?,
                quotes: Vec::new(),
            };
            cur.posts.push((page_no, with_quotes(post, &quotes).map_err(|e| self.named(e))?));
        }
        if let Some(done) = current {
            f(done)?;
        }
        Ok(())
    }

    /// Up to `limit` stored thread pages with a body, after `after_rowid`, for re-parsing in
    /// bounded batches.
    pub fn raw_thread_pages(&self, after_rowid: i64, limit: usize) -> Result<Vec<RawPage>> {
        let mut st = self.conn().prepare_cached(
            "SELECT rowid, url, thread_id, page_no, html FROM pages
             WHERE kind = 'thread' AND html IS NOT NULL AND rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let rows = st.query_map(params![after_rowid, limit as i64], |r| {
            Ok(RawPage { rowid: r.get(0)?, url: r.get(1)?, thread_id: r.get::<_, i64>(2)? as u64, page_no: r.get::<_, i64>(3)? as u32, html_zstd: r.get(4)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn raw_thread_page_count(&self) -> Result<u64> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM pages WHERE kind = 'thread' AND html IS NOT NULL", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Replace the posts of re-parsed pages in one transaction.
    pub fn replace_parsed(&mut self, parsed: &[(RawPage, std::result::Result<Vec<StoredPost>, String>)]) -> Result<()> {
        let tx = self.conn_mut().transaction()?;
        for (page, result) in parsed {
            let tid = id_i64(page.thread_id)?;
            match result {
                Ok(posts) => {
                    insert_posts(&tx, tid, page.page_no, posts)?;
                    tx.execute("UPDATE pages SET parse_error = NULL WHERE rowid = ?1", [page.rowid])?;
                }
                Err(reason) => {
                    tx.execute("DELETE FROM posts WHERE thread_id = ?1 AND page_no = ?2", params![tid, page.page_no])?;
                    tx.execute("UPDATE pages SET parse_error = ?2 WHERE rowid = ?1", params![page.rowid, reason])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn forum_counts(&self) -> Result<ForumCounts> {
        let c = self.conn();
        let one = |sql: &str| -> Result<u64> { Ok(c.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64) };
        let status = |s: &str| -> Result<u64> { Ok(c.query_row("SELECT COUNT(*) FROM threads WHERE status = ?1", [s], |r| r.get::<_, i64>(0))? as u64) };
        Ok(ForumCounts {
            threads: one("SELECT COUNT(*) FROM threads")?,
            threads_done: status("done")?,
            threads_failed: status("failed")?,
            threads_gone: status("gone")?,
            threads_blocked: status("blocked")?,
            threads_pending: status("pending")?,
            pages: one("SELECT COUNT(*) FROM pages")?,
            pages_with_html: one("SELECT COUNT(*) FROM pages WHERE html IS NOT NULL")?,
            parse_errors: one("SELECT COUNT(*) FROM pages WHERE parse_error IS NOT NULL")?,
            posts: one("SELECT COUNT(*) FROM posts")?,
        })
    }

    /// Insert a thread as already listed (used by the synthetic bench store and tests).
    pub fn insert_thread(&self, t: &ListedThread, status: ThreadStatus, page_count: Option<u32>) -> Result<()> {
        let now = now_secs();
        self.conn().execute(
            "INSERT INTO threads(id, url, title, list_signature, status, next_page, page_count, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?7)",
            params![id_i64(t.id)?, t.url, t.title, t.signature, status.as_str(), page_count, now],
        )?;
        Ok(())
    }

    /// Store a raw page without touching crawl progress (synthetic stores).
    /// Use inside [`Store::in_transaction`] for bulk loads.
    pub fn insert_raw_page(&self, page: &PageRecord<'_>) -> Result<()> {
        upsert_page(self.conn(), page, now_secs())
    }

    /// Run `f` inside one transaction (bulk inserts).
    pub fn in_transaction<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        self.conn().execute_batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.conn().execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn().execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

fn upsert_listed(tx: &rusqlite::Transaction<'_>, t: &ListedThread, now: i64) -> Result<ListedOutcome> {
    let id = id_i64(t.id)?;
    let known: Option<(String, String)> = tx.query_row("SELECT status, list_signature FROM threads WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    let Some((status, signature)) = known else {
        tx.execute(
            "INSERT INTO threads(id, url, title, list_signature, status, next_page, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, 'pending', 1, ?5, ?5)",
            params![id, t.url, t.title, t.signature, now],
        )?;
        return Ok(ListedOutcome::New);
    };
    tx.execute("UPDATE threads SET url = ?2, title = ?3, last_seen = ?4 WHERE id = ?1", params![id, t.url, t.title, now])?;
    if signature == t.signature {
        return Ok(ListedOutcome::Unchanged);
    }
    // New replies land on the last page (or new ones after it): resume from the last page we
    // hold; conditional GETs make any unchanged page cheap anyway. A finished thread that has
    // more pages than we hold was cut at max_pages_per_thread: its new replies lie beyond the
    // cut, so start past the last page held and the crawler fetches nothing.
    let (held, count): (Option<i64>, Option<i64>) =
        tx.query_row("SELECT (SELECT MAX(page_no) FROM pages WHERE thread_id = ?1 AND html IS NOT NULL), page_count FROM threads WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let from = match (held, count) {
        (Some(h), Some(c)) if status == "done" && c > h => Some(h + 1),
        _ => held,
    };
    let keep_status = if status == "blocked" { "blocked" } else { "pending" };
    tx.execute("UPDATE threads SET list_signature = ?2, status = ?3, next_page = ?4 WHERE id = ?1", params![id, t.signature, keep_status, from.unwrap_or(1).max(1)])?;
    Ok(ListedOutcome::Changed)
}

type PostParts = (u32, StoredPost, String);

fn post_row(r: &Row<'_>) -> rusqlite::Result<PostParts> {
    Ok((
        r.get::<_, i64>(0)? as u32,
        StoredPost { position: r.get::<_, i64>(1)? as u32, post_id: r.get(2)?, author: r.get(3)?, posted_at: r.get(4)?, body: r.get(5)?, quotes: Vec::new() },
        r.get(6)?,
    ))
}

fn with_quotes(mut post: StoredPost, json: &str) -> Result<StoredPost> {
    post.quotes = serde_json::from_str(json).context("stored quotes are not a JSON string array")?;
    Ok(post)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: u64, sig: &str) -> ListedThread {
        ListedThread { id, url: format!("http://f/forum/thread/{id}/t"), title: format!("T{id}"), signature: sig.into() }
    }

    fn page<'a>(url: &'a str, thread: Option<u64>, page_no: u32, html: &'a [u8]) -> PageRecord<'a> {
        PageRecord {
            url,
            kind: if thread.is_some() { PageKind::Thread } else { PageKind::List },
            thread_id: thread,
            page_no,
            http_status: 200,
            attempts: 1,
            etag: Some("\"e\""),
            last_modified: None,
            html,
            page_count: Some(2),
            parse_error: None,
        }
    }

    #[test]
    fn thread_lifecycle_new_changed_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        let run = s.start_or_resume_run().unwrap();
        assert!(!run.resumed);
        let out = s.record_list_page(run.id, &page("http://f/l?page=1", None, 1, b"<html>"), &[listed(7, "3 replies")]).unwrap();
        assert_eq!(out, vec![ListedOutcome::New]);
        // An interrupted run is resumed with its progress.
        let again = s.start_or_resume_run().unwrap();
        assert!(again.resumed);
        assert_eq!(again.list_pages_done, 1);

        let tasks = s.pending_threads().unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].next_page, 1);
        let post = StoredPost { position: 0, body: "hello".into(), quotes: vec!["q".into()], ..Default::default() };
        s.record_thread_page(&page("http://f/forum/thread/7/t?page=1", Some(7), 1, b"<p>1</p>"), std::slice::from_ref(&post)).unwrap();
        s.record_thread_page(&page("http://f/forum/thread/7/t?page=2", Some(7), 2, b"<p>2</p>"), &[]).unwrap();
        s.finish_thread(7, ThreadStatus::Done, None, Some(2)).unwrap();
        assert!(s.pending_threads().unwrap().is_empty());
        assert_eq!(s.thread_posts(7).unwrap(), vec![(1, post)]);
        assert_eq!(s.page_html("http://f/forum/thread/7/t?page=2").unwrap().unwrap(), b"<p>2</p>");
        s.finish_run(run.id).unwrap();

        let run2 = s.start_or_resume_run().unwrap();
        assert!(!run2.resumed);
        let out = s.record_list_page(run2.id, &page("http://f/l?page=1", None, 1, b"<html>"), &[listed(7, "3 replies")]).unwrap();
        assert_eq!(out, vec![ListedOutcome::Unchanged]);
        let out = s.record_list_page(run2.id, &page("http://f/l?page=1", None, 1, b"<html>"), &[listed(7, "5 replies")]).unwrap();
        assert_eq!(out, vec![ListedOutcome::Changed]);
        let tasks = s.pending_threads().unwrap();
        // Resumes at the last page held, where new replies appear.
        assert_eq!(tasks[0].next_page, 2);
    }

    #[test]
    fn failure_keeps_good_copy_and_shrinking_thread_drops_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        s.insert_thread(&listed(1, "x"), ThreadStatus::Pending, None).unwrap();
        let url = "http://f/forum/thread/1/t?page=1";
        let p = StoredPost { position: 0, body: "b".into(), ..Default::default() };
        s.record_thread_page(&page(url, Some(1), 1, b"good"), std::slice::from_ref(&p)).unwrap();
        s.record_thread_page(&page("http://f/forum/thread/1/t?page=2", Some(1), 2, b"two"), &[p]).unwrap();
        s.record_page_failure(&PageFailure { url, kind: PageKind::Thread, thread_id: Some(1), page_no: 1, http_status: Some(503), attempts: 4, error: "gave up" }).unwrap();
        let row = s.page(url).unwrap().unwrap();
        assert_eq!(row.fetch_error.as_deref(), Some("gave up"));
        assert!(row.has_html);
        assert_eq!(s.page_html(url).unwrap().unwrap(), b"good");
        s.finish_thread(1, ThreadStatus::Done, None, Some(1)).unwrap();
        assert_eq!(s.thread_posts(1).unwrap().len(), 1);
        assert!(s.page("http://f/forum/thread/1/t?page=2").unwrap().is_none());
    }

    #[test]
    fn a_broken_row_read_while_streaming_names_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut s = Store::open(&path).unwrap();
        s.insert_thread(&listed(1, "x"), ThreadStatus::Pending, None).unwrap();
        let p = StoredPost { position: 0, body: "b".into(), ..Default::default() };
        s.record_thread_page(&page("http://f/forum/thread/1/t?page=1", Some(1), 1, b"good"), &[p]).unwrap();
        s.conn().execute("UPDATE posts SET quotes = 'not json'", []).unwrap();
        let err = s.for_each_thread(|_| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains(&path.display().to_string()), "{err:#}");
        // An error of the callback is its own, not the store's.
        s.conn().execute("UPDATE posts SET quotes = '[]'", []).unwrap();
        let err = s.for_each_thread(|_| anyhow::bail!("writer full")).unwrap_err();
        assert_eq!(format!("{err:#}"), "writer full");
    }
}
