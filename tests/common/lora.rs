//! Random LoRA adapters for tests: every projection of every layer, non-zero B.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use freeski_bot::llm::lora::{AdapterConfig, LoraAdapter};
use freeski_bot::llm::model::Proj;
use freeski_bot::llm::ModelConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A rank-`r` adapter for a model of shape `cfg` whose B is large enough (`b_scale`) to change
/// the outputs visibly.
pub fn random(cfg: &ModelConfig, r: usize, b_scale: f32, seed: u64) -> LoraAdapter {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let mut rand_t = |rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| (rng.random::<f32>() - 0.5) * scale).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    for layer in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (fan_in, fan_out) = p.shape(cfg);
            let base = format!("base_model.model.model.layers.{layer}.{}", p.hf_path());
            t.insert(format!("{base}.lora_A.weight"), rand_t(r, fan_in, 1.0 / (fan_in as f32).sqrt()));
            t.insert(format!("{base}.lora_B.weight"), rand_t(fan_out, r, b_scale));
        }
    }
    let config = AdapterConfig::new(r, 2.0 * r as f64, 0.0, &Proj::ALL, "test", false);
    LoraAdapter::from_hf_tensors(format!("random-r{r}"), config, t, cfg).unwrap()
}
