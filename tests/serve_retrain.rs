//! `/retrain` with the remote backend: the bot trains on its local copy of the model, and the
//! promotion publishes the adapter and loads it on `freeski-bot serve`'s server (on loopback),
//! which then answers the bot's questions with it; `/adapter rollback` unloads it there. The
//! real bot, worker, scraper, dataset builder and trainer against the fake Discord and the fixture
//! forum, on the tiny random Llama.

mod common;
#[path = "fixture_forum/mod.rs"]
mod fixture_forum;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use common::fake_discord::{FakeDiscord, BOT_ID, GUILD_ID};
use freeski_bot::config::Settings;
use freeski_bot::llm::backend::Backend;
use freeski_bot::llm::engine::{Engine, EngineConfig};
use freeski_bot::llm::load::load_path;
use freeski_bot::llm::remote::RemoteClient;
use freeski_bot::serve::{self, ServeState};
use freeski_bot::store::{JobState, Store};
use freeski_bot::util::secret::Secret;
use serde_json::json;

const T: Duration = Duration::from_secs(180);

async fn wait_store<R>(db: &Path, what: &str, mut pred: impl FnMut(&Store) -> Option<R>) -> R {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Some(r) = pred(&Store::open(db).unwrap()) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids `GET /v1/models` lists, through the same client the bot uses.
async fn served_models(client: &RemoteClient) -> Vec<String> {
    client.models().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_pushes_the_new_adapter_to_the_server_and_rollback_unloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::tiny::TinyWeights::random(common::tiny::TinySpec::standard(), 11).write_hf_folder(&d.join("model"));
    let lm = Arc::new(load_path(&d.join("model"), &Device::Cpu).unwrap());
    let fake = FakeDiscord::start().await;
    let forum = fixture_forum::Forum::start().await;
    let db = d.join("store.sqlite");
    fixture_forum::crawl(&fixture_forum::settings(&forum), &db).await;

    // The model server: its own engine on the same weights.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let env = |extra: &[(&str, String)]| {
        let mut env: Vec<(String, String)> = [
            ("STORE__PATH", db.display().to_string()),
            ("ADAPTER__DIR", d.join("adapters").display().to_string()),
            ("DATASET__DIR", d.join("datasets").display().to_string()),
            ("DATASET__TEST_FRACTION", "0.3".into()),
            ("DISCORD__API_BASE", fake.rest_url.clone()),
            ("DISCORD__GUILD_IDS", GUILD_ID.to_string()),
            ("DISCORD__EDIT_INTERVAL_MS", "100".into()),
            ("GENERATION__TEMPERATURE", "0".into()),
            ("GENERATION__MAX_NEW_TOKENS", "8".into()),
            ("GENERATION__SYSTEM_PROMPT", "".into()),
            ("BOT__USER_BURST", "10".into()),
            ("TRAIN__MAX_STEPS", "2".into()),
            ("TRAIN__BATCH_SIZE", "2".into()),
            ("TRAIN__GRAD_ACCUM", "1".into()),
            ("TRAIN__MAX_LEN", "48".into()),
            ("TRAIN__EVAL_EVERY", "0".into()),
            ("TRAIN__CHECKPOINT_EVERY", "0".into()),
            ("TRAIN__USE_SYSTEM_PROMPT", "false".into()),
            ("WORKER__POLL_INTERVAL_MS", "50".into()),
            ("WORKER__STATUS_INTERVAL_MS", "100".into()),
            ("WORKER__COMPARE_MAX_NEW_TOKENS", "4".into()),
            ("WORKER__RETRAIN_RESCRAPE", "false".into()),
            // This test is about where the adapter goes, not whether it beats the base.
            ("WORKER__PROMOTION_MARGIN", "1000".into()),
            ("LLM__BACKEND", "openai".into()),
            ("LLM__BASE_URL", url.clone()),
            ("LLM__MODEL", "base".into()),
            ("LLM__PUBLISH_DIR", d.join("published").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("FREESKI__{k}"), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (format!("FREESKI__{k}"), v.clone())));
        Arc::new(Settings::load_with_env(None, env).unwrap())
    };
    let s = env(&[]);
    let server_engine = Engine::start(lm.clone(), None, EngineConfig { queue_capacity: 8, max_batch: 4, system_prompt: String::new() }).unwrap();
    let state = ServeState::new(server_engine, "base".into(), s.generation.clone(), s.model.max_context, s.serve.clone(), Some(Secret::new("k")));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));

    let client = RemoteClient::from_settings(&s.llm, Some(Secret::new("k"))).unwrap();
    let engine = Engine::start(lm.clone(), None, s.engine_config()).unwrap();
    let bot = common::bot::start_with(&fake, s.clone(), Backend::remote(engine, client.clone())).await;
    assert_eq!(served_models(&client).await, vec!["base".to_string()]);

    fake.slash(8, true, "retrain", json!([]));
    let job = wait_store(&db, "the retrain", |s| s.recent_jobs(1).unwrap().pop().filter(|j| !j.state.is_active() && j.status_message_id.is_some())).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let id = format!("lora-job{}", job.id);
    assert_eq!(bot.engine.active_adapter_id().as_deref(), Some(id.as_str()));
    // Published, loaded and listed by the server.
    assert!(d.join("published").join(&id).join("adapter_config.json").is_file(), "the adapter folder is published");
    assert_eq!(served_models(&client).await, vec!["base".to_string(), id.clone()]);

    // The next question is answered by the server, with the new adapter.
    let before = state.metrics.completions.load(Ordering::SeqCst);
    let q: u64 = fake.say(7, &format!("<@{BOT_ID}> and now?"), true, None)["id"].as_str().unwrap().parse().unwrap();
    let a = wait_store(&db, "the answer", |s| {
        fake.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.status == 200 && c.body["message_reference"]["message_id"].as_str() == Some(&q.to_string()))
            .find_map(|c| s.answer_for_message(c.message_id?).unwrap())
    })
    .await;
    let stored = Store::open(&db).unwrap().answer(a).unwrap().unwrap();
    assert_eq!((stored.adapter_id.as_deref(), stored.generation["backend"].as_str()), (Some(id.as_str()), Some("openai")));
    assert_eq!(state.metrics.completions.load(Ordering::SeqCst), before + 1, "answered by the server");

    // Rollback: back to the base, and the server unloads the adapter.
    let token = fake.slash(8, true, "adapter", json!([{"name": "rollback", "type": 1, "options": []}]));
    fake.wait_for("the rollback reply", T, |f| f.calls().into_iter().find(|c| c.method == "PATCH" && c.path.contains(&token) && c.body.to_string().contains("base model"))).await;
    assert_eq!(bot.engine.active_adapter_id(), None);
    assert_eq!(served_models(&client).await, vec!["base".to_string()]);
    bot.stop().await;
    let _ = stop_tx.send(());
    tokio::time::timeout(T, server).await.unwrap().unwrap().unwrap();
}
