//! `dataset build` on a store crawled from the fixture forum over HTTP, on a synthetic store,
//! and with feedback rows written through the store API.

#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use fixture_forum::{crawl, settings, Expect, Forum, Special, CROSSPOST_IDX};
use freeski_bot::dataset::pairs::{question, training_text};
use freeski_bot::dataset::split::is_test;
use freeski_bot::dataset::{self, BuildOptions, DatasetSettings};
use freeski_bot::scrape::CleanOptions;
use freeski_bot::store::{NewAnswer, Store, Turn, Vote};
use serde_json::Value;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).expect("valid JSON line")).collect()
}

fn ds_settings(out: &Path) -> DatasetSettings {
    DatasetSettings { dir: out.to_path_buf(), ..DatasetSettings::default() }
}

fn build(db: &Path, s: &DatasetSettings) -> dataset::BuildReport {
    build_with(db, s, &CleanOptions::default())
}

fn build_with(db: &Path, s: &DatasetSettings, clean: &CleanOptions) -> dataset::BuildReport {
    let mut store = Store::open(db).unwrap();
    dataset::build(&mut store, s, clean, &BuildOptions::default()).unwrap()
}

/// Every (question, answer) of a dataset folder's train and test files.
fn pairs_of(folder: &Path) -> Vec<(String, String)> {
    ["train.jsonl", "test.jsonl"]
        .iter()
        .flat_map(|f| lines(&folder.join(f)))
        .map(|r| {
            let m = r["messages"].as_array().unwrap();
            let text = |i: usize| m[i]["content"].as_str().unwrap().to_string();
            (text(0), text(m.len() - 1))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_from_the_fixture_forum_is_clean_complete_and_split_by_thread() {
    let forum = Forum::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("forum.sqlite");
    crawl(&settings(&forum), &db).await;
    let s = ds_settings(&dir.path().join("datasets"));
    let report = build(&db, &s);
    let folder = &report.written.path;
    assert!(report.written.name.starts_with("ds-") && report.written.hash.starts_with(&report.written.name[3..]));
    for f in ["train.jsonl", "test.jsonl", "rejected.jsonl", "stats.json", "metadata.json"] {
        assert!(folder.join(f).is_file(), "{f} missing");
    }
    let train = lines(&folder.join("train.jsonl"));
    let test = lines(&folder.join("test.jsonl"));

    // What the fixture says each thread should give.
    let threads = forum.threads();
    let by_id: HashMap<u64, &fixture_forum::FThread> = threads.iter().map(|t| (t.id, t)).collect();
    let mut want_pairs = 0usize;
    let mut want_drops: BTreeMap<&str, u64> = BTreeMap::new();
    // Replies whose own text is an answer's worth, whoever wrote them.
    let mut want_substantive = 0u64;
    let mut want_answers: HashSet<String> = HashSet::new();
    for (idx, t) in threads.iter().enumerate() {
        let pages = t.readable_pages();
        if !pages.contains(&1) {
            continue; // gone, blocked or down: nothing stored
        }
        let replies: Vec<&fixture_forum::FPost> = pages.iter().flat_map(|p| t.posts_on(*p)).skip(1).collect();
        let answers = replies.iter().filter(|p| p.expect == Expect::Answer).count();
        for p in &replies {
            if let Expect::Skip(reason) = p.expect {
                *want_drops.entry(reason).or_default() += 1;
            }
        }
        if replies.is_empty() {
            *want_drops.entry("no_replies").or_default() += 1;
        }
        want_substantive += replies.iter().filter(|p| matches!(p.expect, Expect::Answer | Expect::Skip("by_original_poster"))).count() as u64;
        // No cap by default: every reply that passes screening is a pair.
        if idx == CROSSPOST_IDX {
            *want_drops.entry("exact_duplicate").or_default() += answers as u64;
        } else {
            want_pairs += answers;
            for p in replies.iter().filter(|p| p.expect == Expect::Answer) {
                want_answers.insert(training_text(&p.body, false));
            }
        }
    }
    assert_eq!(s.max_answers_per_thread, 0);
    // The generator repeats its advice sentences every 17 posts, so the 50-post thread holds a
    // reply that differs from an earlier one only by the ski named: the near-duplicate check
    // rightly drops it, and names it. Every other reply is an answer.
    let near = report.stats.dropped.get("near_duplicate").copied().unwrap_or(0);
    assert!(near <= 2, "{}", report.stats);
    assert_eq!(train.len() + test.len() + near as usize, want_pairs, "{}", report.stats);
    assert_eq!(report.stats.dropped.get("not_selected"), None);
    let got_answers: HashSet<String> = pairs_of(folder).into_iter().map(|(_, a)| a).collect();
    let missing: Vec<_> = want_answers.difference(&got_answers).collect();
    assert_eq!(missing.len() as u64, near, "substantive replies missing: {missing:?}");
    // Coverage: every substantive reply is used or dropped for a named reason.
    let c = &report.stats.substantive_replies;
    assert_eq!(c.seen, want_substantive);
    assert_eq!(c.used + near, want_pairs as u64);
    assert_eq!(c.used + c.dropped.values().sum::<u64>(), c.seen, "{c:?}");
    assert_eq!(c.dropped.get("by_original_poster").copied(), want_drops.get("by_original_poster").copied());
    assert_eq!(c.dropped.get("exact_duplicate").copied(), want_drops.get("exact_duplicate").copied());
    let summary = report.to_string();
    assert!(summary.contains(&format!("substantive replies: {} seen, {} used", c.seen, c.used)), "{summary}");
    assert_eq!(report.stats.train as usize, train.len());
    for (reason, n) in &want_drops {
        assert_eq!(report.stats.dropped.get(*reason).copied().unwrap_or(0), *n, "dropped for {reason}: {:?}", report.stats.dropped);
    }

    // Artifacts of the text and of the page around it: the post footer's vote counter and
    // action links must not leak in, not even from the thread whose bodies are unclosed.
    let artifacts = regex::Regex::new(r"(?i)edited on|\[/?(url|img|quote|b|i|youtube)\b|wrote:|Insta: @|Sponsored by|Team Couch|Welcome to the Newschoolers|&amp;|&quot;|&middot;|\bquote\b|\breport\b|\breply\b|[\u{25B2}\u{25BC}\u{00B7}]|https?://|www\.").unwrap();
    let unclosed = forum.thread(Special::Unclosed);
    let mut unclosed_answers = 0;
    let mut train_threads = HashSet::new();
    let mut test_threads = HashSet::new();
    for (rows, held_out) in [(&train, false), (&test, true)] {
        for row in rows {
            let id = row["thread_id"].as_u64().expect("thread_id");
            let t = by_id[&id];
            let msgs = row["messages"].as_array().unwrap();
            assert_eq!(msgs.len(), 2);
            assert_eq!(msgs[0]["role"], "user");
            assert_eq!(msgs[1]["role"], "assistant");
            let q = msgs[0]["content"].as_str().unwrap();
            let a = msgs[1]["content"].as_str().unwrap();
            assert_eq!(q, training_text(&question(&t.title, &t.posts[0].body), false));
            if id == unclosed.id {
                unclosed_answers += 1;
            }
            for text in [q, a] {
                assert!(!text.trim().is_empty());
                assert!(!artifacts.is_match(text), "artifact in {text:?}");
                assert!(!text.contains('\u{2019}') && !text.chars().any(|c| ('\u{1F300}'..='\u{1FAFF}').contains(&c)), "{text:?}");
            }
            // The answer is exactly one reply's own text, its URLs dropped (the default): no
            // quoted text of other posts, nothing of the page.
            assert!(t.posts.iter().any(|p| p.expect == Expect::Answer && training_text(&p.body, false) == a), "answer not a clean reply of thread {id}: {a:?}");
            assert_eq!(is_test(id, s.split_seed, s.test_fraction), held_out);
            if held_out {
                test_threads.insert(id)
            } else {
                train_threads.insert(id)
            };
        }
    }
    assert!(train_threads.is_disjoint(&test_threads), "a thread is in both splits");
    let unclosed_want = unclosed.posts.iter().filter(|p| p.expect == Expect::Answer).count();
    assert_eq!(unclosed_answers, unclosed_want, "answers of the unclosed-body thread");
    assert!(report.stats.dropped["link_only"] > 0, "link-only replies are still recognised with URLs dropped");

    // keep_urls = true: answers are the stored text, URLs included; link-only still dropped.
    let with_urls = build_with(&db, &ds_settings(&dir.path().join("with-urls")), &CleanOptions { keep_urls: true, keep_emoji: false });
    assert_eq!(with_urls.stats.train + with_urls.stats.test + near, want_pairs as u64);
    assert_eq!(with_urls.stats.dropped["link_only"], report.stats.dropped["link_only"]);
    let url_answers: HashSet<String> = pairs_of(&with_urls.written.path).into_iter().map(|(_, a)| a).collect();
    assert!(url_answers.iter().any(|a| a.contains("https://youtu.be/v")));
    for a in &url_answers {
        assert!(threads.iter().flat_map(|t| &t.posts).any(|p| p.expect == Expect::Answer && &p.body == a), "{a:?}");
    }

    // Multi-turn: the fixture's opening posters only add statements, never a question, so no
    // follow-up becomes a user turn and each one after an answer is counted as such.
    let mt = build(&db, &DatasetSettings { multi_turn: true, ..ds_settings(&dir.path().join("multi")) });
    assert_eq!(mt.stats.multi_turn, 0);
    assert_eq!(mt.stats.train + mt.stats.test + near, want_pairs as u64);
    let n = |r: &str| mt.stats.dropped.get(r).copied().unwrap_or(0);
    assert!(n("follow_up_not_question") > 0, "{:?}", mt.stats.dropped);
    assert_eq!(n("follow_up_not_question") + n("by_original_poster"), want_drops["by_original_poster"]);

    let stats: Value = serde_json::from_slice(&std::fs::read(folder.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["train"].as_u64().unwrap() as usize, train.len());
    assert!(stats["answer_words"]["p50"].as_u64().unwrap() > 5);
    let meta: Value = serde_json::from_slice(&std::fs::read(folder.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["hash"], report.written.hash.as_str());
    assert_eq!(std::fs::read_to_string(dir.path().join("datasets/LATEST")).unwrap().trim(), report.written.name);

    // Deterministic: same input and settings, same dataset; another seed, another split.
    assert_eq!(build(&db, &s).written.hash, report.written.hash);
    let reseeded = build(&db, &DatasetSettings { split_seed: 99, ..s.clone() });
    assert_ne!(reseeded.written.hash, report.written.hash);
    assert_eq!(reseeded.stats.train + reseeded.stats.test, report.stats.train + report.stats.test);

    // The word filter drops pairs that contain a listed word.
    let filtered = build(&db, &DatasetSettings { blocked_words: vec!["mammoth".into()], ..s.clone() });
    let d = &filtered.stats.dropped;
    assert!(d.get("word_filter").copied().unwrap_or(0) + d.get("question_filtered").copied().unwrap_or(0) > 0, "{d:?}");
    for f in ["train.jsonl", "test.jsonl"] {
        assert!(!std::fs::read_to_string(filtered.written.path.join(f)).unwrap().to_lowercase().contains("mammoth"));
    }
}

#[test]
fn synthetic_store_splits_deterministically_without_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synthetic.sqlite");
    {
        let store = Store::open(&db).unwrap();
        let base = url::Url::parse("https://ns.test").unwrap();
        freeski_bot::bench::forum::populate(&store, &base, 120, 2, 6, 7).unwrap();
    }
    let s = ds_settings(&dir.path().join("a"));
    let a = build(&db, &s);
    assert_eq!(a.reparse.as_ref().map(|r| r.pages), Some(240), "posts come from the stored raw HTML");
    let b = build(&db, &ds_settings(&dir.path().join("b")));
    assert_eq!(a.written.hash, b.written.hash);
    assert_eq!(std::fs::read(a.written.path.join("train.jsonl")).unwrap(), std::fs::read(b.written.path.join("train.jsonl")).unwrap());
    let ids = |f: &str| -> HashSet<u64> { lines(&a.written.path.join(f)).iter().map(|r| r["thread_id"].as_u64().unwrap()).collect() };
    let (train, test) = (ids("train.jsonl"), ids("test.jsonl"));
    assert!(train.is_disjoint(&test));
    let share = test.len() as f64 / (train.len() + test.len()) as f64;
    assert!((0.02..0.25).contains(&share), "{share}");
}

#[test]
fn feedback_votes_and_corrections_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bot.sqlite");
    {
        let store = Store::open(&db).unwrap();
        let answer = |q: &str, a: &str| {
            store
                .record_answer(&NewAnswer {
                    question: q.into(),
                    context: vec![Turn { role: "user".into(), content: "hi bot".into() }, Turn { role: "assistant".into(), content: "hey!".into() }],
                    answer: a.into(),
                    adapter_id: Some("adapter-1".into()),
                    channel_id: Some(42),
                    asked_by: Some(7),
                    ..Default::default()
                })
                .unwrap()
        };
        let liked = answer("How do I butter?", "Press your weight onto the tails and keep your chest over your knees.");
        let disliked = answer("Best wax?", "Candle wax works great on skis.");
        let corrected = answer("What is a 540?", "A 540 is two full rotations.");
        let tie = answer("Park or pow?", "Both.");
        let switched = answer("Helmet?", "Nah, you don't need one.");
        store.link_message(liked, 1_100_000_000_000_000_001, 0).unwrap();
        let via_message = store.answer_for_message(1_100_000_000_000_000_001).unwrap().unwrap();
        store.set_vote(via_message, 1, Vote::Up).unwrap();
        store.set_vote(liked, 2, Vote::Up).unwrap();
        store.set_vote(disliked, 1, Vote::Down).unwrap();
        store.set_vote(corrected, 3, Vote::Down).unwrap();
        store.add_correction(corrected, 99, "A 540 is one and a half rotations.").unwrap();
        store.set_vote(tie, 1, Vote::Up).unwrap();
        store.set_vote(tie, 2, Vote::Down).unwrap();
        store.set_vote(switched, 1, Vote::Up).unwrap();
        store.set_vote(switched, 1, Vote::Down).unwrap();
    }
    // No held-out share here: every labelled answer goes to feedback.jsonl (the split has its own test).
    let s = DatasetSettings { feedback_test_fraction: 0.0, ..ds_settings(&dir.path().join("out")) };
    let report = build(&db, &s);
    let train = lines(&report.written.path.join("train.jsonl"));
    let rejected = lines(&report.written.path.join("rejected.jsonl"));
    // Labelled answers: 👍 → good, 👎 → bad, a correction → the correction good and the original
    // bad; a tie teaches nothing, and a vote switched to 👎 counts as 👎.
    let feedback: Vec<(String, String, bool)> = lines(&report.written.path.join("feedback.jsonl"))
        .iter()
        .map(|r| {
            let m = r["messages"].as_array().unwrap();
            assert_eq!(m.len(), 4, "context turns come first");
            (m[2]["content"].as_str().unwrap().to_string(), m[3]["content"].as_str().unwrap().to_string(), r["label"].as_bool().unwrap())
        })
        .collect();
    let own = |q: &str, a: &str, l| (q.to_string(), a.to_string(), l);
    assert_eq!(
        feedback,
        vec![
            own("How do I butter?", "Press your weight onto the tails and keep your chest over your knees.", true),
            own("Best wax?", "Candle wax works great on skis.", false),
            own("What is a 540?", "A 540 is one and a half rotations.", true),
            own("What is a 540?", "A 540 is two full rotations.", false),
            own("Helmet?", "Nah, you don't need one.", false),
        ]
    );
    assert!(lines(&report.written.path.join("feedback_test.jsonl")).is_empty());
    assert_eq!((report.stats.feedback.desirable, report.stats.feedback.undesirable), (2, 3));
    assert!(lines(&report.written.path.join("test.jsonl")).is_empty(), "feedback never goes to the test split");

    let answers: Vec<&str> = train.iter().map(|r| r["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap()).collect();
    assert_eq!(answers, vec!["Press your weight onto the tails and keep your chest over your knees.", "A 540 is one and a half rotations."]);
    for r in &train {
        assert!(r["thread_id"].is_null());
        assert!(r["answer_id"].as_i64().is_some());
        let m = r["messages"].as_array().unwrap();
        assert_eq!(m.len(), 4, "context turns come first");
        assert_eq!(m[0]["content"], "hi bot");
    }
    let rejected_answers: Vec<&str> = rejected.iter().map(|r| r["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap()).collect();
    assert_eq!(rejected_answers, vec!["Candle wax works great on skis.", "A 540 is two full rotations.", "Nah, you don't need one."]);
    assert_eq!(rejected[0]["messages"][2]["content"], "Best wax?");
    assert_eq!(rejected[1]["correction"], "A 540 is one and a half rotations.");
    assert_eq!((report.stats.feedback_train, report.stats.rejected), (2, 3));

    let without = build(&db, &DatasetSettings { include_feedback: false, ..s });
    assert_eq!((without.stats.train, without.stats.rejected), (0, 0));
    assert!(lines(&without.written.path.join("feedback.jsonl")).is_empty());
}

/// Feedback on questions of the forum's held-out split goes to feedback_test.jsonl only (never
/// to feedback.jsonl or train.jsonl), and the rest is split by question: both labels of a
/// correction land on the same side, and the held-out side gets about its share.
#[test]
fn feedback_on_test_questions_is_held_out_and_split_by_question() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synthetic.sqlite");
    {
        let store = Store::open(&db).unwrap();
        freeski_bot::bench::forum::populate(&store, &url::Url::parse("https://ns.test").unwrap(), 60, 1, 4, 3).unwrap();
    }
    let first = build(&db, &ds_settings(&dir.path().join("a")));
    let questions = |f: &str| -> Vec<String> { lines(&first.written.path.join(f)).iter().map(|r| r["messages"][0]["content"].as_str().unwrap().to_string()).collect() };
    let (forum_train, forum_test) = (questions("train.jsonl"), questions("test.jsonl"));
    assert!(forum_test.len() >= 2, "the synthetic forum has held-out threads");
    {
        let store = Store::open(&db).unwrap();
        let answer = |q: &str, a: &str| store.record_answer(&NewAnswer { question: q.into(), answer: a.into(), ..Default::default() }).unwrap();
        // Asked in Discord exactly as held-out forum threads ask them (case and spacing aside).
        let a = answer(&forum_test[0], "Wax it every day, no exceptions.");
        store.set_vote(a, 1, Vote::Up).unwrap();
        let b = answer(&format!("  {}  ", forum_test[1].to_uppercase()), "Nobody knows.");
        store.set_vote(b, 1, Vote::Down).unwrap();
        store.add_correction(b, 9, "Ask at the shop, they will measure you.").unwrap();
        let c = answer(&forum_train[0], "Point them downhill.");
        store.set_vote(c, 2, Vote::Down).unwrap();
        // Many more questions: the held-out share is drawn by question.
        for i in 0..200 {
            let id = answer(&format!("Synthetic question number {i}?"), &format!("Answer {i}."));
            store.set_vote(id, 1, if i % 2 == 0 { Vote::Up } else { Vote::Down }).unwrap();
            if i % 5 == 0 {
                store.add_correction(id, 9, &format!("Corrected answer {i}.")).unwrap();
            }
        }
    }
    let second = build(&db, &ds_settings(&dir.path().join("b")));
    let path = &second.written.path;
    let users = |f: &str| -> Vec<String> { lines(&path.join(f)).iter().map(|r| r["messages"][0]["content"].as_str().unwrap().trim().to_lowercase()).collect() };
    let test_q: HashSet<String> = users("test.jsonl").into_iter().collect();
    let (fb_train, fb_test, train) = (users("feedback.jsonl"), users("feedback_test.jsonl"), users("train.jsonl"));
    assert!(fb_train.iter().chain(&train).all(|q| !test_q.contains(q)), "a held-out forum question was trained on");
    for q in [&forum_test[0], &forum_test[1]] {
        assert!(fb_test.contains(&q.to_lowercase()), "feedback on {q:?} is held out");
    }
    assert!(fb_train.contains(&forum_train[0].to_lowercase()) || fb_test.contains(&forum_train[0].to_lowercase()));
    let train_set: HashSet<&String> = fb_train.iter().collect();
    assert!(fb_test.iter().all(|q| !train_set.contains(q)), "no question on both sides");
    let held = fb_test.iter().filter(|q| q.starts_with("synthetic")).collect::<HashSet<_>>().len() as f64 / 200.0;
    assert!((0.1..0.3).contains(&held), "held-out share {held}");
    let st = second.stats.feedback;
    assert_eq!((st.desirable + st.undesirable) as usize, fb_train.len());
    assert_eq!((st.held_out_desirable + st.held_out_undesirable) as usize, fb_test.len());
    assert_eq!(st.desirable + st.undesirable + st.held_out_desirable + st.held_out_undesirable, 1 + 2 + 1 + 200 + 40);
}
