//! The admin HTTP door: `/healthz` (the process answers), `/readyz` (every issuer that
//! must have keys at start has them) and `/metrics` (Prometheus, OpenMetrics text).

use crate::engine::Engine;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The admin routes over a shared engine.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(engine)
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
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}
