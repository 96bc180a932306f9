//! Benchmarks behind `freeski-bot bench …`: measurements that print numbers (recorded in
//! BENCHMARKS.md), and what only they need — random models of a named shape ([`random`]), a
//! device-memory cap ([`ballast`]), a synthetic forum ([`forum`]). The product never imports
//! this module; `cli/bench.rs` only parses arguments and calls `run` of the chosen benchmark.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use clap::Args;

use crate::llm::lora::{AdapterConfig, LoraAdapter};
use crate::llm::model::{Model, Proj};
use crate::llm::settings::QuantType;

pub mod ballast;
pub mod batching;
pub mod forum;
pub mod generate;
pub mod parse;
pub mod random;
pub mod serve_train;
pub mod train;

/// Which model a benchmark runs: a file, or random weights of a named shape.
#[derive(Debug, Args)]
pub struct BenchModel {
    /// Model file/folder/hub id (default: model.source). Ignored with --random.
    #[arg(long)]
    pub model: Option<String>,
    /// Random weights of a named shape instead of a file: mistral-7b, smollm2-135m, tiny.
    #[arg(long)]
    pub random: Option<String>,
    /// Weight type for --random.
    #[arg(long, value_enum, default_value = "q4k")]
    pub quant: BenchQuant,
    /// cpu or cuda:N (default: model.device).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchQuant {
    Q4k,
    /// llama.cpp's Q4_K_M mix: Q6_K for attention values, MLP down and the head, else Q4_K.
    #[value(name = "q4k-m")]
    Q4kM,
    Q6k,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BenchQuant {
    /// The type of tensor `name` in a random model of this kind.
    pub fn type_of(self, name: &str) -> GgmlDType {
        let one = match self {
            Self::Q4kM => return random::q4k_m_type(name),
            Self::Q6k => return GgmlDType::Q6K,
            Self::Q4k => QuantType::Q4k,
            Self::Q4_0 => QuantType::Q4_0,
            Self::Q4_1 => QuantType::Q4_1,
            Self::Q8_0 => QuantType::Q8_0,
        };
        crate::llm::load::hf_dir::ggml_type(one)
    }

    /// A random model of shape `cfg` with this kind's weight types.
    pub fn random_model(self, cfg: &crate::llm::ModelConfig, seed: u64, dev: &Device) -> Result<Model> {
        random::random_model_with(cfg, |name| self.type_of(name), seed, dev)
    }
}

pub fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Middle value (zero for none).
pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A LoRA adapter with random A and B (B non-zero, so the adapter path really computes).
pub fn random_adapter(cfg: &crate::llm::ModelConfig, r: usize, dev: &Device) -> Result<LoraAdapter> {
    let mut tensors = HashMap::new();
    for layer in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (fan_in, fan_out) = p.shape(cfg);
            let base = format!("base_model.model.model.layers.{layer}.{}", p.hf_path());
            tensors.insert(format!("{base}.lora_A.weight"), (Tensor::randn(0f32, 1.0, (r, fan_in), dev)? / (fan_in as f64).sqrt())?);
            tensors.insert(format!("{base}.lora_B.weight"), (Tensor::randn(0f32, 1.0, (fan_out, r), dev)? * 1e-3)?);
        }
    }
    let config = AdapterConfig::new(r, 2.0 * r as f64, 0.0, &Proj::ALL, "random", false);
    LoraAdapter::from_hf_tensors(format!("random-r{r}"), config, tensors, cfg)
}
