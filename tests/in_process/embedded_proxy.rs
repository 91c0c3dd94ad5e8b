//! The `embedded_proxy` example end to end, its own code included as a module: a TLS client
//! with certificates and tokens generated at test time, the proxy with an embedded engine,
//! and an upstream that records what reached it, all on 127.0.0.1:0. Every denial is
//! checked twice: the client's answer, and the upstream's count proving it was never asked.

#[path = "../../examples/embedded_proxy.rs"]
#[allow(dead_code)]
mod proxy;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use portcullis::demo::{Authority, ClientCert, LeafSpec, TokenSigner, unix_now};
use portcullis::{Background, Engine, Settings};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The bound on every await in these tests.
const STEP: Duration = Duration::from_secs(10);
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "orders";
const PRINCIPAL_HEADER: &str = "x-portcullis-principal";
const ALICE: &str = "User::\"alice\"";

const POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource) when { resource.path like "/api/*" };
@id("public")
permit (principal, action == Action::"GET", resource) when { resource.path like "/public/*" };
@id("frontend-users")
permit (principal is User, action == Action::"GET", resource) when {
  resource.path like "/mtls/*" && context has peer && context.peer has spiffe_id &&
  context.peer.spiffe_id == "spiffe://example.org/ns/test/sa/frontend"
};
@id("no-admin")
forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

async fn within<T>(what: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

/// The upstream: answers 200 to everything and keeps the headers of each request.
#[derive(Default)]
struct Upstream {
    seen: Mutex<Vec<HeaderMap>>,
}

impl Upstream {
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every value of `name` in the last request the upstream received.
    fn last_values(&self, name: &str) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        let last = seen.last().expect("the upstream received a request");
        last.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
}

async fn start_upstream() -> (SocketAddr, Arc<Upstream>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(Upstream::default());
    let recorder = upstream.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    recorder.seen.lock().unwrap().push(req.headers().clone());
                    async {
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("upstream"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, upstream, task)
}

/// A proxy (the example's own `serve`) in front of a recording upstream, with its engine
/// configured for one CA (through an intermediate it knows) and one token issuer.
struct World {
    dir: tempfile::TempDir,
    inter: Authority,
    signer: TokenSigner,
    proxy: SocketAddr,
    upstream: Arc<Upstream>,
    /// The CA that issued the proxy's own server certificate, for the client to trust.
    server_ca: CertificateDer<'static>,
    tasks: Vec<JoinHandle<()>>,
    _background: Background,
}

impl Drop for World {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn world() -> World {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let root = Authority::root("client root CA");
    let inter = root.intermediate("client intermediate CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k1");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), root.cert_pem()).unwrap();
    std::fs::write(path("intermediate.pem"), inter.cert_pem()).unwrap();
    std::fs::write(path("idp.jwks.json"), portcullis::demo::jwks(&[&signer])).unwrap();
    std::fs::create_dir(path("policies")).unwrap();
    std::fs::write(path("policies/proxy.cedar"), POLICIES).unwrap();
    let config = format!(
        r#"
[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
claim_headers = {{ "x-user-email" = "email" }}

[policy]
dir = "policies"

[log]
audit = "audit.log"
"#
    );
    let settings = Settings::from_toml(&config, dir.path()).expect("valid test config");
    let engine = Arc::new(Engine::load(&settings).expect("engine loads"));
    let background = engine.start().expect("engine starts");

    let server_ca = Authority::root("proxy server CA");
    let server = server_ca.issue(&LeafSpec::loopback_server());
    let tls = proxy::server_tls(
        vec![CertificateDer::from(server.der.clone())],
        PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
    )
    .expect("proxy TLS settings");

    let (upstream_addr, upstream, upstream_task) = start_upstream().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let proxy_task = tokio::spawn(proxy::serve(listener, tls, engine, upstream_addr));
    let server_ca = CertificateDer::pem_slice_iter(server_ca.cert_pem().as_bytes())
        .next()
        .unwrap()
        .unwrap();
    World {
        dir,
        inter,
        signer,
        proxy: proxy_addr,
        upstream,
        server_ca,
        tasks: vec![upstream_task, proxy_task],
        _background: background,
    }
}

impl World {
    fn client_cert(&self, name: &str) -> ClientCert {
        self.inter.issue(&LeafSpec::spiffe(&format!(
            "spiffe://example.org/ns/test/sa/{name}"
        )))
    }

    fn token(&self, extra: Value) -> String {
        let now = unix_now();
        let mut claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
        });
        if let (Value::Object(claims), Value::Object(extra)) = (&mut claims, extra) {
            claims.extend(extra);
        }
        self.signer.sign(&claims)
    }

    /// Sends one request over a fresh TLS connection presenting `identity` (certificate
    /// and the key the client signs the handshake with), with `headers`.
    async fn send_as(
        &self,
        identity: Option<(&ClientCert, &str)>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, HeaderMap, String), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.server_ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key_pem)) => {
                // Built by hand, not with `with_client_auth_cert`, which refuses a key that
                // does not match the certificate: the tests need to try exactly that.
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
                let signing = rustls::crypto::aws_lc_rs::default_provider()
                    .key_provider
                    .load_private_key(key)
                    .unwrap();
                let certified = rustls::sign::CertifiedKey::new(
                    vec![CertificateDer::from(cert.der.clone())],
                    signing,
                );
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    certified,
                )))
            }
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = within("connect", TcpStream::connect(self.proxy))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = within("TLS handshake", connector.connect(name, tcp))
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut sender, connection) = within(
            "HTTP handshake",
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)),
        )
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
        let connection = tokio::spawn(connection);
        let mut request = Request::get(path).header("host", "localhost");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let result = async {
            let response = within(
                "response",
                sender.send_request(request.body(Full::default()).unwrap()),
            )
            .await
            .map_err(|e| format!("request: {e}"))?;
            let (parts, body) = response.into_parts();
            let body = within("response body", body.collect())
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
        .await;
        connection.abort();
        result
    }

    async fn send(
        &self,
        cert: Option<&ClientCert>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        self.send_as(cert.map(|c| (c, c.key_pem.as_str())), path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// (a) A valid certificate and token, on a path whose policy needs both, reach the
/// upstream, which sees the principal Portcullis set.
#[tokio::test]
async fn allowed_request_reaches_upstream_with_principal() {
    let w = world().await;
    let cert = w.client_cert("frontend");
    let auth = bearer(&w.token(json!({})));
    let (status, headers, body) = w
        .send(
            Some(&cert),
            "/mtls/orders?page=2",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream"));
    assert_eq!(w.upstream.count(), 1);
    assert_eq!(w.upstream.last_values(PRINCIPAL_HEADER), [ALICE]);
    assert_eq!(
        w.upstream.last_values("authorization"),
        [auth.as_str()],
        "the token goes on unless strip_authorization is set"
    );
    // The decision id reaches the upstream, not the client.
    assert_eq!(w.upstream.last_values("x-portcullis-decision-id").len(), 1);
    assert!(headers.get(PRINCIPAL_HEADER).is_none());
    // The audit line is written by the audit log's own thread, after the reply: wait for it.
    let deadline = std::time::Instant::now() + STEP;
    let audit = loop {
        let audit = std::fs::read_to_string(w.dir.path().join("audit.log")).unwrap_or_default();
        if audit.contains("\"decision\":\"allow\"") || std::time::Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(audit.contains("\"decision\":\"allow\""), "{audit}");

    // The certificate from the TLS session is what the policy saw: without it, or with
    // another workload's, the same token is refused.
    let (status, _, _) = w
        .send(None, "/mtls/orders", &[("authorization", &auth)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = w
        .send(
            Some(&w.client_cert("reader")),
            "/mtls/orders",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(w.upstream.count(), 1);
}

/// (b) Nothing presented where the policy needs a user: 401 with a challenge, from the
/// proxy alone.
#[tokio::test]
async fn missing_credentials_get_401_and_upstream_is_not_asked() {
    let w = world().await;
    let (status, headers, _) = w.send(None, "/api/orders", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers
        .get("www-authenticate")
        .expect("a 401 carries WWW-Authenticate")
        .to_str()
        .unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert_eq!(
        w.upstream.count(),
        0,
        "a denied request reached the upstream"
    );

    // The same request with a valid token is allowed: the 401 was the missing credential.
    let auth = bearer(&w.token(json!({})));
    let (status, _, _) = w
        .send(None, "/api/orders", &[("authorization", &auth)])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w.upstream.count(), 1);
}

/// (c) A forbidden path: 403 for a caller who would otherwise be allowed.
#[tokio::test]
async fn forbidden_path_gets_403_and_upstream_is_not_asked() {
    let w = world().await;
    let cert = w.client_cert("reader");
    let auth = bearer(&w.token(json!({})));
    let (status, headers, _) = w
        .send(Some(&cert), "/api/admin/users", &[("authorization", &auth)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("www-authenticate").is_none());
    assert_eq!(
        w.upstream.count(),
        0,
        "a forbidden request reached the upstream"
    );
}

/// (d) A client's own `x-portcullis-principal` never reaches the upstream: it sees
/// Portcullis's value only, for a user and for an anonymous caller alike.
#[tokio::test]
async fn client_cannot_forge_the_principal_header() {
    let w = world().await;
    let forged = [
        (PRINCIPAL_HEADER, "User::\"admin\""),
        (
            PRINCIPAL_HEADER,
            "Workload::\"spiffe://example.org/ns/prod/sa/root\"",
        ),
    ];
    let cert = w.client_cert("reader");
    let auth = bearer(&w.token(json!({})));
    let mut headers = forged.to_vec();
    headers.push(("authorization", &auth));
    let (status, _, _) = w.send(Some(&cert), "/api/orders", &headers).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w.upstream.last_values(PRINCIPAL_HEADER), [ALICE]);

    let (status, _, _) = w.send(None, "/public/status", &forged).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w.upstream.count(), 2);
    assert_eq!(
        w.upstream.last_values(PRINCIPAL_HEADER),
        ["Anonymous::\"anonymous\""]
    );
}

/// A claim header Portcullis sets from a token's claim (`x-user-email`) cannot be forged
/// either: with a token it carries the token's claim, and without one (an anonymous allow,
/// where Portcullis sets nothing) the client's copy is removed, not passed on.
#[tokio::test]
async fn client_cannot_forge_a_claim_header() {
    let w = world().await;
    let forged = ("x-user-email", "admin@example.org");
    let cert = w.client_cert("reader");
    let auth = bearer(&w.token(json!({"email": "alice@example.org"})));
    let (status, _, _) = w
        .send(
            Some(&cert),
            "/api/orders",
            &[forged, ("authorization", &auth)],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        w.upstream.last_values("x-user-email"),
        ["alice@example.org"]
    );

    let (status, _, _) = w.send(None, "/public/status", &[forged]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w.upstream.count(), 2);
    assert!(
        w.upstream.last_values("x-user-email").is_empty(),
        "a client's copy of a claim header reached the upstream on an anonymous allow"
    );
}

/// (e) A token bound to certificate A (RFC 8705 `cnf.x5t#S256`) is refused with
/// certificate B, though both are valid and the token is accepted with A.
#[tokio::test]
async fn bound_token_with_another_certificate_is_denied() {
    let w = world().await;
    let a = w.client_cert("a");
    let b = w.client_cert("b");
    let bound = bearer(&w.token(json!({ "cnf": { "x5t#S256": a.thumbprint() } })));
    let (status, _, _) = w
        .send(Some(&a), "/api/orders", &[("authorization", &bound)])
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the bound token with its own certificate"
    );
    assert_eq!(w.upstream.count(), 1);

    let (status, headers, _) = w
        .send(Some(&b), "/api/orders", &[("authorization", &bound)])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers.get("www-authenticate").unwrap().to_str().unwrap();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert_eq!(
        w.upstream.count(),
        1,
        "a token replayed with another certificate reached the upstream"
    );

    // Without any certificate the bound token is refused too.
    let (status, _, _) = w
        .send(None, "/api/orders", &[("authorization", &bound)])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(w.upstream.count(), 1);
}

/// The proxy's TLS layer accepts any client certificate; Portcullis must still refuse one
/// from a CA it does not trust, before the upstream sees the request.
#[tokio::test]
async fn certificate_from_untrusted_ca_is_denied_by_portcullis() {
    let w = world().await;
    let stranger = Authority::root("some other CA")
        .issue(&LeafSpec::spiffe("spiffe://example.org/ns/test/sa/reader"));
    let auth = bearer(&w.token(json!({})));
    let (status, _, _) = w
        .send(Some(&stranger), "/api/orders", &[("authorization", &auth)])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        w.upstream.count(),
        0,
        "an untrusted certificate reached the upstream"
    );
}

/// A client presenting someone else's certificate (without its key) fails the handshake:
/// the proxy's verifier checks the handshake signature even though it leaves the chain to
/// Portcullis.
#[tokio::test]
async fn certificate_without_its_key_fails_the_handshake() {
    let w = world().await;
    let victim = w.client_cert("victim");
    let thief = w.client_cert("thief");
    let bound = bearer(&w.token(json!({ "cnf": { "x5t#S256": victim.thumbprint() } })));
    let result = w
        .send_as(
            Some((&victim, thief.key_pem.as_str())),
            "/api/orders",
            &[("authorization", &bound)],
        )
        .await;
    assert!(
        result.is_err(),
        "stolen certificate was accepted: {result:?}"
    );
    assert_eq!(w.upstream.count(), 0);
}
