//! SPIFFE IDs and trust domains (SPIFFE ID specification §2), parsed once into newtypes.

use std::fmt;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
/// Why a SPIFFE ID or trust domain is not valid.
#[non_exhaustive]
pub enum SpiffeError {
    /// Not a `spiffe://` URI.
    #[error("\"{0}\" is not a spiffe:// URI")]
    Scheme(String),
    /// A trust domain that is empty or uses characters other than a-z, 0-9, `.`, `-` and `_`.
    #[error("trust domain \"{0}\" must be non-empty and use only a-z, 0-9, '.', '-' and '_'")]
    TrustDomain(String),
    /// A SPIFFE ID path with an empty, `.` or `..` segment, or a character outside A-Z a-z 0-9 `.` `-` `_`.
    #[error(
        "SPIFFE ID \"{0}\" has an invalid path (empty, '.' or '..' segment, or a character outside A-Z a-z 0-9 . - _)"
    )]
    Path(String),
    /// A SPIFFE ID longer than 2048 bytes.
    #[error("SPIFFE ID \"{0}\" is longer than 2048 bytes")]
    TooLong(String),
}

/// A SPIFFE trust domain, lower case by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain, as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for TrustDomain {
    type Error = SpiffeError;
    fn try_from(s: &str) -> Result<Self, SpiffeError> {
        // §2.1: lowercase letters, digits, dots, dashes and underscores only.
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(TrustDomain(s.to_string()))
        } else {
            Err(SpiffeError::TrustDomain(s.to_string()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A syntactically valid SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    /// The path, with its leading `/`, or empty.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeError;
    fn try_from(s: &str) -> Result<Self, SpiffeError> {
        if s.len() > 2048 {
            return Err(SpiffeError::TooLong(s.chars().take(64).collect()));
        }
        // §2: the scheme is exactly "spiffe" (lower case); no user info, port, query or fragment.
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::try_from(td)?;
        if !path.is_empty() {
            // §2.2: segments are non-empty, not "." or "..", of [A-Za-z0-9._-].
            let bad = path[1..].split('/').any(|seg| {
                seg.is_empty()
                    || seg == "."
                    || seg == ".."
                    || !seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if bad {
                return Err(SpiffeError::Path(s.to_string()));
            }
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let cases: &[(&str, bool)] = &[
            ("spiffe://example.org/ns/prod/sa/web", true),
            ("spiffe://example.org", true),
            ("spiffe://Example.org/x", false),
            ("SPIFFE://example.org/x", false),
            ("spiffe://example.org/", false),
            ("spiffe://example.org//x", false),
            ("spiffe://example.org/a/../b", false),
            ("spiffe://example.org/a?b", false),
            ("spiffe://user@example.org/a", false),
            ("spiffe://example.org:443/a", false),
            ("spiffe:///a", false),
            ("https://example.org/a", false),
        ];
        for (input, ok) in cases {
            assert_eq!(SpiffeId::try_from(*input).is_ok(), *ok, "{input}");
        }
        let id = SpiffeId::try_from("spiffe://example.org/ns/a").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/a");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/a");
    }
}
