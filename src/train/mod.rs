//! QLoRA training through a frozen 4-bit base.
//!
//! candle's quantized matmul and its fused RMSNorm / softmax / RoPE kernels have no backward,
//! so [`ops`] adds ops with a backward. [`forward`] is the decoder's training pass on
//! a loaded model's frozen weights with LoRA [`params`], [`dropout`] and per-layer gradient
//! checkpointing, whose recomputed layers are differentiated by hand (`backward`); [`trainer`] is the loop (AdamW from [`optim`], [`checkpoint`]s, evaluation,
//! early stop) fed by [`data`], with the preference objective of [`kto`]; [`report`] writes `metrics.json` and `loss.png`.

mod backward;
pub mod checkpoint;
pub mod data;
pub mod dropout;
pub mod eval;
pub mod forward;
pub mod kto;
pub mod ops;
pub mod optim;
pub mod params;
pub mod report;
pub mod settings;
pub mod trainer;

pub use settings::{Objective, TrainSettings};
pub use trainer::{NoHooks, Outcome, Progress, TrainHooks, TrainRun};
