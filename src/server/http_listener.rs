//! The HTTP listener: `/healthz` (the process answers), `/readyz` (every issuer that
//! must have keys at start has them), `/metrics` (Prometheus, OpenMetrics text), and the
//! HTTP doors of `http_doors.rs` (JSON check API, forward-auth).

use super::linger::Lingering;
use super::slots::{Activity, Slots, Tracked};
use crate::engine::Engine;
use crate::ratelog::RateLog;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
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

/// The HTTP listener's routes over a shared engine: admin endpoints, the JSON check API,
/// and the forward-auth door when configured.
pub fn router(engine: Arc<Engine>) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/check", post(super::http_doors::json_check));
    if let Some(fa) = engine.forward_auth() {
        router = router.route(&fa.path, any(super::http_doors::forward_auth));
    }
    router
        .layer(axum::middleware::from_fn(server_turn))
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
            format!("not ready: {}\n{reload}", waiting.join("; ")),
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

/// The shortest wait on its client that lets a connection be evicted when every slot is
/// taken. A good client sends its request (and its body) at once, well within this; and
/// it bounds how fast a full listener turns connections over (at most
/// `max_http_connections` per this time), so an idle keep-alive connection is not
/// dropped the moment another arrives.
pub const MIN_STALL: Duration = Duration::from_millis(250);

/// Outsider-triggered log lines on the HTTP listener, each kind with its own budget.
static ACCEPT_FAILED: RateLog = RateLog::new("HTTP accept failures", 5, LOG_INTERVAL);
static EVICTED: RateLog = RateLog::new("HTTP connections evicted", 5, LOG_INTERVAL);
static ENDED: RateLog = RateLog::new("HTTP connection errors", 5, LOG_INTERVAL);
const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Serves the admin routes on a bound listener until `shutdown` completes.
///
/// Every read is bounded in time: a client gets `[limits] http_header_timeout` to send
/// each request's headers (an idle keep-alive connection is closed after as long),
/// `http_body_timeout` to send a body the JSON door reads (`http.rs`), and a closing
/// connection drains what the client still sends for at most `http_header_timeout`.
///
/// At most `[limits] max_http_connections` connections are open at once; when all are
/// taken, a new connection takes the place of the one that has waited on its client the
/// longest (at least [`MIN_STALL`]; see `slots.rs`), so stalled clients, not new ones,
/// are dropped. Only when every connection is being served, or has just arrived, does a
/// new one wait (in the kernel's backlog).
pub async fn serve_http(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = engine.limits().clone();
    let router = router(engine.clone());
    let slots = Slots::new(limits.max_http_connections, MIN_STALL);
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
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    ACCEPT_FAILED.event(|| tracing::warn!("HTTP listener: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Holding this one accepted connection, the listener makes room for it; the next
        // ones wait in the backlog meanwhile.
        let admitted = tokio::select! {
            admitted = slots.admit() => admitted,
            () = &mut shutdown => break,
        };
        if let Some(stalled) = admitted.evicted {
            engine.metrics().listener_event("http", "evicted");
            EVICTED.event(|| {
                tracing::info!(
                    "HTTP listener full: closed a connection that had waited {} on its client",
                    humantime::format_duration(stalled)
                );
            });
        }
        let slot = admitted.slot;
        let activity = slot.activity();
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(Extension(ConnectInfo(peer)))
                .layer(Extension(activity.clone())),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let serve = async move {
                if !sent_enough(&stream, wait).await {
                    return;
                }
                // Lingering, so that a reply sent before the request's body was read (a
                // 413) is not lost to a reset when the connection closes.
                let stream = Tracked::new(Lingering::new(stream, wait), activity);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(connection).await {
                    ENDED.event(|| tracing::debug!("HTTP connection from {peer} ended: {e}"));
                }
            };
            // Evicted: dropping the connection closes it.
            tokio::select! {
                () = serve => {}
                () = slot.evicted() => {}
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

/// Marks the connection busy while a request is being handled: from its headers until
/// its reply is ready, the server has the turn (the JSON door hands it back to the client
/// while it reads the body). No mark outside [`serve_http`], which provides the handle.
async fn server_turn(request: axum::extract::Request, next: Next) -> axum::response::Response {
    let _busy = request.extensions().get::<Activity>().map(Activity::busy);
    next.run(request).await
}
