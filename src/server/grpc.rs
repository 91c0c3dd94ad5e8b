//! The Envoy ext_authz v3 gRPC door (`/envoy.service.auth.v3.Authorization/Check`) and
//! `grpc.health.v1`. A CheckRequest in, the engine's decision as a CheckResponse out,
//! one audit line per decision.
//!
//! Message sizes: the transport decodes CheckRequests up to [`HARD_CAP_FACTOR`] times
//! `limits.max_message_bytes`, and the service answers one over `max_message_bytes` with a
//! deny (`request_too_large`). Only beyond the hard cap is the call an RPC error, because
//! nothing was read to answer; Envoy turns that into an allow under `failure_mode_allow`.

use crate::decision::check_response;
use crate::engine::Engine;
use crate::proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use crate::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use prost::Message as _;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The transport decodes messages up to this many times `limits.max_message_bytes`, so that
/// a CheckRequest over `max_message_bytes` can still be answered with a deny.
pub const HARD_CAP_FACTOR: usize = 4;

/// The largest gRPC message the transport decodes: [`HARD_CAP_FACTOR`] times
/// `max_message_bytes`. A larger one is an RPC error (`OUT_OF_RANGE`).
pub fn hard_cap(limits: &crate::config::Limits) -> usize {
    limits.max_message_bytes.saturating_mul(HARD_CAP_FACTOR)
}

/// The Authorization service over a shared engine.
#[derive(Debug, Clone)]
pub struct AuthorizationService {
    engine: Arc<Engine>,
}

impl AuthorizationService {
    pub fn new(engine: Arc<Engine>) -> Self {
        AuthorizationService { engine }
    }
}

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // SECURITY: a message over max_message_bytes gets a deny reply, not an RPC error,
        // which Envoy would turn into an allow under `failure_mode_allow: true`. The size
        // is of what was decoded (prost drops unknown fields): what the decision would read.
        let size = request.get_ref().encoded_len();
        let decision = if size > self.engine.limits().max_message_bytes {
            self.engine.too_large(size)
        } else {
            self.engine
                .check_with_refresh(request.get_ref(), SystemTime::now)
                .await
        };
        self.engine.observe(&decision);
        // SECURITY: always a successful RPC; a denial travels in the response status.
        Ok(tonic::Response::new(check_response(
            &decision,
            self.engine.reply_settings(),
        )))
    }
}

/// Serves plain gRPC on an already bound TCP listener until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_incoming(TcpListenerStream::new(listener), engine, shutdown).await
}

/// Serves the connections of `incoming` (e.g. from [`super::listen::bind`]) until
/// `shutdown` completes, running the engine's background work meanwhile. gRPC health
/// reports NOT_SERVING until the engine is ready.
pub async fn serve_incoming<I, IO, IE>(
    incoming: I,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _background = engine.start()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<AuthorizationServer<AuthorizationService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let ready_engine = engine.clone();
    let readiness = tokio::spawn(async move {
        while ready_engine.readiness().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        health
            .set_serving::<AuthorizationServer<AuthorizationService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        tracing::info!("ready");
    });
    let limits = engine.limits().clone();
    let authz = AuthorizationServer::new(AuthorizationService::new(engine))
        .max_decoding_message_size(hard_cap(&limits));
    transport(&limits)
        .add_service(health_service)
        .add_service(authz)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    readiness.abort();
    Ok(())
}

/// The gRPC transport every Portcullis listener uses (and the load tool's no-op ceiling
/// server, so the two are compared on the same stack): HTTP/2 with bounded streams per
/// connection, `TCP_NODELAY`, and keepalive pings that drop dead peers.
pub fn transport(limits: &crate::config::Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
}

/// Binds the gRPC listener (and the admin HTTP listener, if configured) and serves until
/// SIGINT or SIGTERM.
pub async fn serve(
    settings: &crate::config::Settings,
    engine: Arc<Engine>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let reload_engine = engine.clone();
    let (incoming, shown) = super::listen::bind_with_hook(
        &settings.grpc_listen,
        settings.tls.as_ref(),
        Arc::new(move |ok| reload_engine.metrics().reload(ok)),
    )
    .await?;
    let event_engine = engine.clone();
    let incoming = incoming
        .with_limits(&settings.limits)
        .on_event(Arc::new(move |event| {
            event_engine.metrics().listener_event("grpc", event);
        }));
    let security = match &settings.tls {
        Some(tls) if tls.client_ca.is_some() => " (mTLS)",
        Some(_) => " (TLS)",
        None => "",
    };
    tracing::info!("gRPC listening on {shown}{security}");
    let http_addr = settings.http_listen.as_deref();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = match http_addr {
        Some(addr) => {
            let http = TcpListener::bind(addr).await?;
            tracing::info!("HTTP listening on {}", http.local_addr()?);
            let mut rx = stop_rx.clone();
            let stopped = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            Some(tokio::spawn(super::admin::serve_admin(
                http,
                engine.clone(),
                stopped,
            )))
        }
        None => None,
    };
    #[cfg(unix)]
    let sighup = {
        let engine = engine.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                // A reload can take seconds (a large entities file); it must not hold one of
                // the runtime's threads, which answer requests.
                let engine = engine.clone();
                let _ = tokio::task::spawn_blocking(move || engine.reload()).await;
            }
        })
    };
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections; in-flight requests may finish");
        let _ = stop_tx.send(true);
    };
    // In-flight requests get `shutdown_grace` after the signal; then the process stops anyway.
    let mut grace_rx = stop_rx.clone();
    let grace = settings.shutdown_grace;
    let deadline = async move {
        let _ = grace_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(grace).await;
    };
    let audited = engine.clone();
    tokio::select! {
        served = serve_incoming(incoming, engine, shutdown) => served?,
        () = deadline => tracing::warn!("shutdown grace of {grace:?} elapsed; stopping with requests in flight"),
    }
    #[cfg(unix)]
    sighup.abort();
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(grace, admin).await;
    }
    // Every decision answered has its audit line on disk before the process ends.
    if !audited.flush_audit(grace) {
        tracing::error!("audit log: lines still unwritten at exit");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
