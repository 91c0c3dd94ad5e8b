//! A small TLS reverse proxy that embeds the Portcullis engine: the client's certificate
//! (from this proxy's own TLS session) and bearer token go in, each request is decided in
//! process, a denial is answered here, and an allowed request goes on to a plain-HTTP
//! upstream carrying Portcullis's identity headers.
//!
//! ```text
//! cargo run --example embedded_proxy -- --config portcullis.toml --listen 127.0.0.1:8443 \
//!     --upstream http://127.0.0.1:8080 --tls-cert server.pem --tls-key server.key
//! ```
//!
//! The embedding is [`authorize`]; the rest is an ordinary hyper proxy. It speaks HTTP/1.1
//! to clients and to the upstream and does not pool per client or limit bodies: a starting
//! point, not a hardened edge.

use clap::Parser;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portcullis::{Engine, HttpReply, Question, RequestFacts, Settings};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

// ---------------------------------------------------------------------------------------
// The embedding: one request in, one verdict out.
// ---------------------------------------------------------------------------------------

/// What Portcullis says about one request.
pub enum Verdict {
    /// Let it through: remove these headers, then set these, on the upstream request.
    Forward {
        remove: Vec<String>,
        set: Vec<(String, String)>,
    },
    /// Answer the client with this reply; the upstream is not contacted.
    Deny(HttpReply),
}

/// Asks the engine about one request: its method, target and headers as the client sent
/// them, the client's certificate chain (PEM) from this proxy's TLS session, and the
/// client's address. `engine.answer` also records the decision (metrics, audit line).
pub async fn authorize(
    engine: &Engine,
    request: &Parts,
    peer_chain_pem: Option<&str>,
    client: SocketAddr,
) -> Verdict {
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = request
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()));
    let facts = RequestFacts::from_http(
        request.method.as_str(),
        target,
        "https",
        headers,
        peer_chain_pem,
        Some(client),
        engine.limits(),
    );
    let question = match &facts {
        Ok(facts) => Question::Facts(facts),
        Err(unreadable) => Question::Unreadable(unreadable.clone()),
    };
    let answer = engine.answer(question, SystemTime::now).await;
    let reply = answer.http_reply();
    if !answer.allowed() {
        return Verdict::Deny(reply);
    }
    // The headers to remove: a client's copy of an identity header Portcullis did not set
    // this time, an Authorization header to strip.
    Verdict::Forward {
        remove: reply.remove,
        set: reply.headers,
    }
}

// ---------------------------------------------------------------------------------------
// The proxy around it.
// ---------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, hyper::Error>;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1): never
/// forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Accepts TLS connections on `listener` and proxies each request to `upstream` (plain
/// HTTP) once `engine` allows it. Runs until the task is dropped.
///
/// SECURITY: the certificate Portcullis judges is the one from this TLS session. The
/// engine's configuration must not also take one from a request header (`[peer] header`,
/// `xfcc`), which a client could then send itself; `main` refuses such a configuration.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    engine: Arc<Engine>,
    upstream: SocketAddr,
) {
    let acceptor = TlsAcceptor::from(tls);
    let upstream_client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                eprintln!("embedded_proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, engine, upstream_client) =
            (acceptor.clone(), engine.clone(), upstream_client.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer_chain_pem: Option<Arc<str>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(pem).collect::<String>().into());
            let header_timeout = engine.limits().http_header_timeout;
            let service = hyper::service::service_fn(move |request| {
                let (engine, upstream_client, peer_chain_pem) = (
                    engine.clone(),
                    upstream_client.clone(),
                    peer_chain_pem.clone(),
                );
                async move {
                    let (parts, body) = request.into_parts();
                    let response =
                        match authorize(&engine, &parts, peer_chain_pem.as_deref(), client).await {
                            Verdict::Deny(reply) => deny(reply),
                            Verdict::Forward { remove, set } => {
                                forward(&upstream_client, upstream, parts, body, &remove, &set)
                                    .await
                            }
                        };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends an allowed request upstream with Portcullis's header edits, and streams back the
/// answer.
async fn forward(
    upstream_client: &Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    mut parts: Parts,
    body: Incoming,
    remove: &[String],
    set: &[(String, String)],
) -> Response<Body> {
    strip_hop_by_hop(&mut parts.headers);
    // SECURITY: every client-sent copy of an identity header goes before Portcullis's own
    // value is set (`insert` also replaces every copy of its name), so a client cannot
    // forge `x-portcullis-principal` or a claim header upstream.
    for name in remove {
        parts.headers.remove(name.as_str());
    }
    for (name, value) in set {
        let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) else {
            // Fail closed: an identity header that cannot be sent must not be dropped.
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "identity header not sendable\n",
            );
        };
        parts.headers.insert(name, value);
    }
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match Uri::try_from(format!("http://{upstream}{target}")) {
        Ok(uri) => uri,
        Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target\n"),
    };
    let sent = upstream_client.request(Request::from_parts(parts, body));
    match tokio::time::timeout(UPSTREAM_TIMEOUT, sent).await {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Ok(Err(_)) => text(StatusCode::BAD_GATEWAY, "upstream unavailable\n"),
        Err(_) => text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
    }
}

/// A denial as Portcullis rendered it: its status, headers (`www-authenticate`, the
/// decision id) and body.
fn deny(reply: HttpReply) -> Response<Body> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = text(status, reply.body);
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).map_err(|n| match n {}).boxed());
    *response.status_mut() = status;
    response
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// A DER certificate as PEM, for [`RequestFacts::from_http`].
fn pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

// ---------------------------------------------------------------------------------------
// TLS: ask for a client certificate, require proof of its key, leave the rest to Portcullis.
// ---------------------------------------------------------------------------------------

/// The proxy's TLS settings: this server certificate, HTTP/1.1, and a client certificate
/// requested but not required.
pub fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ProofOfPossession(provider)))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Requests a client certificate and checks only that the client holds its private key
/// (the handshake signature); which certificates are trusted is Portcullis's decision.
///
/// Why not rustls's `WebPkiClientVerifier` with `allow_unauthenticated()`: it would be a
/// second, weaker copy of the trust configuration. It knows nothing of the configured
/// intermediates (a client sending only its leaf would fail the handshake), SPIFFE trust
/// domains or CRLs, does not follow Portcullis's reloads of the bundle, and turns a bad
/// certificate into a handshake failure with no audit line instead of a 401 that says why.
///
/// SECURITY: `verify_client_cert` accepts every certificate, so this verifier is only
/// sound with Portcullis deciding every request on the certificate it returns (which
/// [`serve`] does, before anything reaches the upstream). The signature checks below are
/// what stop a client from presenting someone else's certificate: never stub them out.
#[derive(Debug)]
struct ProofOfPossession(Arc<rustls::crypto::CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for ProofOfPossession {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------------------

#[derive(Parser)]
#[command(about = "A TLS reverse proxy that asks an embedded Portcullis engine first")]
struct Args {
    /// Portcullis configuration (portcullis.toml).
    #[arg(long)]
    config: PathBuf,
    /// Address to accept TLS connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Where allowed requests go: http://host:port (plain HTTP, e.g. on loopback).
    #[arg(long)]
    upstream: String,
    /// This proxy's certificate chain (PEM).
    #[arg(long)]
    tls_cert: PathBuf,
    /// This proxy's private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
}

async fn run(args: Args) -> Result<(), String> {
    let settings = Settings::load(&args.config).map_err(|e| format!("{e:?}"))?;
    if settings
        .peer
        .as_ref()
        .is_some_and(|p| p.header.is_some() || p.xfcc != portcullis::config::XfccMode::Off)
    {
        return Err(
            "this proxy is the TLS edge: remove `[peer] header` and `xfcc` from the \
                    configuration, or a client could send its own certificate header"
                .into(),
        );
    }
    let engine = Arc::new(Engine::load(&settings).map_err(|e| format!("{e:?}"))?);
    // Key fetching and file watches run while this is alive.
    let _background = engine.start()?;

    let upstream = args
        .upstream
        .strip_prefix("http://")
        .and_then(|a| a.trim_end_matches('/').parse::<SocketAddr>().ok())
        .ok_or_else(|| format!("--upstream {:?}: expected http://IP:PORT", args.upstream))?;
    let chain = CertificateDer::pem_file_iter(&args.tls_cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", args.tls_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key)
        .map_err(|e| format!("--tls-key {}: {e}", args.tls_key.display()))?;
    let tls = server_tls(chain, key).map_err(|e| format!("TLS settings: {e}"))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    eprintln!(
        "embedded_proxy: listening on https://{} -> {}",
        args.listen, args.upstream
    );
    serve(listener, tls, engine, upstream).await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Only fails when a provider is already installed, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embedded_proxy: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
