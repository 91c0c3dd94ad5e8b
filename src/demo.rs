//! Throwaway material for trying Portcullis and for its tests: certificate authorities,
//! client certificates, signing keys and tokens, generated in memory at run time.
//! Nothing here is fit for production; `portcullis demo` writes it to a directory whose
//! private keys are named `*.throwaway.key`.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// A certificate authority that can issue client certificates and intermediates.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
    params
}

fn new_key() -> KeyPair {
    // ECDSA P-256 key generation only fails if the system RNG does; test material only.
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key")
}

impl Authority {
    /// A self-signed root.
    pub fn root(name: &str) -> Authority {
        let issuer =
            CertifiedIssuer::self_signed(ca_params(name), new_key()).expect("self-sign a CA");
        Authority { issuer }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Authority {
        let issuer = CertifiedIssuer::signed_by(ca_params(name), new_key(), &self.issuer)
            .expect("sign an intermediate");
        Authority { issuer }
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A CRL (PEM) from this authority revoking `revoked`, issued two days ago and valid
    /// for `valid_for` from now (a negative span, down to two days, makes it expired).
    pub fn crl(&self, revoked: &[&ClientCert], valid_for: Duration) -> String {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::days(2),
            next_update: now + valid_for,
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|c| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&c.serial()),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("sign a CRL")
            .pem()
            .expect("CRL PEM")
    }

    /// Issues a certificate as `spec` describes.
    pub fn issue(&self, spec: &LeafSpec) -> ClientCert {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.clone());
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("ASCII URI")))
            .chain(
                spec.dns
                    .iter()
                    .map(|d| SanType::DnsName(d.as_str().try_into().expect("ASCII name"))),
            )
            .chain(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        if spec.ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            if spec.signing {
                params.key_usages.push(KeyUsagePurpose::KeyCertSign);
            }
        }
        params.extended_key_usages = vec![if spec.client_auth {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = new_key();
        let cert = params.signed_by(&key, &self.issuer).expect("sign a leaf");
        ClientCert {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// What a generated client certificate should look like.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The subject's common name.
    pub common_name: String,
    /// URI SANs (a SPIFFE ID goes here).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP address SANs.
    pub ips: Vec<std::net::IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether the certificate is for client authentication (extended key usage).
    pub client_auth: bool,
    /// Whether the certificate is a CA (to test that one is refused as a client).
    pub ca: bool,
    /// Key usage keyCertSign on a leaf that is not a CA (X509-SVID forbids it; for tests).
    pub signing: bool,
}

impl LeafSpec {
    /// A TLS server certificate for 127.0.0.1 and localhost (for test servers).
    pub fn loopback_server() -> LeafSpec {
        let mut spec = LeafSpec::spiffe("spiffe://example.org/test-server");
        spec.common_name = "localhost".into();
        spec.uris.clear();
        spec.dns = vec!["localhost".into()];
        spec.ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
        spec.client_auth = false;
        spec
    }

    /// A valid client certificate for a SPIFFE ID, good from an hour ago for a day.
    pub fn spiffe(id: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: id.rsplit('/').next().unwrap_or(id).to_string(),
            uris: vec![id.to_string()],
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
            client_auth: true,
            ca: false,
            signing: false,
        }
    }
}

/// A generated certificate with its throwaway key.
pub struct ClientCert {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The certificate, PEM.
    pub pem: String,
    /// Its private key, PEM (throwaway).
    pub key_pem: String,
}

impl ClientCert {
    /// The certificate as Envoy puts it in `source.certificate`.
    pub fn envoy_encoded(&self) -> String {
        envoy_url_encode(&self.pem)
    }
    /// The serial number's bytes.
    pub fn serial(&self) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::prelude::X509Certificate::from_der(&self.der)
            .expect("own certificate parses");
        cert.tbs_certificate.raw_serial().to_vec()
    }

    /// RFC 8705 `x5t#S256`.
    pub fn thumbprint(&self) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.der);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
    }
}

pub use crate::facts::envoy_url_encode;

type PemLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;

/// A token signing key of one algorithm.
pub struct TokenSigner {
    /// The algorithm it signs with.
    pub alg: Algorithm,
    /// The `kid` its tokens name.
    pub kid: String,
    key: EncodingKey,
    key_pair: KeyPair,
}

impl TokenSigner {
    /// A signer for a private key (PKCS#8 PEM) of `alg` (RS256, ES256 or EdDSA).
    pub fn from_pem(alg: Algorithm, kid: &str, pem: &str) -> Result<TokenSigner, String> {
        let make: PemLoader = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem,
            Algorithm::ES256 => EncodingKey::from_ec_pem,
            Algorithm::EdDSA => EncodingKey::from_ed_pem,
            other => return Err(format!("demo signer does not sign {other:?}")),
        };
        let key_pair = KeyPair::from_pem(pem).map_err(|_| "not a PKCS#8 PEM private key")?;
        let key = make(pem.as_bytes()).map_err(|_| format!("not an {alg:?} private key"))?;
        Ok(TokenSigner {
            alg,
            kid: kid.to_string(),
            key,
            key_pair,
        })
    }

    /// SHA-256 of the public key (DER SubjectPublicKeyInfo), lower-case hex: how the demo
    /// manifest names the keys `portcullis demo` wrote.
    pub fn public_key_sha256(&self) -> String {
        use rcgen::PublicKeyData;
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.key_pair.subject_public_key_info(),
        );
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Generates a key for RS256 (2048-bit), ES256 or EdDSA (Ed25519).
    pub fn generate(alg: Algorithm, kid: &str) -> TokenSigner {
        let (rcgen_alg, make): (_, PemLoader) = match alg {
            Algorithm::RS256 => (&rcgen::PKCS_RSA_SHA256, EncodingKey::from_rsa_pem),
            Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, EncodingKey::from_ec_pem),
            Algorithm::EdDSA => (&rcgen::PKCS_ED25519, EncodingKey::from_ed_pem),
            other => panic!("demo signer does not generate {other:?} keys"),
        };
        let key_pair = KeyPair::generate_for(rcgen_alg).expect("generate a signing key");
        let key = make(key_pair.serialize_pem().as_bytes()).expect("load the signing key");
        TokenSigner {
            alg,
            kid: kid.to_string(),
            key,
            key_pair,
        }
    }

    /// The public key as a JWK (RFC 7517, RFC 7518 §6, RFC 8037) with `kid`, `alg` and `use`.
    pub fn jwk(&self) -> Value {
        use rcgen::PublicKeyData;
        use x509_parser::prelude::FromDer;
        use x509_parser::public_key::PublicKey;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let der = self.key_pair.subject_public_key_info();
        let (_, spki) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).expect("own SPKI parses");
        let mut jwk = match (self.alg, spki.parsed()) {
            (Algorithm::RS256, Ok(PublicKey::RSA(rsa))) => {
                // DER integers may carry a leading zero byte; JWK integers do not (RFC 7518 §6.3.1).
                let trim = |b: &[u8]| {
                    b.iter()
                        .skip_while(|&&x| x == 0)
                        .copied()
                        .collect::<Vec<u8>>()
                };
                json!({ "kty": "RSA", "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent)) })
            }
            (Algorithm::ES256, Ok(PublicKey::EC(point))) => {
                let xy = &point.data()[1..];
                json!({ "kty": "EC", "crv": "P-256", "x": b64(&xy[..32]), "y": b64(&xy[32..]) })
            }
            (Algorithm::EdDSA, _) => {
                json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(&spki.subject_public_key.data) })
            }
            (alg, _) => panic!("demo signer has no JWK form for {alg:?}"),
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(format!("{:?}", self.alg));
        jwk["use"] = json!("sig");
        jwk
    }

    /// The public key as a PEM `PUBLIC KEY`.
    pub fn public_key_pem(&self) -> String {
        self.key_pair.public_key_pem()
    }

    /// The private key (PKCS#8 PEM): throwaway material.
    pub fn private_key_pem(&self) -> String {
        self.key_pair.serialize_pem()
    }

    /// Signs `claims` with a header naming this key.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with(&header, claims)
    }

    /// Signs `claims` under a header of the caller's making.
    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.key).expect("sign a token")
    }
}

/// A JWKS document of the signers' public keys.
pub fn jwks(signers: &[&TokenSigner]) -> String {
    let keys: Vec<Value> = signers.iter().map(|s| s.jwk()).collect();
    serde_json::to_string_pretty(&json!({ "keys": keys })).expect("serialize JWKS")
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// The demo identity provider's issuer.
pub const DEMO_ISSUER: &str = "https://idp.example.org";
/// The audience of the demo's tokens.
pub const DEMO_AUDIENCE: &str = "orders";

/// A CheckRequest in proto3 JSON, as Envoy would send it.
pub fn check_request_json(
    method: &str,
    path: &str,
    cert: Option<&ClientCert>,
    token: Option<&str>,
) -> Value {
    let mut headers = json!({
        ":method": method, ":path": path, ":authority": "api.example.org", ":scheme": "https",
        "user-agent": "demo",
    });
    if let Some(t) = token {
        headers["authorization"] = json!(format!("Bearer {t}"));
    }
    let mut source =
        json!({ "address": { "socketAddress": { "address": "10.0.0.7", "portValue": 41000 } } });
    if let Some(c) = cert {
        source["certificate"] = json!(c.envoy_encoded());
    }
    json!({
        "attributes": {
            "source": source,
            "request": { "http": {
                "id": "demo-1", "method": method, "path": path, "host": "api.example.org",
                "scheme": "https", "protocol": "HTTP/2", "headers": headers,
            }},
        }
    })
}

/// Writes a complete demo: CA chain, client certificates, an identity provider's keys,
/// tokens and ready-made CheckRequests. Returns what was written.
pub fn write_demo(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut written = Vec::new();
    let mut put = |name: &str, content: &str| -> std::io::Result<()> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        written.push(path.display().to_string());
        Ok(())
    };
    let root = Authority::root("Portcullis demo root CA (throwaway)");
    let inter = root.intermediate("Portcullis demo intermediate CA (throwaway)");
    put("ca.pem", &root.cert_pem())?;
    put("intermediate.pem", &inter.cert_pem())?;
    let frontend = inter.issue(&LeafSpec::spiffe(
        "spiffe://example.org/ns/prod/sa/frontend",
    ));
    let batch = inter.issue(&LeafSpec::spiffe("spiffe://example.org/ns/prod/sa/batch"));
    for (name, cert) in [("frontend", &frontend), ("batch", &batch)] {
        put(&format!("clients/{name}.pem"), &cert.pem)?;
        put(&format!("clients/{name}.throwaway.key"), &cert.key_pem)?;
    }
    let signer = TokenSigner::generate(Algorithm::ES256, "demo-es256");
    put("idp.jwks.json", &jwks(&[&signer]))?;
    put(DEMO_KEY_FILE, &signer.private_key_pem())?;
    let manifest = Manifest {
        about: MANIFEST_ABOUT.to_string(),
        signing_keys: vec![ManifestKey {
            file: DEMO_KEY_FILE.to_string(),
            alg: format!("{:?}", signer.alg),
            kid: signer.kid.clone(),
            public_key_sha256: signer.public_key_sha256(),
        }],
    };
    put(
        MANIFEST_FILE,
        &serde_json::to_string_pretty(&manifest).unwrap_or_default(),
    )?;

    let now = unix_now();
    let claims = |sub: &str, groups: &[&str], scope: &str, bind: Option<&ClientCert>| {
        let mut c = json!({
            "iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "sub": sub, "iat": now, "exp": now + 3600,
            "groups": groups, "scope": scope,
        });
        if let Some(cert) = bind {
            c["cnf"] = json!({ "x5t#S256": cert.thumbprint() });
        }
        c
    };
    let alice = signer.sign(&claims(
        "alice",
        &["order-readers"],
        "orders:read",
        Some(&frontend),
    ));
    let mallory = signer.sign(&claims("mallory", &["guests"], "", None));
    put("tokens/alice.jwt", &alice)?;
    put("tokens/mallory.jwt", &mallory)?;

    let requests = [
        (
            "alice-reads-order",
            check_request_json(
                "GET",
                "/orders/42?expand=items",
                Some(&frontend),
                Some(&alice),
            ),
        ),
        (
            "alice-token-replayed-by-batch",
            check_request_json("GET", "/orders/42", Some(&batch), Some(&alice)),
        ),
        (
            "mallory-reads-order",
            check_request_json("GET", "/orders/42", Some(&frontend), Some(&mallory)),
        ),
        (
            "batch-reads-catalog",
            check_request_json("GET", "/catalog/items", Some(&batch), None),
        ),
        (
            "anonymous",
            check_request_json("GET", "/orders/42", None, None),
        ),
    ];
    for (name, req) in requests {
        put(
            &format!("requests/{name}.json"),
            &serde_json::to_string_pretty(&req).unwrap_or_default(),
        )?;
    }
    Ok(written)
}

/// The demo identity provider's private key, as `portcullis demo` names it in its directory.
pub const DEMO_KEY_FILE: &str = "idp.throwaway.key";
/// The file `portcullis demo` writes beside its keys, listing the signing keys it generated
/// by their public key's SHA-256. `portcullis token` signs only with a key listed there.
pub const MANIFEST_FILE: &str = "demo-manifest.json";
const MANIFEST_ABOUT: &str =
    "written by `portcullis demo`: throwaway keys for trying Portcullis, never for production";

/// `demo-manifest.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    about: String,
    signing_keys: Vec<ManifestKey>,
}

/// A signing key `portcullis demo` generated.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestKey {
    /// Its file name, in the manifest's directory.
    file: String,
    /// `ES256`, `RS256` or `EdDSA`.
    alg: String,
    /// The `kid` of its JWK in `idp.jwks.json`.
    kid: String,
    /// SHA-256 of its public key (DER SubjectPublicKeyInfo), lower-case hex.
    public_key_sha256: String,
}

/// What `portcullis token` puts in a token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// `sub`.
    pub subject: String,
    /// `iss`.
    pub issuer: String,
    /// `aud`: a string when there is one, an array otherwise (none: no `aud`).
    pub audiences: Vec<String>,
    /// The groups claim (`groups`), when not empty.
    pub groups: Vec<String>,
    /// `scope`, space-separated (RFC 8693 §4.2), when not empty.
    pub scopes: Vec<String>,
    /// Further claims, applied last: they may replace any of the above (to try the server's
    /// checks, `exp` in the past for instance).
    pub claims: Vec<(String, Value)>,
    /// `iat` is `now`, `exp` is `now + lifetime`.
    pub lifetime: std::time::Duration,
    /// A certificate (PEM, leaf first) the token is bound to: `cnf.x5t#S256` (RFC 8705 §3.1).
    pub bind_pem: Option<String>,
    /// Seconds since the Unix epoch.
    pub now: i64,
}

/// Parses `--claim key=value`: the value as JSON when it is JSON (`3`, `true`,
/// `["a","b"]`, `"01234"`), as a string otherwise.
pub fn parse_claim(arg: &str) -> Result<(String, Value), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("claim \"{arg}\": expected KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("claim \"{arg}\": the claim's name is empty"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
    Ok((key.to_string(), value))
}

/// Signs a token as [`TokenSpec`] describes with the demo identity provider's key at
/// `key_path`.
///
/// SECURITY: only a key `portcullis demo` wrote is used: the manifest beside it
/// ([`MANIFEST_FILE`]) must list the key's file name with its public key's SHA-256. A
/// production key has another fingerprint and is refused, so this tool cannot mint tokens
/// a real deployment would accept.
pub fn mint_token(key_path: &Path, spec: &TokenSpec) -> Result<String, String> {
    let shown = key_path.display();
    let pem = crate::files::read_to_string(key_path).map_err(|e| {
        format!(
            "{e} (the demo identity provider's key, as `portcullis demo` wrote it: run `portcullis demo` here first, or give its path with --key)"
        )
    })?;
    let dir = key_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let manifest_path = dir.join(MANIFEST_FILE);
    let refused = |why: String| {
        format!(
            "{shown}: refused: {why}; `portcullis token` signs only with the throwaway key \
             `portcullis demo` writes (demo/{DEMO_KEY_FILE}), never a real identity provider's"
        )
    };
    let manifest: Manifest = match crate::files::read_to_string(&manifest_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            refused(format!(
                "{} is not a demo manifest ({e})",
                manifest_path.display()
            ))
        })?,
        Err(_) => {
            return Err(refused(format!(
                "no {} beside it: not a key written by `portcullis demo`",
                manifest_path.display()
            )));
        }
    };
    let file_name = key_path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    // The key is parsed with the algorithm its manifest entry names, once the entry is
    // found by file name; its fingerprint must then match, or it is not the demo's key.
    let entry = manifest
        .signing_keys
        .iter()
        .find(|k| k.file == file_name)
        .ok_or_else(|| {
            refused(format!(
                "{} lists no key named \"{file_name}\"",
                manifest_path.display()
            ))
        })?;
    let alg = match entry.alg.as_str() {
        "ES256" => Algorithm::ES256,
        "RS256" => Algorithm::RS256,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(refused(format!("unknown algorithm \"{other}\""))),
    };
    let signer = TokenSigner::from_pem(alg, &entry.kid, &pem).map_err(refused)?;
    if signer.public_key_sha256() != entry.public_key_sha256 {
        return Err(refused(format!(
            "its public key is not the one {} lists",
            manifest_path.display()
        )));
    }

    let lifetime = i64::try_from(spec.lifetime.as_secs()).unwrap_or(i64::MAX);
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), json!(spec.issuer));
    claims.insert("sub".into(), json!(spec.subject));
    match spec.audiences.as_slice() {
        [] => {}
        [one] => {
            claims.insert("aud".into(), json!(one));
        }
        many => {
            claims.insert("aud".into(), json!(many));
        }
    }
    claims.insert("iat".into(), json!(spec.now));
    claims.insert("exp".into(), json!(spec.now.saturating_add(lifetime)));
    if !spec.groups.is_empty() {
        claims.insert("groups".into(), json!(spec.groups));
    }
    if !spec.scopes.is_empty() {
        claims.insert("scope".into(), json!(spec.scopes.join(" ")));
    }
    if let Some(pem) = &spec.bind_pem {
        claims.insert("cnf".into(), json!({ "x5t#S256": thumbprint_of_pem(pem)? }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in &spec.claims {
        if !seen.insert(key) {
            return Err(format!("claim \"{key}\" is given twice"));
        }
        claims.insert(key.clone(), value.clone());
    }
    Ok(signer.sign(&Value::Object(claims)))
}

/// RFC 8705 `x5t#S256` of the first certificate in `pem`.
fn thumbprint_of_pem(pem: &str) -> Result<String, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no PEM certificate to bind the token to")?
        .map_err(|e| format!("the certificate to bind to is not PEM: {e}"))?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_json_when_it_parses_as_json() {
        let table: &[(&str, Value)] = &[
            ("n=3", json!(3)),
            ("b=true", json!(true)),
            ("r=[\"a\",\"b\"]", json!(["a", "b"])),
            ("z=\"01234\"", json!("01234")),
            ("e=a@example.org", json!("a@example.org")),
            ("s=a=b", json!("a=b")),
            ("x=", json!("")),
        ];
        for (arg, value) in table {
            let (key, parsed) = parse_claim(arg).unwrap();
            assert_eq!((key.as_str(), &parsed), (&arg[..1], value), "{arg}");
        }
        assert!(parse_claim("novalue").is_err());
        assert!(parse_claim("=3").is_err());
    }
}
