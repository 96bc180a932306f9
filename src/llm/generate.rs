//! The generation loop: prefill, then one token at a time with sampling, streaming text to a
//! callback, stopping on EOS, stop strings, the token budget, the context limit or cancellation.
//!
//! Several answers share each decode step as a [`DecodeBatch`]. A question joins a batch after
//! a prefill of its own (never padded against other prompts), and the decode step computes each
//! row exactly as it would alone, so an answer does not depend on what it is batched with: the
//! same question and seed give the same tokens on an idle or a busy bot.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use candle_core::{IndexOp, Tensor};

use super::detok::StreamDecoder;
use super::load::LoadedModel;
use super::lora::LoraAdapter;
use super::model::{KvCache, Logits};
use super::model_config::ModelConfig;
use super::sampling::{Sampler, SamplingParams};
use super::settings::GenerationSettings;

#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Strings that end the answer; they are not part of the returned text.
    pub stop: Vec<String>,
    pub seed: u64,
    /// Prompt + answer never exceed this many tokens.
    pub max_context: usize,
}

/// Longest prompt + answer for a model of shape `cfg` when the settings ask for `setting`
/// tokens: capped by the model's own positions, and 0 means the model's own limit.
pub fn max_context(setting: usize, cfg: &ModelConfig) -> usize {
    match setting {
        0 => cfg.max_position,
        n => n.min(cfg.max_position),
    }
}

impl GenOptions {
    /// From the generation settings and `model.max_context` (see [`max_context`]) for a model
    /// of shape `cfg`; `seed: None` in the settings draws a fresh seed.
    pub fn from_settings(g: &GenerationSettings, context_setting: usize, cfg: &ModelConfig) -> Self {
        Self {
            sampling: SamplingParams::from(g),
            max_new_tokens: g.max_new_tokens,
            stop: g.stop.clone(),
            seed: g.seed.unwrap_or_else(rand::random),
            max_context: max_context(context_setting, cfg),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its turn.
    Eos,
    /// A stop string appeared (it is cut from the text).
    Stop(String),
    /// `max_new_tokens` reached.
    Length,
    /// The context window is full.
    Context,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// From start to the first sampled token (prefill + one sample).
    pub time_to_first_token: Duration,
    /// From the first token to the end.
    pub decode_time: Duration,
}

impl Generation {
    /// Tokens per second after the first token.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64()
    }
}

/// Callback receiving text as it becomes final; `Break` cancels the generation.
pub type OnText<'a> = Box<dyn FnMut(&str) -> ControlFlow<()> + 'a>;

pub struct Request<'a> {
    pub prompt: Vec<u32>,
    pub opts: GenOptions,
    pub on_text: OnText<'a>,
}

/// Generate one answer, streaming its text to `on_text`.
pub fn generate(lm: &LoadedModel, adapter: Option<Arc<LoraAdapter>>, prompt: &[u32], opts: &GenOptions, on_text: impl FnMut(&str) -> ControlFlow<()>) -> Result<Generation> {
    let req = Request { prompt: prompt.to_vec(), opts: opts.clone(), on_text: Box::new(on_text) };
    let mut out = generate_batch(lm, adapter, vec![req])?;
    Ok(out.remove(0))
}

/// Generate answers for several prompts at once: each is prefilled on its own, then they
/// decode together, one forward per step, leaving the batch as they finish. Results come back
/// in request order, each equal to what [`generate`] gives for it alone.
pub fn generate_batch(lm: &LoadedModel, adapter: Option<Arc<LoraAdapter>>, requests: Vec<Request<'_>>) -> Result<Vec<Generation>> {
    ensure!(!requests.is_empty(), "no prompts to generate from");
    let mut batch = DecodeBatch::new(lm);
    let n = requests.len();
    let started = Instant::now();
    for (i, r) in requests.into_iter().enumerate() {
        batch.add(i, r, started, adapter.clone())?;
    }
    let mut done: Vec<Option<Generation>> = (0..n).map(|_| None).collect();
    while !batch.is_empty() {
        for (i, g) in batch.step()? {
            done[i] = Some(g);
        }
    }
    done.into_iter().map(|g| g.ok_or_else(|| anyhow::anyhow!("internal: an answer never finished"))).collect()
}

/// Prompt tokens a row's prefill feeds in one step. Fixed, so that a prompt is always cut the
/// same way (and so computed the same way) whatever else is running; short enough that a long
/// prompt joining a batch holds up the answers already decoding for one chunk at a time.
pub const PREFILL_CHUNK: usize = 256;

/// Answers sharing decode steps (continuous batching). A row is [`added`](DecodeBatch::add)
/// at any time; each [`step`](DecodeBatch::step) feeds one prompt chunk of the oldest row still
/// prefilling (on its own cache, never padded against other prompts), then one token for every
/// row decoding, in one forward pass. A row whose prefill is done joins the decoding rows (its
/// cache merged into theirs); rows leave when they finish. Every row computes exactly what it
/// would alone. `K` is the caller's key for a row (an index, a ticket id), handed back with
/// its [`Generation`].
pub struct DecodeBatch<'a, K> {
    lm: &'a LoadedModel,
    /// Rows decoding, in cache order, with the token each feeds next.
    rows: Vec<(K, Row<'a>, u32)>,
    cache: Option<KvCache>,
    /// Rows still prefilling, oldest first.
    joining: VecDeque<Joining<'a, K>>,
}

struct Joining<'a, K> {
    key: K,
    row: Row<'a>,
    cache: KvCache,
    /// Prompt tokens fed so far.
    fed: usize,
}

impl<'a, K> DecodeBatch<'a, K> {
    pub fn new(lm: &'a LoadedModel) -> Self {
        Self { lm, rows: Vec::new(), cache: None, joining: VecDeque::new() }
    }

    /// Rows in the batch, decoding or prefilling.
    pub fn len(&self) -> usize {
        self.rows.len() + self.joining.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queue `req` for prefill, answered with `adapter` (`None`: the bare base); it decodes
    /// with the batch once its prompt is fed. `started` is when the answer's clock started (its
    /// time to first token counts from there). Rows of different adapters share decode steps
    /// ([`Model::forward_mixed`](super::model::Model::forward_mixed)); each still computes what
    /// it would alone where the model [mixes adapters](super::model::Model::mixes_adapters).
    pub fn add(&mut self, key: K, req: Request<'a>, started: Instant, adapter: Option<Arc<LoraAdapter>>) -> Result<()> {
        ensure!(!req.prompt.is_empty(), "empty prompt");
        ensure!(req.prompt.len() < req.opts.max_context, "prompt of {} tokens does not fit the context of {} tokens", req.prompt.len(), req.opts.max_context);
        let cache = KvCache::new(1);
        self.joining.push_back(Joining { key, row: Row::new(self.lm, req, started, adapter), cache, fed: 0 });
        Ok(())
    }

    /// Remove the rows still prefilling for which `keep` says no (a question cancelled before
    /// its first token); returns their keys.
    pub fn drop_prefilling(&mut self, mut keep: impl FnMut(&K) -> bool) -> Vec<K> {
        let mut dropped = Vec::new();
        for j in std::mem::take(&mut self.joining) {
            if keep(&j.key) {
                self.joining.push_back(j);
            } else {
                dropped.push(j.key);
            }
        }
        dropped
    }

    /// One step: a prompt chunk of the oldest prefilling row, then one token for every row
    /// decoding. Returns the answers that finished in it.
    pub fn step(&mut self) -> Result<Vec<(K, Generation)>> {
        let mut done = Vec::new();
        if let Some(finished) = self.prefill_chunk()? {
            done.push(finished);
        }
        done.extend(self.decode()?);
        Ok(done)
    }

    /// Feed the next chunk of the oldest prefilling row; when its prompt is fed, sample its
    /// first token and move it to the decoding rows (or return it, if that token ended it).
    fn prefill_chunk(&mut self) -> Result<Option<(K, Generation)>> {
        let Some(j) = self.joining.front_mut() else { return Ok(None) };
        let model = &self.lm.model;
        let end = (j.fed + PREFILL_CHUNK).min(j.row.context.len());
        let ids = Tensor::new(&j.row.context[j.fed..end], model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids, &mut j.cache, j.row.adapter.as_deref(), Logits::Last)?;
        j.fed = end;
        if j.fed < j.row.context.len() {
            return Ok(None);
        }
        let Some(Joining { key, mut row, cache, .. }) = self.joining.pop_front() else { return Ok(None) };
        let mut l: Vec<f32> = logits.i((0, 0))?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let tok = row.sample(&mut l, &self.lm.stop_ids)?;
        if row.finish.is_some() {
            return Ok(Some((key, row.into_generation()?)));
        }
        self.cache = Some(match self.cache.take() {
            Some(batch) => KvCache::merge(vec![batch, cache])?,
            None => cache,
        });
        self.rows.push((key, row, tok));
        Ok(None)
    }

    /// One token for every decoding row, in one forward pass.
    fn decode(&mut self) -> Result<Vec<(K, Generation)>> {
        let Some(cache) = self.cache.as_mut() else { return Ok(Vec::new()) };
        let model = &self.lm.model;
        let ids = Tensor::from_vec(self.rows.iter().map(|r| r.2).collect::<Vec<u32>>(), (self.rows.len(), 1), model.device())?;
        let adapters: Vec<Option<&LoraAdapter>> = self.rows.iter().map(|r| r.1.adapter.as_deref()).collect();
        let logits = model.forward_mixed(&ids, cache, &adapters, Logits::Last)?;
        // [rows, 1, vocab] → one Vec per row (one device→host copy for the batch).
        let all: Vec<Vec<f32>> = logits.i((.., 0, ..))?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        for ((_, row, next), mut l) in self.rows.iter_mut().zip(all) {
            *next = row.sample(&mut l, &self.lm.stop_ids)?;
        }
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].1.finish.is_none()).collect();
        let mut done = Vec::new();
        if keep.len() != self.rows.len() {
            if keep.is_empty() {
                self.cache = None;
            } else {
                cache.retain_rows(&keep)?;
            }
            let mut kept = Vec::with_capacity(keep.len());
            for (key, row, next) in std::mem::take(&mut self.rows) {
                if row.finish.is_some() {
                    done.push((key, row.into_generation()?));
                } else {
                    kept.push((key, row, next));
                }
            }
            self.rows = kept;
        }
        Ok(done)
    }
}

struct Row<'a> {
    started: Instant,
    sampler: Sampler,
    context: Vec<u32>,
    answer: Vec<u32>,
    decoder: StreamDecoder<'a>,
    stops: StopScanner,
    finish: Option<Finish>,
    first_token: Option<Duration>,
    done_at: Option<Duration>,
    opts: GenOptions,
    on_text: OnText<'a>,
    /// The adapter this answer is generated with, kept to its end (an adapter swapped out
    /// meanwhile lives on here).
    adapter: Option<Arc<LoraAdapter>>,
}

impl<'a> Row<'a> {
    fn new(lm: &'a LoadedModel, r: Request<'a>, started: Instant, adapter: Option<Arc<LoraAdapter>>) -> Self {
        Row {
            adapter,
            started,
            sampler: Sampler::new(r.opts.sampling.clone(), r.opts.seed),
            context: r.prompt,
            answer: Vec::new(),
            decoder: StreamDecoder::new(&lm.tokenizer),
            stops: StopScanner::new(r.opts.stop.clone()),
            finish: None,
            first_token: None,
            done_at: None,
            opts: r.opts,
            on_text: r.on_text,
        }
    }

    /// Sample the next token from this row's `logits` and take it; returns the token (to feed
    /// back unless the row finished).
    fn sample(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> Result<u32> {
        let tok = self.sampler.sample(logits, &self.context, &self.answer);
        self.first_token.get_or_insert_with(|| self.started.elapsed());
        self.step(tok, stop_ids)?;
        if self.finish.is_some() {
            self.done_at = Some(self.started.elapsed());
        }
        Ok(tok)
    }

    /// The finished answer: flush what the detokenizer and the stop scanner hold back.
    fn into_generation(mut self) -> Result<Generation> {
        let tail = self.decoder.finish()?.unwrap_or_default();
        let rest = self.stops.finish(&tail);
        if !rest.is_empty() && self.finish != Some(Finish::Cancelled) {
            let _ = (self.on_text)(&rest);
        }
        let first = self.first_token.unwrap_or_default();
        Ok(Generation {
            text: self.stops.text,
            prompt_tokens: self.context.len() - self.answer.len(),
            tokens: self.answer,
            finish: self.finish.unwrap_or(Finish::Length),
            time_to_first_token: first,
            decode_time: self.done_at.unwrap_or(first).saturating_sub(first),
        })
    }

    /// Take sampled token `tok`.
    fn step(&mut self, tok: u32, stop_ids: &[u32]) -> Result<()> {
        if stop_ids.contains(&tok) {
            self.finish = Some(Finish::Eos);
            return Ok(());
        }
        self.context.push(tok);
        self.answer.push(tok);
        if let Some(piece) = self.decoder.push(tok)? {
            let (emit, hit) = self.stops.push(&piece);
            if !emit.is_empty() && (self.on_text)(&emit).is_break() {
                self.finish = Some(Finish::Cancelled);
                return Ok(());
            }
            if let Some(s) = hit {
                self.finish = Some(Finish::Stop(s));
                return Ok(());
            }
        }
        if self.answer.len() >= self.opts.max_new_tokens {
            self.finish = Some(Finish::Length);
        } else if self.context.len() >= self.opts.max_context {
            self.finish = Some(Finish::Context);
        }
        Ok(())
    }
}

/// Finds stop strings in streamed text and holds back any tail that could still become one, so
/// a stop string is never half-shown to the user.
#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    /// Final text so far (emitted + held back).
    pub text: String,
    emitted: usize,
    stopped: bool,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    /// Add `piece`; returns the text now safe to show and the stop string hit, if any.
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        if self.stopped {
            return (String::new(), None);
        }
        let search_from = self.emitted.saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = self.text.floor_char_boundary(search_from);
        self.text.push_str(piece);
        let hit = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| (search_from + i, s.clone()))).min_by_key(|(i, _)| *i);
        if let Some((at, s)) = hit {
            self.text.truncate(at);
            self.stopped = true;
            let emit = self.text[self.emitted.min(at)..].to_string();
            self.emitted = self.text.len();
            return (emit, Some(s));
        }
        let hold = self.held_tail();
        let safe = self.text.len() - hold;
        let emit = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (emit, None)
    }

    /// Flush: add `tail` and return everything not yet shown (a held-back partial stop string
    /// that never completed is real text).
    pub fn finish(&mut self, tail: &str) -> String {
        let (mut out, hit) = self.push(tail);
        if hit.is_none() && !self.stopped {
            out.push_str(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
        out
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn held_tail(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && self.text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_context_zero_is_the_models_own_limit() {
        let cfg = ModelConfig::tiny();
        assert_eq!(max_context(0, &cfg), cfg.max_position);
        assert_eq!(max_context(100, &cfg), 100);
        assert_eq!(max_context(cfg.max_position * 4, &cfg), cfg.max_position);
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (String, String, Option<String>) {
        let mut s = StopScanner::new(stops.iter().map(|x| x.to_string()).collect());
        let mut shown = String::new();
        let mut hit = None;
        for p in pieces {
            let (e, h) = s.push(p);
            shown.push_str(&e);
            if h.is_some() {
                hit = h;
                break;
            }
        }
        if hit.is_none() {
            shown.push_str(&s.finish(""));
        }
        (shown, s.text, hit)
    }

    #[test]
    fn stop_string_split_over_pieces_is_never_shown() {
        let (shown, text, hit) = run(&["[INST]"], &["Land it", " clean. [I", "NS", "T] next"]);
        assert_eq!(shown, "Land it clean. ");
        assert_eq!(text, "Land it clean. ");
        assert_eq!(hit.as_deref(), Some("[INST]"));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let (shown, text, hit) = run(&["[INST]"], &["use [I", "ndy grab]"]);
        assert_eq!(shown, "use [Indy grab]");
        assert_eq!(text, shown);
        assert!(hit.is_none());
    }

    #[test]
    fn held_tail_at_end_is_flushed() {
        let (shown, _, hit) = run(&["**This post was edited"], &["Send it **"]);
        assert_eq!(shown, "Send it **");
        assert!(hit.is_none());
    }

    #[test]
    fn multibyte_text_is_safe() {
        let (shown, _, hit) = run(&["é!"], &["caf", "é", "é!", "x"]);
        assert_eq!(shown, "café");
        assert_eq!(hit.as_deref(), Some("é!"));
    }
}
