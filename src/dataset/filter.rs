//! Optional word filter (profanity, slurs, whatever the operator lists): a pair whose question
//! or answer contains a listed word or phrase is left out.

use anyhow::{Context, Result};

use super::DatasetSettings;

#[derive(Debug, Clone, Default)]
pub struct WordFilter {
    words: std::collections::HashSet<String>,
    phrases: Vec<String>,
}

fn tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).map(str::to_lowercase)
}

impl WordFilter {
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Self {
        let mut f = Self::default();
        for e in entries {
            let e = e.as_ref().trim().to_lowercase();
            if e.is_empty() || e.starts_with('#') {
                continue;
            }
            if e.contains(char::is_whitespace) {
                f.phrases.push(e.split_whitespace().collect::<Vec<_>>().join(" "));
            } else {
                f.words.insert(e);
            }
        }
        f
    }

    /// From `dataset.blocked_words` plus `dataset.blocked_words_file` (one entry a line, `#`
    /// comments).
    pub fn from_settings(s: &DatasetSettings) -> Result<Self> {
        let mut entries = s.blocked_words.clone();
        if !s.blocked_words_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&s.blocked_words_file).with_context(|| format!("reading dataset.blocked_words_file {}", s.blocked_words_file.display()))?;
            entries.extend(text.lines().map(str::to_string));
        }
        Ok(Self::new(entries))
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty() && self.phrases.is_empty()
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        if tokens(text).any(|t| self.words.contains(&t)) {
            return true;
        }
        if self.phrases.is_empty() {
            return false;
        }
        let joined = tokens(text).collect::<Vec<_>>().join(" ");
        self.phrases.iter().any(|p| format!(" {joined} ").contains(&format!(" {p} ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_and_phrases() {
        let f = WordFilter::new(["darn", "Gosh Dang", "# comment", ""]);
        assert!(f.matches("well DARN, that hurt"));
        assert!(!f.matches("darned good skis"), "only whole words");
        assert!(f.matches("gosh,   dang it"));
        assert!(!f.matches("gosh it's dangerous"));
        assert!(!WordFilter::default().matches("anything"));
    }
}
