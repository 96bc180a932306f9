//! Differentiable building blocks for training LoRA adapters on a frozen quantized base.
//!
//! Each op keeps candle's inference kernel for the forward pass (so a training forward costs what
//! an inference forward costs) and supplies its own backward (tensor ops on every device candle
//! supports, fused kernels on CUDA where noted below):
//!
//! * [`frozen_qmatmul`]: `x · Wᵀ` with a quantized `W`; backward gives `grad_x = grad · dequant(W)`
//!   and never a gradient for `W` (the base is frozen, and `W` is not even a graph node).
//! * [`rms_norm`]: the weight is frozen, the gradient flows to `x` only.
//! * [`softmax_last_dim`], [`rope_interleaved`].
//!
//! The fused forward kernels are private to candle-nn, so the softmax / RMSNorm / RoPE ops run
//! them on a detached copy of the input storage inside the custom op (one extra copy in, one
//! out). The backward formulas are public functions (`rms_norm_backward`, `softmax_backward`,
//! `silu_mul_backward`, `rope_backward`, `frozen_linear_backward`) shared with the hand-written
//! layer backward (`train::backward`); on CUDA the first three are fused kernels
//! (`kernels/train.cu`), elsewhere the tensor-op formulas of [`composed`].

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::quantized::QTensor;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Storage, Tensor, D};

/// Returns `x` itself when its storage can be handed to a custom op as one contiguous block
/// starting at offset 0, else a tracked contiguous copy (gradients still flow through it).
fn fresh_contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

/// Forward passes that run an untracked tensor computation (usually a fused candle-nn kernel)
/// on a copy of the op's input storage.
trait DenseForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// Wraps `storage` (contiguous from offset 0, as guaranteed by [`fresh_contiguous`]) in a detached
/// tensor, runs `op.forward` and hands back the result's storage.
fn run_detached(op: &dyn DenseForward, storage: Storage, layout: &Layout) -> Result<(Storage, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        bail!("train op: input must be contiguous from offset 0, got {layout:?}")
    }
    let x = Tensor::from_storage(storage, layout.shape().clone(), BackpropOp::none(), false);
    let y = op.forward(&x)?;
    let y = fresh_contiguous(&y)?;
    let shape = y.shape().clone();
    let (s, l) = y.storage_and_layout();
    let out = match &*s {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(l)?),
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(l)?),
        Storage::Metal(s) => Storage::Metal(s.try_clone(l)?),
    };
    Ok((out, shape))
}

/// `op` on `x` (made contiguous): as a custom op where `x` is part of a graph, and straight
/// through its forward where it is not (the checkpointed passes), which spares the custom op's
/// copies of its input and output storage.
fn apply_dense<O: DenseForward + CustomOp1 + Send + Sync + 'static>(x: &Tensor, op: O) -> Result<Tensor> {
    let x = fresh_contiguous(x)?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        op.forward(&x)
    }
}

/// Implements the three device forwards of a `CustomOp1` through [`run_detached`].
macro_rules! detached_forwards {
    () => {
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            match run_detached(self, Storage::Cpu(s.try_clone(l)?), l)? {
                (Storage::Cpu(s), shape) => Ok((s, shape)),
                _ => bail!("{}: forward left the cpu", self.name()),
            }
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            match run_detached(self, Storage::Cuda(s.try_clone(l)?), l)? {
                (Storage::Cuda(s), shape) => Ok((s, shape)),
                _ => bail!("{}: forward left the cuda device", self.name()),
            }
        }

        fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
            match run_detached(self, Storage::Metal(s.try_clone(l)?), l)? {
                (Storage::Metal(s), shape) => Ok((s, shape)),
                _ => bail!("{}: forward left the metal device", self.name()),
            }
        }
    };
}

/// Half-precision gradients are computed in f32 and cast back: the reductions in the backward
/// formulas lose too much in bf16.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen quantized linear.

/// `W` dequantized to `dtype` on `device` (one owner for it: the inference path uses it too).
pub fn dequantize(w: &QTensor, device: &candle_core::Device, dtype: DType) -> Result<Tensor> {
    crate::llm::qlinear::dequantize(w, device, dtype).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
}

struct FrozenQMatMul {
    w: Arc<QTensor>,
    /// `dequantize(w)` made by the caller and shared by several calls (the output head's, one
    /// a chunk of rows, forward and backward); `None`: dequantize per call.
    dense: Option<Tensor>,
}

impl FrozenQMatMul {
    /// The shared dense weight when it has the asked dtype, else one made for this call only
    /// (dropped right after, so no full-precision copy of the base outlives it).
    fn dense_weight(&self, device: &candle_core::Device, dtype: DType) -> Result<Tensor> {
        match &self.dense {
            Some(w) if w.dtype() == dtype => Ok(w.clone()),
            _ => dequantize(&self.w, device, dtype),
        }
    }

    /// `x · dequant(W)ᵀ` as one dense GEMM in `x`'s dtype.
    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        crate::llm::qlinear::dense_matmul(x, &self.dense_weight(x.device(), x.dtype())?)
    }

    /// Few rows (decode-like shapes) go to candle's quantized kernel, which reads the packed
    /// weight once; training batches and f64 reference inputs dequantize and run one GEMM,
    /// which on the CPU is an order of magnitude faster than the quantized dot products.
    fn use_dense(&self, dtype: DType, layout: &Layout) -> bool {
        const QUANTIZED_MAX_ROWS: usize = 8;
        let in_f = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        self.dense.is_some() || dtype == DType::F64 || layout.shape().elem_count() / in_f > QUANTIZED_MAX_ROWS
    }
}

impl DenseForward for FrozenQMatMul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dense(x)
    }
}

impl CustomOp1 for FrozenQMatMul {
    fn name(&self) -> &'static str {
        "frozen-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.use_dense(s.dtype(), l) {
            return match run_detached(self, Storage::Cpu(s.try_clone(l)?), l)? {
                (Storage::Cpu(s), shape) => Ok((s, shape)),
                _ => bail!("frozen-qmatmul: forward left the cpu"),
            };
        }
        self.w.cpu_fwd(s, l)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        if self.use_dense(s.dtype(), l) {
            return match run_detached(self, Storage::Cuda(s.try_clone(l)?), l)? {
                (Storage::Cuda(s), shape) => Ok((s, shape)),
                _ => bail!("frozen-qmatmul: forward left the cuda device"),
            };
        }
        self.w.cuda_fwd(s, l)
    }

    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        self.w.metal_fwd(s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // grad_x = grad · dequant(W), one GEMM in the gradient's dtype (cuBLAS accumulates
        // half-precision products in f32).
        let w = self.dense_weight(grad.device(), grad.dtype())?;
        Ok(Some(frozen_linear_backward(grad, &w)?.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// `alpha · a · b + add` for `a: [m, k]`, `b: [k, n]` (either may be a transposed view) and
/// `add: [m, n]`, untracked (for the passes that run without a graph): on CUDA with bf16
/// operands one cuBLASLt GEMM in `a`'s dtype with the addend summed in its epilogue (rounded
/// once, no kernel for the add), elsewhere composed ops.
pub fn matmul_plus(a: &Tensor, b: &Tensor, add: Option<&Tensor>, alpha: f64) -> Result<Tensor> {
    if let Some(y) = crate::kernels::matmul_add(a, b, add, alpha as f32, a.dtype())? {
        return Ok(y);
    }
    let y = a.matmul(b)?;
    let y = if alpha == 1.0 { y } else { (y * alpha)? };
    match add {
        Some(c) => y + c,
        None => Ok(y),
    }
}

/// `∂L/∂x` of `y = x · Wᵀ` from `grad = ∂L/∂y` (`[.., out]`) and the dense `W` (`[out, in]`),
/// as `[rows, in]`.
pub fn frozen_linear_backward(grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_f, _in_f) = w.dims2()?;
    let rows = grad.elem_count() / out_f;
    grad.reshape((rows, out_f))?.matmul(w)
}

/// `x · Wᵀ` for a frozen quantized `W` of shape `[out, in]` and `x` of shape `[.., in]`.
///
/// Forward is candle's quantized matmul for a few rows and a dense GEMM on `dequant(W)` (made
/// for this call only) for more rows and for f64 reference inputs.
/// Backward returns `grad · dequant(W)` for `x`; `W` never receives a gradient.
pub fn frozen_qmatmul(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    frozen_qmatmul_with(x, w, None)
}

/// [`frozen_qmatmul`] with `dense = dequantize(w)` made once by the caller and used by this
/// call's forward and backward (and by other calls on the same weight).
pub fn frozen_qmatmul_with(x: &Tensor, w: &Arc<QTensor>, dense: Option<&Tensor>) -> Result<Tensor> {
    let (out_f, in_f) = w.shape().dims2()?;
    let dims = x.dims();
    match dims.last() {
        Some(&k) if k == in_f => {}
        _ => bail!("frozen_qmatmul: input {:?} does not end in {in_f} (weight [{out_f}, {in_f}])", x.shape()),
    }
    if !x.device().same_device(&w.device()) {
        bail!("frozen_qmatmul: input on {:?}, weight on {:?}", x.device().location(), w.device().location())
    }
    // The quantized kernel wants at least a 2-D, contiguous input.
    let x2 = if dims.len() < 2 { x.unsqueeze(0)? } else { x.clone() };
    let x2 = fresh_contiguous(&x2)?;
    if let Some(d) = dense {
        if d.dims() != [out_f, in_f] {
            bail!("frozen_qmatmul: dense weight {:?} is not [{out_f}, {in_f}]", d.shape())
        }
    }
    let y = x2.apply_op1(FrozenQMatMul { w: w.clone(), dense: dense.cloned() })?;
    if dims.len() < 2 {
        y.squeeze(0)
    } else {
        Ok(y)
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

struct RmsNormOp {
    weight: Tensor,
    eps: f32,
}

impl RmsNormOp {
    /// Composed RMSNorm for dtypes the fused kernel does not take (f64).
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let r = (ms + self.eps as f64)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(&self.weight.to_dtype(x.dtype())?)
    }
}

impl DenseForward for RmsNormOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match x.dtype() {
            DType::F64 => self.composed(x),
            _ => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    detached_forwards!();

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        rms_norm_backward(arg, &self.weight, self.eps, grad, None).map(Some)
    }
}

/// `∂L/∂x` of `y = rms_norm(x, weight, eps)` given `grad = ∂L/∂y` (the weight is frozen), plus
/// `resid` (a gradient arriving around the norm) if given. Shared by the autograd op and the
/// hand-written layer backward; a fused kernel on CUDA.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f32, grad: &Tensor, resid: Option<&Tensor>) -> Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?;
    let grad = grad.to_dtype(x.dtype())?;
    #[cfg(feature = "cuda")]
    if has_train_kernel(x) {
        return crate::kernels::rms_norm_backward(x, &w, eps, &grad, resid);
    }
    let dx = composed::rms_norm_backward(x, &w, eps, &grad)?;
    match resid {
        Some(r) => dx + r,
        None => Ok(dx),
    }
}

/// Whether `x` goes to a fused kernel of `kernels/train.cu` (CUDA, f32/bf16/f16).
#[cfg(feature = "cuda")]
fn has_train_kernel(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The backward formulas as tensor ops: the CPU (and f64) path, and the reference the fused
/// CUDA kernels are checked against (`bench parity`).
pub mod composed {
    use super::compute_dtype;
    use candle_core::{Result, Tensor, D};

    pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f32, grad: &Tensor) -> Result<Tensor> {
        // y = x·r·w with r = (mean(x²) + eps)^-½ per row, so
        // dx = r·(g∘w) − x·r³·mean(g∘w∘x).
        let cdt = compute_dtype(x.dtype());
        let xc = x.detach().to_dtype(cdt)?;
        let gw = grad.to_dtype(cdt)?.broadcast_mul(&weight.to_dtype(cdt)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
        let dot = (&gw * &xc)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - xc.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        dx.to_dtype(x.dtype())
    }

    pub fn softmax_backward(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // dx = y ∘ (g − Σ g∘y) over the last dim, in f32 for half types. Attention scores are
        // the largest tensors of a training step ([b, heads, t, t]): their f32 temporaries are
        // made a block of rows at a time, so they stay small next to the kept activations.
        const CHUNK_ELEMS: usize = 1 << 22;
        let cdt = compute_dtype(y.dtype());
        let n = y.dim(D::Minus1)?;
        let rows = y.elem_count() / n.max(1);
        let (yf, g) = (y.detach().reshape((rows, n))?, grad.reshape((rows, n))?);
        let per = (CHUNK_ELEMS / n.max(1)).max(1);
        let mut parts = Vec::with_capacity(rows.div_ceil(per));
        for start in (0..rows).step_by(per) {
            let len = per.min(rows - start);
            let yc = yf.narrow(0, start, len)?.to_dtype(cdt)?;
            let gc = g.narrow(0, start, len)?.to_dtype(cdt)?;
            let dot = (&gc * &yc)?.sum_keepdim(D::Minus1)?;
            parts.push((yc * gc.broadcast_sub(&dot)?)?.to_dtype(y.dtype())?);
        }
        let dx = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 0)? };
        dx.reshape(y.shape())
    }

    pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = g.dtype();
        let cdt = compute_dtype(dt);
        let (g, u, dm) = (g.to_dtype(cdt)?, u.to_dtype(cdt)?, dm.to_dtype(cdt)?);
        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
        let du = (&dm * (&g * &sig)?)?;
        // silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        let dsilu = (&sig * (&g * sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
        let dg = ((dm * u)? * dsilu)?;
        Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
    }
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) * weight`, with a backward for `x`.
/// `weight` (`[hidden]`) is frozen and gets no gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    if weight.dims() != [hidden] {
        bail!("rms_norm: weight {:?} does not match input {:?}", weight.shape(), x.shape())
    }
    let weight = weight.detach().to_dtype(x.dtype())?;
    apply_dense(x, RmsNormOp { weight, eps })
}

// ---------------------------------------------------------------------------------------------
// Softmax.

struct SoftmaxOp;

impl DenseForward for SoftmaxOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match x.dtype() {
            // The fused kernel covers f64 on the cpu only; the composed one runs everywhere.
            DType::F64 => candle_nn::ops::softmax(x, D::Minus1),
            _ => candle_nn::ops::softmax_last_dim(x),
        }
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "train-softmax-last-dim"
    }

    detached_forwards!();

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        softmax_backward(res, grad).map(Some)
    }
}

/// `∂L/∂x` of `y = softmax(x)` over the last dimension, from `y` and `grad = ∂L/∂y`; a fused
/// kernel on CUDA.
pub fn softmax_backward(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let grad = grad.to_dtype(y.dtype())?;
    #[cfg(feature = "cuda")]
    if has_train_kernel(y) {
        return crate::kernels::softmax_backward(&y.detach(), &grad);
    }
    composed::softmax_backward(y, &grad)
}

/// Softmax over the last dimension with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    apply_dense(x, SoftmaxOp)
}

/// `softmax(scores + mask)` over the last axis of `scores: [.., t, t]`, where `mask` (`[t, t]`
/// broadcast) is the causal mask with a sliding `window`: one kernel on CUDA where `scores` is
/// not part of a graph (`kernels::causal_softmax`, no mask added), [`softmax_last_dim`] of the
/// masked scores otherwise.
pub fn causal_softmax(scores: &Tensor, mask: &Tensor, window: usize) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    if !scores.track_op() {
        if let Some(p) = crate::kernels::causal_softmax(scores, t, 1.0, window)? {
            return Ok(p);
        }
    }
    softmax_last_dim(&scores.broadcast_add(mask)?)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU.

/// `m = silu(g) ∘ u`: one kernel on CUDA where neither input is part of a graph (rounded once),
/// candle's two ops otherwise.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !g.track_op() && !u.track_op() {
        if let Some(m) = crate::kernels::silu_mul(g, u)? {
            return Ok(m);
        }
    }
    g.silu()? * u
}

/// `(∂L/∂g, ∂L/∂u)` of `m = silu(g) ∘ u` from `dm = ∂L/∂m` (f32 arithmetic for half types); a
/// fused kernel on CUDA.
pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let dm = dm.to_dtype(g.dtype())?;
    #[cfg(feature = "cuda")]
    if has_train_kernel(g) {
        return crate::kernels::silu_mul_backward(g, u, &dm);
    }
    composed::silu_mul_backward(g, u, &dm)
}

// ---------------------------------------------------------------------------------------------
// Interleaved RoPE.

struct RopeIOp {
    cos: Tensor,
    sin: Tensor,
}

impl DenseForward for RopeIOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_i(x, &self.cos, &self.sin)
    }
}

impl CustomOp1 for RopeIOp {
    fn name(&self) -> &'static str {
        "train-rope-i"
    }

    detached_forwards!();

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        rope_backward(grad, &self.cos, &self.sin).map(Some)
    }
}

/// `∂L/∂x` of [`rope_interleaved`] with the same `cos`/`sin`, from `grad = ∂L/∂y`.
pub fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // Each pair is rotated by an orthogonal 2×2 matrix; its transpose is the rotation by −θ,
    // i.e. the same kernel with sin negated.
    let g = grad.contiguous()?;
    let cos = cos.to_dtype(g.dtype())?.contiguous()?;
    let sin = sin.to_dtype(g.dtype())?.neg()?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&g, &cos, &sin)
}

/// Interleaved rotary embedding (pairs `(2i, 2i+1)`), the convention of
/// `candle_nn::rotary_emb::rope_i`: `x` is `[b, heads, t, hd]`, `cos`/`sin` are `[t, hd/2]` or
/// `[b, t, hd/2]`. Gradient flows to `x`; `cos`/`sin` are constants.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, _t, hd) = x.dims4()?;
    if hd % 2 != 0 {
        bail!("rope_interleaved: head dim {hd} is odd")
    }
    // The kernel wants contiguous cos/sin of the input dtype; they carry no gradient.
    let cos = cos.detach().to_dtype(x.dtype())?.contiguous()?;
    let sin = sin.detach().to_dtype(x.dtype())?.contiguous()?;
    // Shape checks against cos/sin happen in rope_i inside the op.
    apply_dense(x, RopeIOp { cos, sin })
}

/// A projection's output `x: [b, t, heads·hd]` as heads `[b, heads, t, hd]`, rotated by
/// [`rope_interleaved`] and scaled: one kernel on CUDA where `x` is not part of a graph
/// (`kernels::rope_heads`: no transposed copy, the scale folded in), composed ops otherwise.
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    if !x.track_op() {
        if let Some(y) = crate::kernels::rope_heads(x, heads, cos, sin, scale as f32)? {
            return Ok(y);
        }
    }
    let (b, t, width) = x.dims3()?;
    let y = rope_interleaved(&x.reshape((b, t, heads, width / heads.max(1)))?.transpose(1, 2)?, cos, sin)?;
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{Device, Module};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        crate::util::compare::tensor_max_abs_diff(a, b)
    }

    #[test]
    fn forwards_match_inference_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 64, &dev)?;
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-5)?, &candle_nn::ops::rms_norm(&x, &w, 1e-5)?)? < 1e-6);
        assert!(max_abs_diff(&softmax_last_dim(&x)?, &candle_nn::ops::softmax_last_dim(&x)?)? < 1e-7);

        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 16), &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let r = rope_interleaved(&q, &cos, &sin)?;
        assert!(max_abs_diff(&r, &candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?)? < 1e-7);

        let wq = Arc::new(QTensor::quantize(&Tensor::randn(0f32, 1.0, (32, 64), &dev)?, GgmlDType::Q8_0)?);
        let y = frozen_qmatmul(&x, &wq)?;
        let y_ref = QMatMul::from_arc(wq.clone())?.forward(&x)?;
        assert_eq!(y.dims(), &[2, 3, 32]);
        assert!(max_abs_diff(&y, &y_ref)? < 1e-6);
        Ok(())
    }

    /// Rows beyond one block of the softmax backward (2 blocks here), in f32, against the exact
    /// gradient: candle's composed softmax through autograd in f64. Tolerance 1e-4 of the
    /// largest gradient: f32 sums over 2^19 terms per row.
    #[test]
    fn blocked_softmax_backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, n) = (10, 1 << 19);
        let wave = |k: f64, a: f64| -> Result<Tensor> { (Tensor::arange(0u32, (rows * n) as u32, &dev)?.to_dtype(DType::F64)? * k)?.sin()? * a };
        let x64 = wave(0.37, 2.0)?.reshape((2, rows / 2, n))?;
        let w64 = wave(1.13, 1.0)?.reshape((2, rows / 2, n))?;
        let grad_of = |x: &Tensor, w: &Tensor, ours: bool| -> Result<Tensor> {
            let v = candle_core::Var::from_tensor(x)?;
            let y = if ours { softmax_last_dim(v.as_tensor())? } else { candle_nn::ops::softmax(v.as_tensor(), D::Minus1)? };
            (y * w)?.sum_all()?.backward()?.get(v.as_tensor()).expect("grad").to_dtype(DType::F64)
        };
        let exact = grad_of(&x64, &w64, false)?;
        let ours = grad_of(&x64.to_dtype(DType::F32)?, &w64.to_dtype(DType::F32)?, true)?;
        let rel = crate::util::compare::tensor_max_rel_diff(&exact, &ours, 0.0)?;
        assert!(rel <= 1e-4, "relative {rel}");
        Ok(())
    }

    #[test]
    fn shape_errors_are_reported() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 48), DType::F32, &dev)?;
        let wq = Arc::new(QTensor::quantize(&Tensor::zeros((32, 64), DType::F32, &dev)?, GgmlDType::Q8_0)?);
        assert!(frozen_qmatmul(&x, &wq).is_err());
        assert!(rms_norm(&x, &Tensor::ones(64, DType::F32, &dev)?, 1e-5).is_err());
        assert!(rope_interleaved(&x, &x, &x).is_err());
        Ok(())
    }

    #[test]
    fn non_contiguous_inputs_are_handled() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (64, 6), &dev)?.t()?; // [6, 64], strided
        let w = Tensor::ones(64, DType::F32, &dev)?;
        let want = candle_nn::ops::rms_norm(&x.contiguous()?, &w, 1e-6)?;
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-6)?, &want)? < 1e-6);
        let narrowed = Tensor::randn(0f32, 1.0, (4, 64), &dev)?.narrow(0, 1, 2)?; // offset != 0
        let want = candle_nn::ops::softmax_last_dim(&narrowed.contiguous()?)?;
        assert!(max_abs_diff(&softmax_last_dim(&narrowed)?, &want)? < 1e-7);
        Ok(())
    }
}
