//! A controllable local HTTPS identity-provider key server for integration tests of remote
//! JWKS fetching and OIDC discovery.
//!
//! The server listens on `127.0.0.1:0` (loopback only), speaks HTTP/1.1 over TLS with a
//! certificate for `127.0.0.1` and `localhost` signed by a throwaway CA of its own
//! ([`KeyServer::ca_pem`]), and runs on its own thread with its own tokio runtime, so one
//! instance may serve several `#[tokio::test]` runtimes. Tests change what it serves and how
//! it behaves at any time through `&self` methods; every change applies to requests received
//! afterwards, on new and already open (keep-alive) connections alike.
//!
//! Routes (the request method is not checked; HEAD gets the headers without the body):
//! - `/jwks`: the body given to [`KeyServer::set_jwks`] (initially `{"keys":[]}`), as
//!   `application/json`, with `Cache-Control: max-age=N` when [`KeyServer::set_max_age`] says so.
//! - `/.well-known/openid-configuration`, also under any path prefix
//!   (`/tenant-a/.well-known/openid-configuration`): once [`KeyServer::set_discovery_issuer`]
//!   was called, an OIDC discovery document naming that issuer and [`KeyServer::jwks_url`];
//!   before that, 404.
//! - anything else: 404 with an empty body.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis::demo::{Authority, LeafSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long `start` waits for the server thread to report that it runs.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `drop` waits for the server thread to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading a request head once a connection is open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

const WELL_KNOWN: &str = "/.well-known/openid-configuration";
/// The issuer of [`KeyServer::slow_issuer`].
pub const SLOW_ISSUER: &str = "https://slow.test";

/// How the server answers requests. Applies to every route; counters count in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Serve the configured documents.
    #[default]
    Normal,
    /// Complete the TLS handshake and read the request (so it is counted), then close the
    /// connection without sending any response: the client sees the connection end before a
    /// response (an incomplete-message / unexpected-EOF error). This is per request, not at
    /// accept time, so pooled keep-alive connections also see the server as down.
    Down,
    /// Respond with this HTTP status code and an empty body (no `Cache-Control`). Codes outside
    /// 100..=999 are answered with 500.
    Status(u16),
    /// Wait this long, then respond as in [`Mode::Normal`] with the documents configured when
    /// the request arrived. The wait is asynchronous: other connections are served meanwhile.
    Slow(Duration),
    /// Answer `/jwks` with `302 Found` to `/moved` on this server, which serves the
    /// document set with [`KeyServer::set_moved_jwks`].
    Redirect,
}

/// What the server currently serves; changed by the test through [`KeyServer`]'s setters.
struct Config {
    jwks: Bytes,
    moved_jwks: Bytes,
    issuer: Option<String>,
    max_age: Option<u64>,
    mode: Mode,
}

/// State shared by the test thread and the server thread.
struct Shared {
    config: Mutex<Config>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    moved_fetches: AtomicUsize,
    jwks_url: String,
    stop: AtomicBool,
    stop_waker: Mutex<Option<Waker>>,
}

impl Shared {
    fn config(&self) -> MutexGuard<'_, Config> {
        // A panic while holding the lock cannot leave `Config` inconsistent (plain assignments).
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once `request_stop` has been called.
    async fn stopped(&self) {
        poll_fn(|cx| {
            if self.stop.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.stop_waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            // Re-check after registering so a concurrent `request_stop` is not missed.
            if self.stop.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(waker) = self
            .stop_waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            waker.wake();
        }
    }
}

/// A local HTTPS identity-provider key server (JWKS and OIDC discovery) that tests control.
/// Dropping it stops the server (waiting at most a few seconds).
pub struct KeyServer {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
    /// Signalled by the server thread just before it ends (in a `Mutex` so `KeyServer` is `Sync`).
    done: Mutex<mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KeyServer {
    /// Starts on 127.0.0.1:0 on its own thread with its own tokio runtime (so it outlives any
    /// one `#[tokio::test]` runtime), with a fresh CA (`portcullis::demo::Authority::root`) and a
    /// server certificate from `LeafSpec::loopback_server()`. Serves `{"keys":[]}` at `/jwks`
    /// until [`KeyServer::set_jwks`] is called. Panics if the server cannot start within 10 s.
    pub fn start() -> KeyServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = Authority::root("Portcullis test key server CA (throwaway)");
        let leaf = ca.issue(&LeafSpec::loopback_server());
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
            .expect("parse the key server's private key");
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.der)], key)
        .expect("key server TLS configuration");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared {
            config: Mutex::new(Config {
                jwks: Bytes::from_static(br#"{"keys":[]}"#),
                moved_jwks: Bytes::from_static(br#"{"keys":[]}"#),
                issuer: None,
                max_age: None,
                mode: Mode::Normal,
            }),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            moved_fetches: AtomicUsize::new(0),
            jwks_url: format!("https://{addr}/jwks"),
            stop: AtomicBool::new(false),
            stop_waker: Mutex::new(None),
        });

        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("keyserver-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("key server runtime");
                rt.block_on(async {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register the listener with tokio");
                    let _ = ready_tx.send(());
                    tokio::select! {
                        () = accept_loop(listener, acceptor, server_shared.clone()) => {}
                        () = server_shared.stopped() => {}
                    }
                });
                // Drops every open connection and any request still waiting in `Slow`.
                rt.shutdown_timeout(Duration::from_secs(1));
                let _ = done_tx.send(());
            })
            .expect("spawn the key server thread");
        ready_rx
            .recv_timeout(START_TIMEOUT)
            .expect("key server started");
        KeyServer {
            addr,
            ca_pem: ca.cert_pem(),
            shared,
            done: Mutex::new(done_rx),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `base_url() + "/jwks"`.
    pub fn jwks_url(&self) -> String {
        self.shared.jwks_url.clone()
    }

    /// An `[[issuer]]` ([`SLOW_ISSUER`], audience `orders`, its users and groups under
    /// `slow/`, beside the main issuer's) fetching this server's key set
    /// (its CA in `idp-ca.pem`) once, never again on schedule, and waiting `kid_wait` for an
    /// early refresh when a token names a `kid` it lacks: with the server hung
    /// ([`Mode`]), a decision holds its place among `max_concurrent` that long.
    pub fn slow_issuer(&self, kid_wait: Duration) -> String {
        format!(
            r#"
[[issuer]]
issuer = "{SLOW_ISSUER}"
id_prefix = "slow/"
audiences = ["{}"]
jwks_uri = "{}"
ca_bundle = "idp-ca.pem"
algorithms = ["ES256"]
required_at_start = false
refresh_min = "1h"
refresh_max = "1h"
fetch_timeout = "60s"
unknown_kid_interval = "1h"
unknown_kid_wait = "{}ms"
"#,
            super::AUDIENCE,
            self.jwks_url(),
            kid_wait.as_millis()
        )
    }

    /// The PEM of the CA that signed the server certificate (valid for IP 127.0.0.1 and DNS
    /// `localhost`); trust this to reach the server.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Sets the body served at `/jwks`, byte for byte (it need not be valid JSON, so tests can
    /// serve malformed or huge documents); still labelled `application/json`.
    pub fn set_jwks(&self, body: &str) {
        self.shared.config().jwks = Bytes::copy_from_slice(body.as_bytes());
    }

    /// Makes `/.well-known/openid-configuration` (and `<any prefix>/.well-known/openid-configuration`,
    /// for issuers like `https://127.0.0.1:PORT/tenant-a`) serve a discovery document with this
    /// `issuer` (verbatim, it need not match the server) and `jwks_uri` = [`KeyServer::jwks_url`],
    /// plus the other metadata OIDC Discovery requires.
    pub fn set_discovery_issuer(&self, issuer: &str) {
        self.shared.config().issuer = Some(issuer.to_string());
    }

    /// Sets the body served at `/moved` (the target of [`Mode::Redirect`], and a URL that a
    /// token header may name).
    pub fn set_moved_jwks(&self, body: &str) {
        self.shared.config().moved_jwks = Bytes::copy_from_slice(body.as_bytes());
    }

    /// `base_url() + "/moved"`.
    pub fn moved_url(&self) -> String {
        format!("{}/moved", self.base_url())
    }

    /// Number of `/moved` requests received so far.
    pub fn moved_fetches(&self) -> usize {
        self.shared.moved_fetches.load(Ordering::SeqCst)
    }

    /// `Some(n)`: `/jwks` responses carry `Cache-Control: max-age=n`; `None`: no `Cache-Control`.
    pub fn set_max_age(&self, secs: Option<u64>) {
        self.shared.config().max_age = secs;
    }

    /// Changes how requests received from now on are answered (see [`Mode`]).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.config().mode = mode;
    }

    /// Number of `/jwks` requests received so far, in every mode (counted before responding).
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Number of discovery requests (any path ending in `/.well-known/openid-configuration`)
    /// received so far, in every mode, including those answered 404 because no issuer was set.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for KeyServer {
    /// Stops accepting, drops all connections and ends the server thread, waiting at most 5 s
    /// (the thread is left detached if it has not finished by then).
    fn drop(&mut self) {
        self.shared.request_stop();
        let finished = self
            .done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(STOP_TIMEOUT)
            .is_ok();
        if let Some(thread) = self.thread.take() {
            if finished || thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Accepts connections until the task is dropped; each connection runs in its own task.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _peer)) => tcp,
            // E.g. too many open files: back off briefly rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| respond(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

enum Route {
    Jwks,
    Discovery,
    Moved,
    NotFound,
}

/// Answers one request according to the current configuration. An `Err` makes hyper close
/// the connection without a response ([`Mode::Down`]).
async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = req.uri().path();
    let route = if path == "/jwks" {
        shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        Route::Jwks
    } else if path == "/moved" {
        shared.moved_fetches.fetch_add(1, Ordering::SeqCst);
        Route::Moved
    } else if path.ends_with(WELL_KNOWN) {
        shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
        Route::Discovery
    } else {
        Route::NotFound
    };
    // Snapshot under the lock, never held across an await.
    let (mode, jwks, moved_jwks, issuer, max_age) = {
        let c = shared.config();
        (
            c.mode,
            c.jwks.clone(),
            c.moved_jwks.clone(),
            c.issuer.clone(),
            c.max_age,
        )
    };
    match mode {
        Mode::Normal => {}
        Mode::Down => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "key server is down",
            ));
        }
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(empty(status));
        }
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::Redirect if matches!(route, Route::Jwks) => {
            let mut resp = empty(StatusCode::FOUND);
            let location = shared.jwks_url.replace("/jwks", "/moved");
            resp.headers_mut().insert(
                hyper::header::LOCATION,
                HeaderValue::from_str(&location).expect("a valid Location"),
            );
            return Ok(resp);
        }
        Mode::Redirect => {}
    }
    Ok(match route {
        Route::Jwks => {
            let mut resp = json_response(jwks);
            if let Some(secs) = max_age {
                resp.headers_mut().insert(
                    CACHE_CONTROL,
                    HeaderValue::from_str(&format!("max-age={secs}"))
                        .expect("max-age is a valid header value"),
                );
            }
            resp
        }
        Route::Discovery => match issuer {
            Some(issuer) => {
                let doc = serde_json::json!({
                    "issuer": issuer,
                    "jwks_uri": shared.jwks_url,
                    "authorization_endpoint": format!("{issuer}/authorize"),
                    "token_endpoint": format!("{issuer}/token"),
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                });
                json_response(Bytes::from(doc.to_string()))
            }
            None => empty(StatusCode::NOT_FOUND),
        },
        Route::Moved => json_response(moved_jwks),
        Route::NotFound => empty(StatusCode::NOT_FOUND),
    })
}

fn json_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
