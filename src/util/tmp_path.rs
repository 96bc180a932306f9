//! Names for the temporary file a write goes to before it is renamed into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A hidden sibling of `target`, unique to this process and this call: two threads (or two
/// processes) writing the same target never share a temporary file, so each rename moves a
/// whole file of its own and the last one wins.
pub fn beside(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_names_a_different_hidden_sibling() {
        let target = Path::new("/data/model.gguf");
        let (a, b) = (beside(target), beside(target));
        assert_ne!(a, b);
        for p in [a, b] {
            assert_eq!(p.parent(), target.parent());
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(name.starts_with(".model.gguf.tmp-"), "{name}");
        }
    }
}
