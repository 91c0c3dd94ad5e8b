//! The server process: binds the configured listeners, serves the gRPC and HTTP doors,
//! reloads on SIGHUP, and on SIGINT or SIGTERM stops taking connections, lets in-flight
//! requests finish within `shutdown_grace`, and flushes the audit log before it exits.

use crate::engine::Engine;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Binds the gRPC listener (and the admin HTTP listener, if configured) and serves until
/// SIGINT or SIGTERM.
pub async fn run(
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
            Some(tokio::spawn(super::http_listener::serve_http(
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
                tracing::info!("SIGHUP: reopening the audit file, reloading");
                engine.reopen_audit();
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
        served = super::grpc::serve_incoming(incoming, engine, shutdown) => served?,
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
