//! Envoy's `x-forwarded-client-cert` (XFCC) header: the header value in, one
//! [`XfccElement`] per proxy hop out. Pure and bounded: every peer-controlled size is capped
//! before it is read. `Cert` and `Chain` stay URL-encoded PEM for the certificate code to
//! decode and verify; nothing here is trusted until that code has verified it.
//!
//! Grammar (Envoy, HTTP connection manager, "x-forwarded-client-cert"): elements separated by
//! `,`, one per hop; each element is `;`-separated `key=value` pairs; keys are
//! case-insensitive; a value may be double-quoted, and inside quotes `\"` and `\\` are
//! escapes and `,`, `;` and `=` do not split. Optional whitespace around keys and values is
//! ignored, so headers joined with `, ` parse too.

/// Largest header accepted, in bytes, checked before anything is parsed.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most elements (proxy hops) accepted in one header.
pub const MAX_ELEMENTS: usize = 16;
/// Most `key=value` pairs accepted in one element, unknown keys included.
pub const MAX_PAIRS: usize = 32;

/// Longest excerpt of a peer-supplied key or pair quoted in an error, in characters.
const EXCERPT_CHARS: usize = 32;

/// One element of the header: what one proxy hop said about the client it saw.
/// Nothing in it is verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XfccElement {
    /// `By`: URI SANs of the certificate of the proxy that added the element.
    pub by: Vec<String>,
    /// `Hash`: SHA-256 of the client's DER certificate, 64 hex digits, lower-cased here.
    pub hash: Option<String>,
    /// `Cert`: the client's leaf certificate, URL-encoded PEM, still encoded.
    pub cert: Option<String>,
    /// `Chain`: the client's whole chain, leaf first, URL-encoded PEM, still encoded.
    pub chain: Option<String>,
    /// `Subject`: the client certificate's subject as the proxy printed it.
    pub subject: Option<String>,
    /// `URI`: the client certificate's URI SANs.
    pub uri: Vec<String>,
    /// `DNS`: the client certificate's DNS SANs.
    pub dns: Vec<String>,
}

/// Why a header could not be read. Elements are numbered from 1, in header order.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum XfccError {
    #[error("x-forwarded-client-cert is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("x-forwarded-client-cert has more than {max} elements")]
    TooManyElements { max: usize },
    #[error("element {element} has more than {max} pairs")]
    TooManyPairs { element: usize, max: usize },
    #[error("element {element} is empty")]
    EmptyElement { element: usize },
    #[error("element {element}: pair {pair:?} has no '='")]
    MissingEquals { element: usize, pair: String },
    #[error("element {element}: a pair has an empty key")]
    EmptyKey { element: usize },
    #[error("element {element}: key {key:?} is not a token")]
    InvalidKey { element: usize, key: String },
    #[error("element {element}: key \"{key}\" appears more than once")]
    DuplicateKey { element: usize, key: &'static str },
    #[error("element {element}: value of {key:?} has an unterminated quote")]
    UnterminatedQuote { element: usize, key: String },
    #[error("element {element}: value of {key:?} has a quote that does not enclose all of it")]
    MisplacedQuote { element: usize, key: String },
    #[error("element {element}: hash {value:?} is not 64 hex digits")]
    InvalidHash { element: usize, value: String },
    #[error("hash does not match the certificate")]
    HashMismatch,
}

/// Parses a whole header value into its elements, in header order (nearest hop last).
/// An empty or all-whitespace header has no elements.
pub fn parse(header: &str) -> Result<Vec<XfccElement>, XfccError> {
    // SECURITY: cap the peer-controlled size before reading any of it.
    if header.len() > MAX_HEADER_BYTES {
        return Err(XfccError::TooLarge {
            max: MAX_HEADER_BYTES,
        });
    }
    let mut elements = Vec::new();
    if header.trim_matches(is_ows).is_empty() {
        return Ok(elements);
    }
    let mut scanner = Scanner {
        chars: header.chars().peekable(),
        element: 0,
    };
    loop {
        if elements.len() == MAX_ELEMENTS {
            return Err(XfccError::TooManyElements { max: MAX_ELEMENTS });
        }
        scanner.element = elements.len() + 1;
        elements.push(scanner.element()?);
        // `element` stops only at `,` or at the end.
        if scanner.chars.next().is_none() {
            return Ok(elements);
        }
    }
}

/// The element of the nearest trusted hop: the last one.
///
/// With `APPEND_FORWARD` each proxy appends its own element, so the last element is the one
/// written by the proxy next to us. `None` when the header has no elements.
pub fn nearest(header: &str) -> Result<Option<XfccElement>, XfccError> {
    parse(header).map(|mut elements| elements.pop())
}

/// Checks `Hash` against the DER of the element's `Cert` when both are present (`der` is the
/// decoded certificate, supplied by the caller). Ok(()) when either is absent;
/// Err(HashMismatch) when they differ.
///
/// Hex digits of either case are accepted. Both values come from the same header, so this
/// catches a proxy bug or a spliced element; it is no substitute for trusting the header only
/// from a proxy that sanitizes it, nor for verifying the certificate.
pub fn check_hash(element: &XfccElement, der: &[u8]) -> Result<(), XfccError> {
    let (Some(hash), Some(_)) = (&element.hash, &element.cert) else {
        return Ok(());
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    // SECURITY: a malformed hash (possible when the element was built by hand) never matches.
    if hash.eq_ignore_ascii_case(&expected) {
        Ok(())
    } else {
        Err(XfccError::HashMismatch)
    }
}

/// Optional whitespace (RFC 9110 §5.6.3).
fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// At most [`EXCERPT_CHARS`] characters of a peer-supplied string, for an error message.
fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(EXCERPT_CHARS).collect();
    if s.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// A cursor over the header; `element` is the 1-based number of the element being read.
struct Scanner<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    element: usize,
}

impl Scanner<'_> {
    fn skip_ows(&mut self) {
        while self.chars.next_if(|&c| is_ows(c)).is_some() {}
    }

    /// Reads one element, stopping before the `,` that ends it or at the end.
    fn element(&mut self) -> Result<XfccElement, XfccError> {
        let element = self.element;
        let mut out = XfccElement::default();
        self.skip_ows();
        if matches!(self.chars.peek(), None | Some(',')) {
            return Err(XfccError::EmptyElement { element });
        }
        let mut pairs = 0;
        loop {
            if pairs == MAX_PAIRS {
                return Err(XfccError::TooManyPairs {
                    element,
                    max: MAX_PAIRS,
                });
            }
            pairs += 1;
            let key = self.key()?;
            let value = self.value(&key)?;
            out.set(element, &key, value)?;
            if self.chars.next_if_eq(&';').is_none() {
                return Ok(out);
            }
        }
    }

    /// Reads a key and the `=` after it.
    fn key(&mut self) -> Result<String, XfccError> {
        let element = self.element;
        self.skip_ows();
        let mut key = String::new();
        loop {
            match self.chars.next() {
                Some('=') => break,
                None | Some(';' | ',') => {
                    return Err(XfccError::MissingEquals {
                        element,
                        pair: excerpt(&key),
                    });
                }
                Some(c) => key.push(c),
            }
        }
        let key = key.trim_end_matches(is_ows);
        if key.is_empty() {
            return Err(XfccError::EmptyKey { element });
        }
        if !key.chars().all(is_tchar) {
            return Err(XfccError::InvalidKey {
                element,
                key: excerpt(key),
            });
        }
        Ok(key.to_owned())
    }

    /// Reads a value, quoted or not, stopping before the `;` or `,` that ends it.
    fn value(&mut self, key: &str) -> Result<String, XfccError> {
        let element = self.element;
        let misplaced = || XfccError::MisplacedQuote {
            element,
            key: excerpt(key),
        };
        self.skip_ows();
        let mut value = String::new();
        if self.chars.next_if_eq(&'"').is_some() {
            loop {
                match self.chars.next() {
                    None => {
                        return Err(XfccError::UnterminatedQuote {
                            element,
                            key: excerpt(key),
                        });
                    }
                    Some('"') => break,
                    // Only `\"` and `\\` are escapes: Envoy quotes RFC 2253 subjects without
                    // escaping their own backslashes, so any other `\` is kept as it is.
                    Some('\\') => match self.chars.next_if(|&c| c == '"' || c == '\\') {
                        Some(c) => value.push(c),
                        None => value.push('\\'),
                    },
                    Some(c) => value.push(c),
                }
            }
            self.skip_ows();
            return match self.chars.peek() {
                None | Some(';' | ',') => Ok(value),
                Some(_) => Err(misplaced()),
            };
        }
        while let Some(c) = self.chars.next_if(|&c| c != ';' && c != ',') {
            // SECURITY: a quote inside an unquoted value is a splitting ambiguity; refuse it.
            if c == '"' {
                return Err(misplaced());
            }
            value.push(c);
        }
        value.truncate(value.trim_end_matches(is_ows).len());
        Ok(value)
    }
}

impl XfccElement {
    /// Records one pair. Unknown keys are ignored. `By`, `URI` and `DNS` repeat, and an empty
    /// one is skipped (Envoy writes `URI=` for a certificate without a URI SAN); any other
    /// known key may appear once.
    fn set(&mut self, element: usize, key: &str, value: String) -> Result<(), XfccError> {
        let once = |slot: &mut Option<String>, name: &'static str, value: String| {
            if slot.is_some() {
                return Err(XfccError::DuplicateKey { element, key: name });
            }
            *slot = Some(value);
            Ok(())
        };
        let push = |list: &mut Vec<String>, value: String| {
            if !value.is_empty() {
                list.push(value);
            }
        };
        match key.to_ascii_lowercase().as_str() {
            "by" => push(&mut self.by, value),
            "uri" => push(&mut self.uri, value),
            "dns" => push(&mut self.dns, value),
            "cert" => once(&mut self.cert, "Cert", value)?,
            "chain" => once(&mut self.chain, "Chain", value)?,
            "subject" => once(&mut self.subject, "Subject", value)?,
            "hash" => {
                if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(XfccError::InvalidHash {
                        element,
                        value: excerpt(&value),
                    });
                }
                once(&mut self.hash, "Hash", value.to_ascii_lowercase())?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256("abc"), FIPS 180-2 appendix B.1.
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_elements() {
        let full = XfccElement {
            by: strings(&["spiffe://example.org/edge"]),
            hash: Some(ABC_SHA256.into()),
            cert: Some(
                "-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A".into(),
            ),
            chain: Some(
                "-----BEGIN%20CERTIFICATE-----%0AMIIC%0A-----END%20CERTIFICATE-----%0A".into(),
            ),
            subject: Some("CN=client,O=Example".into()),
            uri: strings(&["spiffe://example.org/client"]),
            dns: strings(&["client.example.org"]),
        };
        let cases: Vec<(&str, &str, Vec<XfccElement>)> = vec![
            ("empty header", "", vec![]),
            ("whitespace header", " \t ", vec![]),
            (
                "all keys",
                "By=spiffe://example.org/edge;Hash=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad;\
                 Cert=\"-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A\";\
                 Chain=\"-----BEGIN%20CERTIFICATE-----%0AMIIC%0A-----END%20CERTIFICATE-----%0A\";\
                 Subject=\"CN=client,O=Example\";URI=spiffe://example.org/client;DNS=client.example.org",
                vec![full.clone()],
            ),
            (
                "case-insensitive keys, upper-case hash lower-cased",
                "by=spiffe://example.org/edge;HASH=BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD;\
                 cErT=\"-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A\";\
                 CHAIN=\"-----BEGIN%20CERTIFICATE-----%0AMIIC%0A-----END%20CERTIFICATE-----%0A\";\
                 subject=\"CN=client,O=Example\";uri=spiffe://example.org/client;Dns=client.example.org",
                vec![full.clone()],
            ),
            (
                "quotes, escapes and separators inside quotes",
                r#"Subject="CN=a \"quoted\" name; O=x, OU=y\\z";URI="spiffe://td/a;b,c""#,
                vec![XfccElement {
                    subject: Some(r#"CN=a "quoted" name; O=x, OU=y\z"#.into()),
                    uri: strings(&["spiffe://td/a;b,c"]),
                    ..Default::default()
                }],
            ),
            (
                "other backslashes kept (RFC 2253 subject)",
                r#"Subject="CN=a\,b""#,
                vec![XfccElement {
                    subject: Some(r"CN=a\,b".into()),
                    ..Default::default()
                }],
            ),
            (
                "repeated URI, DNS and By; empty ones skipped",
                "By=spiffe://e/1;By=spiffe://e/2;URI=;URI=spiffe://t/a;uri=spiffe://t/b;\
                 DNS=a.example;DNS=\"\";dns=b.example",
                vec![XfccElement {
                    by: strings(&["spiffe://e/1", "spiffe://e/2"]),
                    uri: strings(&["spiffe://t/a", "spiffe://t/b"]),
                    dns: strings(&["a.example", "b.example"]),
                    ..Default::default()
                }],
            ),
            (
                "unknown keys ignored, even repeated",
                "X-Foo=1;URI=spiffe://t/a;x-foo=\"2\"",
                vec![XfccElement {
                    uri: strings(&["spiffe://t/a"]),
                    ..Default::default()
                }],
            ),
            (
                "several hops, whitespace around tokens",
                "URI=spiffe://t/first , By=spiffe://e/mid; URI = \"spiffe://t/second\" ,\tURI=spiffe://t/last",
                vec![
                    XfccElement {
                        uri: strings(&["spiffe://t/first"]),
                        ..Default::default()
                    },
                    XfccElement {
                        by: strings(&["spiffe://e/mid"]),
                        uri: strings(&["spiffe://t/second"]),
                        ..Default::default()
                    },
                    XfccElement {
                        uri: strings(&["spiffe://t/last"]),
                        ..Default::default()
                    },
                ],
            ),
            (
                "empty subject kept",
                "Subject=\"\"",
                vec![XfccElement {
                    subject: Some(String::new()),
                    ..Default::default()
                }],
            ),
            (
                "non-ascii values",
                "Subject=\"CN=Zoë,O=Ünï\";DNS=xn--zo-1ia.example",
                vec![XfccElement {
                    subject: Some("CN=Zoë,O=Ünï".into()),
                    dns: strings(&["xn--zo-1ia.example"]),
                    ..Default::default()
                }],
            ),
        ];
        for (name, header, expected) in cases {
            assert_eq!(parse(header), Ok(expected), "{name}");
        }
    }

    #[test]
    fn nearest_is_last() {
        let header = "URI=spiffe://t/client,By=spiffe://t/edge;URI=spiffe://t/inner";
        let last = XfccElement {
            by: strings(&["spiffe://t/edge"]),
            uri: strings(&["spiffe://t/inner"]),
            ..Default::default()
        };
        assert_eq!(nearest(header), Ok(Some(last)));
        assert_eq!(nearest(""), Ok(None));
        assert_eq!(
            nearest("URI=a,"),
            Err(XfccError::EmptyElement { element: 2 })
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        use XfccError as E;
        let two_hashes = format!("Hash={ABC_SHA256};hash={ABC_SHA256}");
        let bad_digit = format!("Hash={}", ABC_SHA256.replace('a', "g"));
        let too_long = format!("Hash={ABC_SHA256}0");
        let dup = |element, key| E::DuplicateKey { element, key };
        let unterminated = |element, key: &str| E::UnterminatedQuote {
            element,
            key: key.into(),
        };
        let no_equals = |element, pair: &str| E::MissingEquals {
            element,
            pair: pair.into(),
        };
        let bad_key = |element, key: &str| E::InvalidKey {
            element,
            key: key.into(),
        };
        let misplaced = |element, key: &str| E::MisplacedQuote {
            element,
            key: key.into(),
        };
        let bad_hash = |element, value: &str| E::InvalidHash {
            element,
            value: value.into(),
        };
        let empty = |element| E::EmptyElement { element };
        let cut = |s: &str| format!("{}…", &s[..EXCERPT_CHARS]);
        let cases: Vec<(&str, XfccError)> = vec![
            ("Cert=a;Cert=b", dup(1, "Cert")),
            ("URI=x,Chain=a;chain=\"b\"", dup(2, "Chain")),
            ("Subject=a;SUBJECT=a", dup(1, "Subject")),
            (&two_hashes, dup(1, "Hash")),
            ("Cert=;Cert=x", dup(1, "Cert")),
            ("Subject=\"CN=a", unterminated(1, "Subject")),
            (r#"Subject="CN=a\""#, unterminated(1, "Subject")),
            ("URI=a;Subject=\"a,b;c", unterminated(1, "Subject")),
            ("URI=a,Cert=\"x", unterminated(2, "Cert")),
            ("URI", no_equals(1, "URI")),
            ("URI=a;DNS", no_equals(1, "DNS")),
            ("URI=a;", no_equals(1, "")),
            ("URI=a;;DNS=b", no_equals(1, "")),
            ("URI=a,DNS,x=y", no_equals(2, "DNS")),
            ("=a", E::EmptyKey { element: 1 }),
            ("URI=a; =b", E::EmptyKey { element: 1 }),
            ("U RI=a", bad_key(1, "U RI")),
            ("\"URI\"=a", bad_key(1, "\"URI\"")),
            ("URI=a\"b", misplaced(1, "URI")),
            ("URI=\"a\"b", misplaced(1, "URI")),
            ("URI=\"a\" \"b\"", misplaced(1, "URI")),
            (",URI=a", empty(1)),
            ("URI=a,,URI=b", empty(2)),
            ("URI=a, ", empty(2)),
            ("Hash=", bad_hash(1, "")),
            ("Hash=abc", bad_hash(1, "abc")),
            (&bad_digit, bad_hash(1, &cut(&ABC_SHA256.replace('a', "g")))),
            (&too_long, bad_hash(1, &cut(ABC_SHA256))),
        ];
        for (header, expected) in cases {
            assert_eq!(parse(header), Err(expected), "{header}");
        }
    }

    #[test]
    fn caps() {
        let quoted_cert = |len: usize| format!("Cert=\"{}\"", "A".repeat(len - 7));
        assert_eq!(quoted_cert(MAX_HEADER_BYTES).len(), MAX_HEADER_BYTES);
        assert!(parse(&quoted_cert(MAX_HEADER_BYTES)).is_ok());
        // Over the cap is refused before parsing, even when it would not parse.
        let too_large = XfccError::TooLarge {
            max: MAX_HEADER_BYTES,
        };
        assert_eq!(
            parse(&quoted_cert(MAX_HEADER_BYTES + 1)),
            Err(too_large.clone())
        );
        assert_eq!(
            parse(&"\"".repeat(MAX_HEADER_BYTES + 1)),
            Err(too_large.clone())
        );
        assert_eq!(nearest(&quoted_cert(MAX_HEADER_BYTES + 1)), Err(too_large));

        let elements = |n: usize| vec!["URI=spiffe://t/a"; n].join(",");
        assert_eq!(
            parse(&elements(MAX_ELEMENTS)).map(|e| e.len()),
            Ok(MAX_ELEMENTS)
        );
        assert_eq!(
            parse(&elements(MAX_ELEMENTS + 1)),
            Err(XfccError::TooManyElements { max: MAX_ELEMENTS })
        );

        let pairs = |n: usize| vec!["DNS=a.example"; n].join(";");
        assert_eq!(
            parse(&pairs(MAX_PAIRS)).map(|e| e[0].dns.len()),
            Ok(MAX_PAIRS)
        );
        assert_eq!(
            parse(&format!("URI=a,{}", pairs(MAX_PAIRS + 1))),
            Err(XfccError::TooManyPairs {
                element: 2,
                max: MAX_PAIRS
            })
        );
    }

    #[test]
    fn errors_quote_truncated_values_and_never_a_certificate() {
        let body = "MIIBszCCAVmgAwIBAgIUQ".repeat(20);
        let err = parse(&format!("Cert=\"-----BEGIN%20CERTIFICATE-----%0A{body}")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "element 1: value of \"Cert\" has an unterminated quote"
        );
        let long_key = "K".repeat(100);
        let err = parse(&format!("{long_key} x=1")).unwrap_err();
        let message = err.to_string();
        assert_eq!(
            message,
            format!(
                "element 1: key \"{}…\" is not a token",
                "K".repeat(EXCERPT_CHARS)
            )
        );
        let err = parse(&format!("Cert=a;{body}")).unwrap_err();
        assert!(!err.to_string().contains(&body), "{err}");
        assert_eq!(
            err,
            XfccError::MissingEquals {
                element: 1,
                pair: format!("{}…", &body[..EXCERPT_CHARS])
            }
        );
    }

    #[test]
    fn hash_check() {
        let with = |hash: Option<&str>, cert: Option<&str>| XfccElement {
            hash: hash.map(str::to_owned),
            cert: cert.map(str::to_owned),
            ..Default::default()
        };
        let upper = ABC_SHA256.to_ascii_uppercase();
        let other = "0".repeat(64);
        let cases: Vec<(&str, XfccElement, Result<(), XfccError>)> = vec![
            ("match", with(Some(ABC_SHA256), Some("x")), Ok(())),
            ("match, upper case", with(Some(&upper), Some("x")), Ok(())),
            (
                "mismatch",
                with(Some(&other), Some("x")),
                Err(XfccError::HashMismatch),
            ),
            (
                "malformed hash",
                with(Some("zz"), Some("x")),
                Err(XfccError::HashMismatch),
            ),
            (
                "empty hash",
                with(Some(""), Some("x")),
                Err(XfccError::HashMismatch),
            ),
            ("no hash", with(None, Some("x")), Ok(())),
            ("no cert", with(Some(&other), None), Ok(())),
            ("neither", with(None, None), Ok(())),
        ];
        for (name, element, expected) in cases {
            assert_eq!(check_hash(&element, b"abc"), expected, "{name}");
        }
    }

    #[test]
    fn hash_check_against_a_real_certificate() {
        use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;

        let cert = |name: &str| {
            rcgen::generate_simple_self_signed(vec![name.to_owned()])
                .expect("generate a test certificate")
                .cert
        };
        let (client, stranger) = (cert("client.example.org"), cert("stranger.example.org"));
        let hex = |der: &[u8]| -> String {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let header = |hash: &str, pem: &str| {
            format!(
                "By=spiffe://t/edge;Hash={hash};Cert=\"{}\";DNS=client.example.org",
                utf8_percent_encode(pem, NON_ALPHANUMERIC)
            )
        };
        // What the caller does: decode `Cert` with the certificate code's rules, then check.
        let decode = |element: &XfccElement| -> Vec<u8> {
            let pem = percent_decode_str(element.cert.as_deref().unwrap_or_default())
                .decode_utf8()
                .expect("utf-8 PEM");
            CertificateDer::from_pem_slice(pem.as_bytes())
                .expect("one PEM certificate")
                .to_vec()
        };

        let good = nearest(&header(&hex(client.der()), &client.pem()))
            .expect("parses")
            .expect("one element");
        assert_eq!(decode(&good), client.der().to_vec());
        assert_eq!(check_hash(&good, &decode(&good)), Ok(()));

        // A certificate spliced in under another certificate's hash.
        let spliced = nearest(&header(&hex(client.der()), &stranger.pem()))
            .expect("parses")
            .expect("one element");
        assert_eq!(
            check_hash(&spliced, &decode(&spliced)),
            Err(XfccError::HashMismatch)
        );
    }
}
