//! `[model]` and `[generation]` settings: where the base model comes from, how it is loaded, and
//! how answers are sampled.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub source: String,
    pub revision: String,
    pub offline: bool,
    pub hub_cache_dir: String,
    pub quantize: QuantType,
    pub quantized_cache_dir: PathBuf,
    pub device: String,
    pub chat_template: TemplateChoice,
    pub max_context: usize,
}

impl ModelSettings {
    /// The `[model]` section of the committed defaults (`config/default.toml`, compiled in), for
    /// loading a model from a path without the rest of the settings (tests, tools).
    pub fn defaults() -> Result<Self> {
        use config::{Config, File, FileFormat};
        Config::builder()
            .add_source(File::from_str(include_str!("../../config/default.toml"), FileFormat::Toml))
            .build()
            .and_then(|c| c.get::<ModelSettings>("model"))
            .context("invalid [model] defaults in config/default.toml")
    }
}

/// 4-bit (or 8-bit) GGML types a safetensors model may be quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    Q4k,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    #[serde(rename = "q8_0")]
    Q8_0,
    /// No quantization: for reference checks and debugging, not for serving.
    F16,
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    Auto,
    Mistral,
    Chatml,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f32,
    pub repetition_window: usize,
    pub no_repeat_ngram: usize,
    pub stop: Vec<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    pub system_prompt: String,
}

impl GenerationSettings {
    /// Reject values that deserialize fine but make no sense, naming the key.
    pub fn validate(&self) -> Result<()> {
        let g = "generation";
        ensure!(self.temperature >= 0.0 && self.temperature.is_finite(), "{g}.temperature must be >= 0, got {}", self.temperature);
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "{g}.top_p must be in (0, 1], got {}", self.top_p);
        ensure!(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(), "{g}.repetition_penalty must be > 0, got {}", self.repetition_penalty);
        ensure!(self.max_new_tokens > 0, "{g}.max_new_tokens must be at least 1");
        ensure!(self.no_repeat_ngram != 1, "{g}.no_repeat_ngram = 1 would forbid every repeated token; use 0 to disable or >= 2");
        ensure!(self.stop.iter().all(|s| !s.is_empty()), "{g}.stop must not contain an empty string");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_defaults_parse() {
        let m = ModelSettings::defaults().unwrap();
        assert_eq!(m.quantize, QuantType::Q4k);
        assert_eq!(m.chat_template, TemplateChoice::Auto);
        assert!(m.source.contains("Mistral-7B-Instruct-v0.1"));
    }
}
