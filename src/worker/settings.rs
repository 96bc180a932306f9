//! `[worker]` settings (documented with their defaults in `config/default.toml`).

use anyhow::{ensure, Result};
use serde::Deserialize;

use crate::adapters::AdapterSettings;
use crate::dataset::DatasetSettings;
use crate::discord::DiscordSettings;
use crate::llm::settings::{GenerationSettings, ModelSettings};
use crate::scrape::ScrapeSettings;
use crate::store::StoreSettings;
use crate::train::TrainSettings;

/// Everything the worker's jobs read, assembled from the settings file by `config` (the worker
/// never imports `config`). `discord` is for the retry policy of its status messages.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model: ModelSettings,
    pub generation: GenerationSettings,
    pub adapter: AdapterSettings,
    pub scrape: ScrapeSettings,
    pub dataset: DatasetSettings,
    pub store: StoreSettings,
    pub train: TrainSettings,
    pub discord: DiscordSettings,
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Where training runs: "" shares the engine's model (one copy of the base), else a second
    /// copy is loaded there ("cuda:1").
    pub device: String,
    /// How often the worker looks for queued jobs.
    pub poll_interval_ms: u64,
    /// Shortest time between two edits of a job's status message.
    pub status_interval_ms: u64,
    /// A new adapter is activated only if its held-out loss is at most the active one's plus this.
    pub promotion_margin: f64,
    /// Finished adapters kept in `adapter.dir` (the active one and its predecessor always are).
    pub keep_adapters: usize,
    /// `/retrain` scrapes the forum for new threads before building its dataset.
    pub retrain_rescrape: bool,
    /// Asked of the old and the new adapter side by side in the final message.
    pub compare_questions: Vec<String>,
    /// Longest answer to each comparison question, in tokens.
    pub compare_max_new_tokens: usize,
    /// Test hook: panic inside the training job right after this optimizer step (0 = never).
    /// Exists so the failure-isolation tests can plant a crash; never set it in production.
    pub test_panic_after_step: usize,
}

impl WorkerSettings {
    pub fn validate(&self) -> Result<()> {
        let w = "worker";
        ensure!(self.poll_interval_ms >= 10, "{w}.poll_interval_ms must be at least 10");
        ensure!(self.status_interval_ms >= 50, "{w}.status_interval_ms must be at least 50 (Discord rate-limits edits)");
        ensure!(self.promotion_margin >= 0.0 && self.promotion_margin.is_finite(), "{w}.promotion_margin must be >= 0, got {}", self.promotion_margin);
        ensure!(self.keep_adapters >= 1, "{w}.keep_adapters must be at least 1");
        ensure!(self.compare_questions.iter().all(|q| !q.trim().is_empty()), "{w}.compare_questions must not contain empty questions");
        ensure!(self.compare_max_new_tokens >= 1, "{w}.compare_max_new_tokens must be at least 1");
        Ok(())
    }
}
