//! End to end with real front proxies: `examples/nginx.conf` and `examples/Caddyfile`
//! (addresses and paths rewritten for a temporary directory) in front of a small upstream,
//! each asking a real Portcullis (in process) through its forward-auth door. Clients speak
//! TLS to the proxy, with and without client certificates, and every case checks what the
//! client got and what (if anything) reached the upstream.
//!
//! Needs nginx with the auth_request module and Caddy 2.6 or later (`apt-get install nginx
//! caddy` on Debian/Ubuntu; scripts/install-test-deps does).

use crate::common;

use common::{Authority, ClientCert, LeafSpec, TokenSigner, eventually, start_server};
use http_body_util::Full;
use hyper::body::Bytes;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The tests every front proxy passes, as `#[tokio::test]`s that start the proxy with
/// `$launch` (each proxy's module invokes it).
macro_rules! front_proxy_tests {
    ($launch:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_allowed_request_reaches_the_upstream_with_the_identity_headers() {
            super::an_allowed_request_reaches_the_upstream_with_the_identity_headers($launch).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn denials_reach_the_client_and_never_the_upstream() {
            super::denials_reach_the_client_and_never_the_upstream($launch).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_client_cannot_supply_the_certificate_or_the_identity_headers() {
            super::a_client_cannot_supply_the_certificate_or_the_identity_headers($launch).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_bound_token_works_only_over_its_own_certificate() {
            super::a_bound_token_works_only_over_its_own_certificate($launch).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_proxy_fails_closed_when_portcullis_is_down() {
            super::the_proxy_fails_closed_when_portcullis_is_down($launch).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn paths_an_application_could_read_differently_are_refused_before_the_decision() {
            super::paths_an_application_could_read_differently_are_refused_before_the_decision(
                $launch,
            )
            .await
        }
    };
}
use front_proxy_tests;

mod caddy;
mod nginx;

pub const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
pub const BATCH: &str = "spiffe://example.org/ns/prod/sa/batch";
pub const ISSUER: &str = "https://idp.example.org";
pub const AUDIENCE: &str = "api";

const POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource)
when { resource.path like "/api/*" };

@id("no-admin")
forbid (principal, action, resource)
when { resource.path like "/api/admin/*" };

// Reports only through the web workload's connection: needs the verified certificate.
@id("web-reports")
permit (principal is User, action == Action::"GET", resource)
when {
  resource.path like "/reports/*" &&
  context has peer && context.peer has spiffe_id &&
  context.peer.spiffe_id == "spiffe://example.org/ns/prod/sa/web"
};

// Workloads by certificate alone.
@id("workload-internal")
permit (principal is Workload, action == Action::"GET", resource)
when { resource.path like "/internal/*" };

// Writes need a token bound to the certificate of the connection (RFC 8705).
@id("bound-writes")
permit (principal is User, action == Action::"POST", resource)
when { resource.path like "/api/*" && context.binding };
"#;

const PORTCULLIS_CONFIG: &str = r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
trust_domains = ["example.org"]
header = "x-ssl-client-cert"

[[issuer]]
issuer = "https://idp.example.org"
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

// ---------------------------------------------------------------------------------------
// The front proxy as a child process

/// Which proxy is in front; where they differ, each test says how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Caddy,
}

impl Kind {
    /// What the proxy answers when Portcullis cannot be reached (nginx makes any
    /// `auth_request` failure a 500; Caddy's forward_auth answers 502 Bad Gateway).
    fn status_when_portcullis_is_down(self) -> u16 {
        match self {
            Kind::Nginx => 500,
            Kind::Caddy => 502,
        }
    }
}

/// A front proxy (nginx, Caddy) running as a child process: killed and reaped when dropped,
/// also when a test panics. It runs as one process, so killing it leaves nothing behind.
pub struct Front {
    pub kind: Kind,
    pub child: Child,
    /// The host name clients use (resolved to 127.0.0.1), and the port.
    pub host: &'static str,
    pub port: u16,
    pub stderr: PathBuf,
}

impl Front {
    /// What the proxy wrote to its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (at most 10 s) until the proxy accepts connections on its port and `ready`
    /// holds. `Err(log)` when it exited because the port was taken, for a retry.
    pub fn wait_listening(mut self, conf: &str, ready: impl Fn() -> bool) -> Result<Front, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = self.log();
                if log.contains("address already in use") || log.contains("Address already in use")
                {
                    return Err(log);
                }
                panic!(
                    "the front proxy exited at start ({status}):\n{log}\n--- configuration ---\n{conf}"
                );
            }
            if ready() && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(self);
            }
            assert!(
                Instant::now() < deadline,
                "the front proxy did not listen on 127.0.0.1:{} within 10 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (bound, then released for the proxy to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Replaces `from` (which must occur exactly `times` times) in an example configuration, so
/// that a change to the example fails here loudly rather than testing something else.
pub fn rewrite(example: &str, conf: String, from: &str, to: &str, times: usize) -> String {
    let found = conf.matches(from).count();
    assert_eq!(
        found, times,
        "{example}: expected {times} occurrence(s) of {from:?}, found {found}"
    );
    conf.replace(from, to)
}

/// The example configuration `examples/<name>`.
pub fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read examples/{name}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The upstream: answers 200 with what it received, and counts the requests

#[derive(Default)]
pub struct Upstream {
    hits: AtomicUsize,
}

/// An HTTP/1 server on 127.0.0.1:0 answering every request with 200 and
/// `{"method", "uri", "headers": {name: [values]}}`.
async fn start_upstream() -> (SocketAddr, Arc<Upstream>) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let state = Arc::new(Upstream::default());
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    state.hits.fetch_add(1, Ordering::SeqCst);
                    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (k, v) in req.headers() {
                        headers
                            .entry(k.as_str().to_string())
                            .or_default()
                            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                    }
                    let body = json!({
                        "method": req.method().as_str(),
                        "uri": req.uri().to_string(),
                        "headers": headers,
                    });
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body.to_string()),
                        )))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, state)
}

// ---------------------------------------------------------------------------------------
// The whole stack

pub struct Stack {
    // Field order is drop order: the front proxy first, then Portcullis.
    pub front: Front,
    server: Option<common::RunningServer>,
    upstream: Arc<Upstream>,
    ca: Authority,
    signer: TokenSigner,
    /// The web workload's certificate, from the trusted CA.
    web: ClientCert,
    /// Another workload's certificate from the same CA.
    batch: ClientCert,
    /// A certificate for the web workload's SPIFFE ID from a CA nobody trusts.
    forged: ClientCert,
    _front_dir: tempfile::TempDir,
}

pub struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    /// Every value of a response header.
    fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII header").to_string())
            .collect()
    }

    /// What the upstream received (the body it echoed).
    fn upstream(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not the upstream's echo ({e}): {}", self.body))
    }

    /// Every value of a header as the upstream received it.
    fn upstream_header(&self, name: &str) -> Vec<String> {
        self.upstream()["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts a front proxy: writes its configuration into `dir` (which holds `server.pem`,
/// `server.key` and `client-ca.pem`) for `port`, Portcullis's HTTP listener and the upstream,
/// and starts it. `Err(log)` when the port was taken in the meantime, for a retry.
pub type Launch = fn(
    dir: &Path,
    port: u16,
    portcullis: SocketAddr,
    upstream: SocketAddr,
) -> Result<Front, String>;

/// Portcullis (in process, forward-auth door), the upstream, and a front proxy started by
/// `launch` in front of both, with TLS and client certificates from a test CA.
pub async fn stack(launch: Launch) -> Stack {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca = Authority::root("front proxy test CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k");

    let dir = common::trust_dir(POLICIES, &ca, &signer);
    let server = start_server(dir, PORTCULLIS_CONFIG).await;

    let (upstream_addr, upstream) = start_upstream().await;

    let front_dir = tempfile::tempdir().expect("temp dir");
    let server_cert = ca.issue(&LeafSpec::loopback_server());
    std::fs::write(front_dir.path().join("server.pem"), &server_cert.pem).expect("write");
    std::fs::write(front_dir.path().join("server.key"), &server_cert.key_pem).expect("write");
    std::fs::write(front_dir.path().join("client-ca.pem"), ca.cert_pem()).expect("write");
    // The port is free when chosen but could be taken before the proxy binds it: retry then.
    let mut attempts = 0;
    let front = loop {
        let port = free_port();
        match launch(front_dir.path(), port, server.http, upstream_addr) {
            Ok(front) => break front,
            Err(log) if attempts < 3 => {
                attempts += 1;
                eprintln!("the front proxy could not bind 127.0.0.1:{port}, retrying:\n{log}");
            }
            Err(log) => {
                panic!("the front proxy could not bind a port after {attempts} retries:\n{log}")
            }
        }
    };

    Stack {
        front,
        server: Some(server),
        upstream,
        web: ca.issue(&LeafSpec::spiffe(WEB)),
        batch: ca.issue(&LeafSpec::spiffe(BATCH)),
        forged: Authority::root("forger CA").issue(&LeafSpec::spiffe(WEB)),
        ca,
        signer,
        _front_dir: front_dir,
    }
}

impl Stack {
    fn claims(&self) -> Value {
        let now = portcullis::demo::unix_now();
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
            "email": "alice@example.org",
        })
    }

    fn token(&self) -> String {
        self.signer.sign(&self.claims())
    }

    /// A token bound (RFC 8705 `cnf.x5t#S256`) to `cert`.
    fn bound_token(&self, cert: &ClientCert) -> String {
        let mut claims = self.claims();
        claims["cnf"] = json!({ "x5t#S256": cert.thumbprint() });
        self.signer.sign(&claims)
    }

    fn hits(&self) -> usize {
        self.upstream.hits.load(Ordering::SeqCst)
    }

    /// A TLS client trusting only the test CA, presenting `cert` if given.
    fn client(&self, cert: Option<&ClientCert>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca.cert_pem().as_bytes()).expect("CA PEM");
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([ca])
            .resolve(
                self.front.host,
                SocketAddr::from(([127, 0, 0, 1], self.front.port)),
            )
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if let Some(c) = cert {
            let identity =
                reqwest::Identity::from_pem(format!("{}{}", c.pem, c.key_pem).as_bytes())
                    .expect("client identity");
            builder = builder.identity(identity);
        }
        builder.build().expect("client")
    }

    /// One request to the front proxy; `token` goes in `Authorization: Bearer`.
    async fn send(
        &self,
        method: &str,
        path: &str,
        cert: Option<&ClientCert>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let url = format!("https://{}:{}{path}", self.front.host, self.front.port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client(cert).request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap_or_else(|e| {
            panic!(
                "request to the front proxy failed: {e:?}\n{}",
                self.front.log()
            )
        });
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.expect("body"),
        }
    }

    async fn get(&self, path: &str, cert: Option<&ClientCert>, token: Option<&str>) -> Reply {
        self.send("GET", path, cert, token, &[]).await
    }

    fn audit_log(&self) -> String {
        let server = self.server.as_ref().expect("Portcullis running");
        assert!(server.engine.flush_audit(Duration::from_secs(5)));
        std::fs::read_to_string(server.dir.path().join("audit.log")).unwrap_or_default()
    }
}

/// Asserts a status, with the body and nginx's log on failure.
pub fn expect_status(stack: &Stack, reply: &Reply, status: u16, what: &str) {
    assert_eq!(
        reply.status,
        status,
        "{what}: body {:?}\n--- nginx log ---\n{}",
        reply.body,
        stack.front.log()
    );
}

// ---------------------------------------------------------------------------------------
// The tests, for any front proxy

async fn an_allowed_request_reaches_the_upstream_with_the_identity_headers(launch: Launch) {
    let s = stack(launch).await;
    let token = s.token();

    let r = s
        .get("/api/orders?page=2", Some(&s.web), Some(&token))
        .await;
    expect_status(&s, &r, 200, "certificate + valid token");
    assert_eq!(s.hits(), 1);
    let seen = r.upstream();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["uri"], "/api/orders?page=2");
    assert_eq!(
        r.upstream_header("x-portcullis-principal"),
        ["User::\"alice\""]
    );
    assert_eq!(r.upstream_header("x-user-email"), ["alice@example.org"]);
    // The application gets the token (it may want it) but not the certificate header.
    assert_eq!(
        r.upstream_header("authorization"),
        [format!("Bearer {token}")]
    );
    assert!(r.upstream_header("x-ssl-client-cert").is_empty());

    // A token alone is enough where no policy asks for the certificate.
    let r = s.get("/api/orders", None, Some(&token)).await;
    expect_status(&s, &r, 200, "valid token, no certificate");
    assert_eq!(
        r.upstream_header("x-portcullis-principal"),
        ["User::\"alice\""]
    );

    // The certificate alone makes the workload the principal.
    let r = s.get("/internal/metrics", Some(&s.web), None).await;
    expect_status(&s, &r, 200, "certificate, no token");
    assert_eq!(
        r.upstream_header("x-portcullis-principal"),
        [format!("Workload::\"{WEB}\"")]
    );
    assert!(r.upstream_header("x-user-email").is_empty());

    // A policy that needs `context has peer`: met only with the certificate on the connection.
    let r = s.get("/reports/q3", Some(&s.web), Some(&token)).await;
    expect_status(&s, &r, 200, "reports with the web certificate");
    let r = s.get("/reports/q3", Some(&s.batch), Some(&token)).await;
    expect_status(&s, &r, 403, "reports with another workload's certificate");
    let r = s.get("/reports/q3", None, Some(&token)).await;
    expect_status(&s, &r, 403, "reports without a certificate");
    assert_eq!(s.hits(), 4);

    // Every decision was made by Portcullis and audited with the principal.
    let ok = eventually(Duration::from_secs(5), || async {
        s.audit_log().lines().count() >= 6
    })
    .await;
    assert!(ok, "audit log:\n{}", s.audit_log());
    assert!(s.audit_log().contains(r#""principal":"User::\"alice\"""#));
}

async fn denials_reach_the_client_and_never_the_upstream(launch: Launch) {
    let s = stack(launch).await;
    let token = s.token();

    // No credential at all: 401 with Portcullis's challenge, exactly once.
    let r = s.get("/api/orders", None, None).await;
    expect_status(&s, &r, 401, "no token");
    assert_eq!(r.all("www-authenticate"), ["Bearer realm=\"portcullis\""]);
    assert_eq!(r.all("x-portcullis-decision-id").len(), 1);

    // A certificate but no token, where only users may go: the workload is authenticated
    // but not permitted, so 403 without a challenge.
    let r = s.get("/api/orders", Some(&s.web), None).await;
    expect_status(&s, &r, 403, "certificate, no token, user-only path");
    assert!(r.all("www-authenticate").is_empty());

    // A token that is not one, and one signed by someone else.
    let r = s.get("/api/orders", None, Some("not-a-token")).await;
    expect_status(&s, &r, 401, "garbage token");
    assert_eq!(
        r.all("www-authenticate"),
        ["Bearer realm=\"portcullis\", error=\"invalid_token\""]
    );
    let stranger = TokenSigner::generate(Algorithm::ES256, "k").sign(&s.claims());
    let r = s.get("/api/orders", Some(&s.web), Some(&stranger)).await;
    expect_status(&s, &r, 401, "token signed with another key");
    assert_eq!(
        r.all("www-authenticate"),
        ["Bearer realm=\"portcullis\", error=\"invalid_token\""]
    );

    // Authenticated but forbidden: 403, no challenge, and the decision id to look up.
    let r = s.get("/api/admin/users", Some(&s.web), Some(&token)).await;
    expect_status(&s, &r, 403, "forbidden path");
    assert!(r.all("www-authenticate").is_empty());
    let ids = r.all("x-portcullis-decision-id");
    assert_eq!(ids.len(), 1);
    let id = ids[0].clone();
    let found = eventually(Duration::from_secs(5), || {
        let id = id.clone();
        let log = s.audit_log();
        async move {
            log.lines().any(|l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| {
                    v["decision_id"] == id.as_str()
                        && v["decision"] == "deny"
                        && v["policies"] == json!(["no-admin"])
                })
            })
        }
    })
    .await;
    assert!(
        found,
        "decision {id} not in the audit log:\n{}",
        s.audit_log()
    );

    // The method matters: a POST with an unbound token is not permitted.
    let r = s
        .send("POST", "/api/orders", Some(&s.web), Some(&token), &[])
        .await;
    expect_status(&s, &r, 403, "POST with an unbound token");

    // A certificate from a CA the proxy does not trust: the proxy refuses it itself (nginx
    // answers 400; Caddy fails the TLS handshake).
    match s.front.kind {
        Kind::Nginx => {
            let r = s.get("/api/orders", Some(&s.forged), Some(&token)).await;
            expect_status(&s, &r, 400, "client certificate from an unknown CA");
            // The subrequest location is not reachable from outside.
            let r = s.get("/_portcullis", Some(&s.web), Some(&token)).await;
            expect_status(&s, &r, 404, "the internal location");
        }
        Kind::Caddy => {
            let sent = s
                .client(Some(&s.forged))
                .get(format!(
                    "https://{}:{}/api/orders",
                    s.front.host, s.front.port
                ))
                .bearer_auth(&token)
                .send()
                .await;
            assert!(
                sent.is_err(),
                "Caddy accepted a certificate from an unknown CA: {sent:?}"
            );
        }
    }

    assert_eq!(s.hits(), 0, "a denied request reached the upstream");
}

async fn a_client_cannot_supply_the_certificate_or_the_identity_headers(launch: Launch) {
    let s = stack(launch).await;
    let token = s.token();
    let genuine = s.web.envoy_encoded();
    let forged = s.forged.envoy_encoded();

    // Without a TLS client certificate, an X-SSL-Client-Cert of the client's making is
    // dropped by nginx: Portcullis sees no certificate. Had it seen the forged one, the answer
    // would be 401 (a certificate presented and refused); had it believed the genuine one, 200.
    for (what, header) in [("forged", &forged), ("genuine", &genuine)] {
        let r = s
            .send(
                "GET",
                "/internal/metrics",
                None,
                None,
                &[("x-ssl-client-cert", header)],
            )
            .await;
        expect_status(&s, &r, 401, &format!("{what} certificate header, no token"));
        assert_eq!(r.all("www-authenticate"), ["Bearer realm=\"portcullis\""]);

        let r = s
            .send(
                "GET",
                "/reports/q3",
                None,
                Some(&token),
                &[("x-ssl-client-cert", header)],
            )
            .await;
        expect_status(
            &s,
            &r,
            403,
            &format!("{what} certificate header with a token"),
        );
    }
    assert_eq!(s.hits(), 0);

    // With a real client certificate, the client's header does not replace nginx's: the
    // batch workload cannot pass for the web workload.
    let r = s
        .send(
            "GET",
            "/reports/q3",
            Some(&s.batch),
            Some(&token),
            &[("x-ssl-client-cert", &genuine)],
        )
        .await;
    expect_status(
        &s,
        &r,
        403,
        "batch certificate, web certificate in the header",
    );

    // Nor can a client pick the facts Portcullis decides on.
    let r = s
        .send(
            "GET",
            "/api/admin/users",
            None,
            Some(&token),
            &[
                ("x-forwarded-uri", "/api/orders"),
                ("x-original-uri", "/api/orders"),
                ("x-forwarded-method", "GET"),
            ],
        )
        .await;
    expect_status(&s, &r, 403, "forwarded headers of the client's making");
    assert_eq!(s.hits(), 0);

    // Identity headers sent by the client never reach the upstream: only Portcullis's.
    let r = s
        .send(
            "GET",
            "/api/orders",
            Some(&s.web),
            Some(&token),
            &[
                ("x-portcullis-principal", "User::\"admin\""),
                ("x-user-email", "admin@example.org"),
            ],
        )
        .await;
    expect_status(&s, &r, 200, "client-supplied identity headers");
    assert_eq!(
        r.upstream_header("x-portcullis-principal"),
        ["User::\"alice\""]
    );
    assert_eq!(r.upstream_header("x-user-email"), ["alice@example.org"]);

    // A token without the claim: the client's header is removed, not passed on.
    let mut claims = s.claims();
    claims.as_object_mut().expect("object").remove("email");
    let no_email = s.signer.sign(&claims);
    let r = s
        .send(
            "GET",
            "/api/orders",
            None,
            Some(&no_email),
            &[("x-user-email", "admin@example.org")],
        )
        .await;
    expect_status(&s, &r, 200, "token without the email claim");
    assert!(
        r.upstream_header("x-user-email").is_empty(),
        "{:?}",
        r.upstream()
    );
    assert_eq!(
        r.upstream_header("x-portcullis-principal"),
        ["User::\"alice\""]
    );
    assert_eq!(s.hits(), 2);
}

async fn a_bound_token_works_only_over_its_own_certificate(launch: Launch) {
    let s = stack(launch).await;
    let bound = s.bound_token(&s.web);

    let r = s
        .send("POST", "/api/orders", Some(&s.web), Some(&bound), &[])
        .await;
    expect_status(&s, &r, 200, "bound token over its certificate");
    assert_eq!(r.upstream()["method"], "POST");

    // Replayed over another workload's connection, or without a certificate: refused as an
    // invalid token, whatever the path.
    for cert in [Some(&s.batch), None] {
        for method in ["POST", "GET"] {
            let r = s.send(method, "/api/orders", cert, Some(&bound), &[]).await;
            expect_status(&s, &r, 401, "bound token replayed");
            assert_eq!(
                r.all("www-authenticate"),
                ["Bearer realm=\"portcullis\", error=\"invalid_token\""]
            );
        }
    }
    // Nor does the certificate header of the client's making help the replay.
    let r = s
        .send(
            "POST",
            "/api/orders",
            None,
            Some(&bound),
            &[("x-ssl-client-cert", &s.web.envoy_encoded())],
        )
        .await;
    expect_status(&s, &r, 401, "bound token with the certificate as a header");
    assert_eq!(s.hits(), 1);
}

async fn the_proxy_fails_closed_when_portcullis_is_down(launch: Launch) {
    let mut s = stack(launch).await;
    let token = s.token();
    let r = s.get("/api/orders", Some(&s.web), Some(&token)).await;
    expect_status(&s, &r, 200, "before the stop");

    drop(s.server.take());
    let last = std::cell::Cell::new(0u16);
    let closed = eventually(Duration::from_secs(10), || async {
        last.set(
            s.get("/api/orders", Some(&s.web), Some(&token))
                .await
                .status,
        );
        last.get() == s.front.kind.status_when_portcullis_is_down()
    })
    .await;
    assert!(closed, "last status {}\n{}", last.get(), s.front.log());
    assert_eq!(s.hits(), 1, "a request went upstream without a decision");
}

async fn paths_an_application_could_read_differently_are_refused_before_the_decision(
    launch: Launch,
) {
    let s = stack(launch).await;
    let token = s.token();
    let decisions = || s.audit_log().lines().count();
    // Portcullis matches the path as sent; to an application that decodes or cleans up
    // the path, each of these may mean /api/admin/users, which "no-admin" forbids. Each is
    // refused with 400 and never reaches the upstream: by the nginx example's guard, before
    // Portcullis is asked; behind Caddy, by Portcullis itself (non-canonical paths are
    // refused before any decision), whose 400 Caddy hands to the client.
    for path in [
        "/api//admin/users",
        "/api/%61dmin/users",
        "/api/%41dmin/users",
        "/api/admin%2Fusers",
        "/api/orders/..%2Fadmin/users",
        "/api/orders/%2E%2E%2fadmin/users",
        "/api/admin;x/users",
        "/api/admin%5Cusers",
    ] {
        let r = s.get(path, Some(&s.web), Some(&token)).await;
        expect_status(&s, &r, 400, path);
    }
    assert_eq!(s.hits(), 0);
    let asked = match s.front.kind {
        Kind::Nginx => 0,
        Kind::Caddy => 8,
    };
    assert_eq!(decisions(), asked, "{}", s.audit_log());
    if s.front.kind == Kind::Caddy {
        assert_eq!(
            s.audit_log()
                .matches(r#""reason":"unreadable_request""#)
                .count(),
            8,
            "{}",
            s.audit_log()
        );
    }

    // Ordinary percent-encoding and queries still work.
    for (path, status) in [
        ("/api/orders/a%20b?q=%2F..%2F&x=1;2", 200),
        ("/api/orders/%C3%A9t%C3%A9", 200),
        ("/api/admin/users", 403),
    ] {
        let r = s.get(path, Some(&s.web), Some(&token)).await;
        expect_status(&s, &r, status, path);
        if status == 200 {
            assert_eq!(r.upstream()["uri"], path);
        }
    }
}
