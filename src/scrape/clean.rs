//! Text cleaning of post bodies after the HTML walk in [`super::parse`]: forum edit notes,
//! BBCode left in the text, BBCode quotes, signature blocks, URLs (kept or dropped), entities
//! that were escaped twice, emoji and typographic quotes, and whitespace, keeping paragraphs.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Bump when cleaning output changes, so stored posts are re-parsed from the raw HTML.
/// 2: post meta, action and footer blocks end a post body; URLs are always stored.
pub const CLEANER_VERSION: u32 = 2;

/// How much of a post's text to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanOptions {
    /// Keep links as plain URLs (true) or drop them (false). The store always keeps them (see
    /// [`CleanOptions::for_store`]), so a link-only post is still recognised as one and the
    /// links stay citable; the dataset builder applies this to the training text.
    pub keep_urls: bool,
    /// Keep emoji characters and emoticon images' alt text.
    pub keep_emoji: bool,
}

impl CleanOptions {
    /// The cleaning stored posts are made with: URLs kept whatever `keep_urls` says, since
    /// dropping them is a choice about training text, not about what the forum said.
    pub fn for_store(&self) -> CleanOptions {
        CleanOptions { keep_urls: true, ..*self }
    }

    /// Identifies the cleaning that produced stored posts.
    pub fn fingerprint(&self) -> String {
        format!("clean-v{CLEANER_VERSION};keep_urls={};keep_emoji={}", self.keep_urls, self.keep_emoji)
    }
}

/// A post's own text and the quotes of other posts found in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cleaned {
    pub body: String,
    pub quotes: Vec<String>,
}

fn re(pattern: &str) -> Regex {
    // Patterns are literals in this file, covered by the tests below.
    Regex::new(pattern).expect("valid built-in regex")
}

static EDIT_NOTE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)(?:\*\*\s*)?this (?:post|thread) was (?:last )?edited on [a-z]{3,9}\.? \d{1,2}(?:st|nd|rd|th)?,? \d{4}(?:,? at \d{1,2}:\d{2}(?::\d{2})?\s*(?:[ap]\.?m\.?)?)?(?: by [^\n]*)?",
    )
});
static QUOTE_TAG: LazyLock<Regex> = LazyLock::new(|| re(r#"(?i)\[(/?)quote(?:=[^\]\n]*)?\]"#));
static BB_URL_NAMED: LazyLock<Regex> = LazyLock::new(|| re(r#"(?is)\[url=["']?([^\]"']+)["']?\](.*?)\[/url\]"#));
static BB_URL: LazyLock<Regex> = LazyLock::new(|| re(r"(?is)\[url\](.*?)\[/url\]"));
static BB_IMG: LazyLock<Regex> = LazyLock::new(|| re(r"(?is)\[img(?:=[^\]]*)?\].*?\[/img\]"));
static BB_MEDIA: LazyLock<Regex> = LazyLock::new(|| re(r"(?is)\[(?:youtube|video|media)(?:=[^\]]*)?\]\s*([^\[\s]*)\s*\[/(?:youtube|video|media)\]"));
static BB_LIST_ITEM: LazyLock<Regex> = LazyLock::new(|| re(r"\[\*\]"));
static BB_TAG: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r#"(?i)\[/?(?:b|i|u|s|strike|color|size|font|center|left|right|justify|indent|list|code|php|html|spoiler|highlight|h[1-6]|sub|sup|table|tr|td|hr|noparse|plain|url|img|quote|youtube|video|media|email|attach)(?:=[^\]\n]*)?\]"#,
    )
});
// A URL never ends in punctuation that belongs to the sentence around it.
static URL: LazyLock<Regex> = LazyLock::new(|| re(r#"(?i)\b(?:https?://|www\.)[^\s<>"\[\]]*[^\s<>"\[\]().,;:!?'"]"#));
static PARENS_AROUND_DROPPED: LazyLock<Regex> = LazyLock::new(|| re("[(\\[] *\u{0} *[)\\]]"));
static DROPPED_URL_BEFORE_PUNCT: LazyLock<Regex> = LazyLock::new(|| re(" *\u{0} *([,.;:!?])"));
static ENTITY: LazyLock<Regex> = LazyLock::new(|| re(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});"));
static SIG_DELIM: LazyLock<Regex> = LazyLock::new(|| re(r"^\s*(?:--|—|_{4,}|-{4,}|={4,}|~{4,})\s*$"));
static GUEST_BANNER: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)welcome to the newschoolers forums![^\n]*"));
static SPACES: LazyLock<Regex> = LazyLock::new(|| re(r"[ \t\x0B\x0C]+"));
static EMPTY_PARENS: LazyLock<Regex> = LazyLock::new(|| re(r"\(\s*\)|\[\s*\]"));

/// Clean a post body (text from the HTML walk, paragraphs as blank lines).
pub fn clean_post(text: &str, opts: &CleanOptions) -> Cleaned {
    let text = normalize_chars(text, opts);
    let text = decode_entities(&text);
    let (body, bb_quotes) = split_bbcode_quotes(&text);
    let body = clean_fragment(&body, opts);
    let quotes = bb_quotes.iter().map(|q| clean_fragment(q, opts)).filter(|q| !q.is_empty()).collect();
    Cleaned { body, quotes }
}

/// Clean a quote found as HTML (already separated from the body by the parser).
pub fn clean_quote(text: &str, opts: &CleanOptions) -> String {
    let text = decode_entities(&normalize_chars(text, opts));
    let (body, inner) = split_bbcode_quotes(&text);
    let mut out = clean_fragment(&body, opts);
    if out.is_empty() {
        out = inner.iter().map(|q| clean_fragment(q, opts)).collect::<Vec<_>>().join("\n\n");
    }
    out
}

/// Clean a thread title: one line, same character rules as posts, never split.
pub fn clean_title(text: &str, opts: &CleanOptions) -> String {
    let text = decode_entities(&normalize_chars(text, opts));
    let text = BB_TAG.replace_all(&text, "");
    SPACES.replace_all(&text.replace('\n', " "), " ").trim().to_string()
}

fn clean_fragment(text: &str, opts: &CleanOptions) -> String {
    let text = EDIT_NOTE.replace_all(text, "");
    let text = GUEST_BANNER.replace_all(&text, "");
    let text = resolve_bbcode(&text);
    let text = cut_signature(&text);
    let text = if opts.keep_urls { text } else { drop_urls(&text) };
    normalize_whitespace(&text)
}

/// Typographic quotes to ASCII, invisible characters out, emoji out unless kept.
fn normalize_chars(text: &str, opts: &CleanOptions) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' => {}
            '\u{a0}' | '\u{2007}' | '\u{202f}' | '\u{2009}' | '\u{200a}' => out.push(' '),
            '\u{200b}' | '\u{200c}' | '\u{2060}' | '\u{feff}' | '\u{ad}' => {}
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' | '\u{2032}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' | '\u{2033}' => out.push('"'),
            '\u{2026}' => out.push_str("..."),
            c if !opts.keep_emoji && is_emoji(c) => {}
            c => out.push(c),
        }
    }
    out
}

fn is_emoji(c: char) -> bool {
    matches!(c as u32,
        0x1F000..=0x1FAFF   // pictographs, emoticons, transport, flags, skin tones
        | 0x2600..=0x27BF   // misc symbols and dingbats
        | 0x2B00..=0x2BFF   // stars, arrows used as emoji
        | 0x2300..=0x23FF   // watch, hourglass, play buttons
        | 0xFE0E | 0xFE0F   // variation selectors
        | 0x200D            // zero-width joiner inside emoji sequences
        | 0x20E3            // keycap
        | 0xE0020..=0xE007F // tag sequences
    )
}

/// Entities still in the text after the HTML parser decoded one level (double-escaped source).
pub fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    ENTITY
        .replace_all(text, |caps: &regex::Captures<'_>| {
            let name = &caps[1];
            let decoded = if let Some(num) = name.strip_prefix('#') {
                let value = match num.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => num.parse::<u32>().ok(),
                };
                value.and_then(char::from_u32).map(|c| c.to_string())
            } else {
                named_entity(name).map(str::to_string)
            };
            decoded.unwrap_or_else(|| caps[0].to_string())
        })
        .into_owned()
}

fn named_entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        "nbsp" => " ",
        "hellip" => "...",
        "mdash" => "—",
        "ndash" => "–",
        "lsquo" | "rsquo" => "'",
        "ldquo" | "rdquo" => "\"",
        "deg" => "°",
        "eacute" => "é",
        "copy" => "©",
        _ => return None,
    })
}

/// Separate `[QUOTE]…[/QUOTE]` blocks (nesting allowed) from the text. Unbalanced tags are
/// dropped without swallowing the text around them.
fn split_bbcode_quotes(text: &str) -> (String, Vec<String>) {
    if !QUOTE_TAG.is_match(text) {
        return (text.to_string(), Vec::new());
    }
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let mut outer: Vec<(usize, usize, usize, usize)> = Vec::new();
    for m in QUOTE_TAG.captures_iter(text) {
        let Some(whole) = m.get(0) else { continue };
        let closing = m.get(1).is_some_and(|g| !g.as_str().is_empty());
        if !closing {
            stack.push((whole.start(), whole.end()));
        } else if let Some(open) = stack.pop() {
            if stack.is_empty() {
                outer.push((open.0, open.1, whole.start(), whole.end()));
            }
        }
    }
    let mut body = String::with_capacity(text.len());
    let mut quotes = Vec::new();
    let mut at = 0;
    for (open_start, open_end, close_start, close_end) in outer {
        body.push_str(&text[at..open_start]);
        body.push('\n');
        quotes.push(QUOTE_TAG.replace_all(&text[open_end..close_start], "\n").into_owned());
        at = close_end;
    }
    body.push_str(&text[at..]);
    (QUOTE_TAG.replace_all(&body, "").into_owned(), quotes)
}

fn resolve_bbcode(text: &str) -> String {
    if !text.contains('[') {
        return text.to_string();
    }
    let t = BB_IMG.replace_all(text, " ");
    let t = BB_MEDIA.replace_all(&t, |c: &regex::Captures<'_>| {
        let v = c[1].trim();
        if v.is_empty() {
            " ".to_string()
        } else if URL.is_match(v) {
            format!(" {v} ")
        } else {
            format!(" https://youtu.be/{v} ")
        }
    });
    let t = BB_URL_NAMED.replace_all(&t, |c: &regex::Captures<'_>| {
        let label = c[2].trim();
        if label.is_empty() {
            format!(" {} ", c[1].trim())
        } else {
            format!(" {label} ")
        }
    });
    // Spaces around the URL: the prototype's `[URL]https://youtu.be/x[/URL]Anyway` glued the
    // next word onto the link.
    let t = BB_URL.replace_all(&t, " $1 ");
    let t = BB_LIST_ITEM.replace_all(&t, "\n- ");
    BB_TAG.replace_all(&t, "").into_owned()
}

/// Drop a trailing signature block set off by a delimiter line (`--`, `____`, …), when what
/// follows is short enough to be a signature rather than the rest of the post.
fn cut_signature(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(idx) = lines.iter().rposition(|l| SIG_DELIM.is_match(l)) else {
        return text.to_string();
    };
    let tail: Vec<&str> = lines[idx + 1..].iter().copied().filter(|l| !l.trim().is_empty()).collect();
    let tail_chars: usize = tail.iter().map(|l| l.len()).sum();
    if tail.len() <= 6 && tail_chars <= 400 {
        lines[..idx].join("\n")
    } else {
        text.to_string()
    }
}

fn drop_urls(text: &str) -> String {
    // Mark where URLs were, so only the spaces they leave before punctuation are tidied.
    let t = URL.replace_all(text, "\u{0}");
    let t = PARENS_AROUND_DROPPED.replace_all(&t, "\u{0}");
    let t = DROPPED_URL_BEFORE_PUNCT.replace_all(&t, "$1");
    let t = t.replace('\u{0}', "");
    EMPTY_PARENS.replace_all(&t, "").into_owned()
}

/// Collapse runs of spaces, trim lines, keep single line breaks and at most one blank line
/// between paragraphs.
pub fn normalize_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.lines() {
        let line = SPACES.replace_all(line, " ");
        let line = line.trim();
        if line.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

/// URLs in `text` (for link-only detection).
pub fn urls(text: &str) -> impl Iterator<Item = &str> {
    URL.find_iter(text).map(|m| m.as_str())
}

/// `text` without its URLs.
pub fn without_urls(text: &str) -> String {
    drop_urls(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep() -> CleanOptions {
        CleanOptions { keep_urls: true, keep_emoji: false }
    }

    #[test]
    fn removes_prototype_edit_notes() {
        let t = "Go with the Line Chronic, it's a great park ski.\n\n**This post was edited on Jan 10th 2023 at 9:58:47pm";
        assert_eq!(clean_post(t, &keep()).body, "Go with the Line Chronic, it's a great park ski.");
        let t = "Looking for a new pair of skis for next season.**This thread was edited on Oct 21st 2020 at 8:21:07pm";
        assert_eq!(clean_post(t, &keep()).body, "Looking for a new pair of skis for next season.");
        let t = "**This post was edited on Jan 13th 2022 at 9:58:47pm\nActual text";
        assert_eq!(clean_post(t, &keep()).body, "Actual text");
    }

    #[test]
    fn bbcode_url_does_not_glue_next_word() {
        let t = "Watch this edit [URL]https://youtu.be/dQw4w9WgXcQ[/URL]Anyway the landing was sketchy";
        assert_eq!(clean_post(t, &keep()).body, "Watch this edit https://youtu.be/dQw4w9WgXcQ Anyway the landing was sketchy");
        let drop = CleanOptions { keep_urls: false, keep_emoji: false };
        assert_eq!(clean_post(t, &drop).body, "Watch this edit Anyway the landing was sketchy");
        let t = "[url=https://example.com/review]my review[/url] says [b]stiff[/b] [COLOR=red]but fun[/COLOR] [IMG]https://i.imgur.com/x.jpg[/IMG]";
        assert_eq!(clean_post(t, &keep()).body, "my review says stiff but fun");
        let t = "[YOUTUBE]abc123[/YOUTUBE]";
        assert_eq!(clean_post(t, &keep()).body, "https://youtu.be/abc123");
        assert_eq!(clean_post(t, &drop).body, "");
        // Brackets that are not BBCode stay.
        assert_eq!(clean_post("he said [sic] it", &keep()).body, "he said [sic] it");
    }

    #[test]
    fn bbcode_quotes_are_separated_even_nested() {
        let t = "[QUOTE=powder_hound]Are [quote]inner[/quote] Bent Chetlers good in park?[/QUOTE]\nThey are more of a pow ski honestly.";
        let c = clean_post(t, &keep());
        assert_eq!(c.body, "They are more of a pow ski honestly.");
        assert_eq!(c.quotes.len(), 1);
        assert!(c.quotes[0].contains("Bent Chetlers"), "{:?}", c.quotes);
        // An unclosed quote tag does not eat the reply.
        let c = clean_post("[quote]I think so too", &keep());
        assert_eq!(c.body, "I think so too");
        assert!(c.quotes.is_empty());
    }

    #[test]
    fn signature_block_is_cut_but_long_tail_kept() {
        let t = "Mount them at +1 from true center.\n--\nInstagram: @sendit_steve | Sponsored by my mom";
        assert_eq!(clean_post(t, &keep()).body, "Mount them at +1 from true center.");
        let long_tail = format!("Intro\n----\n{}", "A real second section of the post. ".repeat(20));
        assert!(clean_post(&long_tail, &keep()).body.contains("real second section"));
    }

    #[test]
    fn entities_quotes_emoji_and_whitespace() {
        let t = "It\u{2019}s \u{201c}fine\u{201d}\u{2026} &amp;quot;ok&amp;quot; 😂🤙🏼 tom &amp; jerry\u{a0}\u{a0}x\u{200b}y\n\n\n\n  next   para  ";
        let c = clean_post(&decode_entities(t), &keep());
        assert_eq!(c.body, "It's \"fine\"... \"ok\" tom & jerry xy\n\nnext para");
        let emoji = CleanOptions { keep_urls: true, keep_emoji: true };
        assert!(clean_post("sick 🤙", &emoji).body.contains('🤙'));
        assert_eq!(decode_entities("&#39;&#x41;&bogus;"), "'A&bogus;");
    }

    #[test]
    fn banner_and_urls() {
        let t = "Welcome to the Newschoolers forums! You may read the forums as a guest.\nReal text www.example.com/a, and (https://x.y/z).";
        assert_eq!(clean_post(t, &CleanOptions { keep_urls: false, keep_emoji: false }).body, "Real text, and.");
        assert_eq!(urls(t).count(), 2);
    }

    #[test]
    fn titles_are_not_split() {
        assert_eq!(clean_title("  Best park skis - 2023 &amp; beyond?  ", &keep()), "Best park skis - 2023 & beyond?");
    }
}
