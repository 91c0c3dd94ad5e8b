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
#[non_exhaustive]
pub enum TokenRejection {
    /// Token is larger than `max` bytes.
    #[error("token is larger than {max} bytes")]
    TooLarge {
        /// `[token] max_size`.
        max: usize,
    },
    /// The token is not a compact JWS (the reason is given).
    #[error("token is not a compact JWS: {0}")]
    Malformed(String),
    /// A credential was presented that cannot be verified (another scheme, two different
    /// tokens, a repeated header); it fails the request rather than being ignored.
    #[error("{0}")]
    Unusable(String),
    /// The token names a claim or header member (given) more than once.
    #[error("token names claim or header member \"{0}\" more than once")]
    DuplicateMember(String),
    /// The token is sender-constrained in a way this verifier cannot enforce (the `cnf` member is given).
    #[error("token is sender-constrained in a way this verifier cannot enforce (cnf {0})")]
    UnenforceableConfirmation(String),
    /// Token has no "iss" claim.
    #[error("token has no \"iss\" claim")]
    MissingIssuer,
    /// The token's issuer (given) is not configured.
    #[error("issuer \"{0}\" is not configured")]
    UnknownIssuer(String),
    /// The token's algorithm (given) is not allowed for its issuer.
    #[error("algorithm {0} is not allowed for this issuer")]
    AlgorithmNotAllowed(String),
    /// Header "crit" names extensions this verifier does not understand.
    #[error("header \"crit\" names extensions this verifier does not understand")]
    UnknownCritical,
    /// Token type `found` is not the expected "`expected`".
    #[error("token type {found:?} is not the expected \"{expected}\"")]
    WrongType {
        /// The configured `typ`.
        expected: String,
        /// The token's `typ`, if it has one.
        found: Option<String>,
    },
    /// Issuer "`issuer`" has no key with kid "`kid`".
    #[error("issuer \"{issuer}\" has no key with kid \"{kid}\"")]
    UnknownKey {
        /// The token's issuer.
        issuer: String,
        /// The token's `kid`.
        kid: String,
    },
    /// The keys of the issuer (given) have not been fetched yet.
    #[error("keys of issuer \"{0}\" have not been fetched yet")]
    KeysUnavailable(String),
    /// The keys of the issuer (given) are older than `max_staleness` (its provider is unreachable).
    #[error("keys of issuer \"{0}\" are older than the maximum staleness (provider unreachable)")]
    KeysStale(String),
    /// Token has been revoked.
    #[error("token has been revoked")]
    Revoked,
    /// No key of the issuer fits the token's algorithm (given).
    #[error("no key of this issuer fits algorithm {0}")]
    NoKeyForAlgorithm(String),
    /// Signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A required claim (given) is missing.
    #[error("claim \"{0}\" is missing")]
    MissingClaim(String),
    /// A claim (given) has the wrong type.
    #[error("claim \"{0}\" has the wrong type")]
    InvalidClaim(String),
    /// A claim declared in `[issuer.claims]` has another type than declared: the token is
    /// invalid (never read as if the claim were absent).
    #[error("claim \"{claim}\" is {found}, but the configuration declares it {declared} ([issuer.claims])")]
    ClaimType {
        /// The claim's name.
        claim: String,
        /// The declared Cedar type.
        declared: String,
        /// What the token's value is.
        found: String,
    },
    /// Token has expired.
    #[error("token has expired")]
    Expired,
    /// Token is not valid yet (nbf).
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// Token was issued in the future (iat).
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    /// Token lifetime exceeds the maximum of `max_secs`s.
    #[error("token lifetime exceeds the maximum of {max_secs}s")]
    LifetimeTooLong {
        /// The issuer's `max_lifetime`, in seconds.
        max_secs: u64,
    },
    /// Token has no "aud" claim.
    #[error("token has no \"aud\" claim")]
    MissingAudience,
    /// Token audience is not accepted by this issuer. Both lists are shown to the operator
    /// (logs, audit, `check --explain`), never to the client; the token's audiences are
    /// capped and escaped, since the token's author wrote them.
    #[error(
        "token audience is not accepted by this issuer: the token names {}; accepted: {}",
        Echo(found),
        Echo(accepted)
    )]
    WrongAudience {
        /// The token's `aud` values, the first few of them, each cut short.
        found: Vec<String>,
        /// The issuer's `audiences`.
        accepted: Vec<String>,
    },
    /// Token is bound to a certificate (cnf.x5t#S256) but no verified certificate was presented.
    #[error(
        "token is bound to a certificate (cnf.x5t#S256) but no verified certificate was presented"
    )]
    BoundWithoutCertificate,
    /// Token is bound to a different certificate.
    #[error("token is bound to a different certificate")]
    BindingMismatch,
    /// Issuer requires certificate-bound tokens and this token is not bound.
    #[error("issuer requires certificate-bound tokens and this token is not bound")]
    Unbound,
}

/// Most values of a token's claim echoed in a rejection reason.
pub(crate) const ECHO_VALUES: usize = 4;
/// Most characters of one value echoed in a rejection reason.
pub(crate) const ECHO_CHARS: usize = 64;

/// Values for a rejection reason: each quoted with its control characters, quotes and
/// non-ASCII escaped (a token's author could otherwise write a fake log line or hide
/// characters), cut past `ECHO_CHARS` characters, at most `ECHO_VALUES` of them.
pub(crate) struct Echo<'a>(pub &'a [String]);

impl std::fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, value) in self.0.iter().take(ECHO_VALUES).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str("\"")?;
            for c in value.chars().take(ECHO_CHARS) {
                write!(f, "{}", c.escape_default())?;
            }
            if value.chars().nth(ECHO_CHARS).is_some() {
                f.write_str("...")?;
            }
            f.write_str("\"")?;
        }
        if self.0.len() > ECHO_VALUES {
            f.write_str(" and more")?;
        }
        Ok(())
    }
}

/// The claims of a token as read once after its signature verified: everything that does
/// not depend on the time or the certificate of the request. Shared by the cache.
#[derive(Debug)]
struct Parsed {
    issuer: String,
    subject: String,
    principal_id: String,
    /// Sorted, without duplicates (as sets; kept as slices, which cost a tenth of a set's
    /// memory: every cached token holds these).
    audience: Box<[String]>,
    scopes: Box<[String]>,
    groups: Box<[String]>,
    expires_at: i64,
    /// The algorithm the signature verified with.
    alg: Algorithm,
    not_before: Option<i64>,
    issued_at: Option<i64>,
    /// RFC 8705 `cnf.x5t#S256`, when the token is bound to a certificate.
    x5t: Option<String>,
    /// `jti`, which must be a string when present (the revocation list holds strings).
    jti: Option<String>,
    /// Every claim, as compact JSON text: a parsed map costs several times its text, and
    /// the claims are read whole only to build the token's Cedar form or to show it.
    claims: Box<str>,
    /// Where a later stage keeps the form it derives from this token (the policy stage:
    /// its Cedar form, replaced when policies that read a different part are loaded).
    derived: super::FormSlot,
}

/// Claims of a token whose signature and claims verified. Only the verifier builds one.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    parsed: Arc<Parsed>,
    bound: bool,
}

impl TokenClaims {
    /// The `iss` claim.
    pub fn issuer(&self) -> &str {
        &self.parsed.issuer
    }
    /// The `sub` claim.
    pub fn subject(&self) -> &str {
        &self.parsed.subject
    }
    /// The subject with the issuer's id prefix: the Cedar `User` id.
    pub fn principal_id(&self) -> &str {
        &self.parsed.principal_id
    }
    /// The audiences, sorted, without duplicates.
    pub fn audience(&self) -> &[String] {
        &self.parsed.audience
    }
    /// The scopes, sorted, without duplicates.
    pub fn scopes(&self) -> &[String] {
        &self.parsed.scopes
    }
    /// The groups (with the issuer's id prefix), sorted, without duplicates.
    pub fn groups(&self) -> &[String] {
        &self.parsed.groups
    }
    /// The `exp` claim, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> i64 {
        self.parsed.expires_at
    }
    /// True when `cnf.x5t#S256` matched the verified peer certificate.
    pub fn bound(&self) -> bool {
        self.bound
    }
    /// Every claim of the token (parsed anew on each call).
    pub fn claims(&self) -> Map<String, Value> {
        serde_json::from_str(&self.parsed.claims).unwrap_or_default()
    }
    /// Where a later stage keeps the form it derives from this token.
    pub(crate) fn derived(&self) -> &super::FormSlot {
        &self.parsed.derived
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
                audience: slice(set("aud")),
                scopes: slice(scopes),
                groups: slice(set(groups_claim)),
                expires_at: claims
                    .get("exp")
                    .and_then(Value::as_i64)
                    .unwrap_or(i64::MAX),
                alg: Algorithm::ES256,
                not_before: None,
                issued_at: None,
                x5t: None,
                jti: None,
                claims: Value::Object(claims).to_string().into(),
                derived: super::FormSlot::default(),
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
    /// The signature that verified, decoded and (for ECDSA) in low-s form; the cache key
    /// covers only the header and payload.
    signature: Signature,
}

/// A JWS signature in the one form that identifies it: the decoded bytes, and for ECDSA
/// `s` replaced by `n - s` when it is the larger of the two. SECURITY: ECDSA signatures are
/// malleable, `(r, s)` and `(r, n - s)` both verify, so one token has two valid texts; in
/// this form both are the same token to the cache, while any other signature is not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature(Vec<u8>);

/// The order of P-256's and P-384's base point (SEC 2, §2.4.2 and §2.5.1), big-endian.
const P256_N: [u8; 32] = hex32("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
const P384_N: [u8; 48] = hex48(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
);

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not a hex digit"),
    }
}
const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = hex_digit(b[2 * i]) * 16 + hex_digit(b[2 * i + 1]);
        i += 1;
    }
    out
}
const fn hex48(s: &str) -> [u8; 48] {
    let b = s.as_bytes();
    let mut out = [0u8; 48];
    let mut i = 0;
    while i < 48 {
        out[i] = hex_digit(b[2 * i]) * 16 + hex_digit(b[2 * i + 1]);
        i += 1;
    }
    out
}

/// `n - s` for big-endian numbers of the same length with `s <= n`.
fn order_minus(n: &[u8], s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; n.len()];
    let mut borrow = 0i16;
    for i in (0..n.len()).rev() {
        let mut d = i16::from(n[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

impl Signature {
    /// The signature part of a compact JWS under `alg`; `None` when it is not base64url.
    fn of(encoded: &str, alg: Algorithm) -> Option<Signature> {
        use base64::Engine as _;
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()?;
        let n: &[u8] = match alg {
            Algorithm::ES256 => &P256_N,
            Algorithm::ES384 => &P384_N,
            _ => return Some(Signature(bytes)),
        };
        // JWS ECDSA signatures are r || s, each as long as the order (RFC 7518 §3.4).
        if bytes.len() == 2 * n.len() {
            let s = &bytes[n.len()..];
            // s > n / 2  <=>  n - s < s
            let flipped = (s <= n).then(|| order_minus(n, s));
            if let Some(low) = flipped.filter(|low| low.as_slice() < s) {
                bytes[n.len()..].copy_from_slice(&low);
            }
        }
        Some(Signature(bytes))
    }
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
        let key = self.cache.as_ref().map(|_| digest(token.as_bytes()));
        // Verified tokens are remembered by their header and payload, with the signature
        // that verified: a hit needs the same signature (in its one form, see Signature).
        let (signed, encoded_sig) = token.rsplit_once('.').unwrap_or((token, ""));
        let cached = match &self.cache {
            Some(cache) => cache.get(&digest(signed.as_bytes())).filter(|hit| {
                Signature::of(encoded_sig, hit.parsed.alg).is_some_and(|s| s == hit.signature)
            }),
            None => None,
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
        if parsed
            .jti
            .as_deref()
            .is_some_and(|j| revoked.revokes_jti(j))
            || revoked.revokes_subject(&parsed.subject)
        {
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
        no_duplicate_members(token)?;
        let parsed = Arc::new(parse_claims(s, alg, claims)?);
        let (signed, encoded_sig) = token.rsplit_once('.').unwrap_or((token, ""));
        if let (Some(cache), Some(signature)) = (&self.cache, Signature::of(encoded_sig, alg)) {
            cache.insert(
                digest(signed.as_bytes()),
                Arc::new(CachedToken {
                    keys: snapshot,
                    parsed: parsed.clone(),
                    signature,
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
fn parse_claims(
    s: &IssuerSettings,
    alg: Algorithm,
    claims: Map<String, Value>,
) -> Result<Parsed, TokenRejection> {
    if claims.get("iss").and_then(Value::as_str) != Some(s.issuer.as_str()) {
        return Err(TokenRejection::UnknownIssuer(String::new()));
    }
    // RFC 7800 §3.1: `cnf` names how the presenter proves possession. Only `x5t#S256`
    // (RFC 8705) can be enforced here. SECURITY: any other member (DPoP's `jkt`, `jwk`,
    // `kid`, a mis-cased `x5t#s256`), or a `cnf` that is not an object, means the issuer
    // meant the token to be sender-constrained in a way Portcullis cannot check: it is
    // refused, never accepted as a plain bearer token.
    let x5t = match claims.get("cnf") {
        None => None,
        Some(Value::Object(cnf)) => {
            if let Some(other) = cnf.keys().find(|k| k.as_str() != "x5t#S256") {
                return Err(TokenRejection::UnenforceableConfirmation(format!(
                    "member \"{}\"",
                    truncate(other)
                )));
            }
            match cnf.get("x5t#S256") {
                Some(Value::String(x5t)) if !x5t.is_empty() => Some(x5t.clone()),
                Some(_) => return Err(TokenRejection::InvalidClaim("cnf".into())),
                None => {
                    return Err(TokenRejection::UnenforceableConfirmation(
                        "with no member".into(),
                    ));
                }
            }
        }
        Some(_) => return Err(TokenRejection::InvalidClaim("cnf".into())),
    };
    // SECURITY: the revocation list holds strings; a `jti` of another type (12345,
    // ["abc"]) would never match one, so it is invalid rather than "not revoked".
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(j)) => Some(j.clone()),
        Some(_) => return Err(TokenRejection::InvalidClaim("jti".into())),
    };
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
        return Err(TokenRejection::WrongAudience {
            found: audience
                .iter()
                .take(ECHO_VALUES + 1)
                .map(|a| a.chars().take(ECHO_CHARS + 1).collect())
                .collect(),
            accepted: s.audiences.clone(),
        });
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
    // SECURITY: a declared claim reaches policies only in its declared type (the schema
    // promises it); a value of another type makes the token invalid, not the claim absent.
    // A null claim is absent, as it is to Cedar.
    for (name, ty) in &s.claims {
        match claims.get(name) {
            None | Some(Value::Null) => {}
            Some(v) if ty.admits(v) => {}
            Some(v) => {
                return Err(TokenRejection::ClaimType {
                    claim: truncate(name),
                    declared: ty.to_string(),
                    found: crate::declared::json_kind(v).to_string(),
                });
            }
        }
    }
    Ok(Parsed {
        issuer: s.issuer.clone(),
        principal_id: format!("{}{}", s.id_prefix, subject),
        subject,
        audience: slice(audience),
        scopes: slice(scopes),
        groups: slice(groups),
        expires_at: exp,
        not_before,
        issued_at,
        x5t,
        jti,
        alg,
        claims: Value::Object(claims).to_string().into(),
        derived: super::FormSlot::default(),
    })
}

/// A set as the sorted slice a cached token keeps.
fn slice(set: BTreeSet<String>) -> Box<[String]> {
    set.into_iter().collect()
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
}

/// Walks a JSON text and fails on the first object that names a member twice.
struct NoDuplicates;

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicates)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicates {
    type Value = NoDuplicates;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(DuplicateName(key)));
            }
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }
}

/// The member named twice, carried through serde's error text.
struct DuplicateName(String);

impl std::fmt::Display for DuplicateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\u{1}{}\u{1}", self.0)
    }
}

/// SECURITY: RFC 7519 §4 lets a parser take the last of two members of the same name;
/// another parser (the upstream's, an audit tool's) may take the first, so `{"sub":
/// "alice", "sub": "admin"}` would be two different tokens to two readers. A header or
/// payload that names a member twice, at any depth, is refused.
fn no_duplicate_members(token: &str) -> Result<(), TokenRejection> {
    use base64::Engine as _;
    for part in token.split('.').take(2) {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| TokenRejection::Malformed("cannot decode".into()))?;
        if let Err(e) = serde_json::from_slice::<NoDuplicates>(&json) {
            let text = e.to_string();
            let mut marked = text.split('\u{1}');
            return Err(match (marked.next(), marked.next()) {
                (Some(_), Some(name)) => TokenRejection::DuplicateMember(truncate(name)),
                _ => TokenRejection::Malformed("cannot decode".into()),
            });
        }
    }
    Ok(())
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
    use proptest::prelude::*;
    use serde_json::json;

    const ISS: &str = "https://types.test";

    /// A verifier for one issuer whose key `signer` holds, with the revocation list "jti:7".
    fn verifier(signer: &crate::demo::TokenSigner) -> (TokenVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("k.json"), crate::demo::jwks(&[signer])).expect("jwks");
        std::fs::write(dir.path().join("revoked.txt"), "jti:7\njti:abc\n").expect("revoked");
        let config = format!(
            "[token]\nrevoked = \"revoked.txt\"\n[[issuer]]\nissuer = \"{ISS}\"\naudiences = [\"api\"]\njwks_file = \"k.json\"\nalgorithms = [\"ES256\"]\nmax_lifetime = \"1h\"\n\
             [issuer.claims]\nlevel = \"Long\"\ndept = \"String\"\nroles = \"Set<String>\"\nverified = \"Bool\"\n"
        );
        let settings = crate::config::Settings::from_toml(&config, dir.path()).expect("settings");
        let v = TokenVerifier::load(&settings.issuers, &settings.token, 0).expect("verifier");
        (v, dir)
    }

    /// A JSON value of a random type.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-3i64..3).prop_map(|n| json!(1_900_000_000 + n * 100)),
            Just(json!(1.5)),
            prop::sample::select(vec!["", "api", "abc", "7", "read write"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec!["x5t#S256", "jkt", "a"]).prop_map(String::from),
                    inner,
                    0..2
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Whether a claim of this value may be accepted by the rule that reads it.
    fn acceptable(claim: &str, v: &Value) -> bool {
        let strings = |v: &Value| match v {
            Value::String(_) => true,
            Value::Array(items) => items.iter().all(Value::is_string),
            _ => false,
        };
        match claim {
            "exp" | "nbf" | "iat" => v.is_number(),
            "aud" => strings(v),
            "sub" => v.as_str().is_some_and(|s| !s.is_empty()),
            "jti" => v.is_string(),
            // Needs a certificate in any form this test can send: never accepted here.
            "cnf" => false,
            "scope" => strings(v),
            "groups" => v.is_null() || strings(v),
            // Declared in [issuer.claims]; null is absent.
            "level" => v.is_null() || v.as_i64().is_some(),
            "dept" => v.is_null() || v.is_string(),
            "roles" => v.is_null() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            "verified" => v.is_null() || v.is_boolean(),
            _ => true,
        }
    }

    proptest! {
        /// Every claim a rule compares, given a value of a random type: the token is
        /// accepted only when the value has the type the rule expects, so a value of
        /// another type is invalid, never "absent" (nor a match in another type).
        #[test]
        fn a_claim_of_another_type_is_invalid_not_absent(
            claim in prop::sample::select(vec!["exp", "nbf", "iat", "aud", "sub", "jti", "cnf", "scope", "groups", "level", "dept", "roles", "verified"]),
            value in any_json(),
        ) {
            static SIGNER: std::sync::OnceLock<crate::demo::TokenSigner> = std::sync::OnceLock::new();
            let signer = SIGNER.get_or_init(|| crate::demo::TokenSigner::generate(Algorithm::ES256, "k"));
            let (v, _dir) = verifier(signer);
            let now = 1_900_000_000;
            let mut claims = json!({ "iss": ISS, "aud": "api", "sub": "alice", "iat": now, "exp": now + 600 });
            claims[claim] = value.clone();
            let result = v.verify(&signer.sign(&claims), None, now);
            if !acceptable(claim, &value) {
                prop_assert!(result.is_err(), "{claim} = {value} accepted");
            }
            if let Err(e) = &result
                && acceptable(claim, &value)
            {
                // Refused for what the value says (time, audience, revocation), not its type.
                prop_assert!(
                    !matches!(e, TokenRejection::InvalidClaim(_) | TokenRejection::ClaimType { .. }),
                    "{claim} = {value}: {e}"
                );
            }
        }
    }

    /// A declared claim of another type rejects the token with a reason that names the
    /// claim, its declared type and what it is; the same claim in its type is accepted.
    #[test]
    fn a_declared_claim_of_another_type_rejects_the_token() {
        let signer = crate::demo::TokenSigner::generate(Algorithm::ES256, "k");
        let (v, _dir) = verifier(&signer);
        let now = 1_900_000_000;
        let token = |level: Value| {
            signer.sign(&json!({ "iss": ISS, "aud": "api", "sub": "alice", "iat": now, "exp": now + 600, "level": level }))
        };
        let e = v.verify(&token(json!("5")), None, now).expect_err("a string level");
        assert_eq!(
            e.to_string(),
            "claim \"level\" is a string, but the configuration declares it Long ([issuer.claims])"
        );
        let e = v.verify(&token(json!(5.5)), None, now).expect_err("a fractional level");
        assert!(matches!(e, TokenRejection::ClaimType { ref found, .. } if found == "a non-integer number"), "{e}");
        assert!(v.verify(&token(json!(5)), None, now).is_ok());
        assert!(v.verify(&token(Value::Null), None, now).is_ok(), "null is absent");
    }

    /// A wrong audience names the token's audiences, escaped and capped (the token's author
    /// wrote them), and the accepted ones.
    #[test]
    fn a_wrong_audience_names_both_lists_escaped_and_capped() {
        let signer = crate::demo::TokenSigner::generate(Algorithm::ES256, "k");
        let (v, _dir) = verifier(&signer);
        let now = 1_900_000_000;
        let reason = |aud: Value| {
            let claims = json!({ "iss": ISS, "aud": aud, "sub": "alice", "iat": now, "exp": now + 600 });
            v.verify(&signer.sign(&claims), None, now)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            reason(json!("billing")),
            "token audience is not accepted by this issuer: the token names \"billing\"; accepted: \"api\""
        );
        // A forged log line, a quote and a terminal escape stay inside their quotes.
        assert_eq!(
            reason(json!(["a\"b", "x\nlevel=info msg=allowed", "\u{1b}[31m"])),
            "token audience is not accepted by this issuer: the token names \"\\u{1b}[31m\", \"a\\\"b\", \"x\\nlevel=info msg=allowed\"; accepted: \"api\""
        );
        // Many or long values are cut.
        let many: Vec<String> = (0..10).map(|i| format!("{i:0>100}")).collect();
        let text = reason(json!(many));
        assert!(text.len() < 500, "{text}");
        assert!(text.contains("...\"") && text.contains(" and more;"), "{text}");
    }

    #[test]
    fn ecdsa_signatures_have_one_form() {
        let n = &P256_N;
        let mut sig = vec![7u8; 32];
        let s_low = {
            let mut s = [0u8; 32];
            s[31] = 5;
            s
        };
        sig.extend_from_slice(&s_low);
        let mut twin = vec![7u8; 32];
        twin.extend_from_slice(&order_minus(n, &s_low));
        use base64::Engine as _;
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let a = Signature::of(&enc(&sig), Algorithm::ES256).expect("decodes");
        let b = Signature::of(&enc(&twin), Algorithm::ES256).expect("decodes");
        assert_eq!(a, b);
        assert_eq!(a.0, sig, "the low form is kept as it is");
        // Not for other algorithms, whose signatures are taken as they are.
        assert_ne!(
            Signature::of(&enc(&sig), Algorithm::EdDSA),
            Signature::of(&enc(&twin), Algorithm::EdDSA)
        );
        let mut other = twin.clone();
        other[40] ^= 1;
        assert_ne!(Signature::of(&enc(&other), Algorithm::ES256), Some(a));
    }

    #[test]
    fn typ_comparison() {
        assert!(typ_matches("at+jwt", Some("at+JWT")));
        assert!(typ_matches("at+jwt", Some("application/at+jwt")));
        assert!(!typ_matches("at+jwt", Some("JWT")));
        assert!(!typ_matches("at+jwt", None));
    }
}
