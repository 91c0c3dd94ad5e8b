//! The import graph, checked: each module may use only the modules of the layers below
//! its own (ARCHITECTURE.md, "The layers"). A test reads the sources, so an arrow that
//! points back up (and so a cycle) fails the build's tests, not a reviewer's eye.
//!
//! Test code (a `#[cfg(test)] mod`) may use anything: tests build
//! their inputs with the demo authority and token signer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every module of the library by layer, bottom first. A module may use those of lower
/// layers only; modules of one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    // Vocabulary and utilities that know nothing of Portcullis's stages.
    &[
        "proto", "files", "ratelog", "spiffe", "jose", "metrics", "problem", "declared",
    ],
    &["config"],
    &["facts"],
    &["identity"],
    // `security` classifies decisions from identity outcomes, so the engine can hold it.
    &["fetch", "reload", "policy", "audit", "security"],
    &["engine"],
    &["builder"],
    &["reply"],
    // `portcullis test` decides whole requests with the engine and states their replies;
    // `portcullis replay` decides recorded requests again.
    &["policytest", "replay"],
    &["explain"],
    &["server"],
    // Tools: the demo world, and the fuzzing harnesses built on it; nothing in the product
    // uses them.
    &["demo", "policyfmt"],
    &["fuzzing"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a source file belongs to (`src/identity/jwt.rs` is `identity`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin" | "arrows")).then(|| name.to_string())
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file without its test modules (`#[cfg(test)] mod x;` or `mod x { ... }`) and
/// without comments. Code after a test module is still read.
fn product_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            // Skip the module: up to the brace that closes it, or its one line.
            let mut depth = 0usize;
            for skipped in lines.by_ref() {
                depth += skipped.matches('{').count();
                depth = depth.saturating_sub(skipped.matches('}').count());
                if depth == 0 {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The top-level modules a piece of code names through `crate::`, including inside
/// `use crate::{a::X, b}` groups.
fn crate_uses(code: &str) -> Vec<String> {
    let mut used = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its top-level commas; each item starts with a module.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        used.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            used.push(item);
        } else {
            used.push(rest.to_string());
        }
    }
    used.iter()
        .map(|u| {
            u.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// Every arrow from one module to another: (from, to) with the files that draw it.
fn arrows() -> BTreeMap<(String, String), Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut arrows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let Some(from) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("source is readable");
        for to in crate_uses(&product_code(&text)) {
            if to != from {
                let shown = file
                    .strip_prefix(&src)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                arrows.entry((from.clone(), to)).or_default().push(shown);
            }
        }
    }
    arrows
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let unplaced: Vec<String> = files
        .iter()
        .filter_map(|f| module_of(&src, f))
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in arrows.rs: {unplaced:?}"
    );
}

#[test]
fn arrows_point_down_only() {
    let arrows = arrows();
    assert!(
        arrows.contains_key(&("engine".to_string(), "policy".to_string())),
        "the scan found no arrow at all from engine to policy: it reads nothing"
    );
    let upward: Vec<String> = arrows
        .iter()
        .filter(|((from, to), _)| match (layer_of(from), layer_of(to)) {
            (Some(f), Some(t)) => t >= f,
            _ => true,
        })
        .map(|((from, to), files)| format!("{from} -> {to} (in {})", files.join(", ")))
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up or sideways in the layers:\n  {}",
        upward.join("\n  ")
    );
}

#[test]
fn the_scan_sees_grouped_and_nested_imports() {
    let code = product_code(
        "use crate::{config::A, facts::{B, C}};\n// crate::server in a comment\nlet x = crate::identity::f();\n#[cfg(test)]\nmod tests {\n    use crate::demo;\n}\n#[cfg(test)]\nmod helper;\nuse crate::policy::P;\n",
    );
    // The test module and the test-only module declaration are skipped; what follows them
    // is read.
    assert_eq!(crate_uses(&code), ["config", "facts", "identity", "policy"]);
}
