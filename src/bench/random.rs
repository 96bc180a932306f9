//! Random-weight models of a named shape, built straight in 4-bit form on the target device.
//! Benchmarks use them where real weights are out of reach (Mistral-7B on the GPU machine):
//! speed and memory depend on shapes and types, not on the values.

use anyhow::{bail, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::llm::model::Model;
use crate::llm::model_config::ModelConfig;

/// A model of shape `cfg` whose linear layers (and embedding) are random blocks of `dtype`.
/// Quantizing dense random matrices would take minutes for 7B on one CPU thread; writing random
/// quantized blocks with sane scales takes seconds.
pub fn random_model(cfg: &ModelConfig, dtype: GgmlDType, seed: u64, device: &Device) -> Result<Model> {
    random_model_with(cfg, |_| dtype, seed, device)
}

/// Like llama.cpp's Q4_K_M mix: attention values, MLP down projections and the output head in
/// Q6_K, everything else in Q4_K (llama.cpp keeps only some layers' v/down at 6 bits; all of
/// them here, so every kernel meets both types).
pub fn q4k_m_type(name: &str) -> GgmlDType {
    if name == "output.weight" || name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight") {
        GgmlDType::Q6K
    } else {
        GgmlDType::Q4K
    }
}

/// A random model whose tensor `name` has type `dtype_of(name)`.
pub fn random_model_with(cfg: &ModelConfig, dtype_of: impl Fn(&str) -> GgmlDType, seed: u64, device: &Device) -> Result<Model> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let h = cfg.hidden_size;
    Model::from_tensors(cfg.clone(), device, |name| {
        if name == "output.weight" && cfg.tie_embeddings {
            return Ok(None);
        }
        if name.ends_with("norm.weight") {
            let ones = Tensor::ones(h, candle_core::DType::F32, device)?;
            return Ok(Some(QTensor::quantize(&ones, GgmlDType::F32)?));
        }
        let (rows, cols) = shape_of(cfg, name)?;
        Ok(Some(random_qtensor(dtype_of(name), rows, cols, &mut rng, device)?))
    })
}

fn shape_of(cfg: &ModelConfig, name: &str) -> Result<(usize, usize)> {
    if name == "token_embd.weight" || name == "output.weight" {
        return Ok((cfg.vocab_size, cfg.hidden_size));
    }
    for p in crate::llm::model::Proj::ALL {
        if name.ends_with(&format!(".{}.weight", p.gguf_name())) {
            let (fan_in, fan_out) = p.shape(cfg);
            return Ok((fan_out, fan_in));
        }
    }
    bail!("no random recipe for tensor `{name}`")
}

/// Random blocks of a GGML type, with block scales chosen so weights have a magnitude like real
/// ones (|w| ≲ 0.1): activations stay finite through every layer.
pub fn random_qtensor(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut ChaCha8Rng, device: &Device) -> Result<QTensor> {
    let bs = dtype.block_size();
    if !cols.is_multiple_of(bs) {
        bail!("{cols} columns are not a multiple of the {dtype:?} block size {bs}");
    }
    let blocks = rows * cols / bs;
    let ts = dtype.type_size();
    let mut raw = vec![0u8; blocks * ts];
    rng.fill_bytes(&mut raw);
    let put_f16 = |b: &mut [u8], at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    for block in raw.chunks_exact_mut(ts) {
        match dtype {
            // d, dmin, 12 bytes of 6-bit scales, 128 bytes of nibbles.
            GgmlDType::Q4K => {
                put_f16(block, 0, 1e-4);
                put_f16(block, 2, 1e-4);
            }
            // d, then nibbles (-8..7) or bytes (-128..127): the same |w| range for both.
            GgmlDType::Q4_0 => put_f16(block, 0, 2e-3),
            GgmlDType::Q8_0 => put_f16(block, 0, 1.25e-4),
            // 128 + 64 bytes of 6-bit quants (-32..31), 16 int8 scales, then d.
            GgmlDType::Q6K => put_f16(block, 208, 2.5e-5),
            // d, m, then nibbles.
            GgmlDType::Q4_1 => {
                put_f16(block, 0, 2e-3);
                put_f16(block, 2, -0.015);
            }
            other => bail!("random weights of type {other:?} are not supported (use q4k, q6k, q4_0, q4_1 or q8_0)"),
        }
    }
    Ok(qtensor_from_ggml(dtype, &raw, vec![rows, cols], device)?)
}

/// A copy of `model` whose every linear weight is its dequantized f32 value: the exact
/// computation the quantized kernels approximate (parity checks).
pub fn dequantized(model: &Model) -> Result<Model> {
    let dev = model.device().clone();
    model.map_weights(|q| {
        let w = q.dequantize(&dev)?;
        Ok(QTensor::quantize(&w, GgmlDType::F32)?)
    })
}
