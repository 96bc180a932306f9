//! The OpenAI chat-completions wire format: requests parsed into the engine's terms, answers and
//! stream chunks written back, errors in OpenAI's `{"error": {...}}` shape. Plain functions over
//! serde types, so every mapping is tested without a server.

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::llm::chat::{Message, Role};
use crate::llm::generate::{Finish, GenOptions, Generation};

/// An API error: HTTP status plus OpenAI's error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, code: None, param: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or a list of parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request body. Fields OpenAI defines that change nothing here (`user`, `metadata`, ...)
/// are accepted and ignored; those whose effect cannot be honoured are refused (see
/// [`parse_request`]).
#[derive(Debug, Deserialize)]
struct WireRequest {
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u64>,
    /// vLLM's extra sampling parameters.
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    logprobs: Option<bool>,
    tools: Option<Value>,
    response_format: Option<Value>,
}

/// A parsed chat request in the engine's terms.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    /// System prompt from the conversation (`None`: the server's own).
    pub system: Option<String>,
    pub history: Vec<Message>,
    pub question: String,
    pub stream: bool,
    pub include_usage: bool,
    pub opts: GenOptions,
}

/// Most stop strings a request may add (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Parse `body` on top of the server's generation `defaults` (its `[generation]` settings: what
/// the request leaves out is answered as `freeski-bot ask` would).
pub fn parse_request(body: &[u8], defaults: &GenOptions) -> Result<ChatRequest, ApiError> {
    let w: WireRequest = serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not a valid chat completion request: {e}")))?;
    if w.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported").param("n"));
    }
    if w.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs are not supported").param("logprobs"));
    }
    if w.tools.as_ref().is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::invalid("tools are not supported").param("tools"));
    }
    if let Some(f) = &w.response_format {
        if f.get("type").and_then(Value::as_str).is_some_and(|t| t != "text") {
            return Err(ApiError::invalid("only the text response format is supported").param("response_format"));
        }
    }
    let mut opts = defaults.clone();
    if let Some(n) = w.max_completion_tokens.or(w.max_tokens) {
        if n == 0 {
            return Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens"));
        }
        opts.max_new_tokens = usize::try_from(n).unwrap_or(usize::MAX).min(opts.max_context);
    }
    if let Some(t) = w.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(format!("temperature must be between 0 and 2, got {t}")).param("temperature"));
        }
        opts.sampling.temperature = t;
    }
    if let Some(p) = w.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(format!("top_p must be in (0, 1], got {p}")).param("top_p"));
        }
        opts.sampling.top_p = p;
    }
    if let Some(k) = w.top_k {
        // vLLM: -1 (or 0) disables.
        opts.sampling.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(r) = w.repetition_penalty {
        if !(r > 0.0 && r.is_finite()) {
            return Err(ApiError::invalid(format!("repetition_penalty must be > 0, got {r}")).param("repetition_penalty"));
        }
        opts.sampling.repetition_penalty = r as f32;
    }
    if let Some(s) = w.seed {
        opts.seed = s as u64;
    }
    let stops = match w.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOP || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(format!("stop takes at most {MAX_STOP} non-empty strings")).param("stop"));
    }
    // The server's own stop strings stay: they end turns the template does not (e.g. a forged
    // "[INST]"); the request's come on top.
    for s in stops {
        if !opts.stop.contains(&s) {
            opts.stop.push(s);
        }
    }
    let (system, history, question) = conversation(w.messages)?;
    Ok(ChatRequest { model: w.model, system, history, question, stream: w.stream, include_usage: w.stream_options.is_some_and(|o| o.include_usage), opts })
}

/// Messages → (system prompt, earlier turns, the question): system (or developer) messages may
/// only lead; the last message must be the user's.
fn conversation(messages: Vec<WireMessage>) -> Result<(Option<String>, Vec<Message>, String), ApiError> {
    let mut system: Option<String> = None;
    let mut turns = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(s)) => t.push_str(s),
                        _ => return Err(ApiError::invalid(format!("messages[{i}]: only text content is supported")).param("messages")),
                    }
                }
                t
            }
        };
        match m.role.as_str() {
            "system" | "developer" if turns.is_empty() => system = Some(system.map_or(text.clone(), |s| format!("{s}\n\n{text}"))),
            "system" | "developer" => return Err(ApiError::invalid(format!("messages[{i}]: system messages must come before the conversation")).param("messages")),
            "user" => turns.push(Message::user(text)),
            "assistant" => turns.push(Message::assistant(text)),
            other => return Err(ApiError::invalid(format!("messages[{i}]: role {other:?} is not supported (system, user, assistant)")).param("messages")),
        }
    }
    match turns.pop() {
        Some(m) if m.role == Role::User => Ok((system, turns, m.content)),
        _ => Err(ApiError::invalid("the last message must be the user's").param("messages")),
    }
}

/// OpenAI's `finish_reason` for how generation ended (`None`: it did not end normally).
pub fn finish_reason(f: &Finish) -> Option<&'static str> {
    match f {
        Finish::Eos | Finish::Stop(_) => Some("stop"),
        Finish::Length | Finish::Context => Some("length"),
        Finish::Cancelled => None,
    }
}

fn usage(prompt_tokens: usize, g: &Generation) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": g.tokens.len(), "total_tokens": prompt_tokens + g.tokens.len()})
}

/// A whole `chat.completion`.
pub fn completion(id: &str, created: u64, model: &str, g: &Generation, reason: &str) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": reason, "logprobs": null}],
        "usage": usage(g.prompt_tokens, g),
    })
}

/// One `chat.completion.chunk` with `delta` and `finish_reason`.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, reason: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": null}],
    })
}

/// The last chunk when `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(id: &str, created: u64, model: &str, g: &Generation) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage(g.prompt_tokens, g)})
}

/// `GET /v1/models`: the base, then each adapter with the base as its parent (vLLM's shape).
pub fn model_list(base: &str, adapters: &[(String, u64)], created: u64) -> Value {
    let mut data = vec![json!({"id": base, "object": "model", "created": created, "owned_by": "freeski-bot", "root": base, "parent": null})];
    for (name, at) in adapters {
        data.push(json!({"id": name, "object": "model", "created": at, "owned_by": "freeski-bot", "root": name, "parent": base}));
    }
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::sampling::SamplingParams;

    fn defaults() -> GenOptions {
        GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: 200, stop: vec!["[INST]".into()], seed: 5, max_context: 4096 }
    }

    #[test]
    fn maps_options_and_conversation() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"a"},{"role":"assistant","content":"b"},
            {"role":"user","content":[{"type":"text","text":"c"},{"type":"text","text":"d"}]}],
            "max_tokens":7,"temperature":0.5,"top_p":0.9,"seed":42,"stop":"END","stream":true,"stream_options":{"include_usage":true},"user":"x"}"#;
        let r = parse_request(body, &defaults()).unwrap();
        assert_eq!((r.model.as_str(), r.system.as_deref(), r.question.as_str()), ("m", Some("be brief"), "cd"));
        assert_eq!(r.history, vec![Message::user("a"), Message::assistant("b")]);
        assert_eq!((r.opts.max_new_tokens, r.opts.sampling.temperature, r.opts.sampling.top_p, r.opts.seed), (7, 0.5, 0.9, 42));
        assert_eq!(r.opts.stop, vec!["[INST]".to_string(), "END".into()]);
        assert!(r.stream && r.include_usage);
        // Left out: the server's defaults.
        let r = parse_request(br#"{"model":"m","messages":[{"role":"user","content":"q"}]}"#, &defaults()).unwrap();
        assert_eq!(r.opts, defaults());
        assert!(!r.stream && r.system.is_none());
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (body, needle) in [
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"n":2}"#, "n = 1"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"top_p":0}"#, "top_p"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"model":"m","messages":[{"role":"assistant","content":"q"}]}"#, "last message"),
            (r#"{"model":"m","messages":[]}"#, "last message"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"},{"role":"system","content":"s"},{"role":"user","content":"q"}]}"#, "system messages"),
            (r#"{"model":"m","messages":[{"role":"tool","content":"q"}]}"#, "role"),
            (r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#, "only text"),
            (r#"{"model":"m","messages":[{"role":"user","content":"q"}],"tools":[{"type":"function"}]}"#, "tools"),
            (r#"{"messages":[]}"#, "model"),
            ("not json", "not a valid"),
        ] {
            let e = parse_request(body.as_bytes(), &defaults()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason(&Finish::Eos), Some("stop"));
        assert_eq!(finish_reason(&Finish::Stop("x".into())), Some("stop"));
        assert_eq!(finish_reason(&Finish::Length), Some("length"));
        assert_eq!(finish_reason(&Finish::Context), Some("length"));
        assert_eq!(finish_reason(&Finish::Cancelled), None);
    }
}
