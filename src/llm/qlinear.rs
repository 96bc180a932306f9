//! Frozen base linear layers: the weight stays in the file's own (usually 4-bit) GGML type and is
//! never modified, so adapters can be swapped without touching it.

use std::cell::OnceCell;
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};

use crate::kernels::cpu;

/// The path a prompt's projections take on CUDA (`Model::set_prompt_kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PromptKernel {
    /// By length, the fastest measured on an H100 (BENCHMARKS.md): where every projection is
    /// Q4_K or Q6_K, `F16Mma` for prompts of `F16_PREFILL_ROWS` (16-128) tokens a sequence and
    /// `DenseBf16` above; elsewhere `DenseBf16` from the dense threshold (`DENSE_PREFILL_ROWS`);
    /// candle's 4-bit kernels below.
    #[default]
    Auto,
    /// From the dense threshold: each weight dequantized to bf16 by the project's kernel, then
    /// one cuBLAS GEMM.
    DenseBf16,
    /// From the dense threshold: Q4_K weights read in place by int8 tensor-core tiles on
    /// int8-quantized activations (`kernels::int8_mma_matmul`); other weight types take the bf16
    /// GEMM. Accurate, but measured slower than `DenseBf16` on an H100 (BENCHMARKS.md): 2.2× on
    /// 512 tokens, 1.2× the time to a 100-token prompt's first token, its scaling of every
    /// product by the activations' and weights' sub-block scales bounding it by arithmetic.
    Int8Mma,
    /// From the dense threshold: Q4_K and Q6_K weights dequantized in registers onto f16
    /// tensor cores, once for all of a block's tokens (`kernels::f16_mma_matmul`); other weight
    /// types take the bf16 GEMM. Faster than `DenseBf16` on short prompts, slower on long ones.
    F16Mma,
}

/// Prompt lengths (tokens a sequence) that `PromptKernel::Auto` runs on the f16 tensor-core
/// kernel in a Q4_K/Q6_K model; longer prompts take the dense path, shorter ones candle's 4-bit
/// kernels. Measured on the H100 with the random Mistral-7B Q4_K_M mix (BENCHMARKS.md): 16
/// tokens reach their first token in 8.8 ms against 9.5 on candle's kernels; 100 tokens prefill
/// in 14.7 ms against 15.7 on the dense path and 128 tokens in 15.3-15.5 against 16.0, while
/// longer prompts, whose extra 64-token tiles each decode every weight again, lose to it (200
/// tokens: 29.2 against 17.2 ms, before the kernel's last changes).
pub const F16_PREFILL_ROWS: std::ops::RangeInclusive<usize> = 16..=128;

impl PromptKernel {
    /// The 16-bit type of the input copy this kernel's projections read (written by the kernel
    /// that produced the input, or cast once for all the weights that read it): f16 for
    /// `F16Mma`, bf16 for the dense GEMM (which `Int8Mma` falls back to for other types).
    pub fn input_dtype(self) -> DType {
        match self {
            Self::F16Mma => DType::F16,
            _ => DType::BF16,
        }
    }

    /// The kernel a prompt of `t` tokens a sequence takes (`None`: candle's 4-bit kernels):
    /// this one from `dense_rows` tokens; `Auto` in a model whose projections are all Q4_K or
    /// Q6_K on CUDA (`k_quants`) `F16Mma` over `F16_PREFILL_ROWS` and `DenseBf16` above (a
    /// dense threshold at or below the range's start puts every prompt from it on `DenseBf16`),
    /// in other models `DenseBf16` from `dense_rows`.
    pub fn for_prompt(self, t: usize, dense_rows: usize, k_quants: bool) -> Option<PromptKernel> {
        let rows = F16_PREFILL_ROWS;
        if self != Self::Auto {
            return (t >= dense_rows).then_some(self);
        }
        let dense_first = dense_rows <= *rows.start();
        if k_quants && rows.contains(&t) && !dense_first {
            return Some(Self::F16Mma);
        }
        let dense_from = if k_quants && !dense_first { rows.end() + 1 } else { dense_rows };
        (t >= dense_from).then_some(Self::DenseBf16)
    }
}

/// `y = x · Wᵀ` with `W: [out, in]` kept quantized.
#[derive(Debug, Clone)]
pub struct BaseLinear {
    weight: Arc<QTensor>,
    matmul: QMatMul,
    in_features: usize,
    out_features: usize,
}

impl BaseLinear {
    pub fn new(weight: QTensor) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let weight = Arc::new(weight);
        // Dense GGML types (F32/F16) become plain tensors inside QMatMul; 4-bit types stay packed.
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self { weight, matmul, in_features, out_features })
    }

    /// `x · Wᵀ`: on the CPU through the project's kernel where the weight's type has one
    /// (`kernels::cpu`), else through candle's quantized kernels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, true)
    }

    /// `x · Wᵀ`; with a `prompt` kernel, for long prompts where the weight's device and type
    /// have one. `DenseBf16`: one bf16 GEMM on the weight dequantized by the project's kernel,
    /// which reads the packed weight once and writes it as bf16 (≈ 4.5× its packed size in
    /// traffic) in exchange for cuBLAS instead of candle's 4-bit GEMM; bf16 inputs (`x` cast
    /// once for all the weights of a [`BaseLinear::forward_many`]), accumulated and written in f32.
    /// `Int8Mma`: Q4_K weights read in place on int8 tensor cores. With `cpu_kernel`, f32
    /// inputs on the CPU go through `kernels::cpu` where the weight's type has one.
    pub fn forward_with(&self, x: &Tensor, prompt: Option<PromptKernel>, cpu_kernel: bool) -> Result<Tensor> {
        self.forward_sharing(x, &OnceCell::new(), None, prompt, cpu_kernel)
    }

    /// `x · Wᵀ + add` (`add` shaped like the output: the residual stream), otherwise as
    /// [`BaseLinear::forward_with`] with `x_copy`, `x` in the prompt kernel's input type
    /// (`PromptKernel::input_dtype`) where the kernel that made `x` wrote it: the dense GEMM and
    /// the f16 kernel add `add` in their epilogue, so the sum costs no pass of its own.
    pub fn forward_plus(&self, x: &Tensor, x_copy: Option<&Tensor>, add: &Tensor, prompt: Option<PromptKernel>, cpu_kernel: bool) -> Result<Tensor> {
        self.forward_sharing(x, &shared_copy(x_copy), Some(add), prompt, cpu_kernel)
    }

    /// [`BaseLinear::forward_with`] plus `add` if given, with `x_copy` holding `x` in a prompt
    /// kernel's 16-bit input type once the caller, or the first weight of several reading the
    /// same `x`, made it.
    fn forward_sharing(&self, x: &Tensor, x_copy: &OnceCell<Tensor>, add: Option<&Tensor>, prompt: Option<PromptKernel>, cpu_kernel: bool) -> Result<Tensor> {
        let (y, added) = self.forward_dense_or_packed(x, x_copy, add, prompt, cpu_kernel)?;
        Ok(match add {
            Some(a) if !added => (y + a)?,
            _ => y,
        })
    }

    /// The product, and whether `add` is already in it (the dense prompt path's GEMM).
    fn forward_dense_or_packed(&self, x: &Tensor, x_copy: &OnceCell<Tensor>, add: Option<&Tensor>, prompt: Option<PromptKernel>, cpu_kernel: bool) -> Result<(Tensor, bool)> {
        if prompt == Some(PromptKernel::Int8Mma) {
            if let Some(y) = crate::kernels::int8_mma_matmul(&self.weight, x)? {
                return Ok((y, false));
            }
        }
        if prompt == Some(PromptKernel::F16Mma) && f16_kernel_reads(self.weight.dtype()) && x.device().is_cuda() && add.is_none_or(|a| a.dtype() == DType::F32) {
            let xh = input_copy(x, x_copy, DType::F16)?;
            if let Some(y) = crate::kernels::f16_mma_matmul(&[self.weight.as_ref()], &xh, add)? {
                return Ok((y, add.is_some()));
            }
        }
        if prompt.is_some() {
            if let Some(w) = crate::kernels::dequantize(&self.weight, DType::BF16)? {
                let xb = input_copy(x, x_copy, DType::BF16)?;
                if x.dtype() == DType::F32 && add.is_none_or(|a| a.dtype() == DType::F32) {
                    if let Some(y) = crate::kernels::gemm_bf16_f32(&xb, &w, add)? {
                        return Ok((y, true));
                    }
                }
                return Ok((dense_matmul(&xb, &w)?.to_dtype(x.dtype())?, false));
            }
        }
        if cpu_kernel && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && cpu::available(self.weight.dtype()) {
            return Ok((self.forward_cpu(x)?, false));
        }
        Ok((self.matmul.forward(x)?, false))
    }

    /// [`BaseLinear::forward_with`] for several weights that read the same `x` (q|k|v,
    /// gate|up): on the CPU kernel's path one quantization of `x` and one pass of the workers
    /// for all of them; the same values as one call each. `x_copy`: `x` in the prompt kernel's
    /// 16-bit input type where the kernel that made `x` wrote it too (else cast here once for
    /// all the weights).
    pub fn forward_many(ws: &[&BaseLinear], x: &Tensor, x_copy: Option<&Tensor>, prompt: Option<PromptKernel>, cpu_kernel: bool) -> Result<Vec<Tensor>> {
        let on_kernel = |w: &BaseLinear| w.in_features == ws[0].in_features && cpu::available(w.weight.dtype());
        let cpu_path = cpu_kernel && prompt.is_none() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && ws.iter().all(|w| on_kernel(w));
        if !cpu_path || ws.len() < 2 {
            let shared = shared_copy(x_copy);
            return ws.iter().map(|w| w.forward_sharing(x, &shared, None, prompt, cpu_kernel)).collect();
        }
        let k = ws[0].in_features;
        let (m, _) = crate::kernels::matmul_dims(x, k, k)?;
        let data: Vec<_> = ws.iter().map(|w| w.weight.data()).collect::<candle_core::Result<_>>()?;
        let parts: Vec<cpu::Weight> = ws.iter().zip(&data).map(|(w, bytes)| cpu::Weight { dtype: w.weight.dtype(), bytes, rows: w.out_features }).collect();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.out_features]).collect();
        {
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            with_cpu_f32(x, |xs| cpu::matmul_many(&parts, xs, k, &mut slices))?;
        }
        ws.iter().zip(outs).map(|(w, out)| Ok(Tensor::from_vec(out, crate::kernels::matmul_dims(x, k, w.out_features)?.1, &Device::Cpu)?)).collect()
    }

    /// The prompt path for several weights at once, each output a column slice of one wider
    /// result (`[.., out_i]` views, rows `Σ out_i` apart, which the prompt path's rotary and
    /// SwiGLU kernels read in place). Dense: dequantized one under the other and multiplied in
    /// one GEMM (one launch instead of a small one each, which fill the GPU worse). F16: each
    /// run of up to three consecutive weights of one type in one launch of the f16 kernel (q|k,
    /// or q|k|v where v shares their type; gate|up). Callers that add a LoRA term take
    /// [`BaseLinear::forward_many`] instead: with one GEMM a group and the LoRA terms added to
    /// its slices, an r=16 prompt ran at 10.8k tokens/s, where an earlier build with a GEMM each
    /// had run at 12.2k (BENCHMARKS.md). `None` where this path does not apply.
    pub fn forward_one_gemm(ws: &[&BaseLinear], x: &Tensor, x_copy: Option<&Tensor>, prompt: Option<PromptKernel>) -> Result<Option<Vec<Tensor>>> {
        if ws.len() < 2 || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let copy = shared_copy(x_copy);
        match prompt {
            Some(PromptKernel::DenseBf16) => {
                let packed: Vec<&QTensor> = ws.iter().map(|w| w.weight.as_ref()).collect();
                // None also where the weights' widths differ.
                let Some(w) = crate::kernels::dequantize_many(&packed, DType::BF16)? else { return Ok(None) };
                let xb = input_copy(x, &copy, DType::BF16)?;
                let Some(y) = crate::kernels::gemm_bf16_f32(&xb, &w, None)? else { return Ok(None) };
                Ok(Some(column_slices(&y, ws)?))
            }
            Some(PromptKernel::F16Mma) if x.device().is_cuda() && ws.iter().all(|w| f16_kernel_reads(w.weight.dtype())) => {
                let xh = input_copy(x, &copy, DType::F16)?;
                let mut ys = Vec::with_capacity(ws.len());
                for run in ws.chunk_by(|a, b| a.weight.dtype() == b.weight.dtype()) {
                    for group in run.chunks(3) {
                        let packed: Vec<&QTensor> = group.iter().map(|w| w.weight.as_ref()).collect();
                        // None where the weights' widths differ.
                        let Some(y) = crate::kernels::f16_mma_matmul(&packed, &xh, None)? else { return Ok(None) };
                        ys.extend(column_slices(&y, group)?);
                    }
                }
                Ok(Some(ys))
            }
            _ => Ok(None),
        }
    }

    fn forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let (m, dims) = crate::kernels::matmul_dims(x, self.in_features, self.out_features)?;
        let mut out = vec![0f32; m * self.out_features];
        let w = self.weight.data()?;
        with_cpu_f32(x, |xs| cpu::matmul(self.weight.dtype(), &w, self.out_features, xs, self.in_features, &mut out))?;
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }

    /// Row lookup, for the token embedding table (works on packed 4-bit tables too).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.matmul.embedding(ids)?)
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn dtype(&self) -> GgmlDType {
        self.weight.dtype()
    }

    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.weight
    }

    /// Dense copy of the weight, `[out, in]` f32, on the weight's device.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.weight.dequantize(&self.weight.device())?)
    }

    /// A new base linear with `delta: [out, in]` added, re-quantized to the same type.
    /// Lossy for 4-bit types: merging trades exactness for decode speed.
    pub fn merged(&self, delta: &Tensor) -> Result<Self> {
        ensure!(delta.dims() == [self.out_features, self.in_features], "merge delta shape {:?} != weight [{}, {}]", delta.dims(), self.out_features, self.in_features);
        let w = (self.dequantize()? + delta.to_device(&self.weight.device())?)?;
        Self::new(QTensor::quantize(&w, self.weight.dtype())?)
    }
}

/// The 16-bit copy of an input the prompt path shares between weights: the caller's, or made
/// by the first weight that needs it.
fn shared_copy(x_copy: Option<&Tensor>) -> OnceCell<Tensor> {
    x_copy.map_or_else(OnceCell::new, |xc| OnceCell::from(xc.clone()))
}

/// `x` in `dtype` for a prompt kernel: the copy in `shared` where it is of that type, else cast
/// now (and kept in `shared` for the next weight where it held none).
fn input_copy(x: &Tensor, shared: &OnceCell<Tensor>, dtype: DType) -> Result<Tensor> {
    if let Some(c) = shared.get().filter(|c| c.dtype() == dtype) {
        return Ok(c.clone());
    }
    let c = x.to_dtype(dtype)?;
    if shared.get().is_none() {
        let _ = shared.set(c.clone());
    }
    Ok(c)
}

/// Whether the f16 tensor-core prompt kernel reads weights of this type.
fn f16_kernel_reads(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
}

/// The outputs of `ws` as column slices of `y`, their products side by side in order.
fn column_slices(y: &Tensor, ws: &[&BaseLinear]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    ws.iter()
        .map(|w| {
            let part = y.narrow(candle_core::D::Minus1, at, w.out_features)?;
            at += w.out_features;
            Ok(part)
        })
        .collect()
}

/// `f` on the values of an f32 tensor on the CPU, in row-major order (copied first only when
/// the tensor is not contiguous).
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { anyhow::bail!("internal: expected a tensor on the CPU") };
    let start = layout.start_offset();
    f(&s.as_slice::<f32>()?[start..start + t.elem_count()])
}

/// `x · wᵀ` for `x: [.., in]` and a dense `w: [out, in]`: one GEMM over all leading rows, in the
/// inputs' dtype (the prompt path here and the training ops share it).
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let (rows, dims) = crate::kernels::matmul_dims(x, in_f, out_f)?;
    x.reshape((rows, in_f))?.matmul(&w.t()?)?.reshape(dims)
}

/// `w` dequantized to `dtype` on `device`, as a plain (untracked, contiguous) tensor. On CUDA
/// the project's kernel writes bf16/f16 straight from the packed bytes; otherwise candle
/// dequantizes (straight to f16 for half-precision callers on CUDA, instead of through an f32
/// copy twice the size).
pub fn dequantize(w: &QTensor, device: &Device, dtype: DType) -> Result<Tensor> {
    if w.device().same_device(device) {
        if let Some(t) = crate::kernels::dequantize(w, dtype)? {
            return Ok(t);
        }
    }
    let dense = match (device, dtype) {
        (Device::Cuda(_), DType::F16 | DType::BF16) => w.dequantize_f16(device)?,
        _ => w.dequantize(device)?,
    };
    Ok(dense.to_dtype(dtype)?.detach().contiguous()?)
}
