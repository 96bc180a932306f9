//! `bench train`: tokens/s and peak device memory of a QLoRA training step at a given shape.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{sync, BenchQuant};
use crate::config::Settings;
use crate::llm::device::{self, gib, MemoryPoller, PoolPeaks};
use crate::llm::lora::AdapterConfig;
use crate::llm::model::Proj;
use crate::llm::ModelConfig;
use crate::train::data::{Batch, Example};
use crate::train::dropout::Dropout;
use crate::train::forward::{GradAccum, MicroKey, Phase, TrainForward};
use crate::train::optim::{clip_scale, AdamW, AdamWConfig};
use crate::train::params::LoraParams;
use crate::train::settings::Precision;
use crate::train::trainer::activation_dtype;

#[derive(Debug, Args)]
pub struct TrainBench {
    /// Random weights of a named shape: mistral-7b, smollm2-135m, tiny.
    #[arg(long, default_value = "mistral-7b")]
    pub random: String,
    #[arg(long, value_enum, default_value = "q4k")]
    pub quant: BenchQuant,
    /// cpu or cuda:N (default: model.device).
    #[arg(long)]
    pub device: Option<String>,
    #[command(flatten)]
    pub shape: TrainShape,
    /// Timed optimizer steps (one more runs first as warm-up).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// LoRA dropout probability.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Keep every layer's activations instead of recomputing them.
    #[arg(long)]
    pub no_checkpointing: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: PrecisionArg,
    #[command(flatten)]
    pub cap: MemoryCap,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Capture only the last timed step in a profiler run started with
    /// `--profile-from-start off` (nsys, ncu).
    #[arg(long)]
    pub profile_last_step: bool,
}

/// Run as if on a smaller card (also used by `bench serve-train`).
#[derive(Debug, Clone, Copy, Args)]
pub struct MemoryCap {
    /// Hold back all device memory but this many GB (above the CUDA context) before the model
    /// is built: the run fails with out-of-memory where a card of that size would.
    #[arg(long)]
    pub leave_free_gb: Option<f64>,
}

impl MemoryCap {
    pub fn apply(&self, dev: &candle_core::Device) -> Result<Option<super::ballast::Ballast>> {
        let Some(gb) = self.leave_free_gb else { return Ok(None) };
        let b = super::ballast::Ballast::leave_free(dev, (gb * 1e9) as u64)?;
        println!("memory cap       {gb:.2} GB left free ({:.2} GB held back)", b.bytes as f64 / 1e9);
        Ok(Some(b))
    }
}

/// The shape of a benchmarked training step (also used by `bench serve-train`).
#[derive(Debug, Clone, Copy, Args)]
pub struct TrainShape {
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// LoRA rank on all seven projections.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PrecisionArg {
    Auto,
    F32,
    Bf16,
}

pub fn run(settings: &Settings, args: TrainBench) -> Result<()> {
    let dev = device::parse_device(args.device.as_deref().unwrap_or(&settings.model.device))?;
    // Start polling before the weights exist: the baseline is the CUDA context alone.
    let poller = MemoryPoller::start(&dev);
    let ballast = args.cap.apply(&dev)?;
    let held_back = ballast.as_ref().map_or(0, |b| b.bytes);
    let cfg = ModelConfig::preset(&args.random)?;
    let model = args.quant.random_model(&cfg, 1, &dev)?;
    sync(&dev)?;
    let after_weights = device::device_memory(&dev).map(|d| d.0 - held_back);
    let precision = match args.precision {
        PrecisionArg::Auto => Precision::Auto,
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    let dtype = activation_dtype(precision, &dev);
    // Where the memory and the time go: the pool's peaks in each part of a step (highest over
    // the timed steps), and each part's time in one more step, synced at every part's end.
    let phases = PhaseStats::new(&dev);
    let on_phase = |p: Phase| phases.end(PhaseName::Micro(p));
    let fwd = TrainForward::new(&model, dtype, Dropout { p: args.dropout, seed: 1 }).with_phase_ends(&on_phase);
    let TrainShape { seq, batch: rows, rank } = args.shape;
    let adapter_cfg = AdapterConfig::new(rank, 16.0, args.dropout, &Proj::ALL, &format!("random {}", args.random), false);
    let params = LoraParams::init(&cfg, adapter_cfg, 1, &dev)?;
    let vars: Vec<_> = params.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, &vars)?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let examples: Vec<Example> = (0..rows).map(|_| Example { ids: (0..seq).map(|_| rng.random_range(3..cfg.vocab_size as u32)).collect(), target: vec![true; seq] }).collect();
    let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
    let denom = batch.targets() as f64;
    let checkpointing = !args.no_checkpointing;

    let mut accum = GradAccum::new(&params)?;
    let mut times = Vec::new();
    let mut loss = 0.0;
    // Step 0 warms up, steps 1..=steps are timed, and one more is timed part by part.
    for step in 0..=args.steps + 1 {
        let parts_timed = step == args.steps + 1;
        if step == 1 {
            device::reset_pool_peaks(&dev);
            phases.record();
        }
        let profiled = args.profile_last_step && step == args.steps;
        if profiled {
            sync(&dev)?;
            device::profiler_capture(&dev, true);
        }
        phases.time(parts_timed)?;
        let t0 = Instant::now();
        loss = fwd.accumulate(&params, &batch, MicroKey { step: step as u64, micro: 0 }, denom, checkpointing, &mut accum)? / denom;
        let norm = accum.norm()?;
        opt.step(&vars, &accum.grads()?, clip_scale(norm, 1.0), 1e-4)?;
        accum.zero()?;
        sync(&dev)?;
        phases.end(PhaseName::Optimizer);
        phases.time(false)?;
        if profiled {
            device::profiler_capture(&dev, false);
        }
        if step > 0 && !parts_timed {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // Where a step's time goes: the forward alone (no graph, no dropout), as the evaluation runs it.
    let view = params.view();
    let mut fwd_times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        fwd.loss_sum(Some(&view), &batch)?;
        sync(&dev)?;
        fwd_times.push(t0.elapsed().as_secs_f64());
    }
    fwd_times.sort_by(f64::total_cmp);
    let fwd_only = fwd_times[1];
    let tokens = (rows * seq) as f64;
    let tok_s = tokens / median;
    println!(
        "train step: random {} ({:?}), seq {}, batch {}, LoRA r={} on all 7 projections, {} params, checkpointing {}, activations {:?}, {}",
        args.random,
        args.quant,
        seq,
        rows,
        rank,
        params.num_parameters(),
        if checkpointing { "on" } else { "off" },
        dtype,
        device::describe(&dev)
    );
    println!("step time        {:.1} ms (median of {})", median * 1e3, times.len());
    println!("throughput       {tok_s:.0} tokens/s");
    println!("forward only     {:.1} ms (no graph; a checkpointed step runs it twice plus the backward)", fwd_only * 1e3);
    println!("loss             {loss:.4}");
    let (peak, baseline, total) = match &poller {
        // The ballast is not the run's memory.
        Some(p) => (Some(p.peak() - held_back), Some(p.baseline), Some(p.total)),
        None => (None, None, None),
    };
    if let (Some(peak), Some(base), Some(total)) = (peak, baseline, total) {
        println!(
            "device memory    {:.2} GiB peak used ({:.2} GB), {:.2} GiB of it before the model (CUDA context), {:.2} GiB after loading weights, of {:.2} GiB",
            gib(peak),
            peak as f64 / 1e9,
            gib(base),
            gib(after_weights.unwrap_or(0)),
            gib(total)
        );
        println!("process peak     {:.2} GB above the pre-model baseline", (peak - base) as f64 / 1e9);
    } else {
        println!("peak host RSS    {:.2} GiB", gib(device::peak_rss_bytes().unwrap_or(0)));
    }
    let pool = phases.overall();
    if let Some(p) = pool {
        println!(
            "allocator        {:.2} GB peak in live tensors (weights included), {:.2} GB peak reserved by candle's CUDA pool",
            p.used_high as f64 / 1e9,
            p.reserved_high as f64 / 1e9
        );
        for (name, p) in phases.peaks() {
            println!("  {:<14} {:.2} GB live, {:.2} GB reserved at most", name.label(), p.used_high as f64 / 1e9, p.reserved_high as f64 / 1e9);
        }
    }
    let parts = phases.times();
    if !parts.is_empty() {
        let line: Vec<String> = parts.iter().map(|(n, t)| format!("{} {:.1} ms", n.label(), t * 1e3)).collect();
        println!("step by part     {} (one step, the device synced at each part's end)", line.join(", "));
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "shape": args.random, "quant": format!("{:?}", args.quant), "seq": seq, "batch": rows, "rank": rank,
            "checkpointing": checkpointing, "dtype": format!("{dtype:?}"), "step_ms": median * 1e3, "forward_ms": fwd_only * 1e3, "tokens_per_s": tok_s,
            "device_peak_used_bytes": peak, "device_baseline_bytes": baseline, "weights_loaded_used_bytes": after_weights,
            "peak_rss_bytes": device::peak_rss_bytes(), "weight_bytes": model.weight_bytes(),
            "pool_used_high_bytes": pool.map(|p| p.used_high), "pool_reserved_high_bytes": pool.map(|p| p.reserved_high),
            "part_ms": phases.times().iter().map(|(n, t)| (n.label().to_string(), serde_json::json!(t * 1e3))).collect::<serde_json::Map<_, _>>(),
            "pool_phases": phases.peaks().iter().map(|(n, p)| (n.label().to_string(), serde_json::json!({"used_high_bytes": p.used_high, "reserved_high_bytes": p.reserved_high}))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}

/// A part of a benchmarked training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseName {
    Micro(Phase),
    /// Gradient clipping and the AdamW update.
    Optimizer,
}

impl PhaseName {
    fn label(self) -> &'static str {
        match self {
            PhaseName::Micro(Phase::Forward) => "forward",
            PhaseName::Micro(Phase::Head) => "head",
            PhaseName::Micro(Phase::Backward) => "backward",
            PhaseName::Optimizer => "optimizer",
        }
    }
}

/// The CUDA pool's peaks per part of a step, the highest over the recorded steps, and each
/// part's time in one step run with a device sync at every part's end.
struct PhaseStats<'d> {
    dev: &'d candle_core::Device,
    state: std::sync::Mutex<PhaseState>,
}

#[derive(Default)]
struct PhaseState {
    recording: bool,
    /// While timing: when the current part began.
    part_start: Option<Instant>,
    peaks: Vec<(PhaseName, PoolPeaks)>,
    times: Vec<(PhaseName, f64)>,
}

impl<'d> PhaseStats<'d> {
    fn new(dev: &'d candle_core::Device) -> Self {
        Self { dev, state: std::sync::Mutex::new(PhaseState::default()) }
    }

    /// Start keeping what the parts' ends read.
    fn record(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.recording = true;
        }
    }

    /// Time the parts from now on (`true`, after a sync) or no longer.
    fn time(&self, on: bool) -> Result<()> {
        if on {
            sync(self.dev)?;
        }
        if let Ok(mut s) = self.state.lock() {
            s.part_start = on.then(Instant::now);
        }
        Ok(())
    }

    /// `name` ends: keep the peaks since the previous part's end, then start them again; while
    /// timing, wait for the device and keep the part's time.
    fn end(&self, name: PhaseName) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some(t0) = s.part_start {
            // A failed sync shows up again at the step's own sync, which reports it.
            let _ = sync(self.dev);
            s.times.push((name, t0.elapsed().as_secs_f64()));
            s.part_start = Some(Instant::now());
        }
        let Some(p) = device::pool_peaks(self.dev) else { return };
        device::reset_pool_peaks(self.dev);
        if !s.recording {
            return;
        }
        match s.peaks.iter_mut().find(|(n, _)| *n == name) {
            Some((_, q)) => *q = PoolPeaks { used_high: q.used_high.max(p.used_high), reserved_high: q.reserved_high.max(p.reserved_high) },
            None => s.peaks.push((name, p)),
        }
    }

    fn peaks(&self) -> Vec<(PhaseName, PoolPeaks)> {
        self.state.lock().map(|s| s.peaks.clone()).unwrap_or_default()
    }

    fn times(&self) -> Vec<(PhaseName, f64)> {
        self.state.lock().map(|s| s.times.clone()).unwrap_or_default()
    }

    /// The highest of every part's peaks.
    fn overall(&self) -> Option<PoolPeaks> {
        self.peaks().into_iter().map(|(_, p)| p).reduce(|a, b| PoolPeaks { used_high: a.used_high.max(b.used_high), reserved_high: a.reserved_high.max(b.reserved_high) })
    }
}
