//! The training loop: micro-batches with gradient accumulation, AdamW under the LR schedule,
//! clipping, periodic evaluation with early stopping, atomic checkpoints, resume, and the
//! outputs (PEFT adapter, `metrics.json`, `loss.png`) in the run's adapter folder.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::{self, EvalRecord, StepRecord, TrainState};
use super::data::{epoch_plan, Batch, Dataset, Example};
use super::dropout::Dropout;
use super::forward::{GradAccum, MicroKey, TrainForward};
use super::kto::{preference_eval, KtoPhase};
use super::optim::{clip_scale, learning_rate, AdamW, AdamWConfig};
use super::params::{LoraParams, LoraView};
use super::report::{self, KtoSummary, Metrics};
use super::settings::{Objective, Precision, TrainSettings};
use crate::llm::device::MemoryPoller;
use crate::llm::load::LoadedModel;
use crate::llm::lora::{AdapterConfig, LoraAdapter};

/// What the loop reports after each optimizer step and evaluation.
#[derive(Debug, Clone)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub eta: Option<Duration>,
    pub evaluating: bool,
}

/// Callbacks into whoever runs the training (CLI progress bar, the bot's worker).
pub trait TrainHooks {
    fn progress(&self, _p: &Progress) {}
    /// Checked between micro-batches: `true` saves a checkpoint and stops.
    fn should_stop(&self) -> bool {
        false
    }
    /// Called before every micro-batch; a caller that must serve first (the bot answering a
    /// question on the same GPU) blocks here.
    fn before_micro_batch(&self) {}
    /// Called after an optimizer step and its checkpoint, if one was due.
    fn after_step(&self, _step: usize) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl TrainHooks for NoHooks {}

pub struct TrainRun<'a> {
    pub lm: &'a LoadedModel,
    pub data: &'a Dataset,
    pub settings: TrainSettings,
    /// `adapters/<id>`: outputs and the checkpoint go here.
    pub run_dir: PathBuf,
    pub id: String,
    /// Written into the adapter config and metrics (`base_model_name_or_path`).
    pub base_model: String,
    /// KTO's reference: this adapter's weights on the same base; `None` is the base with the
    /// adapter switched off.
    pub reference: Option<&'a LoraAdapter>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(Box<Metrics>),
    /// Stopped on request; the checkpoint at `step` resumes it.
    Cancelled {
        step: usize,
    },
}

/// Activation dtype for `precision` on `device`.
pub fn activation_dtype(precision: Precision, device: &Device) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Auto if device.is_cuda() => DType::BF16,
        Precision::Auto => DType::F32,
    }
}

/// Mean NLL per target token of `examples` (batches of `batch` similar lengths).
pub fn evaluate(fwd: &TrainForward, lora: Option<&LoraView>, examples: &[Example], batch: usize) -> Result<f64> {
    ensure!(!examples.is_empty(), "no held-out conversations to evaluate on");
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].len());
    let (mut nll, mut n) = (0.0, 0usize);
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let b = Batch::new(&rows);
        nll += fwd.loss_sum(lora, &b)?;
        n += b.targets();
    }
    Ok(nll / n as f64)
}

impl TrainRun<'_> {
    fn adapter_config(&self) -> Result<AdapterConfig> {
        let s = &self.settings;
        Ok(AdapterConfig::new(s.rank, s.alpha, s.dropout, &s.targets()?, &self.base_model, s.use_rslora))
    }

    /// Settings that change the result; a checkpoint made under others is not resumed.
    fn fingerprint(&self, objective: Objective, reference: &str) -> Result<String> {
        let mut s = self.settings.clone();
        s.device.clear();
        s.eval_questions = 0;
        s.checkpoint_every = 0;
        s.objective = objective;
        let mut f = serde_json::to_string(&s)?;
        if objective.has_kto() {
            f += &format!(" reference={reference}");
        }
        Ok(f)
    }

    fn eval_set(&self) -> &[Example] {
        let test = &self.data.test;
        match self.settings.eval_max_conversations {
            0 => test,
            n => &test[..n.min(test.len())],
        }
    }

    /// Train (or resume) to the end, a stop request, or an error.
    pub fn run(&self, hooks: &dyn TrainHooks) -> Result<Outcome> {
        let s = &self.settings;
        s.validate()?;
        let objective = s.objective.resolve(!self.data.train.is_empty(), self.data.feedback.len(), s.kto_min_examples);
        ensure!(!objective.has_sft() || !self.data.train.is_empty(), "objective {} needs training conversations: {} has no train.jsonl", objective.name(), self.data.dir.display());
        ensure!(
            !objective.has_kto() || !self.data.feedback.is_empty(),
            "objective {} needs labelled answers: {} has none in feedback.jsonl",
            objective.name(),
            self.data.dir.display()
        );
        let model = &self.lm.model;
        let device = model.device().clone();
        let dtype = activation_dtype(s.precision, &device);
        let fwd = TrainForward::new(model, dtype, Dropout { p: s.dropout, seed: s.seed });
        let params = LoraParams::init(model.config(), self.adapter_config()?, s.seed, &device)?;
        let names: Vec<String> = params.named_vars().into_iter().map(|(n, _)| n).collect();
        let vars = params.named_vars().into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        let mut opt = AdamW::new(AdamWConfig { beta1: s.adam_beta1, beta2: s.adam_beta2, eps: s.adam_eps, weight_decay: s.weight_decay }, &vars)?;
        let reference_name = self.reference.map_or("base".to_string(), |a| a.id.clone());
        let fingerprint = self.fingerprint(objective, &reference_name)?;
        let mut best_weights: Option<Vec<Tensor>> = None;

        let mut state = match checkpoint::load(&self.run_dir, &device)? {
            Some(ck) => {
                ensure!(
                    ck.state.dataset_hash == self.data.hash,
                    "the checkpoint in {} was made on another dataset (hash {}, now {}): train under a new id",
                    self.run_dir.display(),
                    &ck.state.dataset_hash[..12.min(ck.state.dataset_hash.len())],
                    &self.data.hash[..12]
                );
                ensure!(
                    ck.state.fingerprint == fingerprint,
                    "the checkpoint in {} was made with other [train] settings; resume with the same settings or train under a new id",
                    self.run_dir.display()
                );
                params.load_values(|n| ck.tensors.get(&format!("param.{n}")).cloned())?;
                for (i, n) in names.iter().enumerate() {
                    let m = ck.tensors.get(&format!("adam_m.{n}")).with_context(|| format!("checkpoint lacks adam_m.{n}"))?;
                    let v = ck.tensors.get(&format!("adam_v.{n}")).with_context(|| format!("checkpoint lacks adam_v.{n}"))?;
                    opt.restore(i, m, v).with_context(|| format!("checkpoint's optimizer state for {n}"))?;
                }
                opt.t = ck.state.adam_t;
                if ck.state.best.is_some() {
                    best_weights = names.iter().map(|n| ck.tensors.get(&format!("best.{n}")).cloned()).collect();
                }
                tracing::info!(step = ck.state.step, dir = %self.run_dir.display(), "resuming from checkpoint");
                ck.state
            }
            None => {
                ensure!(!self.run_dir.join(crate::llm::lora::CONFIG_FILE).exists(), "adapter {} already exists in {}: choose another id", self.id, self.run_dir.display());
                TrainState {
                    step: 0,
                    epoch: 0,
                    cursor: 0,
                    adam_t: 0,
                    tokens: 0,
                    elapsed_s: 0.0,
                    history: Vec::new(),
                    evals: Vec::new(),
                    best: None,
                    evals_without_improvement: 0,
                    dataset_hash: self.data.hash.clone(),
                    fingerprint: fingerprint.clone(),
                    base_model: self.base_model.clone(),
                    kto_from: None,
                }
            }
        };

        let sft_lengths: Vec<usize> = self.data.train.iter().map(|e| e.len()).collect();
        let kto_lengths: Vec<usize> = self.data.feedback.iter().map(|e| e.ex.len()).collect();
        let phase_steps = |n: usize, epochs: f64, max_steps: usize| {
            if max_steps > 0 {
                max_steps
            } else {
                ((epochs * n.div_ceil(s.batch_size) as f64) / s.grad_accum as f64).ceil().max(1.0) as usize
            }
        };
        let sft_steps = if objective.has_sft() { phase_steps(sft_lengths.len(), s.epochs, s.max_steps) } else { 0 };
        let kto_steps = if objective.has_kto() { phase_steps(kto_lengths.len(), s.kto_epochs, s.kto_max_steps) } else { 0 };
        let kto_warmup = s.warmup_steps.min(kto_steps / 10);
        let mut total_steps = state.kto_from.unwrap_or(sft_steps) + kto_steps;
        let has_eval = !self.eval_set().is_empty();
        let poller = MemoryPoller::start(&device);
        let started = Instant::now();
        let elapsed_before = state.elapsed_s;
        let tokens_before = state.tokens;
        let step_before = state.step;
        let mut train_time = Duration::ZERO;
        // A run stopped early in SFT and checkpointed before its KTO phase began goes straight on.
        let mut stopped_early = state.kto_from.is_none() && s.early_stop_patience > 0 && state.evals_without_improvement >= s.early_stop_patience;
        let lengths = |kto: bool| if kto { &kto_lengths } else { &sft_lengths };
        let mut plan = epoch_plan(lengths(state.kto_from.is_some()), s.batch_size, s.seed, state.epoch);
        let reference = self.reference.map(|a| LoraView::from_adapter(a, model.config().num_layers));
        let mut kto: Option<KtoPhase> = None;
        tracing::info!(id = %self.id, objective = objective.name(), params = params.num_parameters(), total_steps, train = self.data.train.len(), test = self.data.test.len(), feedback = self.data.feedback.len(), dtype = ?dtype, checkpointing = s.gradient_checkpointing, "training");

        let mut accum = GradAccum::new(&params)?;
        loop {
            if state.kto_from.is_none() && (state.step >= sft_steps || stopped_early) {
                if kto_steps == 0 {
                    break;
                }
                // SFT is done: keep its best weights, then KTO from there with a fresh optimizer.
                if objective.has_sft() && has_eval {
                    self.settle_best(&fwd, &params, &vars, &mut state, best_weights.as_ref())?;
                }
                opt.reset()?;
                state.adam_t = opt.t;
                state.kto_from = Some(state.step);
                state.epoch = 0;
                state.cursor = 0;
                plan = epoch_plan(&kto_lengths, s.batch_size, s.seed, 0);
                total_steps = state.step + kto_steps;
                tracing::info!(step = state.step, steps = kto_steps, answers = kto_lengths.len(), "preference training (KTO)");
                continue;
            }
            if state.step >= total_steps {
                break;
            }
            if hooks.should_stop() {
                self.save_checkpoint(&state, &names, &params, &opt, best_weights.as_deref())?;
                return Ok(Outcome::Cancelled { step: state.step });
            }
            let in_kto = state.kto_from;
            let t0 = Instant::now();
            // The micro-batches of this step, continuing across epoch boundaries.
            let mut micro = Vec::with_capacity(s.grad_accum);
            let (mut epoch, mut cursor) = (state.epoch, state.cursor);
            for _ in 0..s.grad_accum {
                if cursor >= plan.len() {
                    epoch += 1;
                    cursor = 0;
                    plan = epoch_plan(lengths(in_kto.is_some()), s.batch_size, s.seed, epoch);
                }
                micro.push(plan[cursor].clone());
                cursor += 1;
            }
            let (loss, step_tokens, kl) = match in_kto {
                Some(_) => {
                    if kto.is_none() {
                        kto = Some(KtoPhase::prepare(&fwd, reference.as_ref(), &self.data.feedback, s).context("reference log-probabilities for KTO")?);
                    }
                    let phase = kto.as_ref().context("KTO phase")?;
                    let out = phase
                        .accumulate_step(&fwd, &params, &micro, state.step as u64, s.gradient_checkpointing, hooks, &mut accum)
                        .with_context(|| format!("KTO step {}", state.step + 1))?;
                    (out.loss, out.tokens, Some(out.kl))
                }
                None => {
                    let batches: Vec<(Batch, usize)> = micro
                        .iter()
                        .map(|idx| {
                            let rows: Vec<&Example> = idx.iter().map(|&i| &self.data.train[i]).collect();
                            let b = Batch::new(&rows);
                            let tokens = b.tokens(&rows);
                            (b, tokens)
                        })
                        .collect();
                    let denom: usize = batches.iter().map(|(b, _)| b.targets()).sum();
                    let mut nll = 0.0;
                    for (m, (batch, _)) in batches.iter().enumerate() {
                        hooks.before_micro_batch();
                        let key = MicroKey { step: state.step as u64, micro: m as u64 };
                        nll +=
                            fwd.accumulate(&params, batch, key, denom as f64, s.gradient_checkpointing, &mut accum).with_context(|| format!("training step {}", state.step + 1))?;
                    }
                    (nll / denom as f64, batches.iter().map(|(_, t)| *t).sum::<usize>(), None)
                }
            };
            let grad_norm = accum.norm()?;
            if !loss.is_finite() || !grad_norm.is_finite() {
                let kept = match checkpoint::path(&self.run_dir).is_file() {
                    true => format!(
                        "the last good checkpoint (step {}) is kept in {}",
                        checkpoint::load(&self.run_dir, &Device::Cpu).ok().flatten().map_or(0, |c| c.state.step),
                        self.run_dir.display()
                    ),
                    false => "no checkpoint had been written yet".to_string(),
                };
                bail!(
                    "training diverged at step {}: loss {loss}, gradient norm {grad_norm}; stopped before updating the weights; {kept}. Try a lower train.learning_rate",
                    state.step + 1
                );
            }
            let lr = match in_kto {
                Some(from) => learning_rate(s.schedule, s.kto_learning_rate, state.step - from, kto_warmup, kto_steps),
                None => learning_rate(s.schedule, s.learning_rate, state.step, s.warmup_steps, sft_steps),
            };
            opt.step(&vars, &accum.grads()?, clip_scale(grad_norm, s.max_grad_norm), lr)?;
            accum.zero()?;
            state.step += 1;
            state.epoch = epoch;
            state.cursor = cursor;
            state.adam_t = opt.t;
            state.tokens += step_tokens as u64;
            state.history.push(StepRecord { step: state.step, loss, lr, grad_norm, tokens: step_tokens as u64, kl });
            train_time += t0.elapsed();
            let tokens_per_s = (state.tokens - tokens_before) as f64 / train_time.as_secs_f64().max(1e-9);
            let per_step = train_time.as_secs_f64() / (state.step - step_before) as f64;
            let eta = Some(Duration::from_secs_f64(per_step * total_steps.saturating_sub(state.step) as f64));
            hooks.progress(&Progress { step: state.step, total_steps, loss: Some(loss), eval_loss: state.evals.last().map(|e| e.loss), tokens_per_s, eta, evaluating: false });

            // Held-out loss picks the best weights and stops early in SFT; KTO trades some of it
            // for the preferences, so its phase keeps its last weights.
            let eval_due = in_kto.is_none() && has_eval && s.eval_every > 0 && state.step % s.eval_every == 0;
            if eval_due {
                hooks.progress(&Progress { step: state.step, total_steps, loss: Some(loss), eval_loss: None, tokens_per_s, eta, evaluating: true });
                let eval = evaluate(&fwd, Some(&params.view()), self.eval_set(), s.batch_size)?;
                state.evals.push(EvalRecord { step: state.step, loss: eval });
                let improved = state.best.as_ref().is_none_or(|b| eval < b.loss - s.early_stop_min_delta);
                if improved {
                    state.best = Some(EvalRecord { step: state.step, loss: eval });
                    state.evals_without_improvement = 0;
                    best_weights = Some(vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?);
                } else {
                    state.evals_without_improvement += 1;
                }
                tracing::info!(step = state.step, loss = format!("{loss:.4}"), eval_loss = format!("{eval:.4}"), "evaluated");
                hooks.progress(&Progress { step: state.step, total_steps, loss: Some(loss), eval_loss: Some(eval), tokens_per_s, eta, evaluating: false });
                if s.early_stop_patience > 0 && state.evals_without_improvement >= s.early_stop_patience {
                    tracing::info!(step = state.step, patience = s.early_stop_patience, "held-out loss stopped improving: stopping early");
                    stopped_early = true;
                }
            }
            state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            let phase_ends = state.step >= total_steps || (in_kto.is_none() && (stopped_early || state.step >= sft_steps));
            if s.checkpoint_every > 0 && state.step % s.checkpoint_every == 0 && !phase_ends {
                self.save_checkpoint(&state, &names, &params, &opt, best_weights.as_deref())?;
            }
            hooks.after_step(state.step);
        }

        // Final evaluation of the last weights; an SFT run then keeps whichever evaluated best.
        let mut final_eval = None;
        if has_eval {
            final_eval = match state.kto_from {
                None => Some(self.settle_best(&fwd, &params, &vars, &mut state, best_weights.as_ref())?),
                Some(_) => Some(self.evaluate_last(&fwd, &params, &mut state)?),
            };
        }
        let kto_summary = match state.kto_from {
            Some(from) => {
                let phase = match kto {
                    Some(p) => p,
                    None => KtoPhase::prepare(&fwd, reference.as_ref(), &self.data.feedback, s)?,
                };
                let held_out = &self.data.feedback_test;
                let desirable = self.data.feedback.iter().filter(|e| e.desirable).count();
                Some(KtoSummary {
                    desirable,
                    undesirable: self.data.feedback.len() - desirable,
                    weights: phase.weights,
                    beta: phase.beta,
                    reference: reference_name.clone(),
                    from_step: from,
                    steps: state.step - from,
                    base_preference: preference_eval(&fwd, None, held_out, s.batch_size)?,
                    preference: preference_eval(&fwd, Some(&params.view()), held_out, s.batch_size)?,
                })
            }
            None => None,
        };
        let adapter = params.to_adapter(&self.id)?;
        adapter.save(&self.run_dir).with_context(|| format!("saving adapter {}", self.id))?;
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let tokens_per_s = (state.tokens - tokens_before) as f64 / train_time.as_secs_f64().max(1e-9);
        let metrics = Metrics {
            id: self.id.clone(),
            base_model: self.base_model.clone(),
            dataset_dir: self.data.dir.display().to_string(),
            dataset_hash: self.data.hash.clone(),
            train_report: self.data.train_report.clone(),
            test_report: self.data.test_report.clone(),
            settings: s.clone(),
            adapter: adapter.config.clone(),
            trainable_parameters: params.num_parameters(),
            steps: state.step,
            total_steps,
            stopped_early,
            train_loss: state.history.clone(),
            eval_loss: state.evals.clone(),
            final_eval_loss: final_eval,
            best_step: state.best.as_ref().map(|b| b.step),
            tokens: state.tokens,
            tokens_per_s,
            peak_device_memory_bytes: poller.as_ref().map(|p| p.peak()),
            device_memory_baseline_bytes: poller.as_ref().map(|p| p.baseline),
            peak_host_rss_bytes: crate::llm::device::peak_rss_bytes(),
            wall_time_s: state.elapsed_s,
            device: crate::llm::device::describe(&device),
            activation_dtype: format!("{dtype:?}").to_lowercase(),
            finished_at: crate::util::clock::now_secs(),
            objective: objective.name().to_string(),
            kto: kto_summary,
            preference_eval: None,
        };
        report::write(&self.run_dir, &metrics)?;
        checkpoint::remove(&self.run_dir)?;
        Ok(Outcome::Completed(Box::new(metrics)))
    }

    /// Held-out loss of the current weights, recorded at this step unless it already was.
    fn evaluate_last(&self, fwd: &TrainForward, params: &LoraParams, state: &mut TrainState) -> Result<f64> {
        if let Some(e) = state.evals.last().filter(|e| e.step == state.step) {
            return Ok(e.loss);
        }
        let e = evaluate(fwd, Some(&params.view()), self.eval_set(), self.settings.batch_size)?;
        state.evals.push(EvalRecord { step: state.step, loss: e });
        Ok(e)
    }

    /// Evaluate the last weights, then put back the best evaluated ones if they were better.
    /// Returns the held-out loss of the weights kept.
    fn settle_best(&self, fwd: &TrainForward, params: &LoraParams, vars: &[&Var], state: &mut TrainState, best_weights: Option<&Vec<Tensor>>) -> Result<f64> {
        let last = self.evaluate_last(fwd, params, state)?;
        if let (Some(best), Some(w)) = (&state.best, best_weights) {
            if best.loss < last {
                for (v, t) in vars.iter().zip(w) {
                    v.set(t)?;
                }
                tracing::info!(step = best.step, eval_loss = best.loss, "keeping the best evaluated weights");
                return Ok(best.loss);
            }
        }
        Ok(last)
    }

    fn save_checkpoint(&self, state: &TrainState, names: &[String], params: &LoraParams, opt: &AdamW, best: Option<&[Tensor]>) -> Result<()> {
        let mut tensors = Vec::with_capacity(names.len() * 4);
        for ((n, (_, var)), (m, v)) in names.iter().zip(params.named_vars()).zip(opt.m.iter().zip(&opt.v)) {
            tensors.push((format!("param.{n}"), var.as_tensor().clone()));
            tensors.push((format!("adam_m.{n}"), m.clone()));
            tensors.push((format!("adam_v.{n}"), v.clone()));
        }
        if let Some(best) = best {
            tensors.extend(names.iter().zip(best).map(|(n, t)| (format!("best.{n}"), t.clone())));
        }
        checkpoint::save(&self.run_dir, state, &tensors)?;
        tracing::debug!(step = state.step, "checkpoint written");
        Ok(())
    }
}
