//! Hub sources through the real hf-hub client: the offline switch resolves from the local cache
//! only, and a model that is not there says how to point the config at a local file.

use candle_core::Device;
use freeski_bot::config::Settings;
use freeski_bot::llm::load;

#[test]
fn offline_missing_model_explains_local_setup() {
    let cache = tempfile::tempdir().unwrap();
    let s =
        Settings::load_with_env(None, [("FREESKI__MODEL__OFFLINE".to_string(), "true".to_string()), ("FREESKI__MODEL__HUB_CACHE_DIR".into(), cache.path().display().to_string())])
            .unwrap();
    let err = format!("{:#}", load::load(&s.model, None, &Device::Cpu).err().expect("nothing is cached"));
    assert!(err.contains("mistral-7b-instruct-v0.1.Q4_K_M.gguf"), "{err}");
    assert!(err.contains("offline"), "{err}");
    assert!(err.contains("config/local.toml") && err.contains("--model") && err.contains("FREESKI__MODEL__SOURCE"), "{err}");
}

#[test]
fn cached_hub_file_is_found_offline() {
    // Lay out the standard HF cache by hand (blobs + snapshot symlink + ref), as a previous
    // online run would have left it, and resolve the SmolLM2 file from it with the network off.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-gguf");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join(format!("snapshots/{commit}"))).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/mistral-7b-v0.1.tokenizer.json");
    std::fs::copy(&src, repo.join(format!("snapshots/{commit}/tokenizer.json"))).unwrap();
    let s =
        Settings::load_with_env(None, [("FREESKI__MODEL__OFFLINE".to_string(), "true".to_string()), ("FREESKI__MODEL__HUB_CACHE_DIR".into(), cache.path().display().to_string())])
            .unwrap();
    let path = load::hub::fetch("acme/tiny-gguf", Some("tokenizer.json"), &s.model).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&src).unwrap());
}
