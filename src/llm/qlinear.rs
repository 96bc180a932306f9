//! Frozen base linear layers: the weight stays in the file's own (usually 4-bit) GGML type and is
//! never modified, so adapters can be swapped without touching it.

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

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
        // A dense bf16 GEMM on a per-call dequantized weight was tried for prompts (16+ rows) on
        // CUDA: dequantizing all weights costs more than the 4-bit kernels' prefill of 100-512
        // tokens (BENCHMARKS.md, performance issue), so inference keeps candle's kernels.
        Ok(self.matmul.forward(x)?)
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
