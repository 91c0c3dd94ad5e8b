//! The HTTP doors against a running server: the JSON check API answers exactly as the gRPC
//! door does for the same CheckRequest, and the forward-auth door reads the original request
//! from X-Forwarded-* headers and the certificate from the configured header.

use crate::common;

use common::{Authority, LeafSpec, TokenSigner, cert_der, outcome, request, start_server};
use jsonwebtoken::Algorithm;
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use serde_json::json;

const POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource) when { resource.path like "/api/*" };
@id("workload-read")
permit (principal is Workload, action == Action::"GET", resource) when { resource.path like "/internal/*" };
@id("no-admin")
forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

struct Doors {
    server: common::RunningServer,
    signer: TokenSigner,
    ca: Authority,
}

async fn doors() -> Doors {
    let ca = Authority::root("doors CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k");
    let dir = common::trust_dir(POLICIES, &ca, &signer);
    let config = r#"
[server]
http = "127.0.0.1:0"
[peer]
trust_bundle = "ca.pem"
trust_domains = ["example.org"]
header = "x-ssl-client-cert"
[[issuer]]
issuer = "https://idp"
audiences = ["api"]
jwks_file = "jwks.json"
algorithms = ["ES256"]
[forward_auth]
path = "/auth"
[response]
claim_headers = { "x-user-email" = "email" }
[policy]
dir = "policies"
[log]
audit = "audit.log"
"#;
    Doors {
        server: start_server(dir, config).await,
        signer,
        ca,
    }
}

impl Doors {
    fn token(&self) -> String {
        let now = portcullis::demo::unix_now();
        self.signer.sign(&json!({ "iss": "https://idp", "aud": "api", "sub": "alice", "iat": now, "exp": now + 300, "email": "alice@example.org" }))
    }

    async fn json_check(&self, req: &CheckRequest) -> (u16, serde_json::Value) {
        let body = portcullis::proto::to_json("envoy.service.auth.v3.CheckRequest", req).unwrap();
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/check", self.server.http))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
        )
    }

    /// Forward-auth for GET /internal/x with `cert` in the certificate header: the status.
    async fn with_cert(&self, cert: &str) -> u16 {
        let h = [
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/internal/x"),
            ("x-ssl-client-cert", cert),
        ];
        self.forward(&h).await.status().as_u16()
    }

    async fn forward(&self, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(format!("http://{}/auth", self.server.http));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

/// The parts of a reply that must agree between doors (not the per-decision id).
fn essence(resp: &CheckResponse) -> (i32, i32, Option<String>, Vec<String>) {
    let (code, http, www) = outcome(resp);
    use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
    let headers = match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| format!("{}={}", h.key, h.value))
            .collect(),
        _ => Vec::new(),
    };
    (code, http, www, headers)
}

#[tokio::test]
async fn the_json_api_answers_as_the_grpc_door_does() {
    let d = doors().await;
    let cert =
        d.ca.issue(&LeafSpec::spiffe("spiffe://example.org/svc"))
            .envoy_encoded();
    let token = d.token();
    let cases = [
        request("GET", "/api/orders?x=1", None, Some(&token)),
        request("GET", "/api/admin/x", None, Some(&token)),
        request("GET", "/api/orders", None, None),
        request("GET", "/api/orders", None, Some("not-a-token")),
        request("GET", "/internal/x", Some(&cert), None),
        request("GET", "/internal/x", Some("garbage"), None),
        CheckRequest::default(),
    ];
    for req in cases {
        let grpc = d.server.check(req.clone()).await;
        let (status, json) = d.json_check(&req).await;
        assert_eq!(status, 200);
        let via_json: CheckResponse =
            portcullis::proto::from_json("envoy.service.auth.v3.CheckResponse", &json.to_string())
                .unwrap();
        assert_eq!(essence(&via_json), essence(&grpc), "{json}");
    }
    // Unreadable JSON is a 400 with a reason, never an allow.
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/check", d.server.http))
        .body("{\"attributes\": 7}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("not a CheckRequest"));
}

#[tokio::test]
async fn forward_auth_reads_the_original_request_from_headers() {
    let d = doors().await;
    let token = d.token();
    let bearer = format!("Bearer {token}");
    let original = |uri: &'static str| {
        vec![
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", uri),
            ("x-forwarded-host", "api.example.org"),
        ]
    };

    let mut h = original("/api/orders?page=2");
    h.push(("authorization", &bearer));
    let resp = d.forward(&h).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-portcullis-principal"], "User::\"alice\"");
    assert_eq!(resp.headers()["x-user-email"], "alice@example.org");
    assert!(resp.headers().contains_key("x-portcullis-decision-id"));

    // No credential: 401 with the challenge. Bad token: invalid_token.
    let resp = d.forward(&original("/api/orders")).await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"portcullis\""
    );
    let mut h = original("/api/orders");
    h.push(("authorization", "Bearer nope"));
    let resp = d.forward(&h).await;
    assert_eq!(resp.status().as_u16(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );

    // Forbidden by policy: 403, no identity headers.
    let mut h = original("/api/admin/users");
    h.push(("authorization", &bearer));
    let resp = d.forward(&h).await;
    assert_eq!(resp.status().as_u16(), 403);
    assert!(!resp.headers().contains_key("x-portcullis-principal"));

    // The original method matters: a POST is not a GET.
    let resp = d
        .forward(&[
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/api/orders"),
            ("authorization", &bearer),
        ])
        .await;
    assert_eq!(resp.status().as_u16(), 403);

    // A path that is not canonical could slip past a path policy: 400, never an allow.
    for path in [
        "/api//admin/users",
        "/api/%61dmin/users",
        "/api/x/..%2Fadmin/users",
        "/api/admin;x/users",
    ] {
        let resp = d
            .forward(&[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", path),
                ("authorization", &bearer),
            ])
            .await;
        assert_eq!(resp.status().as_u16(), 400, "{path}");
    }
    // Two headers for the same fact that disagree (one of them the client's): 400.
    let resp = d
        .forward(&[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/orders"),
            ("x-original-uri", "/api/admin/x"),
            ("authorization", &bearer),
        ])
        .await;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = d
        .forward(&[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/orders"),
            ("x-original-uri", "/api/orders"),
            ("authorization", &bearer),
        ])
        .await;
    assert_eq!(resp.status().as_u16(), 200);

    // Without the original URI the request cannot be read: 400, never an allow.
    let resp = d
        .forward(&[("x-forwarded-method", "GET"), ("authorization", &bearer)])
        .await;
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn forward_auth_takes_the_certificate_from_the_configured_header() {
    let d = doors().await;
    let good =
        d.ca.issue(&LeafSpec::spiffe("spiffe://example.org/svc"))
            .envoy_encoded();
    let forged = Authority::root("forger")
        .issue(&LeafSpec::spiffe("spiffe://example.org/svc"))
        .envoy_encoded();
    assert_eq!(d.with_cert(&good).await, 200);
    // A certificate from another CA, as a client would forge it: refused.
    assert_eq!(d.with_cert(&forged).await, 401);
    // nginx sends the header empty when the client has no certificate: anonymous.
    assert_eq!(d.with_cert("").await, 401);
}

#[tokio::test]
async fn traefik_style_certificate_headers_are_read_too() {
    use base64::Engine as _;
    let d = doors().await;
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let inter = d.ca.intermediate("doors intermediate");
    let leaf = inter.issue(&LeafSpec::spiffe("spiffe://example.org/svc"));
    let inter_der = cert_der(&inter.cert_pem());
    // Traefik's passTLSClientCert: base64 DER, the chain joined by commas, URL-escaped or not.
    let chain = format!("{},{}", b64(&leaf.der), b64(&inter_der));
    assert_eq!(d.with_cert(&chain).await, 200);
    let escaped: String =
        percent_encoding::utf8_percent_encode(&chain, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    assert_eq!(d.with_cert(&escaped).await, 200);
    // Without the intermediate the leaf does not chain to the trusted root.
    assert_eq!(d.with_cert(&b64(&leaf.der)).await, 401);
    // A chain cannot bring its own trust anchor.
    let rogue_root = Authority::root("rogue");
    let rogue = rogue_root.issue(&LeafSpec::spiffe("spiffe://example.org/svc"));
    let rogue_root_der = cert_der(&rogue_root.cert_pem());
    assert_eq!(
        d.with_cert(&format!("{},{}", b64(&rogue.der), b64(&rogue_root_der)))
            .await,
        401
    );
}

/// A client that never finishes its headers is cut off after `http_header_timeout`, and
/// clients holding every one of `max_http_connections` are evicted for new ones:
/// the HTTP listener cannot be taken by slow or stalled clients (slowloris).
#[tokio::test]
async fn stalled_http_clients_are_cut_off_and_cannot_take_the_listener() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = common::policy_dir(POLICIES);
    let config = r#"
[server]
http = "127.0.0.1:0"
[limits]
http_header_timeout = "1s"
max_http_connections = 3
[policy]
dir = "policies"
[log]
audit = "audit.log"
"#;
    let server = start_server(dir, config).await;
    let addr = server.http;
    // Headers begun, never finished.
    const PARTIAL: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n";
    let stall = |sent: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        s
    };
    let healthz = |limit: Duration| async move {
        reqwest::Client::builder()
            .timeout(limit)
            .build()
            .unwrap()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };

    // A stalled client is disconnected after the header timeout, whatever it stalled on:
    // its headers, its first byte or the HTTP/2 preface; an HTTP/2 client that then stops
    // answering pings is dropped too.
    let mut preface = stall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), preface.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "an HTTP/2 preface was kept for over 5 s");
    for sent in [PARTIAL, b"", b"PRI * HTTP/2.0\r\n"] {
        let started = Instant::now();
        let mut one = stall(sent).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), one.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "a client stalled after {sent:?} was kept for over 5 s"
        );
        let held = started.elapsed();
        assert!(
            held >= Duration::from_millis(900),
            "cut off early: {held:?}"
        );
    }

    // Stalled clients in every slot: a new client takes the place of the one stalled the
    // longest (`slots.rs`), without waiting for the stalls to be cut off.
    let stalled = vec![
        stall(PARTIAL).await,
        stall(PARTIAL).await,
        stall(PARTIAL).await,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(healthz(Duration::from_millis(800)).await.ok(), Some(200));
    assert_eq!(healthz(Duration::from_millis(800)).await.ok(), Some(200));
    drop(stalled);
}
