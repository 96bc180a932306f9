//! The bot end to end: the real `bot::run` (serenity client, engine, store) against the fake
//! Discord in tests/common/fake_discord, answering with crafted script models.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::bot::start;
use common::fake_discord::{FakeDiscord, BOT_ID, CHANNEL_ID, GUILD_ID};
use common::script_model::{self, End};
use freeski_bot::config::Settings;
use freeski_bot::llm::engine::{AdapterChoice, Engine, Event, Question, Ticket};
use freeski_bot::llm::generate::GenOptions;
use freeski_bot::llm::load::LoadedModel;
use freeski_bot::llm::sampling::SamplingParams;
use freeski_bot::store::{AnswerId, JobKind, Store};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn settings(dir: &Path, fake: &FakeDiscord, extra: &[(&str, &str)]) -> Arc<Settings> {
    Arc::new(Settings::load_with_env(None, settings_env(dir, fake, extra)).unwrap())
}

/// The test settings as `FREESKI__…` variables (also for the bot binary in a child process).
fn settings_env(dir: &Path, fake: &FakeDiscord, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("FREESKI__STORE__PATH", dir.join("store.sqlite").display().to_string()),
        ("FREESKI__ADAPTER__DIR", dir.join("adapters").display().to_string()),
        ("FREESKI__DISCORD__API_BASE", fake.rest_url.clone()),
        ("FREESKI__DISCORD__GUILD_IDS", GUILD_ID.to_string()),
        ("FREESKI__DISCORD__EDIT_INTERVAL_MS", "100".into()),
        ("FREESKI__DISCORD__REST_RETRY_BACKOFF_MS", "20".into()),
        ("FREESKI__GENERATION__TEMPERATURE", "0".into()),
        ("FREESKI__GENERATION__REPETITION_PENALTY", "1.0".into()),
        ("FREESKI__GENERATION__NO_REPEAT_NGRAM", "0".into()),
        ("FREESKI__GENERATION__MAX_NEW_TOKENS", "64".into()),
        ("FREESKI__MODEL__MAX_CONTEXT", "16384".into()),
        ("FREESKI__BOT__USER_BURST", "10".into()),
        ("FREESKI__BOT__USER_QUESTIONS_PER_MINUTE", "10".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn stop_script(words: usize) -> (Arc<LoadedModel>, String) {
    let tok = script_model::tokenizer();
    let script = script_model::words(&tok, words, &[]);
    let text = script_model::text(&tok, &script);
    (Arc::new(script_model::model(&script, End::Stop)), text)
}

fn id_of(v: &Value) -> u64 {
    v["id"].as_str().unwrap().parse().unwrap()
}

/// Bot messages created in reply to message `q` (POSTs referencing it that succeeded).
fn replies_to(fake: &FakeDiscord, q: u64) -> Vec<u64> {
    fake.calls()
        .iter()
        .filter(|c| c.method == "POST" && c.status == 200 && c.body["message_reference"]["message_id"].as_str() == Some(&q.to_string()))
        .filter_map(|c| c.message_id)
        .collect()
}

fn content(fake: &FakeDiscord, id: u64) -> String {
    fake.bot_message(id)["content"].as_str().unwrap().to_string()
}

/// Poll the store (opened read-side, WAL) until `pred` holds: a failure guard, not a timer.
async fn wait_store<R>(path: &Path, what: &str, mut pred: impl FnMut(&Store) -> Option<R>) -> R {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = Store::open(path).unwrap();
        if let Some(r) = pred(&s) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn answer_for(s: &Store, message: u64) -> Option<AnswerId> {
    s.answer_for_message(message).unwrap()
}

fn no_mentions_allowed(body: &Value) {
    assert_eq!(body["allowed_mentions"], json!({"parse": [], "users": [], "roles": [], "replied_user": false}), "{body}");
}

/// A question submitted straight to the engine that runs until dropped (the engine is busy).
async fn blocker(engine: &Engine) -> Ticket {
    let opts = GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: 10_000_000, stop: vec![], seed: 1, max_context: script_model::MAX_POSITION };
    let mut t = engine.submit(Question { history: vec![], question: "block".into(), opts, adapter: AdapterChoice::Active }).unwrap();
    loop {
        match tokio::time::timeout(T, t.next()).await.unwrap() {
            Some(Event::Text(_)) => return t,
            Some(Event::Started { .. }) => {}
            other => panic!("blocker: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mention_gets_typing_and_reply_then_reply_chain_carries_context() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, text) = stop_script(8);
    let s = settings(dir.path(), &fake, &[]);
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");

    let q = fake.say(7, &format!("<@{BOT_ID}> how do I land a 360?"), true, None);
    let qid = id_of(&q);
    let a1 = wait_store(&db, "the first answer", |s| replies_to(&fake, qid).first().and_then(|&m| answer_for(s, m))).await;
    let reply = replies_to(&fake, qid)[0];
    assert_eq!(content(&fake, reply), text.trim());
    let calls = fake.calls();
    let typing = calls.iter().position(|c| c.method == "POST" && c.path == format!("/api/v10/channels/{CHANNEL_ID}/typing")).expect("typing indicator");
    let post = calls.iter().position(|c| c.message_id == Some(reply) && c.method == "POST").unwrap();
    assert!(typing < post, "typing starts before the reply");
    assert_eq!(calls[post].path, format!("/api/v10/channels/{CHANNEL_ID}/messages"));
    for c in calls.iter().filter(|c| c.method == "POST" && c.path.ends_with("/messages") || c.method == "PATCH") {
        no_mentions_allowed(&c.body);
    }
    let store = Store::open(&db).unwrap();
    let stored = store.answer(a1).unwrap().unwrap();
    assert_eq!((stored.question.as_str(), stored.answer.trim(), stored.asked_by), ("how do I land a 360?", text.trim(), Some(7)));
    assert_eq!(stored.generation["temperature"], json!(0.0));
    assert_eq!(stored.generation["finish"], json!("Eos"));

    // A reply to the answer, without a mention: answered, with the earlier turn as context.
    let parent = fake.bot_message(reply);
    let q2 = fake.say(7, "and switch?", false, Some(&parent));
    let a2 = wait_store(&db, "the follow-up answer", |s| replies_to(&fake, id_of(&q2)).first().and_then(|&m| answer_for(s, m))).await;
    let follow = Store::open(&db).unwrap().answer(a2).unwrap().unwrap();
    assert_eq!(follow.question, "and switch?");
    let ctx: Vec<(&str, &str)> = follow.context.iter().map(|t| (t.role.as_str(), t.content.as_str())).collect();
    assert_eq!(ctx, vec![("user", "how do I land a 360?"), ("assistant", stored.answer.as_str())]);
    assert!(follow.generation["prompt_tokens"].as_u64().unwrap() > stored.generation["prompt_tokens"].as_u64().unwrap());

    // Messages that must not be answered: no mention in a normal channel, and a bot's message.
    fake.say(8, "just chatting", false, None);
    let mut from_bot = fake.message(9, &format!("<@{BOT_ID}> hi"), true, None);
    from_bot["author"]["bot"] = true.into();
    fake.dispatch("MESSAGE_CREATE", from_bot);
    bot.stop().await;
    let posts = fake.calls().iter().filter(|c| c.method == "POST" && c.path.ends_with("/messages")).count();
    assert_eq!(posts, 2, "only the two questions were answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answer_splits_into_fenced_parts_and_edits_keep_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    // One cycle: a paragraph, a fenced code block, another paragraph; repeated until the
    // token budget: about 7 cycles, over 5,000 characters.
    let code = script_model::ids(&tok, &["ĊĊ", "```", "python", "ĊĠĠĠĠ", "()", "ĊĠĠĠ", "``", "`", "ĊĊĠĠĠ"]);
    let mut script = script_model::words(&tok, 50, &code);
    script.push(tok.token_to_id(".").unwrap());
    script.extend(&code);
    script.extend(script_model::words(&tok, 100, &script.clone())[50..].iter());
    script.push(tok.token_to_id("!").unwrap());
    script.push(tok.token_to_id("ĊĊĊĠĠĠ").unwrap());
    let lm = Arc::new(script_model::model(&script, End::Cycle));
    let interval = 150;
    let s = settings(dir.path(), &fake, &[("FREESKI__GENERATION__MAX_NEW_TOKENS", "1000"), ("FREESKI__DISCORD__EDIT_INTERVAL_MS", &interval.to_string())]);
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    let q = fake.say(7, &format!("<@{BOT_ID}> give me a drill"), true, None);
    let first = wait_store(&db, "the long answer", |s| replies_to(&fake, id_of(&q)).first().and_then(|&m| answer_for(s, m))).await;
    let store = Store::open(&db).unwrap();
    let stored = store.answer(first).unwrap().unwrap();
    assert!(stored.answer.chars().count() >= 5000, "{} chars", stored.answer.chars().count());
    let ids = store.answer_messages(first).unwrap();
    assert!(ids.len() >= 3, "{} parts", ids.len());
    let calls = fake.calls();
    // Parts were posted in order, each ≤ 2000 chars with balanced fences, and together they
    // carry the whole answer.
    let posted: Vec<u64> = calls.iter().filter(|c| c.method == "POST" && c.path.ends_with("/messages")).filter_map(|c| c.message_id).collect();
    assert_eq!(posted, ids);
    let mut joined = String::new();
    for id in &ids {
        let c = content(&fake, *id);
        assert!(c.chars().count() <= 2000, "{} chars", c.chars().count());
        assert_eq!(c.lines().filter(|l| l.trim_start().starts_with("```")).count() % 2, 0, "unbalanced fences: {c}");
        joined.push_str(&c);
        joined.push('\n');
    }
    let words_in = |s: &str| s.split_whitespace().filter(|w| !w.contains('`')).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(words_in(&joined), words_in(&stored.answer));
    // Writes of this answer (posts and edits) never come closer than the interval, by the fake's clock.
    let times: Vec<Duration> = calls.iter().filter(|c| c.message_id.is_some_and(|m| ids.contains(&m)) && c.method != "GET").map(|c| c.at).collect();
    assert!(times.len() > ids.len(), "the answer was streamed with edits");
    for w in times.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(interval), "writes {:?} apart", w[1] - w[0]);
    }
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash_ask_is_deferred_at_once_while_the_engine_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let script = script_model::words(&tok, 10, &[]);
    let text = script_model::text(&tok, &script);
    let lm = Arc::new(script_model::model(&script, End::Cycle));
    let s = settings(dir.path(), &fake, &[("FREESKI__GENERATION__MAX_NEW_TOKENS", "10")]);
    let bot = start(&fake, s, lm).await;
    let busy = blocker(&bot.engine).await;
    let sent = fake.now();
    let token = fake.slash(7, false, "ask", json!([{"name": "question", "type": 3, "value": "what wax?"}]));
    let callback = fake.wait_for("the deferral", T, |f| f.calls().into_iter().find(|c| c.path.ends_with("/callback") && c.path.contains(&token))).await;
    assert_eq!(callback.body["type"], json!(5), "a deferred response");
    assert!(callback.at - sent < Duration::from_secs(3), "deferred after {:?}", callback.at - sent);
    assert!(bot.engine.has_waiting());
    drop(busy);
    let db = dir.path().join("store.sqlite");
    let edit = fake.wait_for("the answer", T, |f| f.calls().into_iter().rev().find(|c| c.method == "PATCH" && c.path.contains(&token) && c.path.ends_with("@original"))).await;
    no_mentions_allowed(&edit.body);
    let id = wait_store(&db, "the stored /ask answer", |s| answer_for(s, edit.message_id.unwrap())).await;
    assert_eq!(Store::open(&db).unwrap().answer(id).unwrap().unwrap().answer, text);
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_in_model_output_ping_nobody() {
    let tok = script_model::tokenizer();
    // A token has one successor in a script model, and both `<@123>` and `<@&456>` need "@"
    // after "<": two models, one answer each.
    let scripts = [
        (vec!["Hey", "Ġ@", "every", "one", ",", "Ġ<", "@", "1", "2", "3", ">", "!"], "Hey @everyone, <@123>!"),
        (vec!["Hello", "<", "@", "&", "4", "5", "6", ">", "Ġnow", "."], "Hello<@&456> now."),
    ];
    for (pieces, shown) in scripts {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDiscord::start().await;
        let script = script_model::ids(&tok, &pieces);
        assert_eq!(script_model::text(&tok, &script), shown);
        let bot = start(&fake, settings(dir.path(), &fake, &[]), Arc::new(script_model::model(&script, End::Stop))).await;
        let q = fake.say(7, &format!("<@{BOT_ID}> say hi to everyone"), true, None);
        let db = dir.path().join("store.sqlite");
        let a = wait_store(&db, "the answer", |s| replies_to(&fake, id_of(&q)).first().and_then(|&m| answer_for(s, m))).await;
        assert_eq!(Store::open(&db).unwrap().answer(a).unwrap().unwrap().answer, shown, "the stored text is the model's");
        for c in fake.calls().iter().filter(|c| c.body.get("content").is_some()) {
            no_mentions_allowed(&c.body);
            let text = c.body["content"].as_str().unwrap();
            for ping in ["@everyone", "<@123>", "<@&456>"] {
                assert!(!text.contains(ping), "{ping} in {text:?}");
            }
        }
        let final_text = content(&fake, replies_to(&fake, id_of(&q))[0]);
        assert_eq!(final_text.replace('\u{200B}', ""), shown);
        bot.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_are_checked_and_retrain_is_single_flight() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, _) = stop_script(4);
    let bot = start(&fake, settings(dir.path(), &fake, &[]), lm).await;
    let db = dir.path().join("store.sqlite");
    let refused = fake.slash(7, false, "retrain", json!([]));
    let c = fake.wait_for("the refusal", T, |f| f.calls().into_iter().find(|c| c.path.contains(&refused) && c.path.ends_with("/callback"))).await;
    assert_eq!((c.body["type"].clone(), c.body["data"]["flags"].clone()), (json!(4), json!(64)), "an ephemeral message: {}", c.body);
    assert!(c.body["data"]["content"].as_str().unwrap().contains("only admins"));
    assert!(Store::open(&db).unwrap().active_jobs().unwrap().is_empty(), "a refused /retrain creates no job");

    let first = fake.slash(8, true, "retrain", json!([]));
    let e1 = fake.wait_for("the first retrain reply", T, |f| f.calls().into_iter().find(|c| c.method == "PATCH" && c.path.contains(&first))).await;
    let second = fake.slash(8, true, "retrain", json!([]));
    let e2 = fake.wait_for("the second retrain reply", T, |f| f.calls().into_iter().find(|c| c.method == "PATCH" && c.path.contains(&second))).await;
    // The status message is recorded once its edit has returned to the bot.
    let jobs = wait_store(&db, "the job's status message", |s| Some(s.active_jobs().unwrap()).filter(|j| j.iter().all(|j| j.status_message_id.is_some()))).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!((jobs[0].kind, jobs[0].requested_by, jobs[0].status_message_id), (JobKind::Retrain, Some(8), e1.message_id));
    assert!(e1.body["content"].as_str().unwrap().contains(&format!("retrain job #{}", jobs[0].id)));
    assert!(e2.body["content"].as_str().unwrap().contains("Already on it") && e2.body["content"].as_str().unwrap().contains(&format!("#{}", jobs[0].id)));

    let status = fake.slash(8, true, "status", json!([]));
    let c = fake.wait_for("/status", T, |f| f.calls().into_iter().find(|c| c.path.contains(&status) && c.path.ends_with("/callback"))).await;
    let text = c.body["data"]["content"].as_str().unwrap();
    assert!(text.contains("script") && text.contains("none (base model)") && text.contains(&format!("retrain job #{}", jobs[0].id)), "{text}");
    assert!(text.contains("**Memory:** host"), "admins see memory: {text}");
    // Members see the model, adapter and queue, not the host's memory or job details.
    let status = fake.slash(7, false, "status", json!([]));
    let c = fake.wait_for("/status for a member", T, |f| f.calls().into_iter().find(|c| c.path.contains(&status) && c.path.ends_with("/callback"))).await;
    let text = c.body["data"]["content"].as_str().unwrap();
    eprintln!("DEBUG {status} {} {:?}", c.path, fake.calls().iter().filter(|c| c.path.contains("callback")).map(|c| c.path.clone()).collect::<Vec<_>>());
    assert!(text.contains("none (base model)") && text.contains("**Queue:**") && text.contains("**Jobs:** 1 queued or running"), "{text}");
    assert!(!text.contains("Memory") && !text.contains("retrain job"), "{text}");

    let cancel = fake.slash(8, true, "cancel", json!([]));
    fake.wait_for("/cancel", T, |f| f.calls().into_iter().find(|c| c.path.contains(&cancel) && c.path.ends_with("/callback"))).await;
    let job = Store::open(&db).unwrap().job(jobs[0].id).unwrap().unwrap();
    assert!(job.cancel_requested && !job.state.is_active(), "a queued job is cancelled at once: {job:?}");
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_become_votes_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, _) = stop_script(4);
    let s = settings(dir.path(), &fake, &[]);
    let bot = start(&fake, s.clone(), lm.clone()).await;
    let db = dir.path().join("store.sqlite");
    let q = fake.say(7, &format!("<@{BOT_ID}> best skis?"), true, None);
    let a = wait_store(&db, "the answer", |s| replies_to(&fake, id_of(&q)).first().and_then(|&m| answer_for(s, m))).await;
    let msg = replies_to(&fake, id_of(&q))[0];
    let tally = |want: (u32, u32)| {
        let db = db.clone();
        async move { wait_store(&db, &format!("votes {want:?}"), |s| (s.vote_tally(a).unwrap() == want).then_some(())).await }
    };
    fake.react(20, msg, "👎", true, false);
    tally((0, 1)).await;
    fake.react(20, msg, "👎", false, false);
    tally((0, 0)).await;
    fake.react(21, msg, "👍", true, false);
    fake.react(22, msg, "👍", true, false);
    tally((2, 0)).await;
    // Ignored: a bot's reaction, a reaction on the user's own message, another emoji.
    fake.react(23, msg, "👎", true, true);
    fake.react(24, id_of(&q), "👎", true, false);
    fake.react(25, msg, "🎿", true, false);
    bot.stop().await;
    let bot = start(&fake, s, lm).await;
    fake.react(26, msg, "👎", true, false);
    tally((2, 1)).await;
    bot.stop().await;
    let store = Store::open(&db).unwrap();
    let rows = store.feedback_rows().unwrap();
    assert_eq!((rows.len(), rows[0].up, rows[0].down), (1, 2, 1), "exactly the expected votes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_user_gets_one_notice_and_twenty_users_queue_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    // A cycling script: the bot's answers stop at max_new_tokens, the blocker runs until dropped.
    let tok = script_model::tokenizer();
    let lm = Arc::new(script_model::model(&script_model::words(&tok, 5, &[]), End::Cycle));
    let s = settings(
        dir.path(),
        &fake,
        &[("FREESKI__BOT__USER_BURST", "3"), ("FREESKI__BOT__USER_QUESTIONS_PER_MINUTE", "1"), ("FREESKI__BOT__MAX_BATCH", "1"), ("FREESKI__GENERATION__MAX_NEW_TOKENS", "8")],
    );
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    // 30 mentions at once from one user: 3 answered (the burst), one notice, the rest dropped
    // without a message (a notice per message would flood the channel).
    let burst: Vec<u64> = (0..30).map(|i| id_of(&fake.say(7, &format!("<@{BOT_ID}> question {i}"), true, None))).collect();
    let refusals = |f: &FakeDiscord| f.calls().iter().filter(|c| c.method == "POST" && c.body["content"].as_str().is_some_and(|t| t.contains("faster than I can keep up"))).count();
    fake.wait_for("the rate-limit notice", T, |f| (refusals(f) >= 1).then_some(())).await;
    wait_store(&db, "3 answers", |s| (burst.iter().filter(|q| replies_to(&fake, **q).first().is_some_and(|m| answer_for(s, *m).is_some())).count() == 3).then_some(())).await;

    // 20 users while the engine is busy: each is told its place, and answers come in order.
    let busy = blocker(&bot.engine).await;
    let mut questions = Vec::new();
    for u in 0..20u64 {
        let q = id_of(&fake.say(100 + u, &format!("<@{BOT_ID}> user question {u}"), true, None));
        let ahead = u + 1;
        let notice = fake.wait_for("a queue notice", T, |f| replies_to(f, q).first().copied()).await;
        let text = content(&fake, notice);
        assert!(
            text.contains(&format!("{ahead} question{} ahead", if ahead == 1 { "" } else { "s" })),
            "user {u}: {text} (running {}, waiting {})",
            bot.engine.running(),
            bot.engine.queue_depth()
        );
        questions.push(q);
    }
    drop(busy);
    let answers = wait_store(&db, "20 answers", |s| questions.iter().map(|q| replies_to(&fake, *q).first().and_then(|m| answer_for(s, *m))).collect::<Option<Vec<_>>>()).await;
    // Generation order is the engine's batch order (one question a batch here); the order the
    // answers reach the store also depends on their delivery, so it is not what is checked.
    let store = Store::open(&db).unwrap();
    let runs: Vec<u64> = answers.iter().map(|a| store.answer(*a).unwrap().unwrap().generation["engine_run"].as_u64().expect("engine_run stored")).collect();
    assert!(runs.windows(2).all(|w| w[0] < w[1]), "answered in the order asked: engine batches {runs:?}");
    for q in &questions {
        assert!(!content(&fake, replies_to(&fake, *q)[0]).contains("ahead"), "the notice became the answer");
    }
    // Stopping waits for every notice in flight: the count is final.
    bot.stop().await;
    assert_eq!(refusals(&fake), 1, "one notice for the whole flood");
    let noticed: Vec<u64> = burst.iter().copied().filter(|q| replies_to(&fake, *q).iter().any(|m| content(&fake, *m).contains("faster than I can keep up"))).collect();
    assert_eq!(noticed.len(), 1, "one refused question gets the notice: {noticed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_reconnect_invalid_session_rest_500_and_malformed_events() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, _) = stop_script(4);
    let s = settings(dir.path(), &fake, &[]);
    let retries = s.discord.rest_retries;
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    fake.raw("{this is not json");
    fake.dispatch("MESSAGE_CREATE", json!({"id": "1", "content": 5}));
    fake.reconnect();
    fake.wait_for("a resume", T, |f| (f.resumes() >= 1).then_some(())).await;
    fake.invalid_session();
    fake.wait_connected(2).await;
    assert_eq!(fake.identifies(), 2);

    // Two 500s on the reply post: retried, then posted and stored.
    let post_path = format!("/api/v10/channels/{CHANNEL_ID}/messages");
    fake.fail_next("POST", &post_path, 2);
    let q = fake.say(7, &format!("<@{BOT_ID}> still there?"), true, None);
    wait_store(&db, "the answer", |s| replies_to(&fake, id_of(&q)).first().and_then(|&m| answer_for(s, m))).await;
    let attempts = fake.calls().iter().filter(|c| c.method == "POST" && c.path == post_path).map(|c| c.status).collect::<Vec<_>>();
    assert_eq!(attempts, vec![500, 500, 200]);

    // Failing for good: a bounded number of attempts, and the answer is stored all the same.
    fake.fail_next("POST", &post_path, 100);
    fake.say(7, &format!("<@{BOT_ID}> and now?"), true, None);
    let stored = wait_store(&db, "the undelivered answer", |s| s.answer(AnswerId(2)).unwrap()).await;
    assert!(stored.generation["delivery_error"].is_string(), "{}", stored.generation);
    let failed = fake.calls().iter().filter(|c| c.method == "POST" && c.path == post_path && c.status == 500).count();
    assert_eq!(failed, 2 + retries as usize + 1);
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_question_cancels_and_shutdown_closes_answers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let script = script_model::words(&tok, 10, &[]);
    let lm = Arc::new(script_model::model(&script, End::Cycle));
    let s = settings(dir.path(), &fake, &[("FREESKI__GENERATION__MAX_NEW_TOKENS", "10000000")]);
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    let q = fake.say(7, &format!("<@{BOT_ID}> tell me everything"), true, None);
    let reply = fake.wait_for("the answer to start", T, |f| replies_to(f, id_of(&q)).first().copied()).await;
    fake.delete_message(id_of(&q));
    fake.wait_for("the answer to be retracted", T, |f| f.calls().into_iter().find(|c| c.method == "DELETE" && c.path.ends_with(&reply.to_string()))).await;
    assert!(!bot.engine.has_waiting(), "the generation stopped");
    assert!(Store::open(&db).unwrap().answer(AnswerId(1)).unwrap().is_none());

    let q2 = fake.say(7, &format!("<@{BOT_ID}> and again"), true, None);
    let reply2 = fake.wait_for("the second answer to start", T, |f| replies_to(f, id_of(&q2)).first().copied()).await;
    bot.stop().await;
    // A long answer may have grown past one message: the note ends its last part.
    let store = Store::open(&db).unwrap();
    let parts = store.answer_messages(AnswerId(1)).unwrap();
    assert_eq!(parts.first(), Some(&reply2), "the answer starts in the reply");
    let last = content(&fake, *parts.last().unwrap());
    assert!(last.ends_with("*(cut short: the bot is restarting)*"), "{last}");
    let stored = store.answer(AnswerId(1)).unwrap().expect("the cut answer is stored");
    assert_eq!(stored.generation["finish"], json!("Cancelled"));
}

/// The PATCH that completed interaction `token`'s deferred response, the last one.
async fn final_edit(fake: &FakeDiscord, token: &str, what: &str) -> common::fake_discord::Call {
    fake.wait_for(what, T, |f| f.calls().into_iter().rev().find(|c| c.method == "PATCH" && c.status == 200 && c.path.contains(token) && c.path.ends_with("@original"))).await
}

fn adapter_activate(fake: &FakeDiscord, id: &str) -> String {
    fake.slash(8, true, "adapter", json!([{"name": "activate", "type": 1, "options": [{"name": "id", "type": 3, "value": id}]}]))
}

/// Whether reads of `path` move its access time here (relatime/strictatime), so a test can
/// tell that a file was not read.
fn reads_are_visible(dir: &Path) -> bool {
    let probe = dir.join("atime-probe");
    std::fs::write(&probe, "x").unwrap();
    set_old_atime(&probe);
    std::fs::read(&probe).unwrap();
    accessed(&probe) > std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000)
}

fn set_old_atime(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(999_999_000);
    f.set_times(std::fs::FileTimes::new().set_accessed(old).set_modified(std::time::SystemTime::now())).unwrap();
}

fn accessed(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().accessed().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_ids_from_discord_stay_in_the_adapters_folder_and_every_response_completes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, _) = stop_script(4);
    let s = settings(dir.path(), &fake, &[]);
    let retries = s.discord.rest_retries;
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    // An adapter-looking folder outside the adapters folder: its config must never be read.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let config = outside.join("adapter_config.json");
    std::fs::write(&config, "{}").unwrap();
    let watch_reads = reads_are_visible(dir.path());
    set_old_atime(&config);
    let bot = start(&fake, s, lm).await;
    let host = dir.path().display().to_string();

    // 5,000 characters (Discord allows 6,000 in an option without max_length): the deferral is
    // edited with a bounded refusal that does not echo the id.
    let long = "x".repeat(5000);
    let token = adapter_activate(&fake, &long);
    let edit = final_edit(&fake, &token, "the refusal of a 5,000-character id").await;
    let text = edit.body["content"].as_str().unwrap();
    assert!(text.chars().count() <= 2000 && text.contains("not an adapter id") && !text.contains(&"x".repeat(200)), "{text}");

    for id in [outside.display().to_string(), "../outside".to_string(), "nope".to_string()] {
        let token = adapter_activate(&fake, &id);
        let edit = final_edit(&fake, &token, "the adapter refusal").await;
        let text = edit.body["content"].as_str().unwrap();
        assert!(text.starts_with("Adapter unchanged:"), "{id}: {text}");
        assert!(!text.contains(&host), "{id}: a host path in {text}");
        if id == "nope" {
            assert!(text.contains("no adapter `nope` in the adapters folder"), "{text}");
        } else {
            assert!(text.contains("not an adapter id"), "{id}: {text}");
        }
    }
    assert_eq!(bot.engine.active_adapter_id(), None);
    if watch_reads {
        assert!(accessed(&config) < std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000), "the outside adapter config was read");
    } else {
        eprintln!("note: file reads are not visible on this filesystem (noatime); checked the replies only");
    }

    // The adapters list shows no host path either.
    let token = fake.slash(8, true, "adapter", json!([{"name": "list", "type": 1, "options": []}]));
    let c = fake.wait_for("/adapter list", T, |f| f.calls().into_iter().find(|c| c.path.contains(&token) && c.path.ends_with("/callback"))).await;
    let text = c.body["data"]["content"].as_str().unwrap();
    assert!(text.contains("No adapters") && !text.contains(&host), "{text}");

    // An edit that fails for good (every retry): the response is still completed, with a short error.
    fake.fail_next("PATCH", "/api/v10/webhooks/", retries + 1);
    let token = fake.slash(8, true, "adapter", json!([{"name": "rollback", "type": 1, "options": []}]));
    let edit = final_edit(&fake, &token, "the completed rollback response").await;
    let text = edit.body["content"].as_str().unwrap();
    assert!(text.starts_with("Sorry, that didn't work (editing a command response)"), "{text}");
    let failed = fake.calls().iter().filter(|c| c.method == "PATCH" && c.path.contains(&token) && c.status == 500).count();
    assert_eq!(failed, retries as usize + 1);
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_on_an_answer_still_streaming_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let lm = Arc::new(script_model::model(&script_model::words(&tok, 10, &[]), End::Cycle));
    // The answer runs until the bot stops: every reaction below lands while it streams.
    let s = settings(dir.path(), &fake, &[("FREESKI__GENERATION__MAX_NEW_TOKENS", "10000000")]);
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    let q = fake.say(7, &format!("<@{BOT_ID}> tell me everything"), true, None);
    let reply = fake.wait_for("the answer to start", T, |f| replies_to(f, id_of(&q)).first().copied()).await;
    // A user sees the message once the bot has it: its first streaming edit shows the bot got the
    // create response (a reaction can't reach the bot before its own message does).
    fake.wait_for("the answer's first edit", T, |f| f.calls().iter().any(|c| c.method == "PATCH" && c.message_id == Some(reply)).then_some(())).await;
    fake.react(20, reply, "👍", true, false);
    fake.react(21, reply, "👎", true, false);
    fake.react(22, reply, "👍", true, false);
    fake.react(22, reply, "👍", false, false);
    // Events are handled in order of arrival: once a later question has its queue notice, the
    // reactions before it have been seen.
    let later = fake.say(8, &format!("<@{BOT_ID}> me too"), true, None);
    fake.wait_for("the later question's queue notice", T, |f| replies_to(f, id_of(&later)).first().copied()).await;
    assert!(Store::open(&db).unwrap().answer(AnswerId(1)).unwrap().is_none(), "the answer is still streaming");
    bot.stop().await;
    let store = Store::open(&db).unwrap();
    let a = store.answer_for_message(reply).unwrap().expect("the cut-short answer is stored");
    assert_eq!(store.answer(a).unwrap().unwrap().generation["finish"], json!("Cancelled"));
    assert_eq!(store.vote_tally(a).unwrap(), (1, 1), "👍 of user 20 and 👎 of user 21; user 22 took theirs back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_over_the_token_limit_is_refused_before_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, text) = stop_script(4);
    let s = settings(dir.path(), &fake, &[("FREESKI__BOT__MAX_QUESTION_TOKENS", "12")]);
    let bot = start(&fake, s, lm).await;
    let db = dir.path().join("store.sqlite");
    let long = fake.say(7, &format!("<@{BOT_ID}> {}", "how do I ski powder ".repeat(20)), true, None);
    let reply = fake.wait_for("the refusal", T, |f| replies_to(f, id_of(&long)).first().copied()).await;
    let refusal = content(&fake, reply);
    assert!(refusal.contains("too long") && refusal.contains("the limit is 12"), "{refusal}");
    // A question within the limit is answered as usual; the long one never reached the engine.
    let short = fake.say(7, &format!("<@{BOT_ID}> powder tips?"), true, None);
    let a = wait_store(&db, "the short question's answer", |s| replies_to(&fake, id_of(&short)).first().and_then(|&m| answer_for(s, m))).await;
    let store = Store::open(&db).unwrap();
    assert_eq!(store.answer(a).unwrap().unwrap().answer, text);
    assert_eq!((a, store.answer_for_message(reply).unwrap()), (AnswerId(1), None), "only the short question was answered");
    bot.stop().await;
}

/// The real binary: `run` answers with the generation flags given on its command line (not
/// the settings they override), and its debug log (a file, not a terminal) has no colour codes
/// and no interaction token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_binary_honours_generation_flags_and_keeps_tokens_out_of_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let model = dir.path().join("model");
    common::tiny::TinyWeights::random(common::tiny::TinySpec::standard(), 11).write_hf_folder(&model);
    let env = settings_env(
        dir.path(),
        &fake,
        &[
            ("FREESKI__GENERATION__MAX_NEW_TOKENS", "64"),
            ("FREESKI__GENERATION__TEMPERATURE", "0.9"),
            ("FREESKI__GENERATION__SEED", "77"),
            ("FREESKI__GENERATION__SYSTEM_PROMPT", ""),
        ],
    );
    let err_log = dir.path().join("bot.err");
    let sessions = fake.identifies() + 1;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_freeski-bot"))
        .args(["run", "--max-new-tokens", "16", "--temperature", "0", "--seed", "5", "--model"])
        .arg(&model)
        .envs(env)
        .env("DISCORD_TOKEN", "test-token")
        .env("FREESKI_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .expect("starting freeski-bot run");
    fake.wait_connected(sessions).await;
    let db = dir.path().join("store.sqlite");
    let q = fake.say(7, &format!("<@{BOT_ID}> which wax for spring snow?"), true, None);
    let a1 = wait_store(&db, "the mention's answer", |s| replies_to(&fake, id_of(&q)).first().and_then(|&m| answer_for(s, m))).await;
    let token = fake.slash(7, false, "ask", json!([{"name": "question", "type": 3, "value": "how long are park skis?"}]));
    let edit = final_edit(&fake, &token, "the /ask answer").await;
    let a2 = wait_store(&db, "the /ask answer", |s| answer_for(s, edit.message_id.unwrap())).await;
    child.kill().expect("stopping the bot");
    child.wait().unwrap();

    let store = Store::open(&db).unwrap();
    for a in [a1, a2] {
        let g = store.answer(a).unwrap().unwrap().generation;
        assert_eq!((g["max_new_tokens"].clone(), g["temperature"].clone(), g["seed"].clone()), (json!(16), json!(0.0), json!(5)), "{g}");
        assert!(g["answer_tokens"].as_u64().unwrap() <= 16, "{g}");
    }
    let log = std::fs::read_to_string(&err_log).unwrap();
    assert!(log.contains("DEBUG"), "the log is at debug level:\n{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    assert!(!log.contains(&token), "the interaction token is in the log");
    assert!(log.contains("***"), "serenity's request spans (which carry tokens) were logged, redacted:\n{log}");
    assert!(!log.contains("test-token"), "the bot token is in the log");
}
