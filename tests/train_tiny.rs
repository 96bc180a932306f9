//! QLoRA training on a tiny random model with quantized base layers: gradients against
//! finite differences (SFT and KTO), checkpointed against whole-graph backward, KTO's reference
//! against a plain forward, cancel + resume against an uninterrupted run (across the SFT → KTO
//! boundary too), and bad datasets.

mod common;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use freeski_bot::config::Settings;
use freeski_bot::llm::load::{load_path, LoadedModel};
use freeski_bot::llm::lora::AdapterConfig;
use freeski_bot::llm::model::{KvCache, Logits, Proj};
use freeski_bot::train::checkpoint;
use freeski_bot::train::data::{self, Batch, Example};
use freeski_bot::train::dropout::Dropout;
use freeski_bot::train::forward::{GradAccum, MicroKey, TrainForward};
use freeski_bot::train::kto::{self, KtoPhase, PrefExample};
use freeski_bot::train::params::{LoraParams, LoraView};
use freeski_bot::train::settings::BadLines;
use freeski_bot::train::{NoHooks, Objective, Outcome, TrainHooks, TrainRun, TrainSettings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny random Llama (3 layers, GQA 4/2, sliding window 8) through the real HF loader,
/// which quantizes its linears.
fn tiny_lm(dir: &Path) -> LoadedModel {
    common::tiny::TinyWeights::random(common::tiny::TinySpec::standard(), 11).write_hf_folder(dir);
    load_path(dir, &Device::Cpu).expect("loading the tiny model")
}

fn settings() -> TrainSettings {
    Settings::load_with_env(None, std::iter::empty()).unwrap().train
}

fn batch(rng: &mut ChaCha8Rng, lens: &[usize]) -> Batch {
    let ex: Vec<Example> = lens.iter().map(|&n| Example { ids: (0..n).map(|_| rng.random_range(0..49152u32)).collect(), target: (0..n).map(|i| i >= n / 3).collect() }).collect();
    Batch::new(&ex.iter().collect::<Vec<_>>())
}

/// LoRA weights with random B too (B = 0 at init would make every A-gradient zero).
fn random_params(lm: &LoadedModel, dropout: f64, seed: u64) -> LoraParams {
    let cfg = AdapterConfig::new(2, 16.0, dropout, &Proj::ALL, "tiny", false);
    let params = LoraParams::init(lm.model.config(), cfg, seed, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let values: HashMap<String, Tensor> = params
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            (n, Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap())
        })
        .collect();
    params.load_values(|n| values.get(n).cloned()).unwrap();
    params
}

fn grads(fwd: &TrainForward, params: &LoraParams, b: &Batch, checkpointing: bool) -> Vec<Vec<f32>> {
    let mut acc = GradAccum::new(params).unwrap();
    fwd.accumulate(params, b, MicroKey { step: 3, micro: 1 }, b.targets() as f64, checkpointing, &mut acc).unwrap();
    acc.grads().unwrap().iter().map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// Every LoRA tensor's gradient against central finite differences of the loss, computed in
/// f64 through the quantized base (dequantized densely on the f64 path). Six entries per
/// tensor, always including its largest-gradient entry. Tolerance: 1e-4 of the tensor's largest
/// gradient (the analytic gradients are stored in f32). Both backwards are checked: the
/// whole-graph autograd one and the checkpointed, hand-written one.
#[test]
fn lora_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path());
    let params = random_params(&lm, 0.0, 5);
    let fwd = TrainForward::new(&lm.model, DType::F64, Dropout::off());
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Two rows of different lengths (padding) longer than the sliding window.
    let b = batch(&mut rng, &[12, 9]);
    let denom = b.targets() as f64;
    let analytic = grads(&fwd, &params, &b, false);
    let by_hand = grads(&fwd, &params, &b, true);
    let loss = |p: &LoraParams| fwd.loss_sum(Some(&p.view()), &b).unwrap() / denom;
    let mut checked = 0;
    for (((name, var), g), g_hand) in params.named_vars().into_iter().zip(&analytic).zip(&by_hand) {
        let gmax = freeski_bot::util::compare::max_abs(g);
        assert!(gmax.is_finite(), "{name}: gradient holds NaN or infinity");
        assert!(gmax > 0.0, "{name}: no gradient at all");
        let argmax = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let mut picks = vec![argmax];
        picks.extend((0..5).map(|_| rng.random_range(0..g.len())));
        let orig: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        for &j in &picks {
            let at = |delta: f32| -> (f64, f64) {
                let mut v = orig.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                (loss(&params), v[j] as f64)
            };
            let (fp, xp) = at(1e-4);
            let (fm, xm) = at(-1e-4);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let fd = (fp - fm) / (xp - xm);
            for (path, g) in [("autograd", g), ("checkpointed", g_hand)] {
                let err = (fd - g[j] as f64).abs() / gmax;
                assert!(err < 1e-4, "{name}[{j}]: finite differences {fd:.6e}, {path} backward {:.6e} (error {err:.2e} of max {gmax:.3e})", g[j]);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 7 * 2 * 6);
}

/// The training forward computes what the inference forward computes (GQA, sliding window,
/// LoRA on every projection): the NLL of one 20-token row (past the window of 8) through
/// `loss_sum` on the quantized model (dense f32 GEMMs on the dequantized weights) and through
/// `Model::forward` on the same weights dequantized. Tolerance 1e-5 relative.
#[test]
fn training_forward_matches_the_inference_forward() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path());
    let params = random_params(&lm, 0.0, 5);
    let fwd = TrainForward::new(&lm.model, DType::F32, Dropout::off());
    let b = batch(&mut ChaCha8Rng::seed_from_u64(4), &[20]);
    let train = fwd.loss_sum(Some(&params.view()), &b).unwrap();

    let exact = freeski_bot::bench::random::dequantized(&lm.model).unwrap();
    let adapter = params.to_adapter("check").unwrap();
    let ids = Tensor::new(b.ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut cache = KvCache::new(1);
    let logits = exact.forward(&ids, &mut cache, Some(&adapter), Logits::All).unwrap().squeeze(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 1).unwrap().to_vec2::<f64>().unwrap();
    let (pos, next) = b.predictions();
    let inference: f64 = pos.iter().zip(&next).map(|(&p, &n)| -logp[p as usize][n as usize]).sum();
    assert!((train - inference).abs() < 1e-5 * inference, "training {train} vs inference {inference}");
}

/// Recomputing each layer in the backward pass gives the gradients of the whole-graph backward,
/// dropout included (the masks are replayed from their keys). Tolerance 1e-5 relative.
#[test]
fn checkpointed_and_whole_graph_gradients_agree() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path());
    let params = random_params(&lm, 0.1, 9);
    let fwd = TrainForward::new(&lm.model, DType::F32, Dropout { p: 0.1, seed: 4 });
    let b = batch(&mut ChaCha8Rng::seed_from_u64(8), &[20, 14, 7]);
    let whole = grads(&fwd, &params, &b, false);
    let ckpt = grads(&fwd, &params, &b, true);
    for (i, (w, c)) in whole.iter().zip(&ckpt).enumerate() {
        let rel = freeski_bot::util::compare::max_rel_diff(w, c, 1e-12);
        assert!(rel < 1e-5, "tensor {i}: relative difference {rel}");
    }
    // And dropout really changes the gradients (the masks are not all ones).
    let plain = grads(&TrainForward::new(&lm.model, DType::F32, Dropout::off()), &params, &b, true);
    assert!(plain.iter().zip(&whole).any(|(a, b)| a != b));
}

fn write_jsonl(dir: &Path, name: &str, lines: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
}

fn conv(q: &str, a: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
}

/// A small dataset from the committed fixture (the first 24 training and 6 held-out lines).
fn small_dataset(dir: &Path) {
    let read = |f: &str| -> Vec<String> { std::fs::read_to_string(common::fixture(&format!("freeski_chat/{f}"))).unwrap().lines().map(str::to_string).collect() };
    write_jsonl(dir, "train.jsonl", &read("train.jsonl")[..24]);
    write_jsonl(dir, "test.jsonl", &read("test.jsonl")[..6]);
}

fn tiny_settings() -> TrainSettings {
    let mut s = settings();
    s.max_steps = 6;
    s.batch_size = 2;
    s.grad_accum = 2;
    s.max_len = 64;
    s.dropout = 0.1;
    s.eval_every = 3;
    s.checkpoint_every = 2;
    s.learning_rate = 1e-2;
    s.warmup_steps = 2;
    s.use_system_prompt = false;
    s
}

struct StopAfter {
    step: usize,
    seen: Cell<usize>,
}

impl TrainHooks for StopAfter {
    fn should_stop(&self) -> bool {
        self.seen.get() >= self.step
    }
    fn after_step(&self, step: usize) {
        self.seen.set(step);
    }
}

fn adapter_tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// A run stopped at step 3 (checkpoint written on the stop) and resumed ends with the adapter
/// and loss history of an uninterrupted run: same data order, optimizer and dropout state.
#[test]
fn cancelled_and_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_lm(&tmp.path().join("model"));
    small_dataset(&tmp.path().join("data"));
    let s = tiny_settings();
    let data = data::load(&tmp.path().join("data"), &lm, &s, "").unwrap();
    let run =
        |id: &str| TrainRun { lm: &lm, reference: None, data: &data, settings: s.clone(), run_dir: tmp.path().join("adapters").join(id), id: id.into(), base_model: "tiny".into() };

    let stopper = StopAfter { step: 3, seen: Cell::new(0) };
    match run("a").run(&stopper).unwrap() {
        Outcome::Cancelled { step } => assert_eq!(step, 3),
        other => panic!("expected a cancelled run, got {other:?}"),
    }
    let ck = checkpoint::load(&tmp.path().join("adapters/a"), &Device::Cpu).unwrap().expect("checkpoint on cancel");
    assert_eq!(ck.state.step, 3);
    let Outcome::Completed(resumed) = run("a").run(&NoHooks).unwrap() else { panic!("resume did not complete") };
    let Outcome::Completed(straight) = run("b").run(&NoHooks).unwrap() else { panic!("run did not complete") };
    assert_eq!(resumed.steps, 6);
    assert!(!checkpoint::path(&tmp.path().join("adapters/a")).exists(), "checkpoint removed after success");
    for (x, y) in resumed.train_loss.iter().zip(&straight.train_loss) {
        assert!((x.loss - y.loss).abs() < 1e-5, "step {}: {} vs {}", x.step, x.loss, y.loss);
    }
    let (a, b) = (adapter_tensors(&tmp.path().join("adapters/a")), adapter_tensors(&tmp.path().join("adapters/b")));
    assert_eq!(a.len(), 3 * 7 * 2);
    for (k, va) in &a {
        let vb = &b[k];
        let diff = freeski_bot::util::compare::max_abs_diff(va, vb);
        assert!(diff < 1e-5, "{k}: resumed and uninterrupted differ by {diff}");
    }
    // The loss moved: the adapter learned something on its training data.
    assert!(straight.train_loss.last().unwrap().loss < straight.train_loss[0].loss);
    // A finished id is not trained over.
    let err = run("b").run(&NoHooks).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn bad_datasets_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_lm(&tmp.path().join("model"));
    let s = tiny_settings();
    let root = tmp.path();

    // Empty.
    write_jsonl(&root.join("empty"), "train.jsonl", &[]);
    let err = format!("{:#}", data::load(&root.join("empty"), &lm, &s, "").unwrap_err());
    assert!(err.contains("no usable training conversation"), "{err}");

    // Malformed lines are skipped and counted; with bad_lines = fail the line is named.
    let lines = vec![
        conv("How do I wax my skis at home?", "Iron on a temperature-appropriate wax, let it cool, scrape and brush."),
        "not json at all".to_string(),
        r#"{"messages": []}"#.to_string(),
        r#"{"messages": [{"role": "robot", "content": "beep"}]}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "no answer here"}]}"#.to_string(),
        conv("Best wax for spring slush?", "A warm-temperature wax with some fluoro-free additive, and structure helps more than you think."),
    ];
    write_jsonl(&root.join("messy"), "train.jsonl", &lines);
    let d = data::load(&root.join("messy"), &lm, &s, "").unwrap();
    assert_eq!((d.train.len(), d.train_report.malformed, d.train_report.lines), (2, 4, 6));
    let mut strict = s.clone();
    strict.bad_lines = BadLines::Fail;
    let err = format!("{:#}", data::load(&root.join("messy"), &lm, &strict, "").unwrap_err());
    assert!(err.contains("line 2"), "{err}");

    // Longer than max_len: cut, and dropped when no answer token is left.
    let mut short = s.clone();
    short.max_len = 24;
    let long_answer = "word ".repeat(60);
    let long_question = "why ".repeat(60);
    write_jsonl(&root.join("long"), "train.jsonl", &[conv("Short question?", &long_answer), conv(&long_question, "Short answer.")]);
    let d = data::load(&root.join("long"), &lm, &short, "").unwrap();
    assert_eq!((d.train.len(), d.train_report.truncated, d.train_report.too_long), (1, 2, 1));
    assert_eq!(d.train[0].len(), 24);

    // Text already rendered for another model's template/tokenizer.
    let foreign: Vec<String> = (0..4).map(|i| conv(&format!("<s>[INST] question {i} [/INST]"), "answer</s>")).collect();
    write_jsonl(&root.join("foreign"), "train.jsonl", &foreign);
    let err = format!("{:#}", data::load(&root.join("foreign"), &lm, &s, "").unwrap_err());
    assert!(err.contains("no usable") || err.contains("another model"), "{err}");
    let mut mixed = foreign.clone();
    mixed.extend((0..2).map(|i| conv(&format!("plain question {i}?"), "A plain answer with a few words.")));
    write_jsonl(&root.join("mixed"), "train.jsonl", &mixed);
    let err = format!("{:#}", data::load(&root.join("mixed"), &lm, &s, "").unwrap_err());
    assert!(err.contains("another model's tokenizer/template"), "{err}");

    // Missing folder.
    let err = format!("{:#}", data::load(&root.join("nope"), &lm, &s, "").unwrap_err());
    assert!(err.contains("does not exist"), "{err}");
}

/// A learning rate that blows the weights up: the run stops with a clear error on the first
/// non-finite loss, and the last good checkpoint stays loadable.
#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_lm(&tmp.path().join("model"));
    small_dataset(&tmp.path().join("data"));
    let mut s = tiny_settings();
    s.learning_rate = 1e30;
    s.warmup_steps = 0;
    s.max_grad_norm = 0.0;
    s.checkpoint_every = 1;
    s.eval_every = 0;
    let data = data::load(&tmp.path().join("data"), &lm, &s, "").unwrap();
    let dir = tmp.path().join("adapters/boom");
    let run = TrainRun { lm: &lm, reference: None, data: &data, settings: s, run_dir: dir.clone(), id: "boom".into(), base_model: "tiny".into() };
    let err = format!("{:#}", run.run(&NoHooks).unwrap_err());
    assert!(err.contains("diverged"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let ck = checkpoint::load(&dir, &Device::Cpu).unwrap().expect("checkpoint kept");
    assert!(ck.state.step >= 1);
    assert!(!dir.join("adapter_model.safetensors").exists(), "no adapter from a diverged run");
}

/// Labelled answers on random tokens: prompts of 6-9 tokens, answers of 3-6 (the loss on the
/// answer only); examples 0 and 1 share a prompt, as a correction and its original do.
fn labelled(rng: &mut ChaCha8Rng) -> Vec<PrefExample> {
    let labels = [true, false, true, false, false, true];
    let mut out: Vec<PrefExample> = Vec::new();
    for (i, &desirable) in labels.iter().enumerate() {
        let prompt: Vec<u32> = match i {
            1 => out[0].prompt().to_vec(),
            _ => (0..rng.random_range(6..10)).map(|_| rng.random_range(0..49152u32)).collect(),
        };
        let answer: Vec<u32> = (0..rng.random_range(3..7)).map(|_| rng.random_range(0..49152u32)).collect();
        let prompt_len = prompt.len();
        let target = (0..prompt_len + answer.len()).map(|t| t >= prompt_len).collect();
        out.push(PrefExample { ex: Example { ids: [prompt, answer].concat(), target }, prompt_len, desirable });
    }
    out
}

/// The KTO loss's gradient against central finite differences in f64, through both backwards,
/// with the KL baseline in play: the step's baseline is recomputed here from the mismatched pairs
/// by hand (it must be > 0, i.e. not clamped) and held fixed in the finite differences, since it
/// is not differentiated (as in TRL's `KTOTrainer` and the paper). Tolerance as for SFT.
#[test]
fn kto_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path());
    let params = random_params(&lm, 0.0, 5);
    let fwd = TrainForward::new(&lm.model, DType::F64, Dropout::off());
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let examples = labelled(&mut rng);
    let mut s = settings();
    s.batch_size = 3;
    s.max_len = 64;
    s.kto_beta = 0.5;
    let phase = KtoPhase::prepare(&fwd, None, &examples, &s).unwrap();
    assert_eq!(phase.paired(), 6, "every example has a partner with another prompt");
    let micro = vec![vec![0, 1, 2], vec![3, 4, 5]];
    let step = |checkpointing: bool| {
        let mut acc = GradAccum::new(&params).unwrap();
        let out = phase.accumulate_step(&fwd, &params, &micro, 3, checkpointing, &NoHooks, &mut acc).unwrap();
        (out, acc.grads().unwrap().iter().map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>())
    };
    let (out, analytic) = step(false);
    let (out_hand, by_hand) = step(true);
    assert!(out.loss.is_finite() && out.loss > 0.0);

    // The baseline by hand: each prompt with its partner's answer, policy against the base.
    let partners = kto::partners(&examples, s.seed);
    let pairs: Vec<Example> = partners.iter().enumerate().map(|(i, j)| kto::mismatched(&examples[i], &examples[j.unwrap()], s.max_len).unwrap()).collect();
    for (i, j) in partners.iter().enumerate() {
        assert_ne!(examples[i].prompt(), examples[j.unwrap()].prompt());
    }
    let pair_refs: Vec<&Example> = pairs.iter().collect();
    let policy_pairs = kto::logps(&fwd, Some(&params.view()), &pair_refs, 2).unwrap();
    let base_pairs = kto::logps(&fwd, None, &pair_refs, 2).unwrap();
    let z0 = policy_pairs.iter().zip(&base_pairs).map(|(p, r)| p - r).sum::<f64>() / 6.0;
    assert!(z0 > 0.01, "the KL baseline must be in play (not clamped): {z0}");
    assert!((out.kl - z0).abs() < 1e-9 && (out_hand.kl - z0).abs() < 1e-9, "baseline {} / {} vs by hand {z0}", out.kl, out_hand.kl);

    let exs: Vec<&Example> = examples.iter().map(|e| &e.ex).collect();
    let reference = kto::logps(&fwd, None, &exs, 4).unwrap();
    let labels: Vec<bool> = examples.iter().map(|e| e.desirable).collect();
    let loss = |p: &LoraParams| {
        let policy = kto::logps(&fwd, Some(&p.view()), &exs, 4).unwrap();
        kto::loss_terms(&policy, &reference, &labels, phase.weights, s.kto_beta, z0, 6.0).loss
    };
    assert!((loss(&params) - out.loss).abs() < 1e-9 && (loss(&params) - out_hand.loss).abs() < 1e-9, "step loss {} vs {}", out.loss, loss(&params));
    // With the baseline at 0 each answer's weight in the gradient is another number: the KL
    // term is not vacuous here.
    let policy = kto::logps(&fwd, Some(&params.view()), &exs, 4).unwrap();
    let with = kto::loss_terms(&policy, &reference, &labels, phase.weights, s.kto_beta, z0, 6.0).coef;
    let without = kto::loss_terms(&policy, &reference, &labels, phase.weights, s.kto_beta, 0.0, 6.0).coef;
    let moved = freeski_bot::util::compare::max_abs_diff(&with, &without) / freeski_bot::util::compare::max_abs(&with);
    assert!(moved > 1e-3, "the baseline moves the answers' weights by {moved} only");

    let mut checked = 0;
    for (((name, var), g), g_hand) in params.named_vars().into_iter().zip(&analytic).zip(&by_hand) {
        let gmax = freeski_bot::util::compare::max_abs(g);
        assert!(gmax.is_finite() && gmax > 0.0, "{name}: gradient {gmax}");
        let argmax = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        let mut picks = vec![argmax];
        picks.extend((0..3).map(|_| rng.random_range(0..g.len())));
        let orig: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        for &j in &picks {
            let at = |delta: f32| -> (f64, f64) {
                let mut v = orig.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                (loss(&params), v[j] as f64)
            };
            let (fp, xp) = at(1e-4);
            let (fm, xm) = at(-1e-4);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let fd = (fp - fm) / (xp - xm);
            for (path, g) in [("autograd", g), ("checkpointed", g_hand)] {
                let err = (fd - g[j] as f64).abs() / gmax;
                assert!(err < 1e-4, "{name}[{j}]: finite differences {fd:.6e}, {path} backward {:.6e} (error {err:.2e} of max {gmax:.3e})", g[j]);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 7 * 2 * 4);
}

/// The reference log-probabilities of KTO with the adapter off are those of a plain inference
/// forward of the base (`Model::forward` with no adapter, on the same weights dequantized), and
/// with the active adapter as reference, those of the inference forward with that adapter.
#[test]
fn reference_logps_are_a_plain_forward_of_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_lm(dir.path());
    let params = random_params(&lm, 0.0, 7);
    let fwd = TrainForward::new(&lm.model, DType::F32, Dropout::off());
    let examples = labelled(&mut ChaCha8Rng::seed_from_u64(3));
    let exs: Vec<&Example> = examples.iter().map(|e| &e.ex).collect();
    let exact = freeski_bot::bench::random::dequantized(&lm.model).unwrap();
    let adapter = params.to_adapter("active").unwrap();
    let inference = |e: &Example, adapter: Option<&freeski_bot::llm::lora::LoraAdapter>| -> f64 {
        let ids = Tensor::new(e.ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = exact.forward(&ids, &mut KvCache::new(1), adapter, Logits::All).unwrap().squeeze(0).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 1).unwrap().to_vec2::<f64>().unwrap();
        (1..e.len()).filter(|&t| e.target[t]).map(|t| logp[t - 1][e.ids[t] as usize]).sum()
    };
    let base = kto::logps(&fwd, None, &exs, 4).unwrap();
    let with_adapter = kto::logps(&fwd, Some(&LoraView::from_adapter(&adapter, lm.model.config().num_layers)), &exs, 4).unwrap();
    for (i, e) in exs.iter().enumerate() {
        let (b, a) = (inference(e, None), inference(e, Some(&adapter)));
        assert!((base[i] - b).abs() < 1e-5 * b.abs(), "example {i}: reference {} vs base forward {b}", base[i]);
        assert!((with_adapter[i] - a).abs() < 1e-5 * a.abs(), "example {i}: {} vs adapter forward {a}", with_adapter[i]);
        assert!((a - b).abs() > 1e-4, "the adapter changes the log-probability");
    }
}

fn feedback_line(q: &str, a: &str, label: bool) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": label}).to_string()
}

/// SFT then KTO, stopped at the phase boundary and again inside the KTO phase, resumes to the
/// adapter and history of an uninterrupted run; the metrics record both phases.
#[test]
fn sft_then_kto_resumes_across_the_phase_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_lm(&tmp.path().join("model"));
    let data_dir = tmp.path().join("data");
    small_dataset(&data_dir);
    let fb = [
        feedback_line("How do I butter?", "Press onto the tails and keep your chest over your knees.", true),
        feedback_line("How do I butter?", "Just lean back all the way lol", false),
        feedback_line("Best wax for spring?", "A warm-temperature wax, scraped thin.", true),
        feedback_line("Is a helmet needed?", "Nah.", false),
        feedback_line("Which skis for park?", "Twin tips around chin height.", true),
    ];
    write_jsonl(&data_dir, "feedback.jsonl", &fb);
    write_jsonl(
        &data_dir,
        "feedback_test.jsonl",
        &[feedback_line("Spin or flip first?", "Spins: they are easier to bail.", true), feedback_line("Spin or flip first?", "Backflips first.", false)],
    );
    let mut s = tiny_settings();
    s.max_steps = 3;
    s.eval_every = 0;
    s.checkpoint_every = 0;
    s.objective = Objective::Auto;
    s.kto_min_examples = 5;
    s.kto_max_steps = 3;
    s.kto_learning_rate = 1e-2;
    let data = data::load(&data_dir, &lm, &s, "").unwrap();
    assert_eq!((data.feedback.len(), data.feedback_test.len()), (5, 2));
    let run =
        |id: &str| TrainRun { lm: &lm, reference: None, data: &data, settings: s.clone(), run_dir: tmp.path().join("adapters").join(id), id: id.into(), base_model: "tiny".into() };
    let Outcome::Completed(straight) = run("straight").run(&NoHooks).unwrap() else { panic!("not completed") };
    assert_eq!(straight.objective, "sft+kto");
    let kto = straight.kto.as_ref().unwrap();
    assert_eq!((kto.from_step, kto.steps, kto.desirable, kto.undesirable), (3, 3, 3, 2));
    assert!(kto.preference.is_some() && kto.base_preference.is_some());
    assert!(straight.train_loss[..3].iter().all(|r| r.kl.is_none()) && straight.train_loss[3..].iter().all(|r| r.kl.is_some()));
    for stop_at in [3, 4] {
        let id = format!("stopped{stop_at}");
        let hooks = StopAfter { step: stop_at, seen: Cell::new(0) };
        assert!(matches!(run(&id).run(&hooks).unwrap(), Outcome::Cancelled { step } if step == stop_at));
        let Outcome::Completed(resumed) = run(&id).run(&NoHooks).unwrap() else { panic!("not completed") };
        assert_eq!(resumed.train_loss.len(), 6);
        for (x, y) in resumed.train_loss.iter().zip(&straight.train_loss) {
            assert!((x.loss - y.loss).abs() < 1e-5 && x.kl.is_some() == y.kl.is_some(), "stopped at {stop_at}, step {}: {x:?} vs {y:?}", x.step);
        }
        let (a, b) = (adapter_tensors(&tmp.path().join("adapters").join(&id)), adapter_tensors(&tmp.path().join("adapters/straight")));
        for (k, va) in &a {
            let diff = freeski_bot::util::compare::max_abs_diff(va, &b[k]);
            assert!(diff < 1e-5, "stopped at {stop_at}: {k} differs by {diff}");
        }
    }
    // Below kto_min_examples, auto is SFT alone; an explicit objective is refused without data.
    let s_min = TrainSettings { kto_min_examples: 6, ..s.clone() };
    let Outcome::Completed(sft) = TrainRun { settings: s_min, ..run("sft-only") }.run(&NoHooks).unwrap() else { panic!() };
    assert_eq!((sft.objective.as_str(), sft.steps), ("sft", 3));
    std::fs::remove_file(data_dir.join("feedback.jsonl")).unwrap();
    let no_fb = data::load(&data_dir, &lm, &s, "").unwrap();
    let err = TrainRun { data: &no_fb, settings: TrainSettings { objective: Objective::Kto, ..s.clone() }, ..run("kto-none") }.run(&NoHooks).unwrap_err();
    assert!(format!("{err:#}").contains("feedback.jsonl"), "{err:#}");
}
