//! From a thread's posts to conversations: the question (title + opening post), reply
//! screening with a reason for every reply left out, best-reply selection, and the optional
//! multi-turn form where the opening poster's follow-ups become the next user turns.

use crate::scrape::clean::{normalize_whitespace, urls, without_urls};
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
        self.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn assistant_text(&self) -> String {
        self.messages.iter().filter(|m| m.role == "assistant").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
    }
}

pub fn turn(role: &str, content: &str) -> Turn {
    Turn { role: role.to_string(), content: content.to_string() }
}

/// Conversations of one thread and why the rest was left out.
#[derive(Debug, Default)]
pub struct ThreadOutcome {
    pub conversations: Vec<Conversation>,
    pub dropped: Vec<&'static str>,
    /// Replies whose text passed screening (whoever wrote them): the signal the thread has.
    pub substantive: usize,
    /// Why each substantive reply that is in no conversation was left out.
    pub substantive_dropped: Vec<&'static str>,
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

/// Words as a reader counts them: whitespace-separated tokens with at least one letter. URLs,
/// punctuation, bullets, middots, emoji and bare numbers are not words, so "Quote · Report" is
/// two words and a link with a "+1" is none.
pub fn word_count(s: &str) -> usize {
    without_urls(s).split_whitespace().filter(|w| w.chars().any(char::is_alphabetic)).count()
}

/// Training text of a post: its URLs dropped unless `keep_urls`.
pub fn training_text(body: &str, keep_urls: bool) -> String {
    if keep_urls || urls(body).next().is_none() {
        body.to_string()
    } else {
        normalize_whitespace(&without_urls(body))
    }
}

/// Whether a post asks something: a question mark in its own text (URLs' queries aside).
fn is_question(body: &str) -> bool {
    without_urls(body).contains('?')
}

/// Normalised start of a text, to recognise it inside a later post's quote.
fn fingerprint(s: &str) -> String {
    s.split_whitespace().take(8).collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Whether one of `quotes` holds the start of `body` (long enough not to match by chance).
fn quotes_text(quotes: &[String], body: &str) -> bool {
    let fp = fingerprint(body);
    fp.len() > 20 && quotes.iter().any(|q| q.to_lowercase().contains(&fp))
}

/// Why a reply cannot be an answer, or `None` when it can.
fn screen(body: &str, quotes: &[String], s: &DatasetSettings, filter: &WordFilter) -> Option<&'static str> {
    if body.trim().is_empty() {
        return Some(if quotes.is_empty() { "empty_reply" } else { "quote_only" });
    }
    let text_words = word_count(body);
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

/// Conversations of one thread. `keep_urls` = false drops URLs from every turn.
pub fn build_thread(t: &ThreadPosts, s: &DatasetSettings, filter: &WordFilter, keep_urls: bool) -> ThreadOutcome {
    let mut out = ThreadOutcome::default();
    let Some(((1, op), replies)) = t.posts.split_first().map(|((p, op), r)| ((*p, op), r)) else {
        out.dropped.push("no_opening_post");
        return out;
    };
    if op.position != 0 {
        out.dropped.push("no_opening_post");
        return out;
    }
    let q = training_text(&question(&t.title, &op.body), keep_urls);
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
    let later_quotes: Vec<String> = replies.iter().flat_map(|(_, p)| p.quotes.iter().map(|q| q.to_lowercase())).collect();

    // Screen every reply once: Ok(score) for usable answers, Err(reason) otherwise. A reply by
    // the opening poster is never an answer, but counts as substantive when its text passes.
    let mut screened: Vec<Result<f64, &'static str>> = Vec::with_capacity(replies.len());
    let mut substantive = vec![false; replies.len()];
    for (idx, (_, r)) in replies.iter().enumerate() {
        let by_op = op_author.is_some() && r.author.as_deref() == op_author;
        let verdict = match screen(&r.body, &r.quotes, s, filter) {
            Some(reason) if !by_op => Err(reason),
            Some(_) => Err("by_original_poster"),
            None if by_op => {
                substantive[idx] = true;
                Err("by_original_poster")
            }
            None => {
                substantive[idx] = true;
                // Longer (to a point) is more substantive; earlier replies answer the
                // question rather than the discussion; being quoted means others engaged.
                let w = word_count(&r.body).min(300) as f64;
                let fp = fingerprint(&r.body);
                let quoted = fp.len() > 20 && later_quotes.iter().any(|q| q.contains(&fp));
                Ok((1.0 + w).ln() - 0.02 * idx as f64 + if quoted { 0.5 } else { 0.0 })
            }
        };
        screened.push(verdict);
    }
    out.substantive = substantive.iter().filter(|x| **x).count();

    let mut used = vec![false; replies.len()];
    let mut op_reasons: Vec<Option<&'static str>> = vec![None; replies.len()];
    if s.multi_turn {
        let mt = multi_turn(t.id, &q, replies, &screened, &substantive, op_author, keep_urls);
        op_reasons = mt.op_reasons;
        if let Some((conv, picked)) = mt.conversation {
            for i in picked {
                used[i] = true;
            }
            out.conversations.push(conv);
        }
    }

    let mut ranked: Vec<(usize, f64)> = screened.iter().enumerate().filter(|(i, _)| !used[*i]).filter_map(|(i, v)| v.ok().map(|score| (i, score))).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // 0 = no cap: every usable reply becomes a pair (the ranking still decides under a cap).
    let keep = match s.max_answers_per_thread {
        0 => usize::MAX,
        cap => cap.saturating_sub(out.conversations.len()),
    };
    let mut chosen: Vec<usize> = ranked.iter().take(keep).map(|(i, _)| *i).collect();
    chosen.sort_unstable();
    for (i, verdict) in screened.iter().enumerate() {
        let reason = match verdict {
            _ if used[i] => continue,
            Err("by_original_poster") => op_reasons[i].unwrap_or("by_original_poster"),
            Err(reason) => *reason,
            Ok(_) if !chosen.contains(&i) => "not_selected",
            Ok(_) => continue,
        };
        out.dropped.push(reason);
        if substantive[i] {
            out.substantive_dropped.push(reason);
        }
    }
    for i in chosen {
        out.conversations.push(Conversation {
            thread_id: Some(t.id),
            answer_id: None,
            messages: vec![turn("user", &q), turn("assistant", &training_text(&replies[i].1.body, keep_urls))],
        });
    }
    if out.conversations.is_empty() {
        out.dropped.push("no_usable_reply");
    }
    out
}

/// The multi-turn conversation of a thread (with the replies it uses) and why the opening
/// poster's other follow-ups were left out.
struct MultiTurn {
    conversation: Option<(Conversation, Vec<usize>)>,
    op_reasons: Vec<Option<&'static str>>,
}

/// Question → first usable reply → the opening poster's follow-up → the reply that answers
/// it → … A follow-up is a user turn only when the structure says it continues the exchange:
/// it asks a question or quotes a reply, and a usable reply answers it by quoting it or by
/// coming right after it (from someone else). Other follow-ups are left out with the reason
/// `follow_up_not_question` or `follow_up_unanswered` ("Thanks, they ski great!" is no
/// question, and the next reply is not its answer). Emitted only with two exchanges or more.
fn multi_turn(
    thread_id: u64,
    q: &str,
    replies: &[(u32, crate::store::StoredPost)],
    screened: &[Result<f64, &'static str>],
    substantive: &[bool],
    op_author: Option<&str>,
    keep_urls: bool,
) -> MultiTurn {
    let mut op_reasons = vec![None; replies.len()];
    let Some(op_author) = op_author else {
        return MultiTurn { conversation: None, op_reasons };
    };
    let by_op = |i: usize| replies[i].1.author.as_deref() == Some(op_author);
    let text = |i: usize| training_text(&replies[i].1.body, keep_urls);
    let mut messages = vec![turn("user", q)];
    let mut picked: Vec<usize> = Vec::new();
    for (i, (_, r)) in replies.iter().enumerate() {
        if !by_op(i) {
            if picked.is_empty() && screened[i].is_ok() {
                messages.push(turn("assistant", &text(i)));
                picked.push(i);
            }
            continue;
        }
        // Before the first answer the opening poster is adding to the question; a follow-up
        // whose own text fails screening is no turn either.
        if picked.is_empty() || !substantive[i] {
            continue;
        }
        let quoted = (0..i).find(|&k| screened[k].is_ok() && quotes_text(&r.quotes, &replies[k].1.body));
        if !is_question(&r.body) && quoted.is_none() {
            op_reasons[i] = Some("follow_up_not_question");
            continue;
        }
        // The first exchange answers with the reply the follow-up quotes, if it quotes one.
        if let Some(k) = quoted.filter(|k| picked.len() == 1 && picked[0] != *k) {
            messages[1] = turn("assistant", &text(k));
            picked[0] = k;
        }
        let answer = (i + 1..replies.len()).find(|&j| screened[j].is_ok() && !picked.contains(&j) && quotes_text(&replies[j].1.quotes, &r.body)).or_else(|| {
            let j = i + 1;
            (j < replies.len() && !by_op(j) && screened[j].is_ok() && !picked.contains(&j)).then_some(j)
        });
        let Some(j) = answer else {
            op_reasons[i] = Some("follow_up_unanswered");
            continue;
        };
        messages.push(turn("user", &text(i)));
        messages.push(turn("assistant", &text(j)));
        picked.push(i);
        picked.push(j);
    }
    let conversation = (messages.len() >= 4).then_some((Conversation { thread_id: Some(thread_id), answer_id: None, messages }, picked));
    MultiTurn { conversation, op_reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredPost;

    fn post(pos: u32, author: &str, body: &str) -> StoredPost {
        StoredPost { position: pos, author: Some(author.into()), body: body.into(), ..Default::default() }
    }

    fn thread(posts: Vec<StoredPost>) -> ThreadPosts {
        ThreadPosts { id: 9, title: "Park skis for a beginner".into(), posts: posts.into_iter().map(|p| (1, p)).collect() }
    }

    fn settings() -> DatasetSettings {
        DatasetSettings { max_answers_per_thread: 2, ..DatasetSettings::default() }
    }

    #[test]
    fn question_format() {
        assert_eq!(question("Park skis", "I'm 5'8, what length?"), "Park skis: I'm 5'8, what length?");
        assert_eq!(question("Which length?", "I'm 5'8."), "Which length? I'm 5'8.");
        assert_eq!(question("Best skis - 2023", ""), "Best skis - 2023");
    }

    #[test]
    fn screening_and_selection() {
        let mut quoted = post(5, "c", "");
        quoted.quotes = vec!["something".into()];
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(1, "a", "Get something soft and twin tipped, mount at center, around chin height."),
            post(2, "b", "https://youtu.be/abc"),
            post(3, "op", "thanks guys"),
            post(4, "d", "+1"),
            quoted,
            post(6, "e", ""),
            post(7, "f", "Used gear is the way, old Line Chronics are cheap and bomber on rails for years."),
            post(8, "g", "I'd also say boots first, a soft park boot helps a lot when learning rails."),
        ]);
        let out = build_thread(&t, &settings(), &WordFilter::default(), true);
        assert_eq!(out.conversations.len(), 2);
        assert!(out.conversations[0].messages[0].content.starts_with("Park skis for a beginner: What should"));
        let answers: Vec<_> = out.conversations.iter().map(|c| c.messages[1].content.clone()).collect();
        // The two most substantive replies win, kept in thread order.
        assert!(answers[0].starts_with("Used gear"), "{answers:?}");
        assert!(answers[1].starts_with("I'd also say"), "{answers:?}");
        let mut d = out.dropped.clone();
        d.sort();
        assert_eq!(d, vec!["by_original_poster", "empty_reply", "link_only", "not_selected", "quote_only", "too_short"]);
    }

    #[test]
    fn multi_turn_uses_op_follow_ups() {
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(1, "a", "Get something soft and twin tipped, mount at center."),
            post(2, "op", "What length should they be for someone my height?"),
            post(3, "b", "Around chin height is a good start for rails."),
            post(4, "c", "Also wax them often, rails eat bases alive."),
        ]);
        let s = DatasetSettings { multi_turn: true, max_answers_per_thread: 3, ..DatasetSettings::default() };
        let out = build_thread(&t, &s, &WordFilter::default(), true);
        assert_eq!(out.conversations[0].messages.len(), 4);
        assert_eq!(out.conversations[0].messages[2].role, "user");
        assert_eq!(out.conversations.len(), 2, "remaining reply becomes a single-turn pair");
        assert_eq!(out.conversations[1].messages[1].content, "Also wax them often, rails eat bases alive.");
    }

    #[test]
    fn threads_without_answers_say_why() {
        let out = build_thread(&thread(vec![post(0, "op", "Anyone skiing Mammoth this weekend?")]), &settings(), &WordFilter::default(), true);
        assert!(out.conversations.is_empty());
        assert_eq!(out.dropped, vec!["no_replies"]);
        let t = ThreadPosts { id: 1, title: "x".into(), posts: vec![(2, post(0, "op", "page one missing"))] };
        assert_eq!(build_thread(&t, &settings(), &WordFilter::default(), true).dropped, vec!["no_opening_post"]);
    }

    #[test]
    fn word_count_counts_words_not_punctuation_or_links() {
        assert_eq!(word_count("Quote · Report"), 2);
        assert_eq!(word_count("• • • — ... !!! +1 540"), 0);
        assert_eq!(word_count("- mount at center\n- wax often"), 5);
        assert_eq!(word_count("\u{1F602}\u{1F919} sick edit \u{1F525}"), 2);
        assert_eq!(word_count("https://youtu.be/abc www.newschoolers.com/x check this"), 2);
        assert_eq!(word_count("don't 3s I'd"), 3);
        assert_eq!(word_count(""), 0);
    }

    #[test]
    fn chrome_and_links_are_not_answers() {
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(1, "a", "https://youtu.be/a https://youtu.be/b Quote · Report"),
            post(2, "b", "• • 👍 +1"),
            post(3, "c", "Quote · Reply"),
        ]);
        let out = build_thread(&t, &settings(), &WordFilter::default(), true);
        assert!(out.conversations.is_empty());
        assert_eq!(out.dropped, vec!["link_only", "too_short", "too_short", "no_usable_reply"]);
        assert_eq!(out.substantive, 0);
    }

    #[test]
    fn no_cap_keeps_every_usable_reply_in_order() {
        let t = thread(vec![
            post(0, "op", "What should I get to start hitting rails?"),
            post(1, "a", "Something soft and twin tipped."),
            post(2, "b", "Used Line Chronics are cheap and bomber on rails."),
            post(3, "op", "Thanks, that helps a lot with my choice."),
            post(4, "c", "Boots first, a soft park boot helps a lot."),
            post(5, "d", "Detune the edges underfoot before the first rail day."),
        ]);
        let s = DatasetSettings::default();
        assert_eq!(s.max_answers_per_thread, 0, "no cap by default");
        let out = build_thread(&t, &s, &WordFilter::default(), true);
        let answers: Vec<_> = out.conversations.iter().map(|c| c.messages[1].content.as_str()).collect();
        assert_eq!(answers.len(), 4);
        assert!(answers[0].starts_with("Something soft"));
        assert!(answers[3].starts_with("Detune"));
        assert_eq!(out.dropped, vec!["by_original_poster"]);
        assert_eq!(out.substantive, 5);
        assert_eq!(out.substantive_dropped, vec!["by_original_poster"]);
        // A cap still keeps the best ones.
        let capped = DatasetSettings { max_answers_per_thread: 1, ..DatasetSettings::default() };
        let out = build_thread(&t, &capped, &WordFilter::default(), true);
        assert_eq!(out.conversations.len(), 1);
        assert_eq!(out.substantive_dropped.iter().filter(|r| **r == "not_selected").count(), 3);
    }

    #[test]
    fn urls_are_stripped_from_training_text_unless_kept() {
        assert_eq!(training_text("Watch this (https://youtu.be/abc), it helps.\n\nhttps://x.io/y", false), "Watch this, it helps.");
        assert_eq!(training_text("Watch https://youtu.be/abc", true), "Watch https://youtu.be/abc");
        assert_eq!(training_text("no links here", false), "no links here");
        let t = thread(vec![
            post(0, "op", "Any edits to learn rails from? https://ns.test/forum/x"),
            post(1, "a", "Watch https://youtu.be/abc and copy his hands on the rail."),
            post(2, "b", "https://youtu.be/only"),
        ]);
        let out = build_thread(&t, &settings(), &WordFilter::default(), false);
        assert_eq!(out.conversations.len(), 1);
        let m = &out.conversations[0].messages;
        assert_eq!(m[0].content, "Park skis for a beginner: Any edits to learn rails from?");
        assert_eq!(m[1].content, "Watch and copy his hands on the rail.");
        assert_eq!(out.dropped, vec!["link_only"], "a link-only reply is still one");
    }

    #[test]
    fn multi_turn_needs_a_question_and_its_answer() {
        let s = DatasetSettings { multi_turn: true, ..DatasetSettings::default() };
        // A thank-you is not a question: no user turn, and the next reply is not its answer.
        let t = thread(vec![
            post(0, "op", "What bindings should I put on my new park skis?"),
            post(1, "a", "Look Pivots, they hold up to rails and drops."),
            post(2, "op", "Mounted them on the line, they ski great. Thanks!"),
            post(3, "b", "Brake width should match your waist width or a bit wider."),
        ]);
        let out = build_thread(&t, &s, &WordFilter::default(), true);
        assert!(out.conversations.iter().all(|c| c.messages.len() == 2));
        assert_eq!(out.conversations.len(), 2);
        assert_eq!(out.dropped, vec!["follow_up_not_question"]);
        assert_eq!(out.substantive_dropped, vec!["follow_up_not_question"]);

        // A question answered by a later reply that quotes it, across another post.
        let mut quoting = post(4, "c", "Go with the shorter length, it spins and butters way easier.");
        quoting.quotes = vec!["Should I go 172 or 178 for a park setup?".into()];
        let t = thread(vec![
            post(0, "op", "What bindings should I put on my new park skis?"),
            post(1, "a", "Look Pivots, they hold up to rails and drops."),
            post(2, "op", "Should I go 172 or 178 for a park setup?"),
            post(3, "op", "Also my boots are pretty old."),
            quoting,
            post(5, "d", "Whatever you pick, wax them every few days in spring."),
        ]);
        let out = build_thread(&t, &s, &WordFilter::default(), true);
        let m = &out.conversations[0].messages;
        let roles: Vec<_> = m.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, vec!["user", "assistant", "user", "assistant"]);
        assert_eq!(m[2].content, "Should I go 172 or 178 for a park setup?");
        assert!(m[3].content.starts_with("Go with the shorter length"));
        assert_eq!(out.conversations.len(), 2);
        assert!(out.conversations[1].messages[1].content.starts_with("Whatever"));
        assert_eq!(out.dropped, vec!["follow_up_not_question"]);

        // A question nobody answers (the next post is the opening poster's again).
        let t = thread(vec![
            post(0, "op", "What bindings should I put on my new park skis?"),
            post(1, "a", "Look Pivots, they hold up to rails and drops."),
            post(2, "op", "What DIN should I set them to for park?"),
            post(3, "op", "Never mind, the shop set them for me."),
        ]);
        let out = build_thread(&t, &s, &WordFilter::default(), true);
        assert_eq!(out.conversations.len(), 1);
        assert_eq!(out.conversations[0].messages.len(), 2);
        assert_eq!(out.dropped, vec!["follow_up_unanswered", "follow_up_not_question"]);
    }
}
