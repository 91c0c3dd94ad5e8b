//! The gRPC listener's transports against a real server: mutual TLS (no certificate, a
//! certificate from another CA, one not meant for client authentication, the right one),
//! the server certificate and client CA reloaded from disk while it runs, and a Unix
//! socket. Certificates are generated at test time; every wait is bounded.

mod common;

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
