//! The no-op Check server, the ceiling Portcullis is measured against: the same process
//! model, runtime and gRPC transport as `portcullis serve` (see `serve_incoming` in
//! src/server/grpc.rs), answering every Check with OK without reading the request.
//! Prints the address it bound on stdout; stops when its stdin closes.

use portcullis::config::Limits;
use portcullis::proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use portcullis::proto::google::rpc::Status;
use std::io::{Read, Write};
use tokio_stream::wrappers::TcpListenerStream;

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

/// Serves on `addr` until stdin reaches end of file.
pub fn serve(addr: &str) -> Result<(), String> {
    // The same runtime `portcullis serve` builds: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("{addr}: cannot bind: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{bound}")
            .and_then(|()| stdout.flush())
            .map_err(|e| e.to_string())?;

        // The parent keeps our stdin open while it runs; end of file means it is gone.
        let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });

        // Health as the real server registers it, so both routers hold the same services.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AuthorizationServer<Noop>>().await;
        let limits = Limits::default();
        let authz =
            AuthorizationServer::new(Noop).max_decoding_message_size(limits.max_message_bytes);
        portcullis::server::transport(&limits)
            .add_service(health_service)
            .add_service(authz)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = eof_rx.await;
            })
            .await
            .map_err(|e| format!("no-op server failed: {e}"))
    })
}
