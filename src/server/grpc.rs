//! The Envoy ext_authz v3 gRPC door (`/envoy.service.auth.v3.Authorization/Check`) and
//! `grpc.health.v1`. A CheckRequest in, the engine's decision as a CheckResponse out,
//! one audit line per decision.
//!
//! Message sizes: the transport decodes CheckRequests up to [`HARD_CAP_FACTOR`] times
//! `limits.max_message_bytes`, and the service answers one over `max_message_bytes` with a
//! deny (`request_too_large`). Only beyond the hard cap is the call an RPC error, because
//! nothing was read to answer; Envoy turns that into an allow under `failure_mode_allow`.

use crate::engine::{Engine, Question};
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
    /// The service, deciding with `engine`.
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
        let question = if size > self.engine.limits().max_message_bytes {
            Question::TooLarge(size)
        } else {
            Question::Check(request.get_ref())
        };
        let answer = self.engine.answer(question, SystemTime::now).await;
        // SECURITY: always a successful RPC; a denial travels in the response status.
        Ok(tonic::Response::new(answer.check_response()))
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
    // The health service follows readiness for the process's life: an audit sink that
    // stops writing makes it NOT_SERVING until it writes again.
    let readiness = tokio::spawn(async move {
        let mut serving = false;
        loop {
            let ready = ready_engine.readiness().is_ok();
            if ready != serving {
                serving = ready;
                let status = if ready {
                    tracing::info!("ready");
                    health
                        .set_serving::<AuthorizationServer<AuthorizationService>>()
                        .await;
                    tonic_health::ServingStatus::Serving
                } else {
                    tracing::warn!(
                        "not ready: {}",
                        ready_engine
                            .readiness()
                            .err()
                            .unwrap_or_default()
                            .join("; ")
                    );
                    health
                        .set_not_serving::<AuthorizationServer<AuthorizationService>>()
                        .await;
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status("", status).await;
            }
            let pause = if serving { 500 } else { 50 };
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
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
