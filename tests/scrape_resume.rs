//! Interrupted and repeated crawls: a crawl killed mid-way resumes to the same store without
//! refetching what it stored, and a re-scrape fetches only threads that changed.

#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fixture_forum::{crawl, settings, Forum, Special};
use freeski_bot::dataset::{self, BuildOptions, DatasetSettings};
use freeski_bot::scrape::{scrape, CleanOptions, CrawlOptions};
use freeski_bot::store::Store;
use tokio_util::sync::CancellationToken;

/// Everything a crawl leaves in the store that must not depend on interruptions: page rows
/// (without fetch times and attempt counts), thread states and posts. URLs lose the origin so
/// stores crawled from two fixture instances compare.
fn snapshot(db: &Path, origin: &str) -> (Vec<String>, BTreeMap<u64, String>) {
    let store = Store::open(db).unwrap();
    let pages = store
        .pages()
        .unwrap()
        .into_iter()
        .map(|p| {
            format!(
                "{} t={:?} n={} http={:?} hash={:?} html={} count={:?} fetch_err={:?} parse_err={:?}",
                p.url.replace(origin, ""),
                p.thread_id,
                p.page_no,
                p.http_status,
                p.content_hash,
                p.has_html,
                p.page_count,
                p.fetch_error,
                p.parse_error
            )
        })
        // List pages show view counters, which differ between two fixture instances.
        .filter(|line| !line.contains("Ski-Gabber"))
        .collect();
    let mut threads = BTreeMap::new();
    let ids: Vec<u64> = store.pages().unwrap().iter().filter_map(|p| p.thread_id).collect::<HashSet<_>>().into_iter().collect();
    for id in ids {
        let status = store.thread_status(id).unwrap();
        let posts = store.thread_posts(id).unwrap();
        threads.insert(id, format!("{status:?} {posts:?}"));
    }
    (pages, threads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_crawl_resumes_to_the_same_store_without_refetching() {
    let dir = tempfile::tempdir().unwrap();

    // Reference: one uninterrupted crawl.
    let reference = Forum::start().await;
    let ref_db = dir.path().join("reference.sqlite");
    crawl(&settings(&reference), &ref_db).await;
    let want = snapshot(&ref_db, &reference.origin());

    // Same forum content, crawl dropped after 15 thread-page requests.
    let forum = Forum::start().await;
    let db = dir.path().join("killed.sqlite");
    let mut s = settings(&forum);
    s.concurrency = 3;
    {
        let store = Mutex::new(Store::open(&db).unwrap());
        let cancel = CancellationToken::new();
        let opts = CrawlOptions::default();
        let crawl_fut = scrape(&s, &store, &opts, &cancel);
        let watch = async {
            while forum.thread_requests().len() < 15 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::select! {
            r = crawl_fut => panic!("crawl finished before it was killed: {r:?}"),
            _ = watch => {} // dropping the crawl future here is the kill
        }
    }
    let before_kill = forum.requests().len();
    let stored_at_kill: HashSet<String> = Store::open(&db).unwrap().pages().unwrap().into_iter().filter(|p| p.has_html).map(|p| p.url.replace(&forum.origin(), "")).collect();
    assert!(stored_at_kill.len() >= 5, "the kill came too early to test anything: {stored_at_kill:?}");
    let (pages_at_kill, _) = snapshot(&db, &forum.origin());
    assert_ne!(pages_at_kill, want.0, "the kill came after the crawl was done");

    let report = crawl(&s, &db).await;
    assert!(report.resumed, "{report}");
    assert_eq!(report.list_pages_fetched, 0, "the resumed run must not redo the finished list phase");
    assert_eq!(snapshot(&db, &forum.origin()), want, "resumed store differs from an uninterrupted crawl");

    // Nothing stored before the kill was requested again; what was in flight may be (at most
    // one page per concurrent thread).
    let after: Vec<String> = forum.requests()[before_kill..].iter().map(|r| r.path.clone()).collect();
    let refetched: Vec<&String> = after.iter().filter(|p| stored_at_kill.contains(*p)).collect();
    assert!(refetched.is_empty(), "pages stored before the kill were fetched again: {refetched:?}");
    let first_run: HashSet<String> = forum.requests()[..before_kill].iter().map(|r| r.path.clone()).collect();
    let down = forum.thread(Special::Down).path();
    let repeated: HashSet<&String> = after.iter().filter(|p| first_run.contains(*p) && !p.starts_with(&down) && p.as_str() != "/robots.txt").collect();
    assert!(repeated.len() <= s.concurrency, "more than the in-flight pages repeated: {repeated:?}");
}

fn build(db: &Path, out: &Path) -> dataset::BuildReport {
    let mut store = Store::open(db).unwrap();
    let s = DatasetSettings { dir: out.to_path_buf(), ..DatasetSettings::default() };
    dataset::build(&mut store, &s, &CleanOptions::default(), &BuildOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescrape_fetches_only_changed_threads_and_the_dataset_hash_follows() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("forum.sqlite");
    let out = dir.path().join("datasets");
    let s = settings(&forum);
    crawl(&s, &db).await;
    let first = build(&db, &out);
    let again = build(&db, &out);
    assert_eq!(again.written.hash, first.written.hash, "same input, same dataset");
    assert!(again.written.reused);

    // Two threads get replies (one grows a page), and a new thread appears.
    forum.add_replies(0, 3); // 4 posts on one page -> 7 posts on two pages
    forum.add_replies(2, 1); // 3 full pages -> 4 pages
    forum.add_replies(4, 2); // 12 pages, cut at 10: its new replies are out of reach
    let new_idx = forum.add_thread(2, 3);
    let threads = forum.threads();
    forum.clear_requests();
    let report = crawl(&s, &db).await;
    assert_eq!((report.threads_new, report.threads_changed), (1, 3), "{report}");

    let down = forum.thread(Special::Down).path();
    let mut fetched: Vec<String> = forum.thread_requests().into_iter().map(|r| r.path).filter(|p| !p.starts_with(&down)).collect();
    fetched.sort();
    let mut want = vec![
        // Resumes at the last page held (where replies land) and follows new pages.
        format!("{}?page=1", threads[0].path()),
        format!("{}?page=2", threads[0].path()),
        format!("{}?page=3", threads[2].path()),
        format!("{}?page=4", threads[2].path()),
        format!("{}?page=1", threads[new_idx].path()),
        format!("{}?page=2", threads[new_idx].path()),
    ];
    want.sort();
    assert_eq!(fetched, want);

    let store = Store::open(&db).unwrap();
    assert_eq!(store.thread_posts(threads[0].id).unwrap().len(), 7);
    assert_eq!(store.thread_posts(threads[2].id).unwrap().len(), 16);
    assert_eq!(store.thread_posts(threads[new_idx].id).unwrap().len(), 8);
    drop(store);

    let changed = build(&db, &out);
    assert_ne!(changed.written.hash, first.written.hash, "new replies must change the dataset");
    assert!(!changed.written.reused);
    assert!(changed.stats.train + changed.stats.test > first.stats.train + first.stats.test);

    // Nothing changed since: nothing fetched, same hash.
    forum.clear_requests();
    crawl(&s, &db).await;
    assert!(forum.thread_requests().iter().all(|r| r.path.starts_with(&down)));
    assert_eq!(build(&db, &out).written.hash, changed.written.hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_stops_cleanly_and_the_next_run_resumes() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("forum.sqlite");
    let s = settings(&forum);
    let store = Mutex::new(Store::open(&db).unwrap());
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let opts = CrawlOptions::default();
    let (report, ()) = tokio::join!(scrape(&s, &store, &opts, &cancel), async {
        while forum.thread_requests().len() < 10 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        trigger.cancel(); // what Ctrl-C does in `freeski-bot scrape`
    });
    let report = report.unwrap();
    assert!(report.cancelled, "{report}");
    drop(store);
    let seen = forum.thread_requests().len();
    assert!(seen < 30, "cancellation did not stop the crawl ({seen} thread requests)");

    let again = crawl(&s, &db).await;
    assert!(again.resumed && !again.cancelled, "{again}");
    let store = Store::open(&db).unwrap();
    let c = store.forum_counts().unwrap();
    assert_eq!(c.threads_pending, 0);
    assert_eq!(c.threads as usize, forum.threads().len());
}
