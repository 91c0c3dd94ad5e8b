//! Identity: the peer certificate and the bearer token of one request, each verified
//! independently and then tied together (RFC 8705 binding). Pure: request facts, trust
//! material and `now` in; an [`Identity`] whose every absence carries its reason out.

pub mod cert;
pub mod jwt;
pub mod keys;
pub mod revocation;
pub mod spiffe;
pub mod xfcc;

use crate::facts::RequestFacts;
pub use cert::{CertRejection, PeerIdentity, PeerVerifier};
pub use jwt::{TokenClaims, TokenRejection, TokenVerifier};
use rustls_pki_types::UnixTime;
use std::time::{Duration, SystemTime};

/// What became of the client certificate.
#[derive(Debug, Clone)]
pub enum PeerOutcome {
    NotPresented,
    Verified(std::sync::Arc<PeerIdentity>),
    Rejected(CertRejection),
    /// A certificate was presented but no trust bundle is configured to verify it.
    NotConfigured,
}

/// What became of the bearer token.
#[derive(Debug, Clone)]
pub enum TokenOutcome {
    NotPresented,
    Verified(TokenClaims),
    Rejected(TokenRejection),
}

/// Both outcomes of one request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub peer: PeerOutcome,
    pub token: TokenOutcome,
}

impl Identity {
    pub fn peer(&self) -> Option<&PeerIdentity> {
        match &self.peer {
            PeerOutcome::Verified(p) => Some(p.as_ref()),
            _ => None,
        }
    }
    pub fn token(&self) -> Option<&TokenClaims> {
        match &self.token {
            TokenOutcome::Verified(t) => Some(t),
            _ => None,
        }
    }
}

/// Verifies both credentials of a request.
#[derive(Debug)]
pub struct Verifier {
    tokens: TokenVerifier,
    sources: TokenSources,
    certs: CertSources,
}

/// Where a client certificate may be found besides Envoy's `source.certificate`, in order.
#[derive(Debug, Clone)]
pub struct CertSources {
    /// A header the proxy always sets to the URL-encoded PEM (nginx `$ssl_client_escaped_cert`).
    pub header: Option<String>,
    /// Whether `x-forwarded-client-cert` is trusted.
    pub xfcc: crate::config::XfccMode,
}

impl Default for CertSources {
    fn default() -> Self {
        CertSources {
            header: None,
            xfcc: crate::config::XfccMode::Off,
        }
    }
}

/// Where a token may be found besides `Authorization: Bearer`, in order.
#[derive(Debug, Clone, Default)]
pub struct TokenSources {
    /// A header carrying the token, raw or with a `Bearer ` prefix.
    pub header: Option<String>,
    /// A cookie carrying the token.
    pub cookie: Option<String>,
}

/// The bearer credential found in the request headers.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    None,
    Token(&'a str),
    /// An `Authorization: Bearer` header without a usable token.
    Malformed,
}

/// token68 characters only (RFC 9110 §11.2); anything else, such as two joined headers,
/// is malformed rather than silently truncated.
fn token68(token: &str) -> Bearer<'_> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if token.is_empty() || !token.bytes().all(ok) {
        Bearer::Malformed
    } else {
        Bearer::Token(token)
    }
}

/// `Bearer <token>`, scheme case-insensitive (RFC 6750 §2.1, RFC 9110 §11.1); `None` for
/// another scheme.
///
/// SECURITY: the scheme ends at the first character that cannot be part of it, whatever
/// that character is: `Bearer<TAB>token` or `Bearer<NBSP>token` is a bearer credential (to
/// verify or to refuse as malformed), never an unknown scheme ignored in favour of the
/// certificate alone.
fn bearer_scheme(value: &str) -> Option<&str> {
    let blank = |c: char| c == ' ' || c == '\t';
    let value = value.trim_matches(blank);
    // RFC 9110 §5.6.2 token characters.
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let end = value.find(|c: char| !tchar(c)).unwrap_or(value.len());
    let (scheme, rest) = value.split_at(end);
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(blank))
}

/// The token of a request: `Authorization: Bearer`, else the configured header, else the
/// configured cookie. Other `Authorization` schemes are not bearer credentials.
pub fn bearer_from_headers<'a>(facts: &'a RequestFacts, sources: &TokenSources) -> Bearer<'a> {
    if let Some(token) = facts
        .headers
        .get("authorization")
        .and_then(|v| bearer_scheme(v))
    {
        return token68(token);
    }
    if let Some(value) = sources.header.as_ref().and_then(|h| facts.headers.get(h)) {
        return token68(bearer_scheme(value).unwrap_or(value.trim()));
    }
    let cookie = sources.cookie.as_deref().and_then(|name| {
        // RFC 6265 §4.2.1: `name=value` pairs separated by `; ` (Envoy joins headers with `,`).
        facts
            .headers
            .get("cookie")?
            .split([';', ','])
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"'))
            })
    });
    match cookie {
        Some(token) => token68(token),
        None => Bearer::None,
    }
}

impl Verifier {
    pub fn new(tokens: TokenVerifier, sources: TokenSources, certs: CertSources) -> Verifier {
        Verifier {
            tokens,
            sources,
            certs,
        }
    }

    pub fn tokens(&self) -> &TokenVerifier {
        &self.tokens
    }

    /// Verifies the request's certificate with `peer` (the current trust material, if a
    /// `[peer]` is configured), then its token (which may be bound to it).
    pub fn verify(
        &self,
        peer_verifier: Option<&PeerVerifier>,
        facts: &RequestFacts,
        now: SystemTime,
    ) -> Identity {
        let peer = self.verify_peer(peer_verifier, facts, now);
        let token = self.verify_token(facts, &peer, now);
        Identity { peer, token }
    }

    /// The certificate stage of [`Verifier::verify`]: the request's certificate verified
    /// with `peer_verifier`.
    pub fn verify_peer(
        &self,
        peer_verifier: Option<&PeerVerifier>,
        facts: &RequestFacts,
        now: SystemTime,
    ) -> PeerOutcome {
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        // Sources in order: Envoy's own field, the configured header (the proxy sets it,
        // empty when there is no certificate).
        let presented = facts.peer_certificate.as_deref().or_else(|| {
            let header = self.certs.header.as_ref()?;
            facts
                .headers
                .get(header)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        });
        let now_unix = UnixTime::since_unix_epoch(since_epoch);
        // Last, and only when trusted: the nearest hop's element of x-forwarded-client-cert.
        let xfcc = (presented.is_none() && self.certs.xfcc == crate::config::XfccMode::Nearest)
            .then(|| facts.headers.get("x-forwarded-client-cert"))
            .flatten();
        match (presented, xfcc, peer_verifier) {
            (None, None, _) => PeerOutcome::NotPresented,
            (_, _, None) => PeerOutcome::NotConfigured,
            (Some(pem), _, Some(v)) => match v.verify_url_encoded_pem(pem, now_unix) {
                Ok(id) => PeerOutcome::Verified(id),
                Err(e) => PeerOutcome::Rejected(e),
            },
            (None, Some(header), Some(v)) => match xfcc::nearest(header) {
                Err(e) => PeerOutcome::Rejected(CertRejection::Xfcc(e.to_string())),
                Ok(None) => PeerOutcome::NotPresented,
                Ok(Some(element)) => match v.verify_xfcc(&element, now_unix) {
                    Ok(Some(id)) => PeerOutcome::Verified(id),
                    Ok(None) => PeerOutcome::NotPresented,
                    Err(e) => PeerOutcome::Rejected(e),
                },
            },
        }
    }

    /// The token stage of [`Verifier::verify`]: the request's token, verified after `peer`
    /// (the token may be bound to the certificate).
    pub fn verify_token(
        &self,
        facts: &RequestFacts,
        peer: &PeerOutcome,
        now: SystemTime,
    ) -> TokenOutcome {
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let verified_peer = match peer {
            PeerOutcome::Verified(p) => Some(p.as_ref()),
            _ => None,
        };
        match bearer_from_headers(facts, &self.sources) {
            Bearer::None => TokenOutcome::NotPresented,
            Bearer::Malformed => TokenOutcome::Rejected(TokenRejection::Malformed(
                "empty or invalid bearer value".into(),
            )),
            Bearer::Token(t) => {
                match self
                    .tokens
                    .verify(t, verified_peer, since_epoch.as_secs() as i64)
                {
                    Ok(c) => TokenOutcome::Verified(c),
                    Err(e) => TokenOutcome::Rejected(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts_with_auth(v: &str) -> RequestFacts {
        let mut f = RequestFacts::default();
        f.headers.insert("authorization".into(), v.into());
        f
    }

    #[test]
    fn bearer_extraction() {
        let cases: &[(&str, Bearer<'_>)] = &[
            ("Bearer abc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("bearer abc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("BEARER   abc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("Bearer", Bearer::Malformed),
            ("Bearer a.b.c,Bearer d.e.f", Bearer::Malformed),
            ("Bearer a b", Bearer::Malformed),
            ("Basic dXNlcjpwYXNz", Bearer::None),
            ("Bearer\tabc.def.ghi", Bearer::Token("abc.def.ghi")),
            ("Bearer\u{b}abc.def.ghi", Bearer::Malformed),
            ("Bearer\u{a0}abc.def.ghi", Bearer::Malformed),
            ("Bearer,abc.def.ghi", Bearer::Malformed),
            ("Bearerabc.def.ghi", Bearer::None),
        ];
        let none = TokenSources::default();
        for (header, expected) in cases {
            let f = facts_with_auth(header);
            assert_eq!(&bearer_from_headers(&f, &none), expected, "{header}");
        }
        assert_eq!(
            bearer_from_headers(&RequestFacts::default(), &none),
            Bearer::None
        );
    }

    #[test]
    fn other_token_sources_in_order() {
        let sources = TokenSources {
            header: Some("x-token".into()),
            cookie: Some("session".into()),
        };
        let mut f = RequestFacts::default();
        f.headers
            .insert("cookie".into(), "theme=dark; session=c.c.c".into());
        assert_eq!(bearer_from_headers(&f, &sources), Bearer::Token("c.c.c"));
        assert_eq!(
            bearer_from_headers(&f, &TokenSources::default()),
            Bearer::None
        );
        f.headers.insert("x-token".into(), "h.h.h".into());
        assert_eq!(bearer_from_headers(&f, &sources), Bearer::Token("h.h.h"));
        f.headers
            .insert("authorization".into(), "Bearer a.a.a".into());
        assert_eq!(bearer_from_headers(&f, &sources), Bearer::Token("a.a.a"));
        // A non-bearer Authorization does not hide the configured header.
        f.headers.insert("authorization".into(), "Basic x".into());
        assert_eq!(bearer_from_headers(&f, &sources), Bearer::Token("h.h.h"));
    }
}
