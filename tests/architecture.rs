//! The shape of the crate: every module may import only the modules below it in ARCHITECTURE.md's
//! layer table. This reads each `crate::…` and `super::…` path in `src/` (grouped `use crate::{a, b}`
//! too) and fails naming the file and the arrow that points up.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top, as in ARCHITECTURE.md. A module may import those before it.
const LAYERS: &[&str] = &["util", "kernels", "llm", "store", "scrape", "dataset", "train", "adapters", "discord", "worker", "bot", "serve", "config", "bench", "cli"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|m| *m == module)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/`: `src/llm/load/gguf.rs` → ["llm", "load", "gguf"].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// Code without comments and string literals (a doc comment may name any module).
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Top-level modules a file's code names through `crate::` or `super::` paths.
fn imported_modules(code: &str, own_path: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    // `crate::x` and `crate::{x::…, y}`.
    for (at, _) in code.match_indices("crate::") {
        if at > 0 && code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `freeski_crate::`
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first identifier after `{` and after each top-level comma.
            let mut depth = 0usize;
            let mut names = Vec::new();
            let mut expecting = true;
            let mut i = 0;
            let g: Vec<char> = group.chars().collect();
            while i < g.len() {
                match g[i] {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expecting = true,
                    c if expecting && depth == 0 && (c.is_alphanumeric() || c == '_') => {
                        let name: String = g[i..].iter().take_while(|c| c.is_alphanumeric() || **c == '_').collect();
                        i += name.len();
                        names.push(name);
                        expecting = false;
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
            found.extend(names);
        } else {
            found.insert(ident(rest));
        }
    }
    // `super::…` chains that climb to the crate root, then name a module.
    for (at, _) in code.match_indices("super::") {
        if at >= 7 && &code[at - 7..at] == "super::" {
            continue; // counted from the first `super::` of the chain
        }
        let mut rest = &code[at..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        // Inline modules (`mod tests`) add levels the file path does not show, so a chain that
        // may reach the root counts when it names a top-level module.
        let name = ident(rest);
        if ups >= own_path.len() && rank(&name).is_some() {
            found.insert(name);
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

#[test]
fn every_import_points_down_the_layers() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut unknown = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let path = module_path(rel);
        let Some(own) = path.first() else { continue }; // lib.rs, main.rs
        let Some(own_rank) = rank(own) else {
            unknown.insert(own.clone());
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).expect("read source"));
        for m in imported_modules(&code, &path) {
            if &m == own {
                continue;
            }
            match rank(&m) {
                Some(r) if r < own_rank => {}
                Some(_) => wrong.push(format!("{} imports `{m}`, which sits above `{own}`", rel.display())),
                None => {
                    unknown.insert(m);
                }
            }
        }
    }
    assert!(unknown.is_empty(), "modules missing from the layer list (add them to LAYERS and ARCHITECTURE.md): {unknown:?}");
    assert!(wrong.is_empty(), "imports pointing up the layers:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_super_and_plain_imports() {
    let path = vec!["bot".to_string(), "answer".to_string()];
    let code = code_only("use crate::{llm::engine::Engine, store};\nuse super::super::cli::x; // crate::config\nlet s = \"crate::bench\"; crate::util::compare::max_abs(&a);");
    let got: Vec<String> = imported_modules(&code, &path).into_iter().collect();
    assert_eq!(got, ["cli", "llm", "store", "util"]);
}
