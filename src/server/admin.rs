//! The HTTP listener: `/healthz` (the process answers), `/readyz` (every issuer that
//! must have keys at start has them), `/metrics` (Prometheus, OpenMetrics text), and the
//! HTTP doors of `http.rs` (JSON check API, forward-auth).

use super::linger::Lingering;
use crate::engine::Engine;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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

/// Waits, at most `limit`, until the client has sent enough for hyper-util to tell HTTP/1
/// from HTTP/2, which it waits for without a timeout of its own: false if it has not, so
/// that a silent client, or one stalled inside the HTTP/2 preface, is dropped.
async fn sent_enough(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let decided = async {
        let mut first = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut first).await {
                // Closed or failed: hyper sees it at once.
                Ok(0) | Err(_) => return,
                Ok(n) if n == PREFACE.len() || first[..n] != PREFACE[..n] => return,
                // A prefix of the HTTP/2 preface so far: wait for more.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(limit, decided).await.is_ok()
}

/// How long shutdown waits for open HTTP connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves the admin routes on a bound listener until `shutdown` completes. At most
/// `[limits] max_http_connections` connections are open at once (more wait in the kernel's
/// backlog), and a client gets `[limits] http_header_timeout` to send each request's headers
/// (an idle keep-alive connection is closed after as long), and a closing connection drains
/// what the client still sends for at most as long again: a slow or stalled client holds
/// one connection for a bounded time and never the listener.
pub async fn serve_admin(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = engine.limits().clone();
    let router = router(engine);
    let slots = Arc::new(Semaphore::new(limits.max_http_connections));
    let wait = limits.http_header_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(wait);
    // An HTTP/2 client that stops answering pings is dropped as late.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(wait)
        .keep_alive_timeout(wait);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("HTTP listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone().layer(Extension(ConnectInfo(peer))));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            if !sent_enough(&stream, wait).await {
                return;
            }
            // Lingering, so that a reply sent before the request's body was read (a 413)
            // is not lost to a reset when the connection closes.
            let stream = Lingering::new(stream, wait);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!("HTTP connection from {peer} ended: {e}");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP listener: connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}
