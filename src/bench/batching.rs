//! `bench batching`: questions of different lengths through the engine, alone and all at once
//! with an adapter active; every answer must be the same both ways (fails otherwise), and the
//! time to first token of questions arriving while others decode.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Args;

use super::random_adapter;
use crate::config::Settings;
use crate::llm::{device, load, sampling};

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

pub fn run(settings: &Settings, args: BatchingBench) -> Result<()> {
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
