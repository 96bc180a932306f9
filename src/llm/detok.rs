//! Incremental detokenization for streaming answers.
//!
//! Decoding one token at a time is wrong in two ways: a character may be spread over several
//! tokens (byte-fallback `<0xF0><0x9F>...` pieces, or byte-level pieces of an emoji), and decoders
//! look at neighbours (SentencePiece strips the space of the *first* token only). So, like
//! vLLM/TGI, [`StreamDecoder`] decodes a short window: the tokens emitted last time (context) plus
//! the new ones, and emits what the window's text gained over the context's text, once it does
//! not end in U+FFFD (an unfinished UTF-8 sequence). The window then slides forward, so each
//! token costs O(1) decode work however long the answer is.
//!
//! Concatenating everything [`StreamDecoder::push`] and [`StreamDecoder::finish`] return equals
//! `tokenizer.decode(all_ids, skip_special_tokens)`, also when the ids stop mid-character. For
//! byte-fallback models (SentencePiece `<0xNN>` tokens) this needs one more rule: the decoder turns
//! a whole run of byte tokens into text at once (U+FFFD for every byte if the run is not valid
//! UTF-8), so text is only emitted once a run has ended, i.e. a character spelled in byte tokens
//! comes out with the token after it. Only pathological runs (over [`MAX_PENDING`] tokens, e.g.
//! garbage bytes) are emitted early, where the replacement characters may then differ.
//!
//! Why not `tokenizers::DecodeStream` (the same windowing idea, in the crate since 0.21): it
//! cannot flush, so an answer that stops mid-character loses its last bytes instead of ending in
//! U+FFFD as `decode` does (`finish` here); its window grows without bound while a byte run stays
//! invalid; and when a byte-fallback run that already decoded to a character is extended by bytes
//! that make the run invalid (garbage a sampled answer can contain), the decoder turns the whole
//! run into U+FFFD, the window's text no longer starts with what was emitted, and `step` fails
//! with `InvalidPrefix` where this decoder waits for the run to end. `tests/llm_detok.rs` holds
//! these cases.

use anyhow::{anyhow, Context, Result};
use tokenizers::{ModelWrapper, Tokenizer};

/// Pending tokens after which a byte run is emitted without waiting for its end (if its text is
/// valid so far), and twice this after which anything is emitted, so long byte runs or garbage
/// bytes cannot make the window (and the per-token cost) grow without bound.
pub const MAX_PENDING: usize = 32;

const REPLACEMENT: char = '\u{FFFD}';

/// Streams text out of token ids; see the module docs.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The model turns unknown characters into `<0xNN>` tokens that the decoder groups in runs.
    byte_fallback: bool,
    /// `ids[..read]`: emitted last time, kept as decoding context; `ids[read..]`: not yet emitted.
    ids: Vec<u32>,
    read: usize,
    /// `decode(ids[..read])`.
    prefix_text: String,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that drops special tokens (BOS, `<|im_end|>`, ...) like
    /// `decode(ids, skip_special_tokens = true)`.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_skip_special_tokens(tokenizer, true)
    }

    pub fn with_skip_special_tokens(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        let byte_fallback = matches!(tokenizer.get_model(), ModelWrapper::BPE(bpe) if bpe.byte_fallback);
        Self { tokenizer, skip_special_tokens, byte_fallback, ids: Vec::new(), read: 0, prefix_text: String::new() }
    }

    /// Adds one generated token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let token = self.tokenizer.id_to_token(id).with_context(|| format!("token id {id} is not in the tokenizer's vocabulary"))?;
        // Skipped tokens add no text; keeping them out of the window keeps it short.
        if self.skip_special_tokens && self.tokenizer.get_added_vocabulary().is_special_token(&token) {
            return Ok(None);
        }
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        let pending = self.ids.len() - self.read;
        let partial_char = text.ends_with(REPLACEMENT);
        let in_byte_run = self.byte_fallback && is_byte_token(&token);
        let emit = (!partial_char && (!in_byte_run || pending >= MAX_PENDING)) || pending >= 2 * MAX_PENDING;
        if !emit || text.len() <= self.prefix_text.len() {
            return Ok(None);
        }
        let new = suffix_after(&self.prefix_text, &text);
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.decode(&self.ids)?;
        Ok((!new.is_empty()).then(|| new.to_owned()))
    }

    /// Flushes what is left (an unfinished character comes out as U+FFFD, as in a full decode)
    /// and resets the decoder for a new stream.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let has_pending = self.ids.len() > self.read;
        let text = if has_pending { self.decode(&self.ids) } else { Ok(String::new()) };
        let prefix = std::mem::take(&mut self.prefix_text);
        // Reset even if decoding failed, so the next stream starts clean.
        self.reset();
        let text = text?;
        let new = suffix_after(&prefix, &text);
        Ok((has_pending && !new.is_empty()).then(|| new.to_owned()))
    }

    /// Forgets all state, for a new stream.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, self.skip_special_tokens).map_err(|e| anyhow!("decoding token ids {ids:?}: {e}"))
    }
}

/// A token the `ByteFallback` decoder reads as one raw byte.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') && u8::from_str_radix(&token[3..5], 16).is_ok()
}

/// The part of `text` after `prefix`. Normally `text` starts with `prefix`; if a broken byte
/// sequence changed the context's text, fall back to what follows their common prefix.
fn suffix_after<'t>(prefix: &str, text: &'t str) -> &'t str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common: usize = prefix.chars().zip(text.chars()).take_while(|(a, b)| a == b).map(|(a, _)| a.len_utf8()).sum();
    &text[common..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mistral() -> Tokenizer {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizers/mistral-7b-v0.1.tokenizer.json");
        Tokenizer::from_file(path).expect("mistral fixture tokenizer")
    }

    #[test]
    fn suffix_after_handles_divergent_prefix() {
        assert_eq!(suffix_after("ab", "abc"), "c");
        assert_eq!(suffix_after("", "x"), "x");
        assert_eq!(suffix_after("a\u{e9}", "a\u{FFFD}\u{FFFD}z"), "\u{FFFD}\u{FFFD}z");
    }

    #[test]
    fn window_stays_bounded_over_a_long_stream() {
        let tok = mistral();
        let text = "Carving on groomers, then a switch 900 off the big kicker 🎿 — stomped it! ".repeat(60);
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert!(ids.len() > 1000);
        let mut dec = StreamDecoder::new(&tok);
        let mut out = String::new();
        let mut max_window = 0;
        for &id in &ids {
            if let Some(s) = dec.push(id).unwrap() {
                out.push_str(&s);
            }
            max_window = max_window.max(dec.ids.len());
        }
        out.extend(dec.finish().unwrap());
        assert_eq!(out, tok.decode(&ids, true).unwrap());
        assert!(max_window <= 8, "window grew to {max_window} tokens");
    }

    #[test]
    fn garbage_bytes_are_flushed_after_max_pending() {
        let tok = mistral();
        let byte = tok.token_to_id("<0xF0>").unwrap();
        let mut dec = StreamDecoder::new(&tok);
        let mut flushes = 0;
        for _ in 0..MAX_PENDING * 6 {
            flushes += usize::from(dec.push(byte).unwrap().is_some());
            // Flushed tokens stay as context: at most two hard caps in the window.
            assert!(dec.ids.len() <= 4 * MAX_PENDING);
        }
        assert!(flushes >= 2);
    }

    #[test]
    fn long_valid_byte_run_streams_before_it_ends() {
        let tok = mistral();
        // Old Hangul syllables: not in Mistral's vocabulary, three byte tokens each.
        let text: String = (0..60).map(|i| char::from_u32(0xB000 + i * 7).unwrap()).collect();
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert!(ids.iter().filter(|&&id| (3..259).contains(&id)).count() > 3 * MAX_PENDING);
        let mut dec = StreamDecoder::new(&tok);
        let mut out = String::new();
        let mut chunks = 0;
        for &id in &ids {
            if let Some(s) = dec.push(id).unwrap() {
                assert!(!s.contains(REPLACEMENT), "{s:?}");
                out.push_str(&s);
                chunks += 1;
            }
            assert!(dec.ids.len() <= 4 * MAX_PENDING);
        }
        out.extend(dec.finish().unwrap());
        assert!(chunks >= 3, "only {chunks} chunks");
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }
}
