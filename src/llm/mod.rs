//! The language model: a Llama-family decoder with a frozen 4-bit base and optional LoRA
//! adapters, its loaders, tokenizer, chat templates, sampling and generation loop.

pub mod backend;
pub mod chat;
pub mod detok;
pub mod device;
pub mod engine;
pub mod fused_decode;
pub mod generate;
pub mod load;
pub mod lora;
pub mod model;
pub mod model_config;
pub mod prompt;
pub mod qlinear;
pub mod remote;
pub mod sampling;
pub mod settings;
pub mod tokenizer;

pub use model::{KvCache, Model};
pub use model_config::ModelConfig;
