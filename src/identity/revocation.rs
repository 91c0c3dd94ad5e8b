//! The revocation list: a text file of revoked token ids (`jti`) and subjects in; a
//! [`RevocationList`] to look tokens up in out. Watching is the caller's job; this is the
//! format and the rules for reading the file while someone may be writing it.
//!
//! Format: one entry per line, each line ending with a newline; `#` starts a comment;
//! blank lines are ignored. `jti:<value>` revokes a token id; `sub:<value>` revokes every
//! token whose subject is `<value>`, from any issuer. A value has no whitespace. Anything
//! else (a bare value, `sub alice`, `subject:alice`, `JTI:x`, `sub:alice bob`) is an error
//! naming its line, with the entry it probably meant: a typo must not revoke the wrong
//! thing, or nothing, in silence.

use std::collections::HashSet;
use std::path::Path;

/// Revoked token ids and subjects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevocationList {
    jtis: HashSet<String>,
    subjects: HashSet<String>,
}

/// Most entries a revocation list may hold; larger files are refused.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Longest line of a revocation list, in bytes: no token id or subject is near this long.
pub const MAX_LINE_BYTES: usize = 4096;

/// Most line problems reported for one file (the count of the rest follows).
const MAX_REPORTED: usize = 20;

/// A bad line, cut for an error message.
fn shown(line: &str) -> String {
    line.chars().take(64).collect()
}

/// The fix for a line with no known prefix: the entry it most likely meant (`sub alice`,
/// `subject:alice`, `SUB:alice` meant `sub:alice`), else the two forms.
fn meant(line: &str) -> String {
    let forms = "write \"jti:<token id>\" or \"sub:<subject>\"";
    let Some((word, value)) = line.split_once(|c: char| c == ':' || c == '=' || c.is_whitespace())
    else {
        return forms.to_string();
    };
    let value = value.trim_start_matches([':', '=']).trim();
    let word = word.to_ascii_lowercase();
    let close = |to: &str| word == to || strsim::damerau_levenshtein(&word, to) <= 1;
    let prefix = if close("sub") || ["subject", "subj", "user"].contains(&word.as_str()) {
        "sub"
    } else if close("jti") || ["id", "token", "token_id", "tokenid"].contains(&word.as_str()) {
        "jti"
    } else {
        return forms.to_string();
    };
    if value.is_empty() || value.contains(char::is_whitespace) {
        return forms.to_string();
    }
    format!("did you mean \"{prefix}:{}\"?", shown(value))
}

impl RevocationList {
    /// Parses the file format. Every bad line is reported, each as `line N: problem`.
    pub fn parse(text: &str) -> Result<RevocationList, Vec<String>> {
        let mut list = RevocationList::default();
        let mut problems = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if raw.len() > MAX_LINE_BYTES {
                problems.push(format!("line {n}: longer than {MAX_LINE_BYTES} bytes"));
                continue;
            }
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (set, value) = match line.split_once(':') {
                Some(("sub", v)) => (&mut list.subjects, v.trim()),
                Some(("jti", v)) => (&mut list.jtis, v.trim()),
                Some((prefix, _)) => {
                    let prefix: String = prefix.chars().take(32).collect();
                    problems.push(format!(
                        "line {n}: unknown prefix \"{prefix}\"; {}",
                        meant(line)
                    ));
                    continue;
                }
                None => {
                    // SECURITY: a bare value was once taken as a jti, so `sub alice` revoked
                    // a token id nobody has and left alice's tokens working.
                    problems.push(format!(
                        "line {n}: no \"jti:\" or \"sub:\" prefix; {}",
                        meant(line)
                    ));
                    continue;
                }
            };
            if value.is_empty() {
                problems.push(format!("line {n}: empty entry"));
                continue;
            }
            // SECURITY: `sub:alice bob` is two entries on one line, or a typo; revoking the
            // subject "alice bob" would revoke neither.
            if value.contains(char::is_whitespace) {
                problems.push(format!(
                    "line {n}: \"{}\" has whitespace in its value; write one entry per line",
                    shown(line)
                ));
                continue;
            }
            set.insert(value.to_string());
            if list.len() > MAX_ENTRIES {
                problems.push(format!("more than {MAX_ENTRIES} entries"));
                break;
            }
        }
        if problems.len() > MAX_REPORTED {
            let more = problems.len() - MAX_REPORTED;
            problems.truncate(MAX_REPORTED);
            problems.push(format!("and {more} more bad line(s)"));
        }
        if problems.is_empty() {
            Ok(list)
        } else {
            Err(problems)
        }
    }

    /// Reads and parses the list at `path`. `previous` is the list serving now (`None` at
    /// start-up). Every problem names the file, and the line when it has one.
    ///
    /// SECURITY: a revocation list is the one file whose half-written state fails open (a
    /// truncated list revokes less), so two states are taken as a write in progress and
    /// refused, keeping the list that serves: an empty file replacing a non-empty list, and
    /// text whose last line does not end with a newline. To clear the list on purpose,
    /// write a comment line. The safe way to update it is to write a temporary file in the
    /// same directory and rename it over the list.
    pub fn load(
        path: &Path,
        previous: Option<&RevocationList>,
    ) -> Result<RevocationList, Vec<String>> {
        let at = path.display();
        let text = crate::files::read_to_string(path).map_err(|e| vec![e.to_string()])?;
        if text.is_empty() {
            return match previous {
                Some(p) if !p.is_empty() => Err(vec![format!(
                    "{at}: empty, replacing a list of {} entries: taken as a write in progress \
                     (to clear the list, write a comment line such as \"# none\")",
                    p.len()
                )]),
                _ => Ok(RevocationList::default()),
            };
        }
        if !text.ends_with('\n') {
            return Err(vec![format!(
                "{at}: the last line does not end with a newline: taken as a write in progress \
                 (write the list to a temporary file and rename it into place)"
            )]);
        }
        RevocationList::parse(&text).map_err(|problems| {
            problems
                .into_iter()
                .map(|p| match p.strip_prefix("line ") {
                    Some(rest) => format!("{at}:{rest}"),
                    None => format!("{at}: {p}"),
                })
                .collect()
        })
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.jtis.len() + self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn revokes_jti(&self, jti: &str) -> bool {
        self.jtis.contains(jti)
    }

    pub fn revokes_subject(&self, sub: &str) -> bool {
        self.subjects.contains(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_format() {
        let l = RevocationList::parse("# revoked\njti:abc\njti: def  # stolen\nsub:mallory\n\n")
            .unwrap();
        assert!(l.revokes_jti("abc") && l.revokes_jti("def"));
        assert!(l.revokes_subject("mallory"));
        assert!(!l.revokes_jti("mallory") && !l.revokes_subject("abc"));
        assert_eq!(l.len(), 3);
        assert_eq!(
            RevocationList::parse("jti:\n").unwrap_err(),
            vec!["line 1: empty entry"]
        );
    }

    /// Typos are refused, every one with its line, instead of becoming a jti nobody has.
    #[test]
    fn typos_are_refused_with_their_lines() {
        let errs = RevocationList::parse(
            "jti:ok\nsub alice\nsubject:alice\nJTI:x\nbare-id\n#fine\nsub:\n",
        )
        .unwrap_err();
        assert_eq!(
            errs,
            vec![
                "line 2: no \"jti:\" or \"sub:\" prefix; did you mean \"sub:alice\"?",
                "line 3: unknown prefix \"subject\"; did you mean \"sub:alice\"?",
                "line 4: unknown prefix \"JTI\"; did you mean \"jti:x\"?",
                "line 5: no \"jti:\" or \"sub:\" prefix; write \"jti:<token id>\" or \"sub:<subject>\"",
                "line 7: empty entry",
            ]
        );
        for (line, fix) in [
            ("sbu:alice", "did you mean \"sub:alice\"?"),
            ("jit: t-1", "did you mean \"jti:t-1\"?"),
            ("sub=alice", "did you mean \"sub:alice\"?"),
            ("Sub alice", "did you mean \"sub:alice\"?"),
            ("token t-1", "did you mean \"jti:t-1\"?"),
            ("color:red", "write \"jti:<token id>\" or \"sub:<subject>\""),
            ("sub alice bob", "write \"jti:<token id>\" or \"sub:<subject>\""),
        ] {
            let errs = RevocationList::parse(&format!("{line}\n")).unwrap_err();
            assert!(errs[0].ends_with(fix), "{line}: {errs:?}");
        }
        // Two entries on one line are not one subject with a space.
        assert_eq!(
            RevocationList::parse("sub:alice bob\n").unwrap_err(),
            vec!["line 1: \"sub:alice bob\" has whitespace in its value; write one entry per line"]
        );
        let long = format!("jti:{}\n", "x".repeat(MAX_LINE_BYTES));
        assert!(RevocationList::parse(&long).unwrap_err()[0].contains("longer than"));
    }

    #[test]
    fn a_write_in_progress_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("revoked.txt");
        let serving = RevocationList::parse("jti:a\n").unwrap();
        std::fs::write(&p, "").unwrap();
        // At start-up an empty file is an empty list; replacing a list, a write in progress.
        assert!(RevocationList::load(&p, None).unwrap().is_empty());
        assert!(RevocationList::load(&p, Some(&RevocationList::default())).is_ok());
        let e = RevocationList::load(&p, Some(&serving)).unwrap_err();
        assert!(e[0].contains("write in progress"), "{e:?}");
        std::fs::write(&p, "jti:a\njti:b").unwrap();
        let e = RevocationList::load(&p, None).unwrap_err();
        assert!(e[0].contains("does not end with a newline"), "{e:?}");
        std::fs::write(&p, "# cleared on purpose\n").unwrap();
        assert!(RevocationList::load(&p, Some(&serving)).unwrap().is_empty());
        std::fs::write(&p, "jti:a\nsub x\n").unwrap();
        let e = RevocationList::load(&p, None).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(&format!("{}:2: no", p.display())), "{e:?}");
    }

    proptest! {
        /// Any line is either a well-formed entry that revokes exactly its value, a blank or
        /// comment line, or an error naming that line: never a silent misreading.
        #[test]
        fn every_line_is_an_entry_a_comment_or_an_error(
            lines in proptest::collection::vec("[a-zA-Z: #\t_-]{0,12}", 1..8)
        ) {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let parsed = RevocationList::parse(&text);
            for (i, l) in lines.iter().enumerate() {
                let body = l.split('#').next().unwrap_or_default().trim();
                let entry = body
                    .strip_prefix("jti:")
                    .map(|v| (true, v.trim()))
                    .or_else(|| body.strip_prefix("sub:").map(|v| (false, v.trim())));
                match (&parsed, entry) {
                    (_, _) if body.is_empty() => {}
                    (Ok(list), Some((true, v))) => prop_assert!(list.revokes_jti(v)),
                    (Ok(list), Some((false, v))) => prop_assert!(list.revokes_subject(v)),
                    (Ok(_), None) => prop_assert!(false, "line {:?} accepted", l),
                    (Err(errs), e) => {
                        let named = errs.iter().any(|m| m.starts_with(&format!("line {}:", i + 1)));
                        let bad = e.is_none_or(|(_, v)| v.is_empty() || v.contains(char::is_whitespace));
                        prop_assert_eq!(named, bad, "line {:?}: {:?}", l, errs);
                    }
                }
            }
        }
    }
}
