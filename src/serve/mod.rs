//! `freeski-bot serve`: an OpenAI-compatible HTTP API over the engine (axum on tokio), so a bot
//! (ours or anything speaking the OpenAI API) can live on another machine than the GPU.
//!
//! - `POST /v1/chat/completions` (streamed as server-sent events or whole): each request is one
//!   engine question, so requests share the engine's continuous batching; `model` names the
//!   adapter it is answered with (`AdapterChoice::Fixed`) or the base.
//! - `GET /v1/models`, and vLLM's `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter`.
//! - Bearer-token auth on `/v1/*` (the key from `FREESKI_API_KEY` or `serve.api_key_file`),
//!   body size limit (413), the engine's bounded queue (429 with `Retry-After`), `/health`,
//!   Prometheus `/metrics`. Errors in OpenAI's `{"error": {...}}` shape.
//! - Shutdown: no new connections, generations in flight cancelled (their streams end with an
//!   error event), at most `serve.shutdown_grace_ms` for the rest.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::llm::engine::{AdapterChoice, Engine, Event, Question, SubmitError, Ticket};
use crate::llm::generate::{max_context, GenOptions};
use crate::llm::lora::LoraAdapter;
use crate::llm::settings::GenerationSettings;
use crate::util::secret::Secret;

pub mod metrics;
pub mod openai;
pub mod settings;

use openai::ApiError;
pub use settings::ServeSettings;

fn unix_now() -> u64 {
    crate::util::clock::now_secs().max(0) as u64
}

/// Environment variable holding the API key (else `serve.api_key_file`).
pub const API_KEY_ENV: &str = "FREESKI_API_KEY";

/// An adapter loaded for serving.
struct Served {
    adapter: Arc<LoraAdapter>,
    path: PathBuf,
    loaded_at: u64,
}

/// Everything the handlers share.
pub struct ServeState {
    engine: Engine,
    base: String,
    generation: GenerationSettings,
    max_context: usize,
    adapters: RwLock<BTreeMap<String, Served>>,
    key: Option<Secret>,
    settings: ServeSettings,
    pub metrics: metrics::Metrics,
    next_id: AtomicU64,
    started: u64,
    stopping: AtomicBool,
}

impl ServeState {
    /// `base`: the name the bare base is served under; `generation` and `context_setting`
    /// (`model.max_context`) give every request's defaults, as for `ask`.
    pub fn new(engine: Engine, base: String, generation: GenerationSettings, context_setting: usize, settings: ServeSettings, key: Option<Secret>) -> Arc<Self> {
        let max_context = max_context(context_setting, engine.model().model.config());
        Arc::new(Self {
            engine,
            base,
            generation,
            max_context,
            adapters: RwLock::new(BTreeMap::new()),
            key,
            settings,
            metrics: metrics::Metrics::default(),
            next_id: AtomicU64::new(0),
            started: unix_now(),
            stopping: AtomicBool::new(false),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// Serve an adapter already loaded (the command line's `--adapter`, `--lora NAME=PATH`).
    pub fn add_adapter(&self, name: &str, adapter: Arc<LoraAdapter>, path: PathBuf) -> Result<()> {
        self.check_new_name(name).map_err(|e| anyhow::anyhow!(e.message))?;
        self.adapters_mut().insert(name.to_string(), Served { adapter, path, loaded_at: unix_now() });
        tracing::info!(adapter = name, "adapter served");
        Ok(())
    }

    /// Names of the adapters served, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    fn adapters_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Served>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_new_name(&self, name: &str) -> Result<(), ApiError> {
        crate::adapters::validate_id(name).map_err(|e| ApiError::invalid(format!("lora_name: {e}")).param("lora_name"))?;
        if name == self.base {
            return Err(ApiError::invalid(format!("lora_name `{name}` is the base model's name")).param("lora_name"));
        }
        if self.adapters.read().unwrap_or_else(|e| e.into_inner()).contains_key(name) {
            return Err(ApiError::invalid(format!("the LoRA adapter `{name}` has already been loaded")).param("lora_name"));
        }
        Ok(())
    }

    /// The adapter a request's `model` names (`None`: the base).
    fn resolve(&self, model: &str) -> Result<Option<Arc<LoraAdapter>>, ApiError> {
        if model == self.base {
            return Ok(None);
        }
        match self.adapters.read().unwrap_or_else(|e| e.into_inner()).get(model) {
            Some(s) => Ok(Some(s.adapter.clone())),
            None => Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist.")).param("model").code("model_not_found")),
        }
    }

    fn defaults(&self) -> GenOptions {
        GenOptions::from_settings(&self.generation, self.max_context, self.engine.model().model.config())
    }

    fn completion_id(&self) -> String {
        format!("chatcmpl-{:x}-{}", self.started, self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The routes, with auth on `/v1/*` and the body limit.
pub fn router(state: Arc<ServeState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint") })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .with_state(state)
}

/// Serve on `listener` until `shutdown` resolves; then stop taking connections, cancel the
/// generations in flight and give the rest `serve.shutdown_grace_ms`. The engine is stopped on
/// return. Refuses to listen beyond loopback without an API key.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ServeState>, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let addr = listener.local_addr().context("reading the listening address")?;
    anyhow::ensure!(
        state.key.is_some() || addr.ip().is_loopback(),
        "refusing to serve on {addr} without an API key: set {API_KEY_ENV} or serve.api_key_file (see README.md), or listen on 127.0.0.1"
    );
    if state.key.is_none() {
        tracing::warn!(%addr, "no API key set: anyone on this machine may use the API");
    }
    let stop = CancellationToken::new();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut task = tokio::spawn(server.into_future());
    let ended = tokio::select! {
        r = &mut task => Some(r),
        _ = shutdown => None,
    };
    tracing::info!("shutting down");
    state.stopping.store(true, Ordering::SeqCst);
    stop.cancel();
    // Cancels generations in flight (their responses end) and fails queued ones.
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || engine.shutdown()).await.context("stopping the engine")?;
    let result = match ended {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_millis(state.settings.shutdown_grace_ms), &mut task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open after the grace period; closing them");
                task.abort();
                return Ok(());
            }
        },
    };
    result.context("server task")?.context("HTTP server")
}

async fn auth(State(s): State<Arc<ServeState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.key {
        let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        if !presented.is_some_and(|p| key.matches(p)) {
            s.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect or missing API key (send it as `Authorization: Bearer KEY`).")
                .code("invalid_api_key")
                .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Arc<ServeState>>) -> Response {
    if s.stopping.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics_text(State(s): State<Arc<ServeState>>) -> Response {
    let text = s.metrics.render(s.engine.queue_depth(), s.engine.running(), s.adapter_names().len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(s): State<Arc<ServeState>>) -> Json<Value> {
    let adapters: Vec<(String, u64)> = s.adapters.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, a)| (n.clone(), a.loaded_at)).collect();
    Json(openai::model_list(&s.base, &adapters, s.started))
}

/// A body the size limit refused (413) or that could not be read.
fn body_error(e: BytesRejection) -> ApiError {
    ApiError::new(e.status(), "invalid_request_error", e.body_text())
}

/// Parse a small JSON body, answering OpenAI-style errors.
fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

async fn load_adapter(State(s): State<Arc<ServeState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let r: LoadRequest = json_body(body)?;
    s.check_new_name(&r.lora_name)?;
    let path = PathBuf::from(&r.lora_path);
    let lm = s.engine.model().clone();
    let p = path.clone();
    let loaded = tokio::task::spawn_blocking(move || LoraAdapter::load(&p, lm.model.config(), lm.model.device()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("loading the adapter crashed: {e}")))?;
    let adapter = loaded.map_err(|e| ApiError::invalid(format!("the LoRA adapter at `{}` does not load: {e:#}", r.lora_path)).param("lora_path"))?;
    {
        let mut map = s.adapters_mut();
        // Checked again under the lock: two loads of one name may race.
        if map.contains_key(&r.lora_name) {
            return Err(ApiError::invalid(format!("the LoRA adapter `{}` has already been loaded", r.lora_name)).param("lora_name"));
        }
        map.insert(r.lora_name.clone(), Served { adapter: Arc::new(adapter), path, loaded_at: unix_now() });
    }
    tracing::info!(adapter = %r.lora_name, path = %r.lora_path, "adapter loaded through the API");
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{}' added successfully.", r.lora_name)).into_response())
}

async fn unload_adapter(State(s): State<Arc<ServeState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let r: UnloadRequest = json_body(body)?;
    let removed = s.adapters_mut().remove(&r.lora_name);
    match removed {
        // Answers in flight keep their own reference to the weights.
        Some(a) => {
            tracing::info!(adapter = %r.lora_name, path = %a.path.display(), "adapter unloaded through the API");
            Ok((StatusCode::OK, format!("Success: LoRA adapter '{}' removed successfully.", r.lora_name)).into_response())
        }
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The LoRA adapter `{}` is not loaded.", r.lora_name))
            .param("lora_name")
            .code("model_not_found")),
    }
}

async fn chat_completions(State(s): State<Arc<ServeState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(body_error)?;
    let req = openai::parse_request(&body, &s.defaults())?;
    let adapter = s.resolve(&req.model)?;
    let q = Question { history: req.history, question: req.question, opts: req.opts, adapter: AdapterChoice::Fixed(adapter) };
    let ticket = match s.engine.submit_with_system(q, req.system.as_deref()) {
        Ok(t) => t,
        Err(SubmitError::QueueFull { waiting }) => {
            s.metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
            let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", format!("the server is busy ({waiting} requests waiting); retry later")).into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s.settings.retry_after_s));
            return Ok(r);
        }
        Err(SubmitError::ShuttingDown) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")),
        Err(SubmitError::Prompt(e)) => return Err(ApiError::invalid(format!("{e:#}")).param("messages").code("context_length_exceeded")),
    };
    let (id, created) = (s.completion_id(), unix_now());
    if req.stream {
        Ok(stream(s, ticket, id, created, req.model, req.include_usage, arrived))
    } else {
        whole(&s, ticket, &id, created, &req.model, arrived).await
    }
}

/// Why an accepted request ended without an answer, for its client.
fn cut_short(s: &ServeState, why: &str) -> ApiError {
    s.metrics.failed.fetch_add(1, Ordering::Relaxed);
    if s.stopping.load(Ordering::SeqCst) {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
    } else {
        tracing::error!(error = why, "completion failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("generation failed: {why}"))
    }
}

async fn whole(s: &ServeState, mut ticket: Ticket, id: &str, created: u64, model: &str, arrived: Instant) -> Result<Response, ApiError> {
    let mut first = true;
    loop {
        match ticket.next().await {
            Some(Event::Started { .. }) => {}
            Some(Event::Text(_)) => {
                if std::mem::take(&mut first) {
                    s.metrics.first_token(arrived.elapsed());
                }
            }
            Some(Event::Finished(g)) => {
                let Some(reason) = openai::finish_reason(&g.finish) else { return Err(cut_short(s, "cancelled")) };
                if first {
                    s.metrics.first_token(arrived.elapsed());
                }
                s.metrics.finished(g.prompt_tokens, g.tokens.len());
                return Ok(Json(openai::completion(id, created, model, &g, reason)).into_response());
            }
            Some(Event::Failed(e)) => return Err(cut_short(s, &e)),
            None => return Err(cut_short(s, "the engine stopped")),
        }
    }
}

/// Server-sent events: a role chunk, a chunk per piece of text, the finish chunk, the usage
/// chunk when asked, `[DONE]`. A failure ends the stream with an `{"error": ...}` event (what
/// OpenAI's clients raise as an API error). A client that goes away drops the ticket, which
/// cancels its generation.
fn stream(s: Arc<ServeState>, mut ticket: Ticket, id: String, created: u64, model: String, include_usage: bool, arrived: Instant) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let send = |v: Value| tx.send(SseEvent::default().data(v.to_string()));
        if send(openai::chunk(&id, created, &model, json!({"role": "assistant", "content": ""}), None)).await.is_err() {
            return;
        }
        let mut first = true;
        loop {
            // A client that leaves while its request waits or prefills is noticed at once.
            let event = tokio::select! {
                ev = ticket.next() => ev,
                _ = tx.closed() => return,
            };
            match event {
                Some(Event::Started { .. }) => {}
                Some(Event::Text(piece)) => {
                    if std::mem::take(&mut first) {
                        s.metrics.first_token(arrived.elapsed());
                    }
                    if send(openai::chunk(&id, created, &model, json!({"content": piece}), None)).await.is_err() {
                        return; // the client left; dropping the ticket cancels the generation
                    }
                }
                Some(Event::Finished(g)) => {
                    let Some(reason) = openai::finish_reason(&g.finish) else {
                        let _ = send(cut_short(&s, "cancelled").body()).await;
                        return;
                    };
                    if first {
                        s.metrics.first_token(arrived.elapsed());
                    }
                    s.metrics.finished(g.prompt_tokens, g.tokens.len());
                    let _ = send(openai::chunk(&id, created, &model, json!({}), Some(reason))).await;
                    if include_usage {
                        let _ = send(openai::usage_chunk(&id, created, &model, &g)).await;
                    }
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(Event::Failed(e)) => {
                    let _ = send(cut_short(&s, &e).body()).await;
                    return;
                }
                None => {
                    let _ = send(cut_short(&s, "the engine stopped").body()).await;
                    return;
                }
            }
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(events).into_response()
}
