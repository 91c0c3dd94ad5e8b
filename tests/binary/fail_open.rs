//! The fail-open classes of issue 12, each attacked through the real binary with a real
//! client: static entities that lose their parents, repeated headers, a token beside
//! another scheme, claims of another type, sender constraints that cannot be enforced,
//! claim headers across issuers, paths an upstream decodes differently, malleable
//! signatures, dry-run headers, and two header forms that disagree. Every test here fails
//! on the code before the fix of its class.

use crate::common;

use base64::Engine as _;
use common::binary::{Binary, run};
use common::{
    AUDIENCE, Authority, ClientCert, ISSUER, LeafSpec, READER, TokenSigner, ok_header, outcome,
    request, set_header,
};
use jsonwebtoken::Algorithm;
use portcullis::proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::time::Duration;

const PARTNER: &str = "https://partner.test";
const PRINCIPAL: &str = "x-portcullis-principal";
/// (gRPC code, HTTP status) of each kind of answer.
const ALLOW: (i32, i32) = (0, 0);
const BAD_REQUEST: (i32, i32) = (3, 400);
const UNAUTHENTICATED: (i32, i32) = (16, 401);
const FORBIDDEN: (i32, i32) = (7, 403);

const SCHEMA: &str = r#"
entity Group in [Group];
entity Folder in [Folder];
entity User in [Group] { issuer: String } tags String;
entity Workload in [Group];
entity Anonymous;
entity Path in [Folder] { path: String, host: String, classification?: String };
action "GET", "POST" appliesTo {
  principal: [User, Workload, Anonymous],
  resource: [Path],
};
"#;

const POLICIES: &str = r#"
@id("public")
permit (principal, action, resource) when { resource.path like "/public/*" };

@id("users-read")
permit (principal is User, action == Action::"GET", resource) when { resource.path like "/api/*" };

@id("workload-internal")
permit (principal == Workload::"spiffe://example.org/ns/test/sa/reader", action, resource)
when { resource.path like "/internal/*" };

@id("admins")
permit (principal in Group::"admins", action, resource) when { resource.path like "/admin/*" };

@id("restricted")
forbid (principal, action, resource in Folder::"restricted");

@id("secret-documents")
forbid (principal, action, resource)
when { resource has classification && resource.classification == "secret" };
"#;

/// Static entities: a path in a restricted folder (two levels up), a path with a
/// classification attribute, a static user in a group, a workload in a group.
fn entities() -> String {
    json!([
        { "uid": { "type": "Folder", "id": "restricted" }, "attrs": {}, "parents": [] },
        { "uid": { "type": "Folder", "id": "hr" }, "attrs": {},
          "parents": [{ "type": "Folder", "id": "restricted" }] },
        { "uid": { "type": "Path", "id": "/public/secret" },
          "attrs": { "path": "/public/secret", "host": "static" },
          "parents": [{ "type": "Folder", "id": "restricted" }] },
        { "uid": { "type": "Path", "id": "/public/payroll" },
          "attrs": { "path": "/public/payroll", "host": "static" },
          "parents": [{ "type": "Folder", "id": "hr" }] },
        { "uid": { "type": "Path", "id": "/public/plans" },
          "attrs": { "path": "/public/plans", "host": "static", "classification": "secret" },
          "parents": [] },
        { "uid": { "type": "Group", "id": "admins" }, "attrs": {}, "parents": [] },
        { "uid": { "type": "User", "id": "carol" }, "attrs": { "issuer": "static" },
          "parents": [{ "type": "Group", "id": "admins" }] },
        { "uid": { "type": "Workload", "id": READER }, "attrs": {},
          "parents": [{ "type": "Group", "id": "admins" }] }
    ])
    .to_string()
}

struct Material {
    root: Authority,
    inter: Authority,
    signer: TokenSigner,
    partner: TokenSigner,
    reader: ClientCert,
}

fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let root = Authority::root("fail-open test root CA");
        let inter = root.intermediate("fail-open test intermediate CA");
        let reader = inter.issue(&LeafSpec::spiffe(READER));
        Material {
            root,
            inter,
            signer: TokenSigner::generate(Algorithm::ES256, "es"),
            partner: TokenSigner::generate(Algorithm::ES256, "partner"),
            reader,
        }
    })
}

fn claims(sub: &str) -> Value {
    let now = common::now();
    json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600,
            "email": format!("{sub}@example.org") })
}

fn token(sub: &str) -> String {
    material().signer.sign(&claims(sub))
}

fn token_with(key: &str, value: Value) -> String {
    let mut c = claims("alice");
    c[key] = value;
    material().signer.sign(&c)
}

fn expired() -> String {
    token_with("exp", json!(common::now() - 3600))
}

/// The configuration under attack: forward-auth on, a token cookie, a revocation list, two
/// issuers with their own claim headers, a schema with folders and static entities.
fn config(extra: &str) -> String {
    format!(
        r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[token]
cookie = "session"
revoked = "revoked.txt"

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"
claim_headers = {{ "x-user-email" = "email" }}

[[issuer]]
issuer = "{PARTNER}"
audiences = ["{AUDIENCE}"]
jwks_file = "partner.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"
id_prefix = "partner/"
claim_headers = {{ "x-partner-email" = "email" }}

[policy]
dir = "policies"
schema = "policies/schema.cedarschema"
entities = "policies/entities.json"

[forward_auth]

[log]
audit = "audit.log"
{extra}
"#
    )
}

fn files() -> Vec<(&'static str, String)> {
    let m = material();
    vec![
        ("ca.pem", m.root.cert_pem()),
        ("intermediate.pem", m.inter.cert_pem()),
        ("idp.jwks.json", portcullis::demo::jwks(&[&m.signer])),
        ("partner.jwks.json", portcullis::demo::jwks(&[&m.partner])),
        ("revoked.txt", "jti:12345\njti:abc\njti:true\n".to_string()),
        ("policies/policies.cedar", POLICIES.to_string()),
        ("policies/schema.cedarschema", SCHEMA.to_string()),
        ("policies/entities.json", entities()),
    ]
}

fn server(extra: &str) -> Binary {
    Binary::start(&config(extra), &files())
}

fn get(path: &str) -> CheckRequest {
    request("GET", path, None, None)
}

fn with_token(path: &str, token: &str) -> CheckRequest {
    request("GET", path, None, Some(token))
}

fn with_cert(mut req: CheckRequest, cert: &ClientCert) -> CheckRequest {
    if let Some(source) = req.attributes.as_mut().and_then(|a| a.source.as_mut()) {
        source.certificate = cert.envoy_encoded();
    }
    req
}

/// Replaces `headers` by a `header_map` with these entries (Envoy's encode_raw_headers).
fn with_header_map(mut req: CheckRequest, entries: &[(&str, &str)]) -> CheckRequest {
    let http = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("http");
    let mut all: Vec<HeaderValue> = http
        .headers
        .iter()
        .map(|(k, v)| HeaderValue {
            key: k.clone(),
            value: String::new(),
            raw_value: v.clone().into_bytes(),
        })
        .collect();
    all.extend(entries.iter().map(|(k, v)| HeaderValue {
        key: k.to_string(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }));
    http.headers.clear();
    http.header_map = Some(HeaderMap { headers: all });
    req
}

fn answer(resp: &CheckResponse) -> (i32, i32) {
    let (code, status, _) = outcome(resp);
    (code, status)
}

fn headers_to_remove(resp: &CheckResponse) -> Vec<String> {
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove.clone(),
        _ => Vec::new(),
    }
}

fn ok_headers(resp: &CheckResponse) -> Vec<(String, String)> {
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

// -----------------------------------------------------------------------------------------
// Finding 1: static entities keep their parents and attributes when the request builds the
// entity of the same id.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_resource_entities_keep_their_parents_and_attributes() {
    let s = server("");
    // The folder (directly, and through a parent folder) and the attribute decide.
    for path in ["/public/secret", "/public/payroll", "/public/plans"] {
        let resp = s.check(get(path)).await;
        assert_eq!(answer(&resp), FORBIDDEN, "{path}: {resp:?}");
        let resp = s.check(with_token(path, &token("alice"))).await;
        assert_eq!(answer(&resp), FORBIDDEN, "{path} with a token: {resp:?}");
    }
    let resp = s.check(get("/public/open")).await;
    assert_eq!(answer(&resp), ALLOW, "{resp:?}");
    // The audit line names the forbid that decided.
    let audit = s.audit();
    assert!(
        audit
            .iter()
            .any(|l| l["resource"] == "Path::\"/public/secret\""
                && l["policies"] == json!(["restricted"])),
        "{audit:?}"
    );
    // A static user keeps its group when its token arrives; a static workload too.
    let resp = s.check(with_token("/admin/x", &token("carol"))).await;
    assert_eq!(answer(&resp), ALLOW, "carol is an admin: {resp:?}");
    let resp = s.check(with_token("/admin/x", &token("alice"))).await;
    assert_eq!(answer(&resp), FORBIDDEN, "alice is not: {resp:?}");
    let resp = s
        .check(with_cert(get("/admin/x"), &material().reader))
        .await;
    assert_eq!(
        answer(&resp),
        ALLOW,
        "the reader workload is an admin: {resp:?}"
    );
    // `validate` agrees that the set is valid: the fix is in the decision, not the load.
    let (code, out) = run(
        &["validate", "--config", "portcullis.toml"],
        s.dir(),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{out}");
}

// -----------------------------------------------------------------------------------------
// Finding 2: a security-relevant header that arrives twice with different values fails the
// request; identical copies are one value.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_forward_auth_headers_fail_the_request() {
    let s = server("");
    let base = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-host", "api.test"),
    ];
    let auth = |extra: Vec<(&'static str, String)>| {
        let mut h: Vec<(&str, String)> = base.iter().map(|(k, v)| (*k, v.to_string())).collect();
        h.extend(extra);
        h
    };
    let send = |h: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            s.http("GET", "/auth", &refs, "").await
        }
    };
    // The client's copy first, then the proxy's appended one.
    for (client, proxy) in [
        ("/public/x", "/orders/secret"),
        ("/public/x?", "/public/x"),
        ("/orders/secret", "/public/x"),
    ] {
        let a = send(auth(vec![
            ("x-forwarded-uri", client.into()),
            ("X-Forwarded-Uri", proxy.into()),
        ]))
        .await;
        assert_eq!(a.status, 400, "{client} + {proxy}: {a:?}");
        assert!(a.header(PRINCIPAL).is_none());
    }
    for name in [
        "x-forwarded-method",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "x-forwarded-for",
    ] {
        let a = send(auth(vec![
            ("x-forwarded-uri", "/public/x".into()),
            (name, "a".into()),
            (name, "b".into()),
        ]))
        .await;
        assert_eq!(a.status, 400, "{name}: {a:?}");
    }
    // The credential headers too: two Authorization headers, two certificate headers.
    let a = send(auth(vec![
        ("x-forwarded-uri", "/api/x".into()),
        ("authorization", format!("Bearer {}", token("alice"))),
        ("authorization", format!("Bearer {}", token("bob"))),
    ]))
    .await;
    assert_eq!(a.status, 401, "{a:?}");
    // Identical copies are one value.
    let a = send(auth(vec![
        ("x-forwarded-uri", "/public/x".into()),
        ("x-forwarded-uri", "/public/x".into()),
    ]))
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let alice = format!("Bearer {}", token("alice"));
    let a = send(auth(vec![
        ("x-forwarded-uri", "/api/x".into()),
        ("authorization", alice.clone()),
        ("authorization", alice),
    ]))
    .await;
    assert_eq!(
        (a.status, a.header(PRINCIPAL)),
        (200, Some("User::\"alice\"")),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_certificate_header_fails_the_request() {
    // The certificate header is configured under [peer]; a second server with it set.
    let config = config("").replace(
        "trust_domains = [\"example.org\"]",
        "trust_domains = [\"example.org\"]\nheader = \"x-client-cert\"",
    );
    let s = Binary::start(&config, &files());
    let m = material();
    let other = m
        .inter
        .issue(&LeafSpec::spiffe("spiffe://example.org/ns/test/sa/other"));
    let mut req = with_header_map(
        get("/internal/x"),
        &[
            ("x-client-cert", &m.reader.envoy_encoded()),
            ("x-client-cert", &other.envoy_encoded()),
        ],
    );
    let resp = s.check(req.clone()).await;
    assert_eq!(answer(&resp), UNAUTHENTICATED, "{resp:?}");
    req = with_header_map(
        get("/internal/x"),
        &[("x-client-cert", &m.reader.envoy_encoded())],
    );
    let resp = s.check(req).await;
    assert_eq!(answer(&resp), ALLOW, "{resp:?}");
}

// -----------------------------------------------------------------------------------------
// Finding 3: a presented token is verified or the request is denied, whatever stands
// beside it.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_beside_another_scheme_is_verified_or_refused() {
    let s = server("");
    let m = material();
    let bad = expired();
    let joined = [
        format!("Basic dXNlcjpwYXNz,Bearer {bad}"),
        format!("Bearer {bad},Basic dXNlcjpwYXNz"),
        format!("DPoP {bad}"),
        format!("Negotiate {bad}"),
        "Basic dXNlcjpwYXNz".to_string(),
    ];
    for value in &joined {
        for cert in [None, Some(&m.reader)] {
            let mut req = get("/internal/x");
            set_header(&mut req, "authorization", value.clone());
            if let Some(c) = cert {
                req = with_cert(req, c);
            }
            let resp = s.check(req).await;
            assert_eq!(
                answer(&resp),
                UNAUTHENTICATED,
                "{value:.30} cert={}: {resp:?}",
                cert.is_some()
            );
            assert!(
                outcome(&resp)
                    .2
                    .unwrap_or_default()
                    .contains("invalid_token")
            );
        }
    }
    // Two Authorization entries in header_map, with and without the certificate.
    for cert in [None, Some(&m.reader)] {
        let mut req = with_header_map(
            get("/internal/x"),
            &[
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("authorization", &format!("Bearer {bad}")),
            ],
        );
        if let Some(c) = cert {
            req = with_cert(req, c);
        }
        assert_eq!(answer(&s.check(req).await), UNAUTHENTICATED);
    }
    // Cookies: a look-alike name is the credential; two different tokens are refused.
    for cookie in [
        format!("session ={bad}"),
        format!("SESSION={bad}"),
        format!("theme=dark; session={bad}"),
        format!("session={}; session={}", token("alice"), token("bob")),
    ] {
        let mut req = with_cert(get("/internal/x"), &m.reader);
        set_header(&mut req, "cookie", cookie.clone());
        assert_eq!(answer(&s.check(req).await), UNAUTHENTICATED, "{cookie:.40}");
    }
    // A token in the cookie and another in Authorization: refused, not one picked.
    let mut req = with_token("/api/x", &token("alice"));
    set_header(&mut req, "cookie", format!("session={}", token("bob")));
    assert_eq!(answer(&s.check(req).await), UNAUTHENTICATED);
    // On the forward-auth door: two headers, and the joined form.
    let uri = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/internal/x"),
    ];
    let a = s
        .http(
            "GET",
            "/auth",
            &[
                uri[0],
                uri[1],
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("authorization", &format!("Bearer {bad}")),
            ],
            "",
        )
        .await;
    assert_eq!(a.status, 401, "{a:?}");
    // The valid forms still work: the token alone, the cookie alone, both the same.
    let alice = token("alice");
    let resp = s.check(with_token("/api/x", &alice)).await;
    assert_eq!(
        ok_header(&resp, PRINCIPAL).as_deref(),
        Some("User::\"alice\"")
    );
    let mut req = get("/api/x");
    set_header(&mut req, "cookie", format!("theme=dark; session={alice}"));
    assert_eq!(
        ok_header(&s.check(req).await, PRINCIPAL).as_deref(),
        Some("User::\"alice\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_schemes_let_only_the_named_scheme_through() {
    let s = server("").config_with_pass();
    let mut req = get("/public/x");
    set_header(&mut req, "authorization", "Basic dXNlcjpwYXNz");
    assert_eq!(answer(&s.check(req).await), ALLOW);
    let mut req = get("/public/x");
    set_header(
        &mut req,
        "authorization",
        format!("Basic dXNlcjpwYXNz,Bearer {}", expired()),
    );
    assert_eq!(answer(&s.check(req).await), UNAUTHENTICATED);
    let mut req = get("/public/x");
    set_header(&mut req, "authorization", format!("DPoP {}", expired()));
    assert_eq!(answer(&s.check(req).await), UNAUTHENTICATED);
}

trait WithPass {
    fn config_with_pass(self) -> Binary;
}

impl WithPass for Binary {
    /// A server like this one, with `[token] pass_schemes = ["Basic"]`.
    fn config_with_pass(self) -> Binary {
        drop(self);
        let config = config("").replace(
            "cookie = \"session\"",
            "cookie = \"session\"\npass_schemes = [\"Basic\"]",
        );
        Binary::start(&config, &files())
    }
}

// -----------------------------------------------------------------------------------------
// Findings 4 and 5: claims of another type are invalid, never absent; a sender constraint
// that cannot be enforced refuses the token.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_another_type_and_unenforceable_cnf_are_refused() {
    let s = server("");
    let thumb = material().reader.thumbprint();
    let refused = [
        ("jti", json!(12345)),
        ("jti", json!(["abc"])),
        ("jti", json!(true)),
        ("jti", json!({"v": "abc"})),
        ("jti", json!(null)),
        (
            "cnf",
            json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
        ),
        ("cnf", json!({"jwk": {"kty": "EC"}})),
        ("cnf", json!({"x5t#s256": thumb})),
        ("cnf", json!({"X5T#S256": thumb})),
        ("cnf", json!({"x5t#S256": thumb, "jkt": "x"})),
        ("cnf", json!("string")),
        ("cnf", json!([thumb])),
        ("cnf", json!({})),
        ("cnf", json!({"x5t#S256": 7})),
        ("cnf", json!(null)),
    ];
    for (claim, value) in refused {
        let t = token_with(claim, value.clone());
        let resp = s
            .check(with_cert(with_token("/api/x", &t), &material().reader))
            .await;
        assert_eq!(
            answer(&resp),
            UNAUTHENTICATED,
            "{claim} = {value}: {resp:?}"
        );
    }
    // Revoked string jti values are revoked; others pass.
    let resp = s
        .check(with_token("/api/x", &token_with("jti", json!("abc"))))
        .await;
    assert_eq!(answer(&resp), UNAUTHENTICATED);
    let resp = s
        .check(with_token("/api/x", &token_with("jti", json!("12345"))))
        .await;
    assert_eq!(answer(&resp), UNAUTHENTICATED);
    let resp = s
        .check(with_token("/api/x", &token_with("jti", json!("fresh"))))
        .await;
    assert_eq!(answer(&resp), ALLOW);
    // The enforceable form still binds.
    let t = token_with("cnf", json!({"x5t#S256": thumb}));
    let resp = s
        .check(with_cert(with_token("/api/x", &t), &material().reader))
        .await;
    assert_eq!(answer(&resp), ALLOW, "{resp:?}");
    // A claim named twice is refused: RFC 7519 lets parsers take either copy.
    let m = material();
    for payload in [
        format!(
            r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","sub":"admin","exp":{}}}"#,
            common::now() + 300
        ),
        format!(
            r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","exp":{},"cnf":{{"x5t#S256":"a","x5t#S256":"b"}}}}"#,
            common::now() + 300
        ),
    ] {
        let t = sign_raw(
            &m.signer,
            r#"{"alg":"ES256","kid":"es","typ":"JWT"}"#,
            &payload,
        );
        let resp = s.check(with_token("/api/x", &t)).await;
        assert_eq!(answer(&resp), UNAUTHENTICATED, "{payload}: {resp:?}");
    }
}

/// A compact JWS over exactly these header and payload texts.
fn sign_raw(signer: &TokenSigner, header: &str, payload: &str) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &pem_der(&signer.private_key_pem()),
    )
    .expect("ES256 key");
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", b64(sig.as_ref()))
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body")
}

// -----------------------------------------------------------------------------------------
// Finding 6: claim headers are vouched for by their own issuer only.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_headers_do_not_cross_issuers() {
    let s = server("");
    let now = common::now();
    let partner = material().partner.sign(&json!({
        "iss": PARTNER, "aud": AUDIENCE, "sub": "bob", "iat": now, "exp": now + 600,
        "email": "alice@example.org"
    }));
    let mut req = with_token("/api/x", &partner);
    set_header(&mut req, "x-user-email", "alice@example.org");
    let resp = s.check(req).await;
    assert_eq!(answer(&resp), ALLOW, "{resp:?}");
    assert_eq!(
        ok_header(&resp, PRINCIPAL).as_deref(),
        Some("User::\"partner/bob\"")
    );
    assert_eq!(
        ok_header(&resp, "x-user-email"),
        None,
        "the partner vouched for x-user-email"
    );
    assert_eq!(
        ok_header(&resp, "x-partner-email").as_deref(),
        Some("alice@example.org")
    );
    assert!(
        headers_to_remove(&resp).contains(&"x-user-email".to_string()),
        "the client's copy must go"
    );
    // The first issuer's token fills its own header and clears the partner's.
    let resp = s.check(with_token("/api/x", &token("alice"))).await;
    assert_eq!(
        ok_header(&resp, "x-user-email").as_deref(),
        Some("alice@example.org")
    );
    assert!(headers_to_remove(&resp).contains(&"x-partner-email".to_string()));
    // On the forward-auth door as well.
    let a = s
        .http(
            "GET",
            "/auth",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/api/x"),
                ("authorization", &format!("Bearer {partner}")),
            ],
            "",
        )
        .await;
    assert_eq!((a.status, a.header("x-user-email")), (200, None), "{a:?}");
    // One [response] claim_headers shared by two issuers is a configuration error.
    let shared = config("[response]\nclaim_headers = { \"x-user-email\" = \"email\" }\n");
    std::fs::write(s.path("shared.toml"), shared).expect("write");
    let (code, out) = run(
        &["validate", "--config", "shared.toml"],
        s.dir(),
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("set claim_headers on each [[issuer]]"),
        "{out}"
    );
}

// -----------------------------------------------------------------------------------------
// Finding 9: paths an upstream decodes differently; malleable signatures; dry-run headers;
// both header forms.
// -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_an_upstream_could_decode_differently_are_refused() {
    let s = server("");
    let lenient = Binary::start(&config("[limits]\nstrict_paths = false\n"), &files());
    for path in [
        "/public/%2561dmin",
        "/public/%252e%252e/secret",
        "/public/%c0%ae%c0%ae/secret",
        "/public/x%00.json",
        "/public/%EF%BC%8Fsecret",
        "/public/ｓecret",
        "/public/se%E2%80%8Bcret",
        "/public/%E2%80%AEterces",
    ] {
        let resp = s.check(get(path)).await;
        assert_eq!(answer(&resp), BAD_REQUEST, "{path}: {resp:?}");
        let a = s
            .http(
                "GET",
                "/auth",
                &[("x-forwarded-method", "GET"), ("x-forwarded-uri", path)],
                "",
            )
            .await;
        assert_eq!(a.status, 400, "{path} on /auth: {a:?}");
        // The documented switch turns these checks off (RFC 3986 canonical form still holds).
        let resp = lenient.check(get(path)).await;
        assert_ne!(
            answer(&resp),
            BAD_REQUEST,
            "{path} with strict_paths = false: {resp:?}"
        );
    }
    for path in ["/public/caf%C3%A9", "/public/%E2%82%AC", "/public/100%25"] {
        assert_eq!(answer(&s.check(get(path)).await), ALLOW, "{path}");
    }
}

/// `s` replaced by `n - s` in an ES256 token: the other valid text of the same signature.
fn high_s(token: &str) -> String {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, sig) = token.rsplit_once('.').expect("JWS");
    let mut sig = engine.decode(sig).expect("signature");
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(sig[32 + i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        sig[32 + i] = d as u8;
    }
    format!("{signed}.{}", engine.encode(sig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_texts_of_an_ecdsa_signature_are_one_token_and_no_other_text_is() {
    let s = server("");
    let t = token("alice");
    let twin = high_s(&t);
    assert_ne!(t, twin);
    for text in [&t, &twin, &t, &twin] {
        let resp = s.check(with_token("/api/x", text)).await;
        assert_eq!(answer(&resp), ALLOW, "{resp:?}");
    }
    // With the header and payload cached, any other signature is still checked.
    let (signed, sig) = t.rsplit_once('.').expect("JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .expect("sig");
    for i in [0usize, 31, 32, 63] {
        let mut forged = bytes.clone();
        forged[i] ^= 1;
        let forged = format!(
            "{signed}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&forged)
        );
        let resp = s.check(with_token("/api/x", &forged)).await;
        assert_eq!(answer(&resp), UNAUTHENTICATED, "byte {i} flipped: {resp:?}");
    }
    // The cache holds one token for the two texts (in process, over the same files).
    let settings =
        portcullis::config::Settings::load(&s.path("portcullis.toml")).expect("settings");
    let engine = portcullis::engine::Engine::load(&settings).expect("engine");
    for text in [&t, &twin, &twin] {
        let mut facts = portcullis::facts::RequestFacts {
            method: "GET".into(),
            path: "/api/x".into(),
            ..Default::default()
        };
        facts
            .headers
            .insert("authorization".into(), format!("Bearer {text}"));
        assert!(
            engine
                .decide(&facts, std::time::SystemTime::now())
                .allowed()
        );
    }
    assert_eq!(
        engine.cached_tokens(),
        1,
        "the two texts are one token to the cache"
    );
    // A revoked jti stays revoked in either text.
    let revoked = token_with("jti", json!("abc"));
    for text in [revoked.clone(), high_s(&revoked)] {
        assert_eq!(
            answer(&s.check(with_token("/api/x", &text)).await),
            UNAUTHENTICATED
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_removes_headers_it_cannot_vouch_for() {
    let s = Binary::start(
        &config("").replace("[server]\n", "[server]\nmode = \"dry-run\"\n"),
        &files(),
    );
    // Denied before policy: a refused token. Let through (dry-run), but the client's own
    // principal header is removed, never sent empty, and the refused token goes too.
    let mut req = with_token("/api/x", &expired());
    set_header(&mut req, PRINCIPAL, "User::\"admin\"");
    let resp = s.check(req).await;
    assert_eq!(answer(&resp), ALLOW, "{resp:?}");
    let set = ok_headers(&resp);
    assert!(!set.iter().any(|(k, _)| k == PRINCIPAL), "{set:?}");
    let removed = headers_to_remove(&resp);
    for name in [PRINCIPAL, "authorization", "x-user-email", "cookie"] {
        assert!(
            removed.contains(&name.to_string()),
            "{name} not removed: {removed:?}"
        );
    }
    assert_eq!(
        ok_header(&resp, "x-portcullis-dry-run").as_deref(),
        Some("would-deny: invalid_token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_header_map_must_agree() {
    let s = server("");
    let mut req = with_header_map(get("/public/x"), &[("x-a", "1")]);
    let http = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("http");
    http.headers
        .insert("authorization".into(), format!("Bearer {}", token("alice")));
    let resp = s.check(req.clone()).await;
    assert_eq!(answer(&resp), BAD_REQUEST, "{resp:?}");
}
