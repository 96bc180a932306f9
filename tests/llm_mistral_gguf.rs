//! The production path in miniature: a Mistral-style GGUF (llama SentencePiece vocabulary in the
//! metadata, no tokenizer.json, untied head, sliding window) written to disk with random 4-bit
//! weights and loaded through the real GGUF loader.

mod common;

use std::ops::ControlFlow;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use freeski_bot::bench::random::random_qtensor;
use freeski_bot::llm::chat::ChatTemplate;
use freeski_bot::llm::generate::{generate, GenOptions};
use freeski_bot::llm::load::load_path;
use freeski_bot::llm::model::Proj;
use freeski_bot::llm::sampling::SamplingParams;
use freeski_bot::llm::ModelConfig;
use rand::SeedableRng;

fn write_tiny_mistral_gguf(path: &std::path::Path) -> ModelConfig {
    let cfg = ModelConfig { vocab_size: 32000, hidden_size: 64, intermediate_size: 128, ..ModelConfig::tiny() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut lin = |name: String, rows: usize, cols: usize| (name, random_qtensor(GgmlDType::Q4_0, rows, cols, &mut rng, &Device::Cpu).unwrap());
    let ones = || QTensor::quantize(&Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    tensors.push(lin("token_embd.weight".into(), cfg.vocab_size, cfg.hidden_size));
    tensors.push(lin("output.weight".into(), cfg.vocab_size, cfg.hidden_size));
    for i in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (fan_in, fan_out) = p.shape(&cfg);
            tensors.push(lin(format!("blk.{i}.{}.weight", p.gguf_name()), fan_out, fan_in));
        }
        tensors.push((format!("blk.{i}.attn_norm.weight"), ones()));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), ones()));
    }
    tensors.push(("output_norm.weight".into(), ones()));
    let mut md: Vec<(String, gguf_file::Value)> = cfg.to_gguf();
    md.extend(common::mistral_gguf_metadata());
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    cfg
}

#[test]
fn mistral_style_gguf_loads_with_its_own_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-mistral.Q4_0.gguf");
    let cfg = write_tiny_mistral_gguf(&path);
    let lm = load_path(&path, &Device::Cpu).unwrap();
    assert_eq!(lm.model.config().sliding_window, Some(8));
    assert!(!lm.model.config().tie_embeddings);
    assert_eq!(lm.template, ChatTemplate::Mistral, "a vocabulary without <|im_start|> gets [INST]");
    assert_eq!((lm.bos_id, lm.stop_ids.clone()), (Some(1), vec![2]));
    assert_eq!(lm.model.config().vocab_size, cfg.vocab_size);

    // "[INST] How do I land a switch 900? [/INST]" from Python `tokenizers`, after BOS.
    let prompt = lm.template.prompt(&lm.tokenizer, lm.bos_id, Some(2), "", &[], "How do I land a switch 900?").unwrap();
    assert_eq!(prompt, vec![1, 733, 16289, 28793, 1602, 511, 315, 2533, 264, 4933, 28705, 28774, 28734, 28734, 28804, 733, 28748, 16289, 28793]);

    // Generation runs end to end on the 4-bit weights; streamed pieces add up to the text.
    let opts = GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: 12, stop: vec![], seed: 0, max_context: 64 };
    let mut streamed = String::new();
    let gen = generate(&lm, None, &prompt, &opts, |p| {
        streamed.push_str(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!gen.tokens.is_empty());
    assert_eq!(streamed, gen.text);
    assert_eq!(gen.text, lm.tokenizer.decode(&gen.tokens, true).unwrap());
}
