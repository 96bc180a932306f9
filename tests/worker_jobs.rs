//! The worker end to end: `/retrain` and friends through the real bot, engine,
//! scraper, dataset builder and trainer, against the fake Discord and the fixture forum, on the
//! tiny random Llama (SmolLM2 tokenizer) so that training takes seconds on a CPU.

mod common;
#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use common::bot::Bot;
use common::fake_discord::{FakeDiscord, BOT_ID};
use freeski_bot::config::Settings;
use freeski_bot::llm::engine::{AdapterChoice, Engine, Event, Question};
use freeski_bot::llm::generate::GenOptions;
use freeski_bot::llm::load::{load_path, LoadedModel};
use freeski_bot::llm::sampling::SamplingParams;
use freeski_bot::store::{AnswerId, Job, JobState, Store};
use freeski_bot::train::{data, NoHooks, Outcome, TrainRun};
use freeski_bot::worker::promote::{self, Decision};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

/// The tiny random model, written once per test as an HF folder and loaded (quantized).
fn tiny_lm(dir: &Path) -> Arc<LoadedModel> {
    common::tiny::TinyWeights::random(common::tiny::TinySpec::standard(), 11).write_hf_folder(dir);
    Arc::new(load_path(dir, &Device::Cpu).expect("loading the tiny model"))
}

struct Env {
    dir: tempfile::TempDir,
    fake: FakeDiscord,
    forum: fixture_forum::Forum,
    lm: Arc<LoadedModel>,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lm = tiny_lm(&dir.path().join("model"));
        Self { dir, fake: FakeDiscord::start().await, forum: fixture_forum::Forum::start().await, lm }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("store.sqlite")
    }

    fn adapters(&self) -> PathBuf {
        self.dir.path().join("adapters")
    }

    /// Fast, small settings; `extra` overrides them.
    fn settings(&self, extra: &[(&str, &str)]) -> Arc<Settings> {
        Arc::new(Settings::load_with_env(None, self.settings_env(extra)).unwrap())
    }

    /// The same settings as `FREESKI__…` environment variables (for a bot in a child process).
    fn settings_env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let d = self.dir.path();
        let mut env: Vec<(String, String)> = [
            ("STORE__PATH", self.db().display().to_string()),
            ("ADAPTER__DIR", self.adapters().display().to_string()),
            ("DATASET__DIR", d.join("datasets").display().to_string()),
            ("DATASET__TEST_FRACTION", "0.3".into()),
            ("DISCORD__API_BASE", self.fake.rest_url.clone()),
            ("DISCORD__GUILD_IDS", common::fake_discord::GUILD_ID.to_string()),
            ("DISCORD__EDIT_INTERVAL_MS", "100".into()),
            ("DISCORD__REST_RETRY_BACKOFF_MS", "20".into()),
            ("GENERATION__TEMPERATURE", "0".into()),
            ("GENERATION__MAX_NEW_TOKENS", "8".into()),
            ("GENERATION__SYSTEM_PROMPT", "".into()),
            ("BOT__USER_BURST", "10".into()),
            ("SCRAPE__BASE_URL", self.forum.origin()),
            ("SCRAPE__REQUESTS_PER_SECOND", "400".into()),
            ("SCRAPE__BURST", "20".into()),
            ("SCRAPE__CONCURRENCY", "3".into()),
            ("SCRAPE__REQUEST_TIMEOUT_MS", "400".into()),
            ("SCRAPE__MAX_RETRIES", "2".into()),
            ("SCRAPE__BACKOFF_BASE_MS", "20".into()),
            ("SCRAPE__BACKOFF_MAX_MS", "100".into()),
            ("SCRAPE__MAX_RETRY_AFTER_S", "5".into()),
            ("TRAIN__MAX_STEPS", "4".into()),
            ("TRAIN__BATCH_SIZE", "2".into()),
            ("TRAIN__GRAD_ACCUM", "1".into()),
            ("TRAIN__MAX_LEN", "48".into()),
            ("TRAIN__EVAL_EVERY", "0".into()),
            ("TRAIN__CHECKPOINT_EVERY", "1".into()),
            ("TRAIN__LEARNING_RATE", "0.02".into()),
            ("TRAIN__WARMUP_STEPS", "0".into()),
            ("TRAIN__DROPOUT", "0".into()),
            ("TRAIN__USE_SYSTEM_PROMPT", "false".into()),
            ("WORKER__POLL_INTERVAL_MS", "50".into()),
            ("WORKER__STATUS_INTERVAL_MS", "100".into()),
            ("WORKER__COMPARE_MAX_NEW_TOKENS", "6".into()),
            ("WORKER__RETRAIN_RESCRAPE", "false".into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("FREESKI__{k}"), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (format!("FREESKI__{k}"), v.to_string())));
        env
    }

    async fn crawl(&self) {
        fixture_forum::crawl(&fixture_forum::settings(&self.forum), &self.db()).await;
    }

    async fn start(&self, settings: Arc<Settings>) -> Bot {
        common::bot::start(&self.fake, settings, self.lm.clone()).await
    }

    /// Poll the store until `pred` holds (a failure guard, not a timer).
    async fn wait_store<R>(&self, what: &str, mut pred: impl FnMut(&Store) -> Option<R>) -> R {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(r) = pred(&Store::open(&self.db()).unwrap()) {
                return r;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_job(&self, what: &str, mut pred: impl FnMut(&Job) -> bool) -> Job {
        self.wait_store(what, |s| s.recent_jobs(1).unwrap().pop().filter(|j| pred(j))).await
    }

    /// An admin slash command; returns the interaction token.
    fn admin(&self, name: &str) -> String {
        self.fake.slash(8, true, name, json!([]))
    }

    /// Ask by mention and wait for the stored answer.
    async fn ask(&self, user: u64, text: &str) -> AnswerId {
        let q: u64 = self.fake.say(user, &format!("<@{BOT_ID}> {text}"), true, None)["id"].as_str().unwrap().parse().unwrap();
        let fake = &self.fake;
        self.wait_store("an answer", |s| {
            fake.calls()
                .iter()
                .filter(|c| c.method == "POST" && c.status == 200 && c.body["message_reference"]["message_id"].as_str() == Some(&q.to_string()))
                .find_map(|c| s.answer_for_message(c.message_id?).unwrap())
        })
        .await
    }

    /// The job's final report: a message posted in reply to its status message.
    async fn report(&self, job: &Job) -> common::fake_discord::Call {
        let status = job.status_message_id.expect("the job has a status message").to_string();
        self.fake
            .wait_for("the final report", T, |f| f.calls().into_iter().find(|c| c.method == "POST" && c.body["message_reference"]["message_id"].as_str() == Some(status.as_str())))
            .await
    }

    /// Contents the status message was edited to, in order.
    fn status_edits(&self, job: &Job) -> Vec<String> {
        let id = job.status_message_id.unwrap();
        self.fake.calls().iter().filter(|c| c.method == "PATCH" && c.message_id == Some(id)).filter_map(|c| c.body["content"].as_str().map(str::to_string)).collect()
    }
}

fn evidence(old_loss: f64, new_loss: f64) -> promote::Evidence {
    promote::Evidence { old_loss, new_loss, margin: 0.0, old_preference: None, new_preference: None }
}

fn stored_adapter(s: &Store, a: AnswerId) -> Option<String> {
    s.answer(a).unwrap().unwrap().adapter_id
}

fn lines(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run_dataset(adapters: &Path, id: &str) -> PathBuf {
    let rec: Value = serde_json::from_str(&lines(&adapters.join(id).join(freeski_bot::worker::stages::RUN_FILE))).unwrap();
    PathBuf::from(rec["dataset_dir"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_runs_every_stage_reports_and_swaps_in_the_new_adapter() {
    let env = Env::new().await;
    let bot = env.start(env.settings(&[("WORKER__RETRAIN_RESCRAPE", "true")])).await;
    // Feedback gathered through reactions (and one admin correction) before the retrain.
    let down = env.ask(7, "what wax for spring?").await;
    let up = env.ask(7, "best park skis?").await;
    let corrected = env.ask(7, "how to learn switch?").await;
    let msg = |a: AnswerId| Store::open(&env.db()).unwrap().answer_messages(a).unwrap()[0];
    env.fake.react(20, msg(down), "👎", true, false);
    env.fake.react(21, msg(up), "👍", true, false);
    env.wait_store("the votes", |s| (s.vote_tally(down).unwrap() == (0, 1) && s.vote_tally(up).unwrap() == (1, 0)).then_some(())).await;
    Store::open(&env.db()).unwrap().add_correction(corrected, 8, "Ride switch on easy groomers first, then small jumps.").unwrap();

    env.admin("retrain");
    let job = env.wait_job("the retrain to finish", |j| !j.state.is_active() && j.status_message_id.is_some()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let id = format!("lora-job{}", job.id);
    let report = env.report(&job).await;

    // The status message showed progress (fast stages may fall between two edits), then the result.
    let edits = env.status_edits(&job);
    for stage in ["· scrape", "· train"] {
        assert!(edits.iter().any(|e| e.contains(stage)), "no {stage} edit in {edits:#?}");
    }
    // Edits are rate-limited, so the last step's may be superseded by the final message.
    assert!(edits.iter().any(|e| e.contains("· train ") && e.contains("/4") && e.contains("loss")), "{edits:#?}");
    assert!(edits.last().unwrap().starts_with('✅') && edits.last().unwrap().contains(&id), "{edits:#?}");

    // The report: loss chart attached, old vs new held-out loss, three questions side by side.
    assert_eq!(report.files.len(), 1, "one attachment");
    assert_eq!(report.files[0].0, "loss.png");
    assert!(report.files[0].1.starts_with(b"\x89PNG"), "a PNG");
    let text = report.body["content"].as_str().unwrap();
    assert!(text.contains("Held-out loss: base model (no adapter)") && text.contains(&format!("`{id}` is now active")), "{text}");
    let settings = env.settings(&[]);
    for q in &settings.worker.compare_questions {
        assert!(text.contains(q.as_str()), "{q} missing from {text}");
    }
    assert_eq!(text.matches("> old (base):").count(), 3, "{text}");
    assert_eq!(text.matches(&format!("> new ({id}):")).count(), 3, "{text}");

    // Active now, persisted, and used by the next answer.
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some(id.as_str()));
    assert_eq!(Store::open(&env.db()).unwrap().meta_get(freeski_bot::adapters::ACTIVE_KEY).unwrap().as_deref(), Some(id.as_str()));
    let after = env.ask(9, "and now?").await;
    assert_eq!(stored_adapter(&Store::open(&env.db()).unwrap(), after).as_deref(), Some(id.as_str()));

    // The dataset it trained on holds the feedback: 👎 rejected, 👍 and the correction trained on.
    let ds = run_dataset(&env.adapters(), &id);
    let store = Store::open(&env.db()).unwrap();
    let (rejected, train) = (lines(&ds.join("rejected.jsonl")), lines(&ds.join("train.jsonl")));
    let json_text = |s: &str| serde_json::to_string(s).unwrap();
    assert!(rejected.contains(&json_text(&store.answer(down).unwrap().unwrap().answer)), "👎 answer not rejected");
    assert!(train.contains(&json_text(&store.answer(up).unwrap().unwrap().answer)), "👍 answer not trained on");
    assert!(train.contains("Ride switch on easy groomers first"), "correction not trained on");
    bot.stop().await;
}

/// Votes and corrections in the store make `/retrain` run SFT then KTO: `/flagged` says what
/// will be learned, the dataset holds the labelled answers (held-out questions apart), the
/// adapter's metrics record the KTO phase, and the report gives the 👍/👎 used and the
/// preference accuracy before and after on the held-out feedback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_learns_from_votes_with_kto_and_reports_preference_accuracy() {
    let env = Env::new().await;
    env.crawl().await;
    {
        let store = Store::open(&env.db()).unwrap();
        let answer = |q: &str, a: &str| store.record_answer(&freeski_bot::store::NewAnswer { question: q.into(), answer: a.into(), ..Default::default() }).unwrap();
        for i in 0..10 {
            // A looping answer 👎'd and corrected by an admin: a good and a bad answer to one question.
            let a = answer(&format!("how do I learn trick number {i}?"), "just send it just send it just send it just send it");
            store.set_vote(a, 100 + i, freeski_bot::store::Vote::Down).unwrap();
            store.add_correction(a, 8, &format!("Start small: learn trick {i} on a small jump, then go bigger.")).unwrap();
        }
        for i in 0..3 {
            let a = answer(&format!("which wax for day {i}?"), "A universal wax, scraped thin.");
            store.set_vote(a, 200 + i, freeski_bot::store::Vote::Up).unwrap();
        }
    }
    let settings =
        env.settings(&[("TRAIN__KTO_MIN_EXAMPLES", "4"), ("TRAIN__KTO_MAX_STEPS", "2"), ("TRAIN__KTO_LEARNING_RATE", "0.01"), ("DATASET__FEEDBACK_TEST_FRACTION", "0.4")]);
    let bot = env.start(settings).await;

    let flagged = env.admin("flagged");
    let c = env.fake.wait_for("/flagged", T, |f| f.calls().into_iter().find(|c| c.path.contains(&flagged) && c.path.ends_with("/callback"))).await;
    let text = c.body["data"]["content"].as_str().unwrap();
    assert!(text.contains("learns from **23** labelled answers: **13** good") && text.contains("**10** bad"), "{text}");
    assert!(text.contains("learns the correction as good and this answer as bad: Start small: learn trick 9"), "{text}");

    env.admin("retrain");
    let job = env.wait_job("the retrain to finish", |j| !j.state.is_active() && j.status_message_id.is_some()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let id = format!("lora-job{}", job.id);
    let report = env.report(&job).await;
    let text = report.body["content"].as_str().unwrap();

    let ds = run_dataset(&env.adapters(), &id);
    let labelled = |f: &str| -> Vec<(String, bool)> {
        lines(&ds.join(f))
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| (v["messages"][0]["content"].as_str().unwrap().to_string(), v["label"].as_bool().unwrap()))
            .collect()
    };
    let (train_fb, test_fb) = (labelled("feedback.jsonl"), labelled("feedback_test.jsonl"));
    assert_eq!(train_fb.len() + test_fb.len(), 23);
    assert!(train_fb.iter().all(|(q, _)| !test_fb.iter().any(|(t, _)| t == q)), "a question on both sides");
    let good = train_fb.iter().filter(|(_, l)| *l).count();
    let paired = test_fb.iter().filter(|(q, _)| q.starts_with("how do I learn")).count() / 2;
    assert!(paired >= 1 && train_fb.len() >= 4, "{} held-out pairs, {} to learn from", paired, train_fb.len());

    let metrics: Value = serde_json::from_str(&lines(&env.adapters().join(&id).join("metrics.json"))).unwrap();
    assert_eq!(metrics["objective"], "sft+kto");
    let kto = &metrics["kto"];
    assert_eq!(
        (kto["desirable"].as_u64(), kto["undesirable"].as_u64(), kto["steps"].as_u64(), kto["from_step"].as_u64()),
        (Some(good as u64), Some((train_fb.len() - good) as u64), Some(2), Some(4))
    );
    assert!(metrics["train_loss"][4]["kl"].is_number(), "KTO steps record their KL baseline");

    assert!(text.contains(&format!("learned from {} labelled answers, {good} 👍 (or corrected) as good and {} 👎", train_fb.len(), train_fb.len() - good)), "{text}");
    assert!(text.contains(&format!("Preference accuracy on held-out feedback ({paired} questions with a 👍 and a 👎 answer): base model (no adapter) **")), "{text}");
    assert!(text.contains(&format!("→ `{id}` **")) && text.contains("nats/token"), "{text}");
    bot.stop().await;
}

/// The `Stop` of a long training: questions are answered while it runs, and `/cancel` ends it
/// at the next step with nothing activated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_are_answered_during_training_and_cancel_stops_within_a_step() {
    let env = Env::new().await;
    env.crawl().await;
    let bot = env.start(env.settings(&[("TRAIN__MAX_STEPS", "100000"), ("TRAIN__CHECKPOINT_EVERY", "0")])).await;
    env.admin("retrain");
    env.wait_job("training to start", |j| j.stage.as_deref() == Some("train") && j.progress_done >= Some(1)).await;

    let a = env.ask(7, "is it still answering?").await;
    let job = Store::open(&env.db()).unwrap().recent_jobs(1).unwrap().pop().unwrap();
    assert_eq!((job.state, job.stage.as_deref()), (JobState::Running, Some("train")), "answered while training runs");
    assert_eq!(stored_adapter(&Store::open(&env.db()).unwrap(), a), None, "with the old (no) adapter");
    let resumed_at = job.progress_done.unwrap();
    env.wait_job("training to go on after the answer", |j| j.progress_done > Some(resumed_at)).await;

    env.admin("cancel");
    let requested = env.wait_job("the cancel request", |j| j.cancel_requested).await;
    let done = env.wait_job("the cancelled job", |j| !j.state.is_active()).await;
    assert_eq!(done.state, JobState::Cancelled, "{done:?}");
    let id = format!("lora-job{}", done.id);
    let ck = freeski_bot::train::checkpoint::load(&env.adapters().join(&id), &Device::Cpu).unwrap().expect("checkpoint kept on cancel");
    assert!(ck.state.step <= requested.progress_done.unwrap() as usize + 1, "stopped at step {} after the request at step {:?}", ck.state.step, requested.progress_done);
    assert_eq!(bot.engine.active_adapter_id(), None, "nothing activated");
    assert!(!env.adapters().join(&id).join("adapter_config.json").exists(), "no adapter written");
    let edits = env.status_edits(&done);
    assert!(edits.last().unwrap().contains("cancelled") && edits.last().unwrap().contains("nothing activated"), "{edits:#?}");
    bot.stop().await;
}

/// Train an adapter outside the bot on the dataset the worker will build, and make it active.
async fn good_adapter(env: &Env, settings: &Settings) -> f64 {
    let mut store = Store::open(&env.db()).unwrap();
    let built = freeski_bot::dataset::build(&mut store, &settings.dataset, &settings.scrape.clean_options(), &Default::default()).unwrap();
    let mut ts = settings.train.clone();
    // The random tiny model learns nothing that carries over to unseen conversations, so the
    // adapter that must beat an honest run is trained on the held-out conversations themselves:
    // it has memorised the split the promotion gate measures.
    // (16 steps at 0.01 take it ~3 nats below the base; larger rates diverge on this model.)
    ts.max_steps = 16;
    ts.learning_rate = 0.01;
    let held_out = env.dir.path().join("held-out-as-training");
    std::fs::create_dir_all(&held_out).unwrap();
    for name in ["train.jsonl", "test.jsonl"] {
        std::fs::copy(built.written.path.join("test.jsonl"), held_out.join(name)).unwrap();
    }
    let data = data::load(&held_out, &env.lm, &ts, "").unwrap();
    let run = TrainRun { lm: &env.lm, reference: None, data: &data, settings: ts, run_dir: env.adapters().join("good"), id: "good".into(), base_model: "tiny".into() };
    let Outcome::Completed(m) = run.run(&NoHooks).unwrap() else { panic!("the good adapter did not finish") };
    store.meta_set(freeski_bot::adapters::ACTIVE_KEY, "good").unwrap();
    m.final_eval_loss.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_failure_fails_the_job_and_a_worse_adapter_is_not_promoted() {
    let env = Env::new().await;
    env.crawl().await;
    let good_loss = good_adapter(&env, &env.settings(&[])).await;

    // A training job that panics after step 2: failed with the reason, old adapter kept.
    let bot = env.start(env.settings(&[("WORKER__TEST_PANIC_AFTER_STEP", "2")])).await;
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some("good"), "restored at start");
    env.admin("retrain");
    let job = env.wait_job("the failing retrain", |j| !j.state.is_active()).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert!(job.error.as_deref().unwrap().contains("planted training failure after step 2"), "{job:?}");
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some("good"));
    let a = env.ask(7, "still there after the crash?").await;
    assert_eq!(stored_adapter(&Store::open(&env.db()).unwrap(), a).as_deref(), Some("good"), "answered with the old adapter");
    let edits = env.status_edits(&job);
    assert!(edits.last().unwrap().contains("failed") && edits.last().unwrap().contains("planted"), "{edits:#?}");
    bot.stop().await;

    // One tiny step: barely moved from the base, far worse than `good` on the same held-out set.
    let bot = env.start(env.settings(&[("TRAIN__MAX_STEPS", "1"), ("TRAIN__LEARNING_RATE", "0.000001")])).await;
    env.admin("retrain");
    let job = env.wait_job("the second retrain", |j| !j.state.is_active() && j.id > job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let id = format!("lora-job{}", job.id);
    let text = env.report(&job).await.body["content"].as_str().unwrap().to_string();
    assert!(text.contains("not activated") && text.contains("worse than the active model's"), "{text}");
    assert!(text.contains(&format!("`good` **{good_loss:.4}**")), "old loss measured on the same held-out split: {text}");
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some("good"));
    assert!(env.adapters().join(&id).join("adapter_model.safetensors").is_file(), "the refused adapter is kept");
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_training_interrupts_and_the_next_retrain_resumes() {
    let env = Env::new().await;
    env.crawl().await;
    // This test is about resuming, not the gate: a tiny random model may not improve in 8 steps.
    let s = env.settings(&[("TRAIN__MAX_STEPS", "8"), ("WORKER__PROMOTION_MARGIN", "100")]);
    let bot = env.start(s.clone()).await;
    env.admin("retrain");
    let first = env.wait_job("training under way", |j| j.stage.as_deref() == Some("train") && j.progress_done >= Some(2)).await;
    bot.stop().await;
    let first = Store::open(&env.db()).unwrap().job(first.id).unwrap().unwrap();
    assert_eq!(first.state, JobState::Interrupted, "{first:?}");
    let id = format!("lora-job{}", first.id);
    let ck = freeski_bot::train::checkpoint::load(&env.adapters().join(&id), &Device::Cpu).unwrap().expect("checkpoint");
    assert!(ck.state.step >= 2);

    let bot = env.start(s).await;
    env.admin("retrain");
    let second = env.wait_job("the resumed retrain", |j| j.id > first.id && !j.state.is_active()).await;
    assert_eq!(second.state, JobState::Succeeded, "{second:?}");
    let text = env.report(&second).await.body["content"].as_str().unwrap().to_string();
    assert!(text.contains(&format!("resuming the interrupted run `{id}`")) && text.contains(&format!("resumed from step {}", ck.state.step)), "{text}");
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some(id.as_str()), "{text}");
    let m = freeski_bot::train::report::Metrics::read(&env.adapters().join(&id)).unwrap();
    assert_eq!(m.steps, 8);
    bot.stop().await;
}

/// The real binary, killed with SIGKILL mid-training (no shutdown path runs): the job is left
/// `running` in the store, the next start marks it `interrupted`, and `/retrain` resumes it
/// from its last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bot_process_leaves_a_job_that_the_next_retrain_resumes() {
    let env = Env::new().await;
    env.crawl().await;
    // Enough steps that the kill lands mid-run even if the stored progress lags the trainer.
    const STEPS: usize = 40;
    let steps = STEPS.to_string();
    let extra = [("TRAIN__MAX_STEPS", steps.as_str()), ("WORKER__PROMOTION_MARGIN", "100")];
    let log = env.dir.path().join("child.log");
    let sessions = env.fake.identifies() + 1;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_freeski-bot"))
        .args(["run", "--model"])
        .arg(env.dir.path().join("model"))
        .envs(env.settings_env(&extra))
        .env("DISCORD_TOKEN", "test-token")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(env.dir.path().join("child.err")).unwrap())
        .spawn()
        .expect("starting freeski-bot run");
    env.fake.wait_connected(sessions).await;
    env.admin("retrain");
    let first = env.wait_job("training under way in the child", |j| j.stage.as_deref() == Some("train") && j.progress_done >= Some(2)).await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let left = Store::open(&env.db()).unwrap().job(first.id).unwrap().unwrap();
    assert_eq!(left.state, JobState::Running, "a killed process marks nothing: {left:?}");
    let id = format!("lora-job{}", first.id);
    let ck = freeski_bot::train::checkpoint::load(&env.adapters().join(&id), &Device::Cpu).unwrap().expect("a checkpoint survives the kill");
    // The stored progress may run one step ahead of the checkpoint on disk (the kill can land
    // between the two): at least one step's checkpoint, and not the end.
    assert!(ck.state.step >= 1 && ck.state.step < STEPS, "{:?}", ck.state.step);

    let s = env.settings(&extra);
    let bot = env.start(s).await;
    let marked = Store::open(&env.db()).unwrap().job(first.id).unwrap().unwrap();
    assert_eq!(marked.state, JobState::Interrupted, "{marked:?}");
    env.admin("retrain");
    let second = env.wait_job("the resumed retrain", |j| j.id > first.id && !j.state.is_active()).await;
    assert_eq!(second.state, JobState::Succeeded, "{second:?}");
    let text = env.report(&second).await.body["content"].as_str().unwrap().to_string();
    assert!(text.contains(&format!("resuming the interrupted run `{id}`")), "{text}");
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some(id.as_str()), "{text}");
    assert_eq!(freeski_bot::train::report::Metrics::read(&env.adapters().join(&id)).unwrap().steps, STEPS);
    bot.stop().await;
}

/// `worker.device`: a device that cannot be opened fails the job with the reason and the bot
/// keeps answering; a usable one trains on a second copy of the engine's model (loaded from the
/// engine's own source) and the result is hot-swapped into the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_device_trains_on_a_second_copy_and_a_bad_one_fails_the_job() {
    let env = Env::new().await;
    env.crawl().await;
    let bot = env.start(env.settings(&[("WORKER__DEVICE", "cuda:97")])).await;
    env.admin("retrain");
    let failed = env.wait_job("the job on a missing device", |j| !j.state.is_active()).await;
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    let reason = failed.error.clone().unwrap_or_default();
    assert!(reason.contains("worker.device"), "{reason}");
    assert_eq!(bot.engine.active_adapter_id(), None);
    let a = env.ask(5, "still there?").await;
    assert_eq!(stored_adapter(&Store::open(&env.db()).unwrap(), a), None);
    bot.stop().await;

    let bot = env.start(env.settings(&[("WORKER__DEVICE", "cpu"), ("WORKER__PROMOTION_MARGIN", "100")])).await;
    env.admin("retrain");
    let done = env.wait_job("the job on worker.device", |j| j.id > failed.id && !j.state.is_active()).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let id = format!("lora-job{}", done.id);
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some(id.as_str()));
    let a = env.ask(5, "and now?").await;
    assert_eq!(stored_adapter(&Store::open(&env.db()).unwrap(), a).as_deref(), Some(id.as_str()));
    bot.stop().await;
}

/// The worker's swap (`promote::gate`) while an answer is being generated: the answer keeps the
/// adapter it started with to the end; the next one gets the new adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_in_flight_at_the_swap_keeps_its_adapter() {
    let env = Env::new().await;
    env.crawl().await;
    let s = env.settings(&[]);
    let mut store = Store::open(&env.db()).unwrap();
    let built = freeski_bot::dataset::build(&mut store, &s.dataset, &s.scrape.clean_options(), &Default::default()).unwrap();
    let data = data::load(&built.written.path, &env.lm, &s.train, "").unwrap();
    let run = TrainRun { lm: &env.lm, reference: None, data: &data, settings: s.train.clone(), run_dir: env.adapters().join("new"), id: "new".into(), base_model: "tiny".into() };
    let Outcome::Completed(m) = run.run(&NoHooks).unwrap() else { panic!() };
    let engine = Engine::start(env.lm.clone(), None, s.engine_config()).unwrap();
    let opts = GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: 200, stop: vec![], seed: 1, max_context: 256 };
    let ask = || engine.submit(Question { history: vec![], question: "tell me a long story".into(), opts: opts.clone(), adapter: AdapterChoice::Active }).unwrap();
    let mut ticket = ask();
    match ticket.next().await {
        Some(Event::Started { adapter_id, .. }) => assert_eq!(adapter_id, None),
        other => panic!("{other:?}"),
    }
    assert!(matches!(ticket.next().await, Some(Event::Text(_))));
    let (decision, _) = promote::gate(&engine, &store, &env.adapters(), "new", &evidence(f64::INFINITY, m.final_eval_loss.unwrap())).unwrap();
    assert_eq!(decision, Decision::Promoted { previous: String::new() });
    assert_eq!(engine.active_adapter_id().as_deref(), Some("new"));
    let mut after_swap = 0;
    let finished = loop {
        match tokio::time::timeout(T, ticket.next()).await.unwrap() {
            Some(Event::Text(_)) => after_swap += 1,
            Some(Event::Finished(g)) => break g,
            other => panic!("{other:?}"),
        }
    };
    assert!(after_swap > 0, "the answer was still streaming when the adapter changed");
    assert!(finished.text.len() > 100, "it completed");
    let mut next = ask();
    match next.next().await {
        Some(Event::Started { adapter_id, .. }) => assert_eq!(adapter_id.as_deref(), Some("new")),
        other => panic!("{other:?}"),
    }
    drop(next);

    // A corrupt adapter file (truncated weights) never reaches the engine: the gate refuses it
    // with the reason, and the active adapter stays.
    let broken = env.adapters().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(env.adapters().join("new")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
        }
    }
    let weights = broken.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let Err(err) = promote::gate(&engine, &store, &env.adapters(), "broken", &evidence(f64::INFINITY, 0.0)) else { panic!("a corrupt adapter was accepted") };
    assert!(format!("{err:#}").contains("does not load"), "{err:#}");
    assert_eq!(engine.active_adapter_id().as_deref(), Some("new"));
    engine.shutdown();
}
