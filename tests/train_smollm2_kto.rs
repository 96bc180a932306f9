//! Preference learning on the real model: SmolLM2-135M-Instruct trained with KTO for a few CPU
//! steps on labelled answers built from the committed freeski conversations, where each bad
//! answer is a good one gone wrong the way flagged bot answers do (looping, leaking the forum's
//! edit notes, inventing links). On held-out questions the adapter then prefers the good
//! answers more often than the base does, by a wider margin.

mod common;

use std::path::Path;

use candle_core::Device;
use freeski_bot::config::Settings;
use freeski_bot::llm::load::load_path;
use freeski_bot::train::report::Metrics;
use freeski_bot::train::{data, NoHooks, Objective, Outcome, TrainRun};
use serde_json::{json, Value};

/// Single-turn (question, answer) pairs of a fixture split with short questions, each answer cut
/// to its first 14 words (so that every answer, corrupted or not, fits `max_len` whole and the
/// steps stay cheap on a CPU).
fn pairs(split: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(common::fixture(&format!("freeski_chat/{split}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["messages"].as_array().unwrap().len() == 2)
        .map(|v| (v["messages"][0]["content"].as_str().unwrap().to_string(), v["messages"][1]["content"].as_str().unwrap().to_string()))
        .filter(|(q, _)| q.split_whitespace().count() <= 12)
        .map(|(q, a)| (q, format!("{}.", a.split_whitespace().take(14).collect::<Vec<_>>().join(" ").trim_end_matches(['.', ',']))))
        .collect()
}

/// The answer gone wrong, one of three ways by `i`.
fn corrupt(answer: &str, i: usize) -> String {
    let words: Vec<&str> = answer.split_whitespace().collect();
    match i % 3 {
        // A loop: the opening words again and again.
        0 => {
            let head = words[..words.len().min(6)].join(" ");
            format!("{head} {head} {head} {head} {head}")
        }
        // The forum's edit note leaked into the answer.
        1 => format!("{answer}\n\n**This post was edited on Feb 3rd 2017 11:42 pm**"),
        // An invented link.
        _ => format!("{answer} Full guide here: https://www.newschoolers.com/news/read/ultimate-guide-{i}-{}/", words.len() * 37),
    }
}

/// Both answers of every question, as feedback.jsonl lines.
fn write_labelled(path: &Path, pairs: &[(String, String)], offset: usize) {
    let line = |q: &str, a: &str, label: bool| json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "label": label}).to_string();
    let text: Vec<String> = pairs.iter().enumerate().flat_map(|(i, (q, a))| [line(q, a, true), line(q, &corrupt(a, i + offset), false)]).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
}

#[test]
fn smollm2_kto_prefers_the_good_answers_on_held_out_questions() {
    let lm = load_path(&common::smollm2_gguf(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("labelled");
    std::fs::create_dir_all(&data_dir).unwrap();
    // Questions to learn from (the forum's training split) and held-out ones (its test split).
    write_labelled(&data_dir.join("feedback.jsonl"), &pairs("train")[..8], 0);
    write_labelled(&data_dir.join("feedback_test.jsonl"), &pairs("test")[..6], 1);

    let mut s = Settings::load_with_env(None, std::iter::empty()).unwrap().train;
    s.objective = Objective::Auto;
    s.kto_min_examples = 8;
    s.rank = 8;
    s.alpha = 16.0;
    s.batch_size = 4;
    s.grad_accum = 2;
    s.kto_max_steps = KTO_STEPS;
    s.kto_learning_rate = KTO_LR;
    s.max_len = 80;
    s.use_system_prompt = false;
    s.checkpoint_every = 0;
    let data = data::load(&data_dir, &lm, &s, "").unwrap();
    assert_eq!((data.train.len(), data.feedback.len(), data.feedback_test.len()), (0, 16, 12));
    assert_eq!(data.feedback_report.truncated + data.feedback_test_report.truncated, 0, "every answer whole");

    let dir = tmp.path().join("kto");
    let run = TrainRun { lm: &lm, reference: None, data: &data, settings: s, run_dir: dir.clone(), id: "kto".into(), base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into() };
    let Outcome::Completed(m) = run.run(&NoHooks).unwrap() else { panic!("training did not complete") };
    assert_eq!(m.objective, "kto", "labelled answers only: KTO alone");
    let k = m.kto.as_ref().unwrap();
    let (before, after) = (k.base_preference.unwrap(), k.preference.unwrap());
    eprintln!(
        "held-out preference accuracy {:.2} → {:.2}, margin {:+.4} → {:+.4} nats/token ({} steps, loss {:.4} → {:.4})",
        before.accuracy,
        after.accuracy,
        before.margin,
        after.margin,
        k.steps,
        m.train_loss[0].loss,
        m.train_loss.last().unwrap().loss
    );
    assert_eq!((before.questions, after.questions), (6, 6));
    assert!(after.accuracy > before.accuracy, "accuracy {:.2} → {:.2}: did not rise", before.accuracy, after.accuracy);
    assert!(after.margin > before.margin + MARGIN_GAIN, "margin {:+.4} → {:+.4}: grew by less than {MARGIN_GAIN}", before.margin, after.margin);
    assert_eq!(Metrics::read(&dir).unwrap().kto.unwrap().preference, Some(after), "recorded in metrics.json");
}

/// Measured (CPU): accuracy 0.00 → 0.50 and margin −1.66 → −0.61 nats/token over the 6 held-out
/// questions after these 4 steps; the base prefers the bad answers everywhere (a loop is very
/// predictable per token).
const KTO_STEPS: usize = 4;
const KTO_LR: f64 = 4e-3;
/// Nats per token the held-out margin must grow by.
const MARGIN_GAIN: f64 = 0.3;
