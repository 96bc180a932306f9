//! The versioned dataset folder. Files are written into a temporary folder while their SHA-256
//! is computed; the folder is then renamed to `ds-<first 12 hex of the dataset hash>`. The hash
//! covers the data files only (not the build time), so the same input always gives the same
//! name, and an existing folder with that name is reused as is.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const TRAIN: &str = "train.jsonl";
pub const TEST: &str = "test.jsonl";
pub const REJECTED: &str = "rejected.jsonl";
/// Labelled answers for preference training: `{"messages": [...], "label": true|false}`.
pub const FEEDBACK: &str = "feedback.jsonl";
/// Held-out labelled answers (never a question of `FEEDBACK` or of the forum's training split).
pub const FEEDBACK_TEST: &str = "feedback_test.jsonl";
/// File in the datasets folder naming the most recent build.
pub const LATEST: &str = "LATEST";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
    Rejected,
    Feedback,
    FeedbackTest,
}

struct HashedFile {
    name: &'static str,
    out: BufWriter<File>,
    hash: Sha256,
    lines: u64,
}

impl HashedFile {
    fn create(dir: &Path, name: &'static str) -> Result<Self> {
        let path = dir.join(name);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { name, out: BufWriter::new(file), hash: Sha256::new(), lines: 0 })
    }

    fn line(&mut self, bytes: &[u8]) -> Result<()> {
        self.hash.update(bytes);
        self.hash.update(b"\n");
        self.out.write_all(bytes)?;
        self.out.write_all(b"\n")?;
        self.lines += 1;
        Ok(())
    }
}

pub struct DatasetWriter {
    root: PathBuf,
    tmp: PathBuf,
    files: Vec<HashedFile>,
}

/// Where a finished dataset went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub name: String,
    pub path: PathBuf,
    pub hash: String,
    /// An identical dataset already existed and was kept.
    pub reused: bool,
}

impl DatasetWriter {
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating dataset folder {}", root.display()))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = root.join(format!(".building-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let files = vec![
            HashedFile::create(&tmp, TRAIN)?,
            HashedFile::create(&tmp, TEST)?,
            HashedFile::create(&tmp, REJECTED)?,
            HashedFile::create(&tmp, FEEDBACK)?,
            HashedFile::create(&tmp, FEEDBACK_TEST)?,
        ];
        Ok(Self { root: root.to_path_buf(), tmp, files })
    }

    pub fn write<T: Serialize>(&mut self, part: Part, record: &T) -> Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let f = &mut self.files[part as usize];
        f.line(&bytes).with_context(|| format!("writing {}", f.name))
    }

    pub fn lines(&self, part: Part) -> u64 {
        self.files[part as usize].lines
    }

    /// Hash, then write the extra JSON files `extra(name, hash)` returns, then publish.
    pub fn finish(mut self, extra: impl FnOnce(&str, &str) -> Result<Vec<(&'static str, serde_json::Value)>>) -> Result<Written> {
        let mut overall = Sha256::new();
        for mut f in std::mem::take(&mut self.files) {
            f.out.flush().with_context(|| format!("writing {}", f.name))?;
            overall.update(f.name.as_bytes());
            overall.update(b"\n");
            overall.update(hex::encode(f.hash.finalize()).as_bytes());
            overall.update(b"\n");
        }
        let hash = hex::encode(overall.finalize());
        let name = format!("ds-{}", &hash[..12]);
        let path = self.root.join(&name);
        let result = (|| -> Result<bool> {
            for (file, value) in extra(&name, &hash)? {
                let p = self.tmp.join(file);
                std::fs::write(&p, serde_json::to_vec_pretty(&value)?).with_context(|| format!("writing {}", p.display()))?;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&self.tmp).with_context(|| format!("removing {}", self.tmp.display()))?;
                return Ok(true);
            }
            std::fs::rename(&self.tmp, &path).with_context(|| format!("moving {} to {}", self.tmp.display(), path.display()))?;
            Ok(false)
        })();
        let reused = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.tmp);
                return Err(e);
            }
        };
        std::fs::write(self.root.join(LATEST), format!("{name}\n")).context("writing LATEST")?;
        Ok(Written { name, path, hash, reused })
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        // An abandoned build leaves no half-written folder behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
