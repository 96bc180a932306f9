//! Turning model text into Discord messages: mentions neutralised, and text longer than one
//! message split on paragraph or sentence boundaries with code fences closed and reopened.
//!
//! The split is greedy from the front and each part depends only on the text up to the message
//! limit, so while an answer streams, every part but the last is final.

/// Discord's limit for one message, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// Make `@everyone`, `@here`, `<@id>`, `<@!id>` and `<@&id>` inert: a zero-width space after every
/// `@` stops Discord from parsing a mention (allowed mentions are also empty on every message;
/// this keeps the text from even looking like a ping).
pub fn neutralize_mentions(text: &str) -> String {
    text.replace('@', "@\u{200B}")
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
        let out = neutralize_mentions("hey @everyone and @here, <@123> <@!42> <@&456>");
        for bad in ["@everyone", "@here", "<@123>", "<@!42>", "<@&456>"] {
            assert!(!out.contains(bad), "{bad} survived in {out:?}");
        }
        assert_eq!(out.replace('\u{200B}', ""), "hey @everyone and @here, <@123> <@!42> <@&456>");
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
