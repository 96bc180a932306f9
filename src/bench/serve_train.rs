//! `bench serve-train`: answer latency (time to first token and total) with the engine idle,
//! then again while a QLoRA training run borrows the same base in the same process (yielding
//! between micro-batches while questions wait, as the worker does), and the peak device memory
//! of serving and training together; `--objective kto` trains with the preference objective
//! (reference log-probabilities, mismatched-pair KL forwards and the weighted backward).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::train::{MemoryCap, TrainShape};
use super::{median, BenchModel};
use crate::config::Settings;
use crate::llm::chat::ChatTemplate;
use crate::llm::device::{self, gib, MemoryPoller};
use crate::llm::engine::{AdapterChoice, Engine, EngineConfig, Event, Question};
use crate::llm::generate::GenOptions;
use crate::llm::load::{self, LoadedModel};
use crate::llm::sampling::SamplingParams;
use crate::llm::ModelConfig;
use crate::train::{data, Objective, Outcome, Progress, TrainHooks, TrainRun};

#[derive(Debug, Args)]
pub struct ServeTrainBench {
    /// With --random, the engine gets a byte-level tokenizer (random weights come without one).
    #[command(flatten)]
    pub source: BenchModel,
    /// Questions timed in each phase (one after the other).
    #[arg(long, default_value_t = 5)]
    pub questions: usize,
    /// Prompt length in tokens (about) and answer length.
    #[arg(long, default_value_t = 64)]
    pub prompt_words: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Shape of the training run beside the answers.
    #[command(flatten)]
    pub shape: TrainShape,
    #[command(flatten)]
    pub cap: MemoryCap,
    /// The training objective beside the answers: sft, kto or sft+kto (one SFT step, then KTO).
    #[arg(long, default_value = "sft", value_parser = parse_objective)]
    pub objective: Objective,
}

fn parse_objective(s: &str) -> std::result::Result<Objective, String> {
    match s.parse::<Objective>() {
        Ok(Objective::Auto) => Err("give sft, kto or sft+kto".into()),
        Ok(o) => Ok(o),
        Err(e) => Err(e.to_string()),
    }
}

/// A byte-level BPE tokenizer without merges (every byte one token) plus the ChatML tokens,
/// filled up to `vocab_size` with two-byte pieces so that every id a random model samples
/// decodes: enough to run the engine on random weights.
fn byte_tokenizer(vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 3).into());
    }
    'fill: for a in &alphabet {
        for b in &alphabet {
            if vocab.len() >= vocab_size {
                break 'fill;
            }
            let id = vocab.len();
            vocab.insert(format!("{a}{b}"), id.into());
        }
    }
    let added: Vec<_> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    json.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| anyhow::anyhow!("building the byte tokenizer: {e}"))
}

fn model(settings: &Settings, args: &ServeTrainBench, dev: &candle_core::Device) -> Result<LoadedModel> {
    let src = &args.source;
    let Some(shape) = &src.random else { return load::load(&settings.model, src.model.as_deref(), dev) };
    let cfg = ModelConfig::preset(shape)?;
    let model = src.quant.random_model(&cfg, 1, dev)?;
    let tokenizer = byte_tokenizer(cfg.vocab_size)?;
    let im_end = tokenizer.token_to_id("<|im_end|>").context("byte tokenizer without <|im_end|>")?;
    Ok(LoadedModel { model, tokenizer, template: ChatTemplate::ChatMl, stop_ids: vec![im_end], bos_id: None, name: format!("random {shape}"), source: String::new() })
}

fn words(rng: &mut ChaCha8Rng, n: usize) -> String {
    const W: [&str; 12] = ["powder", "park", "switch", "carve", "rail", "kicker", "wax", "edge", "bindings", "boots", "slush", "groomer"];
    (0..n).map(|_| W[rng.random_range(0..W.len())]).collect::<Vec<_>>().join(" ")
}

/// A synthetic dataset folder (train.jsonl, test.jsonl) of conversations about `seq` tokens long.
fn synthetic_dataset(dir: &Path, seq: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (file, n) in [("train.jsonl", 64), ("test.jsonl", 4)] {
        let lines: Vec<String> = (0..n)
            .map(|_| {
                serde_json::json!({"messages": [{"role": "user", "content": words(&mut rng, seq / 16)}, {"role": "assistant", "content": words(&mut rng, seq / 4)}]}).to_string()
            })
            .collect();
        std::fs::write(dir.join(file), lines.join("\n") + "\n")?;
    }
    // Labelled answers for KTO: a good and a bad answer to each of 32 questions.
    let mut lines = Vec::new();
    for _ in 0..32 {
        let q = words(&mut rng, seq / 16);
        for label in [true, false] {
            lines.push(serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": words(&mut rng, seq / 4)}], "label": label}).to_string());
        }
    }
    std::fs::write(dir.join(crate::dataset::output::FEEDBACK), lines.join("\n") + "\n")?;
    Ok(())
}

/// Time to first token and total time of `n` questions asked one after the other.
fn timed_answers(engine: &Engine, n: usize, prompt_words: usize, new_tokens: usize) -> Result<Vec<(Duration, Duration)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let opts = GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: new_tokens, stop: vec![], seed: 1, max_context: 4096 };
    let mut out = Vec::new();
    for _ in 0..n {
        let q = Question { history: vec![], question: words(&mut rng, prompt_words), opts: opts.clone(), adapter: AdapterChoice::Active };
        let t0 = Instant::now();
        let (first, _) = first_token(engine, q, t0)?;
        out.push((first, t0.elapsed()));
    }
    Ok(out)
}

/// Submits `q` and waits for its end; returns the time from `t0` to its first *token* and the
/// adapter it ran with. First token, not first visible text (random weights often sample byte
/// pieces that decode to text only later): the wait until the engine starts the question plus
/// the generation's own prefill-and-sample time.
fn first_token(engine: &Engine, q: Question, t0: Instant) -> Result<(Duration, Option<String>)> {
    let mut ticket = engine.submit(q).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut started, mut adapter) = (Duration::ZERO, None);
    loop {
        match ticket.blocking_next() {
            Some(Event::Started { adapter_id, .. }) => (started, adapter) = (t0.elapsed(), adapter_id),
            Some(Event::Finished(g)) => return Ok((started + g.time_to_first_token, adapter)),
            Some(Event::Failed(e)) => anyhow::bail!("answer failed: {e}"),
            None => anyhow::bail!("the engine stopped"),
            Some(Event::Text(_)) => {}
        }
    }
}

struct HotSwap {
    call: Duration,
    first_token: Duration,
    repeats: usize,
}

/// Time from `swap_adapter` to the first token of the next question, which must report the new
/// adapter; alternates between two random adapters (loaded beforehand, as the worker's gate
/// loads and validates before it swaps) and ends with the bare base active again.
fn hot_swap(engine: &Engine, cfg: &ModelConfig, rank: usize, dev: &candle_core::Device) -> Result<HotSwap> {
    let make = |id: &str| -> Result<Arc<crate::llm::lora::LoraAdapter>> {
        let mut a = super::random_adapter(cfg, rank, dev)?;
        a.id = id.to_string();
        Ok(Arc::new(a))
    };
    let adapters = [make("swap-a")?, make("swap-b")?];
    let opts = GenOptions { sampling: SamplingParams::greedy(), max_new_tokens: 1, stop: vec![], seed: 1, max_context: 4096 };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut calls, mut firsts) = (Vec::new(), Vec::new());
    for i in 0..6 {
        let adapter = &adapters[i % 2];
        let q = Question { history: vec![], question: words(&mut rng, 16), opts: opts.clone(), adapter: AdapterChoice::Active };
        let t0 = Instant::now();
        engine.swap_adapter(Some(adapter.clone()));
        calls.push(t0.elapsed());
        let (first, used) = first_token(engine, q, t0)?;
        anyhow::ensure!(used.as_deref() == Some(adapter.id.as_str()), "the answer after the swap used {used:?}");
        // The first round warms the adapter path up; it is not counted.
        if i > 0 {
            firsts.push(first);
        }
    }
    engine.swap_adapter(None);
    Ok(HotSwap { call: median(&calls), first_token: median(&firsts), repeats: firsts.len() })
}

/// The worker's yielding, without the store and Discord.
struct BenchHooks<'a> {
    engine: &'a Engine,
    stop: &'a AtomicBool,
    steps: &'a AtomicUsize,
}

impl TrainHooks for BenchHooks<'_> {
    fn progress(&self, p: &Progress) {
        self.steps.store(p.step, Ordering::SeqCst);
    }
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn before_micro_batch(&self) {
        while self.engine.has_waiting() && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn run(settings: &Settings, args: ServeTrainBench) -> Result<()> {
    let dev = device::parse_device(args.source.device.as_deref().unwrap_or(&settings.model.device))?;
    let poller = MemoryPoller::start(&dev);
    let ballast = args.cap.apply(&dev)?;
    let held_back = ballast.as_ref().map_or(0, |b| b.bytes);
    let lm = Arc::new(model(settings, &args, &dev)?);
    let engine = Engine::start(lm.clone(), None, EngineConfig { queue_capacity: 8, max_batch: 1, system_prompt: String::new() })?;
    // Warm-up (kernels, allocator), then the idle phase.
    timed_answers(&engine, 1, args.prompt_words, 4)?;
    let idle = timed_answers(&engine, args.questions, args.prompt_words, args.new_tokens)?;
    // A ~100-token question on the idle engine (random words are ~6 byte-level tokens each).
    let short = timed_answers(&engine, args.questions, 16, 1)?;
    let swap = hot_swap(&engine, lm.model.config(), args.shape.rank, &dev)?;

    let tmp: PathBuf = std::env::temp_dir().join(format!("freeski-bench-serve-train-{}", std::process::id()));
    synthetic_dataset(&tmp.join("data"), args.shape.seq)?;
    let mut ts = settings.train.clone();
    (ts.rank, ts.max_len, ts.batch_size, ts.grad_accum) = (args.shape.rank, args.shape.seq, args.shape.batch, 1);
    (ts.max_steps, ts.eval_every, ts.checkpoint_every, ts.early_stop_patience, ts.use_system_prompt) = (1_000_000, 0, 0, 0, false);
    ts.objective = args.objective;
    ts.kto_max_steps = 1_000_000;
    if args.objective == Objective::SftKto {
        ts.max_steps = 1;
    }
    // Answers are timed once the objective under test is running.
    let first_measured_step = if args.objective == Objective::SftKto { 2 } else { 1 };
    let data = data::load(&tmp.join("data"), &lm, &ts, "")?;
    let (stop, steps) = (AtomicBool::new(false), AtomicUsize::new(0));
    let result = std::thread::scope(|scope| -> Result<(Vec<(Duration, Duration)>, usize)> {
        let trainer = scope.spawn(|| {
            let hooks = BenchHooks { engine: &engine, stop: &stop, steps: &steps };
            TrainRun { lm: &lm, reference: None, data: &data, settings: ts.clone(), run_dir: tmp.join("run"), id: "bench".into(), base_model: lm.name.clone() }.run(&hooks)
        });
        // Questions arrive while training is under way.
        while steps.load(Ordering::SeqCst) < first_measured_step && !trainer.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let measured = timed_answers(&engine, args.questions, args.prompt_words, args.new_tokens);
        let during_from = steps.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        let outcome = trainer.join().map_err(|_| anyhow::anyhow!("the training thread panicked"))?;
        anyhow::ensure!(matches!(outcome?, Outcome::Cancelled { .. }), "training ended before the measurement");
        Ok((measured?, steps.load(Ordering::SeqCst).saturating_sub(during_from)))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    let (busy, steps_during) = result?;
    engine.shutdown();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "serve + train ({}): {} on {}, {} questions per phase, ~{} prompt words, {} new tokens; training seq {} batch {} rank {}",
        args.objective.name(),
        lm.name,
        device::describe(&dev),
        args.questions,
        args.prompt_words,
        args.new_tokens,
        args.shape.seq,
        args.shape.batch,
        args.shape.rank
    );
    for (label, v) in [("idle", &idle), ("while training", &busy)] {
        println!(
            "{label:<16} TTFT median {:.1} ms (max {:.1}), total median {:.1} ms",
            ms(median(&v.iter().map(|x| x.0).collect::<Vec<_>>())),
            ms(v.iter().map(|x| x.0).max().unwrap_or_default()),
            ms(median(&v.iter().map(|x| x.1).collect::<Vec<_>>()))
        );
    }
    println!("training steps done while answering: {steps_during}");
    println!(
        "idle, ~100-token question: TTFT median {:.1} ms (max {:.1})",
        ms(median(&short.iter().map(|x| x.0).collect::<Vec<_>>())),
        ms(short.iter().map(|x| x.0).max().unwrap_or_default())
    );
    println!(
        "hot-swap         swap call {:.3} ms; first token of the next question, with the new adapter, {:.1} ms after the call (median of {}, ~100-token questions, LoRA r={})",
        ms(swap.call),
        ms(swap.first_token),
        swap.repeats,
        args.shape.rank
    );
    match &poller {
        Some(p) => {
            let peak = p.peak() - held_back;
            println!(
                "device memory    {:.2} GiB peak used ({:.2} GB) for serve + train, {:.2} GiB before the model, of {:.2} GiB",
                gib(peak),
                peak as f64 / 1e9,
                gib(p.baseline),
                gib(p.total)
            );
            println!("process peak     {:.2} GB above the pre-model baseline (CUDA context)", (peak - p.baseline) as f64 / 1e9);
        }
        None => println!("peak host RSS    {:.2} GiB (the CPU reports no device memory)", gib(device::peak_rss_bytes().unwrap_or(0))),
    }
    if let Some(p) = device::pool_peaks(&dev) {
        println!(
            "allocator        {:.2} GB peak in live tensors (weights included), {:.2} GB peak reserved by candle's CUDA pool",
            p.used_high as f64 / 1e9,
            p.reserved_high as f64 / 1e9
        );
    }
    Ok(())
}
