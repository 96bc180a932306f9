//! Base model against adapter on a dataset's held-out split: loss and perplexity side by side,
//! the preference figures on the labelled answers (held-out feedback), and a few held-out
//! questions answered by both next to the forum's own answer (the prototype's ORIGINAL /
//! FINETUNED table).

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::data::{self, read_conversations};
use super::dropout::Dropout;
use super::forward::TrainForward;
use super::kto::{preference_eval, PrefEval};
use super::params::LoraView;
use super::report::Metrics;
use super::settings::TrainSettings;
use super::trainer::{activation_dtype, evaluate};
use crate::llm::chat::Role;
use crate::llm::generate::{generate, GenOptions};
use crate::llm::load::LoadedModel;
use crate::llm::lora::LoraAdapter;
use crate::llm::settings::GenerationSettings;

pub struct Answered {
    pub question: String,
    pub truth: String,
    pub base: String,
    pub adapter: String,
}

pub struct EvalReport {
    pub adapter_id: String,
    pub conversations: usize,
    /// `None` without held-out conversations (a folder of labelled answers only).
    pub base_loss: Option<f64>,
    pub adapter_loss: Option<f64>,
    pub preference: Option<PreferenceReport>,
    pub answers: Vec<Answered>,
}

/// Base and adapter on a set of labelled answers (`eval`, `metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreferenceReport {
    /// The file evaluated on (`feedback_test.jsonl`, else `feedback.jsonl`).
    pub file: String,
    pub answers: usize,
    /// `None` when no prompt has answers of both labels.
    pub base: Option<PrefEval>,
    pub adapter: Option<PrefEval>,
}

impl PreferenceReport {
    fn line(p: &Option<PrefEval>) -> String {
        p.map_or("-".into(), |p| format!("{} of {} questions, margin {:+.4} nats/token", p.percent(), p.questions, p.margin))
    }
}

/// Held-out loss of the base and of `adapter`, and `questions` answers from each (greedy).
/// `gen` gives the system prompt and the sampling options (temperature forced to 0), and
/// `max_context` the context limit (`model.max_context`, 0 = the model's own).
pub fn compare(
    lm: &LoadedModel,
    adapter: &Arc<LoraAdapter>,
    data_dir: &Path,
    ts: &TrainSettings,
    gen: &GenerationSettings,
    max_context: usize,
    questions: usize,
) -> Result<EvalReport> {
    let data = data::load(data_dir, lm, ts, &gen.system_prompt)?;
    let model = &lm.model;
    let fwd = TrainForward::new(model, activation_dtype(ts.precision, model.device()), Dropout::off());
    let view = LoraView::from_adapter(adapter, model.config().num_layers);
    let (base_loss, adapter_loss) = match data.test.is_empty() {
        true => (None, None),
        false => (Some(evaluate(&fwd, None, &data.test, ts.batch_size)?), Some(evaluate(&fwd, Some(&view), &data.test, ts.batch_size)?)),
    };
    let labelled = [(crate::dataset::output::FEEDBACK_TEST, &data.feedback_test), (crate::dataset::output::FEEDBACK, &data.feedback)].into_iter().find(|(_, set)| !set.is_empty());
    let preference = match labelled {
        Some((file, set)) => Some(PreferenceReport {
            file: file.to_string(),
            answers: set.len(),
            base: preference_eval(&fwd, None, set, ts.batch_size)?,
            adapter: preference_eval(&fwd, Some(&view), set, ts.batch_size)?,
        }),
        None => None,
    };
    anyhow::ensure!(base_loss.is_some() || preference.is_some(), "{} has neither held-out conversations nor labelled answers to evaluate on", data_dir.display());

    let test_path = data_dir.join(crate::dataset::output::TEST);
    let convs = if test_path.is_file() { read_conversations(&test_path, ts.bad_lines, None)?.0 } else { Vec::new() };
    let mut opts = GenOptions::from_settings(gen, max_context, model.config());
    opts.sampling.temperature = 0.0; // the same answer every run: a fair side-by-side
    let eos = lm.stop_ids.first().copied();
    let mut answers = Vec::new();
    for (_, conv) in convs.into_iter().take(questions) {
        let question = conv.iter().find(|m| m.role == Role::User).map(|m| m.content.clone()).unwrap_or_default();
        let truth = conv.iter().find(|m| m.role == Role::Assistant).map(|m| m.content.clone()).unwrap_or_default();
        let prompt = lm.template.prompt(&lm.tokenizer, lm.bos_id, eos, &gen.system_prompt, &[], &question)?;
        let base = generate(lm, None, &prompt, &opts, |_| std::ops::ControlFlow::Continue(()))?.text;
        let tuned = generate(lm, Some(adapter.clone()), &prompt, &opts, |_| std::ops::ControlFlow::Continue(()))?.text;
        answers.push(Answered { question, truth, base, adapter: tuned });
    }
    Ok(EvalReport { adapter_id: adapter.id.clone(), conversations: data.test.len(), base_loss, adapter_loss, preference, answers })
}

impl EvalReport {
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let (Some(b), Some(a)) = (self.base_loss, self.adapter_loss) {
            out += &format!(
                "held-out ({} conversations)   loss     perplexity\nbase                          {:.4}   {:.2}\nadapter {:<21} {:.4}   {:.2}",
                self.conversations,
                b,
                b.exp(),
                self.adapter_id,
                a,
                a.exp()
            );
        }
        if let Some(p) = &self.preference {
            if !out.is_empty() {
                out += "\n";
            }
            out += &format!(
                "preference accuracy on {} ({} labelled answers)\nbase                          {}\nadapter {:<21} {}",
                p.file,
                p.answers,
                PreferenceReport::line(&p.base),
                self.adapter_id,
                PreferenceReport::line(&p.adapter)
            );
        }
        out
    }

    pub fn markdown(&self, metrics: Option<&Metrics>) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
        let mut md = format!("# Evaluation of adapter `{}`\n\n", self.adapter_id);
        if let Some(m) = metrics {
            md += &format!("Base model `{}`, trained {} steps on dataset `{}` ({}).\n\n", m.base_model, m.steps, m.dataset_dir, &m.dataset_hash[..12.min(m.dataset_hash.len())]);
        }
        if let (Some(b), Some(a)) = (self.base_loss, self.adapter_loss) {
            md += &format!("## Held-out loss ({} conversations)\n\n| model | loss (nats/token) | perplexity |\n|---|---|---|\n", self.conversations);
            md += &format!("| base | {:.4} | {:.2} |\n| adapter | {:.4} | {:.2} |\n\n", b, b.exp(), a, a.exp());
        }
        if let Some(p) = &self.preference {
            md += &format!(
                "## Preferences ({} labelled answers of `{}`)\n\nOver the questions with both a desirable and an undesirable answer: the share where the desirable one is more likely per token (accuracy), and the mean per-token log-probability margin desirable − undesirable.\n\n| model | questions | accuracy | margin (nats/token) |\n|---|---|---|---|\n",
                p.answers, p.file
            );
            for (name, e) in [("base", &p.base), ("adapter", &p.adapter)] {
                md += &match e {
                    Some(e) => format!("| {name} | {} | {} | {:+.4} |\n", e.questions, e.percent(), e.margin),
                    None => format!("| {name} | 0 | - | - |\n"),
                };
            }
            md += "\n";
        }
        if !self.answers.is_empty() {
            md += "## Answers (greedy)\n\n| question | forum answer | ORIGINAL (base) | FINETUNED (adapter) |\n|---|---|---|---|\n";
            for a in &self.answers {
                md += &format!("| {} | {} | {} | {} |\n", cell(&a.question), cell(&a.truth), cell(a.base.trim()), cell(a.adapter.trim()));
            }
        }
        md
    }
}
