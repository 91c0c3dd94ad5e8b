//! The gRPC listener's transports against a real server: mutual TLS (no certificate, a
//! certificate from another CA, one not meant for client authentication, the right one),
//! the server certificate and client CA reloaded from disk while it runs, and a Unix
//! socket. Certificates are generated at test time; every wait is bounded.

use crate::common;

use common::binary::Binary;
use hyper_util::rt::TokioIo;
use portcullis::config::{Listen, Settings, TlsSettings};
use portcullis::demo::{Authority, ClientCert, LeafSpec};
use portcullis::engine::Engine;
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use portcullis::server::AuthorizationService;
use portcullis::server::listen;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// Bound on every connection attempt, RPC and wait for a reload.
const DEADLINE: Duration = Duration::from_secs(10);

/// A Portcullis gRPC server on a listener from `listen::bind`, stopped on drop.
struct Server {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    reloads: Arc<Reloads>,
}

#[derive(Default)]
struct Reloads {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

impl Server {
    async fn start(dir: &Path, listen: Listen, tls: Option<TlsSettings>) -> Server {
        Server::start_with(dir, listen, tls, listen::MAX_PENDING_HANDSHAKES).await
    }

    async fn start_with(
        dir: &Path,
        listen: Listen,
        tls: Option<TlsSettings>,
        max_handshakes: usize,
    ) -> Server {
        let reloads = Arc::new(Reloads::default());
        let counts = reloads.clone();
        let hook: listen::ReloadHook = Arc::new(move |ok| {
            let counter = if ok { &counts.ok } else { &counts.failed };
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let (incoming, addr) = listen::bind_with_hook(&listen, tls.as_ref(), hook)
            .await
            .expect("listener binds");
        let incoming = incoming.max_pending_handshakes(max_handshakes);
        let service = AuthorizationServer::new(AuthorizationService::new(engine(dir)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Server {
            addr,
            stop: Some(stop),
            task,
            reloads,
        }
    }

    /// Stops accepting, waits (bounded) for the server to end and asserts it ended cleanly.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let ended = tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("server stops in time");
        ended
            .expect("server task")
            .expect("server ended without error");
    }

    /// Waits until `counter` of the reload hook exceeds `before`.
    async fn wait_reload(&self, counter: fn(&Reloads) -> &AtomicUsize, before: usize) {
        tokio::time::timeout(DEADLINE, async {
            while counter(&self.reloads).load(Ordering::SeqCst) <= before {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await
        .expect("the TLS files were reloaded in time");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An engine that allows everything: these tests are about the transport.
fn engine(dir: &Path) -> Arc<Engine> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir policies");
    std::fs::write(
        policies.join("allow.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("write policy");
    let settings = Settings::from_toml(
        "[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
        dir,
    )
    .expect("valid configuration");
    Arc::new(Engine::load(&settings).expect("engine loads"))
}

fn request() -> CheckRequest {
    common::request("GET", "/x", None, None)
}

/// One Check on `channel`: the reply's status code (0 is allow), or why the RPC failed.
async fn check_on(channel: Channel) -> Result<i32, String> {
    let mut client = AuthorizationClient::new(channel);
    let mut req = tonic::Request::new(request());
    req.set_timeout(DEADLINE);
    let reply = tokio::time::timeout(DEADLINE, client.check(req))
        .await
        .map_err(|_| "no reply in time".to_string())?
        .map_err(|s| format!("RPC failed: {s}"))?;
    Ok(reply.into_inner().status.map_or(-1, |s| s.code))
}

/// Connects over TLS trusting `server_ca`, presenting `identity` if any, and sends one Check.
async fn check_tls(
    addr: &str,
    server_ca: &str,
    identity: Option<&ClientCert>,
) -> Result<i32, String> {
    let channel = connect_tls(addr, server_ca, identity).await?;
    check_on(channel).await
}

async fn connect_tls(
    addr: &str,
    server_ca: &str,
    identity: Option<&ClientCert>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.pem, &id.key_pem));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("client configuration: {e}"))?
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE);
    tokio::time::timeout(DEADLINE, endpoint.connect())
        .await
        .map_err(|_| "no connection in time".to_string())?
        .map_err(|e| format!("connect failed: {e:?}"))
}

/// Writes the server's certificate, key and (optionally) client CA under `dir`.
fn write_tls(dir: &Path, server: &ClientCert, client_ca: Option<&Authority>) -> TlsSettings {
    let settings = TlsSettings {
        cert: dir.join("tls/server.pem"),
        key: dir.join("tls/server.key"),
        client_ca: client_ca.map(|_| dir.join("tls/client-ca.pem")),
    };
    std::fs::create_dir_all(dir.join("tls")).expect("mkdir tls");
    std::fs::write(&settings.key, &server.key_pem).expect("write key");
    std::fs::write(&settings.cert, &server.pem).expect("write cert");
    if let (Some(path), Some(ca)) = (&settings.client_ca, client_ca) {
        std::fs::write(path, ca.cert_pem()).expect("write client CA");
    }
    settings
}

fn loopback() -> Listen {
    Listen::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn install_provider() {
    // The tonic client builds its rustls configuration from the process default.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[tokio::test]
async fn mtls_admits_only_client_certificates_from_the_client_ca() {
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let server_ca = Authority::root("listener test server CA");
    let proxy_ca = Authority::root("listener test proxy CA");
    let other_ca = Authority::root("some other CA");
    let tls = write_tls(
        dir.path(),
        &server_ca.issue(&LeafSpec::loopback_server()),
        Some(&proxy_ca),
    );
    let server = Server::start(dir.path(), loopback(), Some(tls)).await;
    let trust = server_ca.cert_pem();
    let proxy = proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));
    let stranger = other_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));
    // From the right CA, but a server certificate (no clientAuth extended key usage).
    let not_client = proxy_ca.issue(&LeafSpec::loopback_server());

    assert_eq!(check_tls(&server.addr, &trust, Some(&proxy)).await, Ok(0));
    for (name, identity) in [
        ("no certificate", None),
        ("certificate from another CA", Some(&stranger)),
        (
            "certificate not for client authentication",
            Some(&not_client),
        ),
    ] {
        let got = check_tls(&server.addr, &trust, identity).await;
        assert!(got.is_err(), "{name}: expected a failed call, got {got:?}");
    }
    // Plain HTTP/2 to the TLS port fails too.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE)
        .connect_lazy();
    assert!(check_on(plain).await.is_err(), "plaintext was served");

    // A client that connects and never speaks does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(&server.addr)
        .await
        .expect("raw connect");
    assert_eq!(
        check_tls(&server.addr, &trust, Some(&proxy)).await,
        Ok(0),
        "the server stopped serving after failed handshakes"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_single_handshake_slot_is_freed_by_failed_handshakes() {
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let server_ca = Authority::root("listener test server CA");
    let proxy_ca = Authority::root("listener test proxy CA");
    let tls = write_tls(
        dir.path(),
        &server_ca.issue(&LeafSpec::loopback_server()),
        Some(&proxy_ca),
    );
    let server = Server::start_with(dir.path(), loopback(), Some(tls), 1).await;
    let trust = server_ca.cert_pem();
    let proxy = proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));
    for round in 0..3 {
        let refused = check_tls(&server.addr, &trust, None).await;
        assert!(
            refused.is_err(),
            "round {round}: admitted without a certificate"
        );
        assert_eq!(
            check_tls(&server.addr, &trust, Some(&proxy)).await,
            Ok(0),
            "round {round}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn tls_without_client_ca_needs_no_client_certificate() {
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let server_ca = Authority::root("listener test server CA");
    let tls = write_tls(
        dir.path(),
        &server_ca.issue(&LeafSpec::loopback_server()),
        None,
    );
    let server = Server::start(dir.path(), loopback(), Some(tls)).await;
    assert_eq!(
        check_tls(&server.addr, &server_ca.cert_pem(), None).await,
        Ok(0)
    );
    // The client checks the server: trusting another CA, it refuses to talk.
    let other = Authority::root("some other CA").cert_pem();
    assert!(check_tls(&server.addr, &other, None).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn certificate_and_client_ca_are_reloaded_without_restart() {
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let (old_server_ca, old_proxy_ca) = (
        Authority::root("old server CA"),
        Authority::root("old proxy CA"),
    );
    let (new_server_ca, new_proxy_ca) = (
        Authority::root("new server CA"),
        Authority::root("new proxy CA"),
    );
    let tls = write_tls(
        dir.path(),
        &old_server_ca.issue(&LeafSpec::loopback_server()),
        Some(&old_proxy_ca),
    );
    let server = Server::start(dir.path(), loopback(), Some(tls.clone())).await;
    let old_trust = old_server_ca.cert_pem();
    let new_trust = new_server_ca.cert_pem();
    let old_proxy = old_proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));
    let new_proxy = new_proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));

    let kept = connect_tls(&server.addr, &old_trust, Some(&old_proxy))
        .await
        .expect("connects with the first configuration");
    assert_eq!(check_on(kept.clone()).await, Ok(0));
    assert!(
        check_tls(&server.addr, &new_trust, Some(&new_proxy))
            .await
            .is_err()
    );

    // Rotate everything: the server's certificate and key, and the CA of its clients.
    let reloaded = server.reloads.ok.load(Ordering::SeqCst);
    write_tls(
        dir.path(),
        &new_server_ca.issue(&LeafSpec::loopback_server()),
        Some(&new_proxy_ca),
    );
    server.wait_reload(|r| &r.ok, reloaded).await;
    // The files are written one at a time, so more than one reload may be needed.
    let rotated = tokio::time::timeout(DEADLINE, async {
        loop {
            match check_tls(&server.addr, &new_trust, Some(&new_proxy)).await {
                Ok(code) => return code,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("a client of the new CA is admitted after the reload");
    assert_eq!(rotated, 0);
    let old = check_tls(&server.addr, &old_trust, Some(&old_proxy)).await;
    assert!(
        old.is_err(),
        "a new connection still got the old configuration: {old:?}"
    );
    let old_client_new_server = check_tls(&server.addr, &new_trust, Some(&old_proxy)).await;
    assert!(
        old_client_new_server.is_err(),
        "the old client CA is still trusted: {old_client_new_server:?}"
    );
    // The connection made before the rotation is unaffected.
    assert_eq!(check_on(kept).await, Ok(0));

    // The client CA alone is rotated.
    let third_proxy_ca = Authority::root("third proxy CA");
    let third_proxy = third_proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy"));
    let reloaded = server.reloads.ok.load(Ordering::SeqCst);
    std::fs::write(
        tls.client_ca.as_ref().expect("client CA"),
        third_proxy_ca.cert_pem(),
    )
    .expect("write client CA");
    server.wait_reload(|r| &r.ok, reloaded).await;
    assert_eq!(
        check_tls(&server.addr, &new_trust, Some(&third_proxy)).await,
        Ok(0)
    );
    let replaced = check_tls(&server.addr, &new_trust, Some(&new_proxy)).await;
    assert!(
        replaced.is_err(),
        "the replaced client CA is still trusted: {replaced:?}"
    );

    // A broken certificate is refused and the last good configuration keeps serving.
    let failed = server.reloads.failed.load(Ordering::SeqCst);
    std::fs::write(&tls.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
    server.wait_reload(|r| &r.failed, failed).await;
    assert_eq!(
        check_tls(&server.addr, &new_trust, Some(&third_proxy)).await,
        Ok(0)
    );
    // So is a certificate whose key is not the one on disk.
    let failed = server.reloads.failed.load(Ordering::SeqCst);
    let stray = new_server_ca.issue(&LeafSpec::loopback_server());
    std::fs::write(&tls.cert, &stray.pem).expect("write");
    server.wait_reload(|r| &r.failed, failed).await;
    assert_eq!(
        check_tls(&server.addr, &new_trust, Some(&third_proxy)).await,
        Ok(0)
    );
    server.stop().await;
}

/// Connects tonic to a Unix socket.
#[cfg(unix)]
#[derive(Clone)]
struct UnixConnector(PathBuf);

#[cfg(unix)]
impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

#[cfg(unix)]
#[tokio::test]
async fn unix_socket_serves_check_and_replaces_only_a_stale_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("portcullis.sock");
    // A socket file left behind by a process that is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());

    let server = Server::start(dir.path(), Listen::Unix(path.clone()), None).await;
    assert_eq!(server.addr, format!("unix:{}", path.display()));
    let mode = std::fs::metadata(&path)
        .expect("socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);

    let channel = tokio::time::timeout(
        DEADLINE,
        Endpoint::from_static("http://localhost")
            .timeout(DEADLINE)
            .connect_with_connector(UnixConnector(path.clone())),
    )
    .await
    .expect("connects in time")
    .expect("connects over the Unix socket");
    assert_eq!(check_on(channel).await, Ok(0));

    // A live socket is not taken over, and a file that is not a socket is not removed.
    let taken = listen::bind(&Listen::Unix(path.clone()), None).await;
    let err = taken
        .map(|(_, addr)| addr)
        .expect_err("bound a socket in use");
    assert!(err.contains("another process is listening"), "{err}");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let err = listen::bind(&Listen::Unix(file.clone()), None)
        .await
        .map(|(_, addr)| addr)
        .expect_err("replaced a regular file");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );

    server.stop().await;
    assert!(!path.exists(), "the socket file outlived the server");
}

#[tokio::test]
async fn unreadable_tls_files_fail_at_bind_and_leave_no_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("p.sock");
    let tls = TlsSettings {
        cert: dir.path().join("missing.pem"),
        key: dir.path().join("missing.key"),
        client_ca: None,
    };
    let err = listen::bind(&Listen::Unix(path.clone()), Some(&tls))
        .await
        .map(|(_, addr)| addr)
        .expect_err("bound without a certificate");
    assert!(
        err.contains("server.tls.cert") && err.contains("missing.pem"),
        "{err}"
    );
    assert!(!path.exists());
}

// ---------------------------------------------------------------------------------------
// The real binary under connection floods (GitHub issue 12, findings 7, 10a and 10e).
// ---------------------------------------------------------------------------------------

/// Serves `config` from `dir` (with an allow-all policy) through the shared harness;
/// returns once the listeners are bound and the server is ready.
fn serve_allowing_all(dir: tempfile::TempDir, config: &str) -> Binary {
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir policies");
    std::fs::write(
        policies.join("allow.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("write policy");
    Binary::start_in(dir, config)
}

// A counter this file reads, on the shared harness's server.
impl Binary {
    /// The value of the `portcullis_listener_events_total` counter for `listener` and
    /// `event` (0 when absent).
    async fn listener_events(&self, listener: &str, event: &str) -> u64 {
        let text = self.metrics().await;
        let wanted = format!(
            "portcullis_listener_events_total{{listener=\"{listener}\",event=\"{event}\"}}"
        );
        crate::common::binary::metric(&text, &wanted).map_or(0, |v| v as u64)
    }
}

/// How long a good client may take to be answered while the listener is under attack
/// (generous: a loaded 2-core machine).
const UNDER_ATTACK: Duration = Duration::from_secs(3);

/// An attacker's connection: `head` sent, then one byte of body every `every`, until the
/// server closes it or `give_up` passes. Returns how long the server kept it open.
async fn trickle(
    addr: std::net::SocketAddr,
    head: &'static [u8],
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(head).await.ok()?;
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                // The reply (a 408): the close follows.
                Ok(_) => {}
            },
            _ = tick.tick() => {
                if started.elapsed() > give_up {
                    return None;
                }
                if s.write_all(b" ").await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
}

/// Finding 7: twice `max_http_connections` clients send the headers of a JSON check with a
/// large `Content-Length`, then trickle its body a byte at a time. Before, each held its
/// slot for as long as it kept trickling (only header reads were timed), and the doors
/// stopped answering. Now a body must arrive within `http_body_timeout` (408, then the
/// connection closes), and a full listener evicts the connection that has waited on its
/// client the longest, so a forward-auth request and a JSON check from good clients are
/// answered at once, and every trickling connection is closed within the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickled_body_cannot_take_the_http_listener() {
    const SLOTS: usize = 64;
    const BODY_TIMEOUT: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"
[limits]
max_http_connections = {SLOTS}
http_body_timeout = "2s"
[forward_auth]
path = "/auth"
[policy]
dir = "policies"
[log]
audit = "audit.log"
"#
    );
    let server = serve_allowing_all(dir, &config);
    let addr = server.http_addr();
    const HEAD: &[u8] = b"POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{";
    let attackers: Vec<_> = (0..2 * SLOTS)
        .map(|_| {
            tokio::spawn(trickle(
                addr,
                HEAD,
                Duration::from_millis(300),
                Duration::from_secs(20),
            ))
        })
        .collect();
    // Every slot taken, the rest of the attackers waiting to get in.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = reqwest::Client::builder()
        .timeout(UNDER_ATTACK)
        .build()
        .expect("client");
    let started = std::time::Instant::now();
    let forward = client
        .get(format!("http://{addr}/auth"))
        .header("x-forwarded-method", "GET")
        .header("x-forwarded-uri", "/x")
        .header("x-forwarded-host", "app.example.org")
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(
        forward.as_ref().ok(),
        Some(&200),
        "forward-auth under attack: {forward:?} after {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let body =
        portcullis::proto::to_json("envoy.service.auth.v3.CheckRequest", &request()).expect("JSON");
    let check = client
        .post(format!("http://{addr}/v1/check"))
        .body(body.to_string())
        .send()
        .await;
    let check = match check {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => panic!(
            "JSON check under attack failed after {:?}: {e}",
            started.elapsed()
        ),
    };
    assert_eq!(check.0, 200, "{check:?}");
    let reply: serde_json::Value = serde_json::from_str(&check.1).expect("a CheckResponse");
    assert!(reply.get("okResponse").is_some(), "not an allow: {reply}");

    // The forward-auth door does not wait for a body it does not need.
    let started = std::time::Instant::now();
    let declared = trickle(
        addr,
        b"GET /auth HTTP/1.1\r\nhost: x\r\nx-forwarded-method: GET\r\nx-forwarded-uri: /x\r\ncontent-length: 100000\r\n\r\n",
        Duration::from_secs(60),
        UNDER_ATTACK,
    )
    .await;
    assert!(
        declared.is_some(),
        "forward-auth with a declared body was kept open for {:?}",
        started.elapsed()
    );

    // Every trickling connection was closed: evicted, or cut off at the body timeout.
    for attacker in attackers {
        let held = attacker.await.expect("attacker task");
        let held = held.expect("a trickling connection was kept open for 20 s");
        assert!(
            held < BODY_TIMEOUT + Duration::from_secs(2),
            "a trickling connection was kept for {held:?}"
        );
    }
    assert!(server.listener_events("http", "evicted").await >= SLOTS as u64);
    assert!(server.listener_events("http", "body_timeout").await >= 1);
}

/// Writes a server certificate for localhost and a client CA under `dir`; returns the
/// server's CA (to trust) and a client certificate from the client CA.
fn mtls_files(dir: &Path) -> (String, ClientCert) {
    let server_ca = Authority::root("binary test server CA");
    let proxy_ca = Authority::root("binary test proxy CA");
    write_tls(
        dir,
        &server_ca.issue(&LeafSpec::loopback_server()),
        Some(&proxy_ca),
    );
    (
        server_ca.cert_pem(),
        proxy_ca.issue(&LeafSpec::spiffe("spiffe://example.org/envoy")),
    )
}

const MTLS_CONFIG: &str = r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"
[server.tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/client-ca.pem"
[limits]
max_tls_handshakes = 32
[policy]
dir = "policies"
[log]
audit = "audit.log"
"#;

/// Finding 10a: clients that connect to the mutual-TLS gRPC listener and send nothing,
/// more of them than there are handshake slots. Before, they held every slot until their
/// handshake timed out, and a good client (a new or recycled Envoy connection) waited as
/// long. Now a new connection takes the place of the handshake stalled the longest, and
/// the good client's Check is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_clients_cannot_starve_tls_handshakes() {
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let (trust, proxy) = mtls_files(dir.path());
    let server = serve_allowing_all(dir, MTLS_CONFIG);
    let addr = server.grpc.to_string();
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("raw connect"),
        );
    }
    // Let them fill every handshake slot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(2),
        check_tls(&addr, &trust, Some(&proxy)),
    )
    .await;
    assert_eq!(
        got,
        Ok(Ok(0)),
        "a good client behind 100 silent ones, after {:?}",
        started.elapsed()
    );
    assert!(server.listener_events("grpc", "evicted").await >= 1);
    drop(silent);
}

/// Finding 10e: 200 failed TLS handshakes (a client speaking plain HTTP to the TLS port)
/// make a handful of WARN lines, not 200; the metrics still count every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_handshakes_are_logged_at_a_bounded_rate_and_all_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    install_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let (trust, proxy) = mtls_files(dir.path());
    let server = serve_allowing_all(dir, MTLS_CONFIG);
    const FAILED: u64 = 200;
    for _ in 0..FAILED {
        let mut s = tokio::net::TcpStream::connect(server.grpc)
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a failed handshake was not closed");
    }
    // Every failure is counted, once the last one has been.
    let counted = tokio::time::timeout(DEADLINE, async {
        loop {
            let n = server.listener_events("grpc", "handshake_failed").await;
            if n >= FAILED {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every failed handshake counted");
    assert_eq!(counted, FAILED);
    let log = server.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("TLS handshake"))
        .count();
    assert!(
        (1..=6).contains(&warned),
        "{warned} WARN lines for {FAILED} failed handshakes:\n{log}"
    );
    // The server still serves.
    assert_eq!(
        check_tls(&server.grpc.to_string(), &trust, Some(&proxy)).await,
        Ok(0)
    );
}
