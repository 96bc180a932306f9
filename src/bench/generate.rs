//! `bench generate`: prefill and decode speed, time to first token and peak memory of a model
//! (a file, or random weights of a named shape), through the fused path and candle's ops.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{median, random_adapter, sync, BenchModel};
use crate::config::Settings;
use crate::kernels;
use crate::llm::device::{self, gib};
use crate::llm::fused_decode::RowKernels;
use crate::llm::lora::LoraAdapter;
use crate::llm::model::{KvCache, Logits, Model, Proj, PromptAttention};
use crate::llm::qlinear::PromptKernel;
use crate::llm::{load, sampling};

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
    /// Also time everything through candle's ops alone (no fused decode, 4-bit prompt kernels,
    /// candle's CPU matmul).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub compare: bool,
    /// Replay the fused decode step as a CUDA graph (false: launch each kernel every step).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub graphs: bool,
    /// Let each kernel of the fused decode step start while the one before it finishes
    /// (programmatic dependent launch; only on compute capability 9.0 and later).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub overlap: bool,
    /// Matvec kernels for 1-2 rows on Q4_K: `exact-dp4a` (the default: dp4a in the order of the
    /// tensor-core kernel that 3-8 rows take, so a row's output never depends on the batch),
    /// `tensor-cores` (that kernel at 1-2 rows too: the same bits) or `fastest` (dp4a summing in
    /// its own order).
    #[arg(long, value_enum, default_value = "exact-dp4a")]
    pub row_kernels: RowKernels,
    /// The path prompts' projections take on CUDA: `auto` (the default: in a Q4_K/Q6_K model
    /// `f16-mma` for prompts of 16-128 tokens and `dense-bf16` above, else `dense-bf16` from the
    /// dense threshold), `dense-bf16` (each weight dequantized to bf16, one cuBLAS GEMM),
    /// `int8-mma` (Q4_K weights read in place on int8 tensor cores) or `f16-mma` (Q4_K and Q6_K
    /// weights dequantized in registers onto f16 tensor cores); all but `auto` from the dense
    /// threshold only.
    #[arg(long, value_enum, default_value = "auto")]
    pub prompt_kernel: PromptKernel,
    /// How prompts attend on CUDA: `fused` (the default: one flash-attention kernel straight
    /// from the KV cache, its products on 16-bit tensor cores where the projections read bf16),
    /// `fused-f32` (the same at about f32 precision whatever the projections read) or
    /// `composed` (candle's matmuls and one softmax kernel, their reference).
    #[arg(long, value_enum, default_value = "fused")]
    pub prompt_attention: PromptAttention,
    /// The dense threshold: tokens per sequence from which prompts take that path (default: the
    /// model's, 100 on CUDA); shorter prompts take candle's 4-bit kernels (`auto` in a Q4_K/Q6_K
    /// model: its own ranges, this only lowering where the dense path starts).
    #[arg(long)]
    pub prompt_rows: Option<usize>,
    /// Capture one measurement of the first path in a profiler run started with
    /// `nsys profile --capture-range=cudaProfilerApi` or `ncu --profile-from-start off`: the
    /// last repeat of the prefill, of the batch-1 decode, or of the batched decode of
    /// `--streams` rows (one adapter for every row).
    #[arg(long, value_enum)]
    pub profile: Option<ProfilePart>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfilePart {
    Prefill,
    Decode,
    Batched,
}

pub fn run(settings: &Settings, args: GenerateBench) -> Result<()> {
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
    // A second adapter of the same rank (other random values) for the mixed-adapter batch.
    let (adapter, other) = match args.lora_rank {
        0 => (None, None),
        r => (Some(random_adapter(&cfg, r, &dev)?), Some(random_adapter(&cfg, r, &dev)?)),
    };
    let adapters = Adapters { one: adapter.as_ref(), other: other.as_ref() };

    // candle frees device buffers as tensors drop, so "used" right after a forward (logits and
    // KV cache still alive) is the high-water mark; sample it at each of those points.
    let mut peak_dev: Option<(u64, u64)> = None;
    model.set_decode_graphs(args.graphs)?;
    model.set_decode_row_kernels(args.row_kernels)?;
    let overlap = model.set_decode_overlap(args.overlap)?;
    model.set_prompt_kernel(args.prompt_kernel);
    model.set_prompt_attention(args.prompt_attention);
    if let Some(rows) = args.prompt_rows {
        model.set_dense_prefill_rows(rows);
    }
    let fast = time_paths(&model, adapters, &args, args.profile, &mut peak_dev)?;
    let fused = model.fused_decode_active()?;
    let launches = model.fused_launches_per_step();
    // The same measurements through candle's ops alone (4-bit kernels for prompts too, candle's
    // CPU matmul), for the before/after in one run on one machine.
    let candle = if args.compare {
        model.set_fused_decode(false);
        model.set_dense_prefill_rows(usize::MAX);
        model.set_prompt_kernel(PromptKernel::DenseBf16);
        model.set_cpu_kernels(false);
        Some(time_paths(&model, adapters, &args, None, &mut peak_dev)?)
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
            Some(n) if fused => format!(
                "fused CUDA step, {n} kernel launches per token{}{}, {:?} row kernels",
                if args.graphs { ", replayed as one CUDA graph" } else { "" },
                if overlap { ", each overlapping the one before" } else { "" },
                args.row_kernels
            ),
            _ if dev.is_cpu() => match kernels::cpu::describe().filter(|_| kernels::cpu::available(model.layers()[0].proj(Proj::Q).dtype())) {
                Some(isa) => format!("candle ops, the project's CPU matmul ({isa})"),
                None => "candle ops".into(),
            },
            _ => "candle ops".into(),
        }
    );
    if dev.is_cuda() {
        let from = args.prompt_rows.map_or_else(|| format!("{} (the default)", crate::llm::model::DENSE_PREFILL_ROWS), |r| r.to_string());
        let path = match args.prompt_kernel {
            PromptKernel::Auto => {
                let rows = crate::llm::qlinear::F16_PREFILL_ROWS;
                format!("Auto: Q4_K/Q6_K models F16Mma for {}-{} tokens a sequence and DenseBf16 above, others DenseBf16 from {from}", rows.start(), rows.end())
            }
            k => format!("{k:?} from {from} tokens a sequence"),
        };
        println!("prompt path      {path}, candle's 4-bit kernels below; {:?} attention", args.prompt_attention);
    }
    let vs = |now: f64, before: Option<f64>, unit: &str| match before {
        Some(b) => format!(" [candle ops: {b:.1} {unit}, {:.2}x]", now / b),
        None => String::new(),
    };
    let c = candle.as_ref();
    println!("prefill          {:.1} tokens/s ({} tokens){}", fast.prefill_tps, args.prompt_tokens, vs(fast.prefill_tps, c.map(|c| c.prefill_tps), "tokens/s"));
    println!("time to first    {:.1} ms ({}-token prompt){}", fast.ttft_ms, args.ttft_tokens, c.map(|c| format!(" [candle ops: {:.1} ms]", c.ttft_ms)).unwrap_or_default());
    println!("decode batch 1   {:.1} tokens/s ({} tokens){}", fast.decode_tps, args.decode_tokens, vs(fast.decode_tps, c.map(|c| c.decode_tps), "tokens/s"));
    // Batch-1 decode reads every weight once a token: against the card's bandwidth, that is
    // how far from its ceiling the step runs.
    let read = model.decode_read_bytes() as f64;
    let bandwidth = device::memory_bandwidth(&dev);
    println!(
        "weights read     {:.2} GB a token: {:.0} GB/s at batch 1{}",
        read / 1e9,
        fast.decode_tps * read / 1e9,
        bandwidth.map(|b| format!(" = {:.0}% of this card's {:.0} GB/s (ceiling {:.0} tokens/s)", 100.0 * fast.decode_tps * read / b, b / 1e9, b / read)).unwrap_or_default()
    );
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
    if let (Some(m), Some(b)) = (&fast.mixed, &fast.batched) {
        println!(
            "decode batch {:<3} mixed adapters (two adapters and the bare base by turns): {:.1} tokens/s aggregate ({:.2}x the one-adapter batch); greedy outputs equal to one-at-a-time decoding for {}/{} sequences",
            m.streams,
            m.tokens_per_s,
            m.tokens_per_s / b.tokens_per_s,
            m.identical,
            m.streams
        );
    }
    println!("peak host RSS    {:.2} GiB", gib(rss));
    if let Some((used, total)) = devmem {
        println!("device memory    {:.2} GiB peak used of {:.2} GiB (whole device, as the driver reports)", gib(used), gib(total));
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "model": label, "device": device::describe(&dev), "lora_rank": args.lora_rank,
            "fused_decode": fused, "fused_launches_per_token": launches, "decode_graphs": args.graphs, "decode_overlap": overlap,
            "prompt_tokens": args.prompt_tokens, "ttft_prompt_tokens": args.ttft_tokens, "decode_tokens": args.decode_tokens,
            "fast": fast.json(), "candle_ops": c.map(PathTimes::json),
            "peak_rss_bytes": rss, "device_peak_used_bytes": devmem.map(|d| d.0), "weight_bytes": model.weight_bytes(),
            "decode_read_bytes": model.decode_read_bytes(), "memory_bandwidth_bytes_per_s": bandwidth,
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
    /// The same batch with rows of different adapters (when `--lora-rank` is set).
    mixed: Option<Batched>,
}

/// The adapters a run times: `one` for every measurement, `other` beside it in the
/// mixed-adapter batch.
#[derive(Clone, Copy)]
struct Adapters<'a> {
    one: Option<&'a LoraAdapter>,
    other: Option<&'a LoraAdapter>,
}

impl PathTimes {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "prefill_tokens_per_s": self.prefill_tps, "ttft_ms": self.ttft_ms, "decode_tokens_per_s": self.decode_tps,
            "batched_streams": self.batched.as_ref().map(|b| b.streams), "batched_tokens_per_s": self.batched.as_ref().map(|b| b.tokens_per_s),
            "batched_identical": self.batched.as_ref().map(|b| b.identical),
            "mixed_tokens_per_s": self.mixed.as_ref().map(|b| b.tokens_per_s), "mixed_identical": self.mixed.as_ref().map(|b| b.identical),
        })
    }
}

/// Prefill, time to first token, batch-1 decode and batched decode of `model` as it is set up
/// (same random prompts on every call), each the median of `args.repeats`; `profile` marks the
/// last repeat of one of them for a profiler.
fn time_paths(model: &Model, adapters: Adapters, args: &GenerateBench, profile: Option<ProfilePart>, peak_dev: &mut Option<(u64, u64)>) -> Result<PathTimes> {
    let adapter = adapters.one;
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

    // Around the last repeat of `part` when it is the one profiled (synchronized, so the
    // capture holds exactly that work).
    let capture = |part: ProfilePart, rep: usize, on: bool| capture_last(dev, profile == Some(part), rep, reps, on);
    let mut prefill = Vec::new();
    for rep in 0..reps {
        let p = prompt(args.prompt_tokens);
        capture(ProfilePart::Prefill, rep, true)?;
        let t = Instant::now();
        let mut cache = KvCache::new(1);
        greedy_step(model, &mut cache, &p, adapter)?;
        prefill.push(t.elapsed());
        capture(ProfilePart::Prefill, rep, false)?;
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
    for rep in 0..reps {
        let mut cache = KvCache::new(1);
        let mut tok = greedy_step(model, &mut cache, &prompt(32), adapter)?;
        capture(ProfilePart::Decode, rep, true)?;
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            tok = greedy_step(model, &mut cache, &[tok], adapter)?;
        }
        decode.push(t.elapsed());
        capture(ProfilePart::Decode, rep, false)?;
        sample();
    }
    // Different lengths, as real questions are (the batch pads each row to the longest).
    let prompts: Vec<Vec<u32>> = (0..args.streams).map(|i| prompt(32 + 9 * i)).collect();
    let n = prompts.len();
    let batched = match n {
        0 | 1 => None,
        _ => Some(batched_decode(model, &vec![adapter; n], &prompts, args.decode_tokens, reps, profile == Some(ProfilePart::Batched))?),
    };
    let mixed = match (n, adapters.other) {
        (2.., Some(other)) => {
            let per_row: Vec<_> = (0..n).map(|i| [adapter, Some(other), None][i % 3]).collect();
            Some(batched_decode(model, &per_row, &prompts, args.decode_tokens, reps, false)?)
        }
        _ => None,
    };
    Ok(PathTimes {
        prefill_tps: args.prompt_tokens as f64 / median(&prefill).as_secs_f64(),
        ttft_ms: median(&ttft).as_secs_f64() * 1e3,
        decode_tps: args.decode_tokens as f64 / median(&decode).as_secs_f64(),
        batched,
        mixed,
    })
}

struct Batched {
    streams: usize,
    tokens_per_s: f64,
    /// Sequences whose greedy tokens match decoding them one at a time.
    identical: usize,
}

/// Greedy decode of `prompts` (of different lengths) as one batch the way answers share the
/// engine's steps (each prompt prefilled alone, the caches merged), prompt `i` with
/// `adapters[i]`, timed over `tokens` steps (median of `reps`), and each prompt alone for the
/// outputs the batch must reproduce. With `profile`, the last repeat's steps are captured for
/// a profiler (`--profile batched`).
fn batched_decode(model: &Model, adapters: &[Option<&LoraAdapter>], prompts: &[Vec<u32>], tokens: usize, reps: usize, profile: bool) -> Result<Batched> {
    let n = prompts.len();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(adapters)
        .map(|(p, &adapter)| {
            let mut cache = KvCache::new(1);
            let mut out = vec![greedy_step(model, &mut cache, p, adapter)?];
            for _ in 1..tokens {
                out.push(greedy_step(model, &mut cache, &[*out.last().expect("one token")], adapter)?);
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let step = |cache: &mut KvCache, ids: Vec<u32>| -> Result<Vec<u32>> {
        let logits = model.forward_mixed(&Tensor::from_vec(ids, (n, 1), model.device())?, cache, adapters, Logits::Last)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat.chunks(flat.len() / n).map(sampling::argmax).collect())
    };
    let mut times = Vec::new();
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); n];
    let capture = |rep: usize, on: bool| capture_last(model.device(), profile, rep, reps.max(1), on);
    for rep in 0..reps.max(1) {
        let mut caches = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for (p, &adapter) in prompts.iter().zip(adapters) {
            let mut c = KvCache::new(1);
            next.push(greedy_step(model, &mut c, p, adapter)?);
            caches.push(c);
        }
        let mut cache = KvCache::merge(caches)?;
        outs = next.iter().map(|&t| vec![t]).collect();
        capture(rep, true)?;
        let t = Instant::now();
        for _ in 1..tokens {
            next = step(&mut cache, next)?;
            for (o, &tok) in outs.iter_mut().zip(&next) {
                o.push(tok);
            }
        }
        times.push(t.elapsed());
        capture(rep, false)?;
    }
    let identical = outs.iter().zip(&alone).filter(|(a, b)| a == b).count();
    let tokens_per_s = (n * tokens.saturating_sub(1)) as f64 / median(&times).as_secs_f64();
    Ok(Batched { streams: n, tokens_per_s, identical })
}

/// Start (`on`) or stop the profiler's capture around repeat `rep` of `reps` when it is the
/// last one of the part being profiled (`wanted`), the device synchronized first so the capture
/// holds exactly that repeat's work.
fn capture_last(dev: &candle_core::Device, wanted: bool, rep: usize, reps: usize, on: bool) -> Result<()> {
    if wanted && rep + 1 == reps {
        sync(dev)?;
        device::profiler_capture(dev, on);
    }
    Ok(())
}

/// Feed `ids` after what `cache` holds and pick the next token greedily. Pulling the logits to
/// the host is part of every real step (sampling), so it is inside every timing.
fn greedy_step(model: &Model, cache: &mut KvCache, ids: &[u32], adapter: Option<&LoraAdapter>) -> Result<u32> {
    let logits = model.forward(&Tensor::new(ids, model.device())?.unsqueeze(0)?, cache, adapter, Logits::Last)?;
    Ok(sampling::argmax(&logits.flatten_all()?.to_vec1::<f32>()?))
}
