//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod bot;
pub mod fake_discord;
pub mod lora;
pub mod script_model;
pub mod tiny;

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;

/// GGUF metadata key → value, as candle reads it.
pub type Metadata = std::collections::HashMap<String, Value>;

/// The real SmolLM2-135M-Instruct Q4_1 GGUF fetched by `.ci/fetch-test-models.sh`.
/// Missing file = failed test with instructions, never a silent skip.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("FREESKI_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        let dir = std::env::var_os("FREESKI_TEST_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/freeski-test-models"));
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "test model {} is missing: run .ci/fetch-test-models.sh (or set FREESKI_SMOLLM2_GGUF)", path.display());
    path
}

/// A file under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// GGUF metadata for Mistral 7B v0.1 from its tokenizer.json: tokens by id, llama.cpp token types
/// (1 normal, 2 unknown, 3 control, 6 byte) and SentencePiece scores. The real tokenizer.model
/// scores normal pieces -(rank), which is their id order, except the whitespace runs ("▁▁",
/// "▁▁▁▁", ...) that sit at -1e9 (merged last: see the tail of the reference merges); byte,
/// control and unknown pieces score 0.
pub fn mistral_gguf_metadata() -> Metadata {
    let path = fixture("tokenizers/mistral-7b-v0.1.tokenizer.json");
    let json: serde_json::Value = serde_json::from_reader(BufReader::new(File::open(&path).expect("open fixture"))).expect("json");
    let vocab = json["model"]["vocab"].as_object().expect("model.vocab");
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
    let mut types = Vec::new();
    let mut scores = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let (ty, score) = match tok.as_str() {
            "<unk>" => (2, 0.0),
            "<s>" | "</s>" => (3, 0.0),
            t if is_byte(t) => (6, 0.0),
            t if t.chars().count() >= 2 && t.chars().all(|c| c == '▁') => (1, -1e9),
            _ => (1, -(id as f32)),
        };
        types.push(Value::I32(ty));
        scores.push(Value::F32(score));
    }
    let mut md = Metadata::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
    md.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
    md.insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(false));
    md
}
