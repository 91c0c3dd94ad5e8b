//! The fuzz corpora, replayed on stable without cargo-fuzz: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through the matching
//! `portcullis::fuzzing` harness, so that CI checks the seeds and every crash found stays
//! fixed. The ignored `write_seed_corpora` regenerates the seeds from throwaway material:
//!
//! ```text
//! cargo test --test fuzz_corpus -- --ignored write_seed_corpora
//! ```

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::demo::{self, Authority, ClientCert, LeafSpec, TokenSigner};
use portcullis::fuzzing::{self, JWKS_ISSUER, PEM_ISSUER, REVOKED_JTI, REVOKED_SUBJECT, TOKEN_NOW};
use portcullis::proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use prost::Message as _;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::common::{cert_der, sha256_hex};
use crate::oracle_model as oracle;

type Harness = fn(&[u8]);

/// The differential oracle (`tests/oracle/mod.rs`) as a harness: panics on any request
/// where the engine and the reference decide differently.
fn decision_oracle(data: &[u8]) {
    static ORACLE: std::sync::OnceLock<oracle::Oracle> = std::sync::OnceLock::new();
    let mut seen = oracle::Seen::default();
    if let Err(e) = ORACLE.get_or_init(oracle::Oracle::new).run(data, &mut seen) {
        panic!("{e}");
    }
}

/// Every fuzz target, by the name of its binary, corpus and regressions directory.
const TARGETS: &[(&str, Harness)] = &[
    ("split_path", fuzzing::split_path),
    ("xfcc", fuzzing::xfcc),
    ("peer_certificate", fuzzing::peer_certificate),
    ("issued_certificate", fuzzing::issued_certificate),
    ("jwt", fuzzing::jwt),
    ("signed_jwt", fuzzing::signed_jwt),
    ("jwks", fuzzing::jwks),
    ("check_request", fuzzing::check_request),
    ("check_request_json", fuzzing::check_request_json),
    ("forward_auth", fuzzing::forward_auth),
    ("config", fuzzing::config),
    ("audit_verify", fuzzing::audit_verify),
    ("replay_lines", fuzzing::replay_lines),
    ("decision_oracle", decision_oracle),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of a directory, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("read a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn names_in(dir: &Path, strip: &str) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.expect("read a directory entry").file_name())
        .map(|n| n.to_string_lossy().trim_end_matches(strip).to_string())
        .collect()
}

fn replay(target: &str) {
    let (_, harness) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty or missing"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let mut failures = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read a corpus file");
        if std::panic::catch_unwind(|| harness(&data)).is_err() {
            failures.push(path.display().to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} input(s) fail the {target} harness (the panic of each is printed above):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*
    };
}

/// One test per target, named after it: `cargo test --test fuzz_corpus replay::xfcc`.
mod replay {
    use super::replay;

    replay_tests!(
        split_path,
        xfcc,
        peer_certificate,
        issued_certificate,
        jwt,
        signed_jwt,
        jwks,
        check_request,
        check_request_json,
        forward_auth,
        config,
        audit_verify,
        replay_lines,
        decision_oracle,
    );
}

#[test]
fn every_target_has_a_binary_a_corpus_and_a_replay() {
    let targets: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    let dir = fuzz_dir();
    assert_eq!(names_in(&dir.join("fuzz_targets"), ".rs"), targets);
    assert_eq!(names_in(&dir.join("corpus"), ""), targets);
    let regressions = names_in(&dir.join("regressions"), "");
    assert!(
        regressions.is_subset(&targets),
        "regressions for unknown targets: {:?}",
        regressions.difference(&targets).collect::<Vec<_>>()
    );
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for t in &targets {
        assert!(
            manifest.contains(&format!("name = \"{t}\"")),
            "fuzz/Cargo.toml has no [[bin]] {t}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Seeds. Throwaway material only: the keys that signed these certificates and tokens are
// discarded when the generator exits, and none of them is trusted by the harnesses, which
// generate their own (see `portcullis::fuzzing`).

/// Writes the seed files of one target, after emptying its directory.
struct Seeds {
    dir: PathBuf,
}

impl Seeds {
    fn new(target: &str) -> Seeds {
        let dir = fuzz_dir().join("corpus").join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a corpus directory");
        Seeds { dir }
    }
    fn put(&self, name: &str, data: impl AsRef<[u8]>) {
        std::fs::write(self.dir.join(name), data).expect("write a seed");
    }
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A token with a header of our making and any signature bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(signature)
    )
}

struct Material {
    inter_pem: String,
    root_pem: String,
    frontend: ClientCert,
    batch: ClientCert,
    web: ClientCert,
    expired: ClientCert,
    server: ClientCert,
    ca_leaf: ClientCert,
    es: TokenSigner,
    ed: TokenSigner,
    rs: TokenSigner,
    pem: TokenSigner,
}

fn material() -> Material {
    let root = Authority::root("Portcullis fuzz seed root CA (throwaway)");
    let inter = root.intermediate("Portcullis fuzz seed intermediate CA (throwaway)");
    let now = time::OffsetDateTime::now_utc();
    let mut web = LeafSpec::spiffe("spiffe://example.org/unused");
    web.common_name = "web".into();
    web.uris.clear();
    web.dns = vec!["web.example.org".into(), "www.example.org".into()];
    let mut expired = LeafSpec::spiffe("spiffe://example.org/ns/prod/sa/old");
    expired.not_before = now - time::Duration::days(10);
    expired.not_after = now - time::Duration::days(9);
    let mut server = LeafSpec::spiffe("spiffe://example.org/ns/prod/sa/server");
    server.client_auth = false;
    let mut ca_leaf = LeafSpec::spiffe("spiffe://example.org/ns/prod/sa/ca");
    ca_leaf.ca = true;
    Material {
        inter_pem: inter.cert_pem(),
        root_pem: root.cert_pem(),
        frontend: inter.issue(&LeafSpec::spiffe(
            "spiffe://example.org/ns/prod/sa/frontend",
        )),
        batch: inter.issue(&LeafSpec::spiffe("spiffe://example.org/ns/prod/sa/batch")),
        web: inter.issue(&web),
        expired: inter.issue(&expired),
        server: inter.issue(&server),
        ca_leaf: inter.issue(&ca_leaf),
        // The kids the harness keys have, so that raw tokens reach the signature check.
        es: TokenSigner::generate(Algorithm::ES256, "fuzz-es256"),
        ed: TokenSigner::generate(Algorithm::EdDSA, "fuzz-ed25519"),
        rs: TokenSigner::generate(Algorithm::RS256, "fuzz-rs256"),
        pem: TokenSigner::generate(Algorithm::ES256, "unused"),
    }
}

fn claims(sub: &str) -> Value {
    json!({
        "iss": JWKS_ISSUER, "aud": "orders", "sub": sub, "iat": TOKEN_NOW - 60,
        "exp": TOKEN_NOW + 600, "groups": ["order-readers"], "scope": "orders:read",
    })
}

fn pem_claims() -> Value {
    json!({
        "iss": PEM_ISSUER, "aud": ["billing"], "sub": "bob", "jti": "j-1",
        "iat": TOKEN_NOW - 60, "exp": TOKEN_NOW + 600, "roles": ["admin"],
        "cnf": { "x5t#S256": fuzzing::X5T_PLACEHOLDER },
    })
}

/// Envoy's CheckRequest, as `demo` writes it in proto3 JSON, decoded.
fn check_request(json: &Value) -> CheckRequest {
    portcullis::proto::from_json("envoy.service.auth.v3.CheckRequest", &json.to_string())
        .expect("a CheckRequest")
}

fn set_header(req: &mut Value, name: &str, value: &str) {
    req["attributes"]["request"]["http"]["headers"][name] = json!(value);
}

#[test]
#[ignore = "writes fuzz/corpus/; run by hand to regenerate the seeds"]
fn write_seed_corpora() {
    let m = material();
    let alice = m.es.sign(&claims("alice"));
    let bound = {
        let mut c = claims("alice");
        c["cnf"] = json!({ "x5t#S256": m.frontend.thumbprint() });
        m.es.sign(&c)
    };

    // decision_oracle: choice strings (any bytes are a world and its requests).
    let s = Seeds::new("decision_oracle");
    let mut state: u64 = 12;
    for i in 0..8 {
        let seed: Vec<u8> = (0..96 + 32 * i)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                (state >> 33) as u8
            })
            .collect();
        s.put(&format!("world-{i}"), seed);
    }

    // split_path: request targets, canonical or not.
    let s = Seeds::new("split_path");
    for (i, path) in [
        "/",
        "/orders/42",
        "/orders/42?expand=items&x=%2F",
        "/api/a%20b",
        "/files/%E2%82%AC",
        "/a.b/c..d/.e",
        "/x?q=a//b;c",
        "/trailing/",
        "/api//admin",
        "/api/./admin",
        "/api/x/../admin",
        "/api/..",
        "/api/%61dmin",
        "/api/admin%2Fusers",
        "/api/x/..%2fadmin",
        "/api/admin;x/users",
        "/api\\admin",
        "/api/%5Cadmin",
        "/api/%2E%2E/admin",
        "/api/%zz",
        "/api/%4",
        "/api/%252e%252e/admin",
        "/a#frag",
        "/a b",
        "/caf\u{e9}/\u{2024}\u{2024}",
        "relative",
        "*",
        "http://example.org/absolute",
        "",
        "?only=query",
    ]
    .iter()
    .enumerate()
    {
        s.put(&format!("path-{i:02}"), path);
    }

    // xfcc: Envoy's headers, one hop and several, and the malformed cases of the parser.
    let s = Seeds::new("xfcc");
    let cert = demo::envoy_url_encode(&m.frontend.pem);
    let chain = demo::envoy_url_encode(&format!("{}{}", m.frontend.pem, m.inter_pem));
    let hash = sha256_hex(&m.frontend.der);
    s.put(
        "envoy-sanitize-set",
        format!(
            "By=spiffe://example.org/ns/prod/sa/gateway;Hash={hash};Cert=\"{cert}\";Chain=\"{chain}\";Subject=\"CN=frontend\";URI=spiffe://example.org/ns/prod/sa/frontend"
        ),
    );
    s.put(
        "envoy-append-forward",
        format!(
            "By=spiffe://example.org/edge;Hash={hash};URI=spiffe://example.org/ns/prod/sa/frontend,By=spiffe://example.org/ns/prod/sa/gateway;Hash={hash};Cert=\"{cert}\";Subject=\"CN=frontend\";URI=spiffe://example.org/ns/prod/sa/frontend;DNS=frontend.example.org"
        ),
    );
    s.put(
        "istio",
        format!(
            "By=spiffe://cluster.local/ns/default/sa/productpage;Hash={hash};Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/reviews"
        ),
    );
    s.put(
        "wrong-hash",
        format!("Hash={};Cert=\"{cert}\"", "0".repeat(64)),
    );
    for (i, header) in [
        "",
        " \t ",
        "URI=spiffe://t/first , By=spiffe://e/mid; URI = \"spiffe://t/second\" ,\tURI=spiffe://t/last",
        r#"Subject="CN=a \"quoted\" name; O=x, OU=y\\z";URI="spiffe://td/a;b,c""#,
        r#"Subject="CN=a\,b""#,
        "By=spiffe://e/1;By=spiffe://e/2;URI=;URI=spiffe://t/a;uri=spiffe://t/b;DNS=a.example;DNS=\"\";dns=b.example",
        "X-Foo=1;URI=spiffe://t/a;x-foo=\"2\"",
        "Subject=\"CN=Zo\u{eb},O=\u{dc}n\u{ef}\";DNS=xn--zo-1ia.example",
        "Cert=a;Cert=b",
        "Subject=\"CN=a",
        "URI=a;;DNS=b",
        "U RI=a",
        "URI=\"a\"b",
        "URI=a,,URI=b",
        "Hash=abc",
        "Cert=\"-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A\"",
    ]
    .iter()
    .enumerate()
    {
        s.put(&format!("header-{i:02}"), header);
    }

    // peer_certificate: certificates as Envoy, nginx and Traefik send them, and broken ones.
    let s = Seeds::new("peer_certificate");
    let frontend_chain = format!("{}{}", m.frontend.pem, m.inter_pem);
    s.put("envoy-leaf", demo::envoy_url_encode(&m.frontend.pem));
    s.put("envoy-chain", demo::envoy_url_encode(&frontend_chain));
    s.put("plain-pem-chain", &frontend_chain);
    s.put("traefik-der", b64(&m.batch.der));
    s.put(
        "traefik-der-chain",
        format!("{},{}", b64(&m.batch.der), b64(&cert_der(&m.inter_pem))),
    );
    s.put(
        "traefik-der-escaped",
        percent_encoding::utf8_percent_encode(
            &format!("{},{}", b64(&m.batch.der), b64(&cert_der(&m.inter_pem))),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string(),
    );
    s.put("dns-only", demo::envoy_url_encode(&m.web.pem));
    s.put("expired", demo::envoy_url_encode(&m.expired.pem));
    s.put("server-auth", demo::envoy_url_encode(&m.server.pem));
    s.put("ca-as-leaf", demo::envoy_url_encode(&m.ca_leaf.pem));
    s.put("root", demo::envoy_url_encode(&m.root_pem));
    s.put("empty", "");
    s.put(
        "empty-pem",
        "-----BEGIN%20CERTIFICATE-----%0A%0A-----END%20CERTIFICATE-----%0A",
    );
    s.put("bad-escape", "-----BEGIN%20CERTIFICATE-----%ZZ");
    s.put("not-base64", "MII*,");
    let truncated = demo::envoy_url_encode(&m.frontend.pem);
    s.put("truncated", &truncated[..truncated.len() / 2]);

    // issued_certificate: flags, not-before and not-after offsets, extra, then the names.
    let s = Seeds::new("issued_certificate");
    let spiffe = "frontend\nuri:spiffe://example.org/ns/prod/sa/frontend";
    let seed = |flags: u8, nb: i8, na: i8, extra: u8, names: &str| {
        let mut v = vec![flags, nb as u8, na as u8, extra];
        v.extend_from_slice(names.as_bytes());
        v
    };
    for (name, data) in [
        ("envoy-chain", seed(1 | 8, -6, 100, 0, spiffe)),
        ("plain-pem-chain", seed(1 | 8 | 16, -6, 100, 0, spiffe)),
        ("traefik-chain", seed(1 | 8 | 32, -6, 100, 0, spiffe)),
        (
            "traefik-escaped-chain",
            seed(1 | 8 | 48, -6, 100, 0, spiffe),
        ),
        ("xfcc-chain", seed(1 | 8 | 64, -6, 100, 0, spiffe)),
        (
            "xfcc-wrong-hash",
            seed(1 | 8 | 64 | 128, -6, 100, 0, spiffe),
        ),
        ("by-root", seed(1 | 4, -6, 100, 0, spiffe)),
        ("no-chain", seed(1, -6, 100, 0, spiffe)),
        ("ca", seed(1 | 2 | 8, -6, 100, 0, spiffe)),
        ("server-auth", seed(8, -6, 100, 0, spiffe)),
        ("expired", seed(1 | 8, -100, -10, 0, spiffe)),
        ("not-yet-valid", seed(1 | 8, 10, 100, 0, spiffe)),
        ("revoked", seed(1 | 8, -6, 100, 1, "")),
        (
            "dns-names",
            seed(
                1 | 8,
                -6,
                100,
                0,
                "web\ndns:web.example.org\ndns:www.example.org",
            ),
        ),
        (
            "two-spiffe-ids",
            seed(
                1 | 8,
                -6,
                100,
                0,
                "multi\nuri:spiffe://example.org/a\nuri:spiffe://example.org/b",
            ),
        ),
        (
            "spiffe-and-https",
            seed(
                1 | 8,
                -6,
                100,
                0,
                "mixed\nuri:spiffe://example.org/a\nuri:https://example.org/b",
            ),
        ),
        (
            "foreign-trust-domain",
            seed(1 | 8, -6, 100, 0, "foreign\nuri:spiffe://other.org/x"),
        ),
        (
            "bad-spiffe-path",
            seed(1 | 8, -6, 100, 0, "bad\nuri:spiffe://example.org/a/../b"),
        ),
        (
            "upper-case-scheme",
            seed(1 | 8, -6, 100, 0, "upper\nuri:SPIFFE://example.org/x"),
        ),
        (
            "https-uri",
            seed(1 | 8, -6, 100, 0, "plain\nuri:https://example.org/x"),
        ),
        (
            "unicode-subject",
            seed(1 | 8, -6, 100, 0, "Zo\u{eb} \u{2603}"),
        ),
        ("no-names", seed(1 | 8, -6, 100, 0, "")),
    ] {
        s.put(name, data);
    }

    // jwt: tokens signed with keys the harness does not have, under its kids and issuers.
    let s = Seeds::new("jwt");
    s.put("es256", &alice);
    s.put("es256-bound", &bound);
    s.put("eddsa", m.ed.sign(&claims("carol")));
    s.put("rs256", m.rs.sign(&claims("dave")));
    let mut at_jwt = Header::new(Algorithm::ES256);
    at_jwt.typ = Some("at+jwt".into());
    s.put("pem-issuer", m.pem.sign_with(&at_jwt, &pem_claims()));
    let mut unknown_kid = Header::new(Algorithm::ES256);
    unknown_kid.kid = Some("nobody".into());
    s.put(
        "unknown-kid",
        m.es.sign_with(&unknown_kid, &claims("alice")),
    );
    let mut crit = Header::new(Algorithm::ES256);
    crit.kid = Some("fuzz-es256".into());
    crit.crit = Some(vec!["exp".into()]);
    s.put("crit", m.es.sign_with(&crit, &claims("alice")));
    let mut other_issuer = claims("alice");
    other_issuer["iss"] = json!("https://attacker.example");
    s.put("unknown-issuer", m.es.sign(&other_issuer));
    let mut iss_number = claims("alice");
    iss_number["iss"] = json!(7);
    s.put("iss-number", m.es.sign(&iss_number));
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice"),
        &EncodingKey::from_secret(b"fuzz seed, not a key"),
    )
    .expect("sign HS256");
    s.put("hs256", hs256);
    s.put(
        "alg-none",
        raw_token(&json!({ "alg": "none" }), &claims("alice"), b""),
    );
    s.put(
        "alg-es384-with-es256-key",
        raw_token(
            &json!({ "alg": "ES384", "kid": "fuzz-es256" }),
            &claims("alice"),
            &[7; 96],
        ),
    );
    s.put(
        "no-kid",
        raw_token(&json!({ "alg": "ES256" }), &claims("alice"), &[1; 64]),
    );
    s.put("two-parts", "eyJhbGciOiJFUzI1NiJ9.e30");
    s.put("four-parts", "a.b.c.d");
    s.put("not-base64", "***.***.***");
    s.put("not-json", format!("{}.{}.", b64url(b"{"), b64url(b"[")));
    s.put("empty", "");

    // signed_jwt: selector, then header NUL payload, or just the payload.
    let s = Seeds::new("signed_jwt");
    let with_header = |selector: u8, header: &Value, payload: &Value| {
        let mut v = vec![selector];
        v.extend_from_slice(header.to_string().as_bytes());
        v.push(0);
        v.extend_from_slice(payload.to_string().as_bytes());
        v
    };
    let plain = |selector: u8, payload: &Value| {
        let mut v = vec![selector];
        v.extend_from_slice(payload.to_string().as_bytes());
        v
    };
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice");
        f(&mut c);
        c
    };
    let mut bound_claims = claims("alice");
    bound_claims["cnf"] = json!({ "x5t#S256": fuzzing::X5T_PLACEHOLDER });
    let es_header = json!({ "alg": "ES256", "kid": "fuzz-es256", "typ": "JWT" });
    for (name, data) in [
        ("es256", plain(0, &claims("alice"))),
        ("eddsa", plain(1, &claims("carol"))),
        ("rs256", plain(2, &claims("dave"))),
        ("es256-with-peer", plain(4, &claims("alice"))),
        ("bound-with-peer", plain(4, &bound_claims)),
        ("bound-without-peer", plain(0, &bound_claims)),
        ("pem-issuer-bound", plain(7, &pem_claims())),
        ("pem-issuer-no-peer", plain(3, &pem_claims())),
        (
            "pem-issuer-unbound",
            plain(
                7,
                &json!({
                    "iss": PEM_ISSUER, "aud": "orders", "sub": "bob", "jti": "j-2",
                    "exp": TOKEN_NOW + 60,
                }),
            ),
        ),
        (
            "pem-issuer-typ-application",
            with_header(
                7,
                &json!({ "alg": "ES256", "typ": "application/AT+JWT" }),
                &pem_claims(),
            ),
        ),
        (
            "pem-issuer-typ-jwt",
            with_header(7, &json!({ "alg": "ES256", "typ": "JWT" }), &pem_claims()),
        ),
        (
            "audience-list",
            plain(0, &edit(&|c| c["aud"] = json!(["x", "orders"]))),
        ),
        (
            "wrong-audience",
            plain(0, &edit(&|c| c["aud"] = json!("billing"))),
        ),
        (
            "audience-null",
            plain(0, &edit(&|c| c["aud"] = Value::Null)),
        ),
        ("audience-number", plain(0, &edit(&|c| c["aud"] = json!(1)))),
        (
            "exp-float",
            plain(0, &edit(&|c| c["exp"] = json!(TOKEN_NOW as f64 + 0.5))),
        ),
        ("exp-string", plain(0, &edit(&|c| c["exp"] = json!("soon")))),
        ("exp-huge", plain(0, &edit(&|c| c["exp"] = json!(u64::MAX)))),
        (
            "expired",
            plain(0, &edit(&|c| c["exp"] = json!(TOKEN_NOW - 31))),
        ),
        (
            "in-leeway",
            plain(0, &edit(&|c| c["exp"] = json!(TOKEN_NOW - 29))),
        ),
        (
            "nbf-future",
            plain(0, &edit(&|c| c["nbf"] = json!(TOKEN_NOW + 60))),
        ),
        (
            "iat-future",
            plain(0, &edit(&|c| c["iat"] = json!(TOKEN_NOW + 60))),
        ),
        (
            "too-long",
            plain(0, &edit(&|c| c["exp"] = json!(TOKEN_NOW + 7200))),
        ),
        (
            "too-long-without-iat",
            plain(
                0,
                &edit(&|c| {
                    c.as_object_mut().expect("object").remove("iat");
                    c["exp"] = json!(TOKEN_NOW + 3601);
                }),
            ),
        ),
        (
            "no-exp",
            plain(
                0,
                &edit(&|c| {
                    c.as_object_mut().expect("object").remove("exp");
                }),
            ),
        ),
        ("empty-sub", plain(0, &edit(&|c| c["sub"] = json!("")))),
        (
            "revoked-jti",
            plain(0, &edit(&|c| c["jti"] = json!(REVOKED_JTI))),
        ),
        ("revoked-sub", plain(0, &claims(REVOKED_SUBJECT))),
        (
            "other-issuer",
            plain(0, &edit(&|c| c["iss"] = json!(PEM_ISSUER))),
        ),
        (
            "groups-string",
            plain(0, &edit(&|c| c["groups"] = json!("admins"))),
        ),
        (
            "groups-mixed",
            plain(0, &edit(&|c| c["groups"] = json!(["a", 1]))),
        ),
        (
            "scope-list",
            plain(0, &edit(&|c| c["scope"] = json!(["a", "b"]))),
        ),
        (
            "cnf-number",
            plain(4, &edit(&|c| c["cnf"] = json!({ "x5t#S256": 1 }))),
        ),
        (
            "cnf-other-cert",
            plain(
                4,
                &edit(&|c| c["cnf"] = json!({ "x5t#S256": m.batch.thumbprint() })),
            ),
        ),
        (
            "alg-es384",
            with_header(
                0,
                &json!({ "alg": "ES384", "kid": "fuzz-es256" }),
                &claims("alice"),
            ),
        ),
        (
            "alg-ps256-rsa-key",
            with_header(
                2,
                &json!({ "alg": "PS256", "kid": "fuzz-rs256" }),
                &claims("dave"),
            ),
        ),
        (
            "alg-hs256",
            with_header(0, &json!({ "alg": "HS256" }), &claims("alice")),
        ),
        (
            "alg-none",
            with_header(0, &json!({ "alg": "none" }), &claims("alice")),
        ),
        (
            "no-kid",
            with_header(0, &json!({ "alg": "ES256" }), &claims("alice")),
        ),
        (
            "eddsa-kid-for-es256",
            with_header(
                0,
                &json!({ "alg": "ES256", "kid": "fuzz-ed25519" }),
                &claims("alice"),
            ),
        ),
        (
            "crit",
            with_header(
                0,
                &json!({ "alg": "ES256", "kid": "fuzz-es256", "crit": ["exp"] }),
                &claims("alice"),
            ),
        ),
        (
            "es256-explicit-header",
            with_header(0, &es_header, &claims("alice")),
        ),
        ("duplicate-iss", {
            let mut v = vec![0];
            v.extend_from_slice(
                    format!(
                        "{{\"iss\":\"x\",\"iss\":\"{JWKS_ISSUER}\",\"aud\":\"orders\",\"sub\":\"a\",\"exp\":{}}}",
                        TOKEN_NOW + 60
                    )
                    .as_bytes(),
                );
            v
        }),
        ("payload-array", plain(0, &json!([1, 2]))),
        ("empty", vec![0]),
    ] {
        s.put(name, data);
    }

    // jwks: key sets as files and identity providers serve them.
    let s = Seeds::new("jwks");
    s.put("three-keys", demo::jwks(&[&m.es, &m.ed, &m.rs]));
    s.put("es256", demo::jwks(&[&m.es]));
    s.put("eddsa", demo::jwks(&[&m.ed]));
    s.put("rs256", demo::jwks(&[&m.rs]));
    let jwk = m.es.jwk();
    let keys = |keys: Vec<Value>| json!({ "keys": keys }).to_string();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut k = jwk.clone();
        f(&mut k);
        k
    };
    s.put("duplicate-kid", keys(vec![jwk.clone(), jwk.clone()]));
    s.put(
        "no-kid",
        keys(vec![with(&|k| {
            k.as_object_mut().expect("object").remove("kid");
        })]),
    );
    s.put("use-enc", keys(vec![with(&|k| k["use"] = json!("enc"))]));
    s.put(
        "alg-mismatch",
        keys(vec![with(&|k| k["alg"] = json!("RS256"))]),
    );
    s.put(
        "alg-encryption",
        keys(vec![with(&|k| k["alg"] = json!("ECDH-ES"))]),
    );
    s.put(
        "curve-p384",
        keys(vec![with(&|k| k["crv"] = json!("P-384"))]),
    );
    s.put("bad-x", keys(vec![with(&|k| k["x"] = json!("!!"))]));
    s.put(
        "oct",
        keys(vec![
            json!({ "kty": "oct", "k": b64url(b"fuzz seed, not a key"), "kid": "h" }),
        ]),
    );
    s.put(
        "x25519",
        keys(vec![
            json!({ "kty": "OKP", "crv": "X25519", "x": b64url(&[9; 32]) }),
        ]),
    );
    s.put("unknown-kty", keys(vec![json!({ "kty": "XYZ" })]));
    s.put("empty-keys", keys(vec![]));
    s.put("keys-object", "{\"keys\":{}}");
    s.put("not-json", "{");

    // check_request: Envoy's CheckRequests, protobuf-encoded.
    let s = Seeds::new("check_request");
    let sj = Seeds::new("check_request_json");
    let mut requests: Vec<(&str, CheckRequest)> = Vec::new();
    let alice_json = demo::check_request_json(
        "GET",
        "/orders/42?expand=items",
        Some(&m.frontend),
        Some(&alice),
    );
    requests.push(("alice-reads-order", check_request(&alice_json)));
    requests.push((
        "bound-token",
        check_request(&demo::check_request_json(
            "POST",
            "/orders",
            Some(&m.frontend),
            Some(&bound),
        )),
    ));
    requests.push((
        "anonymous",
        check_request(&demo::check_request_json("GET", "/orders/42", None, None)),
    ));
    requests.push((
        "non-canonical-path",
        check_request(&demo::check_request_json(
            "GET",
            "/orders/%2e%2e/admin",
            None,
            Some(&alice),
        )),
    ));
    let mut headers_only = demo::check_request_json("get", "/x", None, None);
    headers_only["attributes"]["request"]["http"]["method"] = json!("");
    headers_only["attributes"]["request"]["http"]["path"] = json!("");
    set_header(&mut headers_only, ":path", "/from/pseudo/header?q=1");
    set_header(
        &mut headers_only,
        "cookie",
        &format!("theme=dark; session={alice}"),
    );
    requests.push(("pseudo-headers-and-cookie", check_request(&headers_only)));
    let mut other_sources = demo::check_request_json("GET", "/orders/1", None, None);
    set_header(&mut other_sources, "x-token", &format!("Bearer {alice}"));
    set_header(
        &mut other_sources,
        "x-client-cert",
        &demo::envoy_url_encode(&frontend_chain),
    );
    requests.push(("token-and-cert-headers", check_request(&other_sources)));
    let mut via_xfcc = demo::check_request_json("GET", "/orders/1", None, Some(&alice));
    set_header(
        &mut via_xfcc,
        "x-forwarded-client-cert",
        &format!("By=spiffe://example.org/edge;Hash={hash};Cert=\"{cert}\";Chain=\"{chain}\""),
    );
    requests.push(("xfcc", check_request(&via_xfcc)));
    let mut extras = demo::check_request_json("DELETE", "/orders/7", Some(&m.batch), None);
    extras["attributes"]["contextExtensions"] = json!({ "route": "orders", "tenant": "a" });
    extras["attributes"]["metadataContext"] = json!({ "filterMetadata": { "envoy.filters.http.jwt_authn": { "x": [1, 2.5, true, null, { "y": "z" }] } } });
    extras["attributes"]["tlsSession"] = json!({ "sni": "api.example.org" });
    extras["attributes"]["request"]["time"] = json!("2025-06-15T12:00:00Z");
    extras["attributes"]["destination"] = json!({ "address": { "pipe": { "path": "/run/envoy.sock" } }, "principal": "spiffe://example.org/ns/prod/sa/api" });
    requests.push(("context-metadata-tls", check_request(&extras)));
    // `encode_raw_headers`: header_map with raw values, as curl sends them (more headers
    // than the harness's small limit of eight), and a shorter one.
    let mut raw = check_request(&demo::check_request_json("GET", "/orders/42", None, None));
    {
        let http = raw
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("http");
        http.headers.clear();
        let raw_header = |k: &str, v: &str| HeaderValue {
            key: k.into(),
            value: String::new(),
            raw_value: v.as_bytes().to_vec(),
        };
        http.header_map = Some(HeaderMap {
            headers: vec![
                raw_header(":authority", "api.example.org"),
                raw_header(":path", "/orders/42"),
                raw_header(":method", "GET"),
                raw_header(":scheme", "https"),
                raw_header("user-agent", "curl/8.5.0"),
                raw_header("accept", "*/*"),
                raw_header("x-request-id", "3f1c2a9e-1b2c-4d5e-8f90-0a1b2c3d4e5f"),
                raw_header("x-forwarded-proto", "https"),
                raw_header("x-envoy-expected-rq-timeout-ms", "15000"),
                HeaderValue {
                    key: "authorization".into(),
                    value: format!("Bearer {alice}"),
                    raw_value: Vec::new(),
                },
            ],
        });
    }
    let mut short = raw.clone();
    if let Some(map) = short
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .and_then(|h| h.header_map.as_mut())
    {
        map.headers.truncate(5);
    }
    requests.push(("raw-header-map", raw));
    requests.push(("raw-header-map-short", short));
    for (name, req) in &requests {
        s.put(&format!("{name}.pb"), req.encode_to_vec());
        let json = portcullis::proto::to_json("envoy.service.auth.v3.CheckRequest", req)
            .expect("proto3 JSON");
        sj.put(
            &format!("{name}.json"),
            serde_json::to_string_pretty(&json).expect("JSON"),
        );
    }
    s.put("empty.pb", b"");
    sj.put(
        "demo-alice.json",
        serde_json::to_string_pretty(&alice_json).expect("JSON"),
    );
    for (name, text) in [
        ("empty-object", "{}"),
        ("array", "[]"),
        ("null-attributes", "{\"attributes\":null}"),
        ("unknown-field", "{\"attributes\":{\"nope\":1}}"),
        (
            "snake-case-names",
            "{\"attributes\":{\"context_extensions\":{\"a\":\"b\"},\"request\":{\"http\":{\"method\":\"GET\",\"path\":\"/\",\"header_map\":{\"headers\":[{\"key\":\"x\",\"raw_value\":\"eA==\"}]}}}}}",
        ),
        (
            "int64-as-string",
            "{\"attributes\":{\"request\":{\"http\":{\"method\":\"GET\",\"path\":\"/\",\"size\":\"12\"}}}}",
        ),
        (
            "any-metadata",
            "{\"attributes\":{\"metadataContext\":{\"typedFilterMetadata\":{\"a\":{\"@type\":\"type.googleapis.com/google.protobuf.Struct\",\"value\":{}}}}}}",
        ),
        ("trailing", "{} {}"),
    ] {
        sj.put(&format!("{name}.json"), text);
    }

    // forward_auth: the headers nginx and Traefik send on a subrequest.
    let s = Seeds::new("forward_auth");
    let pem_header = demo::envoy_url_encode(&frontend_chain);
    for (name, text) in [
        (
            "nginx",
            format!(
                "x-original-method: GET\nx-original-uri: /orders/42?expand=items\nhost: portcullis.internal\nx-forwarded-proto: https\nx-real-ip: 10.0.0.7\nx-forwarded-for: 10.0.0.7, 10.0.0.1\nauthorization: Bearer {alice}\nx-client-cert: {pem_header}"
            ),
        ),
        (
            "traefik",
            format!(
                "X-Forwarded-Method: POST\nX-Forwarded-Uri: /orders\nX-Forwarded-Host: api.example.org\nX-Forwarded-Proto: https\nX-Forwarded-For: 203.0.113.9\nX-Client-Cert: {},{}\nCookie: theme=dark; session={alice}",
                b64(&m.batch.der),
                b64(&cert_der(&m.inter_pem))
            ),
        ),
        (
            "caddy-token-header",
            format!(
                "X-Forwarded-Method: GET\nX-Forwarded-Uri: /catalog/items\nX-Forwarded-Host: shop.example.org\nX-Token: {alice}"
            ),
        ),
        (
            "xfcc",
            format!(
                "x-forwarded-method: GET\nx-forwarded-uri: /orders/1\nx-forwarded-client-cert: By=spiffe://example.org/edge;Hash={hash};Cert=\"{cert}\""
            ),
        ),
        (
            "conflicting-uris",
            "x-forwarded-method: GET\nx-forwarded-uri: /public\nx-original-uri: /admin".into(),
        ),
        (
            "agreeing-duplicates",
            "x-forwarded-method: GET\nx-original-method: GET\nx-forwarded-uri: /a\nx-original-uri: /a".into(),
        ),
        (
            "joined-duplicates",
            "x-forwarded-method: GET\nX-Forwarded-Uri: /a\nx-forwarded-uri: /b".into(),
        ),
        (
            "non-canonical",
            "x-forwarded-method: GET\nx-forwarded-uri: /api/%2e%2e/admin".into(),
        ),
        ("no-method", "x-forwarded-uri: /a".into()),
        ("no-uri", "x-forwarded-method: GET".into()),
        (
            "nine-headers",
            "x-forwarded-method: GET\nx-forwarded-uri: /a\nh1: 1\nh2: 2\nh3: 3\nh4: 4\nh5: 5\nh6: 6\nh7: 7".into(),
        ),
        (
            "malformed-bearer",
            "x-forwarded-method: GET\nx-forwarded-uri: /a\nauthorization: Bearer a b".into(),
        ),
    ] {
        s.put(name, text);
    }
    s.put(
        "not-utf8",
        b"x-forwarded-method: GET\nx-forwarded-uri: /a\nx-bin: \xff\xfe".as_slice(),
    );

    // config: the shipped example, the harness's own, and variants of each problem.
    let s = Seeds::new("config");
    s.put(
        "example.toml",
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.toml"))
            .expect("examples/portcullis.toml"),
    );
    s.put("harness.toml", fuzzing::WORLD_CONFIG);
    for (name, text) in [
        ("empty", ""),
        (
            "everything",
            r#"
[server]
grpc = "unix:/run/portcullis.sock"
http = "127.0.0.1:9192"
mode = "dry-run"
shutdown_grace = "5s"
tls = { cert = "tls/server.pem", key = "tls/server.key", client_ca = "tls/envoy-ca.pem" }

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org", "prod.example.org"]
require = true
max_size = 16384
crls = ["ca.crl", "intermediate.crl.pem"]
header = "X-SSL-Client-Cert"
xfcc = "nearest"

[token]
max_size = 4096
revoked = "revoked.txt"
header = "x-token"
cookie = "session"
pass_schemes = ["Basic"]

[[issuer]]
issuer = "https://login.example.org"
audiences = ["orders", "billing"]
jwks_uri = "https://login.example.org/keys"
ca_bundle = "idp-ca.pem"
refresh_min = "1m"
refresh_max = "1h"
fetch_timeout = "2s"
max_key_set_size = 65536
unknown_kid_interval = "30s"
unknown_kid_wait = "100ms"
max_staleness = "6h"
required_at_start = false
algorithms = ["RS256", "PS256", "ES384"]
leeway = "1m"
max_lifetime = "15m"
required_claims = ["sub", "jti"]
typ = "at+jwt"
require_binding = true
groups_claim = "roles"
id_prefix = "login|"
claim_headers = { "x-user" = "sub", "x-tenant" = "tenant" }

[[issuer]]
issuer = "https://accounts.example.com"
audiences = ["orders"]
discovery = true

[policy]
dir = "policies"
schema = "policies/schema.cedarschema"
entities = "policies/entities.json"

[response]
principal_header = "x-principal"
strip_authorization = true

[log]
audit = "/var/log/portcullis/audit.log"

[forward_auth]
path = "/auth"
method_headers = ["x-forwarded-method"]
uri_headers = ["x-forwarded-uri"]
host_headers = ["x-forwarded-host"]
proto_headers = ["x-forwarded-proto"]
source_headers = ["x-forwarded-for"]

[limits]
max_message_bytes = 65536
max_headers = 100
max_header_bytes = 32768
max_concurrent = 64
max_streams_per_connection = 100
request_timeout = "200ms"

[cache]
tokens = 0
certificates = 100
"#,
        ),
        (
            "problems",
            r#"
[server]
grpc = "localhost"
http = "nowhere"
mode = "permissive"
shutdown_grace = "soon"

[peer]
trust_bundle = "ca.pem"
trust_domains = ["Example.ORG"]
header = "bad header"
xfcc = "all"

[[issuer]]
issuer = ""
audiences = []
algorithms = ["HS256", "none", "XX1"]
leeway = "10m"
max_lifetime = "0s"

[[issuer]]
issuer = "http://idp.example.org"
audiences = [""]
jwks_uri = "http://idp.example.org/keys"
jwks_file = "keys.json"
refresh_min = "2h"
refresh_max = "1h"

[[issuer]]
issuer = "http://idp.example.org"
discovery = true
audiences = ["a"]

[forward_auth]
path = "auth"

[limits]
max_headers = 0
request_timeout = "0s"
"#,
        ),
        ("unknown-key", "[server]\ngrcp = \"127.0.0.1:9191\"\n"),
        ("syntax-error", "[server\ngrpc = 1\n"),
        ("wrong-type", "[peer]\ntrust_bundle = 7\n"),
        (
            "unicode-error",
            "[server]\n# caf\u{e9}\ngrpc = \"\u{2603}\"\n",
        ),
        (
            "revocation-list",
            "# revoked\njti:abc\nsub:mallory\nbare-id\n\n",
        ),
        ("revocation-bad", "xyz:abc\njti:\n"),
    ] {
        s.put(name, text);
    }

    // audit_verify: a chain as the server writes it, then each way of breaking it.
    let s = Seeds::new("audit_verify");
    let chain = |bodies: &[&str]| {
        let mut prev = [0u8; 32];
        let mut out = Vec::new();
        for (seq, body) in bodies.iter().enumerate() {
            let hex: String = prev.iter().map(|b| format!("{b:02x}")).collect();
            let line = format!(
                "{},\"seq\":{seq},\"prev\":\"{hex}\"}}",
                body.trim_end_matches('}')
            );
            prev.copy_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line.as_bytes()).as_ref(),
            );
            out.push(line);
        }
        out
    };
    let good = chain(&[
        r#"{"time":"2026-12-03T00:00:00Z","decision_id":"a","decision":"allow"}"#,
        r#"{"time":"2026-12-03T00:00:01Z","decision_id":"b","decision":"deny"}"#,
        r#"{"type":"audit_recovered","lines_not_written":2}"#,
        r#"{"type":"checkpoint","covers":2,"head":"00","every":3,"key_id":"x","sig":"AAAA"}"#,
    ]);
    let joined = |lines: &[String]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    s.put("intact", joined(&good));
    s.put("cut", joined(&[good[0].clone(), good[2].clone()]));
    s.put("reordered", joined(&[good[1].clone(), good[0].clone()]));
    s.put("edited", joined(&good).replacen("allow", "deny", 1));
    s.put("torn", joined(&good[..2]) + &good[2][..10]);
    s.put("not-json", "{\"seq\":0\nnot json\n");
    s.put("empty", "");
}
