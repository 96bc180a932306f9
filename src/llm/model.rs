//! A Llama-family decoder (Llama, Mistral, SmolLM2) written for this project: RMSNorm, rotary
//! embeddings with the model's theta, grouped-query attention with an optional sliding window,
//! SwiGLU MLP, tied or separate output head, a KV cache and batched forward with left padding.
//!
//! Base weights are frozen [`BaseLinear`]s in GGUF layout (llama.cpp's interleaved rotary
//! convention; HF checkpoints are permuted into it at load). LoRA adapters are not part of the
//! model: every forward takes the adapter to apply, so answering can switch adapters per request.

use anyhow::{ensure, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::fused_decode::{FusedDecoder, RowKernels, MAX_ROWS};
use super::lora::{LoraAdapter, LoraPair};
use super::model_config::ModelConfig;
use super::qlinear::{BaseLinear, PromptKernel};

/// The seven linear layers of a decoder block, in PEFT's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// PEFT / HF module name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// HF module path inside a decoder layer.
    pub fn hf_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// GGUF tensor name inside `blk.{i}.`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in_features, out_features)` for this projection in a model of shape `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, cfg.intermediate_size),
            Proj::Down => (cfg.intermediate_size, h),
        }
    }
}

pub struct DecoderLayer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    projs: [BaseLinear; 7],
}

impl DecoderLayer {
    pub fn proj(&self, p: Proj) -> &BaseLinear {
        &self.projs[p.index()]
    }

    /// RMSNorm weights before attention and before the MLP.
    pub fn norms(&self) -> (&Tensor, &Tensor) {
        (&self.attn_norm, &self.ffn_norm)
    }
}

/// Per-sequence cache of rotated keys and values for every layer. Each layer's keys and values
/// live in one buffer `[batch, kv_heads, capacity, head_dim]` that grows in chunks of
/// [`KvCache::CHUNK`] positions, so a step writes its new positions in place instead of copying
/// the whole cache (and the fused CUDA decode step can write into it directly).
#[derive(Debug)]
pub struct KvCache {
    /// Empty until the first forward allocates them.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    /// Left padding of each row: keys before it are never attended to, and positions start there.
    pad: Vec<usize>,
    /// Device addresses of `layers`, filled by the fused decode step; cleared whenever the
    /// buffers are replaced.
    pub(crate) raw: Vec<(u64, u64)>,
}

impl KvCache {
    /// Positions added at a time when the buffers grow.
    pub const CHUNK: usize = 256;

    /// An empty cache for `batch` rows without padding.
    pub fn new(batch: usize) -> Self {
        Self::with_padding(vec![0; batch])
    }

    /// An empty cache whose rows are left-padded by `pad[b]` tokens.
    pub fn with_padding(pad: Vec<usize>) -> Self {
        Self { layers: Vec::new(), len: 0, capacity: 0, pad, raw: Vec::new() }
    }

    /// Tokens held, padding included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Left padding of every row.
    pub fn padding(&self) -> &[usize] {
        &self.pad
    }

    /// Position of the next token of row `b` (its real token count so far).
    pub fn next_position(&self, b: usize) -> usize {
        self.len.saturating_sub(self.pad[b])
    }

    /// Each layer's `(keys, values)` buffers, `[batch, kv_heads, capacity, head_dim]` (read in
    /// place by the fused CUDA decode step).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn buffers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// Make room for `t` more positions, keeping what is held.
    fn reserve(&mut self, cfg: &ModelConfig, t: usize, dtype: DType, device: &Device) -> Result<()> {
        let need = self.len + t;
        if need <= self.capacity && self.layers.len() == cfg.num_layers {
            return Ok(());
        }
        let cap = need.div_ceil(Self::CHUNK) * Self::CHUNK;
        let shape = (self.batch(), cfg.num_kv_heads, cap, cfg.head_dim);
        let len = self.len;
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            match old {
                Some(o) if len > 0 => {
                    let tail = Tensor::zeros((shape.0, shape.1, cap - len, shape.3), dtype, device)?;
                    Ok(Tensor::cat(&[&o.narrow(2, 0, len)?, &tail], 2)?)
                }
                _ => Ok(Tensor::zeros(shape, dtype, device)?),
            }
        };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let old = self.layers.get(i);
                Ok((grow(old.map(|l| &l.0))?, grow(old.map(|l| &l.1))?))
            })
            .collect::<Result<Vec<_>>>()?;
        self.layers = layers;
        self.capacity = cap;
        self.raw.clear();
        Ok(())
    }

    /// One cache holding the rows of every part, in order (a row that finished its own prefill
    /// joins a decoding batch). Rows stay right-aligned: a part shorter than the longest gets
    /// more left padding, which the model never attends to, so every row computes as before.
    pub fn merge(mut parts: Vec<KvCache>) -> Result<KvCache> {
        ensure!(!parts.is_empty(), "no caches to merge");
        if parts.len() == 1 {
            if let Some(only) = parts.pop() {
                return Ok(only);
            }
        }
        let layers = parts[0].layers.len();
        ensure!(layers > 0 && parts.iter().all(|p| p.layers.len() == layers), "only caches that hold tokens of the same model can be merged");
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let capacity = len.div_ceil(Self::CHUNK).max(1) * Self::CHUNK;
        let pad = parts.iter().flat_map(|p| p.pad.iter().map(move |&x| x + (len - p.len))).collect();
        // Each part's held positions, shifted right by what it lacks of `len`, inside zeros.
        let place = |t: &Tensor, part_len: usize| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let mut pieces = Vec::with_capacity(3);
            if len > part_len {
                pieces.push(Tensor::zeros((b, h, len - part_len, d), t.dtype(), t.device())?);
            }
            pieces.push(t.narrow(2, 0, part_len)?);
            if capacity > len {
                pieces.push(Tensor::zeros((b, h, capacity - len, d), t.dtype(), t.device())?);
            }
            Ok(Tensor::cat(&pieces, 2)?)
        };
        let mut merged = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for p in &parts {
                ks.push(place(&p.layers[i].0, p.len)?);
                vs.push(place(&p.layers[i].1, p.len)?);
            }
            merged.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        Ok(KvCache { layers: merged, len, capacity, pad, raw: Vec::new() })
    }

    /// Keep only the rows in `keep` (finished sequences leave a batch).
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<()> {
        if let Some(dev) = self.layers.first().map(|(k, _)| k.device().clone()) {
            let idx = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), keep.len(), &dev)?;
            for (k, v) in self.layers.iter_mut() {
                *k = k.index_select(&idx, 0)?;
                *v = v.index_select(&idx, 0)?;
            }
        }
        self.pad = keep.iter().map(|&i| self.pad[i]).collect();
        self.raw.clear();
        Ok(())
    }
}

/// The LoRA adapters of one forward call: one for every row, or one a row (a decode step
/// mixing answers of different adapters).
#[derive(Clone, Copy)]
enum RowLora<'a> {
    All(Option<&'a LoraAdapter>),
    PerRow(&'a [Option<&'a LoraAdapter>]),
}

impl<'a> RowLora<'a> {
    fn adapters(self) -> impl Iterator<Item = &'a LoraAdapter> {
        let (all, per_row) = match self {
            RowLora::All(a) => (a, &[][..]),
            RowLora::PerRow(rows) => (None, rows),
        };
        all.into_iter().chain(per_row.iter().flatten().copied())
    }
}

/// Which positions get logits: all (scoring, training) or only the last (generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

pub struct Model {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    /// `[vocab, hidden]`; also the output head when embeddings are tied.
    embed: BaseLinear,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<BaseLinear>,
    cos: Tensor,
    sin: Tensor,
    /// Decode steps take the fused CUDA path where it applies ([`FusedDecoder`]).
    fused_decode: bool,
    /// Built on the first decode step; `None` inside when the fused path does not apply.
    fused: std::sync::OnceLock<Option<FusedDecoder>>,
    /// Inputs of at least this many tokens per sequence run each projection through
    /// `prompt_kernel` (CUDA only); shorter ones use candle's 4-bit kernels, or with
    /// `PromptKernel::Auto` the f16 tensor-core kernel or the dense path (`F16_PREFILL_ROWS`).
    /// Counted per sequence, not over the batch, so a sequence's path does not depend on what
    /// it is batched with.
    dense_rows: usize,
    /// The kernel prompts' projections take (see [`Model::prompt_path`]).
    prompt_kernel: PromptKernel,
    /// How prompts attend on CUDA.
    prompt_attention: PromptAttention,
    /// Projections on the CPU use the project's kernel (`kernels::cpu`) where the weight type
    /// has one; off: candle's quantized kernels (benchmarks compare the two).
    cpu_kernels: bool,
}

/// How a prompt's attention runs on CUDA (`Model::set_prompt_attention`); the CPU always takes
/// the reference composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PromptAttention {
    /// One kernel straight from the KV cache with an online softmax (`kernels::prompt_attention`,
    /// flash attention, no score matrix, no copy of K and V). Its products take 16-bit inputs
    /// (`AttnPrecision::Half`) where the projections around it read bf16 (the dense prompt path,
    /// from `DENSE_PREFILL_ROWS` tokens), and run at about f32 precision elsewhere.
    #[default]
    Fused,
    /// The same kernel at about f32 precision whatever the projections read (its products on
    /// operands split into two tf32 halves): within f32 rounding of `Composed`, which the GPU
    /// tests check on the exact model.
    FusedF32,
    /// Candle's matmuls with the query heads of each KV head folded into the row axis, and the
    /// scale, causal mask and softmax in one kernel (`kernels::causal_softmax`): the reference
    /// the fused kernels are tested against.
    Composed,
}

impl PromptAttention {
    /// The fused kernel's precision for a prompt whose projections read bf16 inputs (`half`) or
    /// not; `None` for the composed attention.
    fn fused(self, half: bool) -> Option<crate::kernels::AttnPrecision> {
        use crate::kernels::AttnPrecision;
        match self {
            Self::Fused if half => Some(AttnPrecision::Half),
            Self::Fused | Self::FusedF32 => Some(AttnPrecision::F32),
            Self::Composed => None,
        }
    }
}

/// Default prompt length (tokens per sequence) from which prompts use the dequantize + GEMM
/// path on CUDA. Measured on the H100 with a Mistral-7B Q4_K_M file (BENCHMARKS.md): a
/// 100-token prompt reaches its first token in 21.0 ms that way against 22.4 ms on candle's
/// 4-bit kernels, and 512 tokens prefill 1.5x faster; shorter prompts, where dequantizing every
/// weight costs more than the GEMM saves, take candle's kernels or, with `PromptKernel::Auto`
/// in a Q4_K/Q6_K model, the f16 kernel (`F16_PREFILL_ROWS`) and the dense path above it.
pub const DENSE_PREFILL_ROWS: usize = 100;

impl Model {
    /// Build from named GGUF-layout tensors. `get` returns a tensor by GGUF name, or `Ok(None)`
    /// when the file has no such tensor (only `output.weight` may be missing: tied embeddings).
    pub fn from_tensors(mut cfg: ModelConfig, device: &Device, mut get: impl FnMut(&str) -> Result<Option<QTensor>>) -> Result<Self> {
        cfg.validate()?;
        let mut need = |name: &str, shape: &[usize]| -> Result<QTensor> {
            let t = get(name)?.with_context(|| format!("missing tensor `{name}`"))?;
            // GGUF dims are stored innermost-first; candle reverses them to [out, in].
            ensure!(t.shape().dims() == shape, "tensor `{name}` has shape {:?}, expected {:?} for this model config", t.shape().dims(), shape);
            Ok(t)
        };
        let h = cfg.hidden_size;
        let dense = |q: QTensor| -> Result<Tensor> { Ok(q.dequantize(device)?.to_dtype(DType::F32)?) };
        let embed = BaseLinear::new(need("token_embd.weight", &[cfg.vocab_size, h])?)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let attn_norm = dense(need(&format!("blk.{i}.attn_norm.weight"), &[h])?)?;
            let ffn_norm = dense(need(&format!("blk.{i}.ffn_norm.weight"), &[h])?)?;
            let projs = try_map7(Proj::ALL, |p| {
                let (fan_in, fan_out) = p.shape(&cfg);
                BaseLinear::new(need(&format!("blk.{i}.{}.weight", p.gguf_name()), &[fan_out, fan_in])?)
            })?;
            layers.push(DecoderLayer { attn_norm, ffn_norm, projs });
        }
        let norm = dense(need("output_norm.weight", &[h])?)?;
        let lm_head = match get("output.weight")? {
            Some(t) => {
                ensure!(t.shape().dims() == [cfg.vocab_size, h], "tensor `output.weight` has shape {:?}, expected [{}, {h}]", t.shape().dims(), cfg.vocab_size);
                Some(BaseLinear::new(t)?)
            }
            None => None,
        };
        cfg.tie_embeddings = lm_head.is_none();
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            // Activations are f32 on every backend: candle's quantized matmuls take f32 input.
            dtype: DType::F32,
            device: device.clone(),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            fused_decode: true,
            fused: Default::default(),
            dense_rows: if device.is_cuda() { DENSE_PREFILL_ROWS } else { usize::MAX },
            prompt_kernel: PromptKernel::default(),
            prompt_attention: PromptAttention::default(),
            cpu_kernels: true,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The token embedding table.
    pub fn embedding(&self) -> &BaseLinear {
        &self.embed
    }

    /// The output head (the embedding table when they are tied).
    pub fn head(&self) -> &BaseLinear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn final_norm(&self) -> &Tensor {
        &self.norm
    }

    /// Rotary cos/sin tables `[max_position, head_dim/2]`.
    pub fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Bytes of weights held on the device.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &BaseLinear| l.qtensor().storage_size_in_bytes();
        let mut n = lin(&self.embed) + self.lm_head.as_ref().map_or(0, lin);
        for l in &self.layers {
            n += l.projs.iter().map(lin).sum::<usize>() + 2 * 4 * self.cfg.hidden_size;
        }
        n
    }

    /// Weight bytes one decode step reads: every projection, the norms and the head (the
    /// embedding table itself when tied); a separate embedding table gives only a row a token.
    pub fn decode_read_bytes(&self) -> usize {
        let embed = if self.lm_head.is_some() { self.embed.qtensor().storage_size_in_bytes() } else { 0 };
        self.weight_bytes() - embed
    }

    /// A model with every base linear (embedding and head included) replaced by `f(weight)`.
    pub fn map_weights(&self, mut f: impl FnMut(&QTensor) -> Result<QTensor>) -> Result<Self> {
        let mut map = |l: &BaseLinear| BaseLinear::new(f(l.qtensor())?);
        let layers = self
            .layers
            .iter()
            .map(|l| Ok(DecoderLayer { attn_norm: l.attn_norm.clone(), ffn_norm: l.ffn_norm.clone(), projs: try_map7(Proj::ALL, |p| map(l.proj(p)))? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            embed: map(&self.embed)?,
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.as_ref().map(&mut map).transpose()?,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            fused_decode: self.fused_decode,
            fused: Default::default(),
            dense_rows: self.dense_rows,
            prompt_kernel: self.prompt_kernel,
            prompt_attention: self.prompt_attention,
            cpu_kernels: self.cpu_kernels,
        })
    }

    /// Turn the fused CUDA decode step on or off (off: every step runs candle's ops; benchmarks
    /// and parity checks compare the two).
    pub fn set_fused_decode(&mut self, on: bool) {
        self.fused_decode = on;
    }

    /// Tokens per sequence from which prompts take the prompt kernel (`usize::MAX`: never).
    pub fn set_dense_prefill_rows(&mut self, rows: usize) {
        self.dense_rows = rows;
    }

    /// The path long prompts' projections take on CUDA (see [`PromptKernel`]).
    pub fn set_prompt_kernel(&mut self, kernel: PromptKernel) {
        self.prompt_kernel = kernel;
    }

    /// The kernel a prompt of `t` tokens a sequence runs its projections through (`None`:
    /// candle's 4-bit kernels), `PromptKernel::Auto` resolved by length.
    fn prompt_path(&self, t: usize) -> Option<PromptKernel> {
        let k_quants = || self.layers.iter().all(|l| Proj::ALL.iter().all(|&p| matches!(l.proj(p).dtype(), GgmlDType::Q4K | GgmlDType::Q6K)));
        self.prompt_kernel.for_prompt(t, self.dense_rows, self.device.is_cuda() && k_quants())
    }

    /// How prompts attend on CUDA (see [`PromptAttention`]).
    pub fn set_prompt_attention(&mut self, attention: PromptAttention) {
        self.prompt_attention = attention;
    }

    /// Use the project's CPU matmul kernel where it applies (off: candle's kernels).
    pub fn set_cpu_kernels(&mut self, on: bool) {
        self.cpu_kernels = on;
    }

    /// Whether one-token steps take the fused CUDA path on this model (built on first use).
    pub fn fused_decode_active(&self) -> Result<bool> {
        Ok(self.fused_decode && self.fused_decoder()?.is_some())
    }

    /// Replay fused decode steps as CUDA graphs (the default) or launch every kernel of each
    /// step (benchmarks compare the two).
    pub fn set_decode_graphs(&self, on: bool) -> Result<()> {
        if let Some(f) = self.fused_decoder()? {
            f.set_graphs(on);
        }
        Ok(())
    }

    /// Which matvec kernels the fused decode step uses for 1 and 2 rows (see [`RowKernels`]).
    pub fn set_decode_row_kernels(&self, rows: RowKernels) -> Result<()> {
        if let Some(f) = self.fused_decoder()? {
            f.set_row_kernels(rows);
        }
        Ok(())
    }

    /// Let each kernel of the fused decode step start while the one before it finishes (on by
    /// default where the card and the build allow it: compute capability 9.0 and later).
    /// Returns whether the step's kernels overlap now.
    pub fn set_decode_overlap(&self, on: bool) -> Result<bool> {
        Ok(match self.fused_decoder()? {
            Some(f) => f.set_overlap(on),
            None => false,
        })
    }

    /// Most rows a decode step may hold while each row's output stays exactly what it is
    /// alone: any number on the CPU (every op computes a row on its own), [`MAX_ROWS`] on CUDA
    /// where the fused step applies, else 1 (candle's CUDA kernels split the work by row count).
    pub fn invariant_batch_rows(&self) -> Result<usize> {
        if !self.device.is_cuda() {
            return Ok(usize::MAX);
        }
        Ok(if self.fused_decode_active()? { MAX_ROWS } else { 1 })
    }

    /// Kernel launches of the last fused decode step, if one ran.
    pub fn fused_launches_per_step(&self) -> Option<usize> {
        self.fused.get()?.as_ref().map(FusedDecoder::launches)
    }

    fn fused_decoder(&self) -> Result<Option<&FusedDecoder>> {
        if let Some(f) = self.fused.get() {
            return Ok(f.as_ref());
        }
        let built = FusedDecoder::new(self)?;
        // Two threads may race to build it; the loser's copy is dropped.
        Ok(self.fused.get_or_init(|| built).as_ref())
    }

    /// Fold an adapter into the base weights (re-quantizing them); the model then answers as
    /// base+adapter without the adapter's per-token cost, but can no longer swap it out.
    pub fn merge_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        adapter.check_fits(&self.cfg)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = adapter.pair(i, p) {
                    let delta = pair.delta()?;
                    layer.projs[p.index()] = layer.projs[p.index()].merged(&delta).with_context(|| format!("merging layer {i} {}", p.hf_name()))?;
                }
            }
        }
        // The fused step holds the old weights' addresses.
        self.fused = Default::default();
        Ok(())
    }

    /// Run `ids: [batch, seq]` (u32) through the decoder after what `cache` holds, appending
    /// to it, every row with `adapter` (`None`: the bare base). Returns logits
    /// `[batch, seq, vocab]` or `[batch, 1, vocab]` (f32).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache, adapter: Option<&LoraAdapter>, which: Logits) -> Result<Tensor> {
        self.forward_rows(ids, cache, RowLora::All(adapter), which)
    }

    /// [`Model::forward`] with each row's own adapter (`adapters[i]` for row `i`, `None` for the
    /// bare base), so answers with different adapters share one step. Each row computes what
    /// it would alone with its adapter where [`Model::mixes_adapters`] says so.
    pub fn forward_mixed(&self, ids: &Tensor, cache: &mut KvCache, adapters: &[Option<&LoraAdapter>], which: Logits) -> Result<Tensor> {
        let b = ids.dim(0)?;
        ensure!(adapters.len() == b, "{} adapters for {b} rows", adapters.len());
        match adapters.first() {
            Some(first) if adapters.iter().all(|a| LoraAdapter::same(*a, *first)) => self.forward(ids, cache, *first, which),
            _ => self.forward_rows(ids, cache, RowLora::PerRow(adapters), which),
        }
    }

    /// Whether a step mixing rows of different adapters ([`Model::forward_mixed`]) gives each
    /// row exactly what it gets alone (up to [`Model::invariant_batch_rows`] rows): on the CPU,
    /// where the LoRA product runs row by row, and on CUDA where the fused step applies (each
    /// row reads its own adapter's A and B); not on candle's CUDA ops, which split work by row
    /// count.
    pub fn mixes_adapters(&self) -> Result<bool> {
        Ok(!self.device.is_cuda() || self.fused_decode_active()?)
    }

    fn forward_rows(&self, ids: &Tensor, cache: &mut KvCache, lora: RowLora<'_>, which: Logits) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        ensure!(cache.batch() == b, "cache holds {} rows, input has {b}", cache.batch());
        ensure!(t > 0, "empty input");
        for a in lora.adapters() {
            a.check_fits(&self.cfg)?;
        }
        let offset = cache.len;
        cache.reserve(&self.cfg, t, self.dtype, &self.device)?;
        if t == 1 && self.fused_decode {
            let per_row: Vec<Option<&LoraAdapter>> = match lora {
                RowLora::All(a) => vec![a; b],
                RowLora::PerRow(rows) => rows.to_vec(),
            };
            if let Some(logits) = self.fused_decoder()?.map(|f| f.step(self, ids, cache, &per_row)).transpose()?.flatten() {
                cache.len = offset + 1;
                return Ok(logits);
            }
        }
        let (cos, sin) = self.rotary_for(cache, t)?;
        let prompt = self.prompt_path(t);
        let mut x = self.embed.embedding(ids)?.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (h, hb) = self.norm_for(&x, &layer.attn_norm, prompt)?;
            let x2 = self.attention(layer, (&h, hb.as_ref()), &x, &cos, &sin, &cache.pad, &cache.layers[i], offset, lora, i, prompt)?;
            let (h, hb) = self.norm_for(&x2, &layer.ffn_norm, prompt)?;
            let [gate, up] = self.linears(layer, [Proj::Gate, Proj::Up], (&h, hb.as_ref()), lora, i, prompt)?;
            // SwiGLU; on the CUDA prompt path with the 16-bit copy the down projection reads.
            let pair = match prompt {
                Some(p) => crate::kernels::silu_mul_pair(&gate, &up, p.input_dtype())?,
                None => None,
            };
            let (act, act_b) = match pair {
                Some((act, act_b)) => (act, Some(act_b)),
                None => match crate::kernels::silu_mul(&gate, &up)? {
                    Some(act) => (act, None),
                    None => ((candle_nn::ops::silu(&gate)? * up)?, None),
                },
            };
            x = self.linear_plus(layer, Proj::Down, (&act, act_b.as_ref()), &x2, lora, i, prompt)?;
        }
        cache.len = offset + t;
        let x = match which {
            Logits::All => x,
            Logits::Last => x.narrow(1, t - 1, 1)?,
        };
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // The head sees one row a sequence for `Logits::Last`: dequantizing it would not pay.
        Ok(head.forward_with(&x, prompt.filter(|_| which == Logits::All), self.cpu_kernels)?.to_dtype(DType::F32)?)
    }

    /// The attention block's output added to `residual`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &DecoderLayer,
        (x, x_copy): (&Tensor, Option<&Tensor>),
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pads: &[usize],
        (k_buf, v_buf): &(Tensor, Tensor),
        offset: usize,
        lora: RowLora<'_>,
        layer_idx: usize,
        prompt: Option<PromptKernel>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let [q, k, v] = self.linears(layer, [Proj::Q, Proj::K, Proj::V], (x, x_copy), lora, layer_idx, prompt)?;
        // One row's prompt with the fused attention (CUDA): rotary embedding and cache append in
        // one kernel, whose query layout the attention kernel reads as it is (no copies).
        let precision = self.prompt_attention.fused(prompt.is_some());
        if let Some(precision) = precision.filter(|_| t > 1 && pads == [0]) {
            if let Some(q) = crate::kernels::rope_prompt(&q, &k, &v, (&self.cos, &self.sin), (k_buf, v_buf), offset, offset)? {
                let (q, k, v) = (q.transpose(1, 2)?, k_buf.narrow(2, 0, offset + t)?, v_buf.narrow(2, 0, offset + t)?);
                let (scale, window) = self.attention_scale_window();
                // With the 16-bit copy the o projection reads.
                let (out, out_b) = match crate::kernels::prompt_attention_pair(&q, &k, &v, scale as f32, window, precision, prompt.map_or(DType::BF16, PromptKernel::input_dtype))?
                {
                    Some((out, out_b)) => (out, Some(out_b.reshape((1, t, nh * hd))?)),
                    None => (self.attend(&q, &k, &v, Some(precision))?, None),
                };
                return self.linear_plus(layer, Proj::O, (&out.reshape((1, t, nh * hd))?, out_b.as_ref()), residual, lora, layer_idx, prompt);
            }
        }
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        k_buf.slice_set(&k.contiguous()?, 2, offset)?;
        v_buf.slice_set(&v.contiguous()?, 2, offset)?;
        let s = offset + t;
        // Each row attends on its own: its real queries against its own keys, exactly the
        // tensors it would have alone (the keys start after its left padding). So a row's output
        // never depends on what it is batched with, and padding is never seen by a real position.
        let mut rows = Vec::with_capacity(b);
        for (row, &pad) in pads.iter().enumerate() {
            // New positions of this row that are padding (only in a left-padded prompt).
            let skip = pad.saturating_sub(offset).min(t);
            let mut parts = Vec::with_capacity(2);
            if skip > 0 {
                // Padding positions attend to nothing: their output is zero (never NaN), and
                // their keys are outside every real row's range.
                parts.push(Tensor::zeros((1, skip, nh, hd), q.dtype(), q.device())?);
            }
            if skip < t {
                let keys = s - pad.min(s);
                let q = q.narrow(0, row, 1)?.narrow(2, skip, t - skip)?;
                let k = k_buf.narrow(0, row, 1)?.narrow(2, pad, keys)?;
                let v = v_buf.narrow(0, row, 1)?.narrow(2, pad, keys)?;
                parts.push(self.attend(&q, &k, &v, precision)?);
            }
            rows.push(Tensor::cat(&parts, 1)?);
        }
        // [b, t, heads, hd]: a copy only where a part is a transposed view.
        let out = Tensor::cat(&rows, 0)?.reshape((b, t, nh * hd))?;
        self.linear_plus(layer, Proj::O, (&out, None), residual, lora, layer_idx, prompt)
    }

    /// One row's attention: queries `[1, heads, tq, hd]` are the last `tq` of the row's `keys`
    /// positions (`k`, `v`: `[1, kv_heads, keys, hd]`, the row's first real token at index 0).
    /// Causal and sliding-window masking by position within the row; every query sees at least
    /// itself, so no softmax row is ever all −∞. With `fused`, a prompt on CUDA takes the flash
    /// attention kernel at that precision where it applies. Returns `[1, tq, heads, hd]` (the o
    /// projection's input order; a transposed view where the path computed it head-major).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, fused: Option<crate::kernels::AttnPrecision>) -> Result<Tensor> {
        let (_, nh, tq, hd) = q.dims4()?;
        let (_, nkv, keys, _) = k.dims4()?;
        let rep = nh / nkv;
        let (scale, window) = self.attention_scale_window();
        if tq == 1 && keys <= window {
            // Decode: fold the query heads sharing a KV head into one matmul per KV head, so the
            // (long) cached K/V are never copied.
            let q = q.reshape((1, nkv, rep, hd))?;
            let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            return Ok(probs.matmul(&v.contiguous()?)?.reshape((1, 1, nh, hd))?);
        }
        // Prefill. On CUDA, with a `fused` precision (`PromptAttention`), one kernel attends
        // straight from the cache where it applies (f32 tensors, a head size that is a multiple
        // of 16, or 8 for the f32 kernel, up to 128); otherwise the query heads sharing a KV
        // head fold into the row axis, as in decode (no copy of K and V per query head), with
        // the softmax, its scale and the causal mask in one kernel. Elsewhere K/V expand to every query head: folding changes gemm's
        // blocking and summation order, and SmolLM2's outlier activations amplify that rounding
        // noise into visible logit changes; the expanded layout reproduces the reference
        // implementation exactly on the CPU.
        if q.device().is_cuda() {
            if let Some(precision) = fused {
                if let Some(out) = crate::kernels::prompt_attention(q, k, v, scale as f32, window, precision)? {
                    return Ok(out);
                }
            }
            return Ok(attend_folded(q, k, v, scale, window)?.transpose(1, 2)?);
        }
        Ok(attend_expanded(q, k, v, scale, window)?.transpose(1, 2)?)
    }

    /// RMSNorm of `x` with weight `w`; on the CUDA prompt path also rounded to the prompt
    /// kernel's 16-bit input type in the same kernel (the projections' input, so they cast
    /// nothing).
    fn norm_for(&self, x: &Tensor, w: &Tensor, prompt: Option<PromptKernel>) -> Result<(Tensor, Option<Tensor>)> {
        let eps = self.cfg.rms_norm_eps as f32;
        if let Some(p) = prompt {
            if let Some((y, yb)) = crate::kernels::rms_norm_pair(x, w, eps, p.input_dtype())? {
                return Ok((y, Some(yb)));
            }
        }
        Ok((candle_nn::ops::rms_norm(x, w, eps)?, None))
    }

    /// The attention's score scale (1/√head_dim) and sliding window (`usize::MAX`: none).
    fn attention_scale_window(&self) -> (f64, usize) {
        (1.0 / (self.cfg.head_dim as f64).sqrt(), self.cfg.sliding_window.unwrap_or(usize::MAX))
    }

    /// Projections of `layer` that read the same `x` (with its 16-bit copy where the kernel that
    /// made it wrote one), each its base weight plus the adapter's unmerged LoRA path if it has
    /// one (one pass over the base weights on the CPU). With one adapter a row, each row's LoRA
    /// term is computed on that row alone and added to it.
    fn linears<const N: usize>(
        &self,
        layer: &DecoderLayer,
        projs: [Proj; N],
        (x, x_copy): (&Tensor, Option<&Tensor>),
        lora: RowLora<'_>,
        layer_idx: usize,
        prompt: Option<PromptKernel>,
    ) -> Result<[Tensor; N]> {
        let bases: Vec<&BaseLinear> = projs.iter().map(|&p| layer.proj(p)).collect();
        // Without a LoRA term to add, one GEMM for all of them where the prompt path allows.
        let one_gemm = if projs.iter().any(|&p| Self::adapted(lora, layer_idx, p)) { None } else { BaseLinear::forward_one_gemm(&bases, x, x_copy, prompt)? };
        let ys = match one_gemm {
            Some(ys) => ys,
            None => BaseLinear::forward_many(&bases, x, x_copy, prompt, self.cpu_kernels)?,
        };
        let out: Vec<Tensor> = ys
            .into_iter()
            .zip(projs)
            .map(|(y, p)| match lora {
                RowLora::All(adapter) => match adapter.and_then(|a| a.pair(layer_idx, p)) {
                    Some(pair) => Ok((y + pair.forward(x)?)?),
                    None => Ok(y),
                },
                RowLora::PerRow(adapters) => {
                    let pairs: Vec<Option<&LoraPair>> = adapters.iter().map(|a| a.and_then(|a| a.pair(layer_idx, p))).collect();
                    if pairs.iter().all(Option::is_none) {
                        return Ok(y);
                    }
                    Ok((y + LoraPair::forward_rows(&pairs, x)?)?)
                }
            })
            .collect::<Result<_>>()?;
        out.try_into().map_err(|_| anyhow::anyhow!("internal: expected {N} projections"))
    }

    /// `residual` plus projection `p` of `x` (with its adapter's LoRA term). Without a LoRA
    /// term the sum is the base weight's `forward_plus` (on the dense prompt path, the GEMM's
    /// epilogue); with one, `residual + (base + LoRA)` as the reference computes it.
    #[allow(clippy::too_many_arguments)]
    fn linear_plus(
        &self,
        layer: &DecoderLayer,
        p: Proj,
        (x, x_copy): (&Tensor, Option<&Tensor>),
        residual: &Tensor,
        lora: RowLora<'_>,
        layer_idx: usize,
        prompt: Option<PromptKernel>,
    ) -> Result<Tensor> {
        if Self::adapted(lora, layer_idx, p) {
            let [y] = self.linears(layer, [p], (x, x_copy), lora, layer_idx, prompt)?;
            return Ok((residual + y)?);
        }
        layer.proj(p).forward_plus(x, x_copy, residual, prompt, self.cpu_kernels)
    }

    /// Whether projection `p` of layer `layer_idx` has a LoRA term for some row.
    fn adapted(lora: RowLora<'_>, layer_idx: usize, p: Proj) -> bool {
        match lora {
            RowLora::All(a) => a.and_then(|a| a.pair(layer_idx, p)).is_some(),
            RowLora::PerRow(rows) => rows.iter().any(|a| a.and_then(|a| a.pair(layer_idx, p)).is_some()),
        }
    }

    /// cos/sin for the `t` new tokens of every row: `[t, hd/2]` when all rows share positions,
    /// else `[b, t, hd/2]`.
    fn rotary_for(&self, cache: &KvCache, t: usize) -> Result<(Tensor, Tensor)> {
        let start = cache.len;
        let max = self.cos.dim(0)?;
        if cache.pad.iter().all(|&p| p == 0) {
            ensure!(start + t <= max, "sequence of {} tokens exceeds the model's {max} positions", start + t);
            return Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?));
        }
        let mut pos = Vec::with_capacity(cache.batch() * t);
        for &p in &cache.pad {
            pos.extend((start..start + t).map(|i| i.saturating_sub(p) as u32));
        }
        let b = cache.batch();
        ensure!(pos.iter().all(|&p| (p as usize) < max), "sequence exceeds the model's {max} positions");
        let idx = Tensor::from_vec(pos, b * t, &self.device)?;
        let half = self.cfg.head_dim / 2;
        let cos = self.cos.index_select(&idx, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&idx, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}

/// Additive mask `[1, 1, tq, keys]` (0 or −∞) for the last `tq` of `keys` positions of one row,
/// in `like`'s dtype and device: a query sees keys at or before itself and, with a sliding
/// `window`, the last `window` of them including itself. The diagonal is always visible.
fn causal_mask(tq: usize, keys: usize, window: usize, like: &Tensor) -> Result<Tensor> {
    let first = keys - tq;
    let mut m = vec![0f32; tq * keys];
    for (qi, line) in m.chunks_mut(keys).enumerate() {
        let q_pos = first + qi;
        for (k_pos, v) in line.iter_mut().enumerate() {
            if k_pos > q_pos || q_pos - k_pos >= window {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, tq, keys), like.device())?.to_dtype(like.dtype())?)
}

/// Prompt attention of one row (see `Model::attend`) with K/V expanded to every query head:
/// the reference layout.
fn attend_expanded(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: usize) -> Result<Tensor> {
    let (_, nh, tq, _) = q.dims4()?;
    let (_, nkv, keys, _) = k.dims4()?;
    let k = repeat_kv(&k.contiguous()?, nh / nkv)?;
    let v = repeat_kv(&v.contiguous()?, nh / nkv)?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&causal_mask(tq, keys, window, q)?)?;
    Ok(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?)
}

/// Prompt attention of one row with the `rep` query heads of each KV head folded into the row
/// axis: scores `[1, kv_heads, rep·tq, keys]`, whose line `i` is query `i mod tq`, so K and V
/// are read as they are. The softmax with its scale and mask is the CUDA kernel where it
/// applies, else the composed ops on the same lines.
fn attend_folded(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: usize) -> Result<Tensor> {
    let (_, nh, tq, hd) = q.dims4()?;
    let (_, nkv, keys, _) = k.dims4()?;
    let rep = nh / nkv;
    let q = q.contiguous()?.reshape((1, nkv, rep * tq, hd))?;
    let scores = q.matmul(&k.contiguous()?.t()?)?;
    let probs = match crate::kernels::causal_softmax(&scores, tq, scale as f32, window)? {
        Some(probs) => probs,
        None => {
            let s = (scores * scale)?.reshape((1, nkv, rep, tq, keys))?;
            let s = s.broadcast_add(&causal_mask(tq, keys, window, &q)?.unsqueeze(0)?)?;
            candle_nn::ops::softmax_last_dim(&s)?.reshape((1, nkv, rep * tq, keys))?
        }
    };
    Ok(probs.matmul(&v.contiguous()?)?.reshape((1, nh, tq, hd))?)
}

/// `[b, kv_heads, s, hd]` → `[b, kv_heads * rep, s, hd]`, each KV head serving `rep` query heads.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, nkv, rep, s, hd))?.reshape((b, nkv * rep, s, hd))?)
}

/// Rotary tables `[max_position, head_dim/2]` for the interleaved (GGUF) convention.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
    let n = cfg.max_position;
    let inv = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
}

/// `[T; N]::try_map` is unstable; this is it for the fixed set of seven projections.
fn try_map7<U>(items: [Proj; 7], f: impl FnMut(Proj) -> Result<U>) -> Result<[U; 7]> {
    let v: Vec<U> = items.into_iter().map(f).collect::<Result<_>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("internal: expected 7 projections"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folding the query heads of each KV head into the row axis (the layout of CUDA prompts)
    /// gives the expanded reference layout's attention: whole prompts and prompts after a cached
    /// prefix, sliding windows shorter than the prompt, 1-4 query heads a KV head, and K/V read
    /// from a larger cache buffer as the model does (not contiguous).
    #[test]
    fn folded_prompt_attention_matches_expanded() -> Result<()> {
        let cpu = Device::Cpu;
        let none = usize::MAX;
        for (nkv, rep, tq, keys, window) in [(2, 3, 5, 5, none), (2, 3, 4, 11, none), (1, 4, 9, 9, 3), (3, 1, 7, 12, 5), (2, 2, 1, 6, 4)] {
            let q = Tensor::randn(0f32, 1.0, (1, nkv * rep, tq, 16), &cpu)?;
            let cache = |_| Tensor::randn(0f32, 1.0, (1, nkv, keys + 3, 16), &cpu).and_then(|t| t.narrow(2, 1, keys));
            let (k, v) = (cache(0)?, cache(1)?);
            let want = attend_expanded(&q, &k, &v, 0.25, window)?;
            let got = attend_folded(&q, &k, &v, 0.25, window)?;
            let diff = crate::util::compare::tensor_max_abs_diff(&want, &got)?;
            assert!(diff <= 1e-5, "{nkv} kv heads x {rep}, {tq} queries, {keys} keys, window {window}: folded differs by {diff:e}");
        }
        Ok(())
    }

    /// `Auto` sends short prompts of a K-quant model to the f16 kernel and longer ones to the
    /// dense GEMM (every one from a dense threshold set at or below the f16 range), other
    /// models' from the dense threshold; each named kernel serves from the dense threshold;
    /// shorter prompts keep candle's kernels.
    #[test]
    fn prompt_kernel_by_length() {
        use PromptKernel::*;
        let rows = crate::llm::qlinear::F16_PREFILL_ROWS;
        let (dense, lo, hi) = (DENSE_PREFILL_ROWS, *rows.start(), *rows.end());
        for (kernel, t, dense_rows, k_quants, want) in [
            (Auto, lo - 1, dense, true, None),
            (Auto, lo, dense, true, Some(F16Mma)),
            (Auto, hi, dense, true, Some(F16Mma)),
            (Auto, hi + 1, dense, true, Some(DenseBf16)),
            (Auto, dense, dense, true, Some(F16Mma)),
            (Auto, dense, hi + 1, true, Some(F16Mma)),
            (Auto, lo, 1, true, Some(DenseBf16)),
            (Auto, lo - 1, lo, true, None),
            (Auto, lo, lo, true, Some(DenseBf16)),
            (Auto, lo, dense, false, None),
            (Auto, dense - 1, dense, false, None),
            (Auto, dense, dense, false, Some(DenseBf16)),
            (DenseBf16, dense - 1, dense, true, None),
            (DenseBf16, dense, dense, true, Some(DenseBf16)),
            (F16Mma, lo, dense, true, None),
            (F16Mma, dense, dense, false, Some(F16Mma)),
            (Int8Mma, dense, dense, true, Some(Int8Mma)),
            // The CPU: no prompt kernel at any length.
            (Auto, 4096, usize::MAX, false, None),
        ] {
            assert_eq!(kernel.for_prompt(t, dense_rows, k_quants), want, "{kernel:?}, {t} tokens, dense from {dense_rows}, K-quants {k_quants}");
        }
    }
}
