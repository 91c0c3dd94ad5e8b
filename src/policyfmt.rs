//! `portcullis fmt`: Cedar policy files in; each rewritten in place with Cedar's own
//! formatter (`cedar-policy-formatter`, the version `cedar-policy` pins), or, with
//! `--check`, the list of files that would change. Comments are kept (the formatter reads
//! them from the token stream) and the formatter itself refuses any output whose policies
//! differ from the input's.

use std::path::{Path, PathBuf};

/// What formatting a set of files came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Files that were rewritten (or, when checking, would be).
    pub changed: Vec<PathBuf>,
    /// Files already formatted.
    pub unchanged: usize,
    /// Files that could not be read, parsed or written, each with why.
    pub errors: Vec<String>,
}

/// Formats the text of a `.cedar` file: Cedar's formatter with its default layout (80
/// columns, indent 2).
pub fn format_source(text: &str) -> Result<String, String> {
    let config = cedar_policy_formatter::Config::default();
    let formatted = cedar_policy_formatter::policies_str_to_pretty(text, &config)
        .map_err(|e| format!("{e:?}"))?;
    // The formatter checks that the policies are unchanged, not the comments: a comment
    // it dropped would be lost from the file, so the file is left as it is instead.
    let mut kept = comments(&formatted);
    for comment in comments(text) {
        match kept.iter().position(|c| *c == comment) {
            Some(i) => {
                kept.swap_remove(i);
            }
            None => {
                return Err(format!(
                    "the formatter would drop the comment \"{comment}\""
                ));
            }
        }
    }
    Ok(formatted)
}

/// The `//` comments of Cedar source, each trimmed, in order (`//` inside a string
/// literal is not a comment).
fn comments(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for line in text.lines() {
        let bytes = line.as_bytes();
        let (mut i, mut in_string) = (0, false);
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_string => i += 1,
                b'"' => in_string = !in_string,
                b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                    found.push(line[i..].trim());
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    found
}

/// The `.cedar` files named by `paths`: a file as given, a directory's `*.cedar` files
/// (not its subdirectories, as the policy loader reads it), in name order.
pub fn cedar_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: cannot read the directory: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "cedar"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(format!("{}: no *.cedar files", path.display()));
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Formats each file in place or, when `check`, only finds those that would change.
pub fn format_files(files: &[PathBuf], check: bool) -> Outcome {
    let mut outcome = Outcome::default();
    for file in files {
        let text = match crate::files::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                outcome.errors.push(e.to_string());
                continue;
            }
        };
        let formatted = match format_source(&text) {
            Ok(formatted) => formatted,
            Err(e) => {
                outcome
                    .errors
                    .push(format!("{}: cannot format: {e}", file.display()));
                continue;
            }
        };
        if formatted == text {
            outcome.unchanged += 1;
            continue;
        }
        if !check && let Err(e) = replace(file, formatted.as_bytes()) {
            outcome
                .errors
                .push(format!("{}: cannot write: {e}", file.display()));
            continue;
        }
        outcome.changed.push(file.clone());
    }
    outcome
}

/// Replaces the file at `path` (through a symbolic link, the file it names) with `bytes`
/// atomically: a temporary file beside it, with its permissions, synced, then renamed over
/// it. A reader (a server reloading its policies) sees the old file or the new one, never
/// a part.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let target = std::fs::canonicalize(path)?;
    let permissions = std::fs::metadata(&target)?.permissions();
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.fmt.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(permissions)?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_keeps_comments_and_is_stable() {
        let text = "// leading comment\n@id(\"p\")\npermit(principal,action==Action::\"GET\",resource) // trailing\nwhen { context.request.path == \"/x\" };\n// end of file\n";
        let once = format_source(text).unwrap();
        for comment in ["// leading comment", "// trailing", "// end of file"] {
            assert!(once.contains(comment), "{comment:?} lost:\n{once}");
        }
        assert!(once.contains("action == Action::\"GET\""), "{once}");
        assert_eq!(format_source(&once).unwrap(), once);
    }

    #[test]
    fn comments_are_found_outside_strings_only() {
        let text = "// a\npermit (principal, action, resource) // b\nwhen { context.u == \"https://x\\\"//y\" }; // c \n";
        assert_eq!(comments(text), ["// a", "// b", "// c"]);
    }

    #[test]
    fn a_file_that_does_not_parse_is_an_error() {
        assert!(format_source("permit (principal, action resource);").is_err());
    }
}
