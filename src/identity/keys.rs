//! Verification keys of an issuer: a JWKS document or PEM public keys in, a [`KeySet`]
//! indexed by `kid` out. Only asymmetric keys exist here: HMAC secrets are never accepted,
//! so an HS* token can never be checked against a public key used as a secret.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
pub use crate::jose::{KeyFamily, family_of};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

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
    #[cfg(any(test, feature = "testing"))]
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

    /// Parses a JWKS document from a file (RFC 7517 §5). Keys for encryption algorithms
    /// and key types Portcullis does not verify with are skipped (and named in the returned
    /// notes); a malformed signing key, a symmetric key, a duplicate `kid`, and a key unfit
    /// to verify ([`check_jwk`]: `use` not `sig`, `key_ops` without `verify`, a weak RSA
    /// key) are errors, each naming its key.
    #[cfg(any(test, feature = "testing"))]
    pub fn from_jwks(text: &str) -> Result<(KeySet, Vec<String>), String> {
        let mut set = KeySet::default();
        let (notes, _) = set.add_jwks(text, Origin::File)?;
        Ok((set, notes))
    }

    /// Parses a JWKS document fetched from an identity provider: as [`KeySet::from_jwks`],
    /// except that a key unfit to verify is left out (and named in the third value, for a
    /// warning) so the provider's other keys keep working; a token naming a left-out key
    /// is refused as signed by an unknown key.
    pub fn from_fetched_jwks(text: &str) -> Result<(KeySet, Vec<String>, Vec<String>), String> {
        let mut set = KeySet::default();
        let (notes, refused) = set.add_jwks(text, Origin::Fetched)?;
        Ok((set, notes, refused))
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.all.iter().filter_map(|k| k.kid())
    }

    fn add_jwks(
        &mut self,
        text: &str,
        origin: Origin,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let before = self.len();
        let mut notes = Vec::new();
        let mut refused = Vec::new();
        for (i, value) in doc.keys.into_iter().enumerate() {
            let at = match value.get("kid").and_then(|k| k.as_str()) {
                Some(kid) => format!(
                    "key #{} (kid \"{}\")",
                    i + 1,
                    kid.chars().take(64).collect::<String>()
                ),
                None => format!("key #{}", i + 1),
            };
            // SECURITY: a key its owner marked for encryption only, or not for `verify`, or
            // too weak to trust, never verifies a token (RFC 7517 §4.2, §4.3; NIST SP
            // 800-131A for 2048-bit RSA).
            if let Err(why) = check_jwk(&value) {
                refused.push(format!("{at}: {why}"));
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
        if origin == Origin::File && !refused.is_empty() {
            return Err(format!("refused {}", refused.join("; refused ")));
        }
        if self.len() == before {
            let why = if refused.is_empty() {
                String::new()
            } else {
                format!(" (left out: {})", refused.join("; "))
            };
            return Err(format!("no usable signing key{why}"));
        }
        Ok((notes, refused))
    }

    /// Loads an issuer's key files: its JWKS file and its PEM public keys.
    pub fn load(
        jwks_file: Option<&Path>,
        pem_keys: &[(std::path::PathBuf, Option<String>)],
    ) -> Result<KeySet, Vec<String>> {
        let mut set = KeySet::default();
        let mut problems = Vec::new();
        if let Some(path) = jwks_file {
            match crate::files::read_to_string(path) {
                Ok(text) => match set.add_jwks(&text, Origin::File) {
                    Ok((notes, _)) => {
                        for n in notes {
                            tracing::warn!(file = %path.display(), "{n}");
                        }
                    }
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                },
                Err(e) => problems.push(e.to_string()),
            }
        }
        for (path, kid) in pem_keys {
            let loaded = match crate::files::read(path) {
                Ok(pem) => key_from_spki_pem(&pem, kid.clone()).and_then(|k| set.insert(k)),
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            if let Err(e) = loaded {
                problems.push(format!("{}: {e}", path.display()));
            }
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }
}

/// Where a JWKS document came from: a key unfit to verify is an error in an operator's
/// file, and left out of a provider's document (whose other keys must keep working).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    File,
    Fetched,
}

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Whether a JWK may verify signatures at all: `use`, when present, is `sig`; `key_ops`,
/// when present, includes `verify`; an RSA key is strong enough ([`check_rsa`]).
pub fn check_jwk(value: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let shown = |v: &Value| v.to_string().chars().take(64).collect::<String>();
    match value.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(u) => return Err(format!("\"use\" is {}, not \"sig\"", shown(u))),
    }
    match value.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|o| o == "verify") => {}
        Some(ops) => {
            return Err(format!(
                "\"key_ops\" {} does not include \"verify\"",
                shown(ops)
            ));
        }
    }
    if value.get("kty").and_then(Value::as_str) == Some("RSA") {
        let member = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .and_then(|b| {
                    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
                        .ok()
                })
                .ok_or_else(|| format!("RSA \"{name}\" is not base64url"))
        };
        check_rsa(&member("n")?, &member("e")?)?;
    }
    Ok(())
}

/// An RSA public key (big-endian modulus and exponent) is strong enough to trust: a
/// modulus of at least [`MIN_RSA_BITS`] bits and an odd exponent of at least 3 (e = 1 makes
/// every "signature" its own message).
pub fn check_rsa(modulus: &[u8], exponent: &[u8]) -> Result<(), String> {
    let significant = |b: &[u8]| -> Vec<u8> { b.iter().copied().skip_while(|&x| x == 0).collect() };
    let n = significant(modulus);
    let bits = match n.first() {
        Some(top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus of {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    let e = significant(exponent);
    let odd = e.last().is_some_and(|low| low & 1 == 1);
    let at_least_3 = e.len() > 1 || e.first().is_some_and(|&v| v >= 3);
    if !odd || !at_least_3 {
        let shown = if e.len() <= 8 {
            e.iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
                .to_string()
        } else {
            "of more than 64 bits".to_string()
        };
        return Err(format!(
            "RSA public exponent {shown} is not an odd number of at least 3"
        ));
    }
    Ok(())
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
    if family == KeyFamily::Rsa {
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                check_rsa(rsa.modulus, rsa.exponent)?;
            }
            Ok(_) => return Err("invalid RSA public key".to_string()),
            Err(e) => return Err(format!("invalid RSA public key: {e}")),
        }
    }
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
    fn jwks_rejects_symmetric_keys_and_duplicates() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#;
        assert!(KeySet::from_jwks(oct).unwrap_err().contains("symmetric"));
        let ed = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"a"}"#;
        let dup = format!(r#"{{"keys":[{ed},{ed}]}}"#);
        assert!(KeySet::from_jwks(&dup).unwrap_err().contains("twice"));
        let enc = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","use":"enc"}]}"#;
        assert!(
            KeySet::from_fetched_jwks(enc)
                .unwrap_err()
                .contains("no usable")
        );
        let one = format!(r#"{{"keys":[{ed}]}}"#);
        let (set, _) = KeySet::from_jwks(&one).unwrap();
        let k = set.get("a").unwrap();
        assert!(k.accepts(Algorithm::EdDSA));
        assert!(!k.accepts(Algorithm::ES256));
        assert!(!k.accepts(Algorithm::HS256));
    }

    fn b64(b: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
    }

    /// A PEM `PUBLIC KEY` for an RSA modulus and exponent (DER built by hand: the crypto
    /// library will not make keys under 2048 bits).
    fn rsa_spki_pem(n: &[u8], e: &[u8]) -> String {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            let len = body.len();
            if len < 128 {
                out.push(len as u8);
            } else {
                let bytes: Vec<u8> = len
                    .to_be_bytes()
                    .into_iter()
                    .skip_while(|&b| b == 0)
                    .collect();
                out.push(0x80 | bytes.len() as u8);
                out.extend(bytes);
            }
            out.extend_from_slice(body);
            out
        }
        let int = |v: &[u8]| match v.first() {
            Some(&b) if b >= 0x80 => tlv(0x02, &[&[0u8][..], v].concat()),
            _ => tlv(0x02, v),
        };
        let rsa_key = tlv(0x30, &[int(n), int(e)].concat());
        let alg = tlv(
            0x30,
            &[
                tlv(
                    0x06,
                    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
                ),
                vec![0x05, 0x00],
            ]
            .concat(),
        );
        let spki = tlv(
            0x30,
            &[alg, tlv(0x03, &[&[0u8][..], &rsa_key].concat())].concat(),
        );
        let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, spki);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// Keys unfit to verify (wrong `use`, `key_ops` without `verify`, RSA under 2048 bits,
    /// e even or under 3) are a load error in a file, naming the key, and are left out of a
    /// fetched set whose other keys keep working.
    #[test]
    fn keys_unfit_to_verify_are_refused() {
        use serde_json::{Value, json};
        let rsa = crate::demo::TokenSigner::generate(Algorithm::RS256, "bad").jwk();
        let n = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            rsa["n"].as_str().unwrap(),
        )
        .unwrap();
        let ed = json!({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"bad"});
        let with = |base: &Value, k: &str, v: Value| {
            let mut j = base.clone();
            j[k] = v;
            j
        };
        let cases = [
            (
                with(&rsa, "n", json!(b64(&n[..128]))),
                "RSA modulus of 1024 bits",
            ),
            (
                with(&rsa, "n", json!(b64(&n[..64]))),
                "RSA modulus of 512 bits",
            ),
            (with(&rsa, "e", json!("AQ")), "RSA public exponent 1 "),
            (with(&rsa, "e", json!("AAE")), "RSA public exponent 1 "),
            (with(&rsa, "e", json!("AQAA")), "RSA public exponent 65536 "),
            (with(&ed, "use", json!("enc")), "\"use\" is \"enc\""),
            (with(&ed, "use", json!(["sig"])), "\"use\" is [\"sig\"]"),
            (
                with(&ed, "key_ops", json!(["sign"])),
                "does not include \"verify\"",
            ),
            (
                with(&ed, "key_ops", json!("verify")),
                "does not include \"verify\"",
            ),
            (
                with(&ed, "key_ops", json!([])),
                "does not include \"verify\"",
            ),
        ];
        let good = json!({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"good"});
        for (jwk, why) in cases {
            let e = check_jwk(&jwk).unwrap_err();
            assert!(e.contains(why), "{jwk}: {e}");
            let file = json!({ "keys": [jwk.clone(), good.clone()] }).to_string();
            let e = KeySet::from_jwks(&file).unwrap_err();
            assert!(e.contains("key #1 (kid \"bad\")") && e.contains(why), "{e}");
            let (set, _, refused) = KeySet::from_fetched_jwks(&file).unwrap();
            assert!(set.get("bad").is_none() && set.get("good").is_some());
            assert_eq!(refused.len(), 1, "{refused:?}");
            let alone = json!({ "keys": [jwk] }).to_string();
            assert!(KeySet::from_fetched_jwks(&alone).unwrap_err().contains(why));
        }
        for fine in [
            rsa.clone(),
            with(&ed, "key_ops", json!(["verify"])),
            with(&ed, "key_ops", json!(["sign", "verify"])),
            with(&ed, "use", json!("sig")),
        ] {
            assert!(check_jwk(&fine).is_ok(), "{fine}");
            let doc = json!({ "keys": [fine] }).to_string();
            assert!(KeySet::from_jwks(&doc).is_ok());
        }
    }

    #[test]
    fn weak_rsa_pem_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = crate::demo::TokenSigner::generate(Algorithm::RS256, "k");
        let strong = dir.path().join("strong.pem");
        std::fs::write(&strong, rsa.public_key_pem()).unwrap();
        assert!(KeySet::load(None, &[(strong, None)]).is_ok());
        let n = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            rsa.jwk()["n"].as_str().unwrap(),
        )
        .unwrap();
        for (name, pem, why) in [
            ("weak.pem", rsa_spki_pem(&n[..128], &[1, 0, 1]), "1024 bits"),
            ("e1.pem", rsa_spki_pem(&n, &[1]), "exponent 1 "),
            ("e4.pem", rsa_spki_pem(&n, &[4]), "exponent 4 "),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            let e = KeySet::load(None, &[(path, None)]).unwrap_err();
            assert!(e[0].contains(name) && e[0].contains(why), "{e:?}");
        }
        // The hand-made DER is right: the full-size modulus loads.
        let path = dir.path().join("same.pem");
        std::fs::write(&path, rsa_spki_pem(&n, &[1, 0, 1])).unwrap();
        assert!(KeySet::load(None, &[(path, None)]).is_ok());
    }

    #[test]
    fn jwk_alg_must_fit_its_key_type() {
        let bad = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"RS256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(KeySet::from_jwks(bad).unwrap_err().contains("does not fit"));
    }
}
