//! The `ask` and `chat` commands as a user runs them: the real binary, the real SmolLM2 model.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freeski-bot"));
    // Run from an empty folder so no config/local.toml of the developer's leaks in.
    c.current_dir(std::env::temp_dir()).env("FREESKI_LOG", "warn");
    c
}

#[test]
fn ask_streams_an_answer() {
    let model = common::smollm2_gguf();
    let out = bin()
        .args(["ask", "--model", model.to_str().unwrap(), "--temperature", "0", "--max-new-tokens", "30", "What is the capital of France?"])
        .env("FREESKI__GENERATION__SYSTEM_PROMPT", "You are a helpful assistant.")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn chat_keeps_context_and_resets() {
    let model = common::smollm2_gguf();
    let mut child = bin()
        .args(["chat", "--model", model.to_str().unwrap(), "--temperature", "0", "--max-new-tokens", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\n/reset\nhi\n/quit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Paris"), "{stdout}");
    assert_eq!(stdout.matches("> ").count(), 4, "one prompt per input line: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("conversation cleared"));
}

#[test]
fn bad_settings_and_missing_model_fail_clearly() {
    let out = bin().args(["ask", "hi"]).env("FREESKI__GENERATION__TOP_P", "2").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("generation.top_p"), "{err}");

    let out = bin().args(["ask", "--model", "/no/such/model.gguf", "hi"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model.gguf") && err.contains("config/local.toml"), "{err}");

    let out = bin().args(["ask", "--model", common::smollm2_gguf().to_str().unwrap(), "--adapter", "nope", "hi"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adapter `nope` not found"), "{err}");
}
