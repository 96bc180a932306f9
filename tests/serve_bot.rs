//! The bot with `llm.backend = "openai"`: the real `bot::run` against the fake Discord, answering
//! through `freeski-bot serve`'s server (`serve::serve` on loopback, on a script model) or
//! through a loopback server that misbehaves (drops the stream, stalls, answers 500).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::bot::start_with;
use common::fake_discord::{FakeDiscord, BOT_ID, GUILD_ID};
use common::script_model::{self, End};
use freeski_bot::config::Settings;
use freeski_bot::llm::backend::Backend;
use freeski_bot::llm::engine::{Engine, EngineConfig};
use freeski_bot::llm::load::LoadedModel;
use freeski_bot::llm::remote::RemoteClient;
use freeski_bot::serve::{self, ServeState};
use freeski_bot::store::{AnswerId, Store};
use freeski_bot::util::secret::Secret;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);
const KEY: &str = "serve-test-key";

fn settings(dir: &Path, fake: &FakeDiscord, base_url: &str, extra: &[(&str, &str)]) -> Arc<Settings> {
    let mut env: Vec<(String, String)> = [
        ("STORE__PATH", dir.join("store.sqlite").display().to_string()),
        ("ADAPTER__DIR", dir.join("adapters").display().to_string()),
        ("DISCORD__API_BASE", fake.rest_url.clone()),
        ("DISCORD__GUILD_IDS", GUILD_ID.to_string()),
        ("DISCORD__EDIT_INTERVAL_MS", "100".into()),
        ("GENERATION__TEMPERATURE", "0".into()),
        ("GENERATION__REPETITION_PENALTY", "1.0".into()),
        ("GENERATION__NO_REPEAT_NGRAM", "0".into()),
        ("GENERATION__MAX_NEW_TOKENS", "64".into()),
        ("MODEL__MAX_CONTEXT", "16384".into()),
        ("BOT__USER_BURST", "10".into()),
        ("LLM__BACKEND", "openai".into()),
        ("LLM__BASE_URL", base_url.to_string()),
        ("LLM__MODEL", "base".into()),
        ("LLM__READ_TIMEOUT_MS", "2000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("FREESKI__{k}"), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (format!("FREESKI__{k}"), v.to_string())));
    Arc::new(Settings::load_with_env(None, env).unwrap())
}

/// `freeski-bot serve`'s server on `lm` (its own engine), on a free loopback port.
struct Server {
    state: Arc<ServeState>,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve_on(lm: Arc<LoadedModel>, s: &Settings) -> Server {
    let engine = Engine::start(lm, None, EngineConfig { queue_capacity: 8, max_batch: 4, system_prompt: s.generation.system_prompt.clone() }).unwrap();
    let state = ServeState::new(engine, "base".into(), s.generation.clone(), s.model.max_context, s.serve.clone(), Some(Secret::new(KEY)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    Server { state, url, stop: Some(tx), task }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(T, self.task).await.expect("serve did not stop").unwrap().expect("serve failed");
    }
}

/// The bot answering through the server at `url`, beside a local engine on `lm` (tokens).
async fn bot_on(fake: &FakeDiscord, s: Arc<Settings>, lm: Arc<LoadedModel>, key: &str) -> common::bot::Bot {
    let engine = Engine::start(lm, None, s.engine_config()).unwrap();
    let client = RemoteClient::from_settings(&s.llm, Some(Secret::new(key))).unwrap();
    start_with(fake, s, Backend::remote(engine, client)).await
}

fn id_of(v: &Value) -> u64 {
    v["id"].as_str().unwrap().parse().unwrap()
}

fn replies_to(fake: &FakeDiscord, q: u64) -> Vec<u64> {
    fake.calls()
        .iter()
        .filter(|c| c.method == "POST" && c.status == 200 && c.body["message_reference"]["message_id"].as_str() == Some(&q.to_string()))
        .filter_map(|c| c.message_id)
        .collect()
}

async fn wait_store<R>(path: &Path, what: &str, mut pred: impl FnMut(&Store) -> Option<R>) -> R {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Some(r) = pred(&Store::open(path).unwrap()) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ask by mention; the stored answer once it is complete.
async fn ask(fake: &FakeDiscord, db: &Path, user: u64, text: &str) -> (u64, AnswerId) {
    let q = id_of(&fake.say(user, &format!("<@{BOT_ID}> {text}"), true, None));
    let a = wait_store(db, "the answer", |s| replies_to(fake, q).first().and_then(|&m| s.answer_for_message(m).unwrap())).await;
    (replies_to(fake, q)[0], a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_are_answered_through_serve_by_streaming_edits() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let script = script_model::words(&tok, 12, &[]);
    let text = script_model::text(&tok, &script);
    let lm = Arc::new(script_model::model(&script, End::Stop));
    let probe = settings(dir.path(), &fake, "http://127.0.0.1:1/v1", &[]);
    let server = serve_on(lm.clone(), &probe).await;
    let s = settings(dir.path(), &fake, &server.url, &[]);
    let bot = bot_on(&fake, s, lm.clone(), KEY).await;
    let db = dir.path().join("store.sqlite");

    let (reply, a) = ask(&fake, &db, 7, "how do I land a 360?").await;
    assert_eq!(fake.bot_message(reply)["content"].as_str().unwrap(), text.trim());
    let stored = Store::open(&db).unwrap().answer(a).unwrap().unwrap();
    assert_eq!(stored.answer.trim(), text.trim());
    assert_eq!((stored.generation["backend"].clone(), stored.generation["finish"].clone()), (json!("openai"), json!("Eos")));
    assert_eq!(server.state.metrics.completions.load(Ordering::SeqCst), 1, "the server answered");

    // /status names the model server to admins.
    let token = fake.slash(8, true, "status", json!([]));
    let done = fake
        .wait_for("the status reply", T, |f| {
            f.calls().into_iter().find(|c| (c.method == "POST" || c.method == "PATCH") && c.path.contains(&token) && c.body.to_string().contains("Queue"))
        })
        .await;
    let status = done.body.to_string();
    assert!(status.contains("being answered by the model server") && status.contains(&server.url), "{status}");
    bot.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_streams_in_edits_and_shutdown_cancels_it_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let lm = Arc::new(script_model::model(&script_model::words(&tok, 10, &[]), End::Cycle));
    let extra = [("GENERATION__MAX_NEW_TOKENS", "10000000")];
    let probe = settings(dir.path(), &fake, "http://127.0.0.1:1/v1", &extra);
    let server = serve_on(lm.clone(), &probe).await;
    let s = settings(dir.path(), &fake, &server.url, &extra);
    let bot = bot_on(&fake, s, lm.clone(), KEY).await;
    let db = dir.path().join("store.sqlite");
    let q = id_of(&fake.say(7, &format!("<@{BOT_ID}> tell me everything"), true, None));
    let reply = fake.wait_for("the answer to start", T, |f| replies_to(f, q).first().copied()).await;
    let edits = |f: &FakeDiscord| {
        f.calls().into_iter().filter(|c| c.method == "PATCH" && c.message_id == Some(reply)).map(|c| c.body["content"].as_str().unwrap_or_default().len()).collect::<Vec<_>>()
    };
    let grown = fake.wait_for("two streaming edits", T, |f| Some(edits(f)).filter(|e| e.len() >= 2)).await;
    assert!(grown[1] > grown[0], "the answer grows edit by edit: {grown:?}");
    assert_eq!(server.state.metrics.completions.load(Ordering::SeqCst), 0);
    bot.stop().await;
    let store = Store::open(&db).unwrap();
    let a = store.answer_for_message(reply).unwrap().expect("the cut-short answer is stored");
    assert_eq!(store.answer(a).unwrap().unwrap().generation["finish"], json!("Cancelled"));
    // The bot hung up: the server cancels the generation.
    let deadline = tokio::time::Instant::now() + T;
    while server.state.engine().running() + server.state.engine().queue_depth() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the server kept generating for a client that left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// A loopback "model server" whose n-th connection misbehaves as `plan[n]` says.
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// Headers and one chunk of a stream, then the connection closes.
    DropMidStream,
    /// Reads the request and never answers.
    Stall,
    /// 500 with an OpenAI error body.
    ServerError,
    /// A proper stream answering "All good."
    Fine,
}

async fn misbehaving_server(plan: Vec<Misbehave>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let n = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let i = n.fetch_add(1, Ordering::SeqCst);
            let how = plan.get(i).copied().unwrap_or(Misbehave::Fine);
            tokio::spawn(async move {
                // Read the request head and body (Content-Length).
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(k) = sock.read(&mut chunk).await else { return };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end].lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let chunk = |delta: Value, reason: Option<&str>| format!("data: {}\n\n", freeski_bot::serve::openai::chunk("c1", 1, "base", delta, reason));
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
                match how {
                    Misbehave::DropMidStream => {
                        let _ = sock.write_all(format!("{head}{}", chunk(json!({"role": "assistant", "content": "Half an ans"}), None)).as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Misbehave::Stall => tokio::time::sleep(Duration::from_secs(30)).await,
                    Misbehave::ServerError => {
                        let body = json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}).to_string();
                        let _ = sock
                            .write_all(
                                format!(
                                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                    }
                    Misbehave::Fine => {
                        let body = [
                            chunk(json!({"role": "assistant", "content": "All "}), None),
                            chunk(json!({"content": "good."}), None),
                            chunk(json!({}), Some("stop")),
                            "data: [DONE]\n\n".to_string(),
                        ]
                        .concat();
                        let _ = sock.write_all(format!("{head}{body}").as_bytes()).await;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_drops_stalls_or_fails_gets_a_short_error_and_the_bot_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let (lm, _) = {
        let tok = script_model::tokenizer();
        let script = script_model::words(&tok, 4, &[]);
        (Arc::new(script_model::model(&script, End::Stop)), ())
    };
    let (url, seen) = misbehaving_server(vec![Misbehave::DropMidStream, Misbehave::Stall, Misbehave::ServerError, Misbehave::Fine]).await;
    let s = settings(dir.path(), &fake, &url, &[("LLM__READ_TIMEOUT_MS", "500")]);
    let bot = bot_on(&fake, s, lm, KEY).await;
    let db = dir.path().join("store.sqlite");
    for (i, what) in ["dropped mid-stream", "stalled", "answered 500"].into_iter().enumerate() {
        let q = id_of(&fake.say(7, &format!("<@{BOT_ID}> question {i}"), true, None));
        let reply = fake.wait_for(what, T, |f| replies_to(f, q).first().copied()).await;
        let text = fake
            .wait_for(what, T, |f| {
                let c = f.bot_message(reply)["content"].as_str().unwrap_or_default().to_string();
                c.contains("Sorry, something went wrong").then_some(c)
            })
            .await;
        assert!(text.chars().count() < 200, "a short error ({what}): {text}");
        if i == 0 {
            assert!(text.starts_with("Half an ans"), "what came before the drop stays: {text}");
        }
        assert_eq!(seen.load(Ordering::SeqCst), i + 1, "one request per question, no retries");
    }
    // Still serving: the next question gets the server's answer.
    let (reply, a) = ask(&fake, &db, 7, "still there?").await;
    assert_eq!(fake.bot_message(reply)["content"].as_str().unwrap(), "All good.");
    assert_eq!(Store::open(&db).unwrap().answer(a).unwrap().unwrap().answer, "All good.");
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_an_unknown_model_is_a_short_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start().await;
    let tok = script_model::tokenizer();
    let lm = Arc::new(script_model::model(&script_model::words(&tok, 4, &[]), End::Stop));
    let probe = settings(dir.path(), &fake, "http://127.0.0.1:1/v1", &[]);
    let server = serve_on(lm.clone(), &probe).await;
    let s = settings(dir.path(), &fake, &server.url, &[]);
    let bot = bot_on(&fake, s, lm, "not-the-key").await;
    let q = id_of(&fake.say(7, &format!("<@{BOT_ID}> hello?"), true, None));
    let reply = fake.wait_for("the reply", T, |f| replies_to(f, q).first().copied()).await;
    fake.wait_for("the error", T, |f| f.bot_message(reply)["content"].as_str().unwrap_or_default().contains("Sorry, something went wrong").then_some(())).await;
    assert_eq!(server.state.metrics.unauthorized.load(Ordering::SeqCst), 1);
    bot.stop().await;
    server.stop().await;
}
