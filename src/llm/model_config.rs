//! The shape of a Llama-family decoder, read from GGUF metadata or an HF `config.json`.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position: usize,
    /// Mistral's sliding-window attention: a query sees at most this many keys (itself included).
    pub sliding_window: Option<usize>,
    /// SmolLM2 reuses the token embedding as the output projection.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Mistral-7B-Instruct-v0.1.
    pub fn mistral_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position: 32768,
            sliding_window: Some(4096),
            tie_embeddings: false,
        }
    }

    /// SmolLM2-135M-Instruct.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position: 8192,
            sliding_window: None,
            tie_embeddings: true,
        }
    }

    /// A few-layer model for tests: GQA and a sliding window shorter than typical prompts.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position: 1024,
            sliding_window: Some(8),
            tie_embeddings: false,
        }
    }

    /// A named shape for `--random NAME`.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "mistral-7b" => Self::mistral_7b(),
            "smollm2-135m" => Self::smollm2_135m(),
            "tiny" => Self::tiny(),
            other => bail!("unknown model shape `{other}` (known: mistral-7b, smollm2-135m, tiny)"),
        })
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.num_layers > 0 && self.hidden_size > 0 && self.vocab_size > 0, "model config has a zero dimension: {self:?}");
        anyhow::ensure!(
            self.num_heads > 0 && self.num_kv_heads > 0 && self.num_heads.is_multiple_of(self.num_kv_heads),
            "heads ({}) must be a multiple of KV heads ({})",
            self.num_heads,
            self.num_kv_heads
        );
        anyhow::ensure!(self.head_dim.is_multiple_of(2), "head_dim {} must be even for rotary embeddings", self.head_dim);
        anyhow::ensure!(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0, "rope_theta and rms_norm_eps must be positive");
        Ok(())
    }

    /// Read the `llama.*` keys llama.cpp writes (Mistral GGUFs use the llama architecture too).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let arch = md.get("general.architecture").map(|v| v.to_string().cloned()).transpose()?.unwrap_or_else(|| "llama".into());
        if arch != "llama" && arch != "mistral" {
            bail!("unsupported architecture `{arch}` in general.architecture (expected llama or mistral)");
        }
        let get = |key: &str| -> Result<&Value> { md.get(&format!("{arch}.{key}")).with_context(|| format!("GGUF metadata lacks `{arch}.{key}`")) };
        let int = |key: &str| -> Result<usize> { gguf_int(get(key)?).with_context(|| format!("GGUF metadata `{arch}.{key}`")) };
        let float = |key: &str| -> Result<f64> { gguf_float(get(key)?).with_context(|| format!("GGUF metadata `{arch}.{key}`")) };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = if md.contains_key(&format!("{arch}.attention.head_count_kv")) { int("attention.head_count_kv")? } else { num_heads };
        let head_dim = if md.contains_key(&format!("{arch}.rope.dimension_count")) { int("rope.dimension_count")? } else { hidden_size / num_heads };
        let vocab_size = match md.get(&format!("{arch}.vocab_size")) {
            Some(v) => gguf_int(v)?,
            None => md.get("tokenizer.ggml.tokens").context("GGUF metadata lacks both vocab_size and tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        let rope_theta = if md.contains_key(&format!("{arch}.rope.freq_base")) { float("rope.freq_base")? } else { 10_000.0 };
        let sliding_window = match md.get(&format!("{arch}.attention.sliding_window")) {
            Some(v) => Some(gguf_int(v)?).filter(|&w| w > 0),
            None => None,
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
            rope_theta,
            max_position: int("context_length").unwrap_or(4096),
            sliding_window,
            // Decided by the loader from whether `output.weight` exists.
            tie_embeddings: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Metadata to write a GGUF of this shape (used by the quantized cache and random models).
    pub fn to_gguf(&self) -> Vec<(String, Value)> {
        let mut md = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("llama.vocab_size".into(), Value::U32(self.vocab_size as u32)),
            ("llama.embedding_length".into(), Value::U32(self.hidden_size as u32)),
            ("llama.feed_forward_length".into(), Value::U32(self.intermediate_size as u32)),
            ("llama.block_count".into(), Value::U32(self.num_layers as u32)),
            ("llama.attention.head_count".into(), Value::U32(self.num_heads as u32)),
            ("llama.attention.head_count_kv".into(), Value::U32(self.num_kv_heads as u32)),
            ("llama.rope.dimension_count".into(), Value::U32(self.head_dim as u32)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(self.rms_norm_eps as f32)),
            ("llama.rope.freq_base".into(), Value::F32(self.rope_theta as f32)),
            ("llama.context_length".into(), Value::U32(self.max_position as u32)),
        ];
        if let Some(w) = self.sliding_window {
            md.push(("llama.attention.sliding_window".into(), Value::U32(w as u32)));
        }
        md
    }

    /// Parse an HF `config.json` (LlamaForCausalLM / MistralForCausalLM), old and new layouts.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let int = |k: &str| -> Result<usize> { v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).with_context(|| format!("config.json lacks integer `{k}`")) };
        if let Some(mt) = v.get("model_type").and_then(|m| m.as_str()) {
            if mt != "llama" && mt != "mistral" {
                bail!("config.json model_type `{mt}` is not supported (expected llama or mistral)");
            }
        }
        let hidden_size = int("hidden_size")?;
        let num_heads = int("num_attention_heads")?;
        // transformers >= 5 nests rope_theta in rope_parameters; older files keep it top level.
        let rope_theta =
            v.get("rope_theta").and_then(|x| x.as_f64()).or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64())).unwrap_or(10_000.0);
        let head_dim = v.get("head_dim").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(hidden_size / num_heads);
        let cfg = Self {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            num_kv_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            rope_theta,
            max_position: v.get("max_position_embeddings").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(4096),
            sliding_window: v.get("sliding_window").and_then(|x| x.as_u64()).map(|x| x as usize).filter(|&w| w > 0),
            tie_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parameter count of the decoder (for reports).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h;
        embed * if self.tie_embeddings { 1 } else { 2 } + self.num_layers * per_layer + h
    }
}

pub(crate) fn gguf_int(v: &Value) -> Result<usize> {
    Ok(match v {
        Value::U8(x) => *x as usize,
        Value::U16(x) => *x as usize,
        Value::U32(x) => *x as usize,
        Value::U64(x) => *x as usize,
        Value::I8(x) if *x >= 0 => *x as usize,
        Value::I16(x) if *x >= 0 => *x as usize,
        Value::I32(x) if *x >= 0 => *x as usize,
        Value::I64(x) if *x >= 0 => *x as usize,
        other => bail!("expected a non-negative integer, found {other:?}"),
    })
}

pub(crate) fn gguf_float(v: &Value) -> Result<f64> {
    Ok(match v {
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        other => gguf_int(other).map_err(|_| anyhow::anyhow!("expected a number, found {other:?}"))? as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_old_and_new_layouts() {
        let old = r#"{"model_type":"mistral","hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":32000,"rope_theta":10000.0,
            "rms_norm_eps":1e-05,"sliding_window":4096,"max_position_embeddings":32768,"torch_dtype":"bfloat16"}"#;
        let new = r#"{"model_type":"mistral","hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":32000,"head_dim":128,
            "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},"dtype":"bfloat16",
            "rms_norm_eps":1e-05,"sliding_window":4096,"max_position_embeddings":32768}"#;
        let a = ModelConfig::from_hf_json(old).unwrap();
        let b = ModelConfig::from_hf_json(new).unwrap();
        assert_eq!(a, ModelConfig::mistral_7b());
        assert_eq!(a, b);
    }

    #[test]
    fn hf_config_errors_name_the_key() {
        let err = ModelConfig::from_hf_json(r#"{"hidden_size":64}"#).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
        let err = ModelConfig::from_hf_json(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(err.contains("gpt2"), "{err}");
    }

    #[test]
    fn gguf_round_trip() {
        // GGUF stores floats as f32: eps comes back as the f32 nearest 1e-5.
        let cfg = ModelConfig { rms_norm_eps: 1e-5f32 as f64, ..ModelConfig::mistral_7b() };
        let md: HashMap<String, Value> = cfg.to_gguf().into_iter().collect();
        assert_eq!(ModelConfig::from_gguf(&md).unwrap(), cfg);
    }
}
