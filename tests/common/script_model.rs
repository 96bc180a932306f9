//! A tiny model whose weights are crafted so that greedy decoding follows a fixed token chain
//! ("script"): its decoder block is all zeros, so the residual stream is the token's embedding,
//! and the output head maps each token of the script to the next one. It runs through the real
//! model, engine and generation code; only the numbers in the weights are chosen by hand.
//!
//! Embeddings are random ±1 vectors (RMS exactly 1, so the final norm leaves them alone); the
//! head row of token `b` is the sum of the embeddings of the tokens followed by `b`. The right
//! successor then scores `hidden` (64) and every other token scores the dot product of
//! unrelated random vectors (about ±8), far below.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use freeski_bot::llm::chat::ChatTemplate;
use freeski_bot::llm::load::LoadedModel;
use freeski_bot::llm::{Model, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

const HIDDEN: usize = 64;
const VOCAB: usize = 49152;
/// ChatML's `<|im_end|>`: ends the answer.
const IM_END: u32 = 2;
/// Longest context: long enough that a generation kept busy on purpose outlives any test.
pub const MAX_POSITION: usize = 262_144;
/// "\n": the last token of the ChatML generation prompt, so the script starts after it.
const ENTRY: u32 = 198;

pub fn tokenizer() -> Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/smollm2-135m.reference-tokenizer.json");
    Tokenizer::from_file(&path).expect("SmolLM2 tokenizer fixture")
}

/// How a script ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `<|im_end|>` after the last token: the answer is the script once.
    Stop,
    /// Back to the first token: the answer repeats until `max_new_tokens`.
    Cycle,
}

/// Token ids for vocabulary entries given in the tokenizer's byte-level spelling ("Ġword" for
/// " word", "ĊĊ" for a blank line). Every id must be distinct: a token has one successor.
pub fn ids(tok: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    let ids: Vec<u32> = pieces.iter().map(|p| tok.token_to_id(p).unwrap_or_else(|| panic!("`{p}` is not one token"))).collect();
    let mut seen = std::collections::HashSet::new();
    for (p, id) in pieces.iter().zip(&ids) {
        assert!(seen.insert(*id), "token `{p}` appears twice in a script");
        assert!(*id != ENTRY && *id != IM_END, "`{p}` is reserved");
    }
    ids
}

/// `n` distinct lowercase word tokens (" carve", " powder", …) not in `avoid`, deterministic.
pub fn words(tok: &Tokenizer, n: usize, avoid: &[u32]) -> Vec<u32> {
    let mut vocab: Vec<(String, u32)> =
        tok.get_vocab(false).into_iter().filter(|(s, _)| s.len() > 5 && s.starts_with('Ġ') && s[2..].chars().all(|c| c.is_ascii_lowercase())).collect();
    vocab.sort_by_key(|(_, id)| *id);
    vocab.into_iter().map(|(_, id)| id).filter(|id| !avoid.contains(id)).take(n).collect()
}

/// The text a script decodes to (one pass).
pub fn text(tok: &Tokenizer, script: &[u32]) -> String {
    tok.decode(script, false).expect("decode")
}

/// A one-block model that answers every question with `script`, ending as `end` says.
pub fn model(script: &[u32], end: End) -> LoadedModel {
    let tok = tokenizer();
    let cfg = ModelConfig {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position: MAX_POSITION,
        sliding_window: None,
        tie_embeddings: false,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let embed: Vec<f32> = (0..VOCAB * HIDDEN).map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 }).collect();
    let mut next: HashMap<u32, u32> = HashMap::new();
    let mut chain = vec![ENTRY];
    chain.extend_from_slice(script);
    chain.push(match end {
        End::Stop => IM_END,
        End::Cycle => script[0],
    });
    for w in chain.windows(2) {
        assert!(next.insert(w[0], w[1]).is_none_or(|old| old == w[1]), "token {} has two successors", w[0]);
    }
    let mut head = vec![0f32; VOCAB * HIDDEN];
    for (&a, &b) in &next {
        for d in 0..HIDDEN {
            head[b as usize * HIDDEN + d] += embed[a as usize * HIDDEN + d];
        }
    }
    let dev = Device::Cpu;
    let q = |v: Vec<f32>, shape: &[usize]| QTensor::quantize(&Tensor::from_vec(v, shape, &dev).unwrap(), GgmlDType::F32).unwrap();
    let model = Model::from_tensors(cfg.clone(), &dev, |name| {
        Ok(Some(match name {
            "token_embd.weight" => q(embed.clone(), &[VOCAB, HIDDEN]),
            "output.weight" => q(head.clone(), &[VOCAB, HIDDEN]),
            n if n.ends_with("norm.weight") => q(vec![1.0; HIDDEN], &[HIDDEN]),
            n => {
                let p = freeski_bot::llm::model::Proj::ALL.into_iter().find(|p| n.ends_with(&format!(".{}.weight", p.gguf_name()))).expect("known tensor");
                let (fan_in, fan_out) = p.shape(&cfg);
                q(vec![0.0; fan_in * fan_out], &[fan_out, fan_in])
            }
        }))
    })
    .expect("script model");
    let template = ChatTemplate::ChatMl;
    LoadedModel { model, tokenizer: tok, template, stop_ids: vec![IM_END], bos_id: None, name: "script".into(), source: String::new() }
}
