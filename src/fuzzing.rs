//! Fuzz harnesses: raw bytes in, the real parser run on them, invariants asserted. One
//! `pub fn` per cargo-fuzz target in `fuzz/`; `tests/in_process/fuzz_corpus.rs` replays the committed
//! corpora (and crash reproducers) through the same functions on the stable toolchain.
//! Not part of the API.
//!
//! A panic here is a finding, so these functions assert and `expect` on purpose.
//! The trust material is throwaway, generated once per process: no input can carry a
//! signature made with it, so every certificate or token read from raw input must be
//! rejected. [`issued_certificate`] and [`signed_jwt`] sign what the fuzzer chose with that
//! material, to reach the checks that run after the signature.

use crate::config::{IssuerSettings, Limits, Settings};
use crate::demo::{self, Authority, ClientCert, LeafSpec, TokenSigner};
use crate::facts::{self, FactsError, RequestFacts};
use crate::identity::keys::{KeySet, family_of};
use crate::identity::revocation::RevocationList;
use crate::identity::{
    CertRejection, CertSources, PeerIdentity, PeerOutcome, PeerVerifier, TokenClaims, TokenOutcome,
    TokenSources, TokenVerifier, Verifier, xfcc,
};
use crate::proto;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use crate::spiffe::SpiffeId;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message as _;
use rustls_pki_types::UnixTime;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The issuer whose keys are a JWKS document (ES256, EdDSA and RS256, each with a `kid`).
pub const JWKS_ISSUER: &str = "https://idp.example.org";
/// The issuer with one PEM key and no `kid`, `typ = "at+jwt"`, binding required.
pub const PEM_ISSUER: &str = "https://pem.example.org";
/// The clock of every token check: fixed, so that seed tokens stay current.
pub const TOKEN_NOW: i64 = 1_750_000_000;
/// In a [`signed_jwt`] payload, replaced by the `x5t#S256` of the certificate passed as peer.
pub const X5T_PLACEHOLDER: &str = "$X5T";
/// A token id and a subject on the revocation list.
pub const REVOKED_JTI: &str = "revoked-jti";
pub const REVOKED_SUBJECT: &str = "revoked-user";
/// The trust domain the peer verifier accepts.
pub const TRUST_DOMAIN: &str = "example.org";

const CHECK_REQUEST: &str = "envoy.service.auth.v3.CheckRequest";

/// The configuration of the harness verifiers; paths are relative to a directory of
/// throwaway files written once per process.
pub const WORLD_CONFIG: &str = r#"
[server]
http = "127.0.0.1:9192"

[peer]
trust_bundle = "ca.pem"
crls = ["intermediate.crl.pem"]
trust_domains = ["example.org"]
header = "x-client-cert"
xfcc = "nearest"

[token]
revoked = "revoked.txt"
header = "x-token"
cookie = "session"

[[issuer]]
issuer = "https://idp.example.org"
audiences = ["orders"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256", "EdDSA", "RS256", "PS256", "ES384"]
leeway = "30s"
max_lifetime = "1h"
required_claims = ["sub"]

[[issuer]]
issuer = "https://pem.example.org"
audiences = ["orders", "billing"]
pem_keys = [{ path = "pem-issuer.pub.pem" }]
algorithms = ["ES256"]
typ = "at+jwt"
require_binding = true
required_claims = ["jti"]
groups_claim = "roles"
id_prefix = "pem|"

[forward_auth]
"#;

/// A throwaway signing key of one issuer, for [`signed_jwt`].
struct SigningKey {
    issuer: &'static str,
    alg: Algorithm,
    /// The header used when the input supplies none.
    default_header: String,
    key: EncodingKey,
}

/// Everything the harnesses verify against, built once per process.
struct World {
    now_secs: i64,
    root: Authority,
    inter: Authority,
    inter_pem: String,
    inter_der: Vec<u8>,
    /// Issued by `inter`, valid, and on the intermediate's CRL.
    revoked_leaf: ClientCert,
    /// Trusts the root only: a leaf of the intermediate needs its chain presented.
    peer: PeerVerifier,
    peer_cached: PeerVerifier,
    tokens: TokenVerifier,
    tokens_cached: TokenVerifier,
    signers: Vec<SigningKey>,
    /// A verified certificate, for tokens bound to one (`cnf.x5t#S256`).
    bound_peer: Arc<PeerIdentity>,
    settings: Settings,
    /// The whole identity stage, with every certificate and token source configured.
    verifier: Verifier,
}

impl World {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.now_secs.unsigned_abs())
    }
    fn now_unix(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(self.now_secs.unsigned_abs()))
    }
    fn issuer(&self, name: &str) -> &IssuerSettings {
        self.settings
            .issuers
            .iter()
            .find(|i| i.issuer == name)
            .expect("issuer configured")
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(build_world)
}

fn build_world() -> World {
    let now_secs = demo::unix_now();
    let root = Authority::root("Portcullis fuzz root CA (throwaway)");
    let inter = root.intermediate("Portcullis fuzz intermediate CA (throwaway)");
    let inter_pem = inter.cert_pem();
    let inter_der = pem_to_der(&inter_pem);
    let revoked_leaf = inter.issue(&LeafSpec::spiffe("spiffe://example.org/ns/fuzz/sa/revoked"));
    let bound_leaf = inter.issue(&LeafSpec::spiffe("spiffe://example.org/ns/fuzz/sa/client"));

    let es = TokenSigner::generate(Algorithm::ES256, "fuzz-es256");
    let ed = TokenSigner::generate(Algorithm::EdDSA, "fuzz-ed25519");
    let rs = TokenSigner::generate(Algorithm::RS256, "fuzz-rs256");
    let pem = TokenSigner::generate(Algorithm::ES256, "unused");

    let dir = std::env::temp_dir().join(format!(
        "portcullis-fuzz-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("create the harness directory");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).expect("write a harness file");
    };
    write("ca.pem", &root.cert_pem());
    write(
        "intermediate.crl.pem",
        &inter.crl(&[&revoked_leaf], time::Duration::days(1)),
    );
    write("idp.jwks.json", &demo::jwks(&[&es, &ed, &rs]));
    write("pem-issuer.pub.pem", &pem.public_key_pem());
    write(
        "revoked.txt",
        &format!("jti:{REVOKED_JTI}\nsub:{REVOKED_SUBJECT}\n"),
    );
    let settings = Settings::from_toml(WORLD_CONFIG, &dir).expect("harness configuration");
    let peer_settings = settings.peer.as_ref().expect("[peer] configured");
    let load_peer = |cache| PeerVerifier::load(peer_settings, cache).expect("peer verifier");
    let load_tokens = |cache| {
        TokenVerifier::load(&settings.issuers, &settings.token, cache).expect("token verifier")
    };
    let (peer, peer_cached) = (load_peer(0), load_peer(64));
    let (tokens, tokens_cached) = (load_tokens(0), load_tokens(64));
    let verifier = Verifier::new(
        load_tokens(0),
        TokenSources {
            header: settings.token.header.clone(),
            cookie: settings.token.cookie.clone(),
            pass_schemes: settings.token.pass_schemes.clone(),
        },
        CertSources {
            header: peer_settings.header.clone(),
            xfcc: peer_settings.xfcc,
        },
    );
    // Everything is loaded; nothing reads the files again.
    let _ = std::fs::remove_dir_all(&dir);

    let now_unix = UnixTime::since_unix_epoch(Duration::from_secs(now_secs.unsigned_abs()));
    let bound_peer = peer
        .verify_url_encoded_pem(
            &demo::envoy_url_encode(&format!("{}{}", bound_leaf.pem, inter_pem)),
            now_unix,
        )
        .expect("the harness certificate verifies");

    let private = |s: &TokenSigner| s.private_key_pem().into_bytes();
    let header = |alg: &str, kid: Option<&str>, typ: &str| {
        let mut h = serde_json::json!({ "alg": alg, "typ": typ });
        if let Some(kid) = kid {
            h["kid"] = kid.into();
        }
        h.to_string()
    };
    let signers = vec![
        SigningKey {
            issuer: JWKS_ISSUER,
            alg: Algorithm::ES256,
            default_header: header("ES256", Some("fuzz-es256"), "JWT"),
            key: EncodingKey::from_ec_pem(&private(&es)).expect("ES256 key"),
        },
        SigningKey {
            issuer: JWKS_ISSUER,
            alg: Algorithm::EdDSA,
            default_header: header("EdDSA", Some("fuzz-ed25519"), "JWT"),
            key: EncodingKey::from_ed_pem(&private(&ed)).expect("EdDSA key"),
        },
        SigningKey {
            issuer: JWKS_ISSUER,
            alg: Algorithm::RS256,
            default_header: header("RS256", Some("fuzz-rs256"), "JWT"),
            key: EncodingKey::from_rsa_pem(&private(&rs)).expect("RS256 key"),
        },
        SigningKey {
            issuer: PEM_ISSUER,
            alg: Algorithm::ES256,
            default_header: header("ES256", None, "at+jwt"),
            key: EncodingKey::from_ec_pem(&private(&pem)).expect("ES256 key"),
        },
    ];
    World {
        now_secs,
        root,
        inter,
        inter_pem,
        inter_der,
        revoked_leaf,
        peer,
        peer_cached,
        tokens,
        tokens_cached,
        signers,
        bound_peer,
        settings,
        verifier,
    }
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("own PEM certificate")
        .to_vec()
}

/// Every error is shown to someone: it must say something.
fn assert_message(message: &str) {
    assert!(!message.trim().is_empty(), "empty error message");
}

/// The request path as an upstream sees it after decoding it once and resolving dot
/// segments must be the path a policy matched: no encoded `/`, no empty or dot segment,
/// no `\` or `;`, nothing needlessly percent-encoded (RFC 3986 §2.3, §6.2.2).
fn assert_canonical_path(path: &str) {
    assert!(
        path.starts_with('/'),
        "path {path:?} does not start with '/'"
    );
    assert!(
        !path
            .bytes()
            .any(|b| b.is_ascii_control() || b" #?\\;".contains(&b)),
        "path {path:?} has a forbidden character"
    );
    let raw_segments = path[1..].split('/').count();
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    let segments: Vec<&[u8]> = decoded[1..].split(|&b| b == b'/').collect();
    assert_eq!(raw_segments, segments.len(), "encoded '/' in {path:?}");
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        assert!(i == last || !seg.is_empty(), "empty segment in {path:?}");
        assert!(*seg != b"." && *seg != b"..", "dot segment in {path:?}");
        assert!(
            !seg.contains(&b'\\') && !seg.contains(&b';'),
            "encoded '\\' or ';' in {path:?}"
        );
    }
    for (i, _) in path.match_indices('%') {
        let byte = path
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| panic!("malformed percent-encoding in {path:?}"));
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "needlessly percent-encoded character in {path:?}"
        );
    }
}

/// `facts::split_path`: a request target split into a canonical path and its query.
pub fn split_path(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    match facts::split_path(&raw) {
        Ok((path, query)) => {
            assert_canonical_path(&path);
            if raw.contains('?') {
                assert_eq!(format!("{path}?{query}"), raw);
            } else {
                assert_eq!((path.as_str(), query.as_str()), (&*raw, ""));
            }
            assert_eq!(
                facts::split_path(&path),
                Ok((path.clone(), String::new())),
                "a canonical path splits to itself"
            );
        }
        Err(e) => assert_message(&e.to_string()),
    }
}

/// Writes elements back in Envoy's syntax, every value quoted.
fn write_xfcc(elements: &[xfcc::XfccElement]) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let element = |e: &xfcc::XfccElement| {
        let mut pairs = Vec::new();
        pairs.extend(e.by.iter().map(|v| format!("By={}", quote(v))));
        pairs.extend(e.hash.iter().map(|v| format!("Hash={v}")));
        pairs.extend(e.cert.iter().map(|v| format!("Cert={}", quote(v))));
        pairs.extend(e.chain.iter().map(|v| format!("Chain={}", quote(v))));
        pairs.extend(e.subject.iter().map(|v| format!("Subject={}", quote(v))));
        pairs.extend(e.uri.iter().map(|v| format!("URI={}", quote(v))));
        pairs.extend(e.dns.iter().map(|v| format!("DNS={}", quote(v))));
        if pairs.is_empty() {
            // An element of unknown keys only: keep an unknown key so that it stays an element.
            pairs.push("X=1".into());
        }
        pairs.join(";")
    };
    elements.iter().map(element).collect::<Vec<_>>().join(",")
}

/// `identity::xfcc`: `parse` and `nearest` agree, the caps hold, the elements read the
/// same when written back, and the nearest element's certificate never verifies.
pub fn xfcc(data: &[u8]) {
    let header = String::from_utf8_lossy(data);
    let parsed = xfcc::parse(&header);
    assert_eq!(xfcc::nearest(&header), parsed.clone().map(|mut e| e.pop()));
    let elements = match parsed {
        Ok(elements) => elements,
        Err(e) => {
            let message = e.to_string();
            assert_message(&message);
            // Peer-supplied parts are quoted as short excerpts only.
            assert!(message.chars().count() <= 512, "long error: {message:?}");
            return;
        }
    };
    assert!(header.len() <= xfcc::MAX_HEADER_BYTES);
    assert!(elements.len() <= xfcc::MAX_ELEMENTS);
    for e in &elements {
        assert!(
            e.by.iter()
                .chain(&e.uri)
                .chain(&e.dns)
                .all(|v| !v.is_empty()),
            "empty By, URI or DNS kept: {e:?}"
        );
        if let Some(hash) = &e.hash {
            assert!(
                hash.len() == 64
                    && hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "hash {hash:?}"
            );
        }
    }
    if !elements.is_empty() {
        let again = write_xfcc(&elements);
        if again.len() <= xfcc::MAX_HEADER_BYTES {
            assert_eq!(xfcc::parse(&again), Ok(elements.clone()), "{again:?}");
        }
    }
    if let Some(last) = elements.last() {
        let w = world();
        match w.peer.verify_xfcc(last, w.now_unix()) {
            Ok(Some(id)) => panic!("a certificate from raw input verified: {id:?}"),
            Ok(None) => assert!(last.cert.is_none()),
            Err(e) => assert_message(&e.to_string()),
        }
    }
}

/// `PeerVerifier::verify_url_encoded_pem` (URL-encoded PEM, Traefik's base64 DER): raw
/// input never verifies, and the cached verifier says exactly what the uncached one says.
pub fn peer_certificate(data: &[u8]) {
    let w = world();
    let encoded = String::from_utf8_lossy(data);
    let e = w
        .peer
        .verify_url_encoded_pem(&encoded, w.now_unix())
        .expect_err("a certificate from raw input verified");
    let cached = w.peer_cached.verify_url_encoded_pem(&encoded, w.now_unix());
    assert_eq!(cached.map(|_| ()), Err(e.clone()));
    let message = e.to_string();
    assert_message(&message);
    // Only for what looks like a certificate (an error message sent as one may well come
    // back in the message for it).
    let certificate_like = encoded
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=%,-\n".contains(&b));
    if encoded.len() >= 64 && certificate_like {
        assert!(!message.contains(&*encoded), "error quotes the certificate");
    }
}

/// What an issued certificate must verify to, and how it is presented.
struct Issued {
    uris: Vec<String>,
    dns: Vec<String>,
    not_before: i64,
    not_after: i64,
    leaf: ClientCert,
}

/// Certificates issued at run time by the harness CAs, as the fuzzer describes them, then
/// presented in every supported form. Accepted exactly when the certificate is a
/// client-auth leaf, current, chains to the root, and meets the SPIFFE rules; an accepted
/// identity reads back what was issued.
///
/// Input: `flags, not_before, not_after, extra`, then lines: a common name, then up to four
/// of `uri:<URI SAN>` and `dns:<DNS SAN>`. `flags`: 1 client auth, 2 CA, 4 issued by the
/// root (else by the intermediate), 8 chain presented, 16 and 32 the encoding (Envoy's
/// URL-encoded PEM, plain PEM, Traefik's base64 DER, URL-escaped base64 DER), 64 through
/// `x-forwarded-client-cert`, 128 with a wrong `Hash` there. `not_before` and `not_after`
/// are signed offsets from now in units of ten minutes. `extra`: 1 presents the revoked
/// certificate instead.
pub fn issued_certificate(data: &[u8]) {
    let w = world();
    let [flags, nb, na, extra, rest @ ..] = data else {
        return;
    };
    let client_auth = flags & 1 != 0;
    let ca = flags & 2 != 0;
    let by_root = flags & 4 != 0;
    let with_chain = flags & 8 != 0;
    let encoding = (flags >> 4) & 3;
    let via_xfcc = flags & 64 != 0;
    let bad_hash = flags & 128 != 0;
    let use_revoked = extra & 1 != 0;

    let mut lines = rest.split(|&b| b == b'\n');
    let common_name = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    for line in lines {
        if uris.len() + dns.len() == 4 {
            break;
        }
        // rcgen takes SANs as IA5String: ASCII only.
        if !line.is_ascii() || line.len() > 256 {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        if let Some(uri) = text.strip_prefix("uri:") {
            uris.push(uri.to_string());
        } else if let Some(name) = text.strip_prefix("dns:") {
            dns.push(name.to_string());
        }
    }
    let at = |offset: u8| w.now_secs + i64::from(offset as i8) * 600;
    let timestamp = |secs| time::OffsetDateTime::from_unix_timestamp(secs).expect("in range");
    let issued = if use_revoked {
        None
    } else {
        let spec = LeafSpec {
            common_name,
            uris: uris.clone(),
            dns: dns.clone(),
            ips: Vec::new(),
            not_before: timestamp(at(*nb)),
            not_after: timestamp(at(*na)),
            client_auth,
            ca,
            signing: false,
        };
        let issuer = if by_root { &w.root } else { &w.inter };
        Some(Issued {
            uris,
            dns,
            not_before: at(*nb),
            not_after: at(*na),
            leaf: issuer.issue(&spec),
        })
    };
    let leaf = issued.as_ref().map_or(&w.revoked_leaf, |i| &i.leaf);

    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let pem_chain = if with_chain {
        format!("{}{}", leaf.pem, w.inter_pem)
    } else {
        leaf.pem.clone()
    };
    let presented = if via_xfcc {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf.der);
        let mut hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        if bad_hash {
            let flipped = if hash.ends_with('0') { "1" } else { "0" };
            hash.replace_range(63.., flipped);
        }
        let chain = if with_chain {
            format!(";Chain=\"{}\"", demo::envoy_url_encode(&pem_chain))
        } else {
            String::new()
        };
        format!(
            "By=spiffe://example.org/edge;Hash={hash};Cert=\"{}\"{chain};Subject=\"CN=fuzz\";URI=",
            demo::envoy_url_encode(&leaf.pem)
        )
    } else {
        let traefik = if with_chain {
            format!("{},{}", b64(&leaf.der), b64(&w.inter_der))
        } else {
            b64(&leaf.der)
        };
        match encoding {
            0 => demo::envoy_url_encode(&pem_chain),
            1 => pem_chain,
            2 => traefik,
            _ => {
                percent_encoding::utf8_percent_encode(&traefik, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            }
        }
    };
    let verify = |v: &PeerVerifier| -> Result<Arc<PeerIdentity>, CertRejection> {
        if via_xfcc {
            let element = xfcc::nearest(&presented)
                .expect("the harness writes a valid header")
                .expect("one element");
            v.verify_xfcc(&element, w.now_unix())
                .map(|id| id.expect("the element has a certificate"))
        } else {
            v.verify_url_encoded_pem(&presented, w.now_unix())
        }
    };
    let result = verify(&w.peer);
    let cached = verify(&w.peer_cached);
    let again = verify(&w.peer_cached);
    let thumbprint = |r: &Result<Arc<PeerIdentity>, CertRejection>| {
        r.as_ref().map(|id| id.thumbprint()).map_err(Clone::clone)
    };
    assert_eq!(
        thumbprint(&cached),
        thumbprint(&result),
        "cache miss differs"
    );
    assert_eq!(thumbprint(&again), thumbprint(&result), "cache hit differs");

    let Some(issued) = issued else {
        let e = result.expect_err("a revoked certificate verified");
        if with_chain && !(via_xfcc && bad_hash) {
            assert_eq!(e, CertRejection::Revoked);
        }
        return;
    };
    if via_xfcc && bad_hash {
        assert!(
            matches!(result, Err(CertRejection::Xfcc(_))),
            "a wrong Hash was not refused: {result:?}"
        );
        return;
    }
    // The scheme in any case: `spIffe:` must not pass as a certificate without a SPIFFE ID.
    let spiffe_like = issued.uris.iter().any(|u| {
        u.get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"))
    });
    let spiffe_ok = !spiffe_like
        || (issued.uris.len() == 1
            && SpiffeId::try_from(issued.uris[0].as_str())
                .is_ok_and(|id| id.trust_domain().as_str() == TRUST_DOMAIN));
    let current = issued.not_before <= w.now_secs && w.now_secs <= issued.not_after;
    let expected = client_auth && !ca && current && (by_root || with_chain) && spiffe_ok;
    match result {
        Ok(id) => {
            assert!(
                expected,
                "accepted: client_auth {client_auth}, ca {ca}, current {current}, by_root {by_root}, with_chain {with_chain}, spiffe_ok {spiffe_ok}: {id:?}"
            );
            assert_eq!(id.uri_sans(), issued.uris.as_slice());
            assert_eq!(id.dns_sans(), issued.dns.as_slice());
            assert_eq!(id.thumbprint(), issued.leaf.thumbprint());
            assert_eq!(
                (id.not_before(), id.not_after()),
                (issued.not_before, issued.not_after)
            );
            assert_eq!(
                id.spiffe_id().map(ToString::to_string),
                spiffe_like.then(|| issued.uris[0].clone())
            );
            // The documented rule: SPIFFE ID, else the first DNS SAN that is a host name,
            // else the subject.
            let host_name = |d: &&String| {
                !d.is_empty()
                    && d.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b))
            };
            let workload = match (id.spiffe_id(), issued.dns.iter().find(host_name)) {
                (Some(s), _) => s.to_string(),
                (None, Some(d)) => d.clone(),
                (None, None) => id.subject().to_string(),
            };
            assert_eq!(id.workload_id(), workload);
        }
        Err(e) => {
            assert!(
                !expected,
                "refused ({e}) a client-auth leaf that is current, chains to the root and meets the SPIFFE rules: uris {:?}, dns {:?}",
                issued.uris, issued.dns
            );
            assert_message(&e.to_string());
        }
    }
}

/// `TokenVerifier::verify` (JWT header and claims decoding): raw input never verifies,
/// with or without a peer certificate, and the cached verifier says exactly the same.
pub fn jwt(data: &[u8]) {
    let w = world();
    let token = String::from_utf8_lossy(data);
    for peer in [None, Some(w.bound_peer.as_ref())] {
        let e = w
            .tokens
            .verify(&token, peer, TOKEN_NOW)
            .expect_err("a token from raw input verified");
        let cached = w.tokens_cached.verify(&token, peer, TOKEN_NOW);
        assert_eq!(cached.map(|c| c.subject().to_string()), Err(e.clone()));
        let message = e.to_string();
        assert_message(&message);
        // Only for what looks like a token: any text, such as an error message, can be
        // sent as one, and the message for it may well contain it.
        let b64url = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if token.len() >= 16 && token.split('.').all(b64url) && token.split('.').count() == 3 {
            assert!(!message.contains(&*token), "error quotes the token");
        }
    }
}

fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to);
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// Tokens signed at run time with the harness keys, header and payload as the fuzzer wrote
/// them: the checks after the signature (claims, time, audience, binding, type, revocation).
/// An accepted token must satisfy every rule, read independently from its JSON.
///
/// Input: a selector byte, then the header JSON, a NUL byte and the payload JSON (without a
/// NUL, the whole rest is the payload under the key's usual header). Selector modulo 4 picks
/// the key: the JWKS issuer's ES256, EdDSA or RS256 key, or the PEM issuer's ES256 key; bit
/// 4 passes the harness certificate as the peer. [`X5T_PLACEHOLDER`] in the payload becomes
/// that certificate's thumbprint. The clock is [`TOKEN_NOW`].
pub fn signed_jwt(data: &[u8]) {
    let w = world();
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let key = &w.signers[usize::from(selector % 4)];
    let peer = (selector & 4 != 0).then(|| w.bound_peer.as_ref());
    let (header, payload) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (key.default_header.as_bytes(), rest),
    };
    let payload = replace_bytes(
        payload,
        X5T_PLACEHOLDER.as_bytes(),
        w.bound_peer.thumbprint().as_bytes(),
    );
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!("{}.{}", b64(header), b64(&payload));
    let signature =
        jsonwebtoken::crypto::sign(input.as_bytes(), &key.key, key.alg).expect("sign a token");
    let token = format!("{input}.{signature}");

    let result = w.tokens.verify(&token, peer, TOKEN_NOW);
    let subject = |r: &Result<TokenClaims, _>| {
        r.as_ref()
            .map(|c| c.subject().to_string())
            .map_err(Clone::clone)
    };
    let cached = w.tokens_cached.verify(&token, peer, TOKEN_NOW);
    assert_eq!(subject(&cached), subject(&result), "cache miss differs");
    let again = w.tokens_cached.verify(&token, peer, TOKEN_NOW);
    assert_eq!(subject(&again), subject(&result), "cache hit differs");
    match result {
        Ok(claims) => check_accepted_token(w, key, header, &payload, &claims, peer),
        Err(e) => assert_message(&e.to_string()),
    }
}

/// A NumericDate as RFC 7519 §2 reads it: seconds, fractions allowed.
fn numeric_date(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
}

fn check_accepted_token(
    w: &World,
    key: &SigningKey,
    header: &[u8],
    payload: &[u8],
    claims: &TokenClaims,
    peer: Option<&PeerIdentity>,
) {
    let header: Map<String, Value> =
        serde_json::from_slice(header).expect("an accepted header is a JSON object");
    let alg = format!("{:?}", key.alg);
    assert_eq!(
        header.get("alg").and_then(Value::as_str),
        Some(alg.as_str()),
        "accepted under another algorithm than it was signed with"
    );
    assert!(header.get("crit").is_none_or(Value::is_null), "crit");
    let p: Map<String, Value> =
        serde_json::from_slice(payload).expect("an accepted payload is a JSON object");
    assert_eq!(&claims.claims(), &p);
    let s = w.issuer(key.issuer);
    assert_eq!(p.get("iss").and_then(Value::as_str), Some(key.issuer));
    assert_eq!(claims.issuer(), key.issuer);

    let strings = |v: &Value| -> BTreeSet<String> {
        match v {
            Value::String(s) => BTreeSet::from([s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|i| i.as_str().expect("string").to_string())
                .collect(),
            other => panic!("accepted a non-string list: {other}"),
        }
    };
    let audience = strings(p.get("aud").expect("accepted without aud"));
    assert!(s.audiences.iter().any(|a| audience.contains(a)), "audience");
    assert_eq!(
        claims.audience(),
        audience.iter().cloned().collect::<Vec<_>>()
    );

    let leeway = s.leeway.as_secs() as i64;
    let date = |name: &str| p.get(name).map(|v| numeric_date(v).expect("a NumericDate"));
    let exp = date("exp").expect("accepted without exp");
    assert!(TOKEN_NOW <= exp.saturating_add(leeway), "expired");
    assert_eq!(claims.expires_at(), exp);
    if let Some(nbf) = date("nbf") {
        assert!(nbf <= TOKEN_NOW.saturating_add(leeway), "not yet valid");
    }
    let iat = date("iat");
    if let Some(iat) = iat {
        assert!(
            iat <= TOKEN_NOW.saturating_add(leeway),
            "issued in the future"
        );
    }
    let lifetime = exp.saturating_sub(iat.unwrap_or(TOKEN_NOW));
    assert!(lifetime <= s.max_lifetime.as_secs() as i64, "lifetime");

    let sub = p.get("sub").and_then(Value::as_str).expect("a string sub");
    assert!(!sub.is_empty());
    assert_eq!(claims.subject(), sub);
    assert_eq!(claims.principal_id(), format!("{}{sub}", s.id_prefix));
    for name in &s.required_claims {
        assert!(p.get(name).is_some_and(|v| !v.is_null()), "missing {name}");
    }
    // Groups carry the issuer's id prefix, as the subject does.
    let groups = p
        .get(&s.groups_claim)
        .filter(|v| !v.is_null())
        .map(strings)
        .unwrap_or_default();
    let prefixed: BTreeSet<String> = groups
        .iter()
        .map(|g| format!("{}{g}", s.id_prefix))
        .collect();
    assert_eq!(
        claims.groups(),
        prefixed.iter().cloned().collect::<Vec<_>>()
    );

    match p.get("cnf").and_then(|c| c.get("x5t#S256")) {
        Some(x5t) => {
            let peer = peer.expect("a bound token accepted without a certificate");
            assert_eq!(x5t.as_str(), Some(peer.thumbprint().as_str()));
            assert!(claims.bound());
        }
        None => {
            assert!(!claims.bound());
            assert!(!s.require_binding, "an unbound token accepted");
        }
    }
    if let Some(expected) = &s.typ {
        let norm = |t: &str| {
            let t = t.to_ascii_lowercase();
            t.strip_prefix("application/")
                .map(str::to_string)
                .unwrap_or(t)
        };
        let typ = header.get("typ").and_then(Value::as_str).expect("a typ");
        assert_eq!(norm(typ), norm(expected));
    }
    assert_ne!(p.get("jti").and_then(Value::as_str), Some(REVOKED_JTI));
    assert_ne!(sub, REVOKED_SUBJECT);
}

/// `KeySet::from_jwks` (a JWKS file, or a document fetched from an identity provider): an
/// accepted set has keys, and no key ever verifies an HMAC algorithm.
pub fn jwks(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match KeySet::from_jwks(&text) {
        Ok((set, notes)) => {
            assert!(!set.is_empty());
            for note in &notes {
                assert_message(note);
            }
            for kid in set.kids() {
                assert!(set.get(kid).is_some(), "kid {kid:?} not indexed");
            }
            let mut uses = 0;
            for alg in [
                Algorithm::HS256,
                Algorithm::HS384,
                Algorithm::HS512,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
                Algorithm::EdDSA,
            ] {
                let n = set.without_kid(alg).count();
                if family_of(alg).is_none() {
                    assert_eq!(n, 0, "a key accepts {alg:?}");
                }
                uses += n;
            }
            // An RSA key serves the six RS and PS algorithms, any other key one.
            assert!(uses <= 6 * set.len());
        }
        Err(e) => assert_message(&e),
    }
}

/// Small limits, so that the caps are reached by small inputs too.
fn small_limits() -> Limits {
    Limits {
        max_headers: 8,
        max_header_bytes: 512,
        ..Limits::default()
    }
}

/// `CheckRequest` protobuf bytes (what Envoy sends over gRPC), decoded with prost, to
/// request facts and on through the identity stage.
pub fn check_request(data: &[u8]) {
    if let Ok(request) = CheckRequest::decode(data) {
        check_request_properties(&request);
    }
}

/// A `CheckRequest` in proto3 JSON (the `/v1/check` door and `portcullis check`), to
/// request facts and on through the identity stage.
pub fn check_request_json(data: &[u8]) {
    // The door refuses a body that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match proto::from_json::<CheckRequest>(CHECK_REQUEST, text) {
        Ok(request) => check_request_properties(&request),
        Err(e) => assert_message(&e),
    }
}

/// The headers of a request as facts see them, in wire order: name, value bytes.
fn request_headers(request: &CheckRequest) -> Vec<(String, Vec<u8>)> {
    let Some(http) = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return Vec::new();
    };
    // Both forms count against the caps: a request that carries both is compared.
    let map = http.header_map.iter().flat_map(|m| &m.headers).map(|h| {
        let mut bytes = h.value.clone().into_bytes();
        bytes.extend_from_slice(&h.raw_value);
        (h.key.clone(), bytes)
    });
    let plain = http
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()));
    map.chain(plain).collect()
}

fn check_request_properties(request: &CheckRequest) {
    let headers = request_headers(request);
    // Decoded again, each protobuf map iterates in another order.
    let reordered = CheckRequest::decode(request.encode_to_vec().as_slice()).expect("re-decodes");
    // proto3 JSON: what is written reads back, and the JSON door must see the request the
    // gRPC door sees. (Not the same message bit for bit: serde_json's default float parsing
    // may move a double of `metadata_context` by one ulp, which no stage reads.)
    let through_json = proto::to_json(CHECK_REQUEST, request).ok().map(|json| {
        proto::from_json::<CheckRequest>(CHECK_REQUEST, &json.to_string())
            .expect("reads what it wrote")
    });
    for limits in [Limits::default(), small_limits()] {
        let facts = RequestFacts::from_check(request, &limits);
        if let Ok(f) = &facts {
            no_header_dropped(request, f);
        }
        for (other, what) in [
            (Some(&reordered), "the order of a protobuf map"),
            (through_json.as_ref(), "a proto3 JSON round trip"),
        ] {
            let Some(other) = other else { continue };
            // Which cap a request too large for two caps meets first may vary; the facts
            // of a readable request may not.
            match (RequestFacts::from_check(other, &limits), &facts) {
                (Err(_), Err(_)) => {}
                (again, facts) => assert_eq!(&again, facts, "facts depend on {what}"),
            }
        }
        match facts {
            Ok(f) => {
                facts_properties(&f, &limits);
                identity_properties(&f);
            }
            Err(e) => refusal_properties(&e, &headers, &limits),
        }
    }
}

/// Every header value of the request is in the facts, alone or joined with others of the
/// same name. SECURITY: a value silently replaced by another one of the same name
/// (`Authorization` and `authorization`) makes the decision depend on which one won.
fn no_header_dropped(request: &CheckRequest, f: &RequestFacts) {
    let Some(http) = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return;
    };
    // As Envoy means them: a raw value, when there is one, replaces the value.
    let headers: Vec<(String, String)> = match &http.header_map {
        Some(map) if !map.headers.is_empty() => map
            .headers
            .iter()
            .map(|h| match &h.raw_value {
                raw if raw.is_empty() => (h.key.clone(), h.value.clone()),
                raw => (h.key.clone(), String::from_utf8_lossy(raw).into_owned()),
            })
            .collect(),
        _ => http
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    for (name, value) in headers {
        let joined = f
            .headers
            .get(&name.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("header {name:?} dropped"));
        let kept = *joined == value
            || joined.starts_with(&format!("{value},"))
            || joined.ends_with(&format!(",{value}"))
            || joined.contains(&format!(",{value},"));
        assert!(kept, "a value of header {name:?} dropped");
    }
}

/// What every set of facts satisfies, whichever door it came through.
fn facts_properties(f: &RequestFacts, limits: &Limits) {
    assert_canonical_path(&f.path);
    assert!(!f.method.is_empty());
    assert_eq!(f.method, f.method.to_ascii_uppercase());
    assert!(f.headers.len() <= limits.max_headers, "header count");
    let bytes: usize = f.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    // Duplicates are joined with one ',' each.
    assert!(
        bytes <= limits.max_header_bytes + limits.max_headers,
        "header bytes {bytes}"
    );
    for name in f.headers.keys() {
        assert_eq!(name, &name.to_ascii_lowercase());
    }
}

/// A refusal for a cap is only given past the cap.
fn refusal_properties(e: &FactsError, headers: &[(String, Vec<u8>)], limits: &Limits) {
    assert_message(&e.to_string());
    match e {
        FactsError::TooManyHeaders(max) => {
            assert_eq!(*max, limits.max_headers);
            assert!(
                headers.len() > limits.max_headers,
                "refused {} headers as more than {max}",
                headers.len()
            );
        }
        FactsError::HeadersTooLarge(max) => {
            assert_eq!(*max, limits.max_header_bytes);
            let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(
                bytes > limits.max_header_bytes,
                "refused {bytes} header bytes as more than {max}"
            );
        }
        _ => {}
    }
}

/// The identity stage with every source configured: nothing from raw input verifies.
fn identity_properties(f: &RequestFacts) {
    let w = world();
    let identity = w.verifier.verify(Some(&w.peer), f, w.now());
    match &identity.peer {
        PeerOutcome::Verified(id) => panic!("a certificate from raw input verified: {id:?}"),
        PeerOutcome::Rejected(e) => assert_message(&e.to_string()),
        PeerOutcome::NotPresented | PeerOutcome::NotConfigured => {}
    }
    match &identity.token {
        TokenOutcome::Verified(c) => panic!("a token from raw input verified: {c:?}"),
        TokenOutcome::Rejected(e) => assert_message(&e.to_string()),
        TokenOutcome::NotPresented => {}
    }
}

/// Forward-auth headers (nginx `auth_request`, Traefik `forwardAuth`): lines of
/// `name: value`, to `RequestFacts::from_forwarded` with the default header lists, and on
/// through the identity stage. Headers of one list that are present must agree.
pub fn forward_auth(data: &[u8]) {
    let w = world();
    let settings = w
        .settings
        .forward_auth
        .as_ref()
        .expect("[forward_auth] configured");
    let headers: Vec<(String, Vec<u8>)> = data
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (line, &[][..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            (String::from_utf8_lossy(name).into_owned(), value.to_vec())
        })
        .collect();
    let peer = Some(SocketAddr::from(([192, 0, 2, 1], 40000)));
    for limits in [Limits::default(), small_limits()] {
        let f = match RequestFacts::from_forwarded(headers.clone(), settings, peer, &limits) {
            Ok(f) => f,
            Err(e) => {
                refusal_properties(&e, &headers, &limits);
                continue;
            }
        };
        facts_properties(&f, &limits);
        assert!(f.peer_certificate.is_none());
        let mut joined: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &headers {
            let value = String::from_utf8(value.clone()).expect("accepted headers are UTF-8");
            joined
                .entry(name.to_ascii_lowercase())
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        assert_eq!(f.headers, joined);
        // Every header the original request is read from arrived once, or as identical
        // copies; its value is that one copy.
        let copies = |name: &str| -> Vec<String> {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect()
        };
        for list in [
            &settings.method_headers,
            &settings.uri_headers,
            &settings.host_headers,
            &settings.proto_headers,
            &settings.source_headers,
        ] {
            for name in list {
                let c = copies(name);
                assert!(
                    c.windows(2).all(|p| p[0] == p[1]),
                    "header {name} accepted with different copies: {c:?}"
                );
            }
        }
        let present = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter_map(|n| copies(n).into_iter().next().filter(|v| !v.is_empty()))
                .collect()
        };
        for list in [
            &settings.method_headers,
            &settings.uri_headers,
            &settings.proto_headers,
        ] {
            let values = present(list);
            assert!(
                values.windows(2).all(|p| p[0] == p[1]),
                "headers {list:?} disagree: {values:?}"
            );
        }
        let method = &present(&settings.method_headers)[0];
        assert_eq!(f.method, method.to_ascii_uppercase());
        let uri = &present(&settings.uri_headers)[0];
        if uri.contains('?') {
            assert_eq!(uri, &format!("{}?{}", f.path, f.query));
        } else {
            assert_eq!((uri.as_str(), f.query.as_str()), (f.path.as_str(), ""));
        }
        identity_properties(&f);
    }
}

/// `Settings::from_toml` (and the token revocation list, the other text file read at
/// start-up): never a panic; a refusal lists at least one problem, each saying something;
/// accepted settings hold every rule validation promises.
pub fn config(data: &[u8]) {
    // Settings::load reads the file as UTF-8 text first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Settings::from_toml(text, Path::new("/etc/portcullis")) {
        Ok(s) => settings_properties(&s),
        Err(error) => {
            let problems = error.messages();
            assert!(!problems.is_empty(), "refused without a problem");
            for p in &problems {
                assert_message(p);
            }
        }
    }
    if let Err(problems) = RevocationList::parse(text) {
        assert!(!problems.is_empty(), "refused without a problem");
        for p in &problems {
            assert_message(p);
        }
    }
}

fn settings_properties(s: &Settings) {
    let header_name = |h: &str| {
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        assert!(
            !h.is_empty() && h.bytes().all(tchar) && h == h.to_ascii_lowercase(),
            "header name {h:?}"
        );
    };
    let l = &s.limits;
    assert!(
        l.max_message_bytes > 0
            && l.max_headers > 0
            && l.max_header_bytes > 0
            && l.max_concurrent > 0
            && l.max_streams_per_connection > 0
            && !l.request_timeout.is_zero(),
        "limits {l:?}"
    );
    let mut seen = BTreeSet::new();
    for i in &s.issuers {
        assert!(!i.issuer.is_empty());
        assert!(seen.insert(&i.issuer), "issuer {:?} twice", i.issuer);
        assert!(!i.audiences.is_empty() && i.audiences.iter().all(|a| !a.is_empty()));
        assert!(!i.algorithms.is_empty());
        for alg in &i.algorithms {
            assert!(family_of(*alg).is_some(), "{alg:?} allowed");
        }
        assert!(i.leeway <= crate::config::MAX_LEEWAY);
        assert!(!i.max_lifetime.is_zero());
        assert!(!i.fetch.refresh_min.is_zero() && !i.fetch.timeout.is_zero());
        assert!(i.fetch.refresh_min <= i.fetch.refresh_max);
        if i.source == crate::config::KeySource::Files {
            assert!(i.jwks_file.is_some() || !i.pem_keys.is_empty());
        }
    }
    header_name(&s.response.principal_header);
    for (issuer, headers) in &s.response.claim_headers {
        // Claim headers belong to a configured issuer: one issuer never fills another's.
        assert!(
            s.issuers.iter().any(|i| &i.issuer == issuer),
            "claim headers of {issuer:?}"
        );
        for (h, _) in headers {
            header_name(h);
            assert!(s.response.claim_header_names.contains(h));
        }
    }
    if !s.response.claim_headers.is_empty() {
        assert!(!s.issuers.is_empty());
    }
    for h in &s.response.claim_header_names {
        header_name(h);
    }
    if let Some(h) = &s.token.header {
        header_name(h);
    }
    if let Some(p) = &s.peer {
        assert!(p.trust_bundle.is_absolute());
        for td in &p.trust_domains {
            assert!(crate::spiffe::TrustDomain::try_from(td.as_str()).is_ok());
        }
        if let Some(h) = &p.header {
            header_name(h);
        }
    }
    if let Some(f) = &s.forward_auth {
        assert!(s.http_listen.is_some(), "forward_auth without server.http");
        assert!(f.path.starts_with('/'));
        for h in f
            .method_headers
            .iter()
            .chain(&f.uri_headers)
            .chain(&f.host_headers)
            .chain(&f.proto_headers)
            .chain(&f.source_headers)
        {
            header_name(h);
        }
    }
    if let Some(h) = &s.http_listen {
        assert!(h.parse::<SocketAddr>().is_ok());
    }
    assert!(s.policy.dir.is_absolute());
}

/// `portcullis audit verify` over a file of arbitrary bytes (a tampered audit log is an
/// attacker's input), without and with a checkpoint key: never a panic; a broken line is one
/// of the file's lines; a report and an error always render.
pub fn audit_verify(data: &[u8]) {
    use crate::audit::verify::{PublicKey, verify};
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "portcullis-fuzz-audit-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let lines = data.split(|&b| b == b'\n').count() as u64;
    let key = PublicKey::from_raw([7; 32]);
    for key in [None, Some(&key)] {
        match verify(std::slice::from_ref(&path), key) {
            Ok(report) => {
                assert!(!report.to_string().is_empty(), "an empty report");
                if let Some(broken) = &report.broken {
                    assert!(
                        (1..=lines).contains(&broken.line),
                        "broken at line {} of a file of {lines}",
                        broken.line
                    );
                }
            }
            Err(e) => assert_message(&e.to_string()),
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// `portcullis replay` over arbitrary bytes as an audit file (a tampered log is an
/// attacker's input), against a small policy set: never a panic; every line is counted
/// once at most (replayed, without a record, never reaching the policies, another kind of
/// line, or unreadable), every error names a line of the file, and the report renders.
pub fn replay_lines(data: &[u8]) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SNAPSHOT: OnceLock<Option<(std::path::PathBuf, crate::policy::PolicySnapshot)>> =
        OnceLock::new();
    static RUN: AtomicU64 = AtomicU64::new(0);
    let Some((dir, snapshot)) = SNAPSHOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-fuzz-replay-policies-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(
            dir.join("p.cedar"),
            "@id(\"readers\") permit (principal in Group::\"readers\", action, resource) \
             when { context.request.headers has \"x\" };\n\
             @id(\"no\") forbid (principal, action, resource) when { principal.getTag(\"dept\") == \"x\" };\n",
        )
        .ok()?;
        let snapshot = crate::replay::load_candidate(&dir, None).ok()?;
        Some((dir, snapshot))
    }) else {
        return;
    };
    let path = std::env::temp_dir().join(format!(
        "portcullis-fuzz-replay-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let lines = data.split(|&b| b == b'\n').count();
    match crate::replay::replay(snapshot, dir, std::slice::from_ref(&path), 5) {
        Ok(report) => {
            let counted = report.replayed
                + report.no_record
                + report.not_reached
                + report.other_lines
                + report.unreadable;
            assert!(counted <= lines, "{counted} lines counted of {lines}");
            assert!(report.gained + report.lost <= report.replayed);
            assert!(report.changes.len() <= 5);
            let name = path.display().to_string();
            for e in &report.errors {
                let line: usize = e
                    .strip_prefix(&format!("{name}:"))
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("an error without its line: {e}"));
                assert!((1..=lines).contains(&line), "line {line} of {lines}: {e}");
            }
            assert!(!report.to_string().is_empty(), "an empty report");
        }
        Err(e) => assert_message(&e.to_string()),
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod replay_tests {
    /// The harness on a few shapes of input: intact, garbled, a recorded request.
    #[test]
    fn replay_lines_holds_on_sample_inputs() {
        let record = r#"{"decision":"deny","principal":"User::\"a\"","cedar_request":{"principal":{"type":"User","id":"a"},"parents":[{"type":"Group","id":"readers"}],"action":{"type":"Action","id":"GET"},"resource":{"type":"Path","id":"/"},"context":{"request":{"headers":{"x":"1"}},"token":{"claims":{"dept":"y"}}}}}"#;
        for data in [
            "".to_string(),
            "\n\n".to_string(),
            "{not json\n[]\n{\"type\":\"checkpoint\"}\n".to_string(),
            format!("{record}\n{record}"),
            record.replace("readers", "writers"),
            "\u{0}\u{ff}\n{\"decision\":\"allow\",\"cedar_request\":7}".to_string(),
        ] {
            super::replay_lines(data.as_bytes());
        }
    }
}
