//! Frozen base linear layers: the weight stays in the file's own (usually 4-bit) GGML type and is
//! never modified, so adapters can be swapped without touching it.

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

/// `W` dequantized to `dtype` on `device`, as a plain (untracked, contiguous) tensor. CUDA
/// dequantizes straight to f16 for half-precision callers instead of going through an f32 copy
/// twice the size.
pub fn dequantize(w: &QTensor, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let dense = match (device, dtype) {
        (Device::Cuda(_), DType::F16 | DType::BF16) => w.dequantize_f16(device)?,
        _ => w.dequantize(device)?,
    };
    dense.to_dtype(dtype)?.detach().contiguous()
}

/// Rows from which a CUDA forward dequantizes the weight to bf16 and runs one cuBLAS GEMM instead
/// of candle's 4-bit kernel: prompts (prefill), not decode steps. A 4-bit GEMM reaches ~160-180
/// TFLOP/s on the H100 against ~680 for bf16 cuBLAS (shared/gpu/README.md), and the
/// dequantization costs about one read of the weight at bf16 size.
const DENSE_MIN_ROWS: usize = 16;

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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features.max(1);
        if rows >= DENSE_MIN_ROWS && x.device().is_cuda() && !matches!(self.weight.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return self.dense_forward(x, rows);
        }
        Ok(self.matmul.forward(x)?)
    }

    /// `x · dequant(W)ᵀ` in bf16 (the dense weight lives for this call only), back in `x`'s dtype.
    fn dense_forward(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let w = dequantize(&self.weight, x.device(), DType::BF16)?;
        let y = x.to_dtype(DType::BF16)?.reshape((rows, self.in_features))?.matmul(&w.t()?)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_features;
        }
        Ok(y.to_dtype(x.dtype())?.reshape(dims)?)
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
