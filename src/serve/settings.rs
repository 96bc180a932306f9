//! `[serve]`: the OpenAI-compatible HTTP server (`freeski-bot serve`).

use anyhow::{ensure, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// Address and port to listen on.
    pub listen: String,
    /// Name the bare base model is served under ("" = the model's own name).
    pub model_name: String,
    /// File holding the API key, used when `FREESKI_API_KEY` is unset ("" = none).
    pub api_key_file: String,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Requests allowed to wait for the engine; more get 429.
    pub queue_capacity: usize,
    /// Requests answered together in one batch.
    pub max_batch: usize,
    /// `Retry-After` seconds sent with a 429.
    pub retry_after_s: u64,
    /// How long answers in flight may take to end on shutdown.
    pub shutdown_grace_ms: u64,
}

impl ServeSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.listen.parse::<std::net::SocketAddr>().is_ok(), "serve.listen must be an address and port like 127.0.0.1:8000, got {:?}", self.listen);
        ensure!(self.max_body_bytes >= 1024, "serve.max_body_bytes must be at least 1024");
        ensure!(self.queue_capacity >= 1, "serve.queue_capacity must be at least 1");
        ensure!(self.max_batch >= 1, "serve.max_batch must be at least 1");
        Ok(())
    }
}
