//! Training data: a dataset folder's chat-format JSONL (`train.jsonl`, held-out `test.jsonl`)
//! rendered with the model's chat template into token ids and a loss mask, the labelled answers
//! of `feedback.jsonl` / `feedback_test.jsonl` for preference training, plus the batch plan.
//!
//! The held-out split is the dataset's own (`dataset build` splits by thread); it is never
//! re-split here, so evaluations of different adapters on one dataset compare.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::kto::PrefExample;
use super::settings::{BadLines, LossOn, TrainSettings};
use crate::llm::chat::{Message, Role};
use crate::llm::load::LoadedModel;

/// One tokenized conversation. `target[t]` says whether the loss includes predicting `ids[t]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tokens the loss is computed on.
    pub fn targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// What reading one split found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitReport {
    pub lines: usize,
    pub used: usize,
    /// Lines that were not JSON conversations (bad JSON, missing/unknown roles, no answer).
    pub malformed: usize,
    /// Conversations whose text carries another chat template's control tokens.
    pub foreign_template: usize,
    /// Conversations cut to `max_len` tokens.
    pub truncated: usize,
    /// Conversations with no answer token left inside `max_len`.
    pub too_long: usize,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    /// SHA-256 over both files' bytes: a resumed run refuses a changed dataset.
    pub hash: String,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    pub train_report: SplitReport,
    pub test_report: SplitReport,
    /// Labelled answers (`feedback.jsonl`) and the held-out ones (`feedback_test.jsonl`); empty
    /// when the files are absent.
    pub feedback: Vec<PrefExample>,
    pub feedback_test: Vec<PrefExample>,
    pub feedback_report: SplitReport,
    pub feedback_test_report: SplitReport,
}

#[derive(Deserialize)]
struct Line {
    messages: Vec<Message>,
    #[serde(default)]
    label: Option<bool>,
}

/// Control strings of the chat templates we know. Text that contains them was rendered for some
/// model already (a dataset prepared for another tokenizer or template), and training on it
/// would teach the model to print them.
const TEMPLATE_MARKERS: &[&str] = &["[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>", "</s>"];

/// Read and tokenize `dir/train.jsonl` and `dir/test.jsonl`, and the labelled answers of
/// `dir/feedback.jsonl` and `dir/feedback_test.jsonl` where present. A folder needs
/// `train.jsonl` or `feedback.jsonl` (preference training alone).
pub fn load(dir: &Path, lm: &LoadedModel, settings: &TrainSettings, system_prompt: &str) -> Result<Dataset> {
    use crate::dataset::output::{FEEDBACK, FEEDBACK_TEST, TEST, TRAIN};
    ensure!(dir.is_dir(), "dataset folder {} does not exist", dir.display());
    let train_path = dir.join(TRAIN);
    let test_path = dir.join(TEST);
    let feedback_path = dir.join(FEEDBACK);
    ensure!(
        train_path.is_file() || feedback_path.is_file(),
        "{} is missing: not a dataset folder (build one with `freeski-bot dataset build`, or give {FEEDBACK} for preference training)",
        train_path.display()
    );
    let mut hash = Sha256::new();
    let (train, train_report) = if train_path.is_file() { read_split(&train_path, lm, settings, system_prompt, &mut hash)? } else { (Vec::new(), SplitReport::default()) };
    let (test, test_report) = if test_path.is_file() {
        read_split(&test_path, lm, settings, system_prompt, &mut hash)?
    } else {
        tracing::warn!(path = %test_path.display(), "no held-out split: evaluation is off");
        (Vec::new(), SplitReport::default())
    };
    if train.is_empty() && train_path.is_file() {
        bail!(
            "{} has no usable training conversation ({} lines: {} malformed, {} in another chat template's format, {} longer than train.max_len with no answer left)",
            train_path.display(),
            train_report.lines,
            train_report.malformed,
            train_report.foreign_template,
            train_report.too_long
        );
    }
    if train_report.foreign_template > 0 && train_report.foreign_template * 2 >= train_report.lines {
        bail!(
            "{}: {} of {} conversations already contain chat-template control tokens ([INST], <|im_start|>, …): this dataset was rendered for another model's tokenizer/template; give plain role/content messages",
            train_path.display(),
            train_report.foreign_template,
            train_report.lines
        );
    }
    let mut labelled = |path: &Path| -> Result<(Vec<PrefExample>, SplitReport)> {
        if !path.is_file() {
            return Ok((Vec::new(), SplitReport::default()));
        }
        // The file name goes into the hash too: the same lines as training or held-out
        // feedback are different datasets.
        hash.update(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        read_labelled(path, lm, settings, system_prompt, &mut hash)
    };
    let (feedback, feedback_report) = labelled(&feedback_path)?;
    let (feedback_test, feedback_test_report) = labelled(&dir.join(FEEDBACK_TEST))?;
    for (name, r) in [("train", &train_report), ("test", &test_report), ("feedback", &feedback_report), ("feedback_test", &feedback_test_report)] {
        if r.malformed + r.foreign_template + r.too_long > 0 {
            tracing::warn!(split = name, malformed = r.malformed, foreign_template = r.foreign_template, too_long = r.too_long, "conversations skipped");
        }
    }
    Ok(Dataset {
        dir: dir.to_path_buf(),
        hash: hex::encode(hash.finalize()),
        train,
        test,
        train_report,
        test_report,
        feedback,
        feedback_test,
        feedback_report,
        feedback_test_report,
    })
}

/// A conversation rendered with the chat template (system prompt first if configured), the
/// loss on the tokens `loss_on` names; not yet cut to `max_len`.
fn encode(lm: &LoadedModel, s: &TrainSettings, system_prompt: &str, conv: Vec<Message>, path: &Path, no: usize) -> Result<Example> {
    let eos = lm.stop_ids.first().copied();
    let mut messages = Vec::with_capacity(conv.len() + 1);
    if s.use_system_prompt && !system_prompt.is_empty() && conv[0].role != Role::System {
        messages.push(Message::system(system_prompt));
    }
    messages.extend(conv);
    let enc = lm.template.encode(&lm.tokenizer, lm.bos_id, eos, &messages, false).with_context(|| format!("{} line {no}", path.display()))?;
    Ok(Example {
        target: match s.loss_on {
            LossOn::Assistant => enc.assistant,
            LossOn::All => vec![true; enc.ids.len()],
        },
        ids: enc.ids,
    })
}

/// The labelled answers of a feedback file: the loss (and the log-probability that KTO and the
/// preference figures use) covers the final answer only, whatever `loss_on` says, since the label
/// is about that answer.
fn read_labelled(path: &Path, lm: &LoadedModel, s: &TrainSettings, system_prompt: &str, hash: &mut Sha256) -> Result<(Vec<PrefExample>, SplitReport)> {
    let (records, mut report) = read_records(path, s.bad_lines, Some(hash), true)?;
    let mut out = Vec::with_capacity(records.len());
    let answers_only = TrainSettings { loss_on: LossOn::Assistant, ..s.clone() };
    for (no, conv, label) in records {
        let Some(desirable) = label else { continue };
        let mut ex = encode(lm, &answers_only, system_prompt, conv, path, no)?;
        // The final answer: the last run of assistant tokens.
        let end = ex.target.iter().rposition(|&t| t).map_or(0, |i| i + 1);
        let start = ex.target[..end].iter().rposition(|&t| !t).map_or(0, |i| i + 1);
        for t in ex.target[..start].iter_mut() {
            *t = false;
        }
        if ex.len() > s.max_len {
            ex.ids.truncate(s.max_len);
            ex.target.truncate(s.max_len);
            report.truncated += 1;
        }
        if start == 0 || ex.targets() == 0 {
            report.too_long += 1;
            continue;
        }
        report.used += 1;
        out.push(PrefExample { ex, prompt_len: start, desirable });
    }
    Ok((out, report))
}

fn read_split(path: &Path, lm: &LoadedModel, s: &TrainSettings, system_prompt: &str, hash: &mut Sha256) -> Result<(Vec<Example>, SplitReport)> {
    let (conversations, mut report) = read_conversations(path, s.bad_lines, Some(hash))?;
    let mut out = Vec::with_capacity(conversations.len());
    for (no, conv) in conversations {
        let mut ex = encode(lm, s, system_prompt, conv, path, no)?;
        if ex.len() > s.max_len {
            ex.ids.truncate(s.max_len);
            ex.target.truncate(s.max_len);
            report.truncated += 1;
        }
        if ex.targets() == 0 {
            report.too_long += 1;
            continue;
        }
        report.used += 1;
        out.push(ex);
    }
    Ok((out, report))
}

/// A conversation with its 1-based line number in the JSONL file.
pub type NumberedConversation = (usize, Vec<Message>);

/// The usable conversations of a JSONL split with their 1-based line numbers. Bad lines are
/// skipped and counted (or fail, per `bad`); `hash`, if given, takes every line's bytes.
pub fn read_conversations(path: &Path, bad: BadLines, hash: Option<&mut Sha256>) -> Result<(Vec<NumberedConversation>, SplitReport)> {
    let (records, report) = read_records(path, bad, hash, false)?;
    Ok((records.into_iter().map(|(no, m, _)| (no, m)).collect(), report))
}

/// A line's number, messages and label.
type Record = (usize, Vec<Message>, Option<bool>);

/// The usable lines of a JSONL file: line number, messages and label. With `labelled`, a line
/// without a boolean `label` is a bad line.
fn read_records(path: &Path, bad: BadLines, mut hash: Option<&mut Sha256>, labelled: bool) -> Result<(Vec<Record>, SplitReport)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut report = SplitReport::default();
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let no = i + 1;
        let line = line.with_context(|| format!("reading {} line {no}", path.display()))?;
        if let Some(h) = hash.as_deref_mut() {
            h.update(line.as_bytes());
            h.update(b"\n");
        }
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let parsed = serde_json::from_str::<Line>(&line).map_err(anyhow::Error::from).and_then(|c| {
            check_turns(&c.messages)?;
            ensure!(!labelled || c.label.is_some(), "no boolean \"label\" (true: a good answer, false: a bad one)");
            Ok(c)
        });
        let record = match parsed {
            Ok(c) => c,
            Err(e) if bad == BadLines::Fail => bail!("{} line {no}: not a usable conversation: {e} (set train.bad_lines = \"skip\" to skip such lines)", path.display()),
            Err(e) => {
                if report.malformed < 5 {
                    tracing::debug!(path = %path.display(), line = no, error = %e, "skipping line");
                }
                report.malformed += 1;
                continue;
            }
        };
        if record.messages.iter().any(|m| TEMPLATE_MARKERS.iter().any(|k| m.content.contains(k))) {
            report.foreign_template += 1;
            continue;
        }
        out.push((no, record.messages, record.label));
    }
    Ok((out, report))
}

fn check_turns(messages: &[Message]) -> Result<()> {
    ensure!(!messages.is_empty(), "no messages");
    ensure!(messages.iter().any(|m| m.role == Role::Assistant), "no assistant turn");
    ensure!(messages.iter().all(|m| !m.content.trim().is_empty()), "empty message");
    Ok(())
}

/// The micro-batches of one epoch, as indices into the examples: shuffled from `(seed, epoch)`,
/// grouped with neighbours of similar length (little padding), in shuffled order. The same
/// inputs always give the same plan, which is what makes a resumed run see the same data.
pub fn epoch_plan(lengths: &[usize], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    // Sorting inside windows of this many batches trades padding for randomness.
    const WINDOW_BATCHES: usize = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch * WINDOW_BATCHES) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// A padded micro-batch: `ids` `[b, t]` (right padded) and per-row target flags.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

impl Batch {
    pub fn new(examples: &[&Example]) -> Self {
        let len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut target = Vec::with_capacity(examples.len() * len);
        for e in examples {
            ids.extend_from_slice(&e.ids);
            ids.resize(ids.len() + len - e.len(), 0);
            target.extend_from_slice(&e.target);
            target.resize(target.len() + len - e.len(), false);
        }
        Self { rows: examples.len(), len, ids, target }
    }

    /// Flat positions `b*len + t` whose hidden state predicts a target token `t + 1`, and those
    /// tokens.
    pub fn predictions(&self) -> (Vec<u32>, Vec<u32>) {
        let mut pos = Vec::new();
        let mut next = Vec::new();
        for b in 0..self.rows {
            for t in 0..self.len.saturating_sub(1) {
                let i = b * self.len + t;
                if self.target[i + 1] {
                    pos.push(i as u32);
                    next.push(self.ids[i + 1]);
                }
            }
        }
        (pos, next)
    }

    pub fn targets(&self) -> usize {
        self.predictions().0.len()
    }

    /// Real (non-padding) tokens.
    pub fn tokens(&self, examples: &[&Example]) -> usize {
        examples.iter().map(|e| e.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_deterministic_and_covers_every_example_once() {
        let lengths: Vec<usize> = (0..101).map(|i| (i * 37) % 50 + 1).collect();
        let a = epoch_plan(&lengths, 4, 7, 0);
        assert_eq!(a, epoch_plan(&lengths, 4, 7, 0));
        assert_ne!(a, epoch_plan(&lengths, 4, 7, 1), "epochs differ");
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..101).collect::<Vec<_>>());
        // Length grouping: padding is far below what random batches would waste.
        let waste = |plan: &[Vec<usize>]| -> usize {
            plan.iter()
                .map(|b| {
                    let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut order: Vec<usize> = (0..101).collect();
        order.shuffle(&mut rng);
        let random: Vec<Vec<usize>> = order.chunks(4).map(|c| c.to_vec()).collect();
        assert!(waste(&a) * 4 < waste(&random), "grouped {} vs random {}", waste(&a), waste(&random));
    }

    #[test]
    fn batch_predictions_follow_targets() {
        let a = Example { ids: vec![1, 2, 3, 4], target: vec![false, false, true, true] };
        let b = Example { ids: vec![5, 6], target: vec![false, true] };
        let batch = Batch::new(&[&a, &b]);
        assert_eq!(batch.ids, vec![1, 2, 3, 4, 5, 6, 0, 0]);
        let (pos, next) = batch.predictions();
        assert_eq!(pos, vec![1, 2, 4]);
        assert_eq!(next, vec![3, 4, 6]);
    }
}
