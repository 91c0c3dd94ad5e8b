//! Tests of the test fixture `common::keyserver`: a minimal blocking HTTP/1.1 client over
//! rustls checks what the key server serves in each mode, and that its certificate verifies
//! against its CA for 127.0.0.1.
use crate::common;

use common::keyserver::{KeyServer, Mode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// One parsed HTTP/1.1 response.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

fn addr(server: &KeyServer) -> SocketAddr {
    server
        .base_url()
        .strip_prefix("https://")
        .expect("https URL")
        .parse()
        .expect("IP:port")
}

/// Opens a TLS connection trusting only `ca_pem`, verifying the certificate for `name`.
fn connect(addr: SocketAddr, ca_pem: &str, name: ServerName<'static>) -> std::io::Result<Tls> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(3)))?;
    let conn = ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    // Drive the handshake now, so certificate errors surface here.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn loopback() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into())
}

fn send(tls: &mut Tls, path: &str, close: bool) -> std::io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n\r\n"
    )?;
    tls.flush()
}

/// Reads one response (headers, then a `Content-Length` body). `Ok(None)` if the connection
/// ended before any byte arrived.
fn read_reply(tls: &mut Tls) -> std::io::Result<Option<Reply>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = match tls.read(&mut chunk) {
            // rustls reports a close without close_notify as UnexpectedEof.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => 0,
            r => r?,
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("Content-Length"))
        .expect("the key server sends Content-Length");
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "no bytes beyond Content-Length");
    Ok(Some(Reply {
        status,
        headers,
        body,
    }))
}

/// GET `path` on a fresh `Connection: close` connection. `Ok(None)`: no response at all.
fn try_get(server: &KeyServer, path: &str) -> std::io::Result<Option<Reply>> {
    let mut tls = connect(addr(server), &server.ca_pem(), loopback())?;
    send(&mut tls, path, true)?;
    read_reply(&mut tls)
}

fn get(server: &KeyServer, path: &str) -> Reply {
    try_get(server, path)
        .expect("HTTPS GET")
        .expect("a response")
}

#[test]
fn jwks_is_served_as_set_with_max_age_and_counted() {
    let server = KeyServer::start();
    assert_eq!(server.jwks_url(), format!("{}/jwks", server.base_url()));
    assert!(server.base_url().starts_with("https://127.0.0.1:"));
    assert_eq!(server.jwks_fetches(), 0);

    let initial = get(&server, "/jwks");
    assert_eq!(initial.status, 200);
    assert_eq!(initial.json(), serde_json::json!({ "keys": [] }));
    assert_eq!(initial.header("cache-control"), None);

    let doc = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"BB","kid":"k1"}]}"#;
    server.set_jwks(doc);
    server.set_max_age(Some(300));
    let reply = get(&server, "/jwks?ignored=1");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("max-age=300"));
    assert_eq!(reply.body, doc.as_bytes());
    assert_eq!(server.jwks_fetches(), 2);

    // Any bytes, however large or malformed.
    let huge = "not json ".repeat(200_000);
    server.set_jwks(&huge);
    server.set_max_age(None);
    let reply = get(&server, "/jwks");
    assert_eq!(reply.body, huge.as_bytes());
    assert_eq!(reply.header("cache-control"), None);
    assert_eq!(server.jwks_fetches(), 3);
    assert_eq!(server.discovery_fetches(), 0);

    assert_eq!(get(&server, "/jwks/other").status, 404);
    assert_eq!(get(&server, "/").status, 404);
    assert_eq!(server.jwks_fetches(), 3);
}

#[test]
fn discovery_names_issuer_and_jwks_uri_under_any_prefix() {
    let server = KeyServer::start();
    assert_eq!(
        get(&server, "/.well-known/openid-configuration").status,
        404,
        "no issuer set yet"
    );
    assert_eq!(server.discovery_fetches(), 1);

    server.set_discovery_issuer(&server.base_url());
    let reply = get(&server, "/.well-known/openid-configuration");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let doc = reply.json();
    assert_eq!(doc["issuer"], Value::from(server.base_url()));
    assert_eq!(doc["jwks_uri"], Value::from(server.jwks_url()));

    let tenant = format!("{}/tenant-a", server.base_url());
    server.set_discovery_issuer(&tenant);
    let doc = get(&server, "/tenant-a/.well-known/openid-configuration").json();
    assert_eq!(doc["issuer"], Value::from(tenant));
    assert_eq!(doc["jwks_uri"], Value::from(server.jwks_url()));
    assert_eq!(server.discovery_fetches(), 3);
    assert_eq!(server.jwks_fetches(), 0);
}

#[test]
fn status_mode_answers_that_status_with_an_empty_body() {
    let server = KeyServer::start();
    server.set_max_age(Some(60));
    server.set_mode(Mode::Status(503));
    let reply = get(&server, "/jwks");
    assert_eq!(reply.status, 503);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("cache-control"), None);
    assert_eq!(server.jwks_fetches(), 1);

    server.set_discovery_issuer("https://idp.test");
    assert_eq!(
        get(&server, "/.well-known/openid-configuration").status,
        503
    );
    assert_eq!(server.discovery_fetches(), 1);

    server.set_mode(Mode::Normal);
    assert_eq!(get(&server, "/jwks").status, 200);
    assert_eq!(server.jwks_fetches(), 2);
}

#[test]
fn down_mode_counts_then_closes_without_responding_even_on_keep_alive_connections() {
    let server = KeyServer::start();
    // A connection opened while the server was up...
    let mut pooled = connect(addr(&server), &server.ca_pem(), loopback()).expect("connect");
    send(&mut pooled, "/jwks", false).expect("send");
    let first = read_reply(&mut pooled).expect("read").expect("a response");
    assert_eq!(first.status, 200);

    server.set_mode(Mode::Down);
    // ...gets no response once it is down,
    send(&mut pooled, "/jwks", false).expect("send");
    assert!(matches!(read_reply(&mut pooled), Ok(None) | Err(_)));
    // and neither does a new one.
    assert!(matches!(try_get(&server, "/jwks"), Ok(None) | Err(_)));
    assert_eq!(server.jwks_fetches(), 3, "requests are counted while down");

    server.set_mode(Mode::Normal);
    assert_eq!(get(&server, "/jwks").status, 200);
    assert_eq!(server.jwks_fetches(), 4);
}

#[test]
fn slow_mode_delays_without_blocking_other_connections() {
    let server = Arc::new(KeyServer::start());
    let delay = Duration::from_millis(600);
    server.set_mode(Mode::Slow(delay));
    let slow = {
        let server = server.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let reply = get(&server, "/jwks");
            (reply.status, started.elapsed())
        })
    };
    // Wait (bounded) until the slow request has been received, then serve another one.
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.jwks_fetches() == 0 {
        assert!(Instant::now() < deadline, "slow request never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.set_mode(Mode::Normal);
    let started = Instant::now();
    assert_eq!(get(&server, "/jwks").status, 200);
    let fast = started.elapsed();
    assert!(fast < delay / 2, "another connection waited {fast:?}");
    assert!(!slow.is_finished(), "the slow request is still waiting");

    let (status, elapsed) = slow.join().expect("slow client");
    assert_eq!(status, 200);
    assert!(elapsed >= delay, "answered after {elapsed:?}");
    assert_eq!(server.jwks_fetches(), 2);
}

#[test]
fn certificate_verifies_against_ca_pem_only() {
    let server = KeyServer::start();
    let addr = addr(&server);
    connect(addr, &server.ca_pem(), loopback()).expect("verifies for 127.0.0.1");
    let localhost = ServerName::try_from("localhost").expect("DNS name");
    connect(addr, &server.ca_pem(), localhost).expect("verifies for localhost");

    let other = portcullis::demo::Authority::root("unrelated CA").cert_pem();
    let err = connect(addr, &other, loopback()).expect_err("an unrelated CA must not verify");
    assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
    let wrong_name = ServerName::try_from("idp.example.org").expect("DNS name");
    assert!(connect(addr, &server.ca_pem(), wrong_name).is_err());

    let another_server = KeyServer::start();
    assert_ne!(another_server.ca_pem(), server.ca_pem(), "a fresh CA each");
}

#[test]
fn drop_stops_the_server_promptly_even_with_a_request_waiting() {
    let server = KeyServer::start();
    let addr = addr(&server);
    let ca = server.ca_pem();
    server.set_mode(Mode::Slow(Duration::from_secs(30)));
    let mut waiting = connect(addr, &ca, loopback()).expect("connect");
    send(&mut waiting, "/jwks", true).expect("send");
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.jwks_fetches() == 0 {
        assert!(Instant::now() < deadline, "request never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    drop(server);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "drop took too long"
    );
    assert!(matches!(read_reply(&mut waiting), Ok(None) | Err(_)));
    assert!(connect(addr, &ca, loopback()).is_err(), "no longer serving");
}
