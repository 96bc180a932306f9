//! The crawler against the fixture forum over real HTTP on 127.0.0.1.

#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::sync::Mutex;
use std::time::Duration;

use fixture_forum::{crawl, settings, Forum, Special, MAX_PAGES};
use freeski_bot::scrape::{scrape, CrawlOptions};
use freeski_bot::store::{Store, ThreadStatus};
use tokio_util::sync::CancellationToken;

fn requests_for(forum: &Forum, path_and_query: &str) -> Vec<fixture_forum::Req> {
    forum.requests().into_iter().filter(|r| r.path == path_and_query).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_crawl_stores_every_reachable_post() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("forum.sqlite");
    let s = settings(&forum);
    let report = crawl(&s, &db).await;

    let threads = forum.threads();
    assert_eq!(report.threads_new, threads.len() as u64);
    assert_eq!(report.list_pages_fetched, 3);
    assert_eq!((report.threads_gone, report.threads_blocked, report.threads_failed, report.parse_errors), (1, 1, 1, 1), "{report}");

    let store = Store::open(&db).unwrap();
    for t in &threads {
        let (status, error) = store.thread_status(t.id).unwrap().expect("every listed thread is stored");
        let want = match t.special {
            Special::Deleted => ThreadStatus::Gone,
            Special::Blocked => ThreadStatus::Blocked,
            Special::Down => ThreadStatus::Failed,
            _ => ThreadStatus::Done,
        };
        assert_eq!(status, want, "thread {} ({:?}): {error:?}", t.id, t.special);
        if t.special == Special::Down {
            let e = error.unwrap();
            assert!(e.contains("page 1") && e.contains("gave up after 3 attempts") && e.contains("503"), "{e}");
        }
        // Every post of every readable page, in order, with author and cleaned body.
        let stored: Vec<(u32, String, String)> = store.thread_posts(t.id).unwrap().into_iter().map(|(p, post)| (p, post.author.unwrap_or_default(), post.body)).collect();
        let want: Vec<(u32, String, String)> =
            t.readable_pages().into_iter().flat_map(|p| t.posts_on(p).iter().map(move |post| (p, post.author.clone(), post.body.clone()))).collect();
        assert_eq!(stored, want, "posts of thread {} ({:?})", t.id, t.special);
    }
    let counts = store.forum_counts().unwrap();
    let expected_posts: usize = threads.iter().map(|t| t.readable_pages().iter().map(|p| t.posts_on(*p).len()).sum::<usize>()).sum();
    assert_eq!(counts.posts, expected_posts as u64);

    // The broken page is kept raw with the reason; the raw HTML of good pages is kept too.
    let broken = forum.thread(Special::Broken);
    let url = format!("{}{}?page=2", forum.origin(), broken.path());
    let row = store.page(&url).unwrap().unwrap();
    assert!(row.parse_error.as_deref().unwrap_or("").contains("no post bodies"), "{row:?}");
    assert!(store.page_html(&url).unwrap().is_some());
    let html = store.page_html(&format!("{}{}?page=1", forum.origin(), threads[0].path())).unwrap().unwrap();
    assert!(String::from_utf8(html).unwrap().contains("post-body"));

    // Polite: robots.txt first, disallowed paths never requested, always identified.
    let reqs = forum.requests();
    assert_eq!(reqs[0].path, "/robots.txt");
    let blocked = forum.thread(Special::Blocked);
    for r in &reqs {
        assert!(!r.path.starts_with(&blocked.path()), "robots.txt disallowed {}", r.path);
        assert!(!r.path.starts_with("/forum/search") && !r.path.contains("sort="), "robots.txt disallowed {}", r.path);
        assert_eq!(r.user_agent, s.user_agent);
    }
    // max_pages_per_thread is honoured.
    let long = threads.iter().find(|t| t.pages() > MAX_PAGES).unwrap();
    assert!(requests_for(&forum, &format!("{}?page={}", long.path(), MAX_PAGES + 1)).is_empty());
    assert_eq!(requests_for(&forum, &format!("{}?page={MAX_PAGES}", long.path())).len(), 1);

    // Retries: 429 waits for Retry-After, 500 and the slow page are retried once, a page that
    // keeps failing is tried 1 + max_retries times.
    let r429 = requests_for(&forum, &format!("{}?page=1", forum.thread(Special::TooMany).path()));
    assert_eq!(r429.iter().map(|r| r.status).collect::<Vec<_>>(), vec![429, 200]);
    assert!(r429[1].at - r429[0].at >= Duration::from_millis(990), "Retry-After: 1 not honoured: {:?}", r429[1].at - r429[0].at);
    let r500 = requests_for(&forum, &format!("{}?page=2", forum.thread(Special::ServerError).path()));
    assert_eq!(r500.iter().map(|r| r.status).collect::<Vec<_>>(), vec![500, 200]);
    let slow = requests_for(&forum, &format!("{}?page=1", forum.thread(Special::Slow).path()));
    assert_eq!(slow.len(), 2, "the slow response times out and is retried");
    let down = requests_for(&forum, &format!("{}?page=1", forum.thread(Special::Down).path()));
    assert_eq!(down.len(), 1 + s.max_retries as usize);

    // No other page was requested twice.
    let mut seen = std::collections::HashMap::new();
    for r in forum.thread_requests() {
        *seen.entry(r.path).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(p, _)| p.clone()).collect();
    assert_eq!(twice.len(), 4, "only the four misbehaving pages repeat: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_crawl_is_incremental_and_revalidation_uses_conditional_gets() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("forum.sqlite");
    let s = settings(&forum);
    crawl(&s, &db).await;

    forum.clear_requests();
    let report = crawl(&s, &db).await;
    assert_eq!((report.threads_new, report.threads_changed), (0, 0), "{report}");
    let down = forum.thread(Special::Down).path();
    let fetched: Vec<String> = forum.thread_requests().into_iter().map(|r| r.path).filter(|p| !p.starts_with(&down)).collect();
    assert!(fetched.is_empty(), "nothing changed, yet fetched {fetched:?}");

    // --revalidate re-checks every known page; unchanged pages answer 304 to the stored ETag.
    forum.clear_requests();
    let store = Mutex::new(Store::open(&db).unwrap());
    let opts = CrawlOptions { revalidate: true, progress: false };
    let report = scrape(&s, &store, &opts, &CancellationToken::new()).await.unwrap();
    let done: Vec<_> = forum.threads().into_iter().filter(|t| !matches!(t.special, Special::Deleted | Special::Blocked | Special::Down)).collect();
    let pages: usize = done.iter().map(|t| t.pages().min(MAX_PAGES) as usize).sum();
    let not_modified = forum.thread_requests().iter().filter(|r| r.status == 304).count();
    // The broken page has no ETag: it comes back 200 and is recognised by its content hash.
    assert_eq!(not_modified, pages - 1);
    assert_eq!(report.pages_unchanged as usize, pages, "{report}");
    assert_eq!(report.pages_fetched, 0, "{report}");
    let store = store.into_inner().unwrap();
    assert_eq!(store.forum_counts().unwrap().threads_done as usize, done.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_never_exceeds_the_limit() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&forum);
    s.requests_per_second = 25.0;
    s.burst = 2;
    s.concurrency = 4;
    crawl(&s, &dir.path().join("forum.sqlite")).await;

    let mut times: Vec<_> = forum.requests().into_iter().map(|r| r.at).collect();
    times.sort();
    assert!(times.len() > 60, "{} requests", times.len());
    // GCRA bound: any k consecutive requests span at least (k - burst) / rate seconds. The
    // slack covers scheduling jitter between the limiter's decision and the server seeing the
    // request on a busy 2-core machine (under one request's worth at this rate).
    let slack = 0.03;
    let mut worst = f64::MIN;
    for i in 0..times.len() {
        for j in i + 1..times.len() {
            let k = (j - i + 1) as f64;
            let span = (times[j] - times[i]).as_secs_f64();
            let allowed = s.burst as f64 + s.requests_per_second * (span + slack);
            worst = worst.max(k - allowed);
            assert!(k <= allowed, "{k} requests in {span:.3}s exceed burst {} + {}/s", s.burst, s.requests_per_second);
        }
    }
    // And the limiter was actually the bottleneck (the test could not pass by being slow).
    let total = (times[times.len() - 1] - times[0]).as_secs_f64();
    let rate = (times.len() - 1) as f64 / total;
    assert!(rate > 0.4 * s.requests_per_second, "observed {rate:.1}/s");
    eprintln!("observed {rate:.1} requests/s, tightest window {worst:.2} requests under the bound");
}
