//! The HTTP listener: `/healthz` (the process answers), `/readyz` (every issuer that
//! must have keys at start has them), `/metrics` (Prometheus, OpenMetrics text), and the
//! HTTP doors of `http.rs` (JSON check API, forward-auth).

use crate::engine::Engine;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The HTTP listener's routes over a shared engine: admin endpoints, the JSON check API,
/// and the forward-auth door when configured.
pub fn router(engine: Arc<Engine>) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/check",
            post(super::http::json_check).layer(DefaultBodyLimit::max(super::http::MAX_JSON_BYTES)),
        );
    if let Some(fa) = engine.forward_auth() {
        router = router.route(&fa.path, any(super::http::forward_auth));
    }
    router.with_state(engine)
}

async fn readyz(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    // A failed reload does not make the server unready (the last good set serves), but
    // the operator sees why the change did not take effect.
    let reload = engine
        .last_reload_error()
        .map(|p| {
            format!(
                "last reload failed; the previous policies and trust material are serving:\n  - {}\n",
                p.join("\n  - ")
            )
        })
        .unwrap_or_default();
    match engine.readiness() {
        Ok(()) => (StatusCode::OK, format!("ready\n{reload}")),
        Err(waiting) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no keys yet for issuer(s) {}\n{reload}",
                waiting.join(", ")
            ),
        ),
    }
}

async fn metrics(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics().render(),
    )
}

/// Serves the admin routes on a bound listener until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(engine).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
