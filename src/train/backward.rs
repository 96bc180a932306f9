//! The decoder layer's backward, written out by hand for the checkpointed training pass.
//!
//! candle's autograd accumulates every gradient edge as `zeros_like` + `add`, so each
//! intermediate's gradient costs a memset and a full extra read-read-write; on the Mistral-7B
//! training step those adds alone were a third of the GPU time. The layer's graph is fixed, so
//! its backward is spelled out here: one GEMM or kernel per term, intermediates dropped as soon
//! as they are used. The autograd path (`TrainForward::accumulate` without checkpointing)
//! stays as the reference it is tested against (`tests/train_tiny.rs`).

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::forward::{attn_scale, mask_key, Ctx, GradAccum, MicroKey, Tape, TrainForward};
use super::ops;
use super::params::{LayerLora, LoraParams};
use crate::llm::model::Proj;

/// One layer's backward: the forward it differentiates and the weights it used.
pub(super) struct LayerBackward<'a, 'm> {
    pub fwd: &'a TrainForward<'m>,
    pub layer: usize,
    pub lora: &'a LayerLora,
    pub params: &'a LoraParams,
    pub key: MicroKey,
    pub ctx: &'a Ctx,
}

impl LayerBackward<'_, '_> {
    /// Adds the layer's LoRA gradients (from `dy = ∂L/∂output`, `[b, t, h]`) to `accum` and,
    /// with `need_dx`, returns `∂L/∂input`.
    pub fn run(&self, tape: Tape, dy: &Tensor, need_dx: bool, accum: &mut GradAccum) -> Result<Option<Tensor>> {
        let model = self.fwd.model;
        let cfg = model.config();
        let eps = cfg.rms_norm_eps as f32;
        let (attn_norm, ffn_norm) = model.layers()[self.layer].norms();
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (b, t, h) = dy.dims3()?;
        let n = b * t;
        let Tape { x, qs, k, v, probs, x2, gate, up, lora: saved } = tape;
        let rep = nh / nkv;

        // MLP: out = x2 + down(silu(gate) ∘ up).
        let dm = self.proj(Proj::Down, &dy.reshape((n, h))?, &saved, true, accum, None)?.context("down projection gave no input gradient")?;
        let inter = gate.dim(2)?;
        let (dg, du) = ops::silu_mul_backward(&gate.reshape((n, inter))?, &up.reshape((n, inter))?, &dm)?;
        drop((dm, gate, up));
        let dh2 = self.proj(Proj::Gate, &dg, &saved, true, accum, None)?;
        let dh2 = self.proj(Proj::Up, &du, &saved, true, accum, dh2)?.context("gate and up projections gave no input gradient")?;
        drop((dg, du));
        let dx2 = ops::rms_norm_backward(&x2, ffn_norm, eps, &dh2.reshape((b, t, h))?, Some(dy))?;
        drop((dh2, x2));

        // Attention: x2 = x + o(softmax(qs·kᵀ + mask)·v), each kv head's query heads stacked
        // along the rows ([b, kv, rep·t, ·]), as in the forward.
        let da = self.proj(Proj::O, &dx2.reshape((n, h))?, &saved, true, accum, None)?.context("o projection gave no input gradient")?;
        let d_out = da.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        drop(da);
        let stacked = |m: &Tensor| m.reshape((b, nkv, rep * t, t));
        let dprobs = d_out.matmul(&v.t()?)?;
        let dv = stacked(&probs)?.t()?.matmul(&d_out)?;
        drop((d_out, v));
        let dscores = stacked(&ops::softmax_backward(&probs, &dprobs.reshape((b, nh, t, t))?)?)?;
        drop((dprobs, probs));
        let dq = (dscores.matmul(&k)? * attn_scale(hd))?.reshape((b, nh, t, hd))?;
        let dk = dscores.t()?.matmul(&qs)?;
        drop((dscores, k, qs));
        let dq = ops::rope_backward(&dq, &self.ctx.cos, &self.ctx.sin)?;
        let dk = ops::rope_backward(&dk, &self.ctx.cos, &self.ctx.sin)?;
        // [b, heads, t, hd] → [rows, heads·hd], the projections' output layout.
        let rows = |g: Tensor| -> Result<Tensor> {
            let heads = g.dim(1)?;
            Ok(g.transpose(1, 2)?.contiguous()?.reshape((n, heads * hd))?)
        };
        let (dq, dk, dv) = (rows(dq)?, rows(dk)?, rows(dv)?);
        let dh1 = self.proj(Proj::Q, &dq, &saved, need_dx, accum, None)?;
        let dh1 = self.proj(Proj::K, &dk, &saved, need_dx, accum, dh1)?;
        let Some(dh1) = self.proj(Proj::V, &dv, &saved, need_dx, accum, dh1)? else { return Ok(None) };
        Ok(Some(ops::rms_norm_backward(&x, attn_norm, eps, &dh1.reshape((b, t, h))?, Some(&dx2))?))
    }

    /// Backward of `y = x·Wᵀ + s·(D(x)·Aᵀ)·Bᵀ` for `dy = ∂L/∂y` (`[rows, out]`): adds `∂L/∂A`
    /// and `∂L/∂B` to `accum` and, with `need_dx`, returns `sum + ∂L/∂x` (`[rows, in]`; the
    /// input gradients of projections that read the same input are summed this way, each term
    /// in the epilogue of the GEMM that makes it on CUDA); without, `sum` as it came.
    fn proj(&self, p: Proj, dy: &Tensor, saved: &[Option<(Tensor, Tensor)>; 7], need_dx: bool, accum: &mut GradAccum, sum: Option<Tensor>) -> Result<Option<Tensor>> {
        let mut sum = sum;
        if let (Some((a, b)), Some((xd, low)), Some((va, vb))) = (&self.lora[p.index()], &saved[p.index()], self.params.pair(self.layer, p)) {
            let dt = dy.dtype();
            let s = self.params.scale;
            // The forward's delta is s·low·Bᵀ.
            let dlow = ops::matmul_plus(dy, &b.to_dtype(dt)?, None, s)?; // [rows, r]
            accum.add_product(vb, &dy.t()?, low, s)?; // ∂B = s·dyᵀ·low, [out, r]
            accum.add_product(va, &dlow.t()?, xd, 1.0)?; // ∂A = dlowᵀ·D(x), [r, in]
            if need_dx {
                // Dropout's backward is the same mask on the gradient.
                let key = mask_key(self.key, self.layer, p);
                let dropout = &self.fwd.dropout;
                let a = a.to_dtype(dt)?;
                sum = Some(if dropout.p > 0.0 {
                    let term = dlow.matmul(&a)?;
                    match &sum {
                        Some(acc) => dropout.apply_add(&term, acc, key)?,
                        None => dropout.apply(&term, key)?,
                    }
                } else {
                    ops::matmul_plus(&dlow, &a, sum.as_ref(), 1.0)?
                });
            }
        }
        if need_dx {
            sum = Some(self.input_grad(p, dy, sum.as_ref())?);
        }
        Ok(sum)
    }

    /// `dy · dequant(W) + sum` for projection `p`, its weight dequantized for this product alone.
    fn input_grad(&self, p: Proj, dy: &Tensor, sum: Option<&Tensor>) -> Result<Tensor> {
        let model = self.fwd.model;
        let w = ops::dequantize(model.layers()[self.layer].proj(p).qtensor(), model.device(), dy.dtype())?;
        let (out_f, _) = w.dims2()?;
        Ok(ops::matmul_plus(&dy.reshape((dy.elem_count() / out_f, out_f))?, &w, sum, 1.0)?)
    }
}
