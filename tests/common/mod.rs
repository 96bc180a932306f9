//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tiny;

use std::path::PathBuf;

/// The real SmolLM2-135M-Instruct Q4_1 GGUF fetched by `.ci/fetch-test-models.sh`.
/// Missing file = failed test with instructions, never a silent skip.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("FREESKI_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        let dir = std::env::var_os("FREESKI_TEST_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/freeski-test-models"));
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "test model {} is missing: run .ci/fetch-test-models.sh (or set FREESKI_SMOLLM2_GGUF)", path.display());
    path
}

/// A file under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}
