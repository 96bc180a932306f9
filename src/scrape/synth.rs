//! Synthetic forum pages with the real site's structure and artifacts: page chrome
//! and guest banner, `div.post-body` posts with author and date, quotes (some nested), edit
//! notes, signatures, BBCode remnants, emoji, curly quotes, link-only and image-only replies.
//! Used by `bench parse` to build a store of realistic size without the network.

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

/// One thread page of `posts` posts, linking pages 1..=`pages`.
pub fn thread_page_html(url: &Url, title: &str, page: u32, pages: u32, posts: u32, rng: &mut StdRng) -> String {
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>");
    h.push_str(title);
    h.push_str(" - Newschoolers.com</title><script>window.ns={user:null};</script></head><body>\n");
    h.push_str("<div class=\"nav\"><a href=\"/\">Home</a> <a href=\"/forum\">Forums</a> <a href=\"/videos\">Videos</a> <a href=\"/gear\">Gear</a></div>\n");
    h.push_str("<div class=\"banner\">Welcome to the Newschoolers forums! You may read the forums as a guest, but please sign up to post.</div>\n");
    h.push_str(&format!("<h1>{title}</h1>\n"));
    let mut prev: Option<(String, String)> = None;
    for i in 0..posts {
        let who = USERS[rng.random_range(0..USERS.len())];
        let body = post_body(rng, prev.as_ref().map(|(a, b)| (a.as_str(), b.as_str())));
        h.push_str(&format!(
            "<div class=\"post\" id=\"post-{}{:04}\"><div class=\"post-header\"><a class=\"username\" href=\"/profile/{who}\">{who}</a> \
             <span class=\"post-date\">Posted Jan {}th 2023 at {}:{:02}pm</span></div>\n<div class=\"post-body\">{body}</div>\n",
            page,
            i,
            rng.random_range(4..28),
            rng.random_range(1..12),
            rng.random_range(0..60)
        ));
        if rng.random_bool(0.2) {
            h.push_str(&format!("<div class=\"signature\">{}</div>", SIGNATURES[rng.random_range(0..SIGNATURES.len())]));
        }
        h.push_str("</div>\n");
        prev = Some((who.to_string(), paragraph(rng)));
    }
    h.push_str("<div class=\"pagination\">");
    for p in 1..=pages {
        h.push_str(&format!("<a href=\"{}?page={p}\">{p}</a> ", url.path()));
    }
    h.push_str("</div>\n<div class=\"footer\">&copy; Newschoolers.com &middot; <a href=\"/privacy\">Privacy</a></div></body></html>\n");
    h
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
