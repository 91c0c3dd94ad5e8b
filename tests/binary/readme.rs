//! The README run as written (a drift check): every command shown after a `$ ` prompt in
//! the README runs in a copy of the repository's layout (shipped policies and examples, fresh
//! demo material), against a server serving the example configuration, and its output must
//! be what the README shows. The quick start's test command must be the one CI runs, and
//! every relative link of the README and of docs/ must lead to a file that exists.
//!
//! How shown output is compared with what a command printed (standard output, then
//! standard error):
//! - lines are compared without trailing blanks;
//! - `…` inside a line stands for any text (a decision id, a time, a long value);
//! - a line that is only `…` stands for any number of lines;
//! - a command shown without output only has to succeed... or, with output, to print it
//!   (its exit status is not checked then: `check` exits 2 for a deny).
//!
//! Commands are run by `sh -c` with the built `portcullis` first on `PATH`, and with the
//! example's addresses (127.0.0.1:9191 and :9192) replaced by the test server's.

use crate::common::binary::{Binary, run_command};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command shown in a document, with the output shown under it.
#[derive(Debug)]
struct Shown {
    line: usize,
    command: String,
    output: Vec<String>,
}

/// The `$ ` commands of the fenced blocks of `text` (`text`, `sh`, `console` or unnamed),
/// each with the lines up to the next prompt or the end of the block. A command line ending
/// in `\` goes on on the next line.
fn shown_commands(text: &str) -> Vec<Shown> {
    let mut shown: Vec<Shown> = Vec::new();
    let mut in_block = false;
    let mut block_runs = false;
    let mut continued = false;
    // The commands of the current block are shown[block_start..].
    let mut block_start = 0;
    for (n, line) in text.lines().enumerate() {
        if let Some(info) = line.strip_prefix("```") {
            in_block = !in_block;
            block_runs = in_block && matches!(info.trim(), "" | "text" | "sh" | "console");
            block_start = shown.len();
            continue;
        }
        if !in_block || !block_runs {
            continue;
        }
        if continued {
            let last = shown.last_mut().expect("a command goes on");
            last.command.push('\n');
            last.command.push_str(line);
            continued = line.ends_with('\\');
        } else if let Some(command) = line.strip_prefix("$ ") {
            shown.push(Shown {
                line: n + 1,
                command: command.to_string(),
                output: Vec::new(),
            });
            continued = command.ends_with('\\');
        } else if shown.len() > block_start {
            // Output belongs to the last command of the same block only.
            if let Some(last) = shown.last_mut() {
                last.output.push(line.trim_end().to_string());
            }
        }
    }
    shown
}

/// Whether one shown line matches one printed line (`…` stands for any text).
fn line_matches(shown: &str, printed: &str) -> bool {
    let printed = printed.trim_end();
    let mut parts = shown.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = printed.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether the shown lines match the printed ones (a line of only `…` stands for any number
/// of lines). Trailing empty lines on either side do not count.
fn output_matches(shown: &[String], printed: &[&str]) -> bool {
    let trim = |lines: &[String]| {
        let end = lines
            .iter()
            .rposition(|l| !l.is_empty())
            .map_or(0, |i| i + 1);
        lines[..end].to_vec()
    };
    let shown = trim(shown);
    let printed: Vec<String> = trim(&printed.iter().map(|l| l.to_string()).collect::<Vec<_>>());
    fn go(shown: &[String], printed: &[String]) -> bool {
        match shown.split_first() {
            None => printed.is_empty(),
            Some((first, rest)) if first == "…" => {
                (0..=printed.len()).any(|skip| go(rest, &printed[skip..]))
            }
            Some((first, rest)) => printed
                .split_first()
                .is_some_and(|(p, more)| line_matches(first, p) && go(rest, more)),
        }
    }
    go(&shown, &printed)
}

#[test]
fn the_comparison_of_shown_and_printed_output_is_strict_outside_its_wildcards() {
    let shown = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
    assert!(output_matches(
        &shown("a\nb …\n…\nz"),
        &["a", "b 42", "c", "d", "z"]
    ));
    assert!(output_matches(&shown("ALLOW\n"), &["ALLOW", ""]));
    assert!(!output_matches(&shown("ALLOW"), &["DENY"]));
    assert!(
        !output_matches(&shown("a\nb"), &["a", "b", "c"]),
        "extra line"
    );
    assert!(
        !output_matches(&shown("a\nb\nc"), &["a", "b"]),
        "missing line"
    );
    assert!(line_matches(
        "decision: … (no_permit)",
        "decision: DENY 403 (no_permit)"
    ));
    assert!(!line_matches(
        "decision: … (no_permit)",
        "decision: DENY 403 (forbidden)"
    ));
    assert!(!line_matches("x…y", "xz"));
    assert!(line_matches(
        "{ \"status\": { \"code\": 0 }, …",
        "{ \"status\": { \"code\": 0 }, 1 }"
    ));
    let parsed = shown_commands(
        "```sh\n$ echo a \\\n  b\na b\n```\n```rust\n$ not run\n```\n```text\nnot output\n```\n",
    );
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    assert_eq!(parsed[0].command, "echo a \\\n  b");
    assert_eq!(parsed[0].output, ["a b"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

/// Runs `command` with `sh -c` in `dir`, the built binary first on `PATH`; standard output
/// then standard error, and whether it succeeded. Killed (and a failure) after 60 s.
fn shell(command: &str, dir: &Path) -> (bool, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_portcullis"))
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out_path = dir.join(".out");
    let err_path = dir.join(".err");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("create"))
        .stderr(std::fs::File::create(&err_path).expect("create"))
        .spawn()
        .expect("run sh");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{command}` did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default()
        + &std::fs::read_to_string(&err_path).unwrap_or_default();
    (status.success(), out)
}

/// The README's `$ ` commands, run in a fresh layout against the example configuration.
#[test]
fn the_readme_commands_print_what_the_readme_shows() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let shown = shown_commands(&readme);
    assert!(
        shown.len() >= 5,
        "expected the README's worked example to show commands, found {}",
        shown.len()
    );

    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    copy_dir(&repo().join("policies"), &dir.join("policies"));
    copy_dir(&repo().join("examples"), &dir.join("examples"));
    let demo = run_command(&["demo"], dir, None, Duration::from_secs(60));
    assert!(demo.status.success(), "{}", demo.stderr);

    // The example configuration, as the quick start serves it, on ports of its own.
    let example = std::fs::read_to_string(dir.join("examples/portcullis.toml")).expect("read");
    for address in ["127.0.0.1:9191", "127.0.0.1:9192"] {
        assert_eq!(
            example.matches(address).count(),
            1,
            "examples/portcullis.toml should listen on {address}"
        );
    }
    let served = dir.join("examples/served-by-the-test.toml");
    std::fs::write(
        &served,
        example
            .replace("127.0.0.1:9191", "127.0.0.1:0")
            .replace("127.0.0.1:9192", "127.0.0.1:0"),
    )
    .expect("write");
    let server = Binary::serve(&served);
    let grpc = server.grpc.to_string();
    let http = server.http_addr().to_string();

    let mut failures = Vec::new();
    for s in &shown {
        let command = s
            .command
            .replace("127.0.0.1:9191", &grpc)
            .replace("127.0.0.1:9192", &http);
        let (ok, printed) = shell(&command, dir);
        let lines: Vec<&str> = printed.lines().collect();
        let good = if s.output.iter().all(|l| l.is_empty()) {
            ok
        } else {
            output_matches(&s.output, &lines)
        };
        if !good {
            failures.push(format!(
                "README.md:{}: `{}`\n--- shown ---\n{}\n--- printed ---\n{printed}",
                s.line,
                s.command,
                s.output.join("\n")
            ));
        }
    }
    server.assert_alive();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The quick start's test command is the one CI runs, and its serve command's files exist.
#[test]
fn the_quick_start_is_what_ci_runs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    let ci_command = ci
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .expect("a command in .ci/run");
    assert!(
        readme.lines().any(|l| l == ci_command),
        "README's quick start does not show .ci/run's command `{ci_command}`"
    );
    let serve = "cargo run --release -- demo && cargo run --release -- serve --config examples/portcullis.toml";
    assert!(readme.lines().any(|l| l == serve), "quick start: `{serve}`");
    assert!(repo().join("examples/portcullis.toml").is_file());
    for script in ci_command.split("&&").map(str::trim) {
        if let Some(path) = script.strip_prefix("scripts/") {
            assert!(repo().join("scripts").join(path).is_file(), "{script}");
        }
    }
}

/// The GitHub anchor of a heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fence = false;
    text.lines()
        .filter_map(|l| {
            if l.starts_with("```") {
                fence = !fence;
            }
            (!fence && l.starts_with('#')).then(|| anchor(l.trim_start_matches('#')))
        })
        .collect()
}

/// The targets of a line's Markdown links: what stands between `](` and `)`. A `](` not
/// followed by a target without blanks and its `)` is a broken link: its target is `Err`.
fn link_targets(line: &str) -> Vec<Result<String, String>> {
    line.split("](")
        .skip(1)
        .map(|rest| {
            let end = rest.find(')').unwrap_or(rest.len());
            let target = &rest[..end];
            if end < rest.len() && !target.is_empty() && !target.contains(char::is_whitespace) {
                Ok(target.to_string())
            } else {
                Err(rest.chars().take(40).collect())
            }
        })
        .collect()
}

/// Every relative link of the README, ARCHITECTURE.md and docs/*.md leads to a file that
/// exists, and a `#fragment` to one of its headings.
#[test]
fn documentation_links_lead_somewhere() {
    let mut pages = vec![repo().join("README.md"), repo().join("ARCHITECTURE.md")];
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("read page");
        let mut fence = false;
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("```") {
                fence = !fence;
            }
            if fence {
                continue;
            }
            for target in link_targets(line) {
                let target = match target {
                    Ok(target) => target,
                    Err(text) => {
                        broken.push(format!(
                            "{}:{}: `]({text}`: not a link (no target, or no `)`)",
                            page.display(),
                            n + 1
                        ));
                        continue;
                    }
                };
                if target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let (file, fragment) = match target.split_once('#') {
                    Some((f, frag)) => (f, Some(frag)),
                    None => (target.as_str(), None),
                };
                let path = if file.is_empty() {
                    page.clone()
                } else {
                    page.parent().expect("dir").join(file)
                };
                let where_ = format!("{}:{}: {target}", page.display(), n + 1);
                if !path.exists() {
                    broken.push(format!("{where_}: no such file"));
                } else if let Some(fragment) = fragment
                    && path.extension().is_some_and(|e| e == "md")
                {
                    let text = std::fs::read_to_string(&path).expect("read target");
                    if !anchors(&text).iter().any(|a| a == fragment) {
                        broken.push(format!("{where_}: no such heading"));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
