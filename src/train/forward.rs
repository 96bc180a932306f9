//! The training forward and backward of the decoder with LoRA, on the frozen base of a loaded
//! [`Model`] (its 4-bit weights are borrowed, never copied or changed).
//!
//! It computes what `Model::forward` computes for a fresh sequence, but with differentiable ops
//! (`train::ops`), dropout on the LoRA inputs, and the loss only on target tokens. With gradient
//! checkpointing, the first pass runs every layer without an autograd graph and keeps only each
//! layer's input; the backward pass then recomputes one layer at a time (keeping its
//! intermediates in a `Tape`) and differentiates it by hand (`train::backward`), seeded by the
//! gradient flowing in from the layer above. Without checkpointing, candle's autograd runs over
//! the whole graph: slower and larger, it is the reference the hand-written backward is tested
//! against.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Shape, Tensor, TensorId, Var, D};

use super::backward::LayerBackward;
use super::data::Batch;
use super::dropout::{Dropout, MaskKey};
use super::ops;
use super::params::{LayerLora, LoraParams, LoraView};
use crate::llm::model::{DecoderLayer, Proj};
use crate::llm::Model;

/// Rows of the output head computed at once: bounds the `[rows, vocab]` logits and their
/// log-softmax intermediates and gradients (32000 × 128 × 4 B ≈ 16 MB each for Mistral; the
/// head's part of a training step held the step's peak memory at 256 rows).
const HEAD_CHUNK: usize = 128;

pub struct TrainForward<'m> {
    pub(super) model: &'m Model,
    pub(super) dtype: DType,
    pub(super) dropout: Dropout,
    /// Called as each part of a checkpointed micro-batch ends ([`Phase`]): a benchmark reads
    /// the device memory peaks of each part there.
    phase_end: Option<&'m (dyn Fn(Phase) + Sync)>,
}

/// The parts of a checkpointed micro-batch, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every layer without a graph, keeping each one's input.
    Forward,
    /// The head's loss and its gradient, chunk by chunk.
    Head,
    /// Each layer recomputed and differentiated, from the top.
    Backward,
}

/// Gradients summed over the micro-batches of one optimizer step, every variable's in one f32
/// buffer made once for the whole run (in `params.named_vars()` order) and added to in place.
/// Long-lived tensors allocated in the middle of a backward pass would sit between its freed
/// activations and split the allocator's free space; this buffer is allocated before any of
/// that, and zeroed in place between steps rather than made anew.
pub struct GradAccum {
    flat: Tensor,
    slot: HashMap<TensorId, usize>,
    /// Each variable's offset in `flat` and shape.
    parts: Vec<(usize, Shape)>,
}

impl GradAccum {
    /// A zeroed buffer for every variable of `params`.
    pub fn new(params: &LoraParams) -> Result<Self> {
        let vars = params.named_vars();
        let slot = vars.iter().enumerate().map(|(i, (_, v))| (v.id(), i)).collect();
        let mut parts = Vec::with_capacity(vars.len());
        let mut total = 0;
        for (_, v) in &vars {
            parts.push((total, v.shape().clone()));
            total += v.elem_count();
        }
        let device = vars.first().map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        Ok(Self { flat: Tensor::zeros(total, DType::F32, &device)?, slot, parts })
    }

    pub(super) fn add(&mut self, var: &Var, g: &Tensor) -> Result<()> {
        let i = *self.slot.get(&var.id()).context("gradient for a variable outside this accumulator")?;
        let (offset, shape) = &self.parts[i];
        ensure!(g.shape() == shape, "gradient of shape {:?} for a variable of shape {:?}", g.shape(), shape);
        let part = self.flat.narrow(0, *offset, shape.elem_count())?;
        self.flat.slice_set(&(part + g.to_dtype(DType::F32)?.flatten_all()?)?, 0, *offset)?;
        Ok(())
    }

    /// Adds `alpha · a · b` to `var`'s gradient: on CUDA with bf16 operands one GEMM summing
    /// into the buffer in place (no product tensor, cast or add), elsewhere through [`Self::add`].
    pub(super) fn add_product(&mut self, var: &Var, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
        let i = *self.slot.get(&var.id()).context("gradient for a variable outside this accumulator")?;
        let (offset, shape) = &self.parts[i];
        let slot = self.flat.narrow(0, *offset, shape.elem_count())?.reshape(shape)?;
        // The buffer is this accumulator's own: its views are handed out only by `grads`.
        if crate::kernels::matmul_accumulate(a, b, alpha as f32, &slot)? {
            return Ok(());
        }
        self.add(var, &(a.matmul(b)? * alpha)?)
    }

    /// This step's gradients in the order of `params.named_vars()` (zero where none arrived):
    /// views of the buffer, valid until [`GradAccum::zero`].
    pub fn grads(&self) -> Result<Vec<Tensor>> {
        self.parts.iter().map(|(offset, shape)| Ok(self.flat.narrow(0, *offset, shape.elem_count())?.reshape(shape)?)).collect()
    }

    /// The global L2 norm of this step's gradients, summed in slices of the buffer (no
    /// temporary as large as the gradients) and over the slices in f64, in one device read.
    pub fn norm(&self) -> Result<f64> {
        const SLICE: usize = 1 << 22;
        let n = self.flat.elem_count();
        let sums = (0..n.div_ceil(SLICE)).map(|i| self.flat.narrow(0, i * SLICE, SLICE.min(n - i * SLICE))?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        let sums = Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(sums.iter().sum::<f64>().sqrt())
    }

    /// Start the next step from zero, in place.
    pub fn zero(&mut self) -> Result<()> {
        Ok(self.flat.zero_set()?)
    }
}

/// Position of a micro-batch in the run, for dropout masks.
#[derive(Debug, Clone, Copy)]
pub struct MicroKey {
    pub step: u64,
    pub micro: u64,
}

impl<'m> TrainForward<'m> {
    pub fn new(model: &'m Model, dtype: DType, dropout: Dropout) -> Self {
        Self { model, dtype, dropout, phase_end: None }
    }

    /// Call `f` as each [`Phase`] of a checkpointed micro-batch ends.
    pub fn with_phase_ends(self, f: &'m (dyn Fn(Phase) + Sync)) -> Self {
        Self { phase_end: Some(f), ..self }
    }

    fn end(&self, phase: Phase) {
        if let Some(f) = self.phase_end {
            f(phase)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sum of the target tokens' negative log-likelihood (no graph, no dropout): evaluation.
    pub fn loss_sum(&self, lora: Option<&LoraView>, batch: &Batch) -> Result<f64> {
        Ok(self.row_nll(lora, batch)?.iter().sum())
    }

    /// Each row's sum of target-token negative log-likelihoods, i.e. minus the log-probability
    /// of its target tokens (no graph, no dropout). `lora: None` is the bare base: the
    /// reference model of preference training.
    pub fn row_nll(&self, lora: Option<&LoraView>, batch: &Batch) -> Result<Vec<f64>> {
        let fwd = TrainForward { dropout: Dropout::off(), ..*self };
        let ctx = fwd.context(batch)?;
        let mut x = fwd.embed(batch)?;
        let key = MicroKey { step: 0, micro: 0 };
        let none = LayerLora::default();
        for i in 0..self.model.layers().len() {
            let layer_lora = lora.and_then(|l| l.layers.get(i)).unwrap_or(&none);
            x = fwd.layer(i, &x, layer_lora, lora.map_or(0.0, |l| l.scale), key, &ctx)?.0;
        }
        let mut rows = vec![0.0; batch.rows];
        for (pos, next, chunk) in ctx.head_chunks()? {
            ctx.add_rows(&mut rows, chunk, &fwd.head_nll(&x, &pos, &next)?)?;
        }
        Ok(rows)
    }

    /// Forward and backward of one micro-batch; adds `∂(nll_sum / denom)/∂θ` to `accum` and
    /// returns the micro-batch's NLL sum.
    pub fn accumulate(&self, params: &LoraParams, batch: &Batch, key: MicroKey, denom: f64, checkpointing: bool, accum: &mut GradAccum) -> Result<f64> {
        ensure!(denom > 0.0, "no target tokens in this step");
        Ok(self.accumulate_rows(params, batch, key, RowLoss::Mean(denom), checkpointing, accum)?.iter().sum())
    }

    /// Forward and backward of one micro-batch for a loss that is a function of the rows' NLL
    /// sums: adds `Σ_rows c_row · ∂nll_row/∂θ` to `accum`, where `c` is `1/denom` for
    /// [`RowLoss::Mean`] and `∂loss/∂nll_row` as [`RowLoss::Weighted`] computes it from the
    /// rows' NLLs of this very forward (same dropout masks). Returns the rows' NLL sums.
    pub fn accumulate_rows(&self, params: &LoraParams, batch: &Batch, key: MicroKey, loss: RowLoss, checkpointing: bool, accum: &mut GradAccum) -> Result<Vec<f64>> {
        let ctx = self.context(batch)?;
        if checkpointing {
            self.accumulate_checkpointed(params, key, loss, &ctx, accum)
        } else {
            self.accumulate_whole(params, key, loss, &ctx, accum)
        }
    }

    fn accumulate_whole(&self, params: &LoraParams, key: MicroKey, loss: RowLoss, ctx: &Ctx, accum: &mut GradAccum) -> Result<Vec<f64>> {
        let mut x = self.embed(&ctx.batch)?;
        for i in 0..self.model.layers().len() {
            x = self.layer(i, &x, &params.layer(i, true), params.scale, key, ctx)?.0;
        }
        let mut rows = vec![0.0; ctx.batch.rows];
        let mut chunks = Vec::new();
        for (pos, next, chunk) in ctx.head_chunks()? {
            let nll = self.head_nll(&x, &pos, &next)?;
            ctx.add_rows(&mut rows, chunk, &nll)?;
            chunks.push((chunk, nll));
        }
        ensure!(!chunks.is_empty(), "batch has no target tokens");
        let coef = loss.coefficients(&rows)?;
        let mut total: Option<Tensor> = None;
        for (chunk, nll) in chunks {
            let weighted = (nll * ctx.position_weights(chunk, &coef, nll_dtype(self.dtype))?)?.sum_all()?;
            total = Some(match total {
                Some(l) => (l + weighted)?,
                None => weighted,
            });
        }
        let grads = total.context("batch has no target tokens")?.backward()?;
        for (_, var) in params.named_vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                accum.add(var, g)?;
            }
        }
        Ok(rows)
    }

    fn accumulate_checkpointed(&self, params: &LoraParams, key: MicroKey, loss: RowLoss, ctx: &Ctx, accum: &mut GradAccum) -> Result<Vec<f64>> {
        let n_layers = self.model.layers().len();
        // Pass 1: no graph; keep each layer's input, all in one buffer allocated up front (kept
        // one by one, they would split the free space the layers' transients leave behind).
        let mut x = self.embed(&ctx.batch)?;
        let (b, t, h) = x.dims3()?;
        let inputs = Tensor::zeros((n_layers, b, t, h), self.dtype, x.device())?;
        for i in 0..n_layers {
            inputs.slice_set(&x.unsqueeze(0)?.contiguous()?, 0, i)?;
            x = self.layer(i, &x, &params.layer(i, false), params.scale, key, ctx)?.0;
        }
        self.end(Phase::Forward);
        // Head, chunk by chunk: each chunk's graph lives only for its own backward.
        let flat = x.reshape((b * t, h))?;
        let mut grad = flat.zeros_like()?.to_dtype(DType::F32)?;
        let mut rows_nll = vec![0.0; b];
        // One dequantized head for every chunk's forward and backward.
        let head = ops::dequantize(self.model.head().qtensor(), self.model.device(), self.dtype)?;
        let chunks = ctx.head_chunks()?;
        // A loss that depends on the rows' NLLs needs them all before any chunk's backward:
        // one extra pass over the head without a graph.
        let coef = match &loss {
            RowLoss::Mean(_) => loss.coefficients(&rows_nll)?,
            RowLoss::Weighted(_) => {
                let mut pre = vec![0.0; b];
                for (pos, next, chunk) in &chunks {
                    let rows = flat.index_select(pos, 0)?;
                    ctx.add_rows(&mut pre, *chunk, &self.head_rows_nll(&rows, next, Some(&head))?)?;
                }
                loss.coefficients(&pre)?
            }
        };
        for (pos, next, chunk) in chunks {
            let rows = Var::from_tensor(&flat.index_select(&pos, 0)?)?;
            let nll = self.head_rows_nll(rows.as_tensor(), &next, Some(&head))?;
            ctx.add_rows(&mut rows_nll, chunk, &nll)?;
            let weighted = (nll * ctx.position_weights(chunk, &coef, nll_dtype(self.dtype))?)?.sum_all()?;
            let grads = weighted.backward()?;
            let g = grads.get(rows.as_tensor()).context("no gradient reached the last hidden state")?;
            grad = grad.index_add(&pos, &g.to_dtype(DType::F32)?, 0)?;
        }
        let mut grad = grad.reshape((b, t, h))?.to_dtype(self.dtype)?;
        drop((x, head));
        self.end(Phase::Head);
        // Pass 2: layer by layer from the top, recomputed (no graph) and differentiated by
        // hand (`backward.rs`), seeded by the gradient flowing in from the layer above. Each
        // projection dequantizes its weight where it is used, in the recompute and again in
        // the backward: one more dequantization of the layer's weights, instead of holding
        // all seven dense through both (0.44 GB in bf16 for a Mistral-7B layer).
        for i in (0..n_layers).rev() {
            let input = inputs.get(i)?;
            let lora = params.layer(i, false);
            let tape = self.recompute(i, &input, &lora, params.scale, key, ctx)?;
            let back = LayerBackward { fwd: self, layer: i, lora: &lora, params, key, ctx };
            let dx = back.run(tape, &grad, i > 0, accum)?;
            if let Some(dx) = dx {
                grad = dx;
            }
            crate::llm::device::trim_pool(self.model.device());
        }
        self.end(Phase::Backward);
        Ok(rows_nll)
    }

    fn context(&self, batch: &Batch) -> Result<Ctx> {
        let dev = self.model.device();
        let t = batch.len;
        let cfg = self.model.config();
        ensure!(t <= cfg.max_position, "sequence of {t} tokens exceeds the model's {} positions", cfg.max_position);
        let (cos, sin) = self.model.rope_tables();
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        let mut m = vec![0f32; t * t];
        for q in 0..t {
            for k in 0..t {
                if k > q || q - k >= window {
                    m[q * t + k] = f32::NEG_INFINITY;
                }
            }
        }
        let (pos, next) = batch.predictions();
        Ok(Ctx {
            batch: batch.clone(),
            cos: cos.narrow(0, 0, t)?.to_dtype(self.dtype)?,
            sin: sin.narrow(0, 0, t)?.to_dtype(self.dtype)?,
            mask: Tensor::from_vec(m, (1, 1, t, t), dev)?.to_dtype(self.dtype)?,
            pos,
            next,
        })
    }

    fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let ids = Tensor::from_vec(batch.ids.clone(), (batch.rows, batch.len), self.model.device())?;
        Ok(self.model.embedding().embedding(&ids)?.to_dtype(self.dtype)?.detach())
    }

    /// Decoder layer `i`, and the intermediates its hand-written backward needs
    /// ([`Tape`]; the autograd paths drop it).
    pub(super) fn layer(&self, i: usize, x: &Tensor, lora: &LayerLora, scale: f64, key: MicroKey, ctx: &Ctx) -> Result<(Tensor, Tape)> {
        let (out, tape) = self.layer_parts(i, x, lora, scale, key, ctx, true)?;
        Ok((out.context("the layer's output was asked for")?, tape))
    }

    /// Layer `i` recomputed for its backward: the [`Tape`] alone. The backward never reads the
    /// layer's output, so the down projection's base product (a quarter of the layer's weights)
    /// and its LoRA delta are not computed; its LoRA input and `input·Aᵀ` still are.
    pub(super) fn recompute(&self, i: usize, x: &Tensor, lora: &LayerLora, scale: f64, key: MicroKey, ctx: &Ctx) -> Result<Tape> {
        Ok(self.layer_parts(i, x, lora, scale, key, ctx, false)?.1)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_parts(&self, i: usize, x: &Tensor, lora: &LayerLora, scale: f64, key: MicroKey, ctx: &Ctx, output: bool) -> Result<(Option<Tensor>, Tape)> {
        let layer = &self.model.layers()[i];
        let cfg = self.model.config();
        let eps = cfg.rms_norm_eps as f32;
        let (attn_norm, ffn_norm) = layer.norms();
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut saved: [Option<(Tensor, Tensor)>; 7] = Default::default();
        let mut proj = |p: Proj, x: &Tensor, residual: Option<&Tensor>| -> Result<Tensor> {
            let (y, low) = self.proj(layer, p, x, &lora[p.index()], scale, mask_key(key, i, p), residual)?;
            saved[p.index()] = low;
            Ok(y)
        };

        let h1 = ops::rms_norm(x, attn_norm, eps)?;
        // Scale q rather than the scores: the graph keeps a [t, hd] tensor instead of a [t, t] one.
        let q = ops::rope_heads(&proj(Proj::Q, &h1, None)?, nh, &ctx.cos, &ctx.sin, attn_scale(hd))?;
        let k = ops::rope_heads(&proj(Proj::K, &h1, None)?, nkv, &ctx.cos, &ctx.sin, 1.0)?;
        let v = proj(Proj::V, &h1, None)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        // Grouped-query attention without copying k/v per query head: the `rep` query heads of
        // one kv head are stacked along the rows, [b, kv, rep·t, hd], so each kv head is one
        // batched GEMM operand (and its gradient sums over its query heads by itself).
        let rep = nh / nkv;
        let v = v.contiguous()?;
        let qs = q.reshape((b, nkv, rep * t, hd))?;
        let scores = qs.matmul(&k.t()?)?.reshape((b, nh, t, t))?;
        let probs = ops::causal_softmax(&scores, &ctx.mask, cfg.sliding_window.unwrap_or(usize::MAX))?;
        let attn = probs.reshape((b, nkv, rep * t, t))?.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let x2 = proj(Proj::O, &attn, Some(x))?;

        let h2 = ops::rms_norm(&x2, ffn_norm, eps)?;
        let gate = proj(Proj::Gate, &h2, None)?;
        let up = proj(Proj::Up, &h2, None)?;
        let down = Proj::Down;
        let out = if output {
            let m = ops::silu_mul(&gate, &up)?;
            Some(proj(down, &m, Some(&x2))?)
        } else {
            if lora[down.index()].is_some() {
                let m = ops::silu_mul(&gate, &up)?;
                saved[down.index()] = self.lora_low(&m, &lora[down.index()], mask_key(key, i, down))?;
            }
            None
        };
        let tape = Tape { x: x.clone(), qs, k, v, probs, x2, gate, up, lora: saved };
        Ok((out, tape))
    }

    /// Base projection plus `scale · dropout(x)·Aᵀ·Bᵀ` (plus `residual`, of the output's shape,
    /// where given), and for LoRA `(dropout(x), dropout(x)·Aᵀ)` as `[rows, in]` / `[rows, r]`
    /// for the backward. A and B are f32 variables; they are cast to the activation dtype inside
    /// the graph, so their gradients arrive in f32.
    ///
    /// Without a graph (the checkpointed passes, evaluation) the sums are GEMM epilogues
    /// ([`ops::matmul_plus`]): the LoRA product adds the residual, the base product adds that.
    #[allow(clippy::too_many_arguments)]
    fn proj(
        &self,
        layer: &DecoderLayer,
        p: Proj,
        x: &Tensor,
        lora: &Option<(Tensor, Tensor)>,
        scale: f64,
        key: MaskKey,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let graph = x.track_op() || lora.as_ref().is_some_and(|(a, b)| a.track_op() || b.track_op());
        if !graph {
            return self.proj_untracked(layer, p, x, lora, scale, key, residual);
        }
        let y = ops::frozen_qmatmul(x, layer.proj(p).qtensor())?;
        let y = match residual {
            Some(r) => (r + y)?,
            None => y,
        };
        let (Some((_, b)), Some((xd, low))) = (lora, self.lora_low(x, lora, key)?) else {
            return Ok((y, None));
        };
        // The scale goes on B ([out, r]), not on the [rows, out] product.
        let delta = low.matmul(&(b * scale)?.to_dtype(self.dtype)?.t()?)?;
        let (_, out_dims) = crate::kernels::matmul_dims(x, x.dim(D::Minus1)?, delta.dim(1)?)?;
        Ok(((y + delta.reshape(out_dims)?)?, Some((xd, low))))
    }

    /// [`Self::proj`] without a graph: `x·Wᵀ + (scale·low·Bᵀ + residual)`, two GEMMs and no add.
    #[allow(clippy::too_many_arguments)]
    fn proj_untracked(
        &self,
        layer: &DecoderLayer,
        p: Proj,
        x: &Tensor,
        lora: &Option<(Tensor, Tensor)>,
        scale: f64,
        key: MaskKey,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let w = layer.proj(p).qtensor();
        let (out_f, in_f) = w.shape().dims2()?;
        let (rows, out_dims) = crate::kernels::matmul_dims(x, in_f, out_f)?;
        let residual = residual.map(|r| r.reshape((rows, out_f))).transpose()?;
        let (add, low) = match (lora, self.lora_low(x, lora, key)?) {
            (Some((_, b)), Some((xd, low))) => {
                let term = ops::matmul_plus(&low, &b.to_dtype(self.dtype)?.t()?, residual.as_ref(), scale)?;
                (Some(term), Some((xd, low)))
            }
            _ => (residual, None),
        };
        let dense = ops::dequantize(w, x.device(), self.dtype)?;
        let y = ops::matmul_plus(&x.reshape((rows, in_f))?, &dense.t()?, add.as_ref(), 1.0)?;
        Ok((y.reshape(out_dims)?, low))
    }

    /// A LoRA term's `(dropout(x), dropout(x)·Aᵀ)` as `[rows, in]` / `[rows, r]`; `None`
    /// without one.
    fn lora_low(&self, x: &Tensor, lora: &Option<(Tensor, Tensor)>, key: MaskKey) -> Result<Option<(Tensor, Tensor)>> {
        let Some((a, _)) = lora else { return Ok(None) };
        let in_f = x.dim(D::Minus1)?;
        let xd = self.dropout.apply(x, key)?.reshape((x.elem_count() / in_f, in_f))?;
        let low = xd.matmul(&a.to_dtype(self.dtype)?.t()?)?;
        Ok(Some((xd, low)))
    }

    /// NLL of each target row `pos` of the final hidden state `x: [b, t, h]` (`[rows]`).
    fn head_nll(&self, x: &Tensor, pos: &Tensor, next: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let rows = x.reshape((b * t, h))?.index_select(pos, 0)?;
        self.head_rows_nll(&rows, next, None)
    }

    fn head_rows_nll(&self, rows: &Tensor, next: &Tensor, dense_head: Option<&Tensor>) -> Result<Tensor> {
        let h = ops::rms_norm(rows, self.model.final_norm(), self.model.config().rms_norm_eps as f32)?;
        // Log-softmax over the vocabulary in f32 at least (f64 stays f64 for reference checks).
        let logits = ops::frozen_qmatmul_with(&h, self.model.head().qtensor(), dense_head)?;
        let logits = logits.to_dtype(nll_dtype(logits.dtype()))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&next.unsqueeze(1)?, 1)?;
        Ok(picked.squeeze(1)?.neg()?)
    }
}

/// What a layer's hand-written backward needs from its forward (tensors the forward made
/// anyway; keeping them costs no extra compute).
pub(super) struct Tape {
    /// The layer input `[b, t, h]`.
    pub x: Tensor,
    /// Rotated, scaled queries `[b, kv_heads, rep·t, hd]` (the query heads of each kv head
    /// stacked), rotated keys and the values `[b, kv_heads, t, hd]`.
    pub qs: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention probabilities `[b, heads, t, t]`.
    pub probs: Tensor,
    /// The residual stream after attention `[b, t, h]`.
    pub x2: Tensor,
    /// MLP gate and up projections `[b, t, inter]`.
    pub gate: Tensor,
    pub up: Tensor,
    /// Per projection with LoRA: its dropped-out input `[rows, in]` and `input·Aᵀ` `[rows, r]`.
    pub lora: [Option<(Tensor, Tensor)>; 7],
}

pub(super) fn mask_key(key: MicroKey, layer: usize, p: Proj) -> MaskKey {
    MaskKey { step: key.step, micro: key.micro, layer: layer as u64, proj: p.index() as u64 }
}

/// `1/√hd`, the attention's score scale (applied to q).
pub(super) fn attn_scale(hd: usize) -> f64 {
    1.0 / (hd as f64).sqrt()
}

/// Per-micro-batch constants.
pub(super) struct Ctx {
    batch: Batch,
    pub cos: Tensor,
    pub sin: Tensor,
    mask: Tensor,
    pos: Vec<u32>,
    next: Vec<u32>,
}

impl Ctx {
    /// Target rows and their next tokens in chunks of [`HEAD_CHUNK`], as device tensors, with
    /// each chunk's index.
    fn head_chunks(&self) -> Result<Vec<(Tensor, Tensor, usize)>> {
        let dev = self.mask.device();
        self.pos.chunks(HEAD_CHUNK).zip(self.next.chunks(HEAD_CHUNK)).enumerate().map(|(c, (p, n))| Ok((Tensor::new(p, dev)?, Tensor::new(n, dev)?, c))).collect()
    }

    /// The batch rows of chunk `chunk`'s target positions.
    fn chunk_rows(&self, chunk: usize) -> impl Iterator<Item = usize> + '_ {
        self.pos.chunks(HEAD_CHUNK).nth(chunk).unwrap_or(&[]).iter().map(|&p| p as usize / self.batch.len.max(1))
    }

    /// Adds chunk `chunk`'s per-position NLLs to their rows' sums.
    fn add_rows(&self, rows: &mut [f64], chunk: usize, nll: &Tensor) -> Result<()> {
        let values = nll.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (row, v) in self.chunk_rows(chunk).zip(values) {
            rows[row] += v;
        }
        Ok(())
    }

    /// Each of chunk `chunk`'s positions weighted by its row's coefficient, as a `[rows]` tensor.
    fn position_weights(&self, chunk: usize, coef: &[f64], dtype: DType) -> Result<Tensor> {
        let w: Vec<f64> = self.chunk_rows(chunk).map(|r| coef[r]).collect();
        let n = w.len();
        Ok(Tensor::from_vec(w, n, self.mask.device())?.to_dtype(dtype)?)
    }
}

/// How a micro-batch's loss is made of its rows' NLL sums (see [`TrainForward::accumulate_rows`]).
pub enum RowLoss<'a> {
    /// `Σ nll / denom`: supervised fine-tuning, normalised by the step's target tokens.
    Mean(f64),
    /// `∂loss/∂nll_row` for every row, from the rows' NLL sums (preference training).
    Weighted(&'a dyn Fn(&[f64]) -> Result<Vec<f64>>),
}

impl RowLoss<'_> {
    fn coefficients(&self, rows_nll: &[f64]) -> Result<Vec<f64>> {
        match self {
            RowLoss::Mean(denom) => {
                ensure!(*denom > 0.0, "no target tokens in this step");
                Ok(vec![1.0 / denom; rows_nll.len()])
            }
            RowLoss::Weighted(f) => {
                let c = f(rows_nll)?;
                ensure!(c.len() == rows_nll.len(), "the loss gave {} coefficients for {} rows", c.len(), rows_nll.len());
                Ok(c)
            }
        }
    }
}

/// The dtype the head's log-softmax (and so its NLL) is computed in.
fn nll_dtype(activations: DType) -> DType {
    if activations == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::lora::AdapterConfig;
    use crate::llm::ModelConfig;

    /// The accumulator sums what it is given per variable, reports the global norm of the sums,
    /// and starts again from zero in place.
    #[test]
    fn gradient_buffer_sums_reports_the_norm_and_zeroes() -> Result<()> {
        let cfg = ModelConfig::preset("tiny")?;
        let params = LoraParams::init(&cfg, AdapterConfig::new(2, 4.0, 0.0, &Proj::ALL, "tiny", false), 1, &candle_core::Device::Cpu)?;
        let vars: Vec<Var> = params.named_vars().into_iter().map(|(_, v)| v.clone()).collect();
        let mut acc = GradAccum::new(&params)?;
        let (first, last) = (&vars[0], &vars[vars.len() - 1]);
        let ones = |v: &Var, k: f64| -> Result<Tensor> { Ok((Tensor::ones(v.shape(), DType::F32, v.device())? * k)?) };
        acc.add(first, &ones(first, 1.0)?)?;
        acc.add(first, &ones(first, 2.0)?)?;
        acc.add(last, &ones(last, -0.5)?)?;
        assert!(acc.add(first, &Tensor::zeros(7, DType::F32, first.device())?).is_err(), "a gradient of the wrong shape is refused");
        let grads = acc.grads()?;
        assert_eq!(grads.len(), vars.len());
        assert_eq!(grads[0].flatten_all()?.to_vec1::<f32>()?, vec![3.0; first.elem_count()]);
        assert_eq!(grads[grads.len() - 1].flatten_all()?.to_vec1::<f32>()?, vec![-0.5; last.elem_count()]);
        for g in &grads[1..grads.len() - 1] {
            assert!(g.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
        }
        let want = (9.0 * first.elem_count() as f64 + 0.25 * last.elem_count() as f64).sqrt();
        let norm = acc.norm()?;
        assert!((norm - want).abs() <= 1e-9 * want, "norm {norm} vs {want}");
        // A product summed into one variable's gradient, the others untouched.
        let (rows, cols) = first.dims2()?;
        let a = Tensor::randn(0f32, 1.0, (rows, 5), first.device())?;
        let b = Tensor::randn(0f32, 1.0, (5, cols), first.device())?;
        acc.add_product(first, &a, &b.t()?.contiguous()?.t()?, 0.5)?;
        let want: Vec<f32> = ((a.matmul(&b)? * 0.5)? + 3.0)?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = acc.grads()?[0].flatten_all()?.to_vec1()?;
        assert!(crate::util::compare::max_abs_diff(&want, &got) <= 1e-5, "{want:?} vs {got:?}");
        assert_eq!(acc.grads()?[grads.len() - 1].flatten_all()?.to_vec1::<f32>()?, vec![-0.5; last.elem_count()]);
        assert!(acc.add_product(first, &a, &a.t()?, 1.0).is_err(), "a product of the wrong shape is refused");
        acc.zero()?;
        assert_eq!(acc.norm()?, 0.0);
        assert!(acc.grads()?.iter().all(|g| g.flatten_all().and_then(|t| t.to_vec1::<f32>()).is_ok_and(|v| v.iter().all(|&x| x == 0.0))));
        Ok(())
    }
}
