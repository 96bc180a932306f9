//! From a thread's posts to conversations: the question (title + opening post), reply
//! screening with a reason for every reply left out, best-reply selection, and the optional
//! multi-turn form where the opening poster's follow-ups become the next user turns.

use crate::scrape::clean::{urls, without_urls};
use crate::store::{ThreadPosts, Turn};

use super::filter::WordFilter;
use super::DatasetSettings;

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub thread_id: Option<u64>,
    pub answer_id: Option<i64>,
    pub messages: Vec<Turn>,
}

impl Conversation {
    pub fn user_text(&self) -> String {
        self.messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn assistant_text(&self) -> String {
        self.messages
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn turn(role: &str, content: &str) -> Turn {
    Turn {
        role: role.to_string(),
        content: content.to_string(),
    }
}

/// Conversations of one thread and why the rest was left out.
#[derive(Debug, Default)]
pub struct ThreadOutcome {
    pub conversations: Vec<Conversation>,
    pub dropped: Vec<&'static str>,
}

/// `Title: opening post`, as the prototype did, minus its title-splitting bug. A title that
/// already ends a sentence is followed by a space instead of a colon.
pub fn question(title: &str, body: &str) -> String {
    let title = title.trim();
    let body = body.trim();
    match (title.is_empty(), body.is_empty()) {
        (true, _) => body.to_string(),
        (false, true) => title.to_string(),
        (false, false) if title.ends_with(['?', '!', '.', ':']) => format!("{title} {body}"),
        (false, false) => format!("{title}: {body}"),
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Normalised start of a text, to recognise it inside a later post's quote.
fn fingerprint(s: &str) -> String {
    s.split_whitespace()
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Why a reply cannot be an answer, or `None` when it can.
fn screen(
    body: &str,
    quotes: &[String],
    s: &DatasetSettings,
    filter: &WordFilter,
) -> Option<&'static str> {
    if body.trim().is_empty() {
        return Some(if quotes.is_empty() {
            "empty_reply"
        } else {
            "quote_only"
        });
    }
    let text_words = words(&without_urls(body));
    if urls(body).next().is_some() && text_words < s.min_answer_words {
        return Some("link_only");
    }
    if text_words < s.min_answer_words {
        return Some("too_short");
    }
    if body.chars().count() > s.max_answer_chars {
        return Some("too_long");
    }
    if filter.matches(body) {
        return Some("word_filter");
    }
    None
}

pub fn build_thread(t: &ThreadPosts, s: &DatasetSettings, filter: &WordFilter) -> ThreadOutcome {
    let mut out = ThreadOutcome::default();
    let Some(((1, op), replies)) = t.posts.split_first().map(|((p, op), r)| ((*p, op), r)) else {
        out.dropped.push("no_opening_post");
        return out;
    };
    if op.position != 0 {
        out.dropped.push("no_opening_post");
        return out;
    }
    let q = question(&t.title, &op.body);
    if q.is_empty() {
        out.dropped.push("empty_question");
        return out;
    }
    if q.chars().count() > s.max_question_chars {
        out.dropped.push("question_too_long");
        return out;
    }
    if filter.matches(&q) {
        out.dropped.push("question_filtered");
        return out;
    }
    if replies.is_empty() {
        out.dropped.push("no_replies");
        return out;
    }
    let op_author = op.author.as_deref().filter(|a| !a.is_empty());
    let later_quotes: Vec<String> = replies
        .iter()
        .flat_map(|(_, p)| p.quotes.iter().map(|q| q.to_lowercase()))
        .collect();

    // Screen every reply once: Ok(score) for usable answers, Err(reason) otherwise.
    let mut screened: Vec<Result<f64, &'static str>> = Vec::with_capacity(replies.len());
    for (idx, (_, r)) in replies.iter().enumerate() {
        let by_op = op_author.is_some() && r.author.as_deref() == op_author;
        let verdict = if by_op {
            Err("by_original_poster")
        } else {
            match screen(&r.body, &r.quotes, s, filter) {
                Some(reason) => Err(reason),
                None => {
                    // Longer (to a point) is more substantive; earlier replies answer the
                    // question rather than the discussion; being quoted means others engaged.
                    let w = words(&r.body).min(300) as f64;
                    let fp = fingerprint(&r.body);
                    let quoted = fp.len() > 20 && later_quotes.iter().any(|q| q.contains(&fp));
                    Ok((1.0 + w).ln() - 0.02 * idx as f64 + if quoted { 0.5 } else { 0.0 })
                }
            }
        };
        screened.push(verdict);
    }

    let mut used = vec![false; replies.len()];
    if s.multi_turn {
        if let Some(conv) = multi_turn(
            t.id, &q, replies, &screened, op_author, s, filter, &mut used,
        ) {
            out.conversations.push(conv);
        }
    }

    let mut ranked: Vec<(usize, f64)> = screened
        .iter()
        .enumerate()
        .filter(|(i, _)| !used[*i])
        .filter_map(|(i, v)| v.ok().map(|score| (i, score)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let keep = s
        .max_answers_per_thread
        .saturating_sub(out.conversations.len());
    let mut chosen: Vec<usize> = ranked.iter().take(keep).map(|(i, _)| *i).collect();
    chosen.sort_unstable();
    for (i, verdict) in screened.iter().enumerate() {
        match verdict {
            Err(reason) if !(used[i] && *reason == "by_original_poster") => {
                out.dropped.push(reason)
            }
            Ok(_) if !used[i] && !chosen.contains(&i) => out.dropped.push("not_selected"),
            _ => {}
        }
    }
    for i in chosen {
        out.conversations.push(Conversation {
            thread_id: Some(t.id),
            answer_id: None,
            messages: vec![turn("user", &q), turn("assistant", &replies[i].1.body)],
        });
    }
    if out.conversations.is_empty() {
        out.dropped.push("no_usable_reply");
    }
    out
}

/// Question → first usable reply → the opening poster's next post → next usable reply → …
/// Emitted only when it has at least two exchanges.
#[allow(clippy::too_many_arguments)]
fn multi_turn(
    thread_id: u64,
    q: &str,
    replies: &[(u32, crate::store::StoredPost)],
    screened: &[Result<f64, &'static str>],
    op_author: Option<&str>,
    s: &DatasetSettings,
    filter: &WordFilter,
    used: &mut [bool],
) -> Option<Conversation> {
    let op_author = op_author?;
    let mut messages = vec![turn("user", q)];
    let mut picked = Vec::new();
    let mut want_answer = true;
    for (i, (_, r)) in replies.iter().enumerate() {
        if want_answer && screened[i].is_ok() {
            messages.push(turn("assistant", &r.body));
            picked.push(i);
            want_answer = false;
        } else if !want_answer
            && r.author.as_deref() == Some(op_author)
            && screen(&r.body, &r.quotes, s, filter).is_none()
        {
            messages.push(turn("user", &r.body));
            picked.push(i);
            want_answer = true;
        }
    }
    if want_answer {
        // Ends on a user turn nobody answered: drop it.
        messages.pop();
        picked.pop();
    }
    if messages.len() < 4 {
        return None;
    }
    for i in picked {
        used[i] = true;
    }
    Some(Conversation {
        thread_id: Some(thread_id),
        answer_id: None,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredPost;

    fn post(pos: u32, author: &str, body: &str) -> StoredPost {
        StoredPost {
            position: pos,
            author: Some(author.into()),
            body: body.into(),
            ..Default::default()
        }
    }

    fn thread(posts: Vec<StoredPost>) -> ThreadPosts {
        ThreadPosts {
            id: 9,
            title: "Park skis for a beginner".into(),
            posts: posts.into_iter().map(|p| (1, p)).collect(),
        }
    }

    fn settings() -> DatasetSettings {
        DatasetSettings {
            max_answers_per_thread: 2,
            ..DatasetSettings::default()
        }
    }

    #[test]
    fn question_format() {
        assert_eq!(
            question("Park skis", "I'm 5'8, what length?"),
            "Park skis: I'm 5'8, what length?"
        );
        assert_eq!(
            question("Which length?", "I'm 5'8."),
            "Which length? I'm 5'8."
        );
        assert_eq!(question("Best skis - 2023", ""), "Best skis - 2023");
    }

    #[test]
    fn screening_and_selection() {
        let mut quoted = post(5, "c", "");
        quoted.quotes = vec!["something".into()];
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(
                1,
                "a",
                "Get something soft and twin tipped, mount at center, around chin height.",
            ),
            post(2, "b", "https://youtu.be/abc"),
            post(3, "op", "thanks guys"),
            post(4, "d", "+1"),
            quoted,
            post(6, "e", ""),
            post(
                7,
                "f",
                "Used gear is the way, old Line Chronics are cheap and bomber on rails for years.",
            ),
            post(
                8,
                "g",
                "I'd also say boots first, a soft park boot helps a lot when learning rails.",
            ),
        ]);
        let out = build_thread(&t, &settings(), &WordFilter::default());
        assert_eq!(out.conversations.len(), 2);
        assert!(out.conversations[0].messages[0]
            .content
            .starts_with("Park skis for a beginner: What should"));
        let answers: Vec<_> = out
            .conversations
            .iter()
            .map(|c| c.messages[1].content.clone())
            .collect();
        // The two most substantive replies win, kept in thread order.
        assert!(answers[0].starts_with("Used gear"), "{answers:?}");
        assert!(answers[1].starts_with("I'd also say"), "{answers:?}");
        let mut d = out.dropped.clone();
        d.sort();
        assert_eq!(
            d,
            vec![
                "by_original_poster",
                "empty_reply",
                "link_only",
                "not_selected",
                "quote_only",
                "too_short"
            ]
        );
    }

    #[test]
    fn multi_turn_uses_op_follow_ups() {
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(
                1,
                "a",
                "Get something soft and twin tipped, mount at center.",
            ),
            post(2, "op", "What length should they be for someone my height?"),
            post(3, "b", "Around chin height is a good start for rails."),
            post(4, "c", "Also wax them often, rails eat bases alive."),
        ]);
        let s = DatasetSettings {
            multi_turn: true,
            max_answers_per_thread: 3,
            ..DatasetSettings::default()
        };
        let out = build_thread(&t, &s, &WordFilter::default());
        assert_eq!(out.conversations[0].messages.len(), 4);
        assert_eq!(out.conversations[0].messages[2].role, "user");
        assert_eq!(
            out.conversations.len(),
            2,
            "remaining reply becomes a single-turn pair"
        );
        assert_eq!(
            out.conversations[1].messages[1].content,
            "Also wax them often, rails eat bases alive."
        );
    }

    #[test]
    fn threads_without_answers_say_why() {
        let out = build_thread(
            &thread(vec![post(0, "op", "Anyone skiing Mammoth this weekend?")]),
            &settings(),
            &WordFilter::default(),
        );
        assert!(out.conversations.is_empty());
        assert_eq!(out.dropped, vec!["no_replies"]);
        let t = ThreadPosts {
            id: 1,
            title: "x".into(),
            posts: vec![(2, post(0, "op", "page one missing"))],
        };
        assert_eq!(
            build_thread(&t, &settings(), &WordFilter::default()).dropped,
            vec!["no_opening_post"]
        );
    }
}
