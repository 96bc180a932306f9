//! Frozen base linear layers: the weight stays in the file's own (usually 4-bit) GGML type and is
//! never modified, so adapters can be swapped without touching it.

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

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

    /// `x · Wᵀ` through candle's quantized kernels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.matmul.forward(x)?)
    }

    /// `x · Wᵀ`; with `dense`, as one bf16 GEMM on the weight dequantized by the project's
    /// kernel, where the weight's device and type have one. That reads the packed weight once
    /// and writes it as bf16 (≈ 4.5× its packed size in traffic) in exchange for cuBLAS instead
    /// of candle's 4-bit GEMM, which wins for long prompts. The output is rounded like the rest
    /// of the path: f32 out, bf16 inputs.
    pub fn forward_maybe_dense(&self, x: &Tensor, dense: bool) -> Result<Tensor> {
        if dense {
            if let Some(w) = kernel_dequantize(&self.weight, DType::BF16)? {
                return Ok(dense_matmul(&x.to_dtype(DType::BF16)?, &w)?.to_dtype(x.dtype())?);
            }
        }
        self.forward(x)
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

/// `x · wᵀ` for `x: [.., in]` and a dense `w: [out, in]`: one GEMM over all leading rows, in the
/// inputs' dtype (the prompt path here and the training ops share it).
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / in_f;
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    if let Some(last) = dims.last_mut() {
        *last = out_f;
    }
    y.reshape(dims)
}

/// `w` dequantized by the project's CUDA kernel to `dtype`, where one exists for its type.
fn kernel_dequantize(w: &QTensor, dtype: DType) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return Ok(crate::kernels::dequantize(w, dtype)?);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (w, dtype);
        Ok(None)
    }
}

/// `w` dequantized to `dtype` on `device`, as a plain (untracked, contiguous) tensor. On CUDA
/// the project's kernel writes bf16/f16 straight from the packed bytes; otherwise candle
/// dequantizes (straight to f16 for half-precision callers on CUDA, instead of through an f32
/// copy twice the size).
pub fn dequantize(w: &QTensor, device: &Device, dtype: DType) -> Result<Tensor> {
    if w.device().same_device(device) {
        if let Some(t) = kernel_dequantize(w, dtype)? {
            return Ok(t);
        }
    }
    let dense = match (device, dtype) {
        (Device::Cuda(_), DType::F16 | DType::BF16) => w.dequantize_f16(device)?,
        _ => w.dequantize(device)?,
    };
    Ok(dense.to_dtype(dtype)?.detach().contiguous()?)
}
