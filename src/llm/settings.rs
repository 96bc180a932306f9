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

/// Where answers are generated (`[llm]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// This process's engine, on `model.device`.
    Local,
    /// An OpenAI-compatible server (`freeski-bot serve`, vLLM, SGLang, llama.cpp's server).
    Openai,
}

/// `[llm]`: the answering backend and, for a remote one, how to reach it and how adapters get
/// there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    pub backend: BackendKind,
    /// The server's API root, e.g. `http://gpu-box:8000/v1`.
    pub base_url: String,
    /// File holding the server's API key, used when `FREESKI_LLM_API_KEY` is unset ("" = none).
    pub api_key_file: String,
    /// The name the server serves the bare base under (asked for when no adapter is active).
    pub model: String,
    pub connect_timeout_ms: u64,
    /// Longest wait for the response or its next piece.
    pub read_timeout_ms: u64,
    /// Folder promoted adapters are copied into, one sub-folder per id ("" = the server reads
    /// `adapter.dir` itself).
    pub publish_dir: String,
    /// The same folder as the server sees it ("" = the same path).
    pub server_publish_dir: String,
}

impl LlmSettings {
    pub fn validate(&self) -> Result<()> {
        if self.backend == BackendKind::Openai {
            let u = url::Url::parse(&self.base_url).with_context(|| format!("llm.base_url {:?} is not a URL", self.base_url))?;
            ensure!(matches!(u.scheme(), "http" | "https"), "llm.base_url must be http(s), got {:?}", self.base_url);
            ensure!(!self.model.is_empty(), "llm.model must name the server's base model when llm.backend = \"openai\"");
        }
        ensure!(self.read_timeout_ms > 0 && self.connect_timeout_ms > 0, "llm.connect_timeout_ms and llm.read_timeout_ms must be > 0");
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
