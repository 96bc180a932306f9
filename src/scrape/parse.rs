//! HTML extraction: thread list entries (`a.thread > h2`) and posts (`div.post-body`), with
//! the DOM walk that turns a post body into text while setting quotes and signatures aside.
//! html5ever repairs any markup, so broken pages come back as [`ParseError`]s describing what is
//! missing, never as panics.

use std::sync::LazyLock;

use ego_tree::NodeRef;
use scraper::{ElementRef, Html, Node, Selector};
use url::Url;

use super::clean::{clean_post, clean_quote, clean_title, CleanOptions};
use crate::store::{ListedThread, StoredPost};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not an HTML page ({0})")]
    NotHtml(String),
    #[error("no thread links (a.thread) on the list page")]
    NoThreads,
    #[error("no post bodies (div.post-body) on the thread page")]
    NoPosts,
}

fn sel(s: &str) -> Selector {
    // Selectors are literals here, exercised by the tests.
    Selector::parse(s).expect("valid built-in selector")
}

static THREAD_LINK: LazyLock<Selector> = LazyLock::new(|| sel("a.thread"));
static TITLE: LazyLock<Selector> = LazyLock::new(|| sel("h2"));
static POST_BODY: LazyLock<Selector> = LazyLock::new(|| sel("div.post-body"));
static LINK: LazyLock<Selector> = LazyLock::new(|| sel("a[href]"));
static AUTHOR: LazyLock<Selector> = LazyLock::new(|| sel(".username, .author, .post-author, [itemprop=author]"));
static DATE: LazyLock<Selector> = LazyLock::new(|| sel("time, .post-date, .date, .timestamp"));

/// Entries of one thread list page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub threads: Vec<ListedThread>,
    /// Highest `?page=N` the pagination links to (or this page's own number).
    pub last_page: Option<u32>,
    /// `a.thread` entries without a usable link or title.
    pub skipped: usize,
}

/// Posts of one thread page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadPage {
    pub posts: Vec<StoredPost>,
    pub last_page: Option<u32>,
}

/// Decode a response body; invalid UTF-8 is replaced rather than rejected (html5ever would do
/// the same), but a body with no markup at all is not a page.
pub fn decode_body(bytes: &[u8]) -> Result<String, ParseError> {
    let text = String::from_utf8_lossy(bytes);
    let head: String = text.chars().take(2048).collect();
    if !head.contains('<') {
        return Err(ParseError::NotHtml(format!("{} bytes without markup", bytes.len())));
    }
    Ok(text.into_owned())
}

/// The forum's numeric thread id from `/forum/thread/{id}/{Slug}`.
pub fn thread_id_from_url(url: &Url) -> Option<u64> {
    let mut segs = url.path_segments()?;
    while let Some(s) = segs.next() {
        if s == "thread" {
            return segs.next()?.parse().ok();
        }
    }
    None
}

/// The URL of page `n` of a thread or list whose canonical URL is `base`.
pub fn page_url(base: &Url, n: u32) -> Url {
    let mut u = base.clone();
    u.set_fragment(None);
    u.set_query(Some(&format!("page={n}")));
    u
}

/// Canonical thread URL: no query, no fragment.
pub fn canonical(url: &Url) -> Url {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u
}

fn page_of(url: &Url) -> Option<u32> {
    url.query_pairs().find(|(k, _)| k == "page").and_then(|(_, v)| v.parse().ok())
}

/// Highest page number linked from `doc` for the same path as `page`.
fn last_page(doc: &Html, page: &Url) -> Option<u32> {
    let mut best = page_of(page);
    for a in doc.select(&LINK) {
        let Some(href) = a.value().attr("href") else {
            continue;
        };
        let Ok(target) = page.join(href) else {
            continue;
        };
        if target.path() == page.path() && target.host_str() == page.host_str() {
            if let Some(n) = page_of(&target) {
                best = Some(best.map_or(n, |b: u32| b.max(n)));
            }
        }
    }
    best
}

fn has_class(e: &ElementRef<'_>, pred: impl Fn(&str) -> bool) -> bool {
    e.value().classes().any(pred)
}

/// Text of an element with whitespace collapsed to single spaces.
fn inline_text(e: &ElementRef<'_>) -> String {
    e.text().collect::<Vec<_>>().join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn parse_list_page(html: &str, page: &Url, opts: &CleanOptions) -> Result<ListPage, ParseError> {
    let doc = Html::parse_document(html);
    let mut threads = Vec::new();
    let mut skipped = 0;
    for a in doc.select(&THREAD_LINK) {
        let url = a.value().attr("href").and_then(|h| page.join(h).ok());
        let title = a.select(&TITLE).next().map(|h| clean_title(&inline_text(&h), opts)).filter(|t| !t.is_empty());
        let (Some(url), Some(title)) = (url, title) else {
            skipped += 1;
            continue;
        };
        let Some(id) = thread_id_from_url(&url) else {
            skipped += 1;
            continue;
        };
        threads.push(ListedThread { id, url: canonical(&url).to_string(), title, signature: list_signature(&a) });
    }
    if threads.is_empty() && skipped == 0 && page_of(page).unwrap_or(1) <= 1 {
        return Err(ParseError::NoThreads);
    }
    Ok(ListPage { threads, last_page: last_page(&doc, page), skipped })
}

/// What the list shows about a thread besides view counters (which change on every visit):
/// reply count, last poster and time. A new reply changes it.
fn list_signature(a: &ElementRef<'_>) -> String {
    let mut parts = Vec::new();
    collect_signature_text(**a, &mut parts);
    parts.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn collect_signature_text(node: NodeRef<'_, Node>, out: &mut Vec<String>) {
    for child in node.children() {
        match child.value() {
            Node::Text(t) => out.push(t.to_string()),
            Node::Element(e) if e.classes().any(|c| c.contains("view")) => {}
            Node::Element(_) => collect_signature_text(child, out),
            _ => {}
        }
    }
}

pub fn parse_thread_page(html: &str, page: &Url, opts: &CleanOptions) -> Result<ThreadPage, ParseError> {
    let doc = Html::parse_document(html);
    let mut posts = Vec::new();
    for (i, body) in doc.select(&POST_BODY).enumerate() {
        let container = post_container(&body);
        let (post_id, author, posted_at) = match &container {
            Some(c) => (post_id(c), header_field(c, &body, &AUTHOR, false), header_field(c, &body, &DATE, true)),
            None => (None, None, None),
        };
        let mut text = String::new();
        let mut html_quotes = Vec::new();
        walk(*body, page, opts, &mut text, &mut html_quotes);
        let cleaned = clean_post(&text, opts);
        let mut quotes: Vec<String> = html_quotes.iter().map(|q| clean_quote(q, opts)).filter(|q| !q.is_empty()).collect();
        quotes.extend(cleaned.quotes);
        posts.push(StoredPost { position: i as u32, post_id, author, posted_at, body: cleaned.body, quotes });
    }
    if posts.is_empty() {
        return Err(ParseError::NoPosts);
    }
    Ok(ThreadPage { posts, last_page: last_page(&doc, page) })
}

/// The element wrapping one post (header, body, signature): the nearest ancestor marked as a
/// post, else the body's parent.
fn post_container<'a>(body: &ElementRef<'a>) -> Option<ElementRef<'a>> {
    let mut parent = None;
    for anc in body.ancestors().filter_map(ElementRef::wrap) {
        if parent.is_none() {
            parent = Some(anc);
        }
        let v = anc.value();
        if v.classes().any(|c| c == "post") || v.attr("data-post-id").is_some() || v.id().is_some_and(|id| id.starts_with("post")) {
            return Some(anc);
        }
    }
    parent
}

fn post_id(c: &ElementRef<'_>) -> Option<String> {
    let v = c.value();
    v.attr("data-post-id")
        .map(str::to_string)
        .or_else(|| v.id().and_then(|id| id.strip_prefix("post")).map(|s| s.trim_start_matches(['-', '_']).to_string()))
        .filter(|s| !s.is_empty())
}

/// First match of `sel` inside the post container but outside its body (so a quote's
/// "X wrote:" never becomes the author). Dates prefer a machine-readable `datetime`.
fn header_field(container: &ElementRef<'_>, body: &ElementRef<'_>, sel: &Selector, datetime: bool) -> Option<String> {
    let body_id = body.id();
    container
        .select(sel)
        .find(|e| !e.ancestors().any(|a| a.id() == body_id) && e.id() != body_id)
        .and_then(|e| {
            let attr = if datetime { e.value().attr("datetime").map(str::to_string) } else { None };
            attr.or_else(|| Some(inline_text(&e)))
        })
        .filter(|s| !s.is_empty())
}

fn is_block(name: &str) -> Option<&'static str> {
    Some(match name {
        "p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "ul" | "ol" | "pre" | "table" | "hr" => "\n\n",
        "div" | "li" | "tr" | "dd" | "dt" | "section" | "article" => "\n",
        _ => return None,
    })
}

fn looks_like_url(s: &str) -> bool {
    let s = s.trim();
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("www.")
}

/// Class names (whole, or as the end of a `-` compound such as `post-actions`) of a post's
/// furniture: header, meta line, action links, vote counters, footer, signature.
const CHROME_CLASSES: &[&str] = &[
    "header",
    "meta",
    "info",
    "details",
    "actions",
    "action",
    "tools",
    "toolbar",
    "controls",
    "buttons",
    "links",
    "footer",
    "votes",
    "vote",
    "vote-count",
    "score",
    "points",
    "rating",
    "likes",
    "like-count",
    "permalink",
    "report",
    "signature",
    "sig",
];

/// Link texts that are a post's action links, not something the poster wrote ("edit" and
/// "share" are left out: a ski film is an edit, and posters link them).
const ACTION_WORDS: &[&str] = &["quote", "+quote", "multiquote", "report", "reply", "permalink"];

fn is_chrome_class(c: &str) -> bool {
    let c = c.to_ascii_lowercase();
    // Inside a quote, its own header ("X wrote:") is handled with the quote.
    if c.starts_with("quote") || c.ends_with("quote") || c.starts_with("bb") {
        return false;
    }
    CHROME_CLASSES.iter().any(|k| c == *k || c.strip_suffix(k).is_some_and(|p| p.ends_with(['-', '_'])))
}

/// Whether an element inside a post body is page furniture rather than the post's text. In
/// well-formed pages these blocks follow the body; where the body's `</div>` is missing,
/// html5ever puts them inside it, so the body's text ends at the first one.
fn is_chrome(el: &ElementRef<'_>) -> bool {
    let v = el.value();
    if matches!(v.name(), "footer" | "header" | "nav" | "menu") {
        return true;
    }
    if v.classes().any(is_chrome_class) || v.attr("data-action").is_some() {
        return true;
    }
    if matches!(v.name(), "a" | "button") {
        let text = inline_text(el).to_ascii_lowercase();
        let text = text.trim_matches(|c: char| !c.is_alphanumeric() && c != '+');
        return ACTION_WORDS.contains(&text);
    }
    false
}

/// Whether walking reached the end of the post's own text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Continue,
    /// Post furniture or the next post: nothing after this point is the post's text.
    End,
}

/// Post body DOM → text. Paragraph structure becomes line breaks; quotes go to `quotes`;
/// scripts and images are skipped; autolinks become their full URL (the visible text is often
/// shortened with "…"). The walk ends at the post's furniture (see [`is_chrome`]) or at a
/// post nested by broken markup.
fn walk(node: NodeRef<'_, Node>, page: &Url, opts: &CleanOptions, out: &mut String, quotes: &mut Vec<String>) -> Walk {
    for child in node.children() {
        match child.value() {
            Node::Text(t) => {
                // Source line breaks are layout, not content; only <br>/<p> break lines.
                for c in t.chars() {
                    out.push(if c.is_whitespace() && c != '\u{a0}' { ' ' } else { c });
                }
            }
            Node::Element(e) => {
                let Some(el) = ElementRef::wrap(child) else {
                    continue;
                };
                let name = e.name();
                if matches!(name, "script" | "style" | "noscript" | "template" | "form") {
                    continue;
                }
                // Broken markup can nest the next post inside this body; it is its own post,
                // and what follows it belongs to it too.
                if has_class(&el, |c| c == "post" || c == "post-body") || e.attr("data-post-id").is_some() {
                    return Walk::End;
                }
                if is_chrome(&el) {
                    return Walk::End;
                }
                if name == "button" {
                    continue;
                }
                if name == "blockquote" || has_class(&el, |c| c == "quote" || c.ends_with("-quote") || c == "quotebox") {
                    let mut q = String::new();
                    let mut nested = Vec::new();
                    let end = walk(child, page, opts, &mut q, &mut nested);
                    quotes.push(q);
                    out.push_str("\n\n");
                    if end == Walk::End {
                        return end;
                    }
                    continue;
                }
                match name {
                    "br" => out.push('\n'),
                    "img" => {
                        let v = e;
                        let emoticon = has_class(&el, |c| c.contains("emoji") || c.contains("smil")) || v.attr("src").is_some_and(|s| s.contains("smil") || s.contains("emoji"));
                        if emoticon && opts.keep_emoji {
                            if let Some(alt) = v.attr("alt") {
                                out.push(' ');
                                out.push_str(alt);
                            }
                        }
                    }
                    "iframe" | "video" | "embed" | "source" => {
                        if let Some(src) = e.attr("src").and_then(|s| page.join(s).ok()) {
                            out.push(' ');
                            out.push_str(src.as_str());
                            out.push(' ');
                        }
                    }
                    "a" => {
                        let text = inline_text(&el);
                        let href = e.attr("href").and_then(|h| page.join(h).ok()).filter(|u| matches!(u.scheme(), "http" | "https"));
                        match href {
                            Some(h) if text.is_empty() || looks_like_url(&text) => {
                                out.push(' ');
                                out.push_str(h.as_str());
                                out.push(' ');
                            }
                            _ => {
                                if walk(child, page, opts, out, quotes) == Walk::End {
                                    return Walk::End;
                                }
                            }
                        }
                    }
                    _ => {
                        let sep = is_block(name);
                        if let Some(s) = sep {
                            out.push_str(s);
                        }
                        if walk(child, page, opts, out, quotes) == Walk::End {
                            return Walk::End;
                        }
                        if let Some(s) = sep {
                            out.push_str(s);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Walk::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn list_page_entries_signature_and_pagination() {
        let html = r#"<html><body><div class="banner">Welcome to the Newschoolers forums! Sign up.</div>
          <a class="thread" href="https://ns.test/forum/thread/981234/Best-park-ski-2023?x=1#new"><h2>Best park ski &amp; mount point?</h2>
            <span class="replies">12 replies</span><span class="views">3,402 views</span><span class="last">by sendit 2h ago</span></a>
          <a class="thread" href="/forum/thread/981235/Beacon-recs"><h2>Beacon recs</h2><span class="replies">0 replies</span></a>
          <a class="thread" href="/forum/somewhere/else"><h2>No id</h2></a>
          <div class="pagination"><a href="?page=2">2</a><a href="/forum/1/Ski-Gabber?page=7">Last</a><a href="/forum/2/Other?page=99">x</a></div>
        </body></html>"#;
        let p = parse_list_page(html, &url("https://ns.test/forum/1/Ski-Gabber?page=1"), &CleanOptions::default()).unwrap();
        assert_eq!(p.threads.len(), 2);
        assert_eq!(p.skipped, 1);
        assert_eq!(p.last_page, Some(7));
        assert_eq!(p.threads[0].id, 981234);
        assert_eq!(p.threads[0].url, "https://ns.test/forum/thread/981234/Best-park-ski-2023");
        assert_eq!(p.threads[0].title, "Best park ski & mount point?");
        assert!(p.threads[0].signature.contains("12 replies"));
        assert!(!p.threads[0].signature.contains("views"));
        assert_eq!(p.threads[1].url, "https://ns.test/forum/thread/981235/Beacon-recs");
        let err = parse_list_page("<html><body>nothing</body></html>", &url("https://ns.test/forum/1/x?page=1"), &CleanOptions::default());
        assert_eq!(err.unwrap_err(), ParseError::NoThreads);
    }

    #[test]
    fn thread_page_posts_quotes_signatures_authors() {
        let html = r#"<html><body>
          <div class="post" id="post-501"><div class="post-header"><a class="username">powder_hound</a>
            <time datetime="2023-01-10T21:58:47Z">Jan 10th 2023</time></div>
            <div class="post-body">Are Bent Chetler 100s any good
in the park?<br><br>I mostly ride
 pow but want one quiver ski.<br><br>**This post was edited on Jan 10th 2023 at 9:58:47pm</div>
            <div class="signature">Insta: @powder_hound</div></div>
          <div class="post" id="post-502"><a class="username">sendit</a><span class="post-date">Jan 11th 2023</span>
            <div class="post-body"><div class="quote"><div class="quote-header"><span class="username">powder_hound</span> wrote:</div>
              Are Bent Chetler 100s any good in the park?<div class="quote">nested older quote</div></div>
              <p>They're playful but soft underfoot.</p><p>Check <a href="https://youtu.be/abc">https://youtu.be/ab…</a> and
              <a href="/gear/review">my review</a> <img class="emoji" alt=":D" src="/smilies/grin.gif"><img src="https://i.imgur.com/x.jpg"></p>
              <div class="post-signature">Sponsored by nobody</div></div></div>
          <div class="pagination"><a href="https://ns.test/forum/thread/5/T?page=3">3</a></div></body></html>"#;
        let page = url("https://ns.test/forum/thread/5/T?page=1");
        let keep = CleanOptions { keep_urls: true, keep_emoji: false };
        let p = parse_thread_page(html, &page, &keep).unwrap();
        assert_eq!(p.last_page, Some(3));
        assert_eq!(p.posts.len(), 2);
        let op = &p.posts[0];
        assert_eq!(op.post_id.as_deref(), Some("501"));
        assert_eq!(op.author.as_deref(), Some("powder_hound"));
        assert_eq!(op.posted_at.as_deref(), Some("2023-01-10T21:58:47Z"));
        assert_eq!(op.body, "Are Bent Chetler 100s any good in the park?\n\nI mostly ride pow but want one quiver ski.");
        let r = &p.posts[1];
        assert_eq!(r.author.as_deref(), Some("sendit"), "quote header must not become the author");
        assert_eq!(r.posted_at.as_deref(), Some("Jan 11th 2023"));
        assert_eq!(r.body, "They're playful but soft underfoot.\n\nCheck https://youtu.be/abc and my review");
        assert_eq!(r.quotes.len(), 1);
        assert!(r.quotes[0].contains("Bent Chetler"));
        assert!(!r.quotes[0].contains("nested older quote"));
        let with = CleanOptions { keep_urls: false, keep_emoji: true };
        let p = parse_thread_page(html, &page, &with).unwrap();
        assert_eq!(p.posts[1].body, "They're playful but soft underfoot.\n\nCheck and my review :D");
    }

    #[test]
    fn broken_markup_is_an_error_not_a_panic() {
        let page = url("https://ns.test/forum/thread/5/T?page=2");
        let o = CleanOptions::default();
        assert_eq!(parse_thread_page("<html><body><div class=\"post\"><div class=\"post-b", &page, &o).unwrap_err(), ParseError::NoPosts);
        assert!(matches!(decode_body(b"\xff\xfe\x00garbage").unwrap_err(), ParseError::NotHtml(_)));
        // Unclosed tags around complete posts still parse.
        let p = parse_thread_page("<div class=post><div class=post-body>still <b>here<div class=post><div class=post-body>two", &page, &o).unwrap();
        assert_eq!(p.posts.len(), 2);
        assert_eq!(p.posts[0].body, "still here");
    }

    #[test]
    fn urls_helpers() {
        let u = url("https://ns.test/forum/thread/42/Slug?page=3#x");
        assert_eq!(thread_id_from_url(&u), Some(42));
        assert_eq!(page_url(&canonical(&u), 2).as_str(), "https://ns.test/forum/thread/42/Slug?page=2");
        assert_eq!(thread_id_from_url(&url("https://ns.test/forum/1/Ski")), None);
    }

    #[test]
    fn post_chrome_is_never_body_text_even_when_the_body_is_unclosed() {
        let page = url("https://ns.test/forum/thread/5/T?page=1");
        let o = CleanOptions::default().for_store();
        let post = |id: u32, body: &str, close_body: bool| {
            format!(
                "<div class=\"post\" id=\"post-{id}\"><div class=\"post-header\"><a class=\"username\">user{id}</a> \
                 <span class=\"post-date\">Jan 4th 2023</span></div><div class=\"post-body\">{body}{}\n\
                 <div class=\"post-footer\"><span class=\"post-votes\"><a class=\"vote-up\">&#9650;</a> 12 <a class=\"vote-down\">&#9660;</a></span>\
                 <a href=\"/forum/reply/5?quote={id}\">Quote</a> &middot; <a href=\"/report/{id}\">Report</a> &middot; <a href=\"/forum/reply/5\">Reply</a></div>\
                 <div class=\"signature\">Team Couch</div></div>\n",
                if close_body { "</div>" } else { "" }
            )
        };
        for close in [true, false] {
            let html = format!(
                "<html><body>{}{}{}</body></html>",
                post(1, "Mount them at true center for park.", true),
                post(2, "<a href=\"https://youtu.be/a\">https://youtu.be/a</a> <a href=\"https://youtu.be/b\">https://youtu.be/b</a>", close),
                post(3, "<p>Wax them every few days in spring.</p>", close)
            );
            let p = parse_thread_page(&html, &page, &o).unwrap();
            let bodies: Vec<_> = p.posts.iter().map(|p| p.body.as_str()).collect();
            assert_eq!(bodies, vec!["Mount them at true center for park.", "https://youtu.be/a https://youtu.be/b", "Wax them every few days in spring."], "body closed: {close}");
            let authors: Vec<_> = p.posts.iter().map(|p| p.author.as_deref()).collect();
            assert_eq!(authors, vec![Some("user1"), Some("user2"), Some("user3")]);
        }
        // Bare action links straight after an unclosed body end it too.
        let html = "<div class=post><div class=post-body>Boots matter more than skis.\n\
                    <a href=\"/q/1\">Quote</a> · <a href=\"/r/1\">Report</a></div>";
        let p = parse_thread_page(html, &page, &o).unwrap();
        assert_eq!(p.posts[0].body, "Boots matter more than skis.");
        // A film edit linked by name is the poster's text, and a quote's header is the quote's.
        let html = "<div class=post><div class=post-body><div class=quote><div class=quote-header>x wrote:</div>old</div>\
                    Check my <a href=\"https://youtu.be/e\">edit</a> from Laax.</div></div>";
        let p = parse_thread_page(html, &page, &o).unwrap();
        assert_eq!(p.posts[0].body, "Check my edit from Laax.");
        assert_eq!(p.posts[0].quotes.len(), 1);
    }
}
