//! LoRA adapters in PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`),
//! applied unmerged: `y = base(x) + (x·Aᵀ)·Bᵀ·scale`, so swapping adapters never touches the base.
//!
//! The model keeps q/k weights in GGUF's interleaved-rotary row order; PEFT adapters are written
//! against HF's order. `lora_B` of q_proj/k_proj is therefore permuted on load and back on save,
//! so adapters trained with PEFT work here and ours work in PEFT, vLLM and llama.cpp's converter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::model::Proj;
use super::model_config::ModelConfig;
use super::qlinear::with_cpu_f32;
use crate::kernels::cpu;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The keys of PEFT's `LoraConfig` that matter here; any other keys are kept as they were so a
/// load/save round trip does not drop them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    /// PEFT also accepts a single string ("all-linear" or a regex).
    One(String),
}

impl AdapterConfig {
    /// A config for a new adapter on `targets`, as PEFT would write it.
    pub fn new(r: usize, lora_alpha: f64, lora_dropout: f64, targets: &[Proj], base_model: &str, use_rslora: bool) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout,
            target_modules: TargetModules::List(targets.iter().map(|p| p.hf_name().to_string()).collect()),
            bias: "none".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            use_rslora,
            fan_in_fan_out: false,
            extra: BTreeMap::new(),
        }
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rank-stabilised LoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.peft_type.eq_ignore_ascii_case("LORA"), "peft_type is `{}`, only LORA adapters are supported", self.peft_type);
        ensure!(self.r > 0, "r must be at least 1");
        ensure!(self.lora_alpha.is_finite(), "lora_alpha must be a finite number");
        ensure!(self.bias == "none", "bias = `{}` is not supported (only \"none\")", self.bias);
        ensure!(!self.fan_in_fan_out, "fan_in_fan_out = true is for GPT-2 style Conv1D layers, not Llama");
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = self.extra.get(key) {
                ensure!(v.is_null() || v.as_object().is_some_and(|o| o.is_empty()), "`{key}` (per-layer ranks/alphas) is not supported");
            }
        }
        for key in ["use_dora", "layers_to_transform"] {
            if let Some(v) = self.extra.get(key) {
                ensure!(v.is_null() || v == &serde_json::Value::Bool(false), "`{key}` is not supported");
            }
        }
        Ok(())
    }

    pub fn targets(&self, p: Proj) -> bool {
        match &self.target_modules {
            TargetModules::List(l) => l.iter().any(|m| m == p.hf_name() || m.ends_with(&format!(".{}", p.hf_name()))),
            // "all-linear" and regexes: the weights file is the authority on what is adapted.
            TargetModules::One(_) => true,
        }
    }
}

/// One adapted projection, stored in the model's (GGUF) row order, f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    a_t: Tensor,
    b_t_scaled: Tensor,
}

impl LoraPair {
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        // Contiguous, so the fused decode step can read A and B rows in place.
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let a_t = a.t()?.contiguous()?;
        let b_t_scaled = (b.t()? * scale)?.contiguous()?;
        Ok(Self { a, b, scale, a_t, b_t_scaled })
    }

    /// `(x·Aᵀ)·Bᵀ·scale` for `x: [.., in]`. On the CPU each row of `x` is computed alone in one
    /// fixed order (`kernels::cpu::low_rank`): candle's GEMM sums a one-token row differently
    /// alone than beside others, which would let batching change an answer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.a_t.dtype())?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let k = self.a.dim(1)?;
            let n = self.b_t_scaled.dim(1)?;
            let mut dims = x.dims().to_vec();
            ensure!(dims.last() == Some(&k), "input {dims:?} does not end in the adapter's {k} inputs");
            let mut out = vec![0f32; x.elem_count() / k * n];
            with_cpu_f32(&x, |xs| self.low_rank_cpu(xs, &mut out))?;
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return Ok(Tensor::from_vec(out, dims, x.device())?);
        }
        Ok(x.broadcast_matmul(&self.a_t)?.broadcast_matmul(&self.b_t_scaled)?)
    }

    /// The LoRA terms of `x: [b, .., in]` with row `i` (all its positions) through `pairs[i]`
    /// and zeros where that is `None`: each row exactly as [`LoraPair::forward`] computes it
    /// alone (a decode step mixing answers of different adapters). Every pair must map `in` to
    /// the same `out`.
    pub fn forward_rows(pairs: &[Option<&LoraPair>], x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        ensure!(pairs.len() == b, "{} LoRA pairs for {b} rows", pairs.len());
        let Some(first) = pairs.iter().flatten().next() else { bail!("no LoRA pair for any row") };
        let k = first.a.dim(1)?;
        let n = first.b.dim(0)?;
        ensure!(pairs.iter().flatten().all(|p| p.a.dim(1).ok() == Some(k) && p.b.dim(0).ok() == Some(n)), "LoRA pairs of different shapes in one batch");
        let mut dims = x.dims().to_vec();
        ensure!(dims.last() == Some(&k), "input {dims:?} does not end in the adapters' {k} inputs");
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let x = x.to_dtype(first.a_t.dtype())?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            // One output buffer, each row's slice filled by its own pair (of its own rank).
            let per_row = x.elem_count() / b;
            let mut out = vec![0f32; b * (per_row / k) * n];
            with_cpu_f32(&x, |xs| {
                for (i, (pair, ys)) in pairs.iter().zip(out.chunks_mut(per_row / k * n)).enumerate() {
                    if let Some(p) = pair {
                        p.low_rank_cpu(&xs[i * per_row..(i + 1) * per_row], ys)?;
                    }
                }
                Ok(())
            })?;
            return Ok(Tensor::from_vec(out, dims, x.device())?);
        }
        let mut one_row = dims;
        one_row[0] = 1;
        let mut rows = Vec::with_capacity(b);
        for (i, pair) in pairs.iter().enumerate() {
            let xi = x.narrow(0, i, 1)?;
            rows.push(match pair {
                Some(p) => p.forward(&xi)?,
                None => Tensor::zeros(one_row.as_slice(), xi.dtype(), xi.device())?,
            });
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// `out = (xs·Aᵀ)·Bᵀ·scale` for the rows of `xs` (f32 on the CPU), each row alone in one
    /// fixed order (`kernels::cpu::low_rank`).
    fn low_rank_cpu(&self, xs: &[f32], out: &mut [f32]) -> Result<()> {
        let (r, k) = self.a.dims2()?;
        let n = self.b_t_scaled.dim(1)?;
        with_cpu_f32(&self.a, |a| with_cpu_f32(&self.b_t_scaled, |bt| cpu::low_rank(xs, k, a, r, bt, n, out)))
    }

    /// The dense update `scale·B·A: [out, in]` that merging adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// Device addresses of every pair's `(A, B)`, by layer and projection (fused CUDA decode).
pub type LoraPtrs = Vec<[Option<(u64, u64)>; 7]>;

/// A loaded adapter: one optional [`LoraPair`] per (layer, projection).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub id: String,
    pub config: AdapterConfig,
    model: ModelConfig,
    pairs: Vec<[Option<LoraPair>; 7]>,
    /// Filled on first use by `device_ptrs` (CUDA builds); `None` inside: not all on CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ptrs: std::sync::OnceLock<Option<LoraPtrs>>,
}

impl LoraAdapter {
    /// Whether `a` and `b` are the same loaded adapter (the same object, not equal weights), or
    /// both the bare base.
    pub fn same(a: Option<&LoraAdapter>, b: Option<&LoraAdapter>) -> bool {
        match (a, b) {
            (Some(x), Some(y)) => std::ptr::eq(x, y),
            (None, None) => true,
            _ => false,
        }
    }

    /// Load a PEFT adapter folder and check every tensor against the model's shape.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading adapter config {}", cfg_path.display()))?;
        let config: AdapterConfig = serde_json::from_str(&text).with_context(|| format!("parsing adapter config {}", cfg_path.display()))?;
        config.validate().with_context(|| format!("adapter config {}", cfg_path.display()))?;
        let w_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w_path).with_context(|| format!("reading adapter weights {}", w_path.display()))?;
        let tensors = read_safetensors(&bytes, device).with_context(|| format!("adapter weights {} are corrupt or truncated", w_path.display()))?;
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        Self::from_hf_tensors(id, config, tensors, model).with_context(|| format!("adapter {}", dir.display()))
    }

    /// Build from PEFT-named tensors in HF row order.
    pub fn from_hf_tensors(id: String, config: AdapterConfig, tensors: HashMap<String, Tensor>, model: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let r = config.r;
        let scale = config.scale();
        let mut halves: BTreeMap<(usize, Proj), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, t) in tensors {
            let (layer, proj, is_a) = parse_name(&name)?;
            ensure!(layer < model.num_layers, "tensor `{name}`: layer {layer} does not exist (model has {})", model.num_layers);
            ensure!(config.targets(proj), "tensor `{name}`: {} is not in target_modules", proj.hf_name());
            let (fan_in, fan_out) = proj.shape(model);
            let want = if is_a { [r, fan_in] } else { [fan_out, r] };
            ensure!(t.dims() == want, "tensor `{name}` has shape {:?}, expected {:?} (r = {r})", t.dims(), want);
            let t = t.to_dtype(DType::F32)?;
            ensure!(all_finite(&t)?, "tensor `{name}` contains NaN or infinite values");
            let slot = halves.entry((layer, proj)).or_default();
            if is_a {
                slot.0 = Some(t)
            } else {
                slot.1 = Some(t)
            }
        }
        ensure!(!halves.is_empty(), "no LoRA tensors found");
        let mut pairs: Vec<[Option<LoraPair>; 7]> = (0..model.num_layers).map(|_| Default::default()).collect();
        for ((layer, proj), (a, b)) in halves {
            let path = format!("layers.{layer}.{}", proj.hf_path());
            let a = a.with_context(|| format!("`{path}` has lora_B but no lora_A"))?;
            let b = b.with_context(|| format!("`{path}` has lora_A but no lora_B"))?;
            let b = permute_rows(&b, proj, model, Direction::HfToGguf)?;
            pairs[layer][proj.index()] = Some(LoraPair::new(a, b, scale)?);
        }
        Ok(Self { id, config, model: model.clone(), pairs, ptrs: Default::default() })
    }

    /// Build from pairs already in the model's row order (the trainer's own tensors).
    pub fn from_pairs(id: String, config: AdapterConfig, model: &ModelConfig, pairs: Vec<[Option<LoraPair>; 7]>) -> Result<Self> {
        config.validate()?;
        ensure!(pairs.len() == model.num_layers, "{} layers of pairs for a {}-layer model", pairs.len(), model.num_layers);
        Ok(Self { id, config, model: model.clone(), pairs, ptrs: Default::default() })
    }

    pub fn pair(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.pairs.get(layer)?[proj.index()].as_ref()
    }

    /// The device addresses of every pair's A and B (both f32, contiguous), worked out once per
    /// adapter: they stay valid as long as the adapter lives. `None` when a pair is not on a
    /// CUDA device.
    #[cfg(feature = "cuda")]
    pub fn device_ptrs(&self) -> Result<Option<&LoraPtrs>> {
        if let Some(p) = self.ptrs.get() {
            return Ok(p.as_ref());
        }
        let on_cuda = self.pairs.iter().flatten().flatten().all(|p| p.a.device().is_cuda() && p.b.device().is_cuda());
        let table = if on_cuda {
            let ptr = |p: &LoraPair| -> Result<(u64, u64)> { Ok((crate::kernels::tensor_ptr(&p.a)?, crate::kernels::tensor_ptr(&p.b)?)) };
            Some(
                self.pairs
                    .iter()
                    .map(|row| -> Result<[Option<(u64, u64)>; 7]> {
                        let mut out = [None; 7];
                        for (slot, p) in out.iter_mut().zip(row) {
                            *slot = p.as_ref().map(ptr).transpose()?;
                        }
                        Ok(out)
                    })
                    .collect::<Result<LoraPtrs>>()?,
            )
        } else {
            None
        };
        Ok(self.ptrs.get_or_init(|| table).as_ref())
    }

    pub fn num_pairs(&self) -> usize {
        self.pairs.iter().flatten().flatten().count()
    }

    /// Error unless this adapter was built for a model of shape `model`.
    pub fn check_fits(&self, model: &ModelConfig) -> Result<()> {
        let same = self.model.num_layers == model.num_layers && Proj::ALL.iter().all(|p| p.shape(&self.model) == p.shape(model));
        ensure!(same, "adapter `{}` was built for a different model shape", self.id);
        Ok(())
    }

    /// PEFT-named tensors in HF row order (what `save` writes).
    pub fn to_hf_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (layer, row) in self.pairs.iter().enumerate() {
            for proj in Proj::ALL {
                if let Some(p) = &row[proj.index()] {
                    let base = format!("base_model.model.model.layers.{layer}.{}", proj.hf_path());
                    out.insert(format!("{base}.lora_A.weight"), p.a.to_device(&Device::Cpu)?);
                    let b = permute_rows(&p.b, proj, &self.model, Direction::GgufToHf)?;
                    out.insert(format!("{base}.lora_B.weight"), b.to_device(&Device::Cpu)?);
                }
            }
        }
        Ok(out)
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically
    /// (temp file + rename), so a crash never leaves a half-written adapter behind.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors = self.to_hf_tensors()?;
        let w_tmp = crate::util::tmp_path::beside(&dir.join(WEIGHTS_FILE));
        candle_core::safetensors::save(&tensors, &w_tmp).with_context(|| format!("writing {}", w_tmp.display()))?;
        let c_tmp = crate::util::tmp_path::beside(&dir.join(CONFIG_FILE));
        std::fs::write(&c_tmp, serde_json::to_string_pretty(&self.config)?).with_context(|| format!("writing {}", c_tmp.display()))?;
        std::fs::rename(&w_tmp, dir.join(WEIGHTS_FILE)).context("renaming adapter weights into place")?;
        std::fs::rename(&c_tmp, dir.join(CONFIG_FILE)).context("renaming adapter config into place")?;
        Ok(())
    }
}

/// An adapter given as a folder path, or as an id under `adapters_dir`.
pub fn resolve_dir(spec: &str, adapters_dir: &Path) -> Result<PathBuf> {
    let direct = PathBuf::from(spec);
    if direct.join(CONFIG_FILE).is_file() {
        return Ok(direct);
    }
    let by_id = adapters_dir.join(spec);
    if by_id.join(CONFIG_FILE).is_file() {
        return Ok(by_id);
    }
    let known: Vec<String> = std::fs::read_dir(adapters_dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().join(CONFIG_FILE).is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    bail!(
        "adapter `{spec}` not found (no {CONFIG_FILE} in {} or {}); adapters available: {}",
        direct.display(),
        by_id.display(),
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

fn read_safetensors(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).with_context(|| format!("tensor `{name}`"))?;
        out.insert(name, t);
    }
    Ok(out)
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`
fn parse_name(name: &str) -> Result<(usize, Proj, bool)> {
    let bad = || anyhow::anyhow!("unexpected tensor `{name}` (expected base_model.model.model.layers.N.<module>.lora_A/B.weight)");
    let rest = name.strip_prefix("base_model.model.model.layers.").ok_or_else(bad)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    let parts: Vec<&str> = rest.split('.').collect();
    let (group, module, which) = match parts.as_slice() {
        [g, m, w, "weight"] | [g, m, w, "default", "weight"] => (*g, *m, *w),
        _ => return Err(bad()),
    };
    let proj = Proj::from_hf_name(module).ok_or_else(bad)?;
    ensure!(proj.hf_path().starts_with(group), "tensor `{name}`: {module} does not belong to {group}");
    let is_a = match which {
        "lora_A" => true,
        "lora_B" => false,
        _ => return Err(bad()),
    };
    Ok((layer, proj, is_a))
}

#[derive(Clone, Copy)]
enum Direction {
    HfToGguf,
    GgufToHf,
}

/// llama.cpp's q/k permutation on the output rows: within each head, HF keeps the two rotary
/// halves apart (`[h, 2, hd/2]`), GGUF interleaves them (`[h, hd/2, 2]`).
fn permute_rows(t: &Tensor, proj: Proj, model: &ModelConfig, dir: Direction) -> Result<Tensor> {
    let heads = match proj {
        Proj::Q => model.num_heads,
        Proj::K => model.num_kv_heads,
        _ => return Ok(t.clone()),
    };
    let (rows, cols) = t.dims2()?;
    let half = model.head_dim / 2;
    if rows != heads * 2 * half {
        bail!("cannot permute {rows} rows into {heads} heads of {}", 2 * half);
    }
    let out = match dir {
        Direction::HfToGguf => t.reshape((heads, 2, half, cols))?.transpose(1, 2)?,
        Direction::GgufToHf => t.reshape((heads, half, 2, cols))?.transpose(1, 2)?,
    };
    Ok(out.contiguous()?.reshape((rows, cols))?)
}

/// HF → GGUF row order for a full q/k weight (used when loading HF checkpoints).
pub(crate) fn hf_to_gguf_rows(t: &Tensor, proj: Proj, model: &ModelConfig) -> Result<Tensor> {
    permute_rows(t, proj, model, Direction::HfToGguf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        let (l, p, a) = parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight").unwrap();
        assert_eq!((l, p, a), (12, Proj::Down, false));
        let (l, p, a) = parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight").unwrap();
        assert_eq!((l, p, a), (0, Proj::Q, true));
        assert!(parse_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight").is_err());
        assert!(parse_name("model.layers.0.mlp.down_proj.weight").is_err());
    }

    #[test]
    fn permutation_round_trips() {
        let cfg = ModelConfig::tiny();
        let t = Tensor::arange(0f32, (cfg.num_heads * cfg.head_dim * 3) as f32, &Device::Cpu).unwrap().reshape((cfg.num_heads * cfg.head_dim, 3)).unwrap();
        let g = permute_rows(&t, Proj::Q, &cfg, Direction::HfToGguf).unwrap();
        assert_ne!(g.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        // Row 1 of GGUF order is HF row hd/2 (second rotary half of head 0).
        assert_eq!(g.get(1).unwrap().to_vec1::<f32>().unwrap(), t.get(cfg.head_dim / 2).unwrap().to_vec1::<f32>().unwrap());
        let back = permute_rows(&g, Proj::Q, &cfg, Direction::GgufToHf).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
