//! Verification keys of an issuer: a JWKS document or PEM public keys in, a [`KeySet`]
//! indexed by `kid` out. Only asymmetric keys exist here: HMAC secrets are never accepted,
//! so an HS* token can never be checked against a public key used as a secret.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The key type and curve an algorithm needs (RFC 7518 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl fmt::Display for KeyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFamily::Rsa => "RSA",
            KeyFamily::EcP256 => "EC P-256",
            KeyFamily::EcP384 => "EC P-384",
            KeyFamily::Ed25519 => "OKP Ed25519",
        })
    }
}

/// The family of key that verifies `alg`; `None` for HMAC, which Portcullis never accepts.
pub fn family_of(alg: Algorithm) -> Option<KeyFamily> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(KeyFamily::Rsa),
        Algorithm::ES256 => Some(KeyFamily::EcP256),
        Algorithm::ES384 => Some(KeyFamily::EcP384),
        Algorithm::EdDSA => Some(KeyFamily::Ed25519),
        // HMAC, and any algorithm added to the library later, verify with nothing here.
        _ => None,
    }
}

/// Parses an algorithm name for an issuer's allow-list; `none` and HS* are refused.
pub fn parse_allowed_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name
        .parse()
        .map_err(|_| format!("\"{name}\" is not a supported JWS algorithm"))?;
    match family_of(alg) {
        Some(_) => Ok(alg),
        // SECURITY: a symmetric algorithm next to public keys is the classic key-confusion
        // hole (RFC 8725 §2.1); Portcullis verifies with public keys only.
        None => Err(format!(
            "\"{name}\" is a shared-secret algorithm; only public-key algorithms are accepted"
        )),
    }
}

/// One public key with what it may verify.
pub struct VerificationKey {
    kid: Option<String>,
    family: KeyFamily,
    /// The key's own `alg`, when its JWK names one: then only that algorithm may use it.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Whether this key may verify a signature made with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        family_of(alg) == Some(self.family) && self.alg.is_none_or(|a| a == alg)
    }
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

/// The keys an issuer is verified with right now, swapped whole when a fetch succeeds.
#[derive(Debug)]
pub struct KeySnapshot {
    pub keys: KeySet,
    /// After this time (seconds since the epoch) the keys are too stale to trust: the
    /// provider has not answered for `max_staleness`. `None` for keys from files.
    pub usable_until: Option<i64>,
}

/// One issuer's current keys, shared between the verifier (reads) and the loader or
/// background fetcher (writes). Empty until the first successful fetch.
pub type KeyCell = std::sync::Arc<arc_swap::ArcSwapOption<KeySnapshot>>;

/// An issuer's keys: those with a `kid` indexed by it, all of them in order.
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<VerificationKey>>,
    all: Vec<Arc<VerificationKey>>,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.all.len()
    }
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn get(&self, kid: &str) -> Option<&VerificationKey> {
        self.by_kid.get(kid).map(Arc::as_ref)
    }

    /// Keys that may verify `alg`, for a token that names no `kid`.
    pub fn without_kid(&self, alg: Algorithm) -> impl Iterator<Item = &VerificationKey> {
        self.all
            .iter()
            .map(Arc::as_ref)
            .filter(move |k| k.accepts(alg))
    }

    fn insert(&mut self, key: VerificationKey) -> Result<(), String> {
        let key = Arc::new(key);
        if let Some(kid) = &key.kid
            && self.by_kid.insert(kid.clone(), key.clone()).is_some()
        {
            return Err(format!("kid \"{kid}\" appears twice"));
        }
        self.all.push(key);
        Ok(())
    }

    /// Parses a JWKS document (RFC 7517 §5). Keys for encryption and key types Portcullis
    /// does not verify with are skipped (and named in the returned notes); a malformed
    /// signing key, a symmetric key or a duplicate `kid` is an error.
    pub fn from_jwks(text: &str) -> Result<(KeySet, Vec<String>), String> {
        let mut set = KeySet::default();
        let notes = set.add_jwks(text)?;
        Ok((set, notes))
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.all.iter().filter_map(|k| k.kid())
    }

    fn add_jwks(&mut self, text: &str) -> Result<Vec<String>, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let before = self.len();
        let mut notes = Vec::new();
        for (i, value) in doc.keys.into_iter().enumerate() {
            let at = format!("key #{}", i + 1);
            if value
                .get("use")
                .and_then(|u| u.as_str())
                .is_some_and(|u| u != "sig")
            {
                notes.push(format!("{at}: skipped, not a signing key"));
                continue;
            }
            let jwk: Jwk = match serde_json::from_value(value) {
                Ok(j) => j,
                Err(e) => {
                    notes.push(format!("{at}: skipped, unsupported key: {e}"));
                    continue;
                }
            };
            match key_from_jwk(&jwk) {
                Ok(Some(key)) => self.insert(key).map_err(|e| format!("{at}: {e}"))?,
                Ok(None) => notes.push(format!(
                    "{at}: skipped, key type not used for signatures here"
                )),
                Err(e) => return Err(format!("{at}: {e}")),
            }
        }
        if self.len() == before {
            return Err("no usable signing key".to_string());
        }
        Ok(notes)
    }

    /// Loads an issuer's key files: its JWKS file and its PEM public keys.
    pub fn load(
        jwks_file: Option<&Path>,
        pem_keys: &[(std::path::PathBuf, Option<String>)],
    ) -> Result<KeySet, Vec<String>> {
        let mut set = KeySet::default();
        let mut problems = Vec::new();
        if let Some(path) = jwks_file {
            match std::fs::read_to_string(path) {
                Ok(text) => match set.add_jwks(&text) {
                    Ok(notes) => {
                        for n in notes {
                            tracing::warn!(file = %path.display(), "{n}");
                        }
                    }
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                },
                Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
            }
        }
        for (path, kid) in pem_keys {
            let loaded = std::fs::read(path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|pem| key_from_spki_pem(&pem, kid.clone()));
            match loaded.and_then(|k| set.insert(k)) {
                Ok(()) => {}
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }
}

fn key_from_jwk(jwk: &Jwk) -> Result<Option<VerificationKey>, String> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Ok(None);
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyFamily::EcP256,
            EllipticCurve::P384 => KeyFamily::EcP384,
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyFamily::Ed25519,
            _ => return Ok(None),
        },
        // SECURITY: a shared secret must never sit in a set of public keys.
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (\"oct\") keys are not accepted".to_string());
        }
        _ => return Ok(None),
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => {
            let name = ka.to_string();
            match name.parse::<Algorithm>() {
                Ok(a) if family_of(a) == Some(family) => Some(a),
                Ok(a) => {
                    return Err(format!("alg \"{a:?}\" does not fit a {family} key"));
                }
                // An encryption algorithm (RSA-OAEP, ...) marks a key not for signatures.
                Err(_) => return Ok(None),
            }
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("invalid {family} key: {e}"))?;
    Ok(Some(VerificationKey {
        kid: jwk.common.key_id.clone(),
        family,
        alg,
        key,
    }))
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";

/// A PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of any supported family.
fn key_from_spki_pem(pem_bytes: &[u8], kid: Option<String>) -> Result<VerificationKey, String> {
    use x509_parser::prelude::FromDer;
    let text = std::str::from_utf8(pem_bytes).map_err(|_| "not a PEM file".to_string())?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| format!("not a PEM file: {e}"))?;
    if pem.label != "PUBLIC KEY" {
        return Err(format!(
            "expected a \"PUBLIC KEY\" PEM block, found \"{}\"",
            pem.label
        ));
    }
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents)
        .map_err(|e| format!("invalid public key: {e}"))?;
    let oid = spki.algorithm.algorithm.to_id_string();
    let family = match oid.as_str() {
        OID_RSA => KeyFamily::Rsa,
        OID_ED25519 => KeyFamily::Ed25519,
        OID_EC => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(OID_P256) => KeyFamily::EcP256,
                Some(OID_P384) => KeyFamily::EcP384,
                other => return Err(format!("unsupported EC curve {other:?}")),
            }
        }
        other => return Err(format!("unsupported public key algorithm {other}")),
    };
    let key = match family {
        KeyFamily::Rsa => DecodingKey::from_rsa_pem(pem_bytes),
        KeyFamily::EcP256 | KeyFamily::EcP384 => DecodingKey::from_ec_pem(pem_bytes),
        KeyFamily::Ed25519 => DecodingKey::from_ed_pem(pem_bytes),
    }
    .map_err(|e| format!("invalid {family} key: {e}"))?;
    Ok(VerificationKey {
        kid,
        family,
        alg: None,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_refuses_none_and_hmac() {
        assert!(parse_allowed_algorithm("RS256").is_ok());
        assert!(parse_allowed_algorithm("EdDSA").is_ok());
        assert!(parse_allowed_algorithm("none").is_err());
        assert!(
            parse_allowed_algorithm("HS256")
                .unwrap_err()
                .contains("shared-secret")
        );
        assert!(parse_allowed_algorithm("rs256").is_err());
    }

    #[test]
    fn jwks_rejects_symmetric_keys_and_duplicates() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#;
        assert!(KeySet::from_jwks(oct).unwrap_err().contains("symmetric"));
        let ed = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}"#;
        let dup = format!(r#"{{"keys":[{ed},{ed}]}}"#);
        assert!(KeySet::from_jwks(&dup).unwrap_err().contains("twice"));
        let enc = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","use":"enc"}]}"#;
        assert!(KeySet::from_jwks(enc).unwrap_err().contains("no usable"));
        let one = format!(r#"{{"keys":[{ed}]}}"#);
        let (set, _) = KeySet::from_jwks(&one).unwrap();
        let k = set.get("a").unwrap();
        assert!(k.accepts(Algorithm::EdDSA));
        assert!(!k.accepts(Algorithm::ES256));
        assert!(!k.accepts(Algorithm::HS256));
    }

    #[test]
    fn jwk_alg_must_fit_its_key_type() {
        let bad = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"RS256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(KeySet::from_jwks(bad).unwrap_err().contains("does not fit"));
    }
}
