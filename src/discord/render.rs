//! Turning model text into Discord messages: mentions neutralised, and text longer than one
//! message split on paragraph or sentence boundaries with code fences closed and reopened.
//!
//! The split is greedy from the front and each part depends only on the text up to the message
//! limit, so while an answer streams, every part but the last is final.

use std::sync::LazyLock;

use regex::Regex;

/// Discord's limit for one message, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// Ends a message that had to be cut to fit [`MESSAGE_LIMIT`].
pub const CUT_NOTE: &str = "\n… *(cut: too long for one Discord message)*";

/// `text` as one Discord message: unchanged if it fits [`MESSAGE_LIMIT`], else cut on a
/// character boundary and ended with [`CUT_NOTE`]. Every message and interaction response the
/// bot sends goes through this (streamed answers are split first, see [`split`]), so no reply
/// built from user input can exceed the limit and be refused.
pub fn bounded(text: &str) -> String {
    if text.chars().count() <= MESSAGE_LIMIT {
        return text.to_string();
    }
    let keep = MESSAGE_LIMIT - CUT_NOTE.chars().count();
    let mut out: String = text.chars().take(keep).collect();
    out.push_str(CUT_NOTE);
    out
}

/// At most `max` characters of `s`, with "…" when cut (for quoting user input in replies).
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `text` with every absolute filesystem path replaced by `…/` and its last component, for
/// errors shown in Discord: the host's folder layout stays in the log.
pub fn redact_paths(text: &str) -> String {
    const BEFORE: &[char] = &['`', '\'', '"', '(', '[', '='];
    const AFTER: &[char] = &['`', '\'', '"', ')', ']', ','];
    let mut out = String::with_capacity(text.len());
    let mut prev: Option<char> = None;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '/' && prev.is_none_or(|p| p.is_whitespace() || BEFORE.contains(&p)) {
            let end = rest.find(|ch: char| ch.is_whitespace() || AFTER.contains(&ch)).unwrap_or(rest.len());
            // Sentence punctuation after a path is not part of it.
            let path = rest[..end].trim_end_matches(['.', ':', ';']);
            let last = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or_default();
            out.push_str("…/");
            out.push_str(last);
            rest = &rest[path.len()..];
            prev = last.chars().last().or(Some('/'));
            continue;
        }
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Make `@everyone`, `@here` and raw mention syntax (`<@id>`, `<@!id>`, `<@&id>`, `<#id>`)
/// inert with a zero-width space (after the `@` of the first two, after the `<` of the others),
/// so the text does not even look like a ping. Every other `@` (email addresses, handles) is
/// left alone: allowed mentions are empty on every message anyway, this is cosmetic.
pub fn neutralize_mentions(text: &str) -> String {
    static EVERYONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"@(everyone|here)").expect("valid regex"));
    static RAW: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<([@#][!&]?[0-9]+>)").expect("valid regex"));
    let text = EVERYONE.replace_all(text, "@\u{200B}$1");
    RAW.replace_all(&text, "<\u{200B}$1").into_owned()
}

/// Split `text` into messages of at most `limit` characters.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    // The fence line (e.g. "```rust") of a code block the previous part had to close.
    let mut reopen: Option<String> = None;
    while !rest.is_empty() {
        let prefix = reopen.as_ref().map(|f| format!("{f}\n")).unwrap_or_default();
        let prefix_len = prefix.chars().count();
        if prefix_len + rest.chars().count() <= limit {
            parts.push(format!("{prefix}{rest}"));
            break;
        }
        // Room for the text, keeping space to close a fence ("\n```").
        let budget = limit.saturating_sub(prefix_len + 4).max(1);
        let window_end = rest.char_indices().nth(budget).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..window_end];
        let cut = best_cut(window, reopen.is_some(), budget / 3);
        let (chunk, tail) = rest.split_at(cut);
        let fence_at_end = fence_state(chunk, reopen.clone());
        let mut part = format!("{prefix}{}", chunk.trim_end());
        if fence_at_end.is_some() {
            part.push_str("\n```");
        }
        parts.push(part);
        reopen = fence_at_end;
        // Leading blank lines of the next part carry nothing (indentation inside code does).
        rest = tail.trim_start_matches(['\n', '\r']);
        if reopen.is_none() {
            rest = rest.trim_start();
        }
    }
    if parts.is_empty() {
        parts.push(String::new());
    }
    parts
}

/// The fence line open at the end of `text`, given the one open at its start.
fn fence_state(text: &str, mut open: Option<String>) -> Option<String> {
    for line in text.split('\n') {
        let t = line.trim_start();
        if t.starts_with("```") {
            open = match open {
                Some(_) => None,
                None => Some(t.trim_end().to_string()),
            };
        }
    }
    open
}

/// Byte index in `window` to cut at: the last paragraph break outside code, else the last line
/// break outside code, else the end of the last sentence outside code, else a line break inside
/// code (the fence is closed and reopened), else the last space, else the window's end. Cuts
/// before `min` bytes are only taken when nothing better exists.
fn best_cut(window: &str, starts_in_fence: bool, min: usize) -> usize {
    // Walk lines, recording candidate cut points with whether they lie inside a code block.
    let mut in_fence = starts_in_fence;
    let mut para = None;
    let mut line_out = None;
    let mut line_in = None;
    let mut sentence = None;
    let mut pos = 0;
    for line in window.split_inclusive('\n') {
        let end = pos + line.len();
        let t = line.trim_start();
        let is_fence = t.starts_with("```");
        if !in_fence && !is_fence {
            for (i, _) in line.match_indices(['.', '!', '?']) {
                let after = pos + i + 1;
                if window[after..].starts_with(' ') {
                    sentence = Some(after + 1);
                }
            }
        }
        if is_fence {
            in_fence = !in_fence;
        }
        if line.ends_with('\n') {
            if in_fence {
                line_in = Some(end);
            } else {
                line_out = Some(end);
                if window[end..].starts_with('\n') || line.trim().is_empty() {
                    para = Some(end);
                }
            }
        }
        pos = end;
    }
    let space = window.rfind(' ').map(|i| i + 1);
    for c in [para, line_out, sentence, line_in, space] {
        if let Some(c) = c.filter(|&c| c >= min && c > 0) {
            return c;
        }
    }
    for c in [para, line_out, sentence, line_in, space].into_iter().flatten() {
        if c > 0 {
            return c;
        }
    }
    window.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fences_balanced(part: &str) -> bool {
        part.lines().filter(|l| l.trim_start().starts_with("```")).count() % 2 == 0
    }

    #[test]
    fn neutralizes_every_mention_form() {
        let text = "hey @everyone and @here, <@123> <@!42> <@&456> in <#789>";
        let out = neutralize_mentions(text);
        for bad in ["@everyone", "@here", "<@123>", "<@!42>", "<@&456>", "<#789>"] {
            assert!(!out.contains(bad), "{bad} survived in {out:?}");
        }
        assert_eq!(out.replace('\u{200B}', ""), text);
        for kept in ["write to coach@freeski.example", "@newschoolers on the forum", "a <@ b> c", "x<#>"] {
            assert_eq!(neutralize_mentions(kept), kept);
        }
    }

    #[test]
    fn bounded_keeps_short_text_and_cuts_long_text_with_a_note() {
        assert_eq!(bounded("hi"), "hi");
        let exact = "é".repeat(MESSAGE_LIMIT);
        assert_eq!(bounded(&exact), exact);
        let long = "é".repeat(5 * MESSAGE_LIMIT);
        let out = bounded(&long);
        assert_eq!(out.chars().count(), MESSAGE_LIMIT);
        assert!(out.ends_with(CUT_NOTE));
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }

    #[test]
    fn host_paths_are_reduced_to_their_last_component() {
        let e = "loading adapter x: reading adapter config /srv/bot/adapters/x/adapter_config.json: No such file (os error 2)";
        assert_eq!(redact_paths(e), "loading adapter x: reading adapter config …/adapter_config.json: No such file (os error 2)");
        assert_eq!(redact_paths("in `/etc/passwd`."), "in `…/passwd`.");
        assert_eq!(redact_paths("/"), "…/");
        assert_eq!(redact_paths("see https://example.com/a/b and 1/2"), "see https://example.com/a/b and 1/2");
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split("hello", 2000), vec!["hello"]);
        assert_eq!(split("", 2000), vec![""]);
    }

    #[test]
    fn prefers_paragraphs_then_sentences() {
        let p1 = "a".repeat(30);
        let p2 = "b".repeat(30);
        let parts = split(&format!("{p1}\n\n{p2}"), 40);
        assert_eq!(parts, vec![p1.clone(), p2.clone()]);
        let parts = split("One two three. Four five six. Seven eight nine.", 34);
        assert_eq!(parts, vec!["One two three. Four five six.", "Seven eight nine."]);
    }

    #[test]
    fn code_blocks_stay_fenced() {
        let code: String = (0..40).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Intro paragraph.\n\n```rust\n{code}```\n\nOutro.");
        let parts = split(&text, 200);
        assert!(parts.len() > 2);
        for p in &parts {
            assert!(p.chars().count() <= 200, "{} chars: {p:?}", p.chars().count());
            assert!(fences_balanced(p), "unbalanced fences in {p:?}");
        }
        assert!(parts[1].starts_with("```rust\n"), "{:?}", parts[1]);
        // Removing the added close/reopen lines gives the code back, line for line.
        let joined: Vec<&str> = parts.iter().flat_map(|p| p.lines()).filter(|l| l.starts_with("let ")).collect();
        assert_eq!(joined.len(), 40);
    }

    #[test]
    fn stable_prefix_while_streaming() {
        let text: String = (0..300).map(|i| format!("Sentence number {i} is here. ")).collect();
        let full = split(&text, 500);
        for n in (600..text.len()).step_by(97) {
            let partial = split(&text[..n], 500);
            assert_eq!(&partial[..partial.len() - 1], &full[..partial.len() - 1], "at {n}");
        }
    }

    #[test]
    fn hard_cut_without_boundaries() {
        let text = "x".repeat(4500);
        let parts = split(&text, 2000);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![1996, 1996, 508]);
    }
}
