//! `train` and `eval`: fine-tune a LoRA adapter on a dataset folder, and compare an adapter with
//! the bare base on the held-out split.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::llm::device::parse_device;
use crate::llm::load::{self, LoadedModel};
use crate::train::data;
use crate::train::report::Metrics;
use crate::train::{Outcome, Progress, TrainHooks, TrainRun};

/// Dataset, base model and device: what `train` and `eval` both read.
#[derive(Debug, Args)]
pub struct RunInputs {
    /// Dataset folder (train.jsonl, test.jsonl); default: the latest build in dataset.dir.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Base model (default: model.source).
    #[arg(long)]
    pub model: Option<String>,
    /// cpu or cuda:N (default: train.device, else model.device).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub inputs: RunInputs,
    /// Adapter id: the run's folder under adapter.dir (default: lora-YYYYMMDD-HHMMSS).
    #[arg(long)]
    pub id: Option<String>,
    /// Continue the interrupted run with this id from its checkpoint.
    #[arg(long, conflicts_with = "id")]
    pub resume: Option<String>,
    /// Stop after this many optimizer steps (overrides train.max_steps).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// sft (train.jsonl), kto (the labelled answers of feedback.jsonl), sft+kto, or auto
    /// (sft+kto with at least train.kto_min_examples labelled answers); default train.objective.
    #[arg(long, value_parser = parse_objective)]
    pub objective: Option<crate::train::Objective>,
    /// KTO's reference: an adapter id under adapter.dir, or a folder (default: the base with the
    /// adapter off).
    #[arg(long)]
    pub reference: Option<String>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Adapter id under adapter.dir, or a folder.
    #[arg(long)]
    pub adapter: String,
    #[command(flatten)]
    pub inputs: RunInputs,
    /// Held-out questions answered by both (default: train.eval_questions).
    #[arg(long)]
    pub questions: Option<usize>,
    /// Markdown report path (default: eval.md in the adapter's folder).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn parse_objective(s: &str) -> std::result::Result<crate::train::Objective, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// The dataset folder named on the command line, or the one `dataset.dir/LATEST` names.
pub fn dataset_dir(settings: &Settings, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    let root = &settings.dataset.dir;
    let latest = root.join(crate::dataset::output::LATEST);
    let name = std::fs::read_to_string(&latest)
        .with_context(|| format!("no --data given and no dataset built yet ({} missing): run `freeski-bot dataset build` first", latest.display()))?;
    Ok(root.join(name.trim()))
}

fn load_model(settings: &Settings, inputs: &RunInputs) -> Result<LoadedModel> {
    let spec = inputs.device.clone().unwrap_or_else(|| if settings.train.device.is_empty() { settings.model.device.clone() } else { settings.train.device.clone() });
    let device = parse_device(&spec)?;
    load::load(&settings.model, inputs.model.as_deref(), &device)
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Progress bar, Ctrl-C, and the crash hook the resume tests use.
struct CliHooks {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    /// `FREESKI_TRAIN_ABORT_AFTER_STEP=N`: abort the process right after step N, as a kill
    /// would (no cleanup, no checkpoint beyond those already written). For tests.
    abort_after: Option<usize>,
}

impl TrainHooks for CliHooks {
    fn progress(&self, p: &Progress) {
        self.bar.set_length(p.total_steps as u64);
        self.bar.set_position(p.step as u64);
        let mut msg = String::new();
        if let Some(l) = p.loss {
            msg += &format!("loss {l:.3}");
        }
        match (p.evaluating, p.eval_loss) {
            (true, _) => msg += " · evaluating…",
            (false, Some(e)) => msg += &format!(" · eval {e:.3}"),
            _ => {}
        }
        msg += &format!(" · {:.0} tok/s", p.tokens_per_s);
        self.bar.set_message(msg);
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn after_step(&self, step: usize) {
        if self.abort_after == Some(step) {
            eprintln!("FREESKI_TRAIN_ABORT_AFTER_STEP={step}: aborting");
            std::process::abort();
        }
    }
}

pub fn train(settings: &Settings, args: TrainArgs) -> Result<()> {
    let mut ts = settings.train.clone();
    if let Some(n) = args.max_steps {
        ts.max_steps = n;
    }
    if let Some(o) = args.objective {
        ts.objective = o;
    }
    ts.validate()?;
    let id = match (&args.resume, &args.id) {
        (Some(id), _) | (None, Some(id)) => id.clone(),
        (None, None) => format!("lora-{}", utc_stamp()),
    };
    if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
        bail!("adapter id `{id}` must be a plain folder name");
    }
    let run_dir = settings.adapter.dir.join(&id);
    if args.resume.is_some() && !crate::train::checkpoint::path(&run_dir).is_file() {
        bail!("nothing to resume: {} has no checkpoint", run_dir.display());
    }
    let data_dir = dataset_dir(settings, args.inputs.data.as_deref())?;
    let lm = load_model(settings, &args.inputs)?;
    let data = data::load(&data_dir, &lm, &ts, &settings.generation.system_prompt)?;
    tracing::info!(dataset = %data_dir.display(), train = data.train.len(), test = data.test.len(), skipped = data.train_report.malformed + data.train_report.foreign_template + data.train_report.too_long, truncated = data.train_report.truncated, "dataset loaded");

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // First Ctrl-C: finish the micro-batch, checkpoint, exit. Second: exit now.
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this micro-batch and saving a checkpoint (Ctrl-C again to quit at once)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} · ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    let hooks = CliHooks { bar: bar.clone(), stop, abort_after: std::env::var("FREESKI_TRAIN_ABORT_AFTER_STEP").ok().and_then(|v| v.parse().ok()) };
    let reference = match &args.reference {
        Some(r) => {
            let dir = crate::llm::lora::resolve_dir(r, &settings.adapter.dir)?;
            Some(crate::llm::lora::LoraAdapter::load(&dir, lm.model.config(), lm.model.device()).with_context(|| format!("loading the reference adapter {r}"))?)
        }
        None => None,
    };
    let run = TrainRun { lm: &lm, reference: reference.as_ref(), data: &data, settings: ts, run_dir: run_dir.clone(), id: id.clone(), base_model: lm.name.clone() };
    let outcome = run.run(&hooks);
    bar.finish_and_clear();
    match outcome? {
        Outcome::Cancelled { step } => {
            println!("stopped at step {step}; resume with: freeski-bot train --resume {id}");
        }
        Outcome::Completed(m) => {
            println!("adapter {id} saved in {}", run_dir.display());
            println!(
                "steps {}{}  train loss {:.4}  held-out loss {}  {:.0} tokens/s  {:.1} s",
                m.steps,
                if m.stopped_early { " (stopped early)" } else { "" },
                m.train_loss.last().map_or(f64::NAN, |r| r.loss),
                m.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
                m.tokens_per_s,
                m.wall_time_s
            );
            if let Some(k) = &m.kto {
                let acc = |p: &Option<crate::train::kto::PrefEval>| p.map_or("-".to_string(), |p| format!("{} (margin {:+.4})", p.percent(), p.margin));
                println!(
                    "KTO from step {} on {} good / {} bad answers (reference {}); held-out preference accuracy: base {} → adapter {}",
                    k.from_step,
                    k.desirable,
                    k.undesirable,
                    k.reference,
                    acc(&k.base_preference),
                    acc(&k.preference)
                );
            }
        }
    }
    Ok(())
}

pub fn eval(settings: &Settings, args: EvalArgs) -> Result<()> {
    let data_dir = dataset_dir(settings, args.inputs.data.as_deref())?;
    let lm = load_model(settings, &args.inputs)?;
    let dir = crate::llm::lora::resolve_dir(&args.adapter, &settings.adapter.dir)?;
    let adapter = std::sync::Arc::new(crate::llm::lora::LoraAdapter::load(&dir, lm.model.config(), lm.model.device())?);
    let questions = args.questions.unwrap_or(settings.train.eval_questions);
    let report = crate::train::eval::compare(&lm, &adapter, &data_dir, &settings.train, &settings.generation, settings.model.max_context, questions)?;
    let mut metrics = Metrics::read(&dir).ok();
    let markdown = report.markdown(metrics.as_ref());
    if let (Some(m), Some(p)) = (metrics.as_mut(), &report.preference) {
        m.preference_eval = Some(p.clone());
        crate::train::report::write_json(&dir, m)?;
    }
    let path = args.report.unwrap_or_else(|| dir.join("eval.md"));
    std::fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", report.summary());
    println!("report written to {}", path.display());
    Ok(())
}
