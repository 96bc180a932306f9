//! The `scrape` and `dataset build` subcommands of the real binary against the fixture forum,
//! configured through `FREESKI__…` variables, and the settings checks for their sections.

#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::path::Path;
use std::process::Command;

use fixture_forum::{Forum, SUBFORUM};
use freeski_bot::config::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_then_dataset_build_through_the_binary() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    // The server keeps running on this test's runtime while the binary talks to it.
    let out = tokio::task::spawn_blocking({
        let origin = forum.origin();
        let d = d.clone();
        move || ForumRef(origin).run(&d, &["scrape", "--no-progress"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "scrape failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("28 new"), "{stdout}");
    assert!(stdout.contains("1 gone, 1 blocked"), "{stdout}");
    assert!(d.join("state/forum.sqlite").is_file());
    assert!(forum.requests().iter().any(|r| r.user_agent.starts_with("freeski-bot/")), "default User-Agent identifies the bot");

    let build = tokio::task::spawn_blocking({
        let origin = forum.origin();
        let d = d.clone();
        move || ForumRef(origin).run(&d, &["dataset", "build", "--no-progress"])
    })
    .await
    .unwrap();
    assert!(build.status.success(), "dataset build failed: {}", String::from_utf8_lossy(&build.stderr));
    let stdout = String::from_utf8_lossy(&build.stdout);
    assert!(stdout.contains("dropped:") && stdout.contains("p50"), "{stdout}");
    assert!(stdout.contains("substantive replies:"), "{stdout}");
    let latest = std::fs::read_to_string(d.join("out/LATEST")).unwrap();
    let train = std::fs::read_to_string(d.join("out").join(latest.trim()).join("train.jsonl")).unwrap();
    assert!(train.lines().count() > 20);

    // A missing store is a clear error, not a crash or an empty dataset.
    let missing = Command::new(env!("CARGO_BIN_EXE_freeski-bot")).args(["dataset", "build", "--store", "nope.sqlite"]).current_dir(&d).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.sqlite does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_scrape_exits_130_and_the_next_run_completes() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    // Slow enough (25 requests/s) that SIGINT lands in the middle of the crawl.
    let child = ForumRef(forum.origin())
        .command(&d, &["scrape", "--no-progress"])
        .env("FREESKI__SCRAPE__REQUESTS_PER_SECOND", "25")
        .env("FREESKI__SCRAPE__BURST", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start freeski-bot scrape");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while forum.thread_requests().len() < 8 {
        assert!(std::time::Instant::now() < deadline, "the crawl never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("run kill");
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopped early"), "{stderr}");

    let again = tokio::task::spawn_blocking({
        let origin = forum.origin();
        let d = d.clone();
        move || ForumRef(origin).run(&d, &["scrape", "--no-progress"])
    })
    .await
    .unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    // The resumed store holds what one uninterrupted crawl stores.
    let reference = d.join("reference.sqlite");
    fixture_forum::crawl(&fixture_forum::settings(&forum), &reference).await;
    let counts = |p: &Path| {
        let c = freeski_bot::store::Store::open(p).unwrap().forum_counts().unwrap();
        (c.threads, c.threads_done, c.threads_gone, c.threads_blocked, c.posts)
    };
    assert_eq!(counts(&d.join("state/forum.sqlite")), counts(&reference));
}

#[test]
fn a_corrupt_store_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.sqlite"), "not a database at all, just some text ".repeat(100)).unwrap();
    for args in [&["dataset", "build", "--store", "broken.sqlite"][..], &["scrape", "--no-progress", "--store", "broken.sqlite"][..]] {
        let out = ForumRef("http://127.0.0.1:9".into()).run(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("store broken.sqlite") && stderr.contains("not a database"), "{args:?}: {stderr}");
    }
}

/// Runs the binary against the fixture forum at this origin.
struct ForumRef(String);

impl ForumRef {
    fn run(&self, dir: &Path, args: &[&str]) -> std::process::Output {
        self.command(dir, args).output().expect("run freeski-bot")
    }

    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_freeski-bot"));
        cmd.args(args)
            .current_dir(dir)
            .env("FREESKI__SCRAPE__BASE_URL", &self.0)
            .env("FREESKI__SCRAPE__SUBFORUM_PATH", SUBFORUM)
            .env("FREESKI__SCRAPE__REQUESTS_PER_SECOND", "500")
            .env("FREESKI__SCRAPE__BURST", "20")
            .env("FREESKI__SCRAPE__REQUEST_TIMEOUT_MS", "400")
            .env("FREESKI__SCRAPE__MAX_RETRIES", "2")
            .env("FREESKI__SCRAPE__BACKOFF_BASE_MS", "20")
            .env("FREESKI__SCRAPE__BACKOFF_MAX_MS", "100")
            .env("FREESKI__STORE__PATH", "state/forum.sqlite")
            .env("FREESKI__DATASET__DIR", "out")
            .env("FREESKI_LOG", "warn");
        cmd
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn scrape_dataset_and_store_settings_are_checked_by_name() {
    let s = Settings::load_with_env(None, env(&[])).unwrap();
    assert_eq!(s.scrape.base_url, "https://www.newschoolers.com");
    assert_eq!(s.scrape.max_pages_per_thread, 10);
    assert_eq!(s.scrape.requests_per_second, 1.0);
    assert_eq!(s.dataset.test_fraction, 0.1);
    assert!(!s.dataset.multi_turn);
    assert_eq!(s.dataset.max_answers_per_thread, 0, "no cap: every good reply is a pair");
    assert!(!s.scrape.keep_urls, "training answers carry no links by default");
    assert_eq!(s.store.path, Path::new("data/freeski.sqlite"));

    let s = Settings::load_with_env(None, env(&[("FREESKI__DATASET__BLOCKED_WORDS", "darn,heck"), ("FREESKI__SCRAPE__KEEP_URLS", "true")])).unwrap();
    assert_eq!(s.dataset.blocked_words, vec!["darn", "heck"]);
    assert!(s.scrape.keep_urls);

    for (key, value, named) in [
        ("FREESKI__SCRAPE__REQUESTS_PER_SECOND", "0", "scrape.requests_per_second"),
        ("FREESKI__SCRAPE__BASE_URL", "not a url", "scrape.base_url"),
        ("FREESKI__DATASET__TEST_FRACTION", "1.5", "dataset.test_fraction"),
        ("FREESKI__DATASET__NEAR_DUPLICATE_THRESHOLD", "0", "dataset.near_duplicate_threshold"),
        ("FREESKI__SCRAPE__MAX_RETRIES", "many", "max_retries"),
        ("FREESKI__STORE__PATHH", "x", "pathh"),
    ] {
        let err = format!("{:#}", Settings::load_with_env(None, env(&[(key, value)])).unwrap_err());
        assert!(err.contains(named), "{key}={value}: {err}");
    }
}
