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

/// The claims of a token as read once after its signature verified: everything that does
/// not depend on the time or the certificate of the request. Shared by the cache.
#[derive(Debug)]
struct Parsed {
    issuer: String,
    subject: String,
    principal_id: String,
    audience: BTreeSet<String>,
    scopes: BTreeSet<String>,
    groups: BTreeSet<String>,
    expires_at: i64,
    not_before: Option<i64>,
    issued_at: Option<i64>,
    /// RFC 8705 `cnf.x5t#S256`, when the token is bound to a certificate.
    x5t: Option<String>,
    claims: Map<String, Value>,
    /// The token's Cedar form, built by the policy mapping on first use.
    cedar: std::sync::OnceLock<Arc<crate::policy::mapping::TokenForm>>,
}

/// Claims of a token whose signature and claims verified. Only the verifier builds one.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    parsed: Arc<Parsed>,
    bound: bool,
}

impl TokenClaims {
    pub fn issuer(&self) -> &str {
        &self.parsed.issuer
    }
    pub fn subject(&self) -> &str {
        &self.parsed.subject
    }
    /// The subject with the issuer's id prefix: the Cedar `User` id.
    pub fn principal_id(&self) -> &str {
        &self.parsed.principal_id
    }
    pub fn audience(&self) -> &BTreeSet<String> {
        &self.parsed.audience
    }
    pub fn scopes(&self) -> &BTreeSet<String> {
        &self.parsed.scopes
    }
    pub fn groups(&self) -> &BTreeSet<String> {
        &self.parsed.groups
    }
    pub fn expires_at(&self) -> i64 {
        self.parsed.expires_at
    }
    /// True when `cnf.x5t#S256` matched the verified peer certificate.
    pub fn bound(&self) -> bool {
        self.bound
    }
    pub fn claims(&self) -> &Map<String, Value> {
        &self.parsed.claims
    }
    pub(crate) fn cedar_form(
        &self,
    ) -> &std::sync::OnceLock<Arc<crate::policy::mapping::TokenForm>> {
        &self.parsed.cedar
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
            parsed: Arc::new(Parsed {
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
                not_before: None,
                issued_at: None,
                x5t: None,
                claims,
                cedar: std::sync::OnceLock::new(),
            }),
            bound,
        }
    }
}

/// A token whose signature verified with `keys`, remembered by the token's SHA-256. It is
/// only used while `keys` is still the issuer's current key set; the time, binding and
/// revocation checks run again on every use.
struct CachedToken {
    keys: Arc<KeySnapshot>,
    parsed: Arc<Parsed>,
}

/// A token whose signature did not verify against `keys`, the key set of `issuer` then.
/// Kept apart from the verified tokens, in a small cache of its own, so that a flood of
/// distinct forgeries can evict only other forgeries.
struct Forgery {
    issuer: String,
    keys: Arc<KeySnapshot>,
}

/// Most forged tokens remembered (when the token cache is on).
const MAX_FORGERIES: usize = 1024;

struct Issuer {
    settings: IssuerSettings,
    keys: KeyCell,
}

impl Issuer {
    /// True while `keys` is this issuer's current key set (the very snapshot, not an equal one).
    fn has_current_keys(&self, keys: &Arc<KeySnapshot>) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, keys))
    }
}

/// Verifies bearer tokens for the configured issuers.
pub struct TokenVerifier {
    issuers: HashMap<String, Issuer>,
    max_size: usize,
    revoked: Arc<ArcSwap<RevocationList>>,
    cache: Option<quick_cache::sync::Cache<[u8; 32], Arc<CachedToken>>>,
    /// Tokens whose signature failed, so that one sent again is refused without another
    /// signature check.
    forgeries: Option<quick_cache::sync::Cache<[u8; 32], Arc<Forgery>>>,
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
    /// `cache` is the most verified tokens remembered (0: none).
    pub fn load(
        issuers: &[IssuerSettings],
        token: &TokenSettings,
        cache: usize,
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
            Some(path) => RevocationList::load(path, None).unwrap_or_else(|e| {
                problems.extend(e);
                RevocationList::default()
            }),
        };
        if problems.is_empty() {
            Ok(TokenVerifier {
                issuers: map,
                max_size: token.max_size,
                revoked: Arc::new(ArcSwap::from_pointee(revoked)),
                cache: (cache > 0).then(|| quick_cache::sync::Cache::new(cache)),
                forgeries: (cache > 0)
                    .then(|| quick_cache::sync::Cache::new(cache.min(MAX_FORGERIES))),
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
        let key = self.cache.as_ref().map(|_| {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
            <[u8; 32]>::try_from(digest.as_ref()).expect("SHA-256 is 32 bytes")
        });
        let cached = match (&self.cache, &key) {
            (Some(cache), Some(key)) => cache.get(key),
            _ => None,
        };
        if cached.is_none()
            && let (Some(forgeries), Some(key)) = (&self.forgeries, &key)
            && let Some(forgery) = forgeries.get(key)
            && let Some(issuer) = self.issuers.get(&forgery.issuer)
            && issuer.has_current_keys(&forgery.keys)
        {
            check_fresh(&issuer.settings, &forgery.keys, now)?;
            // The same bytes against the same keys: the signature fails again.
            return Err(TokenRejection::BadSignature);
        }
        let (settings, parsed) = match cached {
            Some(hit) => match self.issuers.get(&hit.parsed.issuer) {
                // SECURITY: only while the key set that verified it is still the current
                // one; a rotation or a refetch sends the token through verification again.
                Some(issuer) if issuer.has_current_keys(&hit.keys) => {
                    check_fresh(&issuer.settings, &hit.keys, now)?;
                    (&issuer.settings, hit.parsed.clone())
                }
                _ => self.verify_uncached(token, key, now)?,
            },
            None => self.verify_uncached(token, key, now)?,
        };
        // An expired token stays cached: the time is checked here on every use, and a
        // client that keeps sending it is refused without another signature check.
        let bound = check_current(settings, &parsed, peer, now)?;
        let revoked = self.revoked.load();
        let jti = parsed.claims.get("jti").and_then(Value::as_str);
        if jti.is_some_and(|j| revoked.revokes_jti(j)) || revoked.revokes_subject(&parsed.subject) {
            return Err(TokenRejection::Revoked);
        }
        Ok(TokenClaims { parsed, bound })
    }

    /// Decodes the header, picks the issuer, verifies the signature and reads the claims;
    /// remembers the result under `key` when there is a cache.
    fn verify_uncached(
        &self,
        token: &str,
        key: Option<[u8; 32]>,
        now: i64,
    ) -> Result<(&IssuerSettings, Arc<Parsed>), TokenRejection> {
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
        check_fresh(s, &snapshot, now)?;
        let claims = match verify_signature(token, alg, header.kid.as_deref(), &snapshot.keys) {
            Ok(claims) => claims,
            Err(TokenRejection::UnknownKey { kid, .. }) => {
                return Err(TokenRejection::UnknownKey {
                    issuer: s.issuer.clone(),
                    kid,
                });
            }
            // Only a signature that failed against a key is remembered; an unknown key may
            // yet arrive with a refresh.
            Err(TokenRejection::BadSignature) => {
                if let (Some(forgeries), Some(key)) = (&self.forgeries, key) {
                    let forgery = Forgery {
                        issuer: s.issuer.clone(),
                        keys: snapshot,
                    };
                    forgeries.insert(key, Arc::new(forgery));
                }
                return Err(TokenRejection::BadSignature);
            }
            Err(other) => return Err(other),
        };
        let parsed = Arc::new(parse_claims(s, claims)?);
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(
                key,
                Arc::new(CachedToken {
                    keys: snapshot,
                    parsed: parsed.clone(),
                }),
            );
        }
        Ok((s, parsed))
    }

    /// Verified tokens remembered now.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Forged tokens (signature failed) remembered now.
    pub fn forgeries(&self) -> usize {
        self.forgeries.as_ref().map_or(0, |c| c.len())
    }
}

/// SECURITY: keys the provider has not confirmed for `max_staleness` may include keys it
/// has since withdrawn; refuse rather than trust them forever.
fn check_fresh(s: &IssuerSettings, keys: &KeySnapshot, now: i64) -> Result<(), TokenRejection> {
    if keys.usable_until.is_some_and(|until| now > until) {
        return Err(TokenRejection::KeysStale(s.issuer.clone()));
    }
    Ok(())
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

/// The checks that hold for the token's lifetime: issuer, claim types, audience, subject,
/// required claims. Run once per token; the result may be cached.
fn parse_claims(s: &IssuerSettings, claims: Map<String, Value>) -> Result<Parsed, TokenRejection> {
    if claims.get("iss").and_then(Value::as_str) != Some(s.issuer.as_str()) {
        return Err(TokenRejection::UnknownIssuer(String::new()));
    }
    let exp =
        numeric_date(&claims, "exp")?.ok_or_else(|| TokenRejection::MissingClaim("exp".into()))?;
    let not_before = numeric_date(&claims, "nbf")?;
    let issued_at = numeric_date(&claims, "iat")?;
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
    let x5t = match claims.get("cnf").and_then(|c| c.get("x5t#S256")) {
        Some(Value::String(x5t)) => Some(x5t.clone()),
        Some(_) => return Err(TokenRejection::InvalidClaim("cnf".into())),
        None => None,
    };
    let scopes = match claims.get("scope").or_else(|| claims.get("scp")) {
        None => BTreeSet::new(),
        Some(Value::String(s)) => s.split_ascii_whitespace().map(str::to_string).collect(),
        Some(v) => strings(v).ok_or_else(|| TokenRejection::InvalidClaim("scope".into()))?,
    };
    // SECURITY: groups carry the issuer's id prefix like users do, so that a second
    // issuer's tokens cannot claim the groups the first issuer's policies grant.
    let groups = match claims.get(&s.groups_claim) {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(v) => strings(v)
            .ok_or_else(|| TokenRejection::InvalidClaim(truncate(&s.groups_claim)))?
            .into_iter()
            .map(|g| format!("{}{g}", s.id_prefix))
            .collect(),
    };
    Ok(Parsed {
        issuer: s.issuer.clone(),
        principal_id: format!("{}{}", s.id_prefix, subject),
        subject,
        audience,
        scopes,
        groups,
        expires_at: exp,
        not_before,
        issued_at,
        x5t,
        claims,
        cedar: std::sync::OnceLock::new(),
    })
}

/// The checks that depend on the request: the time (`exp`, `nbf`, `iat`, lifetime) and
/// the certificate the token may be bound to. Run on every use. Returns whether the token
/// is bound to the presented certificate.
fn check_current(
    s: &IssuerSettings,
    p: &Parsed,
    peer: Option<&PeerIdentity>,
    now: i64,
) -> Result<bool, TokenRejection> {
    let leeway = s.leeway.as_secs() as i64;
    if now > p.expires_at.saturating_add(leeway) {
        return Err(TokenRejection::Expired);
    }
    if p.not_before
        .is_some_and(|nbf| now.saturating_add(leeway) < nbf)
    {
        return Err(TokenRejection::NotYetValid);
    }
    if p.issued_at
        .is_some_and(|iat| iat > now.saturating_add(leeway))
    {
        return Err(TokenRejection::IssuedInFuture);
    }
    // Without `iat`, the remaining lifetime is what a replayer could use.
    let max = s.max_lifetime.as_secs();
    let lifetime = p.expires_at.saturating_sub(p.issued_at.unwrap_or(now));
    if lifetime > max as i64 {
        return Err(TokenRejection::LifetimeTooLong { max_secs: max });
    }
    // RFC 8705 §3.1: a bound token is only good with the certificate it names.
    match (&p.x5t, peer) {
        (Some(x5t), Some(peer)) if peer.thumbprint() == *x5t => Ok(true),
        (Some(_), Some(_)) => Err(TokenRejection::BindingMismatch),
        (Some(_), None) => Err(TokenRejection::BoundWithoutCertificate),
        (None, _) if s.require_binding => Err(TokenRejection::Unbound),
        (None, _) => Ok(false),
    }
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
