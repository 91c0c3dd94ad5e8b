//! Bearer token verification: a compact JWS in, verified [`TokenClaims`] or a typed
//! [`TokenRejection`] out. The token's `iss` is read before verification only to choose
//! the issuer whose keys to try; every claim is checked after the signature, against the
//! issuer's settings and the `now` passed in (RFC 7519, RFC 8725, RFC 9068, RFC 8705).

use super::cert::PeerIdentity;
use super::keys::{KeyCell, KeySet, KeySnapshot, VerificationKey};
use super::revocation::RevocationList;
use crate::config::{IssuerSettings, KeySource, TokenSettings};
use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Why a token was not accepted. Messages never contain the token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenRejection {
    #[error("token is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("token is not a compact JWS: {0}")]
    Malformed(String),
    #[error("token has no \"iss\" claim")]
    MissingIssuer,
    #[error("issuer \"{0}\" is not configured")]
    UnknownIssuer(String),
    #[error("algorithm {0} is not allowed for this issuer")]
    AlgorithmNotAllowed(String),
    #[error("header \"crit\" names extensions this verifier does not understand")]
    UnknownCritical,
    #[error("token type {found:?} is not the expected \"{expected}\"")]
    WrongType {
        expected: String,
        found: Option<String>,
    },
    #[error("issuer \"{issuer}\" has no key with kid \"{kid}\"")]
    UnknownKey { issuer: String, kid: String },
    #[error("keys of issuer \"{0}\" have not been fetched yet")]
    KeysUnavailable(String),
    #[error("keys of issuer \"{0}\" are older than the maximum staleness (provider unreachable)")]
    KeysStale(String),
    #[error("token has been revoked")]
    Revoked,
    #[error("no key of this issuer fits algorithm {0}")]
    NoKeyForAlgorithm(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("claim \"{0}\" is missing")]
    MissingClaim(String),
    #[error("claim \"{0}\" has the wrong type")]
    InvalidClaim(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("token lifetime exceeds the maximum of {max_secs}s")]
    LifetimeTooLong { max_secs: u64 },
    #[error("token has no \"aud\" claim")]
    MissingAudience,
    #[error("token audience is not accepted by this issuer")]
    WrongAudience,
    #[error(
        "token is bound to a certificate (cnf.x5t#S256) but no verified certificate was presented"
    )]
    BoundWithoutCertificate,
    #[error("token is bound to a different certificate")]
    BindingMismatch,
    #[error("issuer requires certificate-bound tokens and this token is not bound")]
    Unbound,
}

/// Claims of a token whose signature and claims verified. Only the verifier builds one.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    issuer: String,
    subject: String,
    principal_id: String,
    audience: BTreeSet<String>,
    scopes: BTreeSet<String>,
    groups: BTreeSet<String>,
    expires_at: i64,
    bound: bool,
    claims: Map<String, Value>,
}

impl TokenClaims {
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// The subject with the issuer's id prefix: the Cedar `User` id.
    pub fn principal_id(&self) -> &str {
        &self.principal_id
    }
    pub fn audience(&self) -> &BTreeSet<String> {
        &self.audience
    }
    pub fn scopes(&self) -> &BTreeSet<String> {
        &self.scopes
    }
    pub fn groups(&self) -> &BTreeSet<String> {
        &self.groups
    }
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }
    /// True when `cnf.x5t#S256` matched the verified peer certificate.
    pub fn bound(&self) -> bool {
        self.bound
    }
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }
}

impl TokenClaims {
    /// Claims as a policy test case states them, with no token behind them. Only
    /// `portcullis test` builds these: its cases describe identities, not credentials.
    pub(crate) fn for_policy_test(
        issuer: &str,
        subject: &str,
        claims: Map<String, Value>,
        groups_claim: &str,
        bound: bool,
    ) -> TokenClaims {
        let set = |name: &str| claims.get(name).and_then(strings).unwrap_or_default();
        let scopes = match claims.get("scope").or_else(|| claims.get("scp")) {
            Some(Value::String(s)) => s.split_ascii_whitespace().map(str::to_string).collect(),
            Some(v) => strings(v).unwrap_or_default(),
            None => BTreeSet::new(),
        };
        TokenClaims {
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            principal_id: subject.to_string(),
            audience: set("aud"),
            scopes,
            groups: set(groups_claim),
            expires_at: claims
                .get("exp")
                .and_then(Value::as_i64)
                .unwrap_or(i64::MAX),
            bound,
            claims,
        }
    }
}

struct Issuer {
    settings: IssuerSettings,
    keys: KeyCell,
}

/// Verifies bearer tokens for the configured issuers.
pub struct TokenVerifier {
    issuers: HashMap<String, Issuer>,
    max_size: usize,
    revoked: Arc<ArcSwap<RevocationList>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Loads every issuer's key files and the revocation list; all problems are reported
    /// together. Issuers with remote keys start with an empty key cell, filled by the fetcher.
    pub fn load(
        issuers: &[IssuerSettings],
        token: &TokenSettings,
    ) -> Result<TokenVerifier, Vec<String>> {
        let mut problems = Vec::new();
        let mut map = HashMap::new();
        for settings in issuers {
            let cell = KeyCell::default();
            if settings.source == KeySource::Files {
                match KeySet::load(settings.jwks_file.as_deref(), &settings.pem_keys) {
                    Ok(keys) => cell.store(Some(Arc::new(KeySnapshot {
                        keys,
                        usable_until: None,
                    }))),
                    Err(errs) => problems.extend(
                        errs.into_iter()
                            .map(|e| format!("issuer \"{}\": {e}", settings.issuer)),
                    ),
                }
            }
            map.insert(
                settings.issuer.clone(),
                Issuer {
                    settings: settings.clone(),
                    keys: cell,
                },
            );
        }
        let revoked = match &token.revoked {
            None => RevocationList::default(),
            Some(path) => match std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|t| RevocationList::parse(&t))
            {
                Ok(list) => list,
                Err(e) => {
                    problems.push(format!("{}: {e}", path.display()));
                    RevocationList::default()
                }
            },
        };
        if problems.is_empty() {
            Ok(TokenVerifier {
                issuers: map,
                max_size: token.max_size,
                revoked: Arc::new(ArcSwap::from_pointee(revoked)),
            })
        } else {
            Err(problems)
        }
    }

    /// The key cell of an issuer, for the background fetcher to fill.
    pub fn key_cell(&self, issuer: &str) -> Option<KeyCell> {
        self.issuers.get(issuer).map(|i| i.keys.clone())
    }

    /// The revocation list, for the reloader to swap.
    pub fn revocation(&self) -> Arc<ArcSwap<RevocationList>> {
        self.revoked.clone()
    }

    /// Verifies `token` at `now` (seconds since the epoch). `peer` is the verified client
    /// certificate, if any, for RFC 8705 binding.
    pub fn verify(
        &self,
        token: &str,
        peer: Option<&PeerIdentity>,
        now: i64,
    ) -> Result<TokenClaims, TokenRejection> {
        // SECURITY: cap the size before any decoding (RFC 8725 §3.1 spirit: bound the work).
        if token.len() > self.max_size {
            return Err(TokenRejection::TooLarge { max: self.max_size });
        }
        if token.split('.').count() != 3 {
            return Err(TokenRejection::Malformed(
                "expected three dot-separated parts".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenRejection::Malformed(format!("header: {e}")))?;
        // RFC 7515 §4.1.11: a `crit` we do not implement makes the token invalid.
        if header.crit.is_some() {
            return Err(TokenRejection::UnknownCritical);
        }
        // Unverified, used only to pick whose keys to try: RFC 8725 §3.8.
        #[derive(serde::Deserialize)]
        struct IssOnly {
            iss: Option<Value>,
        }
        let unverified: IssOnly = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| TokenRejection::Malformed(format!("payload: {e}")))?;
        let iss = match unverified.iss {
            Some(Value::String(s)) => s,
            Some(_) => return Err(TokenRejection::InvalidClaim("iss".into())),
            None => return Err(TokenRejection::MissingIssuer),
        };
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| TokenRejection::UnknownIssuer(truncate(&iss)))?;
        let s = &issuer.settings;
        let alg = header.alg;
        // SECURITY: the allow-list never holds `none` or HS* (see keys::parse_allowed_algorithm).
        if !s.algorithms.contains(&alg) {
            return Err(TokenRejection::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        if let Some(expected) = &s.typ
            && !typ_matches(expected, header.typ.as_deref())
        {
            return Err(TokenRejection::WrongType {
                expected: expected.clone(),
                found: header.typ.as_deref().map(truncate),
            });
        }
        let snapshot = issuer
            .keys
            .load_full()
            .ok_or_else(|| TokenRejection::KeysUnavailable(s.issuer.clone()))?;
        // SECURITY: keys the provider has not confirmed for `max_staleness` may include
        // keys it has since withdrawn; refuse rather than trust them forever.
        if snapshot.usable_until.is_some_and(|until| now > until) {
            return Err(TokenRejection::KeysStale(s.issuer.clone()));
        }
        let claims = verify_signature(token, alg, header.kid.as_deref(), &snapshot.keys).map_err(
            |e| match e {
                TokenRejection::UnknownKey { kid, .. } => TokenRejection::UnknownKey {
                    issuer: s.issuer.clone(),
                    kid,
                },
                other => other,
            },
        )?;
        let verified = check_claims(s, claims, peer, now)?;
        let revoked = self.revoked.load();
        let jti = verified.claims.get("jti").and_then(Value::as_str);
        if jti.is_some_and(|j| revoked.revokes_jti(j)) || revoked.revokes_subject(&verified.subject)
        {
            return Err(TokenRejection::Revoked);
        }
        Ok(verified)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

/// RFC 9068 §4: `typ` compares case-insensitively and may carry the `application/` prefix.
fn typ_matches(expected: &str, found: Option<&str>) -> bool {
    let norm = |t: &str| {
        let t = t.to_ascii_lowercase();
        t.strip_prefix("application/")
            .map(str::to_string)
            .unwrap_or(t)
    };
    found.is_some_and(|f| norm(f) == norm(expected))
}

fn verify_signature(
    token: &str,
    alg: Algorithm,
    kid: Option<&str>,
    keys: &KeySet,
) -> Result<Map<String, Value>, TokenRejection> {
    let mut validation = Validation::new(alg);
    // Claims are checked below against the `now` passed in, not the library's clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let try_key = |key: &VerificationKey| {
        jsonwebtoken::decode::<Map<String, Value>>(token, key.decoding_key(), &validation)
            .map(|data| data.claims)
    };
    match kid {
        Some(kid) => {
            let key = keys.get(kid).ok_or_else(|| TokenRejection::UnknownKey {
                issuer: String::new(),
                kid: truncate(kid),
            })?;
            // SECURITY: the key's own type and `alg` must agree with the header's `alg`.
            if !key.accepts(alg) {
                return Err(TokenRejection::NoKeyForAlgorithm(format!("{alg:?}")));
            }
            try_key(key).map_err(map_decode_error)
        }
        None => {
            let mut last = TokenRejection::NoKeyForAlgorithm(format!("{alg:?}"));
            for key in keys.without_kid(alg) {
                match try_key(key) {
                    Ok(claims) => return Ok(claims),
                    Err(e) => last = map_decode_error(e),
                }
            }
            Err(last)
        }
    }
}

fn map_decode_error(e: jsonwebtoken::errors::Error) -> TokenRejection {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenRejection::BadSignature,
        K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidToken => {
            TokenRejection::Malformed("cannot decode".into())
        }
        _ => TokenRejection::BadSignature,
    }
}

/// A NumericDate (RFC 7519 §2): a JSON number of seconds, fractions allowed.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, TokenRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .map(Some)
            .ok_or_else(|| TokenRejection::InvalidClaim(name.into())),
    }
}

fn strings(v: &Value) -> Option<BTreeSet<String>> {
    match v {
        Value::String(s) => Some(BTreeSet::from([s.clone()])),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

fn check_claims(
    s: &IssuerSettings,
    claims: Map<String, Value>,
    peer: Option<&PeerIdentity>,
    now: i64,
) -> Result<TokenClaims, TokenRejection> {
    if claims.get("iss").and_then(Value::as_str) != Some(s.issuer.as_str()) {
        return Err(TokenRejection::UnknownIssuer(String::new()));
    }
    let leeway = s.leeway.as_secs() as i64;
    let exp =
        numeric_date(&claims, "exp")?.ok_or_else(|| TokenRejection::MissingClaim("exp".into()))?;
    if now > exp.saturating_add(leeway) {
        return Err(TokenRejection::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")?
        && now.saturating_add(leeway) < nbf
    {
        return Err(TokenRejection::NotYetValid);
    }
    let iat = numeric_date(&claims, "iat")?;
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(TokenRejection::IssuedInFuture);
    }
    // Without `iat`, the remaining lifetime is what a replayer could use.
    let max = s.max_lifetime.as_secs();
    let lifetime = exp.saturating_sub(iat.unwrap_or(now));
    if lifetime > max as i64 {
        return Err(TokenRejection::LifetimeTooLong { max_secs: max });
    }
    // RFC 7519 §4.1.3 with RFC 8725 §3.9: the audience must be one of ours.
    let audience = match claims.get("aud") {
        None | Some(Value::Null) => return Err(TokenRejection::MissingAudience),
        Some(v) => strings(v).ok_or_else(|| TokenRejection::InvalidClaim("aud".into()))?,
    };
    if !s.audiences.iter().any(|a| audience.contains(a)) {
        return Err(TokenRejection::WrongAudience);
    }
    let subject = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        Some(_) => return Err(TokenRejection::InvalidClaim("sub".into())),
        None => return Err(TokenRejection::MissingClaim("sub".into())),
    };
    for name in &s.required_claims {
        if claims.get(name).is_none_or(Value::is_null) {
            return Err(TokenRejection::MissingClaim(truncate(name)));
        }
    }
    // RFC 8705 §3.1: a bound token is only good with the certificate it names.
    let bound = match claims.get("cnf").and_then(|c| c.get("x5t#S256")) {
        Some(Value::String(x5t)) => match peer {
            Some(peer) if peer.thumbprint() == *x5t => true,
            Some(_) => return Err(TokenRejection::BindingMismatch),
            None => return Err(TokenRejection::BoundWithoutCertificate),
        },
        Some(_) => return Err(TokenRejection::InvalidClaim("cnf".into())),
        None if s.require_binding => return Err(TokenRejection::Unbound),
        None => false,
    };
    let scopes = match claims.get("scope").or_else(|| claims.get("scp")) {
        None => BTreeSet::new(),
        Some(Value::String(s)) => s.split_ascii_whitespace().map(str::to_string).collect(),
        Some(v) => strings(v).ok_or_else(|| TokenRejection::InvalidClaim("scope".into()))?,
    };
    let groups = match claims.get(&s.groups_claim) {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(v) => {
            strings(v).ok_or_else(|| TokenRejection::InvalidClaim(truncate(&s.groups_claim)))?
        }
    };
    Ok(TokenClaims {
        issuer: s.issuer.clone(),
        principal_id: format!("{}{}", s.id_prefix, subject),
        subject,
        audience,
        scopes,
        groups,
        expires_at: exp,
        bound,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typ_comparison() {
        assert!(typ_matches("at+jwt", Some("at+JWT")));
        assert!(typ_matches("at+jwt", Some("application/at+jwt")));
        assert!(!typ_matches("at+jwt", Some("JWT")));
        assert!(!typ_matches("at+jwt", None));
    }
}
