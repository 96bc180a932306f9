//! A fixture forum with the newschoolers markup, served over real HTTP on
//! 127.0.0.1 by the test itself. It knows what every post should clean to, logs every request,
//! and misbehaves on purpose: 429 with Retry-After, a 500 that succeeds on retry, a response
//! slower than the client timeout, a page that always answers 503, a deleted thread (404), a
//! page of broken HTML, a thread whose post bodies miss their closing tag (so the post's vote
//! counter and "Quote · Report · Reply" links fall inside the body), and a robots.txt that
//! disallows one listed thread. Every post carries that footer, as the forum's pages do.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use freeski_bot::bench::forum::{self, escape, ListEntry, PagePost};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

pub const SUBFORUM: &str = "/forum/1/Ski-Gabber";
pub const PER_LIST_PAGE: usize = 10;
pub const POSTS_PER_PAGE: usize = 5;
pub const MAX_PAGES: u32 = 10;

const ADVICE: &[&str] = &[
    "Mount them at true center if you spend most of your time in the park.",
    "Boots matter way more than skis, so get fitted at a real shop first.",
    "Switch landings got so much easier once I stopped leaning back.",
    "Honestly the Bent Chetler is a pow ski and it's too soft for big jumps.",
    "Start with 3s on the small jump and work up from there.",
    "Get a helmet with MIPS, it's worth the extra money.",
    "Wax them every few days when you ride spring slush.",
    "Check the used market in the fall because people sell last year's gear cheap.",
    "If your knees hurt, look at your stance width before blaming the skis.",
    "I'd go with the shorter length for butters and spins.",
    "Rental skis are fine for the first few days, so don't overthink it.",
    "Tips & tails get chewed up on rails, so detune the edges underfoot.",
    "Film yourself, it's the fastest way to see what your hands are doing.",
    "Go early on weekdays, the park crew rakes the landings first thing.",
    "Pop off the lip instead of sliding off it and everything gets easier.",
    "Keep your chest over your knees when you butter.",
    "A softer flex makes presses way easier to hold.",
];
const SKIS: &[&str] = &[
    "Line Chronics",
    "Armada ARVs",
    "Faction Prodigy 2s",
    "K2 Sights",
    "Salomon QSTs",
    "Atomic Bent 100s",
    "Moment Wildcats",
    "J Skis Allplays",
    "Volkl Revolts",
    "Rossi Blackops",
    "4FRNT Hoji",
    "Blizzard Rustler 10s",
];
const RESORTS: &[&str] = &["Mammoth", "Breck", "Whistler", "Keystone", "Park City", "Mount Hood", "Big White", "Killington", "Laax", "Stubai", "Copper", "Tahoe"];
const REPLIERS: &[&str] = &["sendit_steve", "jibbin4life", "corn_snow", "buttery_mike", "treeskier", "park_rat_99", "gnarwhal"];
const SIGNATURES: &[&str] = &["Insta: @sendit_steve", "Sponsored by my mom's credit card"];

/// What the dataset should do with a post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Answer,
    Skip(&'static str),
}

#[derive(Debug, Clone)]
pub struct FPost {
    pub author: String,
    pub html: String,
    /// The cleaned body the parser must produce (keep_urls = true, keep_emoji = false).
    pub body: String,
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    None,
    /// Listed, but its page answers 404.
    Deleted,
    /// Listed, disallowed by robots.txt.
    Blocked,
    /// Page 1 answers 503 every time.
    Down,
    /// Page 2 is broken HTML.
    Broken,
    /// Page 1 answers 429 (Retry-After: 1) the first time.
    TooMany,
    /// Page 2 answers 500 the first time.
    ServerError,
    /// Page 1 answers after 1.2 s the first time.
    Slow,
    /// Every `div.post-body` lacks its `</div>`: the post footer (votes, Quote · Report ·
    /// Reply) and signature are parsed as inside the body, and each next post nests inside the
    /// one before.
    Unclosed,
}

#[derive(Debug, Clone)]
pub struct FThread {
    pub id: u64,
    pub slug: String,
    pub title: String,
    pub posts: Vec<FPost>,
    pub special: Special,
    pub last_activity: u64,
}

impl FThread {
    pub fn pages(&self) -> u32 {
        self.posts.len().div_ceil(POSTS_PER_PAGE).max(1) as u32
    }

    pub fn path(&self) -> String {
        format!("/forum/thread/{}/{}", self.id, self.slug)
    }

    /// Pages a crawler with `max_pages_per_thread = MAX_PAGES` can store posts from.
    pub fn readable_pages(&self) -> Vec<u32> {
        match self.special {
            Special::Deleted | Special::Blocked | Special::Down => vec![],
            Special::Broken => (1..=self.pages().min(MAX_PAGES)).filter(|p| *p != 2).collect(),
            _ => (1..=self.pages().min(MAX_PAGES)).collect(),
        }
    }

    pub fn posts_on(&self, page: u32) -> &[FPost] {
        let start = (page as usize - 1) * POSTS_PER_PAGE;
        let end = (start + POSTS_PER_PAGE).min(self.posts.len());
        &self.posts[start.min(end)..end]
    }
}

#[derive(Debug, Clone)]
pub struct Req {
    pub at: Instant,
    pub path: String,
    pub status: u16,
    pub user_agent: String,
}

pub struct State {
    pub threads: Vec<FThread>,
    pub requests: Vec<Req>,
    pub robots: String,
    triggered: HashSet<String>,
    views: HashMap<u64, u64>,
    clock: u64,
    next_post: usize,
    origin: String,
}

impl State {
    /// Unique own text for the k-th generated post: advice + what I ride where.
    fn own(&mut self) -> String {
        let k = self.next_post;
        self.next_post += 1;
        let a = ADVICE[k % ADVICE.len()];
        let rest = k / ADVICE.len();
        format!("{a} I ride {} at {}.", SKIS[rest % SKIS.len()], RESORTS[(rest / SKIS.len()) % RESORTS.len()])
    }

    fn reply(&mut self, kind: usize, op_author: &str, prev: &str) -> FPost {
        let own = self.own();
        let k = self.next_post;
        let author = REPLIERS[k % REPLIERS.len()].to_string();
        let e = escape(&own);
        let quote = |who: &str, text: &str| format!("<div class=\"quote\"><div class=\"quote-header\"><span class=\"username\">{who}</span> wrote:</div>{}</div>", escape(text));
        let (author, html, body, expect) = match kind {
            0 => {
                let (a, b) = own.split_once(". ").unwrap_or((&own, ""));
                (author, format!("<p>{}.</p>\n<p>{}</p>", escape(a), escape(b)), format!("{a}.\n\n{b}"), Expect::Answer)
            }
            1 => (author, format!("{}\n{e}", quote("powder_hound", prev)), own.clone(), Expect::Answer),
            2 => (
                author,
                format!("<div class=\"quote\"><div class=\"quote-header\">corn_snow wrote:</div>{}{}</div>{e}", quote("gnarwhal", "an older quote"), escape(prev)),
                own.clone(),
                Expect::Answer,
            ),
            3 => (author, format!("{e}<br><br>**This post was edited on Jan 10th 2023 at 9:58:47pm"), own.clone(), Expect::Answer),
            4 => (author, format!("{e}<br>--<br>{}", escape(SIGNATURES[k % 2])), own.clone(), Expect::Answer),
            5 => (author, format!("{e} [URL]https://youtu.be/v{k}[/URL]Anyway that's my take."), format!("{own} https://youtu.be/v{k} Anyway that's my take."), Expect::Answer),
            6 => (author, format!("{} \u{1F602}\u{1F919}", escape(&own.replace('\'', "\u{2019}"))), own.clone(), Expect::Answer),
            7 => (author, format!("<a href=\"https://youtu.be/x{k}\">https://youtu.be/x{k}</a>"), format!("https://youtu.be/x{k}"), Expect::Skip("link_only")),
            8 => (author, format!("<img src=\"https://i.imgur.com/{k}.jpg\">"), String::new(), Expect::Skip("empty_reply")),
            9 => (author, "+1".to_string(), "+1".to_string(), Expect::Skip("too_short")),
            10 => (author, quote("treeskier", prev), String::new(), Expect::Skip("quote_only")),
            11 => (author, format!("[QUOTE=powder_hound]{}[/QUOTE]{e}", escape(prev)), own.clone(), Expect::Answer),
            _ => (op_author.to_string(), e.clone(), own.clone(), Expect::Skip("by_original_poster")),
        };
        FPost { author, html, body, expect }
    }

    fn make_thread(&mut self, idx: usize, pages: u32, last_page_posts: usize, special: Special) -> FThread {
        let id = 9001 + idx as u64;
        let op_author = format!("powderday_{idx}");
        let title = format!("{} question #{idx}: what would you do?", SKIS[idx % SKIS.len()].trim_end_matches('s'));
        let op_own = self.own();
        let op_html = format!("{}<br><br>**This thread was edited on Oct 21st 2020 at 8:21:07pm", escape(&op_own.replace('\'', "\u{2019}")));
        let mut posts = vec![FPost { author: op_author.clone(), html: op_html, body: op_own.clone(), expect: Expect::Skip("opening_post") }];
        let total = (pages as usize - 1) * POSTS_PER_PAGE + last_page_posts;
        let mut prev = op_own;
        for i in 1..total {
            let p = self.reply((idx + i) % 13, &op_author, &prev);
            prev = p.body.clone();
            posts.push(p);
        }
        self.clock += 1;
        FThread { id, slug: format!("Thread-{idx}"), title, posts, special, last_activity: self.clock }
    }

    fn list_page(&self, n: usize) -> String {
        let mut sorted: Vec<&FThread> = self.threads.iter().collect();
        sorted.sort_by(|a, b| b.last_activity.cmp(&a.last_activity).then(a.id.cmp(&b.id)));
        let pages = sorted.len().div_ceil(PER_LIST_PAGE);
        let entries: Vec<ListEntry> = sorted
            .iter()
            .skip((n - 1) * PER_LIST_PAGE)
            .take(PER_LIST_PAGE)
            .map(|t| ListEntry {
                url: format!("{}{}", self.origin, t.path()),
                title: &t.title,
                replies: t.posts.len() - 1,
                views: 100 + self.views.get(&t.id).copied().unwrap_or(0),
                last_author: t.posts.last().map(|p| p.author.as_str()).unwrap_or(""),
            })
            .collect();
        forum::list_page(&entries, SUBFORUM, pages)
    }

    fn thread_page(&self, t: &FThread, page: u32) -> String {
        let posts: Vec<PagePost> = t
            .posts_on(page)
            .iter()
            .enumerate()
            .map(|(i, p)| PagePost {
                id: format!("{}{page:02}{i:02}", t.id),
                author: &p.author,
                date: format!("Jan {}th 2023 at 9:{:02}pm", 4 + i, 10 + i),
                body_html: &p.html,
                votes: (3 * i + page as usize) as i64,
                signature: (i % 3 == 1).then_some("Sponsored by nobody | Team Couch"),
            })
            .collect();
        forum::thread_page(&t.title, &t.path(), t.pages(), &posts, t.special != Special::Unclosed)
    }

    fn respond(&mut self, path_and_query: &str, if_none_match: Option<&str>) -> (u16, Vec<(&'static str, String)>, String, Option<Duration>) {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let page: u32 = query.strip_prefix("page=").and_then(|p| p.parse().ok()).unwrap_or(1);
        let mut delay = None;
        let body = if path == "/robots.txt" {
            self.robots.clone()
        } else if path == SUBFORUM {
            let pages = self.threads.len().div_ceil(PER_LIST_PAGE);
            if page as usize > pages {
                return (404, vec![], "no such page".into(), None);
            }
            self.list_page(page as usize)
        } else if let Some(t) = self.threads.iter().find(|t| path == t.path()).cloned() {
            *self.views.entry(t.id).or_default() += 1;
            let first_time = self.triggered.insert(path_and_query.to_string());
            match (t.special, page) {
                (Special::Deleted, _) => return (404, vec![], "thread deleted".into(), None),
                (Special::Down, 1) => return (503, vec![], "maintenance".into(), None),
                (Special::TooMany, 1) if first_time => return (429, vec![("retry-after", "1".into())], "slow down".into(), None),
                (Special::ServerError, 2) if first_time => return (500, vec![], "oops".into(), None),
                (Special::Slow, 1) if first_time => delay = Some(Duration::from_millis(1200)),
                (Special::Broken, 2) => return (200, vec![], "<html><body><div class=\"post\"><div class=\"post-b\u{fffd}\u{0}<<<</".into(), None),
                _ => {}
            }
            if page > t.pages() {
                return (404, vec![], "no such page".into(), None);
            }
            self.thread_page(&t, page)
        } else {
            return (404, vec![], "not found".into(), None);
        };
        let etag = format!("\"{:016x}\"", fnv(body.as_bytes()));
        if if_none_match == Some(etag.as_str()) {
            return (304, vec![("etag", etag)], String::new(), delay);
        }
        (200, vec![("etag", etag), ("content-type", "text/html; charset=utf-8".into())], body, delay)
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3))
}

pub struct Forum {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forum {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Page counts of the 28 threads, by index; specials as listed in [`Special`].
const LAYOUT: &[(u32, usize, Special)] = &[
    (1, 4, Special::None),
    (2, 3, Special::None),
    (3, 5, Special::None),
    (1, 1, Special::None),  // empty: opening post only
    (12, 2, Special::None), // longer than max_pages_per_thread
    (2, 4, Special::TooMany),
    (3, 2, Special::ServerError),
    (1, 5, Special::Slow),
    (3, 3, Special::Broken),
    (2, 2, Special::Deleted),
    (2, 2, Special::Blocked),
    (1, 3, Special::Down),
    (2, 3, Special::None), // crosspost: replaced by a copy of thread 1 below
    (1, 2, Special::None),
    (2, 5, Special::Unclosed),
    (1, 3, Special::None),
    (4, 1, Special::None),
    (2, 4, Special::None),
    (1, 5, Special::None),
    (3, 2, Special::None),
    (1, 4, Special::None),
    (2, 2, Special::None),
    (5, 3, Special::None),
    (1, 2, Special::None),
    (2, 5, Special::None),
    (1, 3, Special::None),
    (3, 4, Special::None),
    (6, 1, Special::None),
];

pub const CROSSPOST_IDX: usize = 12;

impl Forum {
    pub async fn start() -> Forum {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let mut st = State {
            threads: Vec::new(),
            requests: Vec::new(),
            robots: String::new(),
            triggered: HashSet::new(),
            views: HashMap::new(),
            clock: 0,
            next_post: 0,
            origin: format!("http://{addr}"),
        };
        for (idx, (pages, last, special)) in LAYOUT.iter().enumerate() {
            let t = st.make_thread(idx, *pages, *last, *special);
            st.threads.push(t);
        }
        // The crosspost repeats thread 1 word for word under a new id.
        let copy = st.threads[1].clone();
        let cross = &mut st.threads[CROSSPOST_IDX];
        cross.title = copy.title;
        cross.posts = copy.posts;
        let blocked = st.threads.iter().find(|t| t.special == Special::Blocked).map(|t| t.id).unwrap_or(0);
        st.robots = format!(
            "# robots for the fixture forum\nUser-agent: *\nDisallow: /forum/search\nDisallow: /*?sort=\nDisallow: /forum/thread/{blocked}/\n\nUser-agent: BadBot\nDisallow: /\n"
        );
        let state = Arc::new(Mutex::new(st));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Forum { addr, state, task }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn threads(&self) -> Vec<FThread> {
        self.state.lock().unwrap().threads.clone()
    }

    pub fn thread(&self, special: Special) -> FThread {
        self.threads().into_iter().find(|t| t.special == special).expect("fixture has that thread")
    }

    pub fn requests(&self) -> Vec<Req> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// Requests for thread pages (not list pages or robots.txt).
    pub fn thread_requests(&self) -> Vec<Req> {
        self.requests().into_iter().filter(|r| r.path.starts_with("/forum/thread/")).collect()
    }

    /// Add `n` replies to thread `idx` (bumping it to the top of the list).
    pub fn add_replies(&self, idx: usize, n: usize) {
        let mut st = self.state.lock().unwrap();
        let op = st.threads[idx].posts[0].author.clone();
        for _ in 0..n {
            let prev = st.threads[idx].posts.last().map(|p| p.body.clone()).unwrap_or_default();
            let p = st.reply(0, &op, &prev);
            st.threads[idx].posts.push(p);
        }
        st.clock += 1;
        st.threads[idx].last_activity = st.clock;
    }

    /// Start a new thread with `pages` pages; returns its index.
    pub fn add_thread(&self, pages: u32, last: usize) -> usize {
        let mut st = self.state.lock().unwrap();
        let idx = st.threads.len();
        let t = st.make_thread(idx, pages, last, Special::None);
        st.threads.push(t);
        idx
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let ua = header("user-agent").unwrap_or_default();
    let inm = header("if-none-match");
    let at = Instant::now();
    let (status, headers, body, delay) = {
        let mut st = state.lock().unwrap();
        let r = st.respond(&path, inm.as_deref());
        st.requests.push(Req { at, path: path.clone(), status: r.0, user_agent: ua });
        r
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}

/// Settings that point the scraper at `forum`, fast enough for tests.
pub fn settings(forum: &Forum) -> freeski_bot::scrape::ScrapeSettings {
    freeski_bot::scrape::ScrapeSettings {
        base_url: forum.origin(),
        subforum_path: SUBFORUM.into(),
        user_agent: "freeski-bot-test/0.1 (+fixture)".into(),
        requests_per_second: 400.0,
        burst: 20,
        concurrency: 3,
        connect_timeout_ms: 1_000,
        request_timeout_ms: 400,
        max_retries: 2,
        backoff_base_ms: 20,
        backoff_max_ms: 100,
        max_retry_after_s: 5,
        max_pages_per_thread: MAX_PAGES,
        max_list_pages: 50,
        keep_urls: true,
        keep_emoji: false,
    }
}

/// Crawl `forum` into the store at `path` to the end.
pub async fn crawl(s: &freeski_bot::scrape::ScrapeSettings, path: &std::path::Path) -> freeski_bot::scrape::CrawlReport {
    let store = Mutex::new(freeski_bot::store::Store::open(path).expect("open store"));
    let cancel = tokio_util::sync::CancellationToken::new();
    freeski_bot::scrape::scrape(s, &store, &Default::default(), &cancel).await.expect("crawl")
}
