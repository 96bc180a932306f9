//! Schema migrations, tracked in `PRAGMA user_version`.
//!
//! Each entry moves the schema from version `i` to `i + 1` and runs in its own transaction
//! together with the version bump, so a crash never leaves a half-applied step. Append new steps;
//! never edit a released one.

use anyhow::{Context, Result};
use rusqlite::Connection;

/// Errors a caller may want to tell apart from I/O trouble.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("store schema version {found} is newer than this program understands ({supported}); upgrade freeski-bot")]
    TooNew { found: u32, supported: u32 },
}

const MIGRATIONS: &[&str] = &[
    // 1: forum crawl state.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- One row per `scrape` invocation; an unfinished row is resumed by the next run.
    CREATE TABLE crawl_runs (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at       INTEGER NOT NULL,
        finished_at      INTEGER,
        list_pages_total INTEGER,
        list_pages_done  INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE threads (
        id             INTEGER PRIMARY KEY,
        url            TEXT NOT NULL,
        title          TEXT NOT NULL,
        -- What the thread list shows about the thread (reply count, last post); a change
        -- means new replies, so the thread is queued again.
        list_signature TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'gone', 'blocked')),
        -- First thread page still to fetch; advanced in the same transaction that stores a page.
        next_page      INTEGER NOT NULL DEFAULT 1,
        page_count     INTEGER,
        error          TEXT,
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        crawled_at     INTEGER
    );
    CREATE TABLE pages (
        url           TEXT PRIMARY KEY,
        kind          TEXT NOT NULL CHECK (kind IN ('list', 'thread')),
        thread_id     INTEGER REFERENCES threads(id) ON DELETE CASCADE,
        page_no       INTEGER NOT NULL,
        http_status   INTEGER,
        fetched_at    INTEGER NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        etag          TEXT,
        last_modified TEXT,
        content_hash  TEXT,
        html          BLOB,     -- zstd-compressed response body
        page_count    INTEGER,  -- last page number the page's pagination links to
        fetch_error   TEXT,
        parse_error   TEXT
    );
    CREATE INDEX pages_by_thread ON pages(thread_id, page_no);
    CREATE TABLE posts (
        thread_id INTEGER NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
        page_no   INTEGER NOT NULL,
        position  INTEGER NOT NULL,
        post_id   TEXT,
        author    TEXT,
        posted_at TEXT,
        body      TEXT NOT NULL,   -- cleaned text, quotes and signature removed
        quotes    TEXT NOT NULL,   -- JSON array of the quoted texts
        PRIMARY KEY (thread_id, page_no, position)
    ) WITHOUT ROWID;
    "#,
    // 2: feedback from Discord (written by the bot, exported by `dataset build`).
    r#"
    CREATE TABLE answers (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        question    TEXT NOT NULL,
        context     TEXT NOT NULL DEFAULT '[]',  -- JSON [{role, content}] before the question
        answer      TEXT NOT NULL,
        adapter_id  TEXT,                        -- NULL: bare base model
        guild_id    INTEGER,
        channel_id  INTEGER,
        asked_by    INTEGER,
        created_at  INTEGER NOT NULL
    );
    -- An answer longer than one Discord message spans several; reactions arrive by message id.
    CREATE TABLE answer_messages (
        message_id INTEGER PRIMARY KEY,
        answer_id  INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
        part       INTEGER NOT NULL
    );
    CREATE INDEX answer_messages_by_answer ON answer_messages(answer_id);
    CREATE TABLE votes (
        answer_id INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
        user_id   INTEGER NOT NULL,
        value     INTEGER NOT NULL CHECK (value IN (-1, 1)),
        voted_at  INTEGER NOT NULL,
        PRIMARY KEY (answer_id, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE corrections (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        answer_id  INTEGER NOT NULL REFERENCES answers(id) ON DELETE CASCADE,
        admin_id   INTEGER NOT NULL,
        text       TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX corrections_by_answer ON corrections(answer_id);
    "#,
    // 3: the bot's jobs (/rescrape, /retrain; run by the worker) and answer generation settings.
    r#"
    ALTER TABLE answers ADD COLUMN generation TEXT NOT NULL DEFAULT '{}';  -- JSON: options, finish, tokens
    CREATE TABLE jobs (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        kind               TEXT NOT NULL CHECK (kind IN ('rescrape', 'retrain')),
        state              TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
        stage              TEXT,
        progress_done      INTEGER,
        progress_total     INTEGER,
        progress_note      TEXT,
        requested_by       INTEGER,
        guild_id           INTEGER,
        channel_id         INTEGER,
        -- The Discord message showing progress (edited by the worker) and the interaction that
        -- asked (its token can edit the response for 15 minutes).
        status_message_id  INTEGER,
        application_id     INTEGER,
        interaction_token  TEXT,
        created_at         INTEGER NOT NULL,
        started_at         INTEGER,
        finished_at        INTEGER,
        updated_at         INTEGER NOT NULL,
        error              TEXT,
        cancel_requested   INTEGER NOT NULL DEFAULT 0
    );
    -- Single flight: at most one queued or running job of each kind.
    CREATE UNIQUE INDEX jobs_one_active_per_kind ON jobs(kind) WHERE state IN ('queued', 'running');
    CREATE INDEX jobs_by_state ON jobs(state);
    "#,
];

/// Schema version this build writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

pub fn version(conn: &Connection) -> Result<u32> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).context("reading user_version")?;
    Ok(v as u32)
}

/// Bring the schema to [`LATEST`]; refuse files written by a newer program.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let found = version(conn)?;
    if found > LATEST {
        return Err(MigrateError::TooNew { found, supported: LATEST }.into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i as u32 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql).with_context(|| format!("applying migration {to}"))?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        tracing::debug!(version = to, "store migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_step_by_step_and_refuses_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        // Simulate a store written by the first release, then upgraded.
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute("INSERT INTO meta VALUES ('a', 'b')", []).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), LATEST);
        let kept: String = conn.query_row("SELECT value FROM meta WHERE key = 'a'", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, "b");
        conn.pragma_update(None, "user_version", LATEST + 1).unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
