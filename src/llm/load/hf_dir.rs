//! Hugging Face folders (`config.json`, safetensors shards, `tokenizer.json`): weights are
//! renamed to GGUF names, q/k rows permuted to GGUF's rotary layout, linear weights quantized,
//! and the result cached as one GGUF file so the next start skips the slow part.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::gguf::HF_TOKENIZER_KEY;
use crate::llm::lora::hf_to_gguf_rows;
use crate::llm::model::Proj;
use crate::llm::model_config::ModelConfig;
use crate::llm::settings::QuantType;

pub fn ggml_type(q: QuantType) -> GgmlDType {
    match q {
        QuantType::Q4k => GgmlDType::Q4K,
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::F16 => GgmlDType::F16,
        QuantType::F32 => GgmlDType::F32,
    }
}

/// Path of the quantized GGUF for `dir`, building it first if the cache has none for these
/// exact input files and quantization.
pub fn quantized_gguf(dir: &Path, quant: QuantType, cache_dir: &Path) -> Result<PathBuf> {
    let inputs = Inputs::scan(dir)?;
    let key = inputs.cache_key(quant)?;
    let stem = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let out = cache_dir.join(format!("{stem}-{quant:?}-{key}.gguf").to_lowercase());
    if out.is_file() {
        tracing::info!(path = %out.display(), "using cached quantized model");
        return Ok(out);
    }
    std::fs::create_dir_all(cache_dir).with_context(|| format!("creating cache folder {}", cache_dir.display()))?;
    tracing::info!(from = %dir.display(), to = %out.display(), ?quant, "quantizing model (once; cached afterwards)");
    write_quantized(&inputs, quant, &out)?;
    Ok(out)
}

struct Inputs {
    config_json: String,
    tokenizer_json: String,
    shards: Vec<PathBuf>,
}

impl Inputs {
    fn scan(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p)
                .with_context(|| format!("{} is missing or unreadable (a Hugging Face model folder needs config.json, tokenizer.json and *.safetensors)", p.display()))
        };
        let config_json = read("config.json")?;
        let tokenizer_json = read("tokenizer.json")?;
        let index = dir.join("model.safetensors.index.json");
        let shards: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{} has no weight_map", index.display()))?;
            let names: std::collections::BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
            v.sort();
            v
        };
        ensure!(!shards.is_empty(), "{} holds no *.safetensors weights", dir.display());
        for s in &shards {
            ensure!(s.is_file(), "weight shard {} is missing", s.display());
        }
        Ok(Self { config_json, tokenizer_json, shards })
    }

    /// Hash of everything the quantized file depends on (shards by name, size and mtime: hashing
    /// 14 GB of weights at every start would defeat the cache).
    fn cache_key(&self, quant: QuantType) -> Result<String> {
        let mut h = Sha256::new();
        h.update(format!("v1 {quant:?}\n"));
        h.update(&self.config_json);
        h.update(&self.tokenizer_json);
        for s in &self.shards {
            let md = std::fs::metadata(s)?;
            let mtime = md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
            h.update(format!("{} {} {mtime}\n", s.file_name().unwrap_or_default().to_string_lossy(), md.len()));
        }
        Ok(hex::encode(&h.finalize()[..8]))
    }
}

/// HF tensor name → (GGUF name, projection if it is a decoder linear layer).
fn gguf_name(hf: &str) -> Option<(String, Option<Proj>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    match module {
        "input_layernorm" => Some((format!("blk.{i}.attn_norm.weight"), None)),
        "post_attention_layernorm" => Some((format!("blk.{i}.ffn_norm.weight"), None)),
        _ => Proj::ALL.into_iter().find(|p| p.hf_path() == module).map(|p| (format!("blk.{i}.{}.weight", p.gguf_name()), Some(p))),
    }
}

/// The type a weight of `cols` columns can take: block types need `cols` divisible by their
/// block size (Q4K: 256), so narrow models fall back to a 32-wide type.
fn fitting_type(want: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(want.block_size()) {
        return want;
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q4_0,
        other => other,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

fn write_quantized(inputs: &Inputs, quant: QuantType, out: &Path) -> Result<()> {
    let cfg = ModelConfig::from_hf_json(&inputs.config_json).context("config.json")?;
    let want = ggml_type(quant);
    // Gather every tensor's (shard, name) first so a missing one is reported before hours of work.
    let mut jobs: Vec<(String, PathBuf, String, Option<Proj>)> = Vec::new();
    for shard in &inputs.shards {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(shard) }.with_context(|| format!("{} is not a readable safetensors file", shard.display()))?;
        for (name, _) in st.tensors() {
            match gguf_name(&name) {
                Some((g, p)) => jobs.push((g, shard.clone(), name, p)),
                None if name.contains("rotary_emb") => {}
                None => tracing::warn!(tensor = %name, shard = %shard.display(), "ignoring tensor not used by a Llama decoder"),
            }
        }
    }
    let have: std::collections::HashSet<&str> = jobs.iter().map(|j| j.0.as_str()).collect();
    for name in required_tensors(&cfg) {
        ensure!(have.contains(name.as_str()), "the safetensors shards lack `{name}`, which this config.json needs (incomplete download?)");
    }

    let pb = indicatif::ProgressBar::new(jobs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("quantizing {bar:30} {pos}/{len} tensors [{elapsed_precise}, eta {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Quantization runs on one CPU thread per tensor in candle: spread tensors over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<BTreeMap<String, QTensor>> = Default::default();
    let first_err: std::sync::Mutex<Option<anyhow::Error>> = Default::default();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((gname, shard, hfname, proj)) = jobs.get(i) else { break };
                if first_err.lock().map(|e| e.is_some()).unwrap_or(true) {
                    break;
                }
                match convert(&cfg, shard, hfname, *proj, want) {
                    Ok(q) => {
                        if let Ok(mut r) = results.lock() {
                            r.insert(gname.clone(), q);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut slot) = first_err.lock() {
                            slot.get_or_insert(e.context(format!("tensor `{hfname}` in {}", shard.display())));
                        }
                    }
                }
                pb.inc(1);
            });
        }
    });
    pb.finish_and_clear();
    if let Some(e) = first_err.into_inner().map_err(|_| anyhow::anyhow!("quantization worker panicked"))? {
        return Err(e);
    }
    let tensors = results.into_inner().map_err(|_| anyhow::anyhow!("quantization worker panicked"))?;

    let mut md: Vec<(String, gguf_file::Value)> = cfg.to_gguf();
    md.push((HF_TOKENIZER_KEY.into(), gguf_file::Value::String(inputs.tokenizer_json.clone())));
    let cfg_json: serde_json::Value = serde_json::from_str(&inputs.config_json)?;
    for (key, gkey) in [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")] {
        match cfg_json.get(key) {
            Some(serde_json::Value::Number(n)) => md.push((gkey.into(), gguf_file::Value::U32(n.as_u64().unwrap_or(0) as u32))),
            Some(serde_json::Value::Array(a)) => {
                if let Some(n) = a.first().and_then(|x| x.as_u64()) {
                    md.push((gkey.into(), gguf_file::Value::U32(n as u32)))
                }
            }
            _ => {}
        }
    }
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = crate::util::tmp_path::beside(out);
    let mut f = std::io::BufWriter::new(File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
    gguf_file::write(&mut f, &md_refs, &t_refs).with_context(|| format!("writing {}", tmp.display()))?;
    use std::io::Write;
    f.flush()?;
    drop(f);
    std::fs::rename(&tmp, out).with_context(|| format!("moving {} into place", out.display()))?;
    Ok(())
}

/// GGUF names every decoder of this shape must have (`output.weight` only when untied).
fn required_tensors(cfg: &ModelConfig) -> Vec<String> {
    let mut v = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    if !cfg.tie_embeddings {
        v.push("output.weight".into());
    }
    for i in 0..cfg.num_layers {
        v.push(format!("blk.{i}.attn_norm.weight"));
        v.push(format!("blk.{i}.ffn_norm.weight"));
        v.extend(Proj::ALL.iter().map(|p| format!("blk.{i}.{}.weight", p.gguf_name())));
    }
    v
}

fn convert(cfg: &ModelConfig, shard: &Path, name: &str, proj: Option<Proj>, want: GgmlDType) -> Result<QTensor> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(shard) }?;
    let t: Tensor = st.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
    let t = match proj {
        Some(p @ (Proj::Q | Proj::K)) => hf_to_gguf_rows(&t, p, cfg)?,
        _ => t,
    };
    match t.rank() {
        1 => Ok(QTensor::quantize(&t, GgmlDType::F32)?),
        2 => {
            let cols = t.dim(1)?;
            Ok(QTensor::quantize(&t, fitting_type(want, cols))?)
        }
        r => bail!("unexpected rank {r}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_names() {
        assert_eq!(gguf_name("model.layers.3.self_attn.k_proj.weight"), Some(("blk.3.attn_k.weight".into(), Some(Proj::K))));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight"), Some(("blk.0.ffn_down.weight".into(), Some(Proj::Down))));
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight"), Some(("blk.0.ffn_norm.weight".into(), None)));
        assert_eq!(gguf_name("lm_head.weight"), Some(("output.weight".into(), None)));
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn narrow_models_fall_back() {
        assert_eq!(fitting_type(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
        assert_eq!(fitting_type(GgmlDType::Q4K, 64), GgmlDType::Q4_0);
        assert_eq!(fitting_type(GgmlDType::Q4_0, 48), GgmlDType::F16);
    }
}
