//! Chat templates: Mistral's `[INST]` format and ChatML, rendered straight to token ids with a
//! mask of the tokens the assistant wrote (what training learns from).
//!
//! Structure tokens are inserted by id and message text is encoded separately, so text that
//! merely looks like a control token (`<|im_start|>`, `</s>`) in a user's message is neutralised
//! instead of letting users forge turns.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::settings::TemplateChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self::new(Role::System, c)
    }
    pub fn user(c: impl Into<String>) -> Self {
        Self::new(Role::User, c)
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new(Role::Assistant, c)
    }
}

/// Token ids of a rendered conversation; `assistant[i]` marks tokens the assistant produced
/// (its text and its end-of-turn token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub assistant: Vec<bool>,
}

impl Encoded {
    fn push(&mut self, ids: impl IntoIterator<Item = u32>, assistant: bool) {
        for id in ids {
            self.ids.push(id);
            self.assistant.push(assistant);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<s>[INST] {user} [/INST]{assistant}</s>[INST] …` (Mistral-7B-Instruct-v0.1).
    Mistral,
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` (SmolLM2 and many others).
    ChatMl,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatTemplate {
    /// Resolve `auto` from the vocabulary: ChatML if it has `<|im_start|>`, else Mistral.
    pub fn choose(choice: TemplateChoice, tok: &Tokenizer) -> Result<Self> {
        let has_chatml = tok.token_to_id(IM_START).is_some() && tok.token_to_id(IM_END).is_some();
        Ok(match choice {
            TemplateChoice::Auto if has_chatml => Self::ChatMl,
            TemplateChoice::Auto | TemplateChoice::Mistral => Self::Mistral,
            TemplateChoice::Chatml if has_chatml => Self::ChatMl,
            TemplateChoice::Chatml => bail!("chat_template = \"chatml\" but the tokenizer has no <|im_start|>/<|im_end|> tokens"),
        })
    }

    /// The token that ends an assistant turn besides EOS, if the template has its own.
    pub fn end_of_turn_id(&self, tok: &Tokenizer) -> Option<u32> {
        match self {
            Self::ChatMl => tok.token_to_id(IM_END),
            Self::Mistral => None,
        }
    }

    /// Render `messages` to ids. With `add_generation_prompt` the result ends where the
    /// assistant's next answer starts. `bos`/`eos` come from the model's metadata.
    pub fn encode(&self, tok: &Tokenizer, bos: Option<u32>, eos: Option<u32>, messages: &[Message], add_generation_prompt: bool) -> Result<Encoded> {
        let mut out = Encoded::default();
        let text = |s: &str| -> Result<Vec<u32>> { encode_text(tok, s) };
        match self {
            Self::ChatMl => {
                let start = tok.token_to_id(IM_START).context("tokenizer lacks <|im_start|>")?;
                let end = tok.token_to_id(IM_END).context("tokenizer lacks <|im_end|>")?;
                for m in messages {
                    let role = match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    let is_asst = m.role == Role::Assistant;
                    out.push([start], false);
                    out.push(text(&format!("{role}\n"))?, false);
                    out.push(text(&neutralize(tok, &m.content))?, is_asst);
                    out.push([end], is_asst);
                    out.push(text("\n")?, false);
                }
                if add_generation_prompt {
                    out.push([start], false);
                    out.push(text("assistant\n")?, false);
                }
            }
            Self::Mistral => {
                let eos = eos.context("the Mistral template needs an EOS token id")?;
                out.push(bos, false);
                // v0.1 has no system role: the system prompt leads the first user turn.
                let mut system: Option<&str> = None;
                let mut expect_user = true;
                for m in messages {
                    match m.role {
                        Role::System => system = Some(&m.content),
                        Role::User => {
                            if !expect_user {
                                bail!("Mistral chat template needs user and assistant turns to alternate");
                            }
                            let content = neutralize(tok, &m.content);
                            let body = match system.take() {
                                Some(s) if !s.is_empty() => format!("{}\n\n{content}", neutralize(tok, s)),
                                _ => content,
                            };
                            out.push(text(&format!("[INST] {body} [/INST]"))?, false);
                            expect_user = false;
                        }
                        Role::Assistant => {
                            if expect_user {
                                bail!("Mistral chat template needs user and assistant turns to alternate");
                            }
                            out.push(text(&neutralize(tok, &m.content))?, true);
                            out.push([eos], true);
                            expect_user = true;
                        }
                    }
                }
                if add_generation_prompt && expect_user {
                    bail!("a generation prompt must end with a user turn");
                }
            }
        }
        Ok(out)
    }

    /// Prompt ids for one question (plus optional earlier turns and system prompt).
    pub fn prompt(&self, tok: &Tokenizer, bos: Option<u32>, eos: Option<u32>, system: &str, history: &[Message], question: &str) -> Result<Vec<u32>> {
        let mut msgs = Vec::with_capacity(history.len() + 2);
        if !system.is_empty() {
            msgs.push(Message::system(system));
        }
        msgs.extend(history.iter().cloned());
        msgs.push(Message::user(question));
        Ok(self.encode(tok, bos, eos, &msgs, true)?.ids)
    }
}

fn encode_text(tok: &Tokenizer, s: &str) -> Result<Vec<u32>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let enc = tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizing text: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Break up any special-token string inside message text (a zero-width space after its first
/// character) so the tokenizer reads it as plain text, never as a control token.
pub fn neutralize(tok: &Tokenizer, content: &str) -> String {
    let mut out = content.to_string();
    for added in tok.get_added_tokens_decoder().values() {
        if added.special && added.content.chars().count() > 1 && out.contains(&added.content) {
            let mut chars = added.content.chars();
            let first = chars.next().unwrap_or_default();
            let broken = format!("{first}\u{200B}{}", chars.as_str());
            out = out.replace(&added.content, &broken);
        }
    }
    out
}
