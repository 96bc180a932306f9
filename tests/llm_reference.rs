//! The decoder against an independent f64 reference (tests/common/tiny.rs) on a tiny random
//! Llama with GQA and a sliding window shorter than the prompt, loaded through the real HF-folder
//! loader. Also: padded batches, the KV cache, the quantized cache, and LoRA adapters.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::tiny::{TinySpec, TinyWeights};
use freeski_bot::config::Settings;
use freeski_bot::llm::load::{self, LoadedModel};
use freeski_bot::llm::lora::{AdapterConfig, LoraAdapter};
use freeski_bot::llm::model::{KvCache, Logits, Proj};
use freeski_bot::util::compare::{max_abs_diff, max_rel_diff};

/// Max |a - b| relative to the largest |reference| value (at least 1); +∞ on NaN or infinity.
fn rel_err(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    let got: Vec<f32> = got.concat();
    let want: Vec<f64> = want.concat();
    max_rel_diff(&want, &got, 1.0)
}

fn settings(quant: &str, cache: &Path) -> Settings {
    Settings::load_with_env(None, [("FREESKI__MODEL__QUANTIZE".to_string(), quant.to_string()), ("FREESKI__MODEL__QUANTIZED_CACHE_DIR".into(), cache.display().to_string())])
        .unwrap()
}

fn load_tiny(dir: &Path, quant: &str) -> LoadedModel {
    let s = settings(quant, &dir.join("cache"));
    load::load(&s.model, Some(&dir.join("hf").display().to_string()), &Device::Cpu).unwrap()
}

fn setup(seed: u64) -> (tempfile::TempDir, TinyWeights) {
    let dir = tempfile::tempdir().unwrap();
    let w = TinyWeights::random(TinySpec::standard(), seed);
    w.write_hf_folder(&dir.path().join("hf"));
    (dir, w)
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + salt * 104729) % 49152).collect()
}

fn all_logits(lm: &LoadedModel, ids: &[u32], adapter: Option<&LoraAdapter>) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(1);
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    lm.model.forward(&input, &mut cache, adapter, Logits::All).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

// f32 model vs f64 reference: float32 rounding over 3 layers stays far below 1e-4 of the largest
// logit; any real mistake (RoPE pairing, GQA grouping, window edge, norm) is orders larger.
const F32_TOL: f64 = 1e-4;

#[test]
fn logits_match_f64_reference_with_gqa_and_sliding_window() {
    let (dir, w) = setup(1);
    let lm = load_tiny(dir.path(), "f32");
    let cfg = lm.model.config();
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.sliding_window), (4, 2, Some(8)));
    let ids = prompt(20, 1); // longer than the window of 8
    let err = rel_err(&all_logits(&lm, &ids, None), &w.reference_logits(&ids, &HashMap::new()));
    assert!(err < F32_TOL, "relative error {err:e}");
}

#[test]
fn sliding_window_changes_late_positions_only() {
    // Sanity check that the window is really applied: a reference without it differs after
    // position 8, matches before.
    let (dir, w) = setup(2);
    let lm = load_tiny(dir.path(), "f32");
    let ids = prompt(14, 2);
    let got = all_logits(&lm, &ids, None);
    let mut nowin = TinyWeights { spec: TinySpec { window: None, ..TinySpec::standard() }, t: w.t.clone() };
    nowin.spec.window = None;
    let full = nowin.reference_logits(&ids, &HashMap::new());
    assert!(rel_err(&got[..8], &full[..8]) < F32_TOL);
    let late = rel_err(&got[8..], &full[8..]);
    assert!(late.is_finite() && late > 1e-3, "window had no effect ({late})");
}

#[test]
fn padded_batch_equals_single_rows() {
    let (dir, _) = setup(3);
    let lm = load_tiny(dir.path(), "f32");
    let (a, b) = (prompt(12, 3), prompt(20, 4));
    let single = |ids: &[u32]| all_logits(&lm, ids, None).pop().unwrap();
    let mut flat = vec![0u32; 8];
    flat.extend(&a);
    flat.extend(&b);
    let mut cache = KvCache::with_padding(vec![8, 0]);
    let input = Tensor::from_vec(flat, (2, 20), &Device::Cpu).unwrap();
    let batched: Vec<Vec<f32>> = lm.model.forward(&input, &mut cache, None, Logits::Last).unwrap().squeeze(1).unwrap().to_vec2().unwrap();
    for (row, ids) in [(0, &a), (1, &b)] {
        let want = single(ids);
        let diff = max_abs_diff(&batched[row], &want);
        assert!(diff < 1e-4, "row {row}: {diff}");
    }
    // Decode one more token in the batch: positions continue per row.
    let next = Tensor::new(&[[5u32], [6u32]], &Device::Cpu).unwrap();
    let step: Vec<Vec<f32>> = lm.model.forward(&next, &mut cache, None, Logits::Last).unwrap().squeeze(1).unwrap().to_vec2().unwrap();
    for (row, ids, t) in [(0, &a, 5u32), (1, &b, 6u32)] {
        let mut ext = ids.clone();
        ext.push(t);
        let want = single(&ext);
        let diff = max_abs_diff(&step[row], &want);
        assert!(diff < 1e-4, "decode row {row}: {diff}");
    }
}

#[test]
fn kv_cache_decode_equals_full_prefill() {
    let (dir, _) = setup(4);
    let lm = load_tiny(dir.path(), "f32");
    let ids = prompt(16, 5);
    let full = all_logits(&lm, &ids, None);
    let mut cache = KvCache::new(1);
    let head = Tensor::new(&ids[..5], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    lm.model.forward(&head, &mut cache, None, Logits::Last).unwrap();
    for (i, &t) in ids.iter().enumerate().skip(5) {
        let l: Vec<f32> = lm.model.forward(&Tensor::new(&[[t]], &Device::Cpu).unwrap(), &mut cache, None, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let diff = max_abs_diff(&l, &full[i]);
        assert!(diff < 1e-4, "position {i}: {diff}");
    }
}

#[test]
fn kv_cache_grows_in_chunks_and_keeps_what_it_holds() {
    // The cache holds positions in buffers of KvCache::CHUNK; decoding across the boundary must
    // move what it holds into the larger buffer unchanged. A random tiny model (1024 positions,
    // f32 weights) so the walk can cross the first chunk.
    let cfg = freeski_bot::llm::ModelConfig::tiny();
    let q = freeski_bot::bench::random::random_model(&cfg, candle_core::quantized::GgmlDType::Q8_0, 9, &Device::Cpu).unwrap();
    let model = freeski_bot::bench::random::dequantized(&q).unwrap();
    let chunk = KvCache::CHUNK;
    let ids: Vec<u32> = (0..chunk as u32 + 12).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
    let full: Vec<Vec<f32>> = {
        let mut cache = KvCache::new(1);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&input, &mut cache, None, Logits::All).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    };
    let start = chunk - 4;
    let mut cache = KvCache::new(1);
    let head = Tensor::new(&ids[..start], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&head, &mut cache, None, Logits::Last).unwrap();
    assert_eq!(cache.capacity(), chunk);
    for (i, &t) in ids.iter().enumerate().skip(start) {
        let l: Vec<f32> = model.forward(&Tensor::new(&[[t]], &Device::Cpu).unwrap(), &mut cache, None, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let diff = max_rel_diff(&full[i], &l, 1e-6);
        assert!(diff < 1e-4, "position {i}: relative {diff}");
    }
    assert_eq!(cache.len(), ids.len());
    assert_eq!(cache.capacity(), 2 * chunk, "grown by one chunk");
    // Dropping rows keeps the capacity and the padding of the rows kept.
    let mut two = KvCache::with_padding(vec![3, 0]);
    let mut flat = vec![0u32; 3];
    flat.extend(&ids[..7]);
    flat.extend(&ids[..10]);
    model.forward(&Tensor::from_vec(flat, (2, 10), &Device::Cpu).unwrap(), &mut two, None, Logits::Last).unwrap();
    two.retain_rows(&[0]).unwrap();
    assert_eq!((two.batch(), two.padding(), two.capacity(), two.len()), (1, &[3usize][..], chunk, 10));
}

#[test]
fn quantized_load_is_cached_and_close_to_reference() {
    let (dir, w) = setup(5);
    let lm = load_tiny(dir.path(), "q8_0");
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mtime = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();
    let ids = prompt(10, 6);
    let first = all_logits(&lm, &ids, None);
    let again = load_tiny(dir.path(), "q8_0");
    assert_eq!(std::fs::metadata(&cached[0]).unwrap().modified().unwrap(), mtime, "cache was rewritten");
    assert_eq!(all_logits(&again, &ids, None), first);
    // 8-bit weights and activations: a few percent of the largest logit at most.
    let err = rel_err(&first, &w.reference_logits(&ids, &HashMap::new()));
    assert!(err < 5e-2, "q8_0 relative error {err}");
    // Another quantization gets its own cache entry.
    let _ = load_tiny(dir.path(), "q4k");
    assert_eq!(std::fs::read_dir(dir.path().join("cache")).unwrap().count(), 2);
}

#[test]
fn a_decode_step_reads_every_weight_but_a_separate_embedding_table() {
    // f32 weights: every tensor's bytes are 4 per value, so the counts are known exactly.
    for tied in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let spec = || TinySpec { tied, ..TinySpec::standard() };
        TinyWeights::random(spec(), 8).write_hf_folder(&dir.path().join("hf"));
        let lm = load_tiny(dir.path(), "f32");
        let s = &spec();
        let per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * (s.kv_heads * s.head_dim()) + 3 * s.hidden * s.ffn + 2 * s.hidden;
        let head = s.vocab * s.hidden;
        let read = 4 * (s.layers * per_layer + head);
        assert_eq!(lm.model.decode_read_bytes(), read, "tied {tied}");
        assert_eq!(lm.model.weight_bytes() - lm.model.decode_read_bytes(), if tied { 0 } else { 4 * head }, "tied {tied}");
    }
}

#[test]
fn loads_racing_to_fill_an_empty_cache_all_succeed() {
    // Tests, and a bot starting beside `ask`, may quantize the same folder at once: each writes
    // its own temporary file and the renames replace one whole file with another.
    let (dir, _) = setup(6);
    let ids = prompt(10, 7);
    let logits: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4).map(|_| s.spawn(|| all_logits(&load_tiny(dir.path(), "q8_0"), &ids, None))).collect();
        runs.into_iter().map(|r| r.join().expect("a racing load failed")).collect()
    });
    assert!(logits.windows(2).all(|w| w[0] == w[1]));
    let left: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
}

// ---- LoRA -------------------------------------------------------------------------------

/// PEFT-named tensors with deterministic A and B on the given projections of every layer.
fn lora_tensors(spec: &TinySpec, r: usize, projs: &[Proj], zero_b: bool) -> HashMap<String, Tensor> {
    let cfg = freeski_bot::llm::ModelConfig {
        vocab_size: spec.vocab,
        hidden_size: spec.hidden,
        intermediate_size: spec.ffn,
        num_layers: spec.layers,
        num_heads: spec.heads,
        num_kv_heads: spec.kv_heads,
        head_dim: spec.head_dim(),
        rms_norm_eps: spec.eps,
        rope_theta: spec.theta,
        max_position: 256,
        sliding_window: spec.window,
        tie_embeddings: spec.tied,
    };
    let mut out = HashMap::new();
    for l in 0..spec.layers {
        for (pi, p) in projs.iter().enumerate() {
            let (fan_in, fan_out) = p.shape(&cfg);
            let a: Vec<f32> = (0..r * fan_in).map(|i| (((i * 31 + l * 7 + pi) % 17) as f32 - 8.0) / 40.0).collect();
            let b: Vec<f32> = (0..fan_out * r).map(|i| if zero_b { 0.0 } else { (((i * 13 + l + pi * 5) % 11) as f32 - 5.0) / 50.0 }).collect();
            let base = format!("base_model.model.model.layers.{l}.{}", p.hf_path());
            out.insert(format!("{base}.lora_A.weight"), Tensor::from_vec(a, (r, fan_in), &Device::Cpu).unwrap());
            out.insert(format!("{base}.lora_B.weight"), Tensor::from_vec(b, (fan_out, r), &Device::Cpu).unwrap());
        }
    }
    out
}

/// Dense `scale·B·A` per module path, in f64 and HF layout, for the reference.
fn deltas(tensors: &HashMap<String, Tensor>, scale: f64) -> HashMap<String, Vec<f64>> {
    let mut out = HashMap::new();
    for (name, a) in tensors {
        let Some(base) = name.strip_suffix(".lora_A.weight") else { continue };
        let b = &tensors[&format!("{base}.lora_B.weight")];
        let d = b.to_dtype(candle_core::DType::F64).unwrap().matmul(&a.to_dtype(candle_core::DType::F64).unwrap()).unwrap();
        let d: Vec<f64> = (d * scale).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        out.insert(base.strip_prefix("base_model.model.model.").unwrap().to_string(), d);
    }
    out
}

fn write_adapter(dir: &Path, config: &AdapterConfig, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string(config).unwrap()).unwrap();
    candle_core::safetensors::save(tensors, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn lora_unmerged_and_merged_match_dense_reference() {
    let (dir, w) = setup(6);
    let mut lm = load_tiny(dir.path(), "f32");
    let tensors = lora_tensors(&w.spec, 2, &Proj::ALL, false);
    let config = AdapterConfig::new(2, 16.0, 0.05, &Proj::ALL, "tiny", false);
    let adir = dir.path().join("adapters/a1");
    write_adapter(&adir, &config, &tensors);
    let adapter = LoraAdapter::load(&adir, lm.model.config(), &Device::Cpu).unwrap();
    assert_eq!(adapter.num_pairs(), 21);
    let ids = prompt(12, 7);
    let want = w.reference_logits(&ids, &deltas(&tensors, 8.0));
    let base = all_logits(&lm, &ids, None);
    let with = all_logits(&lm, &ids, Some(&adapter));
    let moved = rel_err(&base, &want);
    assert!(moved.is_finite() && moved > 1e-2, "the adapter should change the logits ({moved})");
    let err = rel_err(&with, &want);
    assert!(err < F32_TOL, "unmerged adapter vs reference: {err:e}");
    // Merging into an f32 base is exact up to rounding.
    lm.model.merge_adapter(&adapter).unwrap();
    let err = rel_err(&all_logits(&lm, &ids, None), &want);
    assert!(err < F32_TOL, "merged adapter vs reference: {err:e}");
}

#[test]
fn rslora_uses_alpha_over_sqrt_r() {
    let (dir, w) = setup(7);
    let lm = load_tiny(dir.path(), "f32");
    let tensors = lora_tensors(&w.spec, 4, &[Proj::Q, Proj::Down], false);
    let config = AdapterConfig::new(4, 8.0, 0.0, &[Proj::Q, Proj::Down], "tiny", true);
    let adir = dir.path().join("rs");
    write_adapter(&adir, &config, &tensors);
    let adapter = LoraAdapter::load(&adir, lm.model.config(), &Device::Cpu).unwrap();
    let ids = prompt(9, 8);
    let err = rel_err(&all_logits(&lm, &ids, Some(&adapter)), &w.reference_logits(&ids, &deltas(&tensors, 8.0 / 2.0)));
    assert!(err < F32_TOL, "{err:e}");
}

#[test]
fn zero_b_changes_nothing() {
    let (dir, w) = setup(8);
    let lm = load_tiny(dir.path(), "f32");
    let tensors = lora_tensors(&w.spec, 2, &Proj::ALL, true);
    let adir = dir.path().join("zero");
    write_adapter(&adir, &AdapterConfig::new(2, 16.0, 0.05, &Proj::ALL, "tiny", false), &tensors);
    let adapter = LoraAdapter::load(&adir, lm.model.config(), &Device::Cpu).unwrap();
    let ids = prompt(10, 9);
    assert_eq!(all_logits(&lm, &ids, Some(&adapter)), all_logits(&lm, &ids, None));
}

#[test]
fn save_load_round_trips_bit_for_bit() {
    let (dir, w) = setup(9);
    let lm = load_tiny(dir.path(), "f32");
    let tensors = lora_tensors(&w.spec, 3, &[Proj::Q, Proj::K, Proj::V, Proj::Up], false);
    let mut config = AdapterConfig::new(3, 6.0, 0.1, &[Proj::Q, Proj::K, Proj::V, Proj::Up], "tiny", false);
    config.extra.insert("peft_version".into(), serde_json::json!("0.17.0"));
    let src = dir.path().join("src");
    write_adapter(&src, &config, &tensors);
    let a = LoraAdapter::load(&src, lm.model.config(), &Device::Cpu).unwrap();
    let dst = dir.path().join("dst");
    a.save(&dst).unwrap();
    let b = LoraAdapter::load(&dst, lm.model.config(), &Device::Cpu).unwrap();
    assert_eq!(a.config, b.config, "config keys survive, unknown ones included");
    let (ta, tb) = (a.to_hf_tensors().unwrap(), b.to_hf_tensors().unwrap());
    assert_eq!(ta.len(), tensors.len());
    for (name, t) in &tensors {
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ta[name]), bits(t), "{name} changed on load");
        assert_eq!(bits(&tb[name]), bits(t), "{name} changed on save/load");
    }
    // The saved file holds PEFT's names and shapes.
    let st = candle_core::safetensors::load(dst.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let q_b = &st["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(q_b.dims(), &[64, 3]);
    assert_eq!(st["base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"].dims(), &[3, 64]);
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dst.join("adapter_config.json")).unwrap()).unwrap();
    for key in ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "base_model_name_or_path", "use_rslora"] {
        assert!(saved.get(key).is_some(), "adapter_config.json lacks {key}");
    }
}

#[test]
fn bad_adapters_are_rejected_with_clear_errors() {
    let (dir, w) = setup(10);
    let lm = load_tiny(dir.path(), "f32");
    let cfg = lm.model.config();
    let config = AdapterConfig::new(2, 16.0, 0.05, &Proj::ALL, "tiny", false);
    let good = lora_tensors(&w.spec, 2, &Proj::ALL, false);
    let check = |name: &str, tensors: &HashMap<String, Tensor>, config: &AdapterConfig, needle: &str| {
        let d = dir.path().join(name);
        write_adapter(&d, config, tensors);
        let err = format!("{:#}", LoraAdapter::load(&d, cfg, &Device::Cpu).unwrap_err());
        assert!(err.contains(needle), "{name}: {err}");
    };
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";

    let mut wrong = good.clone();
    wrong.insert(key.into(), Tensor::zeros((32, 2), candle_core::DType::F32, &Device::Cpu).unwrap());
    check("wrong-shape", &wrong, &config, "expected [64, 2]");

    let mut missing = good.clone();
    missing.remove(key);
    check("missing", &missing, &config, "has lora_A but no lora_B");

    let mut nan = good.clone();
    nan.insert(key.into(), Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap().broadcast_as((64, 2)).unwrap().contiguous().unwrap());
    check("nan", &nan, &config, "NaN");

    let mut deep = good.clone();
    deep.insert("base_model.model.model.layers.9.mlp.up_proj.lora_A.weight".into(), Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap());
    check("layer", &deep, &config, "layer 9 does not exist");

    let mut dora = config.clone();
    dora.extra.insert("use_dora".into(), serde_json::json!(true));
    check("dora", &good, &dora, "use_dora");

    // Truncated weights file.
    let d = dir.path().join("truncated");
    write_adapter(&d, &config, &good);
    let f = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", LoraAdapter::load(&d, cfg, &Device::Cpu).unwrap_err());
    assert!(err.contains("corrupt or truncated") && err.contains("adapter_model.safetensors"), "{err}");

    // Missing and malformed config.
    let d = dir.path().join("noconfig");
    write_adapter(&d, &config, &good);
    std::fs::remove_file(d.join("adapter_config.json")).unwrap();
    let err = format!("{:#}", LoraAdapter::load(&d, cfg, &Device::Cpu).unwrap_err());
    assert!(err.contains("adapter_config.json"), "{err}");
    std::fs::write(d.join("adapter_config.json"), "{\"r\": 2").unwrap();
    let err = format!("{:#}", LoraAdapter::load(&d, cfg, &Device::Cpu).unwrap_err());
    assert!(err.contains("parsing adapter config"), "{err}");
}

#[test]
fn missing_and_broken_model_files_name_the_file() {
    let (dir, _) = setup(11);
    let hf = dir.path().join("hf");
    let s = settings("f32", &dir.path().join("cache"));
    let try_load = |p: &Path| format!("{:#}", load::load(&s.model, Some(&p.display().to_string()), &Device::Cpu).err().expect("load should fail"));

    // A GGUF cut in half.
    let _ = load_tiny(dir.path(), "f32");
    let gguf = std::fs::read_dir(dir.path().join("cache")).unwrap().next().unwrap().unwrap().path();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = try_load(&cut);
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");

    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let err = try_load(&junk);
    assert!(err.contains("junk.gguf"), "{err}");

    // HF folder without tokenizer.json.
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let err = try_load(&hf);
    assert!(err.contains("tokenizer.json"), "{err}");

    // Weights that don't fit config.json.
    std::fs::copy(common::fixture("tokenizers/smollm2-135m.reference-tokenizer.json"), hf.join("tokenizer.json")).unwrap();
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap().replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4");
    std::fs::write(hf.join("config.json"), cfg).unwrap();
    let err = try_load(&hf);
    assert!(err.contains("blk.3"), "{err}");
}
