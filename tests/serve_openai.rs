//! `freeski-bot serve` as a deployment uses it: the real binary on loopback with the real
//! SmolLM2 model, driven by the official `openai` Python client (tests/python/
//! serve_openai_client.py: streamed and whole completions, models, adapters loaded by API, 401,
//! 413, 429), its answers compared with `freeski-bot ask` on the same seed and adapter; then
//! shut down with SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use freeski_bot::llm::load::load_path;

/// The `openai` package version `.ci/run` installs (keep the two in step).
const OPENAI_VERSION: &str = "3.51.0";

/// Where `.ci/run` installs the `openai` package (or `$FREESKI_PY_OPENAI`). Missing = failed
/// test with instructions, never a silent skip.
fn openai_package() -> PathBuf {
    let dir = std::env::var_os("FREESKI_PY_OPENAI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(format!(".cache/freeski-pydeps/openai-{OPENAI_VERSION}")));
    assert!(
        dir.join("openai").is_dir(),
        "the openai Python package is missing at {}: run `python3 -m pip install --target {} openai=={OPENAI_VERSION}` (what .ci/run does), or set FREESKI_PY_OPENAI",
        dir.display(),
        dir.display()
    );
    dir
}

const SETTINGS: &[(&str, &str)] = &[
    ("FREESKI__GENERATION__SYSTEM_PROMPT", "You are a helpful assistant."),
    ("FREESKI__SERVE__QUEUE_CAPACITY", "1"),
    ("FREESKI__SERVE__MAX_BATCH", "1"),
    ("FREESKI__SERVE__MAX_BODY_BYTES", "65536"),
    ("FREESKI__SERVE__MODEL_NAME", "smollm2"),
    ("FREESKI__SERVE__SHUTDOWN_GRACE_MS", "5000"),
];
const QUESTION: &str = "What should I wax my skis with in spring?";
const SEED: &str = "7";
const TEMPERATURE: &str = "0.8";
const MAX_TOKENS: &str = "24";

fn bin(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freeski-bot"));
    // An empty folder: no config/local.toml of the developer's leaks in.
    c.current_dir(dir).env("FREESKI_LOG", "warn").envs(SETTINGS.iter().copied());
    c
}

/// `freeski-bot ask` with the test's seed and sampling; its answer without the final newline.
fn ask(dir: &Path, model: &Path, adapter: Option<&Path>) -> String {
    let mut c = bin(dir);
    c.args(["ask", "--model", model.to_str().unwrap(), "--seed", SEED, "--temperature", TEMPERATURE, "--max-new-tokens", MAX_TOKENS]);
    if let Some(a) = adapter {
        c.args(["--adapter", a.to_str().unwrap()]);
    }
    let out = c.arg(QUESTION).output().unwrap();
    assert!(out.status.success(), "ask: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').expect("ask ends its answer with a newline").to_string()
}

struct Server {
    child: Child,
    url: String,
}

/// `freeski-bot serve` on a free loopback port; returns once it listens.
fn serve(dir: &Path, model: &Path, key: &str) -> Server {
    let mut child = bin(dir)
        .args(["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("FREESKI_API_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}")).to_string();
    Server { child, url }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn openai_python_client_against_serve_matches_ask() {
    let py = openai_package();
    let model = common::smollm2_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A random adapter on disk, large enough to change the answer.
    let lm = load_path(&model, &Device::Cpu).unwrap();
    let adapter_dir = dir.join("adapters/lora-a");
    common::lora::random(lm.model.config(), 4, 0.5, 9).save(&adapter_dir).unwrap();
    drop(lm);

    let base_answer = ask(dir, &model, None);
    let adapter_answer = ask(dir, &model, Some(&adapter_dir));
    assert!(!base_answer.is_empty() && base_answer != adapter_answer, "{base_answer:?} / {adapter_answer:?}");
    std::fs::write(dir.join("expected-base.txt"), &base_answer).unwrap();
    std::fs::write(dir.join("expected-adapter.txt"), &adapter_answer).unwrap();

    let key = "test-key-0123456789";
    let mut server = serve(dir, &model, key);
    let out = Command::new("python3")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/serve_openai_client.py"))
        .env("PYTHONPATH", &py)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs([
            ("SERVE_URL", server.url.as_str()),
            ("SERVE_KEY", key),
            ("SERVE_BASE_MODEL", "smollm2"),
            ("SERVE_QUESTION", QUESTION),
            ("SERVE_SEED", SEED),
            ("SERVE_TEMPERATURE", TEMPERATURE),
            ("SERVE_MAX_TOKENS", MAX_TOKENS),
            ("SERVE_MAX_BODY", "65536"),
            ("SERVE_LONG_PROMPT", "Write a long story about a ski trip to the Alps, with many details."),
            ("SERVE_LONG_SEED", "3"),
        ])
        .env("SERVE_ADAPTER_PATH", &adapter_dir)
        .env("SERVE_EXPECTED_BASE", dir.join("expected-base.txt"))
        .env("SERVE_EXPECTED_ADAPTER", dir.join("expected-adapter.txt"))
        .output()
        .expect("running python3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client checks passed"), "{stdout}\n{stderr}");
    eprintln!("{stdout}");

    // SIGTERM: a clean exit, promptly.
    let t0 = Instant::now();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_refuses_a_public_address_without_a_key_and_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::smollm2_gguf();
    let out = bin(tmp.path()).args(["serve", "--model", model.to_str().unwrap(), "--listen", "0.0.0.0:0"]).env_remove("FREESKI_API_KEY").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without an API key") && err.contains("FREESKI_API_KEY"), "{err}");

    let out = bin(tmp.path()).args(["serve", "--lora", "nameonly"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=PATH"));

    let out = bin(tmp.path()).args(["serve"]).env("FREESKI__SERVE__API_KEY_FILE", "/no/such/key").env_remove("FREESKI_API_KEY").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/key"));
}
