//! `[bot]` settings (documented with their defaults in `config/default.toml`).

use anyhow::{ensure, Result};
use serde::Deserialize;

use crate::adapters::AdapterSettings;
use crate::discord::DiscordSettings;
use crate::llm::settings::{GenerationSettings, LlmSettings, ModelSettings};
use crate::store::StoreSettings;
use crate::worker::WorkerConfig;

/// Everything the bot reads, assembled from the settings file by `config` (the bot never imports
/// `config`), with the part the worker it starts needs.
#[derive(Debug, Clone)]
pub struct BotConfig {
    pub discord: DiscordSettings,
    pub bot: BotSettings,
    pub model: ModelSettings,
    pub generation: GenerationSettings,
    pub adapter: AdapterSettings,
    pub store: StoreSettings,
    pub llm: LlmSettings,
    pub worker: WorkerConfig,
}

/// How the bot answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotSettings {
    /// Questions allowed to wait for the engine; more get a "too busy" reply.
    pub queue_capacity: usize,
    /// Questions answered together in one batch.
    pub max_batch: usize,
    /// Per-user limit: questions per minute, and how many may come back to back.
    pub user_questions_per_minute: u32,
    pub user_burst: u32,
    pub vote_up_emoji: String,
    pub vote_down_emoji: String,
    /// Tokens of reply-chain history given to the model, newest turns first.
    pub context_tokens: usize,
    /// Longest question in tokens (counted with the model's tokenizer); longer ones are refused
    /// with a reply saying so, before they reach the engine.
    pub max_question_tokens: usize,
    /// Answers listed by `/flagged`.
    pub flagged_limit: usize,
    /// On SIGINT/SIGTERM, how long answers in flight may take to close their messages.
    pub shutdown_grace_ms: u64,
}

impl BotSettings {
    pub fn validate(&self) -> Result<()> {
        let b = "bot";
        ensure!(self.queue_capacity >= 1, "{b}.queue_capacity must be at least 1");
        ensure!(self.max_batch >= 1, "{b}.max_batch must be at least 1");
        ensure!(self.user_questions_per_minute >= 1, "{b}.user_questions_per_minute must be at least 1");
        ensure!(self.user_burst >= 1, "{b}.user_burst must be at least 1");
        ensure!(!self.vote_up_emoji.is_empty() && !self.vote_down_emoji.is_empty(), "{b}.vote_up_emoji and {b}.vote_down_emoji must not be empty");
        ensure!(self.vote_up_emoji != self.vote_down_emoji, "{b}.vote_up_emoji and {b}.vote_down_emoji must differ");
        ensure!(self.flagged_limit >= 1, "{b}.flagged_limit must be at least 1");
        ensure!(self.max_question_tokens >= 1, "{b}.max_question_tokens must be at least 1");
        Ok(())
    }
}
