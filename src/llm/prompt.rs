//! Turning a question and its conversation into prompt ids that fit the context window. Shared by
//! the terminal (`ask`/`chat`) and the bot's engine, so both answer from the same prompt.

use anyhow::{ensure, Result};

use super::chat::Message;
use super::load::LoadedModel;

/// Prompt ids plus how much of the history survived trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Index of the first history message kept (`history.len()` when all were dropped).
    pub kept_from: usize,
}

/// Build the prompt for `question` after `history`. Earlier turns are dropped, oldest pair
/// first, until the prompt leaves room for `max_new_tokens` within `max_context`. Fails when the
/// question alone does not fit.
pub fn build(lm: &LoadedModel, system: &str, history: &[Message], question: &str, max_context: usize, max_new_tokens: usize) -> Result<Prompt> {
    let eos = lm.stop_ids.first().copied();
    let budget = max_context.saturating_sub(max_new_tokens).max(1);
    let mut start = 0;
    loop {
        let ids = lm.template.prompt(&lm.tokenizer, lm.bos_id, eos, system, &history[start..], question)?;
        if ids.len() <= budget || start >= history.len() {
            ensure!(ids.len() < max_context, "the question is too long: {} tokens of a {max_context}-token context", ids.len());
            return Ok(Prompt { ids, kept_from: start });
        }
        start = (start + 2).min(history.len()); // drop the oldest question/answer pair
    }
}

/// Keep the newest turns of `turns` (oldest first) whose token count adds up to at most
/// `max_tokens`; a turn that does not fit ends the walk, so the kept turns stay contiguous.
pub fn newest_within(lm: &LoadedModel, turns: &[Message], max_tokens: usize) -> Result<Vec<Message>> {
    let mut used = 0;
    let mut start = turns.len();
    for (i, m) in turns.iter().enumerate().rev() {
        let n = lm.tokenizer.encode(m.content.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing context: {e}"))?.len() + 4;
        if used + n > max_tokens {
            break;
        }
        used += n;
        start = i;
    }
    Ok(turns[start..].to_vec())
}
