//! The real binary under load receives SIGTERM: it stops accepting, finishes what is in
//! flight, and exits 0. Every decision it made (each has an audit line) reached its client.

use crate::common;

use common::binary::Binary;
use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_finishes_in_flight_requests_and_exits_zero() {
    let _alone = crate::alone().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/p.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        "[server]\ngrpc = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
    )
    .unwrap();
    let server = Binary::serve(&config);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (channel, stop, ok) = (channel.clone(), stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut client = AuthorizationClient::new(channel);
            let mut transport_errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut req = tonic::Request::new(common::request("GET", "/x", None, None));
                req.set_timeout(Duration::from_secs(5));
                match client.check(req).await {
                    Ok(resp) => {
                        assert_eq!(resp.into_inner().status.unwrap().code, 0);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    // Once the server stops accepting, new requests fail to start; stop then.
                    Err(status) => {
                        transport_errors.push(status.code());
                        break;
                    }
                }
            }
            transport_errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 0, "no load before SIGTERM");
    let killed = Command::new("kill")
        .args(["-TERM", &server.pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Keep the load on for a while after the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        for code in w.await.unwrap() {
            assert!(
                matches!(
                    code,
                    // Connection torn down mid-request; hyper's stream reset with NO_ERROR
                    // arrives as Internal. None of these is an answer.
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::Internal
                ),
                "unexpected error {code:?}"
            );
        }
    }
    let status = server
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    // Every decision made was delivered: as many audit lines as answers received.
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let answered = ok.load(Ordering::Relaxed);
    println!(
        "SIGTERM under load: {before} answers before the signal, {answered} in all; {} audit lines",
        audit.lines().count()
    );
    assert_eq!(audit.lines().count(), answered);
    assert!(server.log().contains("shutting down"));
}
