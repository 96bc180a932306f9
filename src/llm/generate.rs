//! The generation loop: prefill, then one token at a time with sampling, streaming text to a
//! callback, stopping on EOS, stop strings, the token budget, the context limit or cancellation.
//! Several prompts can run as one left-padded batch sharing each forward pass.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use candle_core::{IndexOp, Tensor};

use super::detok::StreamDecoder;
use super::load::LoadedModel;
use super::lora::LoraAdapter;
use super::model::{KvCache, Logits};
use super::sampling::{Sampler, SamplingParams};
use crate::config::GenerationSettings;

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

impl GenOptions {
    /// From settings; `seed: None` in the settings draws a fresh seed.
    pub fn from_settings(g: &GenerationSettings, max_context: usize) -> Self {
        Self {
            sampling: SamplingParams::from(g),
            max_new_tokens: g.max_new_tokens,
            stop: g.stop.clone(),
            seed: g.seed.unwrap_or_else(rand::random),
            max_context,
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
pub fn generate(lm: &LoadedModel, adapter: Option<&LoraAdapter>, prompt: &[u32], opts: &GenOptions, on_text: impl FnMut(&str) -> ControlFlow<()>) -> Result<Generation> {
    let req = Request { prompt: prompt.to_vec(), opts: opts.clone(), on_text: Box::new(on_text) };
    let mut out = generate_batch(lm, adapter, vec![req])?;
    Ok(out.remove(0))
}

/// Generate answers for several prompts at once (left-padded batch, one forward per step).
/// Rows leave the batch as they finish. Results come back in request order.
pub fn generate_batch(lm: &LoadedModel, adapter: Option<&LoraAdapter>, requests: Vec<Request<'_>>) -> Result<Vec<Generation>> {
    let started = Instant::now();
    let model = &lm.model;
    let n = requests.len();
    ensure!(n > 0, "no prompts to generate from");
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    for r in &requests {
        ensure!(!r.prompt.is_empty(), "empty prompt");
        ensure!(r.prompt.len() < r.opts.max_context, "prompt of {} tokens does not fit the context of {} tokens", r.prompt.len(), r.opts.max_context);
    }
    let mut rows: Vec<Row> = requests
        .into_iter()
        .map(|r| Row {
            sampler: Sampler::new(r.opts.sampling.clone(), r.opts.seed),
            context: r.prompt.clone(),
            answer: Vec::new(),
            decoder: StreamDecoder::new(&lm.tokenizer),
            stops: StopScanner::new(r.opts.stop.clone()),
            finish: None,
            first_token: None,
            done_at: None,
            opts: r.opts,
            on_text: r.on_text,
        })
        .collect();

    // Prefill: left-pad to the longest prompt.
    let pad_id = 0u32;
    let pads: Vec<usize> = rows.iter().map(|r| longest - r.context.len()).collect();
    let mut flat = Vec::with_capacity(n * longest);
    for (r, &p) in rows.iter().zip(&pads) {
        flat.extend(std::iter::repeat_n(pad_id, p));
        flat.extend_from_slice(&r.context);
    }
    let ids = Tensor::from_vec(flat, (n, longest), model.device())?;
    let mut cache = KvCache::with_padding(model.config(), pads);
    let mut logits = model.forward(&ids, &mut cache, adapter, Logits::Last)?;
    let mut active: Vec<usize> = (0..n).collect();

    loop {
        // [rows, 1, vocab] → one Vec per active row (one device→host copy for the batch).
        let all: Vec<Vec<f32>> = logits.i((.., 0, ..))?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let mut next_tokens = Vec::with_capacity(active.len());
        for (slot, &ri) in active.iter().enumerate() {
            let row = &mut rows[ri];
            let mut l = all[slot].clone();
            let tok = row.sampler.sample(&mut l, &row.context, &row.answer);
            row.first_token.get_or_insert_with(|| started.elapsed());
            row.step(tok, &lm.stop_ids, cache.len() + 1)?;
            next_tokens.push(tok);
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&s| rows[active[s]].finish.is_none()).collect();
        for &ri in &active {
            if rows[ri].finish.is_some() && rows[ri].done_at.is_none() {
                rows[ri].done_at = Some(started.elapsed());
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            cache.retain_rows(&keep)?;
            next_tokens = keep.iter().map(|&s| next_tokens[s]).collect();
            active = keep.iter().map(|&s| active[s]).collect();
        }
        let ids = Tensor::from_vec(next_tokens, (active.len(), 1), model.device())?;
        logits = model.forward(&ids, &mut cache, adapter, Logits::Last)?;
    }

    rows.into_iter()
        .map(|mut r| {
            let tail = r.decoder.finish()?.unwrap_or_default();
            let rest = r.stops.finish(&tail);
            if !rest.is_empty() && r.finish != Some(Finish::Cancelled) {
                let _ = (r.on_text)(&rest);
            }
            let first = r.first_token.unwrap_or_default();
            Ok(Generation {
                text: r.stops.text,
                prompt_tokens: r.context.len() - r.answer.len(),
                tokens: r.answer,
                finish: r.finish.unwrap_or(Finish::Length),
                time_to_first_token: first,
                decode_time: r.done_at.unwrap_or(first).saturating_sub(first),
            })
        })
        .collect()
}

struct Row<'a> {
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
}

impl Row<'_> {
    /// Take sampled token `tok`; `cache_len` is the context length once it is fed back.
    fn step(&mut self, tok: u32, stop_ids: &[u32], cache_len: usize) -> Result<()> {
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
        } else if cache_len >= self.opts.max_context {
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
