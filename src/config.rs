//! Typed settings: `config/default.toml` (compiled in) < local file < `FREESKI__SECTION__KEY` env.
//!
//! Every struct denies unknown fields, so a typo in a local file or an environment variable is an
//! error naming the key instead of a silently ignored setting.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

pub use crate::adapters::AdapterSettings;
pub use crate::llm::settings::{BackendKind, GenerationSettings, LlmSettings, ModelSettings, QuantType, TemplateChoice};

/// The committed defaults, compiled into the binary so it runs from any working directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Local override read when no `--config` is given and the file exists.
pub const LOCAL_FILE: &str = "config/local.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub model: ModelSettings,
    pub adapter: AdapterSettings,
    pub generation: GenerationSettings,
    pub llm: LlmSettings,
    pub scrape: crate::scrape::ScrapeSettings,
    pub dataset: crate::dataset::DatasetSettings,
    pub store: crate::store::StoreSettings,
    pub train: crate::train::TrainSettings,
    pub discord: crate::discord::DiscordSettings,
    pub bot: crate::bot::BotSettings,
    pub worker: crate::worker::WorkerSettings,
    pub serve: crate::serve::ServeSettings,
}

impl Settings {
    /// Load defaults, then `file` (or `config/local.toml` if present), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Same as [`Settings::load`] with an explicit environment, so tests need not mutate the
    /// process environment.
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        match file {
            Some(path) => {
                anyhow::ensure!(path.is_file(), "config file {} does not exist", path.display());
                builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
            }
            None if Path::new(LOCAL_FILE).is_file() => {
                builder = builder.add_source(File::new(LOCAL_FILE, FileFormat::Toml).required(true));
            }
            None => {}
        }
        let env: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("FREESKI__")).collect();
        builder = builder.add_source(
            Environment::with_prefix("FREESKI")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("generation.stop")
                .with_list_parse_key("dataset.blocked_words")
                .with_list_parse_key("discord.guild_ids")
                .with_list_parse_key("discord.admin_role_ids")
                .with_list_parse_key("discord.admin_user_ids")
                .with_list_parse_key("discord.answer_channel_ids")
                .try_parsing(true)
                .source(Some(env)),
        );
        let origin = file.map(|p| p.display().to_string()).unwrap_or_else(|| "defaults/local.toml/environment".into());
        let settings: Settings = builder.build().and_then(|c| c.try_deserialize()).with_context(|| format!("invalid settings ({origin})"))?;
        settings.generation.validate()?;
        settings.llm.validate()?;
        settings.scrape.validate()?;
        settings.dataset.validate()?;
        settings.store.validate()?;
        settings.train.validate()?;
        settings.discord.validate()?;
        settings.bot.validate()?;
        settings.worker.validate()?;
        settings.serve.validate()?;
        Ok(settings)
    }
}

impl Settings {
    /// The answering engine's settings, from `[bot]` and `[generation]`.
    pub fn engine_config(&self) -> crate::llm::engine::EngineConfig {
        crate::llm::engine::EngineConfig { queue_capacity: self.bot.queue_capacity, max_batch: self.bot.max_batch, system_prompt: self.generation.system_prompt.clone() }
    }

    /// What the worker's jobs read.
    pub fn worker_config(&self) -> crate::worker::WorkerConfig {
        crate::worker::WorkerConfig {
            model: self.model.clone(),
            generation: self.generation.clone(),
            adapter: self.adapter.clone(),
            scrape: self.scrape.clone(),
            dataset: self.dataset.clone(),
            store: self.store.clone(),
            train: self.train.clone(),
            discord: self.discord.clone(),
            worker: self.worker.clone(),
        }
    }

    /// What the bot reads, with the worker's part for the worker it starts.
    pub fn bot_config(&self) -> crate::bot::BotConfig {
        crate::bot::BotConfig {
            discord: self.discord.clone(),
            bot: self.bot.clone(),
            model: self.model.clone(),
            generation: self.generation.clone(),
            adapter: self.adapter.clone(),
            store: self.store.clone(),
            llm: self.llm.clone(),
            worker: self.worker_config(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!(s.generation.max_new_tokens, 200);
        assert_eq!(s.generation.repetition_penalty, 1.15);
        assert_eq!(s.model.quantize, QuantType::Q4k);
        assert!(s.model.source.contains("Mistral-7B-Instruct-v0.1"));
    }

    #[test]
    fn env_overrides_and_parses() {
        let s =
            Settings::load_with_env(None, env(&[("FREESKI__GENERATION__TEMPERATURE", "0"), ("FREESKI__MODEL__DEVICE", "cuda:1"), ("FREESKI__GENERATION__STOP", "a,b")])).unwrap();
        assert_eq!(s.generation.temperature, 0.0);
        assert_eq!(s.model.device, "cuda:1");
        assert_eq!(s.generation.stop, vec!["a", "b"]);
        let s =
            Settings::load_with_env(None, env(&[("FREESKI__DISCORD__GUILD_IDS", "1,22"), ("FREESKI__DISCORD__ADMIN_USER_IDS", "5"), ("FREESKI__BOT__USER_BURST", "2")])).unwrap();
        assert_eq!((s.discord.guild_ids, s.discord.admin_user_ids, s.bot.user_burst), (vec![1, 22], vec![5], 2));
        let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__BOT__VOTE_DOWN_EMOJI", "👍")])).unwrap_err());
        assert!(err.contains("bot.vote_up_emoji"), "{err}");
    }

    #[test]
    fn shards_are_auto_or_a_count() {
        use crate::discord::Shards;
        let s = |v: &str| Settings::load_with_env(None, env(&[("FREESKI__DISCORD__SHARDS", v)]));
        assert_eq!(Settings::load_with_env(None, env(&[])).unwrap().discord.shards, Shards::Count(1));
        assert_eq!(s("auto").unwrap().discord.shards, Shards::Auto);
        assert_eq!(s("4").unwrap().discord.shards, Shards::Count(4));
        for bad in ["0", "many"] {
            let err = format!("{:#}", s(bad).unwrap_err());
            assert!(err.contains("shards"), "{bad}: {err}");
        }
    }

    #[test]
    fn llm_and_serve_settings_are_checked() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!((s.llm.backend, s.serve.listen.as_str()), (BackendKind::Local, "127.0.0.1:8000"));
        let s = Settings::load_with_env(None, env(&[("FREESKI__LLM__BACKEND", "openai"), ("FREESKI__LLM__BASE_URL", "http://gpu:8000/v1")])).unwrap();
        assert_eq!(s.llm.backend, BackendKind::Openai);
        for (k, v, needle) in [
            ("FREESKI__LLM__BASE_URL", "gpu:8000", "llm.base_url"),
            ("FREESKI__LLM__BACKEND", "vllm", "backend"),
            ("FREESKI__SERVE__LISTEN", "localhost", "serve.listen"),
            ("FREESKI__SERVE__MAX_BATCH", "0", "serve.max_batch"),
        ] {
            let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__LLM__BACKEND", "openai"), (k, v)])).unwrap_err());
            assert!(err.contains(needle), "{k}={v}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("local.toml");
        std::fs::write(&f, "[generation]\ntemprature = 0.5\n").unwrap();
        let err = format!("{:#}", Settings::load_with_env(Some(&f), env(&[])).unwrap_err());
        assert!(err.contains("temprature"), "{err}");
        let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__MODEL__DEVISE", "cpu")])).unwrap_err());
        assert!(err.contains("devise"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__GENERATION__MAX_NEW_TOKENS", "lots")])).unwrap_err());
        assert!(err.contains("max_new_tokens"), "{err}");
        let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__GENERATION__TOP_P", "1.5")])).unwrap_err());
        assert!(err.contains("generation.top_p"), "{err}");
        let err = format!("{:#}", Settings::load_with_env(None, env(&[("FREESKI__MODEL__QUANTIZE", "q3")])).unwrap_err());
        assert!(err.contains("quantize"), "{err}");
    }

    #[test]
    fn malformed_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("broken.toml");
        std::fs::write(&f, "[model\nsource = ").unwrap();
        let err = format!("{:#}", Settings::load_with_env(Some(&f), env(&[])).unwrap_err());
        assert!(err.contains("broken.toml"), "{err}");
        let missing = dir.path().join("nope.toml");
        let err = format!("{:#}", Settings::load_with_env(Some(&missing), env(&[])).unwrap_err());
        assert!(err.contains("nope.toml"), "{err}");
    }
}
