//! `StreamDecoder` on the real tokenizers: Mistral (SentencePiece, byte fallback, leading-space
//! strip) and SmolLM2 (byte-level BPE, built from the real GGUF). The streamed pieces must never
//! contain a half character, and together must equal `decode(all_ids, skip_special_tokens = true)`.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file::Content;
use freeski_bot::llm::detok::StreamDecoder;
use freeski_bot::llm::tokenizer::tokenizer_from_gguf;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

fn mistral() -> Tokenizer {
    let path = common::fixture("tokenizers/mistral-7b-v0.1.tokenizer.json");
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn smollm2() -> Tokenizer {
    let path = common::smollm2_gguf();
    let mut reader = BufReader::new(File::open(&path).expect("open SmolLM2 GGUF"));
    let md = Content::read(&mut reader).expect("read GGUF header").metadata;
    tokenizer_from_gguf(&md).expect("tokenizer from GGUF")
}

fn encode(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s, false).expect("encode").get_ids().to_vec()
}

/// Every chunk the decoder returns (`None` as `None`), the last entry being `finish()`.
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<Option<String>> {
    let mut dec = StreamDecoder::new(tok);
    let mut out: Vec<Option<String>> = ids.iter().map(|&id| dec.push(id).expect("push")).collect();
    out.push(dec.finish().expect("finish"));
    out
}

/// Streams `ids` and checks the chunks: no U+FFFD unless the full decode has one, and their
/// concatenation equals the full decode.
fn check_stream(tok: &Tokenizer, ids: &[u32]) -> Result<(), String> {
    let chunks = stream(tok, ids);
    let want = tok.decode(ids, true).expect("decode");
    let got: String = chunks.iter().flatten().map(String::as_str).collect();
    if got != want {
        return Err(format!("ids {ids:?}: streamed {got:?}, decode gives {want:?}"));
    }
    if !want.contains('\u{FFFD}') && chunks.iter().flatten().any(|c| c.contains('\u{FFFD}')) {
        return Err(format!("ids {ids:?}: a chunk holds a partial character: {chunks:?}"));
    }
    if chunks.iter().flatten().any(String::is_empty) {
        return Err(format!("ids {ids:?}: empty chunk returned as Some: {chunks:?}"));
    }
    Ok(())
}

const TEXT: &str = "How do I land a switch 900? Start with switch 360s on a medium kicker, \
    keep your shoulders square and spot the landing early 👀. Then progress: 540 → 720 → 900.\n\n\
    Tips:\n  - Pop off the lip, don't throw the spin 🎿⛷️🏔️\n  - Grab (mute, safety, japan) to stabilise\n\n\
    Après-ski at Val d'Isère, Zürich or 日本のニセコ: 🍺😀👍🏽 — « très bien » — Señor Ñandú.\n\
    ```python\nfor trick in ['rodeo 540', 'cork 7', 'double cork 1080']:\n    print(trick)\n```\n\
    2023-01-10: 45 cm of fresh pow!!! 🔥🔥🔥   spaces   and\ttabs\r\nEnd. 👨‍👩‍👧 🇨🇭 ✨";

#[test]
fn mistral_emoji_over_byte_fallback_tokens() {
    let tok = mistral();
    let ids = encode(&tok, "Nice 🎿!");
    let bytes: Vec<usize> = (0..ids.len()).filter(|&i| (3..259).contains(&ids[i])).collect();
    assert_eq!(bytes.len(), 4, "expected 🎿 as four byte tokens: {ids:?}");
    let chunks = stream(&tok, &ids);
    // A run of byte tokens is decoded as a whole, so the emoji comes out with the token after it.
    for &i in &bytes {
        assert_eq!(chunks[i], None, "chunk {i} of {chunks:?}");
    }
    assert_eq!(chunks[bytes[3] + 1].as_deref(), Some("🎿!"), "{chunks:?}");
    check_stream(&tok, &ids).unwrap();

    // At the end of the stream, finish() brings it out.
    let ids = encode(&tok, "Nice 🎿");
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.last().unwrap().as_deref(), Some("🎿"), "{chunks:?}");
    check_stream(&tok, &ids).unwrap();
}

#[test]
fn smollm2_emoji_over_byte_level_pieces() {
    let tok = smollm2();
    for s in ["😀", "I 🎿 a lot", "👨‍👩‍👧", "🇨🇭🔥", "日本のニセコ"] {
        let ids = encode(&tok, s);
        let chunks = stream(&tok, &ids);
        assert!(chunks.iter().flatten().all(|c| !c.contains('\u{FFFD}')), "{s:?}: {chunks:?}");
        check_stream(&tok, &ids).unwrap();
    }
    // A lone emoji spans several byte-level pieces, and only the last one yields text.
    let ids = encode(&tok, "😀");
    assert!(ids.len() > 1, "{ids:?}");
    let chunks = stream(&tok, &ids);
    assert!(chunks[..ids.len() - 1].iter().all(Option::is_none), "{chunks:?}");
    assert_eq!(chunks[ids.len() - 1].as_deref(), Some("😀"));
}

#[test]
fn mistral_leading_space_is_stripped_once() {
    let tok = mistral();
    let ids = encode(&tok, "Hello world");
    assert_eq!(stream(&tok, &ids), [Some("Hello".into()), Some(" world".into()), None]);

    // Leading spaces beyond the one SentencePiece adds survive, and BOS in front changes nothing.
    for s in [" Hello", "  indented", "\n newline", "a  b", " ", "   "] {
        let mut ids = vec![1];
        ids.extend(encode(&tok, s));
        check_stream(&tok, &ids).unwrap();
        let got: String = stream(&tok, &ids).into_iter().flatten().collect();
        assert_eq!(got, tok.decode(&ids, true).unwrap(), "{s:?}");
    }

    // A special token between words is skipped without losing the space after it.
    let mut ids = encode(&tok, "Hi");
    ids.push(2);
    ids.extend(encode(&tok, "there"));
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hi there");
    check_stream(&tok, &ids).unwrap();
}

#[test]
fn special_tokens_can_be_kept() {
    let tok = mistral();
    let mut ids = vec![1];
    ids.extend(encode(&tok, "Hi"));
    ids.push(2);
    let mut dec = StreamDecoder::with_skip_special_tokens(&tok, false);
    let mut got = String::new();
    for &id in &ids {
        got.extend(dec.push(id).unwrap());
    }
    got.extend(dec.finish().unwrap());
    assert_eq!(got, tok.decode(&ids, false).unwrap());
    assert_eq!(got, "<s> Hi</s>");
}

#[test]
fn unknown_id_is_an_error() {
    let tok = mistral();
    let mut dec = StreamDecoder::new(&tok);
    let err = dec.push(1_000_000).unwrap_err();
    assert!(format!("{err:#}").contains("1000000"), "{err:#}");
}

#[test]
fn finish_flushes_an_unfinished_character_and_resets() {
    let tok = mistral();
    let ids = encode(&tok, "ok 🎿");
    let cut = &ids[..ids.len() - 1]; // drop the last byte token of the emoji
    let mut dec = StreamDecoder::new(&tok);
    let mut got = String::new();
    for &id in cut {
        got.extend(dec.push(id).unwrap());
    }
    assert_eq!(got, "ok ");
    got.extend(dec.finish().unwrap());
    assert_eq!(got, tok.decode(cut, true).unwrap());
    assert!(got.ends_with('\u{FFFD}'));
    // After finish the decoder starts a fresh stream (leading space stripped again).
    assert_eq!(dec.push(encode(&tok, "Hi")[0]).unwrap().as_deref(), Some("Hi"));
}

/// Random slices of encoded real text, for both tokenizers, with special tokens sprinkled in.
#[test]
fn concatenation_equals_full_decode_on_real_text() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (name, tok, specials) in [("mistral", mistral(), vec![1u32, 2]), ("smollm2", smollm2(), vec![0u32, 1, 2])] {
        let all = encode(&tok, TEXT);
        let mut failures = Vec::new();
        for _ in 0..400 {
            let start = rng.random_range(0..all.len());
            let len = rng.random_range(1..=60.min(all.len() - start));
            let mut ids = all[start..start + len].to_vec();
            if rng.random_bool(0.3) {
                let at = rng.random_range(0..=ids.len());
                ids.insert(at, specials[rng.random_range(0..specials.len())]);
            }
            if let Err(e) = check_stream(&tok, &ids) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{name}: {} failures, e.g.\n{}", failures.len(), failures[..failures.len().min(5)].join("\n"));
    }
}

/// Arbitrary id sequences, invalid UTF-8 included: byte-level decoding replaces invalid bytes
/// locally, and byte-fallback runs are only emitted once they end, so both stream exactly.
#[test]
fn concatenation_equals_full_decode_on_random_ids() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (name, tok) in [("smollm2", smollm2()), ("mistral", mistral())] {
        let n = tok.get_vocab_size(true) as u32;
        let mut failures = Vec::new();
        for _ in 0..300 {
            let len = rng.random_range(1..40);
            // Bias towards the low ids: specials and (for Mistral) byte tokens.
            let ids: Vec<u32> = (0..len).map(|_| if rng.random_bool(0.3) { rng.random_range(0..300) } else { rng.random_range(0..n) }).collect();
            if let Err(e) = check_stream(&tok, &ids) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{name}: {} failures, e.g.\n{}", failures.len(), failures[..failures.len().min(5)].join("\n"));
    }
}

/// Valid multi-byte characters that Mistral can only spell with byte tokens, in random mixes.
#[test]
fn mistral_byte_fallback_mixes() {
    let tok = mistral();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pieces = ["😀", "🎿", "🔥", "👍🏽", "a", " b", "é", "日本", "\n", "  ", "🇨🇭", "x😀y", "ニセコ"];
    for _ in 0..300 {
        let s: String = (0..rng.random_range(1..8)).map(|_| pieces[rng.random_range(0..pieces.len())]).collect();
        let ids = encode(&tok, &s);
        check_stream(&tok, &ids).unwrap();
        let got: String = stream(&tok, &ids).into_iter().flatten().collect();
        assert_eq!(got, s, "round trip of {s:?}");
    }
}
