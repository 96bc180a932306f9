//! GGUF files: config and tokenizer from the metadata, tensors in their own GGML types.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::LoadedModel;
use crate::llm::chat::ChatTemplate;
use crate::llm::model::Model;
use crate::llm::model_config::ModelConfig;
use crate::llm::settings::TemplateChoice;
use crate::llm::tokenizer;

/// Metadata key holding a whole HF `tokenizer.json` (a standard GGUF key; our quantized cache of
/// HF folders uses it so their tokenizer survives exactly).
pub const HF_TOKENIZER_KEY: &str = "tokenizer.huggingface.json";

/// Read and sanity-check the header of a GGUF file: magic, metadata, and that the file is long
/// enough to hold every tensor it declares (a truncated download fails here, naming the file).
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let mut needed = content.tensor_data_offset;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count() as u64;
        let bs = info.ggml_dtype.block_size() as u64;
        ensure!(elems.is_multiple_of(bs), "{}: tensor `{name}` has {elems} elements, not a multiple of its block size {bs}", path.display());
        let end = content.tensor_data_offset + info.offset + elems / bs * info.ggml_dtype.type_size() as u64;
        needed = needed.max(end);
    }
    ensure!(len >= needed, "{} is truncated: its tensors need {needed} bytes but the file has {len} (re-download it)", path.display());
    Ok(content)
}

pub fn load(path: &Path, device: &Device, template: TemplateChoice) -> Result<LoadedModel> {
    let content = read_content(path)?;
    let md = &content.metadata;
    let cfg = ModelConfig::from_gguf(md).with_context(|| format!("model config in {}", path.display()))?;
    let tok = match md.get(HF_TOKENIZER_KEY) {
        Some(v) => {
            let json = v.to_string().context("tokenizer.huggingface.json is not a string")?;
            tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow::anyhow!("embedded tokenizer.json: {e}"))?
        }
        None => tokenizer::tokenizer_from_gguf(md).with_context(|| format!("tokenizer in {}", path.display()))?,
    };
    let specials = tokenizer::special_tokens(md);
    let vocab = tok.get_vocab_size(true);
    ensure!(vocab <= cfg.vocab_size, "{}: tokenizer has {vocab} tokens but the model only {} embeddings (mismatched files?)", path.display(), cfg.vocab_size);

    let mut reader = BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let model = Model::from_tensors(cfg, device, |name| {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = content.tensor(&mut reader, name, device).with_context(|| format!("reading tensor `{name}` from {}", path.display()))?;
        Ok(Some(t))
    })
    .with_context(|| format!("building the model from {}", path.display()))?;

    let template = ChatTemplate::choose(template, &tok)?;
    let mut stop_ids: Vec<u32> = specials.eos.into_iter().collect();
    if let Some(id) = template.end_of_turn_id(&tok) {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    ensure!(!stop_ids.is_empty(), "{}: no end-of-sequence token in the metadata (tokenizer.ggml.eos_token_id)", path.display());
    Ok(LoadedModel { model, tokenizer: tok, template, stop_ids, bos_id: specials.bos, name: String::new(), source: String::new() })
}
