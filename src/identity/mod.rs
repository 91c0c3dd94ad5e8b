//! Identity: the peer certificate and the bearer token of one request, each verified
//! independently and then tied together (RFC 8705 binding). Pure: request facts, trust
//! material and `now` in; an [`Identity`] whose every absence carries its reason out.

pub mod cert;
pub mod jwt;
pub mod keys;
pub mod revocation;
mod slot;
pub mod xfcc;

use crate::facts::RequestFacts;
pub use cert::{CertRejection, PeerIdentity, PeerVerifier};
pub use jwt::{TokenClaims, TokenRejection, TokenVerifier};
pub(crate) use slot::FormSlot;
use rustls_pki_types::UnixTime;
use std::time::{Duration, SystemTime};

/// What became of the client certificate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerOutcome {
    /// No certificate came with the request.
    NotPresented,
    /// The certificate verified.
    Verified(std::sync::Arc<PeerIdentity>),
    /// The certificate was presented and failed verification.
    Rejected(CertRejection),
    /// A certificate was presented but no trust bundle is configured to verify it.
    NotConfigured,
}

/// What became of the bearer token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TokenOutcome {
    /// No token came with the request.
    NotPresented,
    /// The token verified.
    Verified(TokenClaims),
    /// The token was presented and failed verification.
    Rejected(TokenRejection),
}

/// Both outcomes of one request.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Identity {
    /// What became of the client certificate.
    pub peer: PeerOutcome,
    /// What became of the bearer token.
    pub token: TokenOutcome,
}

impl Identity {
    /// The verified certificate, if one verified.
    pub fn peer(&self) -> Option<&PeerIdentity> {
        match &self.peer {
            PeerOutcome::Verified(p) => Some(p.as_ref()),
            _ => None,
        }
    }
    /// The verified token, if one verified.
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

/// Where a token may be found besides `Authorization: Bearer`.
#[derive(Debug, Clone, Default)]
pub struct TokenSources {
    /// A header carrying the token, raw or with a `Bearer ` prefix.
    pub header: Option<String>,
    /// A cookie carrying the token.
    pub cookie: Option<String>,
    /// `Authorization` schemes other than Bearer that may pass through unverified (lower
    /// case); any other scheme fails the request.
    pub pass_schemes: Vec<String>,
}

/// The bearer credential found in the request headers.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    None,
    Token(&'a str),
    /// A credential that cannot be verified: malformed, in an unknown scheme, repeated
    /// with different values, or two different tokens in two places. The reason says which.
    Malformed(String),
}

/// token68 characters only (RFC 9110 §11.2); anything else, such as two joined headers,
/// is malformed rather than silently truncated.
fn token68(token: &str) -> Result<&str, String> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if token.is_empty() || !token.bytes().all(ok) {
        Err("empty or invalid bearer value".into())
    } else {
        Ok(token)
    }
}

/// An `Authorization` value split into its scheme and the rest (RFC 9110 §11.4).
///
/// SECURITY: the scheme ends at the first character that cannot be part of it, whatever
/// that character is: `Bearer<TAB>token` or `Bearer<NBSP>token` is a bearer credential (to
/// verify or to refuse as malformed), never an unknown scheme.
fn scheme_of(value: &str) -> (&str, &str) {
    let blank = |c: char| c == ' ' || c == '\t';
    let value = value.trim_matches(blank);
    // RFC 9110 §5.6.2 token characters.
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let end = value.find(|c: char| !tchar(c)).unwrap_or(value.len());
    let (scheme, rest) = value.split_at(end);
    (scheme, rest.trim_start_matches(blank))
}

/// The token of an `Authorization` value: `Ok(None)` for an empty value or a scheme the
/// operator lets pass (`[token] pass_schemes`), the token for `Bearer`, and an error for
/// anything else. SECURITY: `Basic x,Bearer <jwt>` (two headers joined), `DPoP <jwt>` or
/// `Negotiate <jwt>` carry a credential Portcullis cannot verify; dropping it would decide
/// on the certificate alone, or as anonymous, while the upstream may still honour it.
fn from_authorization<'a>(value: &'a str, pass: &[String]) -> Result<Option<&'a str>, String> {
    let (scheme, rest) = scheme_of(value);
    if scheme.is_empty() && rest.is_empty() {
        return Ok(None);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return token68(rest).map(Some);
    }
    let shown: String = scheme.chars().take(32).collect();
    if !scheme.is_empty() && pass.iter().any(|p| p.eq_ignore_ascii_case(scheme)) {
        // One credential of that scheme, nothing joined to it.
        return match token68(rest) {
            Ok(_) => Ok(None),
            Err(_) => Err(format!("authorization \"{shown}\" credential is malformed")),
        };
    }
    Err(format!(
        "authorization scheme \"{shown}\" is not accepted (only Bearer)"
    ))
}

/// Every value of the cookie `name` in the request's `Cookie` headers. Names are compared
/// without surrounding blanks and without regard to case: `session =x` or `SESSION=x` is
/// the same credential to some servers, so it is read here too.
fn cookie_values<'a>(facts: &'a RequestFacts, name: &str) -> Vec<&'a str> {
    facts
        .copies("cookie")
        .into_iter()
        // RFC 6265 §4.2.1: `name=value` pairs separated by `; ` (joined copies by `,`).
        .flat_map(|header| header.split([';', ',']))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().trim_matches('"'))
        })
        .collect()
}

/// The token of a request, from every place it may be: `Authorization`, the configured
/// header and the configured cookie.
///
/// SECURITY: each place is read, not only the first one that has something. Every
/// credential found must be the same token, each header must arrive once (or as identical
/// copies), and a credential that cannot be read fails the request: a token is never
/// chosen among several, and never dropped in favour of the certificate alone.
pub fn bearer_from_headers<'a>(facts: &'a RequestFacts, sources: &TokenSources) -> Bearer<'a> {
    match collect_bearer(facts, sources) {
        Ok(Some(token)) => Bearer::Token(token),
        Ok(None) => Bearer::None,
        Err(why) => Bearer::Malformed(why),
    }
}

fn collect_bearer<'a>(
    facts: &'a RequestFacts,
    sources: &TokenSources,
) -> Result<Option<&'a str>, String> {
    let repeated =
        |name: &str| format!("header \"{name}\" arrived more than once with different values");
    let mut found: Vec<&'a str> = Vec::new();
    if let Some(value) = facts
        .single("authorization")
        .map_err(|_| repeated("authorization"))?
    {
        found.extend(from_authorization(value, &sources.pass_schemes)?);
    }
    if let Some(header) = &sources.header
        && let Some(value) = facts.single(header).map_err(|_| repeated(header))?
        && !value.trim().is_empty()
    {
        let (scheme, rest) = scheme_of(value);
        let token = if scheme.eq_ignore_ascii_case("bearer") {
            rest
        } else {
            value.trim()
        };
        found.push(token68(token)?);
    }
    if let Some(name) = &sources.cookie {
        for value in cookie_values(facts, name) {
            found.push(token68(value).map_err(|_| format!("cookie \"{name}\" is not a token"))?);
        }
    }
    match found.split_first() {
        None => Ok(None),
        Some((first, rest)) if rest.iter().all(|t| t == first) => Ok(Some(first)),
        Some(_) => Err("more than one different token presented".into()),
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

    #[cfg(any(test, feature = "testing"))]
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
        // SECURITY: a certificate header that arrived twice with different values is
        // refused, never joined or picked from (a client's copy beside the proxy's).
        let single = |name: &str| {
            facts.single(name).map_err(|_| {
                CertRejection::Invalid(format!(
                    "header \"{name}\" arrived more than once with different values"
                ))
            })
        };
        let header = match &self.certs.header {
            Some(name) => single(name).map(|v| v.filter(|v| !v.is_empty())),
            None => Ok(None),
        };
        let presented = match header {
            Ok(h) => Ok(facts.peer_certificate.as_deref().or(h)),
            Err(e) => Err(e),
        };
        let now_unix = UnixTime::since_unix_epoch(since_epoch);
        // Last, and only when trusted: the nearest hop's element of x-forwarded-client-cert.
        let xfcc = match &presented {
            Ok(None) if self.certs.xfcc == crate::config::XfccMode::Nearest => {
                single("x-forwarded-client-cert")
            }
            _ => Ok(None),
        };
        match (presented, xfcc, peer_verifier) {
            (Err(e), _, _) | (_, Err(e), _) => PeerOutcome::Rejected(e),
            (Ok(None), Ok(None), _) => PeerOutcome::NotPresented,
            (_, _, None) => PeerOutcome::NotConfigured,
            (Ok(Some(pem)), _, Some(v)) => match v.verify_url_encoded_pem(pem, now_unix) {
                Ok(id) => PeerOutcome::Verified(id),
                Err(e) => PeerOutcome::Rejected(e),
            },
            (Ok(None), Ok(Some(header)), Some(v)) => match xfcc::nearest(header) {
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
            Bearer::Malformed(why) => TokenOutcome::Rejected(TokenRejection::Unusable(why)),
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
    use proptest::prelude::*;

    fn facts_with(headers: &[(&str, &str)]) -> RequestFacts {
        let mut f = RequestFacts::default();
        for (k, v) in headers {
            match f.headers.get_mut(*k) {
                Some(joined) => {
                    let copies = f
                        .repeated
                        .entry(k.to_string())
                        .or_insert_with(|| vec![joined.clone()]);
                    copies.push(v.to_string());
                    joined.push(',');
                    joined.push_str(v);
                }
                None => {
                    f.headers.insert(k.to_string(), v.to_string());
                }
            }
        }
        f
    }

    fn malformed(b: &Bearer<'_>) -> bool {
        matches!(b, Bearer::Malformed(_))
    }

    #[test]
    fn bearer_extraction() {
        let t = |s: &'static str| Some(s);
        let cases: &[(&str, Option<Option<&str>>)] = &[
            // (header, Some(Some(token)) = token, Some(None) = nothing, None = refused)
            ("Bearer abc.def.ghi", Some(t("abc.def.ghi"))),
            ("bearer abc.def.ghi", Some(t("abc.def.ghi"))),
            ("BEARER   abc.def.ghi", Some(t("abc.def.ghi"))),
            ("Bearer\tabc.def.ghi", Some(t("abc.def.ghi"))),
            ("", Some(None)),
            ("   ", Some(None)),
            ("Bearer", None),
            ("Bearer a.b.c,Bearer d.e.f", None),
            ("Bearer a b", None),
            ("Bearer\u{b}abc.def.ghi", None),
            ("Bearer\u{a0}abc.def.ghi", None),
            ("Bearer,abc.def.ghi", None),
            // Another scheme is a credential that cannot be verified: refused, not ignored.
            ("Basic dXNlcjpwYXNz", None),
            ("Basic dXNlcjpwYXNz,Bearer a.b.c", None),
            ("DPoP a.b.c", None),
            ("Negotiate a.b.c", None),
            ("Bearerabc.def.ghi", None),
            (",Bearer a.b.c", None),
        ];
        let none = TokenSources::default();
        for (header, expected) in cases {
            let f = facts_with(&[("authorization", header)]);
            let got = bearer_from_headers(&f, &none);
            match expected {
                Some(Some(token)) => assert_eq!(got, Bearer::Token(token), "{header:?}"),
                Some(None) => assert_eq!(got, Bearer::None, "{header:?}"),
                None => assert!(malformed(&got), "{header:?} gave {got:?}"),
            }
        }
        assert_eq!(
            bearer_from_headers(&RequestFacts::default(), &none),
            Bearer::None
        );
    }

    #[test]
    fn pass_schemes_let_one_credential_of_their_scheme_through() {
        let basic = TokenSources {
            pass_schemes: vec!["basic".into()],
            ..TokenSources::default()
        };
        let f = facts_with(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(bearer_from_headers(&f, &basic), Bearer::None);
        for joined in ["Basic dXNlcjpwYXNz,Bearer a.b.c", "Basic a b", "Digest x"] {
            let f = facts_with(&[("authorization", joined)]);
            assert!(malformed(&bearer_from_headers(&f, &basic)), "{joined}");
        }
    }

    #[test]
    fn every_place_is_read_and_must_agree() {
        let sources = TokenSources {
            header: Some("x-token".into()),
            cookie: Some("session".into()),
            pass_schemes: Vec::new(),
        };
        fn token<'a>(f: &'a RequestFacts, sources: &TokenSources) -> Bearer<'a> {
            bearer_from_headers(f, sources)
        }
        let f = facts_with(&[("cookie", "theme=dark; session=c.c.c")]);
        assert_eq!(token(&f, &sources), Bearer::Token("c.c.c"));
        assert_eq!(
            bearer_from_headers(&f, &TokenSources::default()),
            Bearer::None
        );
        // The same token in two places is one token.
        let f = facts_with(&[
            ("authorization", "Bearer c.c.c"),
            ("cookie", "session=c.c.c"),
        ]);
        assert_eq!(token(&f, &sources), Bearer::Token("c.c.c"));
        for refused in [
            vec![
                ("authorization", "Bearer a.a.a"),
                ("cookie", "session=c.c.c"),
            ],
            vec![("x-token", "h.h.h"), ("cookie", "session=c.c.c")],
            vec![("authorization", "Bearer a.a.a"), ("x-token", "h.h.h")],
            // A look-alike cookie name is the credential too.
            vec![("cookie", "session=c.c.c; session =d.d.d")],
            vec![("cookie", "SESSION=d.d.d; session=c.c.c")],
            vec![("cookie", "session=c.c.c"), ("cookie", "session=d.d.d")],
            vec![("cookie", "session=not a token")],
            // A repeated header with different copies.
            vec![
                ("authorization", "Bearer a.a.a"),
                ("authorization", "Bearer b.b.b"),
            ],
            vec![("x-token", "h.h.h"), ("x-token", "i.i.i")],
            // Another scheme is not a place the token is absent from.
            vec![("authorization", "Basic x"), ("x-token", "h.h.h")],
        ] {
            let f = facts_with(&refused);
            assert!(
                malformed(&token(&f, &sources)),
                "{refused:?} gave {:?}",
                token(&f, &sources)
            );
        }
        // Identical copies of a header are one header.
        let f = facts_with(&[
            ("authorization", "Bearer a.a.a"),
            ("authorization", "Bearer a.a.a"),
        ]);
        assert_eq!(token(&f, &sources), Bearer::Token("a.a.a"));
        let f = facts_with(&[("cookie", "session =c.c.c")]);
        assert_eq!(token(&f, &sources), Bearer::Token("c.c.c"));
    }

    /// A credential-looking value in a random place and form.
    fn credential() -> impl Strategy<Value = (String, String)> {
        let token = prop::sample::select(vec!["a.a.a", "b.b.b"]);
        let scheme = prop::sample::select(vec![
            "Bearer",
            "bearer",
            "Basic",
            "DPoP",
            "Negotiate",
            "Token",
            "",
        ]);
        let place = prop::sample::select(vec!["authorization", "x-token", "cookie"]);
        let sep = prop::sample::select(vec![" ", "\t", ",", ""]);
        let cookie_name = prop::sample::select(vec!["session", "session ", "SESSION", "other"]);
        (token, scheme, place, sep, cookie_name).prop_map(|(token, scheme, place, sep, cname)| {
            let value = match place {
                "cookie" => format!("{cname}={token}"),
                _ => format!("{scheme}{sep}{token}"),
            };
            (place.to_string(), value)
        })
    }

    proptest! {
        /// Over random credentials in random places, orders and multiplicities: a token is
        /// accepted only when every credential found is that same token in an accepted
        /// form; anything else that looks like a credential is refused, never dropped.
        #[test]
        fn a_presented_credential_is_read_or_refused(
            creds in prop::collection::vec(credential(), 0..4)
        ) {
            let sources = TokenSources {
                header: Some("x-token".into()),
                cookie: Some("session".into()),
                pass_schemes: Vec::new(),
            };
            let pairs: Vec<(&str, &str)> =
                creds.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let f = facts_with(&pairs);
            // The model: what each credential says, independently of the implementation.
            let mut tokens = std::collections::BTreeSet::new();
            let mut refused = false;
            let copies = |name: &str| creds.iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect::<Vec<_>>();
            for name in ["authorization", "x-token"] {
                let c = copies(name);
                if c.iter().any(|v| *v != c[0]) {
                    refused = true;
                }
            }
            for (place, value) in &creds {
                let (scheme, token) = match value.split_once([' ', '\t', ',']) {
                    Some((s, t)) => (s, t),
                    None => ("", value.as_str()),
                };
                let sep_ok = !value.contains(',');
                match place.as_str() {
                    "authorization" => {
                        if scheme.eq_ignore_ascii_case("bearer") && sep_ok {
                            tokens.insert(token.to_string());
                        } else {
                            refused = true;
                        }
                    }
                    "x-token" => {
                        if (scheme.is_empty() || scheme.eq_ignore_ascii_case("bearer")) && sep_ok {
                            tokens.insert(token.to_string());
                        } else {
                            refused = true;
                        }
                    }
                    _ => {
                        let (name, token) = value.split_once('=').unwrap_or_default();
                        if name.trim().eq_ignore_ascii_case("session") {
                            tokens.insert(token.to_string());
                        }
                    }
                }
            }
            let got = bearer_from_headers(&f, &sources);
            match got {
                Bearer::Token(t) => {
                    prop_assert!(!refused, "accepted {t} from {creds:?}");
                    prop_assert_eq!(tokens.len(), 1);
                    prop_assert!(tokens.contains(t));
                }
                Bearer::None => prop_assert!(!refused && tokens.is_empty(), "dropped {:?}", creds),
                Bearer::Malformed(_) => prop_assert!(refused || tokens.len() > 1, "refused {:?}", creds),
            }
        }
    }
}
