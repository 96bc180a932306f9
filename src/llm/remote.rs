//! The remote backend: questions answered by an OpenAI-compatible server (`freeski-bot serve`,
//! vLLM, SGLang, llama.cpp's `llama-server`) through `async-openai`, streamed back as the same
//! [`Event`]s a local engine [`Ticket`] carries, so the bot answers the same way on either
//! backend. Also vLLM's runtime adapter endpoints (`/v1/load_lora_adapter`,
//! `/v1/unload_lora_adapter`), which no OpenAI client covers, over plain `reqwest`.
//!
//! A failure (connection refused or dropped mid-stream, no data within `read_timeout`, an HTTP
//! error, a stream that ends without a finish reason) ends the ticket with `Failed` and a short
//! reason; nothing here retries, so a question is never answered twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage, ChatCompletionStreamOptions,
    CreateChatCompletionRequest, FinishReason, StopConfiguration,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::chat::{Message, Role};
use super::engine::{Canceller, Event, Question, Ticket};
use super::generate::{Finish, GenOptions, Generation};
use crate::util::secret::Secret;

/// Environment variable holding the server's API key (else `llm.api_key_file`).
pub const API_KEY_ENV: &str = "FREESKI_LLM_API_KEY";

/// How often a streaming answer checks whether it was cancelled while no data arrives.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// A client of one OpenAI-compatible server; cheap to clone.
#[derive(Clone)]
pub struct RemoteClient {
    client: async_openai::Client<OpenAIConfig>,
    http: reqwest::Client,
    base_url: String,
    key: Option<Secret>,
    base_model: String,
    read_timeout: Duration,
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for RemoteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteClient").field("base_url", &self.base_url).field("base_model", &self.base_model).finish_non_exhaustive()
    }
}

impl RemoteClient {
    /// A client of the API at `base_url` (e.g. `http://gpu-box:8000/v1`) whose bare base is
    /// served as `base_model`.
    pub fn new(base_url: &str, key: Option<Secret>, base_model: &str, connect_timeout: Duration, read_timeout: Duration) -> Result<Self> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder().connect_timeout(connect_timeout).read_timeout(read_timeout).build().context("building the HTTP client")?;
        // The client library wants a key; servers without auth ignore the header.
        let cfg = OpenAIConfig::new().with_api_base(&base_url).with_api_key(key.as_ref().map(|k| k.expose().to_string()).unwrap_or_else(|| "none".into()));
        let client = async_openai::Client::with_config(cfg).with_http_client(http.clone());
        Ok(Self { client, http, base_url, key, base_model: base_model.to_string(), read_timeout, stopping: Arc::new(AtomicBool::new(false)) })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The model name asked for: `adapter` when one is active, else the base.
    pub fn model_for(&self, adapter: Option<&str>) -> String {
        adapter.unwrap_or(&self.base_model).to_string()
    }

    /// Ask `q` (after `system`) of `model`, streaming. Must be called inside a tokio runtime.
    /// The answer arrives on the returned ticket: `Started`, `Text`s, then `Finished` or
    /// `Failed`; dropping the ticket (or [`RemoteClient::shutdown`]) ends the request with
    /// `Finished` and [`Finish::Cancelled`].
    pub fn submit(&self, system: &str, q: &Question, model: &str) -> Ticket {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Canceller::default();
        let request = chat_request(model, system, &q.history, &q.question, &q.opts);
        let this = self.clone();
        let (c, adapter_id) = (cancel.clone(), (model != self.base_model).then(|| model.to_string()));
        tokio::spawn(async move {
            let _ = tx.send(Event::Started { adapter_id, batch: 1, run: 0 });
            let end = match this.stream(request, &tx, &c).await {
                Ok(g) => Event::Finished(g),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), server = %this.base_url, "remote answer failed");
                    Event::Failed(format!("{e:#}"))
                }
            };
            let _ = tx.send(end);
        });
        Ticket::from_channel(rx, cancel, 0)
    }

    async fn stream(&self, request: CreateChatCompletionRequest, tx: &mpsc::UnboundedSender<Event>, cancel: &Canceller) -> Result<Generation> {
        let t0 = Instant::now();
        let mut text = String::new();
        let mut first: Option<Instant> = None;
        let mut finish: Option<Finish> = None;
        let mut prompt_tokens = 0;
        let cancelled = || cancel.is_cancelled() || self.stopping.load(Ordering::SeqCst);
        let chat = self.client.chat();
        let mut stream = tokio::select! {
            s = chat.create_stream(request) => s.context("the model server refused the request")?,
            _ = wait_until(&cancelled) => return Ok(generation(text, Finish::Cancelled, prompt_tokens, t0, first)),
        };
        loop {
            let item = tokio::select! {
                item = tokio::time::timeout(self.read_timeout, stream.next()) => item.map_err(|_| anyhow::anyhow!("the model server sent nothing for {:.0} s", self.read_timeout.as_secs_f64()))?,
                _ = wait_until(&cancelled) => return Ok(generation(text, Finish::Cancelled, prompt_tokens, t0, first)),
            };
            let Some(chunk) = item else { break };
            let chunk = chunk.context("the model server's stream broke")?;
            if let Some(u) = &chunk.usage {
                prompt_tokens = u.prompt_tokens as usize;
            }
            for choice in chunk.choices.iter().filter(|c| c.index == 0) {
                if let Some(piece) = choice.delta.content.as_deref().filter(|p| !p.is_empty()) {
                    first.get_or_insert_with(Instant::now);
                    text.push_str(piece);
                    if tx.send(Event::Text(piece.to_string())).is_err() {
                        return Ok(generation(text, Finish::Cancelled, prompt_tokens, t0, first));
                    }
                }
                if let Some(r) = &choice.finish_reason {
                    finish = Some(match r {
                        FinishReason::Length => Finish::Length,
                        _ => Finish::Eos,
                    });
                }
            }
        }
        let finish = finish.context("the model server ended the stream before the answer was finished")?;
        Ok(generation(text, finish, prompt_tokens, t0, first))
    }

    /// Model ids the server lists (`GET /v1/models`).
    pub async fn models(&self) -> Result<Vec<String>> {
        let list = self.client.models().list().await.with_context(|| format!("listing models at {}", self.base_url))?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    }

    /// Load the adapter in `server_path` (a folder the server reads) as `name` (vLLM's
    /// `POST /v1/load_lora_adapter`). An adapter of that name already loaded counts as loaded.
    pub async fn load_adapter(&self, name: &str, server_path: &str) -> Result<()> {
        let body = serde_json::json!({"lora_name": name, "lora_path": server_path});
        let (status, text) = self.post("load_lora_adapter", &body).await.with_context(|| format!("loading adapter {name} on {}", self.base_url))?;
        if status.is_success() || (status == reqwest::StatusCode::BAD_REQUEST && text.contains("already been loaded")) {
            tracing::info!(adapter = name, path = server_path, server = %self.base_url, "adapter loaded on the model server");
            return Ok(());
        }
        anyhow::bail!("the model server refused to load adapter {name} ({status}): {}", clip(&text))
    }

    /// Unload `name` (`POST /v1/unload_lora_adapter`); one not loaded counts as unloaded.
    pub async fn unload_adapter(&self, name: &str) -> Result<()> {
        let body = serde_json::json!({"lora_name": name});
        let (status, text) = self.post("unload_lora_adapter", &body).await.with_context(|| format!("unloading adapter {name} on {}", self.base_url))?;
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            tracing::info!(adapter = name, server = %self.base_url, "adapter unloaded from the model server");
            return Ok(());
        }
        anyhow::bail!("the model server refused to unload adapter {name} ({status}): {}", clip(&text))
    }

    async fn post(&self, endpoint: &str, body: &serde_json::Value) -> Result<(reqwest::StatusCode, String)> {
        let mut req = self.http.post(format!("{}/{endpoint}", self.base_url)).json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let resp = req.send().await.context("sending the request")?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        Ok((status, text))
    }

    /// End every answer in flight (each ends `Finished` with `Finish::Cancelled`) and refuse
    /// none: later submissions still work (the bot stops asking on its own).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Resolves once `cancelled()` holds (checked every [`CANCEL_POLL`]).
async fn wait_until(cancelled: &impl Fn() -> bool) {
    while !cancelled() {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

fn generation(text: String, finish: Finish, prompt_tokens: usize, t0: Instant, first: Option<Instant>) -> Generation {
    let first = first.unwrap_or_else(Instant::now);
    // Token ids stay on the server; only the text and counts come back.
    Generation { text, tokens: Vec::new(), finish, prompt_tokens, time_to_first_token: first - t0, decode_time: first.elapsed() }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

/// The request for `question` after `history` with `opts`: the OpenAI fields only (the
/// server's own defaults fill the rest, e.g. repetition penalty).
pub fn chat_request(model: &str, system: &str, history: &[Message], question: &str, opts: &GenOptions) -> CreateChatCompletionRequest {
    let mut messages = Vec::with_capacity(history.len() + 2);
    if !system.is_empty() {
        messages.push(ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage { content: system.into(), name: None }));
    }
    for m in history {
        messages.push(match m.role {
            Role::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage { content: m.content.clone().into(), name: None }),
            Role::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage { content: m.content.clone().into(), name: None }),
            Role::Assistant => ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage { content: Some(m.content.clone().into()), ..Default::default() }),
        });
    }
    messages.push(ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage { content: question.into(), name: None }));
    let s = &opts.sampling;
    CreateChatCompletionRequest {
        model: model.to_string(),
        messages,
        max_completion_tokens: Some(opts.max_new_tokens.min(u32::MAX as usize) as u32),
        // Older servers (llama.cpp) read only the deprecated name.
        #[allow(deprecated)]
        max_tokens: Some(opts.max_new_tokens.min(u32::MAX as usize) as u32),
        temperature: Some(s.temperature as f32),
        top_p: Some(s.top_p as f32),
        // Deprecated by OpenAI, honoured by vLLM, llama.cpp and `freeski-bot serve`.
        #[allow(deprecated)]
        seed: Some(opts.seed as i64),
        stop: (!opts.stop.is_empty()).then(|| StopConfiguration::StringArray(opts.stop.iter().take(4).cloned().collect())),
        stream: Some(true),
        stream_options: Some(ChatCompletionStreamOptions { include_usage: Some(true), ..Default::default() }),
        ..Default::default()
    }
}
