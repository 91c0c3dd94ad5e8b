//! Shared test world: throwaway CAs, certificates and signing keys generated at start,
//! a configuration written to a temporary directory, and a real Portcullis gRPC server
//! on 127.0.0.1:0 running on its own thread for the whole test binary.
#![allow(dead_code)]

pub mod binary;
pub mod keyserver;

use jsonwebtoken::Algorithm;
use portcullis::config::Settings;
pub use portcullis::demo::{Authority, ClientCert, LeafSpec, TokenSigner};
use portcullis::engine::Engine;
use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const ISSUER: &str = "https://idp.test";
pub const PEM_ISSUER: &str = "https://pem.test";
pub const AUDIENCE: &str = "orders";
pub const READER: &str = "spiffe://example.org/ns/test/sa/reader";

pub const POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource)
when { resource.path like "/api/*" };

@id("workload-read")
permit (principal == Workload::"spiffe://example.org/ns/test/sa/reader", action == Action::"GET", resource)
when { resource.path like "/internal/*" };

@id("no-admin")
forbid (principal, action, resource)
when { resource.path like "/api/admin/*" };

@id("bound-writes")
permit (principal is User, action == Action::"POST", resource)
when { context.binding };

// Errors when the header is absent: Cedar would skip this forbid; Portcullis denies.
@id("fragile-forbid")
forbid (principal, action, resource)
when { resource.path like "/api/fragile/*" && context.request.headers["x-flag"] == "block" };
"#;

pub struct World {
    pub dir: tempfile::TempDir,
    pub root: Authority,
    pub inter: Authority,
    pub other_ca: Authority,
    pub rs: TokenSigner,
    pub es: TokenSigner,
    pub ed: TokenSigner,
    /// The PEM issuer's key (ES256, no kid).
    pub pem_signer: TokenSigner,
    pub engine: Arc<Engine>,
    pub addr: SocketAddr,
}

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write test file");
}

pub fn config_text() -> String {
    format!(
        r#"
[server]
grpc = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}", "other-service"]
jwks_file = "idp.jwks.json"
algorithms = ["RS256", "ES256", "EdDSA"]
leeway = "30s"
max_lifetime = "1h"

[[issuer]]
issuer = "{PEM_ISSUER}"
audiences = ["{AUDIENCE}"]
pem_keys = [{{ path = "pem-issuer.pub.pem" }}]
algorithms = ["ES256"]
typ = "at+jwt"
require_binding = true
id_prefix = "pem/"

[policy]
dir = "policies"

[log]
audit = "audit.log"
"#
    )
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = Authority::root("test root CA");
        let inter = root.intermediate("test intermediate CA");
        let other_ca = Authority::root("some other CA");
        let rs = TokenSigner::generate(Algorithm::RS256, "rs");
        let es = TokenSigner::generate(Algorithm::ES256, "es");
        let ed = TokenSigner::generate(Algorithm::EdDSA, "ed");
        let pem_signer = TokenSigner::generate(Algorithm::ES256, "unused");
        write(dir.path(), "ca.pem", &root.cert_pem());
        write(dir.path(), "intermediate.pem", &inter.cert_pem());
        write(
            dir.path(),
            "idp.jwks.json",
            &portcullis::demo::jwks(&[&rs, &es, &ed]),
        );
        write(
            dir.path(),
            "pem-issuer.pub.pem",
            &pem_signer.public_key_pem(),
        );
        std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
        write(&dir.path().join("policies"), "test.cedar", POLICIES);
        let config = dir.path().join("portcullis.toml");
        write(dir.path(), "portcullis.toml", &config_text());

        let settings = Settings::load(&config).expect("valid test config");
        let engine = Arc::new(Engine::load(&settings).expect("engine loads"));
        let (addr, _, stop) = spawn_server(engine.clone());
        // The world lives as long as the test process: its server is never asked to stop.
        std::mem::forget(stop);
        World {
            dir,
            root,
            inter,
            other_ca,
            rs,
            es,
            ed,
            pem_signer,
            engine,
            addr,
        }
    })
}

/// The DER of a PEM certificate.
pub fn cert_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// The SHA-256 of `der` in lower-case hex (a certificate's `Hash` in XFCC).
pub fn sha256_hex(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A server directory holding `policies` as `policies/p.cedar`.
pub fn policy_dir(policies: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("policies")).expect("mkdir policies");
    write(&dir.path().join("policies"), "p.cedar", policies);
    dir
}

/// [`policy_dir`], trusting `ca` for client certificates (`ca.pem`) and `signer`'s key for
/// tokens (`jwks.json`).
pub fn trust_dir(policies: &str, ca: &Authority, signer: &TokenSigner) -> tempfile::TempDir {
    let dir = policy_dir(policies);
    write(dir.path(), "ca.pem", &ca.cert_pem());
    write(dir.path(), "jwks.json", &portcullis::demo::jwks(&[signer]));
    dir
}

pub fn now() -> i64 {
    portcullis::demo::unix_now()
}

/// A valid claim set for the JWKS issuer; tests change one thing at a time.
pub fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600,
        "groups": ["readers"], "scope": "orders:read", "email": "alice@example.org",
    })
}

pub fn reader_cert(w: &World) -> ClientCert {
    w.inter.issue(&LeafSpec::spiffe(READER))
}

/// A CheckRequest as Envoy builds it: pseudo-headers, raw path with query, URL-encoded PEM.
pub fn request(method: &str, path: &str, cert: Option<&str>, token: Option<&str>) -> CheckRequest {
    let mut http = attribute_context::HttpRequest {
        id: "test-1".into(),
        method: method.into(),
        path: path.into(),
        host: "api.test".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        ..Default::default()
    };
    http.headers.insert(":method".into(), method.into());
    http.headers.insert(":path".into(), path.into());
    http.headers.insert(":authority".into(), "api.test".into());
    if let Some(t) = token {
        http.headers
            .insert("authorization".into(), format!("Bearer {t}"));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                certificate: cert.unwrap_or_default().to_string(),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// Sets (or replaces) one request header, as Envoy would send it.
pub fn set_header(req: &mut CheckRequest, name: &str, value: impl Into<String>) {
    let http = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a request built by `request`");
    http.headers.insert(name.to_string(), value.into());
}

/// Sends one Check to the shared world's server, with a deadline.
pub async fn check(req: CheckRequest) -> CheckResponse {
    check_at(world().addr, req).await
}

/// Sends one Check to the server at `addr`, with a deadline.
pub async fn check_at(addr: SocketAddr, req: CheckRequest) -> CheckResponse {
    let mut client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(5));
    client
        .check(r)
        .await
        .expect("Check is a successful RPC")
        .into_inner()
}

/// (grpc code, http status, www-authenticate) of a reply; http 0 for an allow.
pub fn outcome(resp: &CheckResponse) -> (i32, i32, Option<String>) {
    use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
    let code = resp.status.as_ref().map_or(-1, |s| s.code);
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let www = d
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "www-authenticate")
                .map(|h| h.value.clone());
            (code, d.status.as_ref().map_or(0, |s| s.code), www)
        }
        Some(HttpResponse::OkResponse(_)) => (code, 0, None),
        _ => (code, -1, None),
    }
}

pub fn ok_header(resp: &CheckResponse, key: &str) -> Option<String> {
    use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == key)
            .map(|h| h.value.clone()),
        _ => None,
    }
}

/// A Portcullis server (gRPC and admin HTTP) on its own thread, over a configuration
/// written into `dir`. Dropping it asks the server to stop.
pub struct RunningServer {
    pub engine: Arc<Engine>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Not joined: graceful shutdown waits for client connections whose tasks may live
        // on the (now blocked) test runtime. The thread ends with the test process.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `engine` (gRPC and admin HTTP, each on 127.0.0.1:0) on a runtime of its own
/// thread: the one in-process server of the tests. Returns the two addresses and the sender
/// that stops it (dropping the sender stops it too).
pub fn spawn_server(
    engine: Arc<Engine>,
) -> (SocketAddr, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_engine = engine;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let http = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx
                .send((
                    grpc.local_addr().expect("addr"),
                    http.local_addr().expect("addr"),
                ))
                .expect("send addr");
            let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
            let admin = tokio::spawn(portcullis::server::serve_http(
                http,
                server_engine.clone(),
                async move {
                    let _ = admin_stop_rx.await;
                },
            ));
            let shutdown = async move {
                let _ = stop_rx.await;
                let _ = admin_stop_tx.send(());
            };
            portcullis::server::serve_on(grpc, server_engine, shutdown)
                .await
                .expect("server runs");
            let _ = admin.await;
        });
    });
    let (grpc, http) = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server started");
    (grpc, http, stop_tx)
}

/// Starts the server and returns once it answers gRPC health (so its background work,
/// file watches included, is running).
pub async fn start_server(dir: tempfile::TempDir, config_text: &str) -> RunningServer {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let settings = Settings::from_toml(config_text, dir.path())
        .unwrap_or_else(|e| panic!("{e:?}\n{config_text}"));
    let engine = Arc::new(Engine::load(&settings).unwrap_or_else(|e| panic!("{e:?}")));
    let (grpc, http, stop_tx) = spawn_server(engine.clone());
    let answers = eventually(Duration::from_secs(10), || async move {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .expect("endpoint")
            .connect()
            .await
        else {
            return false;
        };
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
    })
    .await;
    assert!(answers, "the server did not answer gRPC health");
    RunningServer {
        engine,
        grpc,
        http,
        dir,
        stop: Some(stop_tx),
    }
}

impl RunningServer {
    /// One Check against this server, with a deadline.
    pub async fn check(&self, req: CheckRequest) -> CheckResponse {
        check_at(self.grpc, req).await
    }

    /// GET on the admin listener: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .expect("admin GET");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }
}

/// Polls `cond` every 50 ms for up to `limit`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
