//! Training through a frozen 4-bit base (issue 4, QLoRA).
//!
//! candle's quantized matmul and its fused RMSNorm / softmax / RoPE kernels have no backward
//! (DESIGN §3). [`ops`] wraps them in custom ops that keep the fused forward and add a backward,
//! so gradients reach LoRA weights in earlier layers while the base weights never get one.

pub mod ops;
