//! Base model against adapter on a dataset's held-out split: loss and perplexity side by side,
//! and a few held-out questions answered by both next to the forum's own answer (the
//! prototype's ORIGINAL / FINETUNED table).

use std::path::Path;

use anyhow::Result;

use super::data::{self, read_conversations};
use super::dropout::Dropout;
use super::forward::TrainForward;
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
    pub base_loss: f64,
    pub adapter_loss: f64,
    pub answers: Vec<Answered>,
}

/// Held-out loss of the base and of `adapter`, and `questions` answers from each (greedy).
/// `gen` gives the system prompt and the sampling options (temperature forced to 0), and
/// `max_context` the context limit (`model.max_context`, 0 = the model's own).
pub fn compare(lm: &LoadedModel, adapter: &LoraAdapter, data_dir: &Path, ts: &TrainSettings, gen: &GenerationSettings, max_context: usize, questions: usize) -> Result<EvalReport> {
    let data = data::load(data_dir, lm, ts, &gen.system_prompt)?;
    let model = &lm.model;
    let fwd = TrainForward::new(model, activation_dtype(ts.precision, model.device()), Dropout::off());
    let view = LoraView::from_adapter(adapter, model.config().num_layers);
    let base_loss = evaluate(&fwd, None, &data.test, ts.batch_size)?;
    let adapter_loss = evaluate(&fwd, Some(&view), &data.test, ts.batch_size)?;

    let (convs, _) = read_conversations(&data_dir.join(crate::dataset::output::TEST), ts.bad_lines, None)?;
    let mut opts = GenOptions::from_settings(gen, max_context, model.config());
    opts.sampling.temperature = 0.0; // the same answer every run: a fair side-by-side
    let eos = lm.stop_ids.first().copied();
    let mut answers = Vec::new();
    for (_, conv) in convs.into_iter().take(questions) {
        let question = conv.iter().find(|m| m.role == Role::User).map(|m| m.content.clone()).unwrap_or_default();
        let truth = conv.iter().find(|m| m.role == Role::Assistant).map(|m| m.content.clone()).unwrap_or_default();
        let prompt = lm.template.prompt(&lm.tokenizer, lm.bos_id, eos, &gen.system_prompt, &[], &question)?;
        let base = generate(lm, None, &prompt, &opts, |_| std::ops::ControlFlow::Continue(()))?.text;
        let tuned = generate(lm, Some(adapter), &prompt, &opts, |_| std::ops::ControlFlow::Continue(()))?.text;
        answers.push(Answered { question, truth, base, adapter: tuned });
    }
    Ok(EvalReport { adapter_id: adapter.id.clone(), conversations: data.test.len(), base_loss, adapter_loss, answers })
}

impl EvalReport {
    pub fn summary(&self) -> String {
        format!(
            "held-out ({} conversations)   loss     perplexity\nbase                          {:.4}   {:.2}\nadapter {:<21} {:.4}   {:.2}",
            self.conversations,
            self.base_loss,
            self.base_loss.exp(),
            self.adapter_id,
            self.adapter_loss,
            self.adapter_loss.exp()
        )
    }

    pub fn markdown(&self, metrics: Option<&Metrics>) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
        let mut md = format!("# Evaluation of adapter `{}`\n\n", self.adapter_id);
        if let Some(m) = metrics {
            md += &format!("Base model `{}`, trained {} steps on dataset `{}` ({}).\n\n", m.base_model, m.steps, m.dataset_dir, &m.dataset_hash[..12.min(m.dataset_hash.len())]);
        }
        md += &format!("## Held-out loss ({} conversations)\n\n| model | loss (nats/token) | perplexity |\n|---|---|---|\n", self.conversations);
        md += &format!("| base | {:.4} | {:.2} |\n| adapter | {:.4} | {:.2} |\n\n", self.base_loss, self.base_loss.exp(), self.adapter_loss, self.adapter_loss.exp());
        md += "## Answers (greedy)\n\n| question | forum answer | ORIGINAL (base) | FINETUNED (adapter) |\n|---|---|---|---|\n";
        for a in &self.answers {
            md += &format!("| {} | {} | {} | {} |\n", cell(&a.question), cell(&a.truth), cell(a.base.trim()), cell(a.adapter.trim()));
        }
        md
    }
}
