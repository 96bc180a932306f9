//! Secrets (API keys, tokens) read from the environment or a file, never from the config, never
//! printed: `Debug` shows `***`, and comparing a presented value takes the same time wherever it
//! differs.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// `env_value` when set and not blank, else the content of `file` when it is not "" (an
    /// unreadable or empty file is an error), else `None`. `what` names the secret in errors.
    pub fn from_env_or_file(env_value: Option<String>, file: &str, what: &str) -> Result<Option<Self>> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return Ok(Some(Self(v.trim().to_string())));
        }
        if file.is_empty() {
            return Ok(None);
        }
        let v = std::fs::read_to_string(Path::new(file)).with_context(|| format!("reading the {what} file {file}"))?;
        anyhow::ensure!(!v.trim().is_empty(), "the {what} file {file} is empty");
        Ok(Some(Self(v.trim().to_string())))
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` equals the secret, in time independent of where they differ (and of
    /// their lengths: both are hashed first).
    pub fn matches(&self, presented: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.ct_eq(&b).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_wins_then_file_then_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "from-file\n").unwrap();
        let file = f.to_str().unwrap();
        assert_eq!(Secret::from_env_or_file(Some(" from-env ".into()), file, "API key").unwrap().unwrap().expose(), "from-env");
        assert_eq!(Secret::from_env_or_file(Some("  ".into()), file, "API key").unwrap().unwrap().expose(), "from-file");
        assert!(Secret::from_env_or_file(None, "", "API key").unwrap().is_none());
        std::fs::write(&f, "\n").unwrap();
        let e = format!("{:#}", Secret::from_env_or_file(None, file, "API key").unwrap_err());
        assert!(e.contains("empty"), "{e}");
        let e = format!("{:#}", Secret::from_env_or_file(None, "/no/such/key", "API key").unwrap_err());
        assert!(e.contains("/no/such/key"), "{e}");
    }

    #[test]
    fn matches_exactly_and_never_prints() {
        let s = Secret::new("s3cret");
        assert!(s.matches("s3cret"));
        assert!(!s.matches("s3cre") && !s.matches("s3crett") && !s.matches(""));
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}
