//! `train` and `eval` as a user runs them, on the tiny random model written as a Hugging Face
//! folder: a run killed mid-way (abort, no cleanup) and resumed ends with the adapter of an
//! uninterrupted run; `eval` writes its side-by-side report.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;

fn bin(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freeski-bot"));
    c.current_dir(root)
        .env("FREESKI_LOG", "warn")
        .env("FREESKI__ADAPTER__DIR", root.join("adapters"))
        .env("FREESKI__MODEL__QUANTIZED_CACHE_DIR", root.join("cache"))
        .env("FREESKI__TRAIN__MAX_LEN", "64")
        .env("FREESKI__TRAIN__BATCH_SIZE", "2")
        .env("FREESKI__TRAIN__GRAD_ACCUM", "2")
        .env("FREESKI__TRAIN__CHECKPOINT_EVERY", "2")
        .env("FREESKI__TRAIN__EVAL_EVERY", "3")
        .env("FREESKI__TRAIN__LEARNING_RATE", "0.01")
        .env("FREESKI__TRAIN__DROPOUT", "0.1")
        .env("FREESKI__TRAIN__USE_SYSTEM_PROMPT", "false")
        .env("FREESKI__GENERATION__MAX_NEW_TOKENS", "8");
    c
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "status {:?}, stderr: {stderr}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn setup() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    common::tiny::TinyWeights::random(common::tiny::TinySpec::standard(), 3).write_hf_folder(&root.path().join("model"));
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (f, n) in [("train.jsonl", 20), ("test.jsonl", 4)] {
        let text = std::fs::read_to_string(common::fixture(&format!("freeski_chat/{f}"))).unwrap();
        std::fs::write(data.join(f), text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    }
    root
}

fn train_args<'a>(root: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--data", "data", "--model", "model", "--device", "cpu", "--max-steps", "6"].iter().map(|s| s.to_string()).collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    let _ = root;
    v
}

fn adapter(root: &Path, id: &str) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(root.join("adapters").join(id).join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_result() {
    let tmp = setup();
    let root = tmp.path();
    // Dies right after step 3, like a kill: the checkpoint of step 2 is what survives.
    let out = bin(root).args(train_args(root, &["--id", "killed"])).env("FREESKI_TRAIN_ABORT_AFTER_STEP", "3").output().unwrap();
    assert!(!out.status.success(), "the run should have died");
    assert!(root.join("adapters/killed/checkpoint.safetensors").is_file());
    assert!(!root.join("adapters/killed/adapter_model.safetensors").exists());
    let resumed = ok(bin(root).args(train_args(root, &["--resume", "killed"])).output().unwrap());
    assert!(resumed.contains("adapter killed saved"), "{resumed}");
    ok(bin(root).args(train_args(root, &["--id", "straight"])).output().unwrap());
    let (a, b) = (adapter(root, "killed"), adapter(root, "straight"));
    assert_eq!(a.len(), 3 * 7 * 2);
    for (k, va) in &a {
        let diff = freeski_bot::util::compare::max_abs_diff(va, &b[k]);
        assert!(diff < 1e-5, "{k}: resumed and uninterrupted differ by {diff}");
    }
    assert!(!root.join("adapters/killed/checkpoint.safetensors").exists(), "checkpoint removed after success");
    for f in ["metrics.json", "loss.png", "adapter_config.json"] {
        assert!(root.join("adapters/killed").join(f).is_file(), "{f} missing");
    }

    // Nothing to resume / wrong dataset.
    let out = bin(root).args(train_args(root, &["--resume", "nope"])).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to resume"));

    // eval: base against adapter on the held-out split, report written.
    let out = ok(bin(root).args(["eval", "--adapter", "straight", "--data", "data", "--model", "model", "--device", "cpu", "--questions", "1"]).output().unwrap());
    assert!(out.contains("base") && out.contains("adapter straight"), "{out}");
    let report = std::fs::read_to_string(root.join("adapters/straight/eval.md")).unwrap();
    assert!(report.contains("| base |") && report.contains("| adapter |"), "{report}");
    assert!(report.contains("ORIGINAL (base)") && report.contains("FINETUNED (adapter)"), "{report}");
    assert_eq!(
        report
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| question") && !l.starts_with("| model") && !l.starts_with("| base") && !l.starts_with("| adapter"))
            .count(),
        1,
        "{report}"
    );

    // model.max_context = 0 is the model's own limit, for eval as for answering.
    let out = ok(bin(root)
        .env("FREESKI__MODEL__MAX_CONTEXT", "0")
        .args(["eval", "--adapter", "straight", "--data", "data", "--model", "model", "--device", "cpu", "--questions", "1"])
        .output()
        .unwrap());
    assert!(out.contains("adapter straight"), "{out}");
    assert_eq!(std::fs::read_to_string(root.join("adapters/straight/eval.md")).unwrap(), report, "same greedy answers with the model's own limit");
}
