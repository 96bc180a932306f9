//! `bench …`: speed and memory measurements that print numbers (recorded in BENCHMARKS.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{QuantType, Settings};
use crate::llm::device::{self, gib};
use crate::llm::fused_decode::RowKernels;
use crate::llm::lora::{AdapterConfig, LoraAdapter};
use crate::llm::model::{KvCache, Logits, Model, Proj};
use crate::llm::{load, random, sampling};
use crate::train::dropout::{Dropout, MaskKey};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode speed, time to first token and peak memory of the model.
    Generate(GenerateBench),
    /// Compare logits of a tiny random model on the CPU and on another device.
    Parity(ParityBench),
    /// Forum page parsing speed and peak memory of `dataset build` on a generated store.
    Parse(super::bench_parse::ParseBench),
    /// Tokens/s and peak device memory of a QLoRA training step.
    Train(super::bench_train::TrainBench),
    /// Answer latency idle vs while training on the same base, and peak memory of both.
    ServeTrain(super::bench_serve_train::ServeTrainBench),
    /// Questions of different lengths through the engine, alone and all at once with an
    /// adapter active: every answer must be the same both ways (fails otherwise).
    Batching(BatchingBench),
}

#[derive(Debug, Args)]
pub struct BatchingBench {
    /// Model file, folder or hub id with a tokenizer (default: model.source).
    #[arg(long)]
    pub model: Option<String>,
    /// cpu or cuda:N (default: model.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Random LoRA adapter of this rank on all seven projections (0 = bare base).
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Tokens generated for each question.
    #[arg(long, default_value_t = 48)]
    pub new_tokens: usize,
    /// Questions arriving one after another while 7 long answers decode (time to first token
    /// under load; 0 = skip).
    #[arg(long, default_value_t = 20)]
    pub arrivals: usize,
}

#[derive(Debug, Args)]
pub struct GenerateBench {
    #[command(flatten)]
    pub source: BenchModel,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Prompt length for the time-to-first-token measurement.
    #[arg(long, default_value_t = 100)]
    pub ttft_tokens: usize,
    /// Tokens decoded at batch 1.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Concurrent sequences for the batched-decode measurement (0 or 1 = skip it).
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Attach a random LoRA adapter of this rank on all seven projections (0 = none).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Repeats of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Also time everything through candle's ops alone (no fused decode, 4-bit prompt kernels).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub compare: bool,
    /// Replay the fused decode step as a CUDA graph (false: launch each kernel every step).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub graphs: bool,
    /// Matvec kernels for 1-2 rows: `exact` (the default: a row's output never depends on the
    /// batch) or `fastest` (the quicker kernel at 1-2 rows, which sums in another order).
    #[arg(long, value_enum, default_value = "exact")]
    pub row_kernels: RowKernelsArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RowKernelsArg {
    Exact,
    Fastest,
}

impl From<RowKernelsArg> for RowKernels {
    fn from(a: RowKernelsArg) -> Self {
        match a {
            RowKernelsArg::Exact => RowKernels::Exact,
            RowKernelsArg::Fastest => RowKernels::Fastest,
        }
    }
}

/// Which model a benchmark runs: a file, or random weights of a named shape.
#[derive(Debug, Args)]
pub struct BenchModel {
    /// Model file/folder/hub id (default: model.source). Ignored with --random.
    #[arg(long)]
    pub model: Option<String>,
    /// Random weights of a named shape instead of a file: mistral-7b, smollm2-135m, tiny.
    #[arg(long)]
    pub random: Option<String>,
    /// Weight type for --random.
    #[arg(long, value_enum, default_value = "q4k")]
    pub quant: BenchQuant,
    /// cpu or cuda:N (default: model.device).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchQuant {
    Q4k,
    /// llama.cpp's Q4_K_M mix: Q6_K for attention values, MLP down and the head, else Q4_K.
    #[value(name = "q4k-m")]
    Q4kM,
    Q6k,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BenchQuant {
    /// The type of tensor `name` in a random model of this kind.
    pub(crate) fn type_of(self, name: &str) -> GgmlDType {
        let one = match self {
            Self::Q4kM => return random::q4k_m_type(name),
            Self::Q6k => return GgmlDType::Q6K,
            Self::Q4k => QuantType::Q4k,
            Self::Q4_0 => QuantType::Q4_0,
            Self::Q4_1 => QuantType::Q4_1,
            Self::Q8_0 => QuantType::Q8_0,
        };
        crate::llm::load::hf_dir::ggml_type(one)
    }

    /// A random model of shape `cfg` with this kind's weight types.
    pub(crate) fn random_model(self, cfg: &crate::llm::ModelConfig, seed: u64, dev: &Device) -> Result<Model> {
        random::random_model_with(cfg, |name| self.type_of(name), seed, dev)
    }
}

#[derive(Debug, Args)]
pub struct ParityBench {
    /// The device to compare against the CPU.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Largest allowed |difference| relative to the largest |logit|, exact f32 path.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Same for quantized weights against the exact f32 result (8-bit activation rounding).
    #[arg(long, default_value_t = 5e-2)]
    pub quantized_tolerance: f64,
}

pub fn run(settings: &Settings, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(args) => bench_generate(settings, args),
        BenchCommand::Parity(args) => bench_parity(args),
        BenchCommand::Parse(args) => super::bench_parse::run(args),
        BenchCommand::Train(args) => super::bench_train::run(settings, args),
        BenchCommand::ServeTrain(args) => super::bench_serve_train::run(settings, args),
        BenchCommand::Batching(args) => bench_batching(settings, args),
    }
}

/// Eight questions of different lengths; odd ones greedy, even ones sampled with their own seed.
const BATCHING_QUESTIONS: [&str; 8] = [
    "hi",
    "What is a butter?",
    "park or pipe?",
    "Which wax works best in very cold, dry powder snow at high altitude in January?",
    "How do I land a switch 900 without catching an edge on the knuckle of a big jump?",
    "Is a 100 mm waist ski too wide for a first season in the park?",
    "My boots hurt on the outside of my foot after an hour of riding, the shop says they fit. What should I try before buying new ones, and is heat moulding worth it for a liner that is three seasons old?",
    "Best way to learn rails?",
];

fn bench_batching(settings: &Settings, args: BatchingBench) -> Result<()> {
    use crate::llm::engine::{AdapterChoice, Engine, EngineConfig, Event, Question, Ticket};
    use crate::llm::generate::GenOptions;
    use std::sync::Arc;
    let dev = device::parse_device(args.device.as_deref().unwrap_or(&settings.model.device))?;
    let lm = load::load(&settings.model, args.model.as_deref(), &dev)?;
    let label = lm.name.clone();
    let adapter = match args.lora_rank {
        0 => None,
        r => Some(Arc::new(random_adapter(lm.model.config(), r, &dev)?)),
    };
    let fused = lm.model.fused_decode_active()?;
    let rows = lm.model.invariant_batch_rows()?;
    let engine = Engine::start(Arc::new(lm), adapter, EngineConfig { queue_capacity: 64, max_batch: 8, system_prompt: settings.generation.system_prompt.clone() })?;
    let question = |i: usize| {
        let mut opts = GenOptions::from_settings(&settings.generation, settings.model.max_context, engine.model().model.config());
        opts.max_new_tokens = args.new_tokens;
        opts.stop.clear();
        opts.seed = 1000 + i as u64;
        if i.is_multiple_of(2) {
            opts.sampling = sampling::SamplingParams::greedy();
        }
        Question { history: vec![], question: BATCHING_QUESTIONS[i].into(), opts, adapter: AdapterChoice::Active }
    };
    // (batch size it ran in, tokens, time to first token)
    let answer = |mut t: Ticket| -> Result<(usize, Vec<u32>, Duration)> {
        let mut batch = 0;
        while let Some(ev) = t.blocking_next() {
            match ev {
                Event::Started { batch: b, .. } => batch = b,
                Event::Text(_) => {}
                Event::Finished(g) => return Ok((batch, g.tokens, g.time_to_first_token)),
                Event::Failed(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        anyhow::bail!("the engine stopped before answering")
    };
    let n = BATCHING_QUESTIONS.len();
    let alone = (0..n).map(|i| answer(engine.submit(question(i))?)).collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let tickets = (0..n).map(|i| Ok(engine.submit(question(i))?)).collect::<Result<Vec<_>>>()?;
    let prompt_tokens: Vec<usize> = tickets.iter().map(|t| t.prompt_tokens).collect();
    let together = tickets.into_iter().map(answer).collect::<Result<Vec<_>>>()?;
    let wall = t0.elapsed();
    println!("model            {label}");
    println!("device           {}", device::describe(&dev));
    println!("lora             {}", if args.lora_rank == 0 { "none".to_string() } else { format!("r={} on all 7 projections", args.lora_rank) });
    println!(
        "decode path      {}; rows decoded together without changing a row: {}",
        if fused { "fused CUDA step" } else { "candle ops" },
        if rows == usize::MAX { "any".to_string() } else { rows.to_string() }
    );
    let mut equal = 0;
    for (i, ((_, want, _), (batch, got, ttft))) in alone.iter().zip(&together).enumerate() {
        let same = got == want;
        equal += same as usize;
        println!(
            "question {i} ({:>3} prompt tokens, {}): ran in a batch of {batch}, {} tokens, first token {:.1} ms, {}",
            prompt_tokens[i],
            if i % 2 == 0 { "greedy" } else { "sampled" },
            got.len(),
            ttft.as_secs_f64() * 1e3,
            if same {
                "same as alone".to_string()
            } else {
                format!("DIFFERS from alone at token {}", got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len())))
            }
        );
    }
    let tokens: usize = together.iter().map(|t| t.1.len()).sum();
    println!("together         {tokens} tokens in {:.2} s ({:.1} tokens/s aggregate, queueing included)", wall.as_secs_f64(), tokens as f64 / wall.as_secs_f64());

    // Questions arriving while the batch decodes: 7 long answers run, then short questions
    // come one after another and join at the next step (continuous batching).
    let long_question = |i: usize| {
        let mut q = question(i);
        q.opts.max_new_tokens = 3000;
        q
    };
    let mut running = (0..7).map(|i| Ok(engine.submit(long_question(i))?)).collect::<Result<Vec<_>>>()?;
    for t in running.iter_mut() {
        while let Some(ev) = t.blocking_next() {
            match ev {
                Event::Text(_) => break,
                Event::Failed(e) => anyhow::bail!("generation failed: {e}"),
                _ => {}
            }
        }
    }
    let t1 = Instant::now();
    let (mut arrivals, mut arrival_tokens) = (Vec::new(), 0);
    for k in 0..args.arrivals {
        let mut q = question(k % n);
        q.opts.max_new_tokens = 16;
        let (_, toks, ttft) = answer(engine.submit(q)?)?;
        arrivals.push(ttft);
        arrival_tokens += toks.len();
    }
    let phase = t1.elapsed();
    let mut long_tokens = 0;
    for t in running.iter_mut() {
        t.canceller().cancel();
        while let Some(ev) = t.blocking_next() {
            if let Event::Finished(g) = ev {
                long_tokens += g.tokens.len();
            }
        }
    }
    // The long answers' tokens include their first few before the phase: a slight over-count.
    let total = long_tokens + arrival_tokens;
    arrivals.sort();
    let pct = |p: f64| arrivals[((arrivals.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    if !arrivals.is_empty() {
        println!(
            "mid-batch        {} questions arriving one after another beside 7 running answers: time to first token p50 {:.1} ms, p95 {:.1} ms; {:.1} tokens/s aggregate over {:.2} s",
            arrivals.len(),
            pct(0.5),
            pct(0.95),
            total as f64 / phase.as_secs_f64(),
            phase.as_secs_f64()
        );
    }
    engine.shutdown();
    println!("answers equal to the same question alone: {equal}/{n}");
    ensure!(equal == n, "{} of {n} answers changed when batched", n - equal);
    Ok(())
}

fn bench_generate(settings: &Settings, args: GenerateBench) -> Result<()> {
    let src = &args.source;
    let dev = device::parse_device(src.device.as_deref().unwrap_or(&settings.model.device))?;
    let t0 = Instant::now();
    let (mut model, label) = match &src.random {
        Some(shape) => {
            let cfg = crate::llm::ModelConfig::preset(shape)?;
            (src.quant.random_model(&cfg, 1, &dev)?, format!("random {shape} ({:?})", src.quant))
        }
        None => {
            let lm = load::load(&settings.model, src.model.as_deref(), &dev)?;
            let name = lm.name.clone();
            (lm.model, name)
        }
    };
    sync(&dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let adapter = match args.lora_rank {
        0 => None,
        r => Some(random_adapter(&cfg, r, &dev)?),
    };
    let adapter = adapter.as_ref();

    // candle frees device buffers as tensors drop, so "used" right after a forward (logits and
    // KV cache still alive) is the high-water mark; sample it at each of those points.
    let mut peak_dev: Option<(u64, u64)> = None;
    model.set_decode_graphs(args.graphs)?;
    model.set_decode_row_kernels(args.row_kernels.into())?;
    let fast = time_paths(&model, adapter, &args, &mut peak_dev)?;
    let fused = model.fused_decode_active()?;
    let launches = model.fused_launches_per_step();
    // The same measurements through candle's ops alone (4-bit kernels for prompts too), for the
    // before/after in one run on one card.
    let candle = if args.compare && dev.is_cuda() {
        model.set_fused_decode(false);
        model.set_dense_prefill_rows(usize::MAX);
        Some(time_paths(&model, adapter, &args, &mut peak_dev)?)
    } else {
        None
    };
    let rss = device::peak_rss_bytes().unwrap_or(0);
    let devmem = peak_dev;

    println!("model            {label}");
    println!("device           {}", device::describe(&dev));
    println!("weights          {:.2} GiB on device, {} params, load {:.1} s", gib(model.weight_bytes() as u64), cfg.num_params(), load_s);
    println!("lora             {}", if args.lora_rank == 0 { "none".to_string() } else { format!("r={} on all 7 projections", args.lora_rank) });
    println!(
        "decode path      {}",
        match launches {
            Some(n) if fused =>
                format!("fused CUDA step, {n} kernel launches per token{}, {:?} row kernels", if args.graphs { ", replayed as one CUDA graph" } else { "" }, args.row_kernels),
            _ => "candle ops".into(),
        }
    );
    let vs = |now: f64, before: Option<f64>, unit: &str| match before {
        Some(b) => format!(" [candle ops: {b:.1} {unit}, {:.2}x]", now / b),
        None => String::new(),
    };
    let c = candle.as_ref();
    println!("prefill          {:.1} tokens/s ({} tokens){}", fast.prefill_tps, args.prompt_tokens, vs(fast.prefill_tps, c.map(|c| c.prefill_tps), "tokens/s"));
    println!("time to first    {:.1} ms ({}-token prompt){}", fast.ttft_ms, args.ttft_tokens, c.map(|c| format!(" [candle ops: {:.1} ms]", c.ttft_ms)).unwrap_or_default());
    println!("decode batch 1   {:.1} tokens/s ({} tokens){}", fast.decode_tps, args.decode_tokens, vs(fast.decode_tps, c.map(|c| c.decode_tps), "tokens/s"));
    if let Some(b) = &fast.batched {
        println!(
            "decode batch {:<3} {:.1} tokens/s aggregate ({:.2}x batch 1); greedy outputs equal to one-at-a-time decoding for {}/{} sequences{}",
            b.streams,
            b.tokens_per_s,
            b.tokens_per_s / fast.decode_tps,
            b.identical,
            b.streams,
            vs(b.tokens_per_s, c.and_then(|c| c.batched.as_ref()).map(|b| b.tokens_per_s), "tokens/s")
        );
    }
    println!("peak host RSS    {:.2} GiB", gib(rss));
    if let Some((used, total)) = devmem {
        println!("device memory    {:.2} GiB peak used of {:.2} GiB (whole device, as the driver reports)", gib(used), gib(total));
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "model": label, "device": device::describe(&dev), "lora_rank": args.lora_rank,
            "fused_decode": fused, "fused_launches_per_token": launches, "decode_graphs": args.graphs,
            "prompt_tokens": args.prompt_tokens, "ttft_prompt_tokens": args.ttft_tokens, "decode_tokens": args.decode_tokens,
            "fast": fast.json(), "candle_ops": c.map(PathTimes::json),
            "peak_rss_bytes": rss, "device_peak_used_bytes": devmem.map(|d| d.0), "weight_bytes": model.weight_bytes(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One path's numbers (`bench generate`).
struct PathTimes {
    prefill_tps: f64,
    ttft_ms: f64,
    decode_tps: f64,
    batched: Option<Batched>,
}

impl PathTimes {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "prefill_tokens_per_s": self.prefill_tps, "ttft_ms": self.ttft_ms, "decode_tokens_per_s": self.decode_tps,
            "batched_streams": self.batched.as_ref().map(|b| b.streams), "batched_tokens_per_s": self.batched.as_ref().map(|b| b.tokens_per_s),
            "batched_identical": self.batched.as_ref().map(|b| b.identical),
        })
    }
}

/// Prefill, time to first token, batch-1 decode and batched decode of `model` as it is set up
/// (same random prompts on every call), each the median of `args.repeats`.
fn time_paths(model: &Model, adapter: Option<&LoraAdapter>, args: &GenerateBench, peak_dev: &mut Option<(u64, u64)>) -> Result<PathTimes> {
    let cfg = model.config();
    let dev = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut prompt = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..cfg.vocab_size as u32)).collect() };
    let reps = args.repeats.max(1);
    let mut sample = || {
        if let Some((used, total)) = device::device_memory(dev) {
            *peak_dev = Some((peak_dev.map_or(used, |p| p.0.max(used)), total));
        }
    };
    // Warm up kernels, cuBLAS and the allocator once on every shape timed below (the long
    // prompt may take the dense GEMM path and the short one candle's 4-bit kernels).
    for n in [args.prompt_tokens, args.ttft_tokens] {
        let mut warm = KvCache::new(1);
        let tok = greedy_step(model, &mut warm, &prompt(n.max(2)), adapter)?;
        greedy_step(model, &mut warm, &[tok], adapter)?;
    }

    let mut prefill = Vec::new();
    for _ in 0..reps {
        let p = prompt(args.prompt_tokens);
        let t = Instant::now();
        let mut cache = KvCache::new(1);
        greedy_step(model, &mut cache, &p, adapter)?;
        prefill.push(t.elapsed());
        sample();
    }
    let mut ttft = Vec::new();
    for _ in 0..reps {
        let p = prompt(args.ttft_tokens);
        let t = Instant::now();
        greedy_step(model, &mut KvCache::new(1), &p, adapter)?;
        ttft.push(t.elapsed());
    }
    let mut decode = Vec::new();
    for _ in 0..reps {
        let mut cache = KvCache::new(1);
        let mut tok = greedy_step(model, &mut cache, &prompt(32), adapter)?;
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            tok = greedy_step(model, &mut cache, &[tok], adapter)?;
        }
        decode.push(t.elapsed());
        sample();
    }
    let batched = match args.streams {
        0 | 1 => None,
        // Different lengths, as real questions are (the batch pads each row to the longest).
        n => Some(batched_decode(model, adapter, &(0..n).map(|i| prompt(32 + 9 * i)).collect::<Vec<_>>(), args.decode_tokens, reps)?),
    };
    Ok(PathTimes {
        prefill_tps: args.prompt_tokens as f64 / median(&prefill).as_secs_f64(),
        ttft_ms: median(&ttft).as_secs_f64() * 1e3,
        decode_tps: args.decode_tokens as f64 / median(&decode).as_secs_f64(),
        batched,
    })
}

struct Batched {
    streams: usize,
    tokens_per_s: f64,
    /// Sequences whose greedy tokens match decoding them one at a time.
    identical: usize,
}

/// Greedy decode of `prompts` (of different lengths) as one batch the way answers share the
/// engine's steps (each prompt prefilled alone, the caches merged), timed over `tokens` steps
/// (median of `reps`), and each prompt alone for the outputs the batch must reproduce.
fn batched_decode(model: &Model, adapter: Option<&LoraAdapter>, prompts: &[Vec<u32>], tokens: usize, reps: usize) -> Result<Batched> {
    let n = prompts.len();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = KvCache::new(1);
            let mut out = vec![greedy_step(model, &mut cache, p, adapter)?];
            for _ in 1..tokens {
                out.push(greedy_step(model, &mut cache, &[*out.last().expect("one token")], adapter)?);
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let step = |cache: &mut KvCache, ids: Vec<u32>| -> Result<Vec<u32>> {
        let logits = model.forward(&Tensor::from_vec(ids, (n, 1), model.device())?, cache, adapter, Logits::Last)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat.chunks(flat.len() / n).map(sampling::argmax).collect())
    };
    let mut times = Vec::new();
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); n];
    for _ in 0..reps.max(1) {
        let mut caches = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for p in prompts {
            let mut c = KvCache::new(1);
            next.push(greedy_step(model, &mut c, p, adapter)?);
            caches.push(c);
        }
        let mut cache = KvCache::merge(caches)?;
        outs = next.iter().map(|&t| vec![t]).collect();
        let t = Instant::now();
        for _ in 1..tokens {
            next = step(&mut cache, next)?;
            for (o, &tok) in outs.iter_mut().zip(&next) {
                o.push(tok);
            }
        }
        times.push(t.elapsed());
    }
    let identical = outs.iter().zip(&alone).filter(|(a, b)| a == b).count();
    let tokens_per_s = (n * tokens.saturating_sub(1)) as f64 / median(&times).as_secs_f64();
    Ok(Batched { streams: n, tokens_per_s, identical })
}

/// Feed `ids` after what `cache` holds and pick the next token greedily. Pulling the logits to
/// the host is part of every real step (sampling), so it is inside every timing.
fn greedy_step(model: &Model, cache: &mut KvCache, ids: &[u32], adapter: Option<&LoraAdapter>) -> Result<u32> {
    let logits = model.forward(&Tensor::new(ids, model.device())?.unsqueeze(0)?, cache, adapter, Logits::Last)?;
    Ok(sampling::argmax(&logits.flatten_all()?.to_vec1::<f32>()?))
}

pub(crate) fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Middle value (zero for none).
pub(crate) fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A LoRA adapter with random A and B (B non-zero, so the adapter path really computes).
pub fn random_adapter(cfg: &crate::llm::ModelConfig, r: usize, dev: &Device) -> Result<LoraAdapter> {
    let mut tensors = HashMap::new();
    for layer in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (fan_in, fan_out) = p.shape(cfg);
            let base = format!("base_model.model.model.layers.{layer}.{}", p.hf_path());
            tensors.insert(format!("{base}.lora_A.weight"), (Tensor::randn(0f32, 1.0, (r, fan_in), dev)? / (fan_in as f64).sqrt())?);
            tensors.insert(format!("{base}.lora_B.weight"), (Tensor::randn(0f32, 1.0, (fan_out, r), dev)? * 1e-3)?);
        }
    }
    let config = AdapterConfig::new(r, 2.0 * r as f64, 0.0, &Proj::ALL, "random", false);
    LoraAdapter::from_hf_tensors(format!("random-r{r}"), config, tensors, cfg)
}

/// The training dropout (a CUDA kernel on the GPU, Rust on the CPU) on the same input and key:
/// forward and backward must match exactly. Returns the element count and the largest difference.
fn dropout_parity(dev: &Device, dtype: DType, seed: u64) -> Result<(usize, f64)> {
    let d = Dropout { p: 0.05, seed };
    let key = MaskKey { step: 3, micro: 1, layer: 17, proj: 6 };
    // An odd size, so a tail that is not a multiple of the launch's block is covered too.
    let x = Tensor::randn(0f32, 1.0, (3, 1000, 4099), &Device::Cpu)?.to_dtype(dtype)?;
    let both = |x: &Tensor| -> Result<(Tensor, Tensor)> {
        let v = candle_core::Var::from_tensor(x)?;
        let y = d.apply(v.as_tensor(), key)?;
        let g = (&y * 3.0)?.sum_all()?.backward()?;
        let gx = g.get(v.as_tensor()).context("dropout: no gradient")?.clone();
        Ok((y.to_device(&Device::Cpu)?, gx.to_device(&Device::Cpu)?))
    };
    let (y_cpu, g_cpu) = both(&x)?;
    let (y_dev, g_dev) = both(&x.to_device(dev)?)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f64> { Ok(crate::util::compare::tensor_max_abs_diff(a, b)?) };
    Ok((x.elem_count(), diff(&y_cpu, &y_dev)?.max(diff(&g_cpu, &g_dev)?)))
}

/// The project's dequantization kernel against candle's f32 dequantization of the same bytes on
/// the CPU, rounded once to `to`: the same f32 arithmetic, so the same 16-bit values.
/// Returns the weight count and the largest difference in units of the last place.
fn dequant_parity(dev: &Device, dtype: GgmlDType, to: DType, seed: u64) -> Result<(usize, u32)> {
    let (rows, cols) = (48, 1024);
    let w_cpu = random::random_qtensor(dtype, rows, cols, &mut ChaCha8Rng::seed_from_u64(seed), &Device::Cpu)?;
    let w_dev = random::random_qtensor(dtype, rows, cols, &mut ChaCha8Rng::seed_from_u64(seed), dev)?;
    let reference = w_cpu.dequantize(&Device::Cpu)?.to_dtype(to)?;
    let got = crate::llm::qlinear::dequantize(&w_dev, dev, to)?.to_device(&Device::Cpu)?;
    let bits = |t: &Tensor| -> Result<Vec<u16>> {
        Ok(match to {
            DType::BF16 => t.flatten_all()?.to_vec1::<half::bf16>()?.into_iter().map(|v| v.to_bits()).collect(),
            _ => t.flatten_all()?.to_vec1::<half::f16>()?.into_iter().map(|v| v.to_bits()).collect(),
        })
    };
    // Same-sign 16-bit floats are ordered like their bit patterns; random weights never sit on 0.
    let ulps = bits(&reference)?.iter().zip(bits(&got)?).map(|(&a, b)| (a as i32 - b as i32).unsigned_abs()).max().unwrap_or(0);
    Ok((rows * cols, ulps))
}

/// Largest |a - b| relative to the largest |a| (`a` is the reference); +∞ on NaN or infinity.
pub(crate) fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    crate::util::compare::max_rel_diff(a, b, 1e-12)
}

/// Shapes for the fused-decode parity: the tiny GQA/sliding-window model in the two 32-wide
/// block types, and a small one whose widths fit the 256-wide K-quants, in the Q4_K_M mix
/// (Q6_K values make q|k|v a mixed-type group).
fn fused_parity_models() -> Vec<(&'static str, crate::llm::ModelConfig, BenchQuant)> {
    let tiny = crate::llm::ModelConfig::tiny();
    let small = crate::llm::ModelConfig { hidden_size: 256, intermediate_size: 512, head_dim: 64, ..tiny.clone() };
    vec![("tiny q8_0", tiny.clone(), BenchQuant::Q8_0), ("tiny q4_0", tiny, BenchQuant::Q4_0), ("small q4k-m", small, BenchQuant::Q4kM)]
}

struct FusedParity {
    steps: usize,
    used_fused: bool,
    /// Largest logit difference relative to the largest |logit|, over every step.
    fused: f64,
    candle_ops: f64,
    dense_prefill: f64,
}

/// Decode steps of a padded batch of `rows` (different prompt lengths, prompts longer than the
/// sliding window, a random adapter of rank `rank`) through the fused step and through candle's 4-bit ops,
/// each compared with the exact f32 model (the same weights dequantized). Every path decodes
/// from a cache the exact model filled, and all are fed the exact model's greedy tokens, so each
/// step's difference is that path's own.
fn fused_decode_parity(dev: &Device, cfg: &crate::llm::ModelConfig, quant: BenchQuant, seed: u64, rows: usize, rank: usize) -> Result<FusedParity> {
    let mut packed = quant.random_model(cfg, seed, dev)?;
    let exact = random::dequantized(&packed)?;
    let adapter = random_adapter(cfg, rank, dev)?;
    let a = Some(&adapter);
    let lens = &[20usize, 14, 9, 20, 17, 12, 9, 5][..rows];
    let longest = lens[0];
    let pads: Vec<usize> = lens.iter().map(|l| longest - l).collect();
    let mut flat = Vec::new();
    for (i, &p) in pads.iter().enumerate() {
        flat.extend(std::iter::repeat_n(0u32, p));
        flat.extend((0..lens[i] as u32).map(|j| (j * 31 + 7 * i as u32 + 3) % cfg.vocab_size as u32));
    }
    let ids = Tensor::from_vec(flat, (rows, longest), dev)?;
    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> { Ok(rel_diff(&a.flatten_all()?.to_vec1::<f32>()?, &b.flatten_all()?.to_vec1::<f32>()?)) };
    let prefill = |m: &Model| -> Result<(KvCache, Tensor)> {
        let mut cache = KvCache::with_padding(pads.clone());
        let l = m.forward(&ids, &mut cache, a, Logits::Last)?;
        Ok((cache, l))
    };
    let (mut c_exact, mut l_exact) = prefill(&exact)?;
    packed.set_dense_prefill_rows(1);
    let (_, l_dense) = prefill(&packed)?;
    let dense_prefill = rel(&l_exact, &l_dense)?;
    let (mut c_fused, _) = prefill(&exact)?;
    let (mut c_ops, _) = prefill(&exact)?;
    let steps = 12;
    let (mut fused, mut candle_ops, mut used_fused) = (0f64, 0f64, true);
    for _ in 0..steps {
        let next: Vec<u32> = l_exact.flatten_to(1)?.to_vec2::<f32>()?.iter().map(|row| sampling::argmax(row)).collect();
        let t = Tensor::from_vec(next, (rows, 1), dev)?;
        packed.set_fused_decode(true);
        let lf = packed.forward(&t, &mut c_fused, a, Logits::Last)?;
        used_fused &= packed.fused_launches_per_step().is_some_and(|n| n > 0);
        packed.set_fused_decode(false);
        let lo = packed.forward(&t, &mut c_ops, a, Logits::Last)?;
        l_exact = exact.forward(&t, &mut c_exact, a, Logits::Last)?;
        fused = fused.max(rel(&l_exact, &lf)?);
        candle_ops = candle_ops.max(rel(&l_exact, &lo)?);
    }
    Ok(FusedParity { steps, used_fused, fused, candle_ops, dense_prefill })
}

/// Same tiny random model (same seed, same bytes) on the CPU and on `device`, with a LoRA
/// adapter active. With f32 weights the backends must agree to float rounding; with 4/8-bit
/// weights both quantize activations to 8-bit blocks, each its own way, so they are held to a
/// looser bound, and each is also compared with the exact f32 computation on dequantized weights.
fn bench_parity(args: ParityBench) -> Result<()> {
    let dev = device::parse_device(&args.device)?;
    let cfg = crate::llm::ModelConfig::tiny();
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
    let adapter_cpu = random_adapter(&cfg, 4, &Device::Cpu)?;
    let tensors = adapter_cpu.to_hf_tensors()?.into_iter().map(|(k, v)| Ok((k, v.to_device(&dev)?))).collect::<Result<HashMap<_, _>>>()?;
    let adapter_dev = LoraAdapter::from_hf_tensors(adapter_cpu.id.clone(), adapter_cpu.config.clone(), tensors, &cfg)?;
    let run = |m: &Model, a: &LoraAdapter| -> Result<Vec<f32>> {
        let mut cache = KvCache::new(1);
        let l = m.forward(&Tensor::new(ids.as_slice(), m.device())?.unsqueeze(0)?, &mut cache, Some(a), Logits::All)?;
        Ok(l.flatten_all()?.to_vec1::<f32>()?)
    };
    let mut failures = Vec::new();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let cpu_q = random::random_model(&cfg, dtype, args.seed, &Device::Cpu)?;
        let dev_q = random::random_model(&cfg, dtype, args.seed, &dev)?;
        let exact_cpu = random::dequantized(&cpu_q)?;
        let exact_dev = random::dequantized(&dev_q)?;
        let reference = run(&exact_cpu, &adapter_cpu)?;
        let f32_diff = rel_diff(&reference, &run(&exact_dev, &adapter_dev)?);
        let q_cpu = run(&cpu_q, &adapter_cpu)?;
        let q_dev = run(&dev_q, &adapter_dev)?;
        let (q_diff, cpu_err, dev_err) = (rel_diff(&q_cpu, &q_dev), rel_diff(&reference, &q_cpu), rel_diff(&reference, &q_dev));
        println!("{dtype:?} weights dequantized to f32: cpu vs {} relative {f32_diff:.2e} (tolerance {:.0e})", args.device, args.tolerance);
        println!(
            "{dtype:?} weights quantized: cpu vs {} relative {q_diff:.2e}; vs exact f32: cpu {cpu_err:.2e}, {} {dev_err:.2e} (tolerance {:.0e})",
            args.device, args.device, args.quantized_tolerance
        );
        if f32_diff > args.tolerance {
            failures.push(format!("{dtype:?}/f32 {f32_diff:.2e}"));
        }
        if dev_err > args.quantized_tolerance || cpu_err > args.quantized_tolerance {
            failures.push(format!("{dtype:?}/quantized cpu {cpu_err:.2e} {} {dev_err:.2e}", args.device));
        }
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        for to in [DType::BF16, DType::F16] {
            let (n, ulps) = dequant_parity(&dev, dtype, to, args.seed)?;
            println!("dequantize kernel {dtype:?} -> {to:?}, {n} weights: largest difference from candle's f32 dequantization rounded once: {ulps} ulp (tolerance 0)");
            if ulps > 0 {
                failures.push(format!("dequantize/{dtype:?}/{to:?} {ulps} ulp"));
            }
        }
    }
    // Every model with 3 rows and rank 4; the Q4_K_M mix at every row count the fused step takes
    // (each has its own matvec instantiation; from 3 rows the Q4_K ones run on tensor cores),
    // one row with a rank above 32 (the matvec's second LoRA path).
    let cases = fused_parity_models().into_iter().flat_map(|(label, cfg, quant)| {
        let more: &[(usize, usize)] = if quant == BenchQuant::Q4kM { &[(3, 4), (1, 40), (2, 16), (4, 16), (5, 16), (6, 16), (7, 16), (8, 16)] } else { &[(3, 4)] };
        more.iter().map(move |&(rows, rank)| (label, cfg.clone(), quant, rows, rank)).collect::<Vec<_>>()
    });
    for (label, cfg, quant, rows, rank) in cases {
        let r = fused_decode_parity(&dev, &cfg, quant, args.seed, rows, rank)?;
        let label = format!("{label}, {rows} rows, r={rank}");
        // The fused step and candle's 4-bit kernels both round activations to int8 blocks of 32;
        // random small models amplify that differently, so the fused step must stay within the
        // quantized tolerance or within twice the error of candle's own path on the same model.
        let bound = args.quantized_tolerance.max(2.0 * r.candle_ops);
        println!(
            "{label}: {} decode steps, vs exact f32: fused decode {:.2e} (bound {bound:.1e}), candle's 4-bit ops {:.2e}, bf16-GEMM prompt {:.2e} (tolerance {:.0e})",
            r.steps, r.fused, r.candle_ops, r.dense_prefill, args.quantized_tolerance
        );
        if !r.used_fused {
            failures.push(format!("{label}: the fused decode step did not run"));
        }
        if r.fused > bound {
            failures.push(format!("{label}/fused {:.2e}", r.fused));
        }
        if r.dense_prefill > args.quantized_tolerance {
            failures.push(format!("{label}/dense prefill {:.2e}", r.dense_prefill));
        }
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (n, diff) = dropout_parity(&dev, dtype, args.seed)?;
        println!("keyed dropout {dtype:?}, {n} elements: cpu vs {} max |difference| {diff:e} (tolerance 0: same masks, same rounding)", args.device);
        if diff != 0.0 {
            failures.push(format!("dropout/{dtype:?} {diff:e}"));
        }
    }
    for (kernel, dtype, diff) in super::bench_train::train_kernel_parity(&dev)? {
        // One rounding of the f32 result either way, in a different order: a few ulp.
        let tol = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
        println!("{kernel} {dtype:?} on {}: fused kernel vs composed ops {diff:.2e} (tolerance {tol:.0e})", args.device);
        if diff > tol {
            failures.push(format!("{kernel}/{dtype:?} {diff:.2e}"));
        }
    }
    let g = super::bench_train::grad_parity(&dev, args.seed)?;
    println!(
        "LoRA gradients, tiny q8_0, dropout 0.1, 2 padded rows: checkpointed hand-written backward vs whole-graph autograd on {} f32 {:.2e} (tolerance 1e-4), bf16 {:.2e} (tolerance 5e-2); f32 {} vs cpu {:.2e} (tolerance 1e-3)",
        args.device, g.f32_hand_vs_autograd, g.bf16_hand_vs_autograd, args.device, g.f32_dev_vs_cpu
    );
    if g.f32_hand_vs_autograd > 1e-4 || g.bf16_hand_vs_autograd > 5e-2 || g.f32_dev_vs_cpu > 1e-3 {
        failures.push(format!("train gradients {:.2e} {:.2e} {:.2e}", g.f32_hand_vs_autograd, g.bf16_hand_vs_autograd, g.f32_dev_vs_cpu));
    }
    ensure!(failures.is_empty(), "CPU and {} disagree beyond tolerance: {}", args.device, failures.join(", "));
    println!("parity OK");
    Ok(())
}
