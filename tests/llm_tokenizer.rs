//! `tokenizer_from_gguf` against the original Hugging Face tokenizers: the real SmolLM2 GGUF
//! ("gpt2" byte-level BPE) and Mistral's vocabulary laid out the way llama.cpp writes a "llama"
//! (SentencePiece) GGUF. Both must give the same ids and the same decoded text as the reference
//! tokenizer.json on well over 1,000 varied strings.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file::{Content, Value};
use freeski_bot::llm::tokenizer::{special_tokens, tokenizer_from_gguf, try_special_tokens, SpecialTokens};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

type Metadata = HashMap<String, Value>;

fn reference(name: &str) -> Tokenizer {
    let path = common::fixture(&format!("tokenizers/{name}"));
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn smollm2_metadata() -> Metadata {
    let path = common::smollm2_gguf();
    let mut reader = BufReader::new(File::open(&path).expect("open SmolLM2 GGUF"));
    Content::read(&mut reader).expect("read GGUF header").metadata
}

// ---------------------------------------------------------------------------------------------
// Test strings: deterministic, varied, >= 1,000 of them.

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "switch", "900", "butter", "rodeo", "cork", "double", "park", "lap", "pow", "day", "sendy", "steezy", "kicker",
    "rail", "box", "knuckle", "backcountry", "couloir", "avalanche", "beacon", "skins", "twin-tip", "mogul", "groomer",
    "après-ski", "Whistler", "Mammoth", "Tignes", "Val d'Isère", "Åre", "I", "can't", "we'll", "they're", "you've",
    "it's", "The", "the", "and", "How", "do", "land", "a", "spin", "on", "off", "with", "grab", "mute", "safety",
    "Japan", "tail", "blunt", "nose", "press", "BIG", "AIR", "LOL", "ok", "don't", "SKI", "Ski", "skiing", "freeride",
    "halfpipe", "slopestyle", "FIS", "X-Games", "bro", "huck", "yard-sale", "gaper", "jib", "shifty", "misty", "flatspin",
];
#[rustfmt::skip]
const NUMBERS: &[&str] = &[
    "1080", "2023-01-10", "3.14159", "1,000,000", "0x1F", "12:30pm", "-17°C", "42", "007", "99.9%", "$129.99",
    "1e-5", "v2.0.1", "+33 6 12 34 56 78", "360", "540", "720", "1440", "1st", "2nd", "10k", "½", "²", "٣", "१२",
];
const CODE: &[&str] = &[
    "fn main() { println!(\"{}\", x); }",
    "for i in range(10):\n    print(i)",
    "<div class=\"park\">",
    "{\"trick\": \"cork 7\", \"score\": 9.5}",
    "let x = a[i] + b->c;",
    "#include <stdio.h>",
    "SELECT * FROM runs WHERE grade='black';",
    "if (a && b || !c) { return -1; }",
    "x += 1  # comment",
    "https://example.com/ski?x=1&y=2",
    "user@mail.com",
    "C:\\Users\\ski\\file.txt",
    "```rust\nlet v: Vec<u8> = vec![];\n```",
    "\tindent\t\ttabs",
];
#[rustfmt::skip]
const EMOJI: &[&str] = &["🎿", "⛷️", "🏔️", "😀", "👍🏽", "👨‍👩‍👧", "❄️", "🔥🔥🔥", "🤙", "🇨🇭", "✨", "🏂🏻"];
const SCRIPTS: &[&str] =
    &["日本のスキー場は最高です", "滑雪很好玩", "스키 타는 거 좋아해요", "Ски и сноуборд", "Καλή χιονοδρομία", "स्कीइंग", "تزلج على الجليد", "שלג טרי", "ไปเล่นสกี"];
#[rustfmt::skip]
const ACCENTED: &[&str] = &[
    "crème brûlée", "São Paulo", "naïve façade", "Señor Ñandú", "Ærøskøbing", "İstanbul", "straße", "e\u{301}te",
    "Ångström", "Kitzbühel", "Chamonix-Mont-Blanc", "Zürich",
];
#[rustfmt::skip]
const SPACES: &[&str] = &[" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u{a0}", "\u{3000}", "    ", "\n\n\n  "];
#[rustfmt::skip]
const SEPARATORS: &[&str] = &[" ", " ", " ", "", "\n", "  ", ", ", ". ", "\t", "? ", "! "];

fn pick<'a>(rng: &mut ChaCha8Rng, pool: &[&'a str]) -> &'a str {
    pool[rng.random_range(0..pool.len())]
}

/// A random string of code points from many blocks (controls, combining marks, private use and
/// astral planes included).
fn random_unicode(rng: &mut ChaCha8Rng) -> String {
    const RANGES: &[(u32, u32)] = &[
        (0x20, 0x7e),
        (0x20, 0x7e),
        (0x20, 0x7e),
        (0x00, 0x1f),
        (0xa0, 0xff),
        (0x100, 0x17f),
        (0x300, 0x36f),
        (0x370, 0x3ff),
        (0x400, 0x4ff),
        (0x600, 0x6ff),
        (0x900, 0x97f),
        (0x2000, 0x2bff),
        (0x3040, 0x309f),
        (0x4e00, 0x9fff),
        (0xac00, 0xd7a3),
        (0xe000, 0xf8ff),
        (0x1f300, 0x1faff),
        (0x10000, 0x10ffff),
    ];
    let len = rng.random_range(1..30);
    let mut s = String::new();
    while s.chars().count() < len {
        let (lo, hi) = RANGES[rng.random_range(0..RANGES.len())];
        if let Some(c) = char::from_u32(rng.random_range(lo..=hi)) {
            s.push(c);
        }
    }
    s
}

/// Fixed strings, random mixes of the pools above (with the model's special tokens inline) and
/// random unicode.
fn test_strings(specials: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = [WORDS, NUMBERS, CODE, EMOJI, SCRIPTS, ACCENTED, SPACES, specials].iter().flat_map(|pool| pool.iter().map(|s| s.to_string())).collect();
    out.extend(
        [
            "How do I land a switch 900?",
            "  leading spaces",
            "trailing spaces   ",
            "a  b   c    d",
            "line one\nline two\n\nline four",
            "",
            "Hello, we can use",
            "Hello world! 123",
            "I'm sure it's fine, isn't it? You'll see; they'd know.",
            "double cork 1080 tail grab on 2023-01-10 at Mammoth 🎿",
        ]
        .map(String::from),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_f4ee);
    let pools: [&[&str]; 8] = [WORDS, WORDS, WORDS, NUMBERS, CODE, EMOJI, SCRIPTS, ACCENTED];
    for _ in 0..800 {
        let n = rng.random_range(1..12);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push_str(pick(&mut rng, SEPARATORS));
            }
            let roll = rng.random_range(0..20);
            if roll == 0 && !specials.is_empty() {
                s.push_str(pick(&mut rng, specials));
            } else if roll == 1 {
                s.push_str(pick(&mut rng, SPACES));
            } else {
                let pool = pools[rng.random_range(0..pools.len())];
                s.push_str(pick(&mut rng, pool));
            }
        }
        out.push(s);
    }
    for _ in 0..400 {
        out.push(random_unicode(&mut rng));
    }
    out
}

/// Encodes and decodes every string with both tokenizers; panics listing the first mismatches.
/// `bos`: the id the reference's post-processor puts in front (ours adds none).
fn assert_same_as_reference(ours: &Tokenizer, reference: &Tokenizer, strings: &[String], bos: Option<u32>) {
    assert!(strings.len() >= 1000, "only {} test strings", strings.len());
    let mut failures = Vec::new();
    let mut total_ids = 0;
    for s in strings {
        let want = reference.encode(s.as_str(), false).expect("reference encode").get_ids().to_vec();
        let got = ours.encode(s.as_str(), false).expect("encode").get_ids().to_vec();
        total_ids += got.len();
        if got != want {
            failures.push(format!("{s:?}: ids {got:?}, reference {want:?}"));
            continue;
        }
        // The reference with its post-processor adds exactly the BOS the caller must add with ours.
        let want_special = reference.encode(s.as_str(), true).expect("reference encode").get_ids().to_vec();
        let got_special: Vec<u32> = bos.into_iter().chain(got.iter().copied()).collect();
        if got_special != want_special {
            failures.push(format!("{s:?}: with BOS {got_special:?}, reference {want_special:?}"));
        }
        for skip in [false, true] {
            let want = reference.decode(&got_special, skip).expect("reference decode");
            let text = ours.decode(&got_special, skip).expect("decode");
            if text != want {
                failures.push(format!("{s:?}: decode(skip_special={skip}) {text:?}, reference {want:?}"));
            }
        }
    }
    assert!(total_ids > 10_000, "suspiciously few ids: {total_ids}");
    assert!(failures.is_empty(), "{} of {} strings differ, e.g.:\n{}", failures.len(), strings.len(), failures[..failures.len().min(8)].join("\n"));
}

fn ids(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s, false).expect("encode").get_ids().to_vec()
}

fn merges_of(tok: &Tokenizer) -> Vec<(String, String)> {
    let json: serde_json::Value = serde_json::from_str(&tok.to_string(false).expect("serialize")).expect("json");
    let merges = json["model"]["merges"].as_array().expect("model.merges").clone();
    merges
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(pair) => (pair[0].as_str().unwrap().to_owned(), pair[1].as_str().unwrap().to_owned()),
            serde_json::Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_owned(), b.to_owned())
            }
            other => panic!("unexpected merge {other}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SmolLM2: real GGUF, "gpt2" vocabulary with the "smollm" pre-tokenizer.

#[test]
fn smollm2_gguf_matches_reference_tokenizer() {
    let md = smollm2_metadata();
    let ours = tokenizer_from_gguf(&md).expect("tokenizer from GGUF");
    let reference = reference("smollm2-135m.reference-tokenizer.json");

    assert_eq!(ours.get_vocab(true), reference.get_vocab(true), "vocabularies differ");
    assert_eq!(merges_of(&ours), merges_of(&reference), "merges differ");

    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<jupyter_code>", "<|im_start|>user\nhi<|im_end|>"];
    let strings = test_strings(&specials);
    assert_same_as_reference(&ours, &reference, &strings, None);
}

#[test]
fn smollm2_known_answers() {
    let md = smollm2_metadata();
    let tok = tokenizer_from_gguf(&md).expect("tokenizer from GGUF");
    // Digits are split one by one ('0' = 32 ... '9' = 41).
    assert_eq!(ids(&tok, "1080"), [33, 32, 40, 32]);
    assert_eq!(ids(&tok, "Hello, we can use"), [19556, 28, 392, 416, 722]);
    assert_eq!(ids(&tok, "Hello world! 123"), [19556, 905, 17, 216, 33, 34, 35]);
    // Chat markers are single special ids, dropped by decode(skip_special_tokens = true).
    let chat = ids(&tok, "<|im_start|>user\nhi<|im_end|>\n");
    assert_eq!(chat[0], 1);
    assert_eq!(chat[chat.len() - 2..], [2, 198]);
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nhi\n");
    assert_eq!(tok.decode(&chat, false).unwrap(), "<|im_start|>user\nhi<|im_end|>\n");

    let sp = special_tokens(&md);
    assert_eq!(sp, SpecialTokens { bos: Some(1), eos: Some(2), pad: Some(2), unk: Some(0), add_bos: Some(false), add_eos: None });
    assert_eq!(try_special_tokens(&md).unwrap(), sp);
}

// ---------------------------------------------------------------------------------------------
// Mistral: "llama" (SentencePiece) vocabulary, metadata built as llama.cpp's converter writes it.

#[test]
fn mistral_llama_vocab_matches_reference_tokenizer() {
    let md = common::mistral_gguf_metadata();
    let ours = tokenizer_from_gguf(&md).expect("tokenizer from metadata");
    let reference = reference("mistral-7b-v0.1.tokenizer.json");

    assert_eq!(ours.get_vocab(true), reference.get_vocab(true), "vocabularies differ");
    // The merges derived from scores are exactly HF's converter output, order included.
    assert_eq!(merges_of(&ours), merges_of(&reference), "derived merges differ");

    let specials = ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>\n", "[INST] How do I land a switch 900? [/INST]"];
    let mut strings = test_strings(&specials);
    strings.extend(
        [
            "[INST] How do I land a switch 900? [/INST]",
            "<s>[INST] How do I land a switch 900? [/INST]",
            "<s>[INST] What wax for -10°C? [/INST] Use a cold wax.</s>[INST] And 0°C? [/INST]",
            "[INST] <<SYS>>\nYou are a ski coach.\n<</SYS>>\n\nHow do I butter? [/INST]",
        ]
        .map(String::from),
    );
    assert_same_as_reference(&ours, &reference, &strings, Some(1));
}

#[test]
fn mistral_known_answers() {
    let md = common::mistral_gguf_metadata();
    let tok = tokenizer_from_gguf(&md).expect("tokenizer from metadata");
    let sp = special_tokens(&md);
    let bos = sp.bos.expect("bos");
    assert_eq!(sp.add_bos, Some(true));

    let with_bos: Vec<u32> = [bos].into_iter().chain(ids(&tok, "How do I land a switch 900?")).collect();
    assert_eq!(with_bos, [1, 1602, 511, 315, 2533, 264, 4933, 28705, 28774, 28734, 28734, 28804]);
    assert_eq!(tok.decode(&with_bos, true).unwrap(), "How do I land a switch 900?");

    // "[INST]" is plain text for Mistral v0.1; "</s>" is one special id.
    let inst = ids(&tok, "[INST] How do I land a switch 900? [/INST]");
    assert_eq!(&inst[..4], &[733, 16289, 28793, 1602]);
    let turn = ids(&tok, "ok</s>");
    assert_eq!(turn.last(), Some(&2));

    // Characters outside the vocabulary fall back to byte tokens and decode back whole.
    let emoji = ids(&tok, "🎿");
    assert!(emoji.iter().filter(|&&id| (3..259).contains(&id)).count() == 4, "{emoji:?}");
    assert_eq!(tok.decode(&emoji, true).unwrap(), "🎿");
}

#[test]
fn llama_vocab_without_space_prefix() {
    let mut md = common::mistral_gguf_metadata();
    md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    let tok = tokenizer_from_gguf(&md).expect("tokenizer");
    let enc = tok.encode("Hello world", false).unwrap();
    assert_eq!(enc.get_tokens(), ["Hello", "▁world"]);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "Hello world");
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers without a reference file here: check the word splits they produce.

fn tiny_gpt2(pre: &str) -> Metadata {
    let tokens = ["<|end|>", "h", "i", "hi", "Ġ", "Ġhi"];
    let mut md = Metadata::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
    md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.to_string())).collect()));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array([3, 1, 1, 1, 1, 1].iter().map(|&t| Value::I32(t)).collect()));
    md.insert("tokenizer.ggml.merges".into(), Value::Array(["h i", "Ġ hi"].iter().map(|m| Value::String(m.to_string())).collect()));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    md
}

fn pre_splits(tok: &Tokenizer, s: &str) -> Vec<String> {
    let mut pts = PreTokenizedString::from(s);
    tok.get_pre_tokenizer().expect("pre-tokenizer").pre_tokenize(&mut pts).expect("pre-tokenize");
    pts.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_owned()).collect()
}

#[test]
fn pre_tokenizers_split_like_their_models() {
    let text = "Hi 12345 world's\n\n";
    let cases: [(&str, &[&str]); 5] = [
        ("smollm", &["Hi", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "'s", "ĊĊ"]),
        ("gpt-2", &["Hi", "Ġ12345", "Ġworld", "'s", "ĊĊ"]),
        ("llama-bpe", &["Hi", "Ġ", "123", "45", "Ġworld", "'s", "ĊĊ"]),
        ("qwen2", &["Hi", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "'s", "ĊĊ"]),
        // llama.cpp's "default" also isolates punctuation runs and groups of three digits.
        ("default", &["Hi", "Ġ", "123", "45", "Ġworld", "'", "s", "ĊĊ"]),
    ];
    for (pre, want) in cases {
        let tok = tokenizer_from_gguf(&tiny_gpt2(pre)).unwrap_or_else(|e| panic!("{pre}: {e:#}"));
        assert_eq!(pre_splits(&tok, text), want, "pre-tokenizer {pre:?}");
        assert_eq!(ids(&tok, "hi hi<|end|>"), [3, 5, 0], "pre-tokenizer {pre:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed metadata: errors name the key.

#[test]
fn malformed_metadata_errors_name_the_key() {
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    type Edit = Box<dyn Fn(&mut Metadata)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        ("missing tokens", Box::new(|md| drop(md.remove("tokenizer.ggml.tokens"))), &["tokenizer.ggml.tokens", "lacks"]),
        ("missing model", Box::new(|md| drop(md.remove("tokenizer.ggml.model"))), &["tokenizer.ggml.model"]),
        ("unknown model kind", Box::new(|md| drop(md.insert("tokenizer.ggml.model".into(), Value::String("wordpiece".into())))), &["tokenizer.ggml.model", "\"wordpiece\""]),
        ("model not a string", Box::new(|md| drop(md.insert("tokenizer.ggml.model".into(), Value::U32(2)))), &["tokenizer.ggml.model", "u32"]),
        ("unknown pre-tokenizer", Box::new(|md| drop(md.insert("tokenizer.ggml.pre".into(), Value::String("no-such-pre".into())))), &["tokenizer.ggml.pre", "\"no-such-pre\""]),
        ("merges not an array", Box::new(|md| drop(md.insert("tokenizer.ggml.merges".into(), Value::U32(7)))), &["tokenizer.ggml.merges", "u32"]),
        ("merges of integers", Box::new(|md| drop(md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::U32(1)])))), &["tokenizer.ggml.merges`[0]", "u32"]),
        ("merge without a space", Box::new(move |md| drop(md.insert("tokenizer.ggml.merges".into(), strs(&["hi"])))), &["tokenizer.ggml.merges`[0]"]),
        ("merge of unknown tokens", Box::new(move |md| drop(md.insert("tokenizer.ggml.merges".into(), strs(&["h x"])))), &["tokenizer.ggml.merges"]),
        ("missing merges", Box::new(|md| drop(md.remove("tokenizer.ggml.merges"))), &["tokenizer.ggml.merges"]),
        ("missing token types", Box::new(|md| drop(md.remove("tokenizer.ggml.token_type"))), &["tokenizer.ggml.token_type"]),
        (
            "token types too short",
            Box::new(|md| drop(md.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(1); 3])))),
            &["tokenizer.ggml.token_type", "3 entries", "tokenizer.ggml.tokens"],
        ),
        ("bad token type", Box::new(|md| drop(md.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(9); 6])))), &["tokenizer.ggml.token_type`[0]"]),
        ("token not a string", Box::new(|md| drop(md.insert("tokenizer.ggml.tokens".into(), Value::Array(vec![Value::F32(1.0); 6])))), &["tokenizer.ggml.tokens`[0]", "f32"]),
        ("empty vocabulary", Box::new(move |md| drop(md.insert("tokenizer.ggml.tokens".into(), strs(&[])))), &["tokenizer.ggml.tokens", "empty"]),
        ("bos out of range", Box::new(|md| drop(md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(60)))), &["tokenizer.ggml.bos_token_id", "60"]),
        ("eos not an integer", Box::new(|md| drop(md.insert("tokenizer.ggml.eos_token_id".into(), Value::String("2".into())))), &["tokenizer.ggml.eos_token_id", "string"]),
        ("negative pad", Box::new(|md| drop(md.insert("tokenizer.ggml.padding_token_id".into(), Value::I32(-1)))), &["tokenizer.ggml.padding_token_id", "-1"]),
        ("llama without scores", Box::new(|md| drop(md.insert("tokenizer.ggml.model".into(), Value::String("llama".into())))), &["tokenizer.ggml.scores", "lacks"]),
        (
            "llama with short scores",
            Box::new(|md| {
                md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
                md.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0); 2]));
            }),
            &["tokenizer.ggml.scores", "2 entries"],
        ),
        (
            "add_space_prefix not a bool",
            Box::new(|md| {
                md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
                md.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0); 6]));
                md.insert("tokenizer.ggml.add_space_prefix".into(), Value::U8(1));
            }),
            &["tokenizer.ggml.add_space_prefix", "u8"],
        ),
    ];
    // The unedited metadata builds, so each failure below comes from its edit.
    tokenizer_from_gguf(&tiny_gpt2("gpt-2")).expect("baseline metadata builds");
    for (what, edit, needles) in cases {
        let mut md = tiny_gpt2("gpt-2");
        edit(&mut md);
        let err = match tokenizer_from_gguf(&md) {
            Ok(_) => panic!("{what}: built a tokenizer from bad metadata"),
            Err(e) => format!("{e:#}"),
        };
        for needle in needles {
            assert!(err.contains(needle), "{what}: error {err:?} does not mention {needle:?}");
        }
    }
}

#[test]
fn special_tokens_is_lenient_try_special_tokens_is_strict() {
    let mut md = tiny_gpt2("gpt-2");
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(60));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
    let sp = special_tokens(&md);
    assert_eq!(sp.bos, None);
    assert_eq!(sp.eos, Some(0));
    assert_eq!(sp.add_bos, Some(true));
    let err = format!("{:#}", try_special_tokens(&md).unwrap_err());
    assert!(err.contains("tokenizer.ggml.bos_token_id"), "{err}");
}
