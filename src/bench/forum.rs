//! Synthetic forum pages with the real site's structure and artifacts: page chrome
//! and guest banner, `div.post-body` posts with author and date, quotes (some nested), edit
//! notes, signatures, BBCode remnants, emoji, curly quotes, link-only and image-only replies.
//! Used by `bench parse` to build a store of realistic size without the network; its page
//! renderer ([`thread_page`], [`list_page`]) also serves the test suite's forum server.

use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use url::Url;

use crate::store::{ListedThread, PageKind, PageRecord, Store, ThreadStatus};

const SENTENCES: &[&str] = &[
    "I've been riding the Line Chronic for two seasons and it holds up fine on rails.",
    "Mount them at true center if you spend most of your time in the park.",
    "For a one-ski quiver out west I'd look at something around 100 underfoot.",
    "Boots matter way more than skis, go get fitted at a real shop first.",
    "Switch landings got so much easier once I stopped leaning back.",
    "The base on mine got destroyed by the rails, so budget for a grind.",
    "Honestly the Bent Chetler is a pow ski, it's too soft for big jumps.",
    "Start with 3s on a small jump and work up, don't huck a 7 on day one.",
    "My local hill only has a few features but the park crew keeps them fresh.",
    "Get a helmet with MIPS, it's worth the extra money.",
    "I ride 186s at 80kg and they feel stable at speed.",
    "Wax them every few days if you ride spring slush.",
    "Ski the whole mountain, park laps get boring after a while.",
    "That edit was sick, the lighting on the last shot was perfect.",
    "Check the used market in the fall, people sell last year's gear cheap.",
    "If your knees hurt, look at your stance width before blaming the skis.",
    "I'd go with the shorter length for butters and spins.",
    "Rental skis are fine for the first few days, don't overthink it.",
];

const USERS: &[&str] = &["powder_hound", "sendit_steve", "jibbin4life", "corn_snow", "buttery_mike", "treeskier", "park_rat_99", "gnarwhal"];
const SIGNATURES: &[&str] = &["Insta: @sendit_steve", "Sponsored by my mom's credit card", "Team Nobody | 2012 Park Rat of the Year"];
const EMOJI: &[&str] = &["😂", "🤙", "🔥", "😎"];

fn paragraph(rng: &mut StdRng) -> String {
    let n = rng.random_range(1..=4);
    let mut p = String::new();
    for i in 0..n {
        if i > 0 {
            p.push(' ');
        }
        p.push_str(SENTENCES[rng.random_range(0..SENTENCES.len())]);
    }
    // Typographic quotes as the forum's editor produces them.
    if rng.random_bool(0.2) {
        p = p.replace('\'', "\u{2019}");
    }
    p
}

fn post_body(rng: &mut StdRng, prev: Option<(&str, &str)>) -> String {
    let mut b = String::new();
    if let Some((who, text)) = prev.filter(|_| rng.random_bool(0.3)) {
        b.push_str(&format!("<div class=\"quote\"><div class=\"quote-header\">{who} wrote:</div>{text}"));
        if rng.random_bool(0.2) {
            b.push_str("<div class=\"quote\">older quoted text</div>");
        }
        b.push_str("</div>");
    }
    let roll: f64 = rng.random();
    if roll < 0.05 {
        b.push_str("<a href=\"https://youtu.be/dQw4w9WgXcQ\">https://youtu.be/dQw4w9WgXcQ</a>");
        return b;
    }
    if roll < 0.08 {
        b.push_str("<img src=\"https://i.imgur.com/abc123.jpg\">");
        return b;
    }
    let paras = rng.random_range(1..=3);
    for i in 0..paras {
        if i > 0 {
            b.push_str("<br><br>\n");
        }
        b.push_str(&paragraph(rng));
    }
    if rng.random_bool(0.05) {
        b.push_str(" [URL]https://youtu.be/xyz987[/URL]Anyway that's my take.");
    }
    if rng.random_bool(0.1) {
        b.push(' ');
        b.push_str(EMOJI[rng.random_range(0..EMOJI.len())]);
    }
    if rng.random_bool(0.1) {
        b.push_str("<br><br>**This post was edited on Jan 10th 2023 at 9:58:47pm");
    }
    b
}

/// One post as a thread page shows it.
pub struct PagePost<'a> {
    pub id: String,
    pub author: &'a str,
    /// As the site writes it, e.g. "Jan 4th 2023 at 9:10pm".
    pub date: String,
    /// The post's HTML as the site serves it (quotes, BBCode remnants, edit notes, ...).
    pub body_html: &'a str,
    pub votes: i64,
    pub signature: Option<&'a str>,
}

/// `&`, `<`, `>` and `"` as entities.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const HEAD_END: &str = "<script>window.ns={user:null};</script></head><body>\n\
<div class=\"nav\"><a href=\"/\">Home</a> <a href=\"/forum\">Forums</a> <a href=\"/videos\">Videos</a> <a href=\"/gear\">Gear</a></div>\n\
<div class=\"banner\">Welcome to the Newschoolers forums! You may read the forums as a guest, but please sign up to post.</div>\n";
const FOOTER: &str = "<div class=\"footer\">&copy; Newschoolers.com &middot; <a href=\"/privacy\">Privacy</a></div></body></html>\n";

fn pagination(h: &mut String, path: &str, pages: usize) {
    h.push_str("<div class=\"pagination\">");
    for p in 1..=pages {
        h.push_str(&format!("<a href=\"{path}?page={p}\">{p}</a> "));
    }
    h.push_str("</div>\n");
}

/// A thread page with the real site's chrome around the posts: navigation, guest banner, each
/// post's header (author, date) and footer (votes, Quote / Report / Reply), signatures,
/// pagination to `pages`, site footer. `close_bodies = false` leaves every post body's `div`
/// open (broken markup the parser must survive). The one generator of thread pages for the
/// test forum server and `bench parse`.
pub fn thread_page(title: &str, path: &str, pages: u32, posts: &[PagePost], close_bodies: bool) -> String {
    let mut h = String::with_capacity(4096 + posts.iter().map(|p| p.body_html.len() + 700).sum::<usize>());
    let title = escape(title);
    h.push_str(&format!("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title} - Newschoolers.com</title>"));
    h.push_str(HEAD_END);
    h.push_str(&format!("<h1>{title}</h1>\n"));
    let body_end = if close_bodies { "</div>" } else { "" };
    for p in posts {
        let (id, who) = (&p.id, p.author);
        h.push_str(&format!(
            "<div class=\"post\" id=\"post-{id}\"><div class=\"post-header\"><a class=\"username\" href=\"/profile/{who}\">{who}</a> \
             <span class=\"post-date\">{}</span></div>\n<div class=\"post-body\">{}{body_end}\n\
             <div class=\"post-footer\"><span class=\"post-votes\"><a class=\"vote-up\" href=\"/vote/{id}/up\">&#9650;</a> {} <a class=\"vote-down\" href=\"/vote/{id}/down\">&#9660;</a></span> \
             <a href=\"{path}/reply?quote={id}\">Quote</a> &middot; <a href=\"/forum/report/{id}\">Report</a> &middot; <a href=\"{path}/reply\">Reply</a></div>\n",
            p.date, p.body_html, p.votes
        ));
        if let Some(sig) = p.signature {
            h.push_str(&format!("<div class=\"signature\">{}</div>", escape(sig)));
        }
        h.push_str("</div>\n");
    }
    pagination(&mut h, path, pages as usize);
    h.push_str(FOOTER);
    h
}

/// One thread as a list page shows it.
pub struct ListEntry<'a> {
    pub url: String,
    pub title: &'a str,
    pub replies: usize,
    pub views: u64,
    pub last_author: &'a str,
}

/// A subforum list page: chrome, search and sort links, one entry a thread, pagination.
pub fn list_page(entries: &[ListEntry], list_path: &str, pages: usize) -> String {
    let mut h = String::from("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Ski Gabber - Newschoolers.com</title>");
    h.push_str(HEAD_END);
    h.push_str(&format!("<a href=\"/forum/search?q=\">Search</a> <a href=\"{list_path}?sort=new\">Newest</a>\n"));
    for e in entries {
        h.push_str(&format!(
            "<a class=\"thread\" href=\"{}\"><h2>{}</h2><div class=\"meta\"><span class=\"replies\">{} replies</span> \
             <span class=\"views\">{} views</span> <span class=\"last\">last post by {}</span></div></a>\n",
            e.url,
            escape(e.title),
            e.replies,
            e.views,
            e.last_author
        ));
    }
    pagination(&mut h, list_path, pages);
    h.push_str(FOOTER);
    h
}

/// A thread page of `posts` random posts, linking pages 1..=`pages`.
pub fn thread_page_html(url: &Url, title: &str, page: u32, pages: u32, posts: u32, rng: &mut StdRng) -> String {
    let mut bodies = Vec::with_capacity(posts as usize);
    let mut prev: Option<(String, String)> = None;
    for i in 0..posts {
        let who = USERS[rng.random_range(0..USERS.len())];
        let body = post_body(rng, prev.as_ref().map(|(a, b)| (a.as_str(), b.as_str())));
        let date = format!("Posted Jan {}th 2023 at {}:{:02}pm", rng.random_range(4..28), rng.random_range(1..12), rng.random_range(0..60));
        let signature = rng.random_bool(0.2).then(|| SIGNATURES[rng.random_range(0..SIGNATURES.len())]);
        bodies.push((format!("{page}{i:04}"), who, date, body, rng.random_range(-3..40), signature));
        prev = Some((who.to_string(), paragraph(rng)));
    }
    let posts: Vec<PagePost> = bodies
        .iter()
        .map(|(id, who, date, body, votes, signature)| PagePost { id: id.clone(), author: who, date: date.clone(), body_html: body, votes: *votes, signature: *signature })
        .collect();
    thread_page(title, url.path(), pages, &posts, true)
}

#[derive(Debug, Clone, Default)]
pub struct SynthReport {
    pub threads: u64,
    pub pages: u64,
    pub html_bytes: u64,
    pub secs: f64,
}

/// Fill `store` with `threads` threads of `pages` pages of `posts` posts, as if crawled.
pub fn populate(store: &Store, base: &Url, threads: u32, pages: u32, posts: u32, seed: u64) -> Result<SynthReport> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = SynthReport::default();
    // One transaction per 100 threads: fast inserts without one huge write.
    for chunk_start in (0..threads).step_by(100) {
        store.in_transaction(|s| {
            for t in chunk_start..(chunk_start + 100).min(threads) {
                let id = 100_000 + u64::from(t);
                let title = format!("{} #{t}", SENTENCES[t as usize % SENTENCES.len()].trim_end_matches('.'));
                let url = base.join(&format!("/forum/thread/{id}/Synthetic-Thread-{t}"))?;
                let listed = ListedThread { id, url: url.to_string(), title: title.clone(), signature: format!("{} replies", pages * posts - 1) };
                s.insert_thread(&listed, ThreadStatus::Done, Some(pages))?;
                for p in 1..=pages {
                    let html = thread_page_html(&url, &title, p, pages, posts, &mut rng);
                    let page_url = format!("{url}?page={p}");
                    s.insert_raw_page(&PageRecord {
                        url: &page_url,
                        kind: PageKind::Thread,
                        thread_id: Some(id),
                        page_no: p,
                        http_status: 200,
                        attempts: 1,
                        etag: None,
                        last_modified: None,
                        html: html.as_bytes(),
                        page_count: Some(pages),
                        parse_error: None,
                    })?;
                    report.pages += 1;
                    report.html_bytes += html.len() as u64;
                }
                report.threads += 1;
            }
            Ok(())
        })?;
    }
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse::parse_thread_page;
    use crate::scrape::CleanOptions;

    #[test]
    fn synthetic_pages_parse_clean() {
        let url = Url::parse("https://ns.test/forum/thread/1/T").unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let html = thread_page_html(&url, "T", 2, 10, 20, &mut rng);
        let page = parse_thread_page(&html, &Url::parse("https://ns.test/forum/thread/1/T?page=2").unwrap(), &CleanOptions::default()).unwrap();
        assert_eq!(page.posts.len(), 20);
        assert_eq!(page.last_page, Some(10));
        for p in &page.posts {
            assert!(!p.body.contains("edited on") && !p.body.contains("[URL]") && !p.body.contains("wrote:"), "{}", p.body);
            assert!(!p.body.contains("Welcome to the Newschoolers") && !p.body.contains("Sponsored"), "{}", p.body);
            assert!(p.author.is_some());
        }
    }
}
