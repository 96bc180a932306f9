//! Model loading: a GGUF file, a Hugging Face folder (quantized at load and cached as GGUF), or a
//! Hub repo fetched through `hf-hub`. Every path ends in [`gguf::load`], so there is one way a
//! model gets built.

pub mod gguf;
pub mod hf_dir;
pub mod hub;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::chat::ChatTemplate;
use super::model::Model;
use crate::llm::settings::ModelSettings;

/// Where a model comes from, parsed from `model.source` / `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
    Hub { repo: String, file: Option<String> },
}

impl ModelSource {
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if let Some(rest) = spec.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.splitn(3, '/').collect();
            return match parts.as_slice() {
                [owner, name] if !owner.is_empty() && !name.is_empty() => Ok(Self::Hub { repo: format!("{owner}/{name}"), file: None }),
                [owner, name, file] if !owner.is_empty() && !name.is_empty() && !file.is_empty() => Ok(Self::Hub { repo: format!("{owner}/{name}"), file: Some(file.to_string()) }),
                _ => bail!("bad model source `{spec}`: expected hf:OWNER/NAME or hf:OWNER/NAME/FILE.gguf"),
            };
        }
        if spec.is_empty() {
            bail!("model.source is empty: set it to a GGUF file, a Hugging Face folder or hf:OWNER/NAME[/FILE]");
        }
        let path = PathBuf::from(spec);
        if path.is_dir() {
            Ok(Self::HfDir(path))
        } else if path.is_file() {
            Ok(Self::Gguf(path))
        } else {
            bail!(
                "model file {} does not exist. Point the config at a local model: set `source = \"/path/to/model.gguf\"` \
                 under [model] in config/local.toml, pass --model /path/to/model.gguf, or set FREESKI__MODEL__SOURCE",
                path.display()
            )
        }
    }

    /// A short stable name for reports and for `base_model_name_or_path` in adapters.
    pub fn name(&self) -> String {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string()),
            Self::Hub { repo, file: Some(f) } => format!("{repo}/{f}"),
            Self::Hub { repo, file: None } => repo.clone(),
        }
    }
}

/// A model ready to answer: weights on the device, tokenizer and chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    /// Token ids that end an answer (EOS and the template's end-of-turn).
    pub stop_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub name: String,
    /// What [`load`] was given (a path or `hf:` id), so a second copy can be loaded elsewhere
    /// (`worker.device`); empty for models built in memory.
    pub source: String,
}

/// Load what `settings` (with an optional `--model` override) point at onto `device`.
pub fn load(settings: &ModelSettings, source_override: Option<&str>, device: &Device) -> Result<LoadedModel> {
    let spec = source_override.unwrap_or(&settings.source);
    let source = ModelSource::parse(spec)?;
    let name = source.name();
    let gguf_path = match &source {
        ModelSource::Gguf(p) => p.clone(),
        ModelSource::HfDir(dir) => hf_dir::quantized_gguf(dir, settings.quantize, &settings.quantized_cache_dir)?,
        ModelSource::Hub { repo, file } => {
            let local = hub::fetch(repo, file.as_deref(), settings)?;
            match file {
                Some(_) => local,
                None => hf_dir::quantized_gguf(&local, settings.quantize, &settings.quantized_cache_dir)?,
            }
        }
    };
    let mut loaded = gguf::load(&gguf_path, device, settings.chat_template).with_context(|| format!("loading model {}", gguf_path.display()))?;
    loaded.name = name;
    loaded.source = spec.to_string();
    Ok(loaded)
}

/// [`load`] with the default settings and a local path or `hf:` id (tests, tools).
pub fn load_path(path: &Path, device: &Device) -> Result<LoadedModel> {
    load(&ModelSettings::defaults()?, Some(&path.to_string_lossy()), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("hf:TheBloke/Mistral-7B-Instruct-v0.1-GGUF/mistral-7b-instruct-v0.1.Q4_K_M.gguf").unwrap(),
            ModelSource::Hub { repo: "TheBloke/Mistral-7B-Instruct-v0.1-GGUF".into(), file: Some("mistral-7b-instruct-v0.1.Q4_K_M.gguf".into()) }
        );
        assert_eq!(ModelSource::parse("hf:mistralai/Mistral-7B-Instruct-v0.1").unwrap(), ModelSource::Hub { repo: "mistralai/Mistral-7B-Instruct-v0.1".into(), file: None });
        assert!(ModelSource::parse("hf:justname").is_err());
        let err = ModelSource::parse("/nonexistent/model.gguf").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/model.gguf") && err.contains("config/local.toml") && err.contains("--model"), "{err}");
    }
}
