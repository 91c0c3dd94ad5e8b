//! The revocation list: a text file of revoked token ids (`jti`) and subjects in; a
//! [`RevocationList`] to look tokens up in out. Reloading is the caller's job; this is
//! only the format.
//!
//! Format: one entry per line; `#` starts a comment; blank lines are ignored.
//! `jti:<value>` (or a bare value) revokes a token id; `sub:<value>` revokes every token
//! whose subject is `<value>`, from any issuer.

use std::collections::HashSet;

/// Revoked token ids and subjects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevocationList {
    jtis: HashSet<String>,
    subjects: HashSet<String>,
}

/// Most entries a revocation list may hold; larger files are refused.
pub const MAX_ENTRIES: usize = 1_000_000;

impl RevocationList {
    /// Parses the file format; a problem names its line.
    pub fn parse(text: &str) -> Result<RevocationList, String> {
        let mut list = RevocationList::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (set, value) = match line.split_once(':') {
                Some(("sub", v)) => (&mut list.subjects, v),
                Some(("jti", v)) => (&mut list.jtis, v),
                _ => (&mut list.jtis, line),
            };
            let value = value.trim();
            if value.is_empty() {
                return Err(format!("line {}: empty entry", i + 1));
            }
            set.insert(value.to_string());
            if list.len() > MAX_ENTRIES {
                return Err(format!("more than {MAX_ENTRIES} entries"));
            }
        }
        Ok(list)
    }

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

    #[test]
    fn parses_the_format() {
        let l =
            RevocationList::parse("# revoked\nabc\njti: def  # stolen\nsub:mallory\n\n").unwrap();
        assert!(l.revokes_jti("abc") && l.revokes_jti("def"));
        assert!(l.revokes_subject("mallory"));
        assert!(!l.revokes_jti("mallory") && !l.revokes_subject("abc"));
        assert_eq!(l.len(), 3);
        assert_eq!(
            RevocationList::parse("jti:\n").unwrap_err(),
            "line 1: empty entry"
        );
    }
}
