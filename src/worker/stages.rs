//! What the jobs do, stage by stage.
//!
//! - rescrape: incremental scrape → dataset rebuild.
//! - retrain: (rescrape, if `worker.retrain_rescrape`) → dataset with the latest feedback →
//!   train (borrowing the engine's frozen base unless `worker.device` names another device;
//!   `train.objective`, by default SFT on the forum then KTO on the 👍/👎-labelled answers when
//!   there are at least `train.kto_min_examples`) → evaluate old and new on the new held-out
//!   split (loss, and preference accuracy on the held-out feedback) → promotion gate (hot-swap)
//!   → the old and new adapter answer the comparison questions → prune old adapters.
//!
//! A retrain's adapter id is `lora-job<N>` and its folder records the dataset it trains on
//! (`worker-run.json`): when the newest earlier retrain was interrupted and left a checkpoint,
//! the next `/retrain` resumes that run on that dataset (the trainer refuses a resume on other
//! data or settings) instead of starting over.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::progress::{Reporter, Status};
use super::promote::{self, Decision};
use super::{Done, WorkerCtx};
use crate::dataset::{self, BuildOptions};
use crate::llm::engine::{AdapterChoice, Event, Question};
use crate::llm::generate::GenOptions;
use crate::llm::load::LoadedModel;
use crate::llm::lora::LoraAdapter;
use crate::scrape::{scrape, CrawlOptions};
use crate::store::{Job, JobKind, JobState, Store};
use crate::train::settings::KtoReference;
use crate::train::{checkpoint, data, Outcome, Progress, TrainHooks, TrainRun};

/// Written into a retrain's run folder before training: what a resume needs.
pub const RUN_FILE: &str = "worker-run.json";

#[derive(Debug, Serialize, Deserialize)]
struct RunRecord {
    job: i64,
    dataset_dir: PathBuf,
}

/// One job's view of the worker.
pub struct JobCx<'a> {
    pub cx: &'a WorkerCtx,
    pub job: &'a Job,
    pub store: &'a Store,
    pub reporter: &'a Reporter,
}

/// Why a job should stop now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancel,
    Shutdown,
}

impl JobCx<'_> {
    fn report(&self, s: &Status) {
        self.reporter.update(self.store, s);
    }

    fn stop_requested(&self) -> Option<Stop> {
        if self.cx.stopping.load(Ordering::SeqCst) {
            return Some(Stop::Shutdown);
        }
        match self.store.job_cancel_requested(self.job.id) {
            Ok(true) => Some(Stop::Cancel),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(job = self.job.id, error = format!("{e:#}"), "reading the cancel flag");
                None
            }
        }
    }

    fn stopped(&self, why: Stop, what: String) -> Done {
        match why {
            Stop::Cancel => Done::Cancelled { headline: what },
            Stop::Shutdown => Done::Interrupted { headline: format!("{what}; the bot is restarting") },
        }
    }
}

/// Incremental scrape into the store. `Ok(Err(done))` when stopped on the way.
fn scrape_stage(jc: &JobCx<'_>) -> Result<std::result::Result<String, Done>> {
    let s = &jc.cx.settings;
    jc.report(&Status::stage("scrape"));
    let store = Mutex::new(Store::open_with(&s.store)?);
    let cancel = CancellationToken::new();
    let tick = Duration::from_millis(s.worker.status_interval_ms.min(1000));
    let opts = CrawlOptions { revalidate: false, progress: false };
    let mut stop = None;
    let report = jc.cx.rt.block_on(async {
        let crawl = scrape(&s.scrape, &store, &opts, &cancel);
        tokio::pin!(crawl);
        loop {
            tokio::select! {
                r = &mut crawl => break r,
                _ = tokio::time::sleep(tick) => {
                    if stop.is_none() {
                        stop = jc.stop_requested();
                        if stop.is_some() {
                            cancel.cancel();
                        }
                    }
                    let pages = store.lock().unwrap_or_else(|e| e.into_inner()).forum_counts().ok().map(|c| c.pages);
                    jc.report(&Status { done: pages, note: Some("pages in the store".into()), ..Status::stage("scrape") });
                }
            }
        }
    })?;
    if let Some(why) = stop {
        return Ok(Err(jc.stopped(why, format!("scrape stopped after {} pages (kept; the next scrape continues)", report.pages_fetched))));
    }
    Ok(Ok(format!(
        "scraped {} new and {} changed threads, {} pages fetched, {} failed threads",
        report.threads_new, report.threads_changed, report.pages_fetched, report.threads_failed
    )))
}

/// Rebuild the dataset from the store (reaction feedback included). Returns its folder and a line.
fn dataset_stage(jc: &JobCx<'_>) -> Result<(PathBuf, String)> {
    let s = &jc.cx.settings;
    jc.report(&Status::stage("dataset"));
    let mut store = Store::open_with(&s.store)?;
    let opts = BuildOptions { jobs: 1, ..Default::default() };
    let r = dataset::build(&mut store, &s.dataset, &s.scrape.clean_options(), &opts).context("building the dataset")?;
    let fb = r.stats.feedback;
    let line = format!(
        "dataset `{}`: {} train ({} from feedback), {} held out, {} rejected; labelled answers: {} 👍 / {} 👎 to learn from, {} held out to check",
        r.written.name,
        r.stats.train,
        r.stats.feedback_train,
        r.stats.test,
        r.stats.rejected,
        fb.desirable,
        fb.undesirable,
        fb.held_out_desirable + fb.held_out_undesirable
    );
    Ok((r.written.path, line))
}

pub fn rescrape(jc: &JobCx<'_>) -> Result<Done> {
    let scraped = match scrape_stage(jc)? {
        Ok(line) => line,
        Err(done) => return Ok(done),
    };
    let (_, built) = dataset_stage(jc)?;
    Ok(Done::Succeeded { headline: format!("{scraped}; {built}"), report: format!("Rescrape done.\n{scraped}\n{built}"), chart: None })
}

/// The newest earlier retrain, if it was interrupted and its run can be resumed.
fn resumable(jc: &JobCx<'_>) -> Result<Option<(String, PathBuf)>> {
    let s = &jc.cx.settings;
    let Some(last) = jc.store.last_job(JobKind::Retrain, jc.job.id)?.filter(|j| j.state == JobState::Interrupted) else { return Ok(None) };
    let id = adapter_id(last.id);
    let dir = s.adapter.dir.join(&id);
    if !checkpoint::path(&dir).is_file() {
        return Ok(None);
    }
    let record: RunRecord = match std::fs::read(dir.join(RUN_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
        Some(r) => r,
        None => return Ok(None),
    };
    if !record.dataset_dir.join(crate::dataset::output::TRAIN).is_file() {
        tracing::warn!(adapter = %id, dataset = %record.dataset_dir.display(), "the interrupted run's dataset is gone; starting a new run");
        return Ok(None);
    }
    Ok(Some((id, record.dataset_dir)))
}

fn adapter_id(job: i64) -> String {
    format!("lora-job{job}")
}

/// The model training runs on: the engine's own (shared frozen base) or a copy on `worker.device`.
fn train_model(jc: &JobCx<'_>) -> Result<Arc<LoadedModel>> {
    let s = &jc.cx.settings;
    if s.worker.device.is_empty() {
        return Ok(jc.cx.engine.model().clone());
    }
    let device = crate::llm::device::parse_device(&s.worker.device).context("worker.device")?;
    // The engine's own model, even when `--model` overrode `model.source`.
    let source = &jc.cx.engine.model().source;
    anyhow::ensure!(!source.is_empty(), "worker.device: the engine's model was built in memory and cannot be loaded again on {}", s.worker.device);
    tracing::info!(device = %s.worker.device, %source, "loading a second copy of the base model for training");
    Ok(Arc::new(crate::llm::load::load(&s.model, Some(source), &device).with_context(|| format!("loading the base model {source} on worker.device {}", s.worker.device))?))
}

/// The trainer's view of the job: progress to Discord, `/cancel` and shutdown, and yielding to
/// questions.
struct JobHooks<'a, 'b> {
    jc: &'a JobCx<'b>,
    stop: Cell<Option<Stop>>,
    /// First step reported: tells a resumed run from a fresh one.
    first_step: Cell<Option<usize>>,
}

impl TrainHooks for JobHooks<'_, '_> {
    fn progress(&self, p: &Progress) {
        if self.first_step.get().is_none() {
            self.first_step.set(Some(p.step));
        }
        let note = p.evaluating.then(|| "evaluating".to_string());
        self.jc.report(&Status { done: Some(p.step as u64), total: Some(p.total_steps as u64), loss: p.loss, eval_loss: p.eval_loss, eta: p.eta, note, ..Status::stage("train") });
    }

    fn should_stop(&self) -> bool {
        if self.stop.get().is_none() {
            self.stop.set(self.jc.stop_requested());
        }
        self.stop.get().is_some()
    }

    fn before_micro_batch(&self) {
        // Answering has priority: wait while questions are queued or being answered.
        let engine = &self.jc.cx.engine;
        while engine.has_waiting() && !self.jc.cx.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn after_step(&self, step: usize) {
        let planted = self.jc.cx.settings.worker.test_panic_after_step;
        if planted != 0 && step == planted {
            panic!("planted training failure after step {step} (worker.test_panic_after_step)");
        }
    }
}

pub fn retrain(jc: &JobCx<'_>) -> Result<Done> {
    let s = &jc.cx.settings;
    let mut lines = Vec::new();
    let (id, ds_dir) = match resumable(jc)? {
        Some((id, ds)) => {
            lines.push(format!("resuming the interrupted run `{id}` on dataset `{}`", ds.display()));
            (id, ds)
        }
        None => {
            if s.worker.retrain_rescrape {
                match scrape_stage(jc)? {
                    Ok(line) => lines.push(line),
                    Err(done) => return Ok(done),
                }
            }
            let (ds, line) = dataset_stage(jc)?;
            lines.push(line);
            let id = adapter_id(jc.job.id);
            let dir = s.adapter.dir.join(&id);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let record = RunRecord { job: jc.job.id, dataset_dir: ds.clone() };
            std::fs::write(dir.join(RUN_FILE), serde_json::to_vec_pretty(&record)?).context("recording the run's dataset")?;
            (id, ds)
        }
    };
    if let Some(why) = jc.stop_requested() {
        return Ok(jc.stopped(why, "stopped before training".into()));
    }

    jc.report(&Status::stage("train"));
    let lm = train_model(jc)?;
    let data = data::load(&ds_dir, &lm, &s.train, &s.generation.system_prompt)?;
    let run_dir = s.adapter.dir.join(&id);
    // The active adapter on the training device: the gate's comparison, and KTO's reference
    // with `train.kto_reference = "active"`.
    let old = jc.cx.engine.active_adapter();
    let old_on_train_device = match (&old, s.worker.device.is_empty()) {
        (Some(a), false) => Some(Arc::new(LoraAdapter::load(&crate::llm::lora::resolve_dir(&a.id, &s.adapter.dir)?, lm.model.config(), lm.model.device())?)),
        (a, _) => a.clone(),
    };
    let reference = match s.train.kto_reference {
        KtoReference::Active => old_on_train_device.as_deref(),
        KtoReference::Base => None,
    };
    let hooks = JobHooks { jc, stop: Cell::new(None), first_step: Cell::new(None) };
    let run = TrainRun { lm: &lm, reference, data: &data, settings: s.train.clone(), run_dir: run_dir.clone(), id: id.clone(), base_model: lm.name.clone() };
    let metrics = match run.run(&hooks).with_context(|| format!("training {id}"))? {
        Outcome::Completed(m) => m,
        Outcome::Cancelled { step } => {
            let why = hooks.stop.get().unwrap_or(Stop::Cancel);
            return Ok(jc.stopped(why, format!("training stopped at step {step}; nothing activated; the checkpoint is kept in {}", run_dir.display())));
        }
    };
    if let Some(first) = hooks.first_step.get().filter(|&f| f > 1) {
        lines.push(format!("resumed from step {}", first - 1));
    }
    match &metrics.kto {
        Some(k) => lines.push(format!(
            "preference training (KTO, {} steps after {} of SFT, reference {}): learned from {} labelled answers, {} 👍 (or corrected) as good and {} 👎 (or corrected originals) as bad",
            k.steps,
            k.from_step,
            k.reference,
            k.desirable + k.undesirable,
            k.desirable,
            k.undesirable
        )),
        None if !data.feedback.is_empty() => lines.push(format!(
            "{} labelled answers, fewer than train.kto_min_examples ({}): no preference training this time",
            data.feedback.len(),
            s.train.kto_min_examples
        )),
        None => {}
    }

    // Evaluate: the active adapter (or the bare base) on the same held-out split, and both on
    // the held-out feedback.
    jc.report(&Status::stage("evaluate"));
    let new_loss = metrics.final_eval_loss.context("training recorded no held-out loss (is test.jsonl empty?)")?;
    let old_loss = promote::held_out_loss(&lm, old_on_train_device.as_deref(), &data, &s.train).context("held-out loss of the active adapter")?;
    let (old_preference, new_preference) = if data.feedback_test.is_empty() {
        (None, None)
    } else {
        let new_adapter = LoraAdapter::load(&run_dir, lm.model.config(), lm.model.device()).context("loading the new adapter for its preference figures")?;
        (
            promote::held_out_preference(&lm, old_on_train_device.as_deref(), &data, &s.train).context("preference figures of the active adapter")?,
            promote::held_out_preference(&lm, Some(&new_adapter), &data, &s.train).context("preference figures of the new adapter")?,
        )
    };
    let held_out_feedback = data.feedback_test.len();
    drop(old_on_train_device);
    drop(data);
    drop(lm);
    let old_name = old.as_ref().map_or("base model (no adapter)".to_string(), |a| format!("`{}`", a.id));

    // Gate and hot-swap.
    jc.report(&Status::stage("promote"));
    let evidence = promote::Evidence { old_loss, new_loss, margin: s.worker.promotion_margin, old_preference, new_preference };
    let (decision, new) = promote::gate_and_publish(&jc.cx.engine, jc.cx.publisher.as_deref(), jc.store, &s.adapter.dir, &id, &evidence)?;
    let verdict = match &decision {
        Decision::Promoted { .. } => format!("`{id}` is now active."),
        Decision::Kept { reason } => format!("`{id}` was kept but **not activated**: {reason}. `/adapter activate {id}` switches to it anyway."),
    };

    jc.report(&Status::stage("compare"));
    let answers = compare(jc, old.clone(), new);
    match promote::prune(jc.store, &s.adapter.dir, s.worker.keep_adapters, &id) {
        Ok(removed) if !removed.is_empty() => lines.push(format!("pruned old adapters: {}", removed.join(", "))),
        Ok(_) => {}
        Err(e) => lines.push(format!("pruning old adapters failed: {e:#}")),
    }

    let mut report = format!("**Retrain #{} finished.** {verdict}\n", jc.job.id);
    report += &format!("Held-out loss: {old_name} **{old_loss:.4}** → `{id}` **{new_loss:.4}** ({} steps, {:.0} s)\n", metrics.steps, metrics.wall_time_s);
    match (old_preference, new_preference) {
        (Some(o), Some(n)) => {
            report += &format!(
                "Preference accuracy on held-out feedback ({} questions with a 👍 and a 👎 answer): {old_name} **{}** → `{id}` **{}** (margin {:+.3} → {:+.3} nats/token)\n",
                n.questions,
                o.percent(),
                n.percent(),
                o.margin,
                n.margin
            )
        }
        _ if held_out_feedback > 0 => {
            report += &format!("Preference accuracy: not measured ({held_out_feedback} held-out labelled answers, no question with both a good and a bad one)\n")
        }
        _ => {}
    }
    for l in &lines {
        report += &format!("• {l}\n");
    }
    report += &answers;
    let headline = match decision {
        Decision::Promoted { .. } => format!("`{id}` active (held-out loss {old_loss:.4} → {new_loss:.4})"),
        Decision::Kept { .. } => format!("`{id}` not activated (held-out loss {old_loss:.4} → {new_loss:.4})"),
    };
    let chart = run_dir.join(crate::train::report::CHART_FILE);
    Ok(Done::Succeeded { headline, report, chart: chart.is_file().then_some(chart) })
}

/// The comparison questions answered (greedy) by the old and the new adapter, as Markdown.
fn compare(jc: &JobCx<'_>, old: Option<Arc<LoraAdapter>>, new: Arc<LoraAdapter>) -> String {
    let s = &jc.cx.settings;
    let engine = &jc.cx.engine;
    let mut opts = GenOptions::from_settings(&s.generation, s.model.max_context, engine.model().model.config());
    opts.sampling.temperature = 0.0; // the same answer every time: a fair side-by-side
    opts.max_new_tokens = s.worker.compare_max_new_tokens;
    let ask = |q: &str, adapter: Option<Arc<LoraAdapter>>| -> String {
        let question = Question { history: Vec::new(), question: q.to_string(), opts: opts.clone(), adapter: AdapterChoice::Fixed(adapter) };
        let mut ticket = match engine.submit(question) {
            Ok(t) => t,
            Err(e) => return format!("*(not answered: {e})*"),
        };
        jc.cx.rt.block_on(async {
            while let Some(ev) = ticket.next().await {
                match ev {
                    Event::Finished(g) => return crate::discord::render::neutralize_mentions(g.text.trim()),
                    Event::Failed(e) => return format!("*(failed: {e})*"),
                    _ => {}
                }
            }
            "*(no answer)*".to_string()
        })
    };
    let old_label = old.as_ref().map_or("base".to_string(), |a| a.id.clone());
    let mut out = String::new();
    for q in &s.worker.compare_questions {
        let (a_old, a_new) = (ask(q, old.clone()), ask(q, Some(new.clone())));
        out += &format!("\n**Q: {}**\n> old ({old_label}): {}\n> new ({}): {}\n", crate::discord::render::neutralize_mentions(q), one_line(&a_old), new.id, one_line(&a_new));
    }
    out
}

fn one_line(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 400 {
        format!("{}…", flat.chars().take(400).collect::<String>())
    } else if flat.is_empty() {
        "*(empty)*".into()
    } else {
        flat
    }
}
