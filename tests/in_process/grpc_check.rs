//! End-to-end tests of the Envoy ext_authz door: a real server on 127.0.0.1:0 driven by a
//! tonic client, with certificates and keys generated at test time. Each rejection case is
//! also decided in-process to assert its exact reason, so a case cannot pass for the wrong
//! reason.

use crate::common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, Header};
use portcullis::demo::{LeafSpec, TokenSigner};
use portcullis::engine::DenyReason;
use portcullis::identity::{CertRejection, TokenRejection};
use portcullis::proto::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};
use std::time::SystemTime;

const UNAUTHENTICATED: i32 = 16;
const PERMISSION_DENIED: i32 = 7;
const INVALID_TOKEN: &str = "Bearer realm=\"portcullis\", error=\"invalid_token\"";
const NO_CREDENTIALS: &str = "Bearer realm=\"portcullis\"";

fn decide(req: &CheckRequest) -> portcullis::engine::Decision {
    world().engine.check(req, SystemTime::now())
}

/// Asserts the exact in-process reason (ignoring only the free-text message of a parser
/// error) and the exact wire outcome of one request.
async fn assert_rejected(
    name: &str,
    req: CheckRequest,
    expected: DenyReason,
    wire: (i32, i32, Option<String>),
) {
    let got = decide(&req).denial;
    let same = match (&got, &expected) {
        (
            Some(DenyReason::Token(TokenRejection::Malformed(_))),
            DenyReason::Token(TokenRejection::Malformed(_)),
        )
        | (
            Some(DenyReason::Certificate(CertRejection::UnknownIssuer(_))),
            DenyReason::Certificate(CertRejection::UnknownIssuer(_)),
        ) => true,
        (got, expected) => got.as_ref() == Some(expected),
    };
    assert!(same, "case {name}: expected {expected:?}, got {got:?}");
    assert_eq!(outcome(&check(req).await), wire, "case {name}");
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn tokens_of_each_algorithm_are_allowed() {
    let w = world();
    for signer in [&w.rs, &w.es, &w.ed] {
        let token = signer.sign(&claims());
        let resp = check(request("GET", "/api/orders?page=2", None, Some(&token))).await;
        assert_eq!(outcome(&resp), (0, 0, None), "{:?}", signer.alg);
        assert_eq!(
            ok_header(&resp, "x-portcullis-principal").as_deref(),
            Some("User::\"alice\"")
        );
    }
}

#[tokio::test]
async fn allow_reply_overwrites_the_principal_header_and_carries_metadata() {
    let w = world();
    let resp = check(request("GET", "/api/x", None, Some(&w.es.sign(&claims())))).await;
    let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
        panic!("not allowed: {resp:?}")
    };
    let h = ok
        .headers
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == "x-portcullis-principal")
        .unwrap();
    assert_eq!(h.append, None, "deprecated append must stay unset");
    assert_eq!(
        h.append_action,
        HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    let md = resp.dynamic_metadata.as_ref().expect("dynamic metadata");
    let policies = format!("{:?}", md.fields["policies"]);
    assert!(policies.contains("users-read"), "{policies}");
    assert!(md.fields.contains_key("decision_id"));
}

#[tokio::test]
async fn nothing_presented_is_401_without_error_code() {
    let resp = check(request("GET", "/api/orders", None, None)).await;
    assert_eq!(
        outcome(&resp),
        (UNAUTHENTICATED, 401, Some(NO_CREDENTIALS.into()))
    );
    let d = decide(&request("GET", "/api/orders", None, None));
    assert_eq!(d.denial, Some(DenyReason::NoPermit { anonymous: true }));
}

#[tokio::test]
async fn empty_and_unreadable_requests_are_denied_not_errors() {
    let resp = check(CheckRequest::default()).await;
    let (code, http, _) = outcome(&resp);
    assert_ne!(code, 0);
    assert_eq!(http, 400);
    let mut no_method = request("GET", "/api/x", None, None);
    let http = no_method
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap();
    http.method.clear();
    http.headers.remove(":method");
    let (code, http, _) = outcome(&check(no_method).await);
    assert_ne!(code, 0);
    assert_eq!(http, 400);
}

/// Signs claims with a header of our making, by a given signer.
fn signed(signer: &TokenSigner, header: impl FnOnce(&mut Header), claims: &Value) -> String {
    let mut h = Header::new(signer.alg);
    h.kid = Some(signer.kid.clone());
    header(&mut h);
    signer.sign_with(&h, claims)
}

fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut c = claims();
    f(&mut c);
    c
}

#[tokio::test]
async fn invalid_tokens_are_401_invalid_token_with_their_exact_reason() {
    let w = world();
    let now = now();
    let valid = w.es.sign(&claims());
    let (h, _, s) = {
        let mut parts = valid.split('.');
        (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        )
    };
    let impostor = TokenSigner::generate(Algorithm::ES256, "es");
    // HS256 with the RSA public key as the HMAC secret: the classic key confusion.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs".into());
        let key = jsonwebtoken::EncodingKey::from_secret(w.rs.public_key_pem().as_bytes());
        jsonwebtoken::encode(&header, &claims(), &key).unwrap()
    };
    let oversized = w.es.sign(&with(|c| c["pad"] = json!("x".repeat(9000))));
    let cases: Vec<(&str, String, TokenRejection)> = vec![
        (
            "expired",
            w.es.sign(&with(|c| {
                c["iat"] = json!(now - 4000);
                c["exp"] = json!(now - 3600)
            })),
            TokenRejection::Expired,
        ),
        (
            "nbf ahead",
            w.es.sign(&with(|c| c["nbf"] = json!(now + 3600))),
            TokenRejection::NotYetValid,
        ),
        (
            "iat in the future",
            w.es.sign(&with(|c| {
                c["iat"] = json!(now + 600);
                c["exp"] = json!(now + 900)
            })),
            TokenRejection::IssuedInFuture,
        ),
        (
            "wrong aud",
            w.es.sign(&with(|c| c["aud"] = json!("billing"))),
            TokenRejection::WrongAudience {
                found: vec!["billing".into()],
                accepted: vec![AUDIENCE.into(), "other-service".into()],
            },
        ),
        (
            "no aud",
            w.es.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("aud");
            })),
            TokenRejection::MissingAudience,
        ),
        // Claims of the wrong type are refused, never read as absent.
        (
            "exp not a number",
            w.es.sign(&with(|c| c["exp"] = json!("tomorrow"))),
            TokenRejection::InvalidClaim("exp".into()),
        ),
        (
            "nbf not a number",
            w.es.sign(&with(|c| c["nbf"] = json!("later"))),
            TokenRejection::InvalidClaim("nbf".into()),
        ),
        (
            "aud not a string",
            w.es.sign(&with(|c| c["aud"] = json!(["orders", 7]))),
            TokenRejection::InvalidClaim("aud".into()),
        ),
        (
            "sub not a string",
            w.es.sign(&with(|c| c["sub"] = json!(42))),
            TokenRejection::InvalidClaim("sub".into()),
        ),
        (
            "cnf thumbprint not a string",
            w.es.sign(&with(|c| c["cnf"] = json!({"x5t#S256": 1}))),
            TokenRejection::InvalidClaim("cnf".into()),
        ),
        (
            "wrong iss",
            w.es.sign(&with(|c| c["iss"] = json!("https://evil.test"))),
            TokenRejection::UnknownIssuer("https://evil.test".into()),
        ),
        (
            "unknown kid",
            signed(&w.es, |h| h.kid = Some("nope".into()), &claims()),
            TokenRejection::UnknownKey {
                issuer: ISSUER.into(),
                kid: "nope".into(),
            },
        ),
        (
            "bad signature",
            impostor.sign(&claims()),
            TokenRejection::BadSignature,
        ),
        (
            "tampered payload",
            format!("{h}.{}.{s}", b64(&with(|c| c["sub"] = json!("root")))),
            TokenRejection::BadSignature,
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims())
            ),
            TokenRejection::Malformed(String::new()),
        ),
        (
            "HS256 with the RSA public key as secret",
            confused,
            TokenRejection::AlgorithmNotAllowed("HS256".into()),
        ),
        (
            "missing exp",
            w.es.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            TokenRejection::MissingClaim("exp".into()),
        ),
        (
            "lifetime over the maximum",
            w.es.sign(&with(|c| c["exp"] = json!(now + 7200))),
            TokenRejection::LifetimeTooLong { max_secs: 3600 },
        ),
        (
            "unknown crit",
            signed(
                &w.es,
                |h| h.crit = Some(vec!["urn:example:ext".into()]),
                &claims(),
            ),
            TokenRejection::UnknownCritical,
        ),
        (
            "oversized",
            oversized,
            TokenRejection::TooLarge { max: 8192 },
        ),
        (
            "not a JWT",
            "hello-world".to_string(),
            TokenRejection::Malformed(String::new()),
        ),
        (
            "key of another type for the kid",
            signed(&w.es, |h| h.kid = Some("ed".into()), &claims()),
            TokenRejection::NoKeyForAlgorithm("ES256".into()),
        ),
        (
            "no sub",
            w.es.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("sub");
            })),
            TokenRejection::MissingClaim("sub".into()),
        ),
    ];
    for (name, token, expected) in cases {
        let req = request("GET", "/api/orders", None, Some(&token));
        let wire = (UNAUTHENTICATED, 401, Some(INVALID_TOKEN.into()));
        assert_rejected(name, req, DenyReason::Token(expected), wire).await;
    }
}

#[tokio::test]
async fn a_malformed_bearer_header_is_invalid_not_ignored() {
    let w = world();
    let t = w.es.sign(&claims());
    let mut req = request("GET", "/api/orders", None, None);
    // Two Authorization headers, joined by Envoy with a comma.
    common::set_header(&mut req, "authorization", format!("Bearer {t},Bearer {t}"));
    assert_eq!(
        outcome(&check(req).await),
        (UNAUTHENTICATED, 401, Some(INVALID_TOKEN.into()))
    );
}

#[tokio::test]
async fn bad_certificates_are_denied_with_their_exact_reason() {
    let w = world();
    let now = time::OffsetDateTime::now_utc();
    let spec = LeafSpec::spiffe(READER);
    let mut expired = spec.clone();
    expired.not_before = now - time::Duration::days(10);
    expired.not_after = now - time::Duration::days(1);
    let mut future = spec.clone();
    future.not_before = now + time::Duration::days(1);
    future.not_after = now + time::Duration::days(10);
    let mut server_only = spec.clone();
    server_only.client_auth = false;
    let mut ca_leaf = spec.clone();
    ca_leaf.ca = true;
    let mut two_uris = spec.clone();
    two_uris
        .uris
        .push("spiffe://example.org/ns/test/sa/other".into());
    let foreign = LeafSpec::spiffe("spiffe://evil.org/ns/test/sa/reader");
    let mut signing = spec.clone();
    signing.signing = true;
    let max = portcullis::config::DEFAULT_CERT_MAX_SIZE;
    let cases: Vec<(&str, String, CertRejection)> = vec![
        (
            "a SPIFFE leaf that may sign certificates",
            w.inter.issue(&signing).envoy_encoded(),
            CertRejection::SpiffeSigningLeaf,
        ),
        (
            "over the size limit",
            // A real certificate, padded past the limit with PEM line breaks.
            format!(
                "{}{}",
                w.inter.issue(&spec).envoy_encoded(),
                "%0A".repeat(max / 3 + 1)
            ),
            CertRejection::TooLarge { max },
        ),
        (
            "other CA",
            w.other_ca.issue(&spec).envoy_encoded(),
            CertRejection::UnknownIssuer(String::new()),
        ),
        (
            "expired",
            w.inter.issue(&expired).envoy_encoded(),
            CertRejection::Expired,
        ),
        (
            "not yet valid",
            w.inter.issue(&future).envoy_encoded(),
            CertRejection::NotYetValid,
        ),
        (
            "no clientAuth usage",
            w.inter.issue(&server_only).envoy_encoded(),
            CertRejection::Usage,
        ),
        (
            "CA certificate as leaf",
            w.inter.issue(&ca_leaf).envoy_encoded(),
            CertRejection::CaAsLeaf,
        ),
        (
            "two URI SANs",
            w.inter.issue(&two_uris).envoy_encoded(),
            CertRejection::SpiffeUriCount(2),
        ),
        (
            "foreign trust domain",
            w.inter.issue(&foreign).envoy_encoded(),
            CertRejection::ForeignTrustDomain("evil.org".into()),
        ),
        (
            "garbage",
            "not%20a%20certificate".into(),
            CertRejection::Encoding,
        ),
        (
            "the CA itself",
            portcullis::demo::envoy_url_encode(&w.root.cert_pem()),
            CertRejection::CaAsLeaf,
        ),
    ];
    for (name, cert, expected) in cases {
        let req = request("GET", "/internal/data", Some(&cert), None);
        let wire = (UNAUTHENTICATED, 401, Some(NO_CREDENTIALS.into()));
        assert_rejected(name, req, DenyReason::Certificate(expected), wire).await;
    }
}

#[tokio::test]
async fn a_bad_certificate_fails_the_request_even_with_a_good_token() {
    let w = world();
    let cert = w.other_ca.issue(&LeafSpec::spiffe(READER)).envoy_encoded();
    let token = w.es.sign(&claims());
    let resp = check(request("GET", "/api/orders", Some(&cert), Some(&token))).await;
    assert_eq!(outcome(&resp).1, 401);
}

#[tokio::test]
async fn workload_certificates_via_the_intermediate_or_the_root_are_allowed() {
    let w = world();
    let via_inter = reader_cert(w).envoy_encoded();
    let resp = check(request("GET", "/internal/data", Some(&via_inter), None)).await;
    assert_eq!(outcome(&resp), (0, 0, None));
    assert_eq!(
        ok_header(&resp, "x-portcullis-principal").as_deref(),
        Some(format!("Workload::\"{READER}\"").as_str())
    );
    let direct = w.root.issue(&LeafSpec::spiffe(READER)).envoy_encoded();
    assert_eq!(
        outcome(&check(request("GET", "/internal/data", Some(&direct), None)).await),
        (0, 0, None)
    );
    // The same workload on a path no policy grants: authenticated, so 403.
    let resp = check(request("GET", "/elsewhere", Some(&via_inter), None)).await;
    assert_eq!(outcome(&resp), (PERMISSION_DENIED, 403, None));
}

#[tokio::test]
async fn non_canonical_paths_are_refused_not_matched() {
    let w = world();
    let token = w.es.sign(&claims());
    // Each would dodge `forbid ... like "/api/admin/*"` yet reach /api/admin upstream.
    for path in [
        "/api//admin/users",
        "/api/%61dmin/users",
        "/api/x/..%2Fadmin/users",
        "/api/admin;x/users",
        "/api/./admin/users",
    ] {
        let req = request("GET", path, None, Some(&token));
        assert!(
            matches!(decide(&req).denial, Some(DenyReason::UnreadableRequest(_))),
            "{path}"
        );
        let (code, http, _) = outcome(&check(req).await);
        assert_eq!((code != 0, http), (true, 400), "{path}");
    }
}

#[tokio::test]
async fn a_forbid_wins_over_a_permit() {
    let w = world();
    let req = request("GET", "/api/admin/users", None, Some(&w.es.sign(&claims())));
    let d = decide(&req);
    assert_eq!(d.denial, Some(DenyReason::Forbidden));
    assert_eq!(d.policies(), ["no-admin"]);
    assert_eq!(outcome(&check(req).await), (PERMISSION_DENIED, 403, None));
}

#[tokio::test]
async fn an_erroring_policy_denies() {
    let w = world();
    let token = w.es.sign(&claims());
    let req = request("GET", "/api/fragile/thing", None, Some(&token));
    let d = decide(&req);
    assert_eq!(d.denial, Some(DenyReason::PolicyError));
    assert_eq!(outcome(&check(req).await), (PERMISSION_DENIED, 403, None));
    // Control: when the forbid evaluates without error (and does not match), the permit holds.
    let mut req = request("GET", "/api/fragile/thing", None, Some(&token));
    common::set_header(&mut req, "x-flag", "pass");
    assert_eq!(outcome(&check(req).await), (0, 0, None));
}

#[tokio::test]
async fn certificate_bound_tokens() {
    let w = world();
    let cert = reader_cert(w);
    let other = reader_cert(w);
    let bound = w.es.sign(&with(|c| {
        c["cnf"] = json!({ "x5t#S256": cert.thumbprint() })
    }));
    // Bound token with its certificate: allowed, and policies see the binding.
    let req = request(
        "POST",
        "/api/orders",
        Some(&cert.envoy_encoded()),
        Some(&bound),
    );
    assert_eq!(outcome(&check(req).await), (0, 0, None));
    // The same token replayed with another certificate of the same workload.
    let req = request(
        "POST",
        "/api/orders",
        Some(&other.envoy_encoded()),
        Some(&bound),
    );
    assert_eq!(
        decide(&req).denial,
        Some(DenyReason::Token(TokenRejection::BindingMismatch))
    );
    assert_eq!(
        outcome(&check(req).await),
        (UNAUTHENTICATED, 401, Some(INVALID_TOKEN.into()))
    );
    // Replayed with no certificate at all.
    let req = request("POST", "/api/orders", None, Some(&bound));
    assert_eq!(
        decide(&req).denial,
        Some(DenyReason::Token(TokenRejection::BoundWithoutCertificate))
    );
    assert_eq!(outcome(&check(req).await).1, 401);
    // An unbound token: valid, but the bound-writes policy does not permit it.
    let unbound = w.es.sign(&claims());
    let req = request(
        "POST",
        "/api/orders",
        Some(&cert.envoy_encoded()),
        Some(&unbound),
    );
    assert_eq!(outcome(&check(req).await), (PERMISSION_DENIED, 403, None));
}

#[tokio::test]
async fn an_issuer_can_require_binding_and_a_token_type() {
    let w = world();
    let cert = reader_cert(w);
    let base = || {
        let now = now();
        json!({ "iss": PEM_ISSUER, "aud": AUDIENCE, "sub": "svc", "iat": now, "exp": now + 300 })
    };
    let at_jwt = |h: &mut Header| {
        h.kid = None;
        h.typ = Some("at+jwt".into());
    };
    let mut bound_claims = base();
    bound_claims["cnf"] = json!({ "x5t#S256": cert.thumbprint() });
    let bound = signed(&w.pem_signer, at_jwt, &bound_claims);
    let req = request(
        "GET",
        "/api/orders",
        Some(&cert.envoy_encoded()),
        Some(&bound),
    );
    let resp = check(req).await;
    assert_eq!(outcome(&resp), (0, 0, None));
    // The issuer's id prefix keeps its subjects apart from other issuers'.
    assert_eq!(
        ok_header(&resp, "x-portcullis-principal").as_deref(),
        Some("User::\"pem/svc\"")
    );

    let unbound = signed(&w.pem_signer, at_jwt, &base());
    let req = request(
        "GET",
        "/api/orders",
        Some(&cert.envoy_encoded()),
        Some(&unbound),
    );
    assert_eq!(
        decide(&req).denial,
        Some(DenyReason::Token(TokenRejection::Unbound))
    );
    assert_eq!(outcome(&check(req).await).1, 401);

    let wrong_typ = signed(
        &w.pem_signer,
        |h| {
            h.kid = None;
            h.typ = Some("JWT".into())
        },
        &bound_claims,
    );
    let req = request(
        "GET",
        "/api/orders",
        Some(&cert.envoy_encoded()),
        Some(&wrong_typ),
    );
    assert!(matches!(
        decide(&req).denial,
        Some(DenyReason::Token(TokenRejection::WrongType { .. }))
    ));
    assert_eq!(outcome(&check(req).await).1, 401);

    // An RS256 token is not in this issuer's allow-list, even though the JWKS issuer takes it.
    let mut rs_claims = bound_claims.clone();
    rs_claims["iss"] = json!(PEM_ISSUER);
    let rs = signed(&w.rs, at_jwt, &rs_claims);
    let req = request("GET", "/api/orders", Some(&cert.envoy_encoded()), Some(&rs));
    assert_eq!(
        decide(&req).denial,
        Some(DenyReason::Token(TokenRejection::AlgorithmNotAllowed(
            "RS256".into()
        )))
    );
}

#[tokio::test]
async fn the_audit_log_records_decisions_but_never_credentials() {
    let w = world();
    let cert = reader_cert(w);
    let token = w.es.sign(&with(|c| {
        c["cnf"] = json!({ "x5t#S256": cert.thumbprint() })
    }));
    let resp = check(request(
        "POST",
        "/api/audited",
        Some(&cert.envoy_encoded()),
        Some(&token),
    ))
    .await;
    assert_eq!(outcome(&resp), (0, 0, None));
    let md = resp.dynamic_metadata.unwrap();
    let Some(prost_types::value::Kind::StringValue(id)) = md.fields["decision_id"].kind.clone()
    else {
        panic!("no decision id")
    };
    // Denied with a bad token too: reasons are logged, the token is not.
    let bad = w.es.sign(&with(|c| c["aud"] = json!("billing")));
    check(request("GET", "/api/audited", None, Some(&bad))).await;
    assert!(w.engine.flush_audit(std::time::Duration::from_secs(5)));
    let audit = std::fs::read_to_string(w.dir.path().join("audit.log")).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains(&id))
        .expect("an audit line for the decision");
    let event: Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["decision"], "allow");
    assert_eq!(event["principal"], "User::\"alice\"");
    assert_eq!(event["resource"], "Path::\"/api/audited\"");
    assert_eq!(event["policies"], json!(["bound-writes"]));
    assert!(event["time"].as_str().is_some() && event["latency_us"].as_u64().is_some());
    assert!(
        audit.contains("token audience is not accepted by this issuer"),
        "the denial and its reason are logged"
    );
    // No part of a credential: not the tokens, nor any of their segments, nor the certificate.
    for t in [&token, &bad] {
        for segment in t.split('.') {
            assert!(
                !audit.contains(segment),
                "audit log contains a token segment"
            );
        }
    }
    for line in cert.pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!audit.contains(line), "audit log contains certificate body");
    }
    assert!(!audit.contains(&cert.envoy_encoded()[30..90]));
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let w = world();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", w.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let resp = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
}
