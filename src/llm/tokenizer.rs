//! A Hugging Face [`Tokenizer`] rebuilt from the vocabulary llama.cpp stores in GGUF metadata
//! (`tokenizer.ggml.*`), so a lone `.gguf` file is enough to run a model.
//!
//! Two vocabulary kinds are supported, as llama.cpp's converters write them:
//!
//! * `tokenizer.ggml.model = "gpt2"`: GPT-2 style byte-level BPE (SmolLM2, Llama 3, Qwen2, ...).
//!   Tokens and merges are stored as-is; `tokenizer.ggml.pre` names the pre-tokenizer (the regex
//!   splitting text into words before BPE), which we map to the equivalent HF pre-tokenizer.
//! * `tokenizer.ggml.model = "llama"`: SentencePiece BPE (Llama 1/2, Mistral). Only pieces and
//!   scores are stored; the HF merge list is derived from them exactly as HF's SentencePiece
//!   converter does (pairs of pieces ordered by the merged piece's score), with byte fallback.
//!
//! Control tokens (and the unknown token) become *special* added tokens, so `<|im_start|>` or
//! `</s>` in the text encode as one id and `decode(.., skip_special_tokens = true)` drops them.
//! User-defined tokens become non-special added tokens: matched whole, but kept when decoding.
//!
//! No post-processor is installed: encoding never adds BOS/EOS. The caller (chat template / model
//! code) adds BOS itself where the model wants one; [`SpecialTokens::add_bos`] says whether the
//! GGUF asks for it.

use std::collections::HashMap;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF metadata as read by `candle_core::quantized::gguf_file::Content::read`.
pub type Metadata = HashMap<String, Value>;

pub const KEY_MODEL: &str = "tokenizer.ggml.model";
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
pub const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
pub const KEY_PAD: &str = "tokenizer.ggml.padding_token_id";
pub const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";

/// SentencePiece's word-boundary marker (U+2581), which stands for a space in "llama" vocabularies.
const SPM_SPACE: &str = "\u{2581}";

/// Token-id metadata of a GGUF vocabulary. Absent keys are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether the model expects a BOS before every prompt. The
    /// tokenizer built here never adds it; callers do (llama.cpp's default when absent: true for
    /// "llama" vocabularies, false for most "gpt2" ones).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
}

/// Reads the special-token ids, leniently: a malformed or out-of-range value is logged and read as
/// absent, so a model with odd metadata still loads. [`tokenizer_from_gguf`] rejects such metadata
/// through [`try_special_tokens`].
pub fn special_tokens(metadata: &Metadata) -> SpecialTokens {
    let n_tokens = vocab_len(metadata);
    let id = |key: &str| {
        read_token_id(metadata, key, n_tokens).unwrap_or_else(|e| {
            tracing::warn!("ignoring GGUF metadata: {e:#}");
            None
        })
    };
    let flag = |key: &str| {
        opt_bool(metadata, key).unwrap_or_else(|e| {
            tracing::warn!("ignoring GGUF metadata: {e:#}");
            None
        })
    };
    SpecialTokens { bos: id(KEY_BOS), eos: id(KEY_EOS), pad: id(KEY_PAD), unk: id(KEY_UNK), add_bos: flag(KEY_ADD_BOS), add_eos: flag(KEY_ADD_EOS) }
}

/// Like [`special_tokens`] but strict: a value of the wrong type, or an id outside
/// `tokenizer.ggml.tokens`, is an error naming the key.
pub fn try_special_tokens(metadata: &Metadata) -> Result<SpecialTokens> {
    let n_tokens = vocab_len(metadata);
    Ok(SpecialTokens {
        bos: read_token_id(metadata, KEY_BOS, n_tokens)?,
        eos: read_token_id(metadata, KEY_EOS, n_tokens)?,
        pad: read_token_id(metadata, KEY_PAD, n_tokens)?,
        unk: read_token_id(metadata, KEY_UNK, n_tokens)?,
        add_bos: opt_bool(metadata, KEY_ADD_BOS)?,
        add_eos: opt_bool(metadata, KEY_ADD_EOS)?,
    })
}

/// Builds the tokenizer described by the GGUF metadata (see the module docs). Errors name the
/// offending metadata key.
pub fn tokenizer_from_gguf(metadata: &Metadata) -> Result<Tokenizer> {
    let kind = get_str(metadata, KEY_MODEL)?;
    let tokens = str_array(metadata, KEY_TOKENS)?;
    ensure!(!tokens.is_empty(), "GGUF metadata `{KEY_TOKENS}` is empty");
    ensure!(u32::try_from(tokens.len()).is_ok(), "GGUF metadata `{KEY_TOKENS}` has {} entries, more than u32 ids can address", tokens.len());
    let types = token_types(metadata, tokens.len())?;
    let specials = try_special_tokens(metadata)?;
    match kind {
        "gpt2" => build_gpt2(metadata, &tokens, &types),
        "llama" => build_llama(metadata, &tokens, &types, specials.unk),
        other => bail!("unsupported GGUF `{KEY_MODEL}` = {other:?} (supported: \"gpt2\" byte-level BPE and \"llama\" SentencePiece BPE)"),
    }
}

/// llama.cpp's `llama_token_type` values (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

fn token_types(md: &Metadata, n_tokens: usize) -> Result<Vec<TokenType>> {
    let raw = int_array(md, KEY_TOKEN_TYPE)?;
    ensure!(raw.len() == n_tokens, "GGUF metadata `{KEY_TOKEN_TYPE}` has {} entries but `{KEY_TOKENS}` has {n_tokens}", raw.len());
    raw.iter()
        .enumerate()
        .map(|(i, &t)| {
            Ok(match t {
                // 0 is "undefined": llama.cpp treats it like a normal piece.
                0 | 1 => TokenType::Normal,
                2 => TokenType::Unknown,
                3 => TokenType::Control,
                4 => TokenType::UserDefined,
                5 => TokenType::Unused,
                6 => TokenType::Byte,
                other => bail!("GGUF metadata `{KEY_TOKEN_TYPE}`[{i}] = {other} is not a llama.cpp token type (0-6)"),
            })
        })
        .collect()
}

/// Token -> id. A token listed twice keeps its first id (llama.cpp resolves text the same way);
/// the later id stays decodable only if it is an added token.
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    let mut duplicates = 0usize;
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.contains_key(*tok) {
            duplicates += 1;
        } else {
            vocab.insert((*tok).to_owned(), id as u32);
        }
    }
    if duplicates > 0 {
        tracing::warn!("GGUF `{KEY_TOKENS}` lists {duplicates} token(s) more than once; the first id of each wins when encoding");
    }
    vocab
}

/// Control/unknown tokens become special added tokens, user-defined ones plain added tokens;
/// both are matched in the raw text before normalization and BPE.
fn added_tokens(tokens: &[&str], types: &[TokenType]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter_map(|(tok, ty)| {
            let special = match ty {
                TokenType::Control | TokenType::Unknown => true,
                TokenType::UserDefined => false,
                _ => return None,
            };
            Some(AddedToken::from(*tok, special).normalized(false))
        })
        .collect()
}

fn add_tokens(tok: &mut Tokenizer, tokens: &[&str], types: &[TokenType]) -> Result<()> {
    tok.add_tokens(added_tokens(tokens, types)).map_err(|e| anyhow!("registering control/user-defined tokens from `{KEY_TOKEN_TYPE}`: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// "gpt2": byte-level BPE

fn build_gpt2(md: &Metadata, tokens: &[&str], types: &[TokenType]) -> Result<Tokenizer> {
    let pre = match md.get(KEY_PRE) {
        Some(_) => get_str(md, KEY_PRE)?,
        None => {
            // llama.cpp's choice for old conversions, with the same warning.
            tracing::warn!("GGUF metadata has no `{KEY_PRE}`; using llama.cpp's \"default\" pre-tokenizer (quality may suffer)");
            "default"
        }
    };
    let setup = gpt2_pre_tokenizer(pre)?;

    let merges = str_array(md, KEY_MERGES)?
        .iter()
        .enumerate()
        .map(|(i, m)| split_merge(m).with_context(|| format!("GGUF metadata `{KEY_MERGES}`[{i}] = {m:?}")))
        .collect::<Result<Merges>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .ignore_merges(setup.ignore_merges)
        .build()
        .map_err(|e| anyhow!("GGUF metadata `{KEY_MERGES}` does not fit `{KEY_TOKENS}`: {e}"))?;

    let mut tok = Tokenizer::new(bpe);
    if let Some(n) = setup.normalizer {
        tok.with_normalizer(Some(n)).map_err(|e| anyhow!("setting the normalizer: {e}"))?;
    }
    tok.with_pre_tokenizer(Some(setup.pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    add_tokens(&mut tok, tokens, types)?;
    Ok(tok)
}

/// Splits a GGUF merge "left right" the way llama.cpp does: at the first space after the first
/// byte, so a left part that is itself a space still works.
fn split_merge(merge: &str) -> Result<(String, String)> {
    let first_len = merge.chars().next().map(char::len_utf8).context("empty merge")?;
    let pos = merge[first_len..].find(' ').map(|p| p + first_len).context("not two tokens separated by a space")?;
    Ok((merge[..pos].to_owned(), merge[pos + 1..].to_owned()))
}

struct Gpt2Setup {
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
}

/// GPT-2's word regex, as HF's `ByteLevel(use_regex = true)` and llama.cpp's "gpt-2" use it.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's tokenizer.json split regex (numbers in groups of up to three digits).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's tokenizer.json split regex (single digits).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's "default" chain, applied one after the other (each splits the previous pieces).
const DEFAULT_REGEXES: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"];

/// Maps llama.cpp's `tokenizer.ggml.pre` names to the HF pre-tokenizers of the original
/// tokenizer.json files.
fn gpt2_pre_tokenizer(pre: &str) -> Result<Gpt2Setup> {
    // Byte-level mapping after an explicit split: no second regex pass.
    let byte_level = || PreTokenizerWrapper::from(ByteLevel::new(false, true, false));
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(SplitPattern::Regex(re.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::from)
            .map_err(|e| anyhow!("compiling the {pre:?} pre-tokenizer regex: {e}"))
    };
    let seq = |v: Vec<PreTokenizerWrapper>| PreTokenizerWrapper::from(PreTokenizerSequence::new(v));
    let setup = |pre_tokenizer, normalizer, ignore_merges| Gpt2Setup { normalizer, pre_tokenizer, ignore_merges };
    Ok(match pre {
        // StarCoder's tokenizer (SmolLM inherited it): every digit alone, then GPT-2 bytes/regex.
        "smollm" | "starcoder" => setup(seq(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]), None, false),
        "gpt-2" | "gpt2" => setup(ByteLevel::new(false, true, true).into(), None, false),
        "default" => {
            let mut steps = DEFAULT_REGEXES.iter().map(|re| split(re)).collect::<Result<Vec<_>>>()?;
            steps.push(byte_level());
            setup(seq(steps), None, false)
        }
        // Llama 3 looks whole words up before merging (`ignore_merges`), as its tokenizer.json says.
        "llama-bpe" | "llama3" | "llama-v3" => setup(seq(vec![split(LLAMA3_REGEX)?, byte_level()]), None, true),
        "qwen2" => setup(seq(vec![split(QWEN2_REGEX)?, byte_level()]), Some(NFC.into()), false),
        other => bail!("unsupported GGUF `{KEY_PRE}` = {other:?} (supported: \"smollm\", \"starcoder\", \"gpt-2\", \"default\", \"llama-bpe\", \"qwen2\")"),
    })
}

// ---------------------------------------------------------------------------------------------
// "llama": SentencePiece BPE

fn build_llama(md: &Metadata, tokens: &[&str], types: &[TokenType], unk_id: Option<u32>) -> Result<Tokenizer> {
    let scores = f32_array(md, KEY_SCORES)?;
    ensure!(scores.len() == tokens.len(), "GGUF metadata `{KEY_SCORES}` has {} entries but `{KEY_TOKENS}` has {}", scores.len(), tokens.len());
    // SentencePiece's add_dummy_prefix; llama.cpp's default for "llama" vocabularies is true.
    let add_space_prefix = opt_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);

    let unk_id = unk_id.or_else(|| types.iter().position(|t| *t == TokenType::Unknown).map(|i| i as u32));
    let mut builder = BPE::builder().vocab_and_merges(vocab_map(tokens), spm_merges(tokens, types, &scores)).byte_fallback(true).fuse_unk(true);
    if let Some(id) = unk_id {
        builder = builder.unk_token(tokens[id as usize].to_owned());
    }
    let bpe = builder.build().map_err(|e| anyhow!("building BPE from `{KEY_TOKENS}`/`{KEY_SCORES}`: {e}"))?;

    let mut tok = Tokenizer::new(bpe);
    // Same layout as HF's Llama/Mistral tokenizer.json: spaces become "▁", plus one in front.
    let to_marker = Replace::new(" ", SPM_SPACE).map_err(|e| anyhow!("building the normalizer: {e}"))?;
    let normalizer: NormalizerWrapper =
        if add_space_prefix { NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.to_owned()).into(), to_marker.into()]).into() } else { to_marker.into() };
    tok.with_normalizer(Some(normalizer)).map_err(|e| anyhow!("setting the normalizer: {e}"))?;

    let from_marker = Replace::new(SPM_SPACE, " ").map_err(|e| anyhow!("building the decoder: {e}"))?;
    let mut decoders: Vec<DecoderWrapper> = vec![from_marker.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        // Undo the prepended space (only at the very start of the decoded text).
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    add_tokens(&mut tok, tokens, types)?;
    Ok(tok)
}

/// HF's SentencePiece converter, applied to GGUF pieces: every split of a piece into two pieces
/// is a merge ranked by the merged piece's score (higher first); ties go to the longer left part,
/// then the longer right part, then vocabulary order. Only normal pieces take part, because
/// SentencePiece never builds byte, control or user-defined pieces by merging.
fn spm_merges(tokens: &[&str], types: &[TokenType], scores: &[f32]) -> Merges {
    let mut normal: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if *ty == TokenType::Normal {
            normal.entry(*tok).or_insert(id as u32);
        }
    }
    // A total order that treats -0.0 as 0.0 and NaN as the worst score.
    let key = |s: f32| {
        if s.is_nan() {
            f32::NEG_INFINITY
        } else if s == 0.0 {
            0.0
        } else {
            s
        }
    };

    struct Candidate {
        left: u32,
        right: u32,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut candidates = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if normal.get(tok) != Some(&(id as u32)) {
            continue;
        }
        let n_chars = tok.chars().count();
        let start = candidates.len();
        for (k, (pos, _)) in tok.char_indices().enumerate().skip(1) {
            let (l, r) = tok.split_at(pos);
            if let (Some(&left), Some(&right)) = (normal.get(l), normal.get(r)) {
                candidates.push(Candidate { left, right, score: key(scores[id]), left_chars: k, right_chars: n_chars - k });
            }
        }
        candidates[start..].sort_by_key(|c| (c.left, c.right));
    }
    // Stable sort, so full ties keep vocabulary order (as Python's sorted does).
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then(b.left_chars.cmp(&a.left_chars)).then(b.right_chars.cmp(&a.right_chars)));
    candidates.into_iter().map(|c| (tokens[c.left as usize].to_owned(), tokens[c.right as usize].to_owned())).collect()
}

// ---------------------------------------------------------------------------------------------
// Typed metadata access with errors that name the key.

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn get<'a>(md: &'a Metadata, key: &str) -> Result<&'a Value> {
    md.get(key).with_context(|| format!("GGUF metadata lacks `{key}`"))
}

fn get_str<'a>(md: &'a Metadata, key: &str) -> Result<&'a str> {
    match get(md, key)? {
        Value::String(s) => Ok(s),
        other => bail!("GGUF metadata `{key}` should be a string, found {}", type_name(other)),
    }
}

fn get_array<'a>(md: &'a Metadata, key: &str, what: &str) -> Result<&'a [Value]> {
    match get(md, key)? {
        Value::Array(a) => Ok(a),
        other => bail!("GGUF metadata `{key}` should be an array of {what}, found {}", type_name(other)),
    }
}

fn str_array<'a>(md: &'a Metadata, key: &str) -> Result<Vec<&'a str>> {
    get_array(md, key, "strings")?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => bail!("GGUF metadata `{key}`[{i}] should be a string, found {}", type_name(other)),
        })
        .collect()
}

fn int_array(md: &Metadata, key: &str) -> Result<Vec<i64>> {
    get_array(md, key, "integers")?
        .iter()
        .enumerate()
        .map(|(i, v)| as_i64(v).with_context(|| format!("GGUF metadata `{key}`[{i}] should be an integer, found {}", type_name(v))))
        .collect()
}

fn f32_array(md: &Metadata, key: &str) -> Result<Vec<f32>> {
    get_array(md, key, "numbers")?
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            ref other => bail!("GGUF metadata `{key}`[{i}] should be a float, found {}", type_name(other)),
        })
        .collect()
}

fn opt_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!("GGUF metadata `{key}` should be a bool, found {}", type_name(other)),
    }
}

/// Number of tokens, if the vocabulary is present and well-formed (for range checks).
fn vocab_len(md: &Metadata) -> Option<usize> {
    match md.get(KEY_TOKENS) {
        Some(Value::Array(a)) => Some(a.len()),
        _ => None,
    }
}

fn read_token_id(md: &Metadata, key: &str, n_tokens: Option<usize>) -> Result<Option<u32>> {
    let Some(v) = md.get(key) else { return Ok(None) };
    let raw = as_i64(v).with_context(|| format!("GGUF metadata `{key}` should be an integer token id, found {}", type_name(v)))?;
    let id = u32::try_from(raw).map_err(|_| anyhow!("GGUF metadata `{key}` = {raw} is not a valid token id"))?;
    if let Some(n) = n_tokens {
        ensure!((id as usize) < n, "GGUF metadata `{key}` = {id} is outside the vocabulary ({n} tokens in `{KEY_TOKENS}`)");
    }
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_like_llama_cpp() {
        assert_eq!(split_merge("Ġ t").unwrap(), ("Ġ".into(), "t".into()));
        // A left part that is a space: split at the first space after it.
        assert_eq!(split_merge("  x").unwrap(), (" ".into(), "x".into()));
        assert!(split_merge("abc").is_err());
        assert!(split_merge("").is_err());
    }

    #[test]
    fn spm_merges_rank_by_merged_score_then_lengths() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc", "<0x41>"];
        let types = [TokenType::Normal; 6].into_iter().chain([TokenType::Byte]).collect::<Vec<_>>();
        // "bc" outranks "ab"; "abc" last, its two splits ordered by left length (longer first).
        let scores = [0.0, 0.0, 0.0, -5.0, -1.0, -9.0, 0.0];
        let merges = spm_merges(&tokens, &types, &scores);
        let want: Vec<(String, String)> = [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")].iter().map(|(l, r)| (l.to_string(), r.to_string())).collect();
        assert_eq!(merges, want);
    }
}
