//! The SQLite store: crawl state, raw pages, parsed posts, and the feedback the bot collects.
//!
//! One file, WAL mode (readers never block the single writer), schema versioned through
//! `PRAGMA user_version` (see [`migrate`]). The API is split by subject: [`forum`] for the
//! scraper's threads/pages/posts, [`feedback`] for bot answers, their Discord messages and votes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

pub mod feedback;
pub mod forum;
pub mod jobs;
pub mod migrate;

pub use feedback::{AnswerId, FeedbackRow, FlaggedAnswer, NewAnswer, StoredAnswer, Turn, Vote};
pub use forum::{CrawlRun, ForumCounts, ListedOutcome, ListedThread, PageFailure, PageKind, PageRecord, PageRow, RawPage, StoredPost, ThreadPosts, ThreadStatus, ThreadTask};
pub use jobs::{Job, JobCreated, JobKind, JobOutcome, JobState, NewJob};

/// `[store]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// SQLite file; created (with its folder) on first use.
    pub path: PathBuf,
    /// How long a writer waits for another process holding the write lock.
    pub busy_timeout_ms: u64,
}

impl StoreSettings {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(!self.path.as_os_str().is_empty(), "store.path must not be empty");
        anyhow::ensure!(self.busy_timeout_ms > 0, "store.busy_timeout_ms must be at least 1");
        Ok(())
    }
}

/// An open store. Not `Sync`: share it behind a mutex; every method is a short transaction.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open with the configured path and busy timeout.
    pub fn open_with(settings: &StoreSettings) -> Result<Self> {
        Self::open_inner(&settings.path, Duration::from_millis(settings.busy_timeout_ms))
    }

    /// Open (creating if needed) and migrate the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, Duration::from_secs(5))
    }

    fn open_inner(path: &Path, busy: Duration) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating store folder {}", dir.display()))?;
        }
        // SQLite reads the file lazily: a corrupt file or a read-only folder shows up at the
        // first statement below, so each names the file.
        let named = || format!("store {}", path.display());
        let mut conn = Connection::open(path).with_context(|| format!("opening store {}", path.display()))?;
        conn.busy_timeout(busy).with_context(named)?;
        // WAL: the bot reads feedback while a scrape writes; NORMAL sync is durable at
        // transaction boundaries in WAL mode except on power loss, which is fine for a cache
        // that a re-scrape can rebuild.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).with_context(named)?;
        anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "store {}: could not switch to WAL (got {mode})", path.display());
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;").with_context(named)?;
        migrate::migrate(&mut conn).with_context(|| format!("migrating store {}", path.display()))?;
        Ok(Self { conn, path: path.to_path_buf() })
    }

    /// `err` with this store's file named, for errors of calls made after opening.
    pub fn named(&self, err: anyhow::Error) -> anyhow::Error {
        err.context(format!("store {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Schema version the file is at (equals [`migrate::LATEST`] after open).
    pub fn schema_version(&self) -> Result<u32> {
        migrate::version(&self.conn)
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<String>> {
        self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().with_context(|| format!("reading meta {key}"))
    }

    pub fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])
            .with_context(|| format!("writing meta {key}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_in_wal_and_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.sqlite");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), migrate::LATEST);
        let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        store.meta_set("k", "v1").unwrap();
        store.meta_set("k", "v2").unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.meta_get("k").unwrap().as_deref(), Some("v2"));
        assert_eq!(store.meta_get("missing").unwrap(), None);
    }

    #[test]
    fn settings_validation_names_key() {
        let s = StoreSettings { path: PathBuf::new(), busy_timeout_ms: 10 };
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("store.path"));
    }

    #[test]
    fn a_corrupt_or_unwritable_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.sqlite");
        std::fs::write(&path, "this is not a database, just text. ".repeat(200)).unwrap();
        let err = format!("{:#}", Store::open(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not a database"), "{err}");

        // A store whose folder became read-only fails at its first write, named.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.path().join("ro");
            let path = ro.join("s.sqlite");
            drop(Store::open(&path).unwrap());
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            let writable = std::fs::write(ro.join("probe"), b"x").is_ok();
            let res = Store::open(&path).and_then(|s| s.meta_set("k", "v").map_err(|e| s.named(e)));
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
            // Root ignores folder permissions; there is nothing to check then.
            if !writable {
                let err = format!("{:#}", res.unwrap_err());
                assert!(err.contains(&path.display().to_string()), "{err}");
            }
        }
    }
}
