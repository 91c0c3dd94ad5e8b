//! Hot reload against a running server: policies swapped many times under continuous load
//! (including invalid versions), CRLs added at run time, and the visibility of a failed
//! reload.

mod common;

use common::{Authority, LeafSpec, eventually, outcome, request, start_server};
use portcullis::engine::DenyReason;
use portcullis::identity::CertRejection;
use portcullis::proto::envoy::service::auth::v3::CheckResponse;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

const VERSION_A: &str =
    "@id(\"only-a\")\npermit (principal, action == Action::\"GET\", resource == Path::\"/a\");\n";
const VERSION_B: &str =
    "@id(\"only-b\")\npermit (principal, action == Action::\"GET\", resource == Path::\"/b\");\n";
/// Would allow everything, but does not parse: it must never be used, not even in part.
const INVALID: &str = "@id(\"evil\")\npermit (principal, action, resource);\n@id(\"broken\")\npermit (principal, action resource);\n";

fn policies_of(resp: &CheckResponse) -> Vec<String> {
    let md = resp.dynamic_metadata.as_ref().expect("metadata");
    match &md.fields["policies"].kind {
        Some(prost_types::value::Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

async fn server_with_policy(policy: &str, extra: &str) -> common::RunningServer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/main.cedar"), policy).unwrap();
    let text = format!("{extra}\n[policy]\ndir = \"policies\"\n\n[log]\naudit = \"audit.log\"\n");
    start_server(dir, &text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_swapped_under_load_are_old_or_new_never_a_mix_never_invalid() {
    let server = Arc::new(server_with_policy(VERSION_A, "").await);
    let file = server.dir.path().join("policies/main.cedar");
    let stop = Arc::new(AtomicBool::new(false));
    let (total, allowed_a, allowed_b) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut workers = Vec::new();
    for w in 0..4 {
        let (server, stop, total, allowed_a, allowed_b) = (
            server.clone(),
            stop.clone(),
            total.clone(),
            allowed_a.clone(),
            allowed_b.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let path = ["/a", "/b", "/c"][(i + w) % 3];
                i += 1;
                // Every RPC succeeds (`check` panics otherwise) ...
                let resp = server.check(request("GET", path, None, None)).await;
                let allowed = outcome(&resp).0 == 0;
                let policies = policies_of(&resp);
                total.fetch_add(1, Ordering::Relaxed);
                // ... and every decision is exactly what version A or version B says.
                match (path, allowed) {
                    ("/a", true) => {
                        assert_eq!(policies, ["only-a"]);
                        allowed_a.fetch_add(1, Ordering::Relaxed);
                    }
                    ("/b", true) => {
                        assert_eq!(policies, ["only-b"]);
                        allowed_b.fetch_add(1, Ordering::Relaxed);
                    }
                    ("/c", true) => panic!("the invalid version was used: {policies:?}"),
                    (_, false) => assert!(policies.is_empty(), "{policies:?}"),
                    _ => unreachable!(),
                }
            }
        }));
    }
    for round in 0..12 {
        let next = match round % 3 {
            0 => VERSION_B,
            1 => INVALID,
            _ => VERSION_A,
        };
        std::fs::write(&file, next).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("a worker saw a wrong decision");
    }
    let (total, a, b) = (
        total.load(Ordering::Relaxed),
        allowed_a.load(Ordering::Relaxed),
        allowed_b.load(Ordering::Relaxed),
    );
    println!("reload under load: {total} requests, {a} allowed by version A, {b} by version B");
    assert!(
        a > 0 && b > 0,
        "both versions must have served: a={a} b={b}"
    );
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("portcullis_reloads_total{result=\"success\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_reloads_total{result=\"failure\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failed_reload_keeps_serving_and_says_why() {
    let server = server_with_policy(VERSION_A, "").await;
    std::fs::write(server.dir.path().join("policies/main.cedar"), INVALID).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server.engine.last_reload_error().is_some()
        })
        .await,
        "the invalid policy was not noticed"
    );
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "the last good set still serves");
    assert!(
        body.contains("last reload failed") && body.contains("main.cedar:4:"),
        "{body}"
    );
    assert_eq!(
        outcome(&server.check(request("GET", "/a", None, None)).await).0,
        0
    );
    assert_ne!(
        outcome(&server.check(request("GET", "/c", None, None)).await).0,
        0
    );
    // A fixed file clears the error.
    std::fs::write(server.dir.path().join("policies/main.cedar"), VERSION_B).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server.engine.last_reload_error().is_none()
        })
        .await
    );
    assert_eq!(
        outcome(&server.check(request("GET", "/b", None, None)).await).0,
        0
    );
}

#[tokio::test]
async fn a_crl_added_at_run_time_revokes_a_certificate() {
    let ca = Authority::root("reload test CA");
    let good = ca.issue(&LeafSpec::spiffe("spiffe://example.org/good"));
    let stolen = ca.issue(&LeafSpec::spiffe("spiffe://example.org/stolen"));
    let dir_policy = "permit (principal is Workload, action, resource);";
    let peer = "[peer]\ntrust_bundle = \"ca.pem\"\ntrust_domains = [\"example.org\"]\ncrls = [\"ca.crl\"]\n";
    // Start with a CRL that revokes nothing.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(
        dir.path().join("ca.crl"),
        ca.crl(&[], time::Duration::days(1)),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/p.cedar"), dir_policy).unwrap();
    let server = start_server(
        dir,
        &format!("{peer}\n[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n"),
    )
    .await;
    let req =
        |c: &portcullis::demo::ClientCert| request("GET", "/x", Some(&c.envoy_encoded()), None);
    assert_eq!(outcome(&server.check(req(&stolen)).await).0, 0);
    std::fs::write(
        server.dir.path().join("ca.crl"),
        ca.crl(&[&stolen], time::Duration::days(1)),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            outcome(&server.check(req(&stolen)).await).1 == 401
        })
        .await,
        "the new CRL was not picked up"
    );
    assert_eq!(
        server.engine.check(&req(&stolen), SystemTime::now()).denial,
        Some(DenyReason::Certificate(CertRejection::Revoked))
    );
    assert_eq!(outcome(&server.check(req(&good)).await).0, 0);
    // An expired CRL fails closed: no certificate from that CA is accepted.
    std::fs::write(
        server.dir.path().join("ca.crl"),
        ca.crl(&[], time::Duration::hours(-1)),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            outcome(&server.check(req(&good)).await).1 == 401
        })
        .await
    );
}

#[tokio::test]
async fn an_idle_server_does_not_reload() {
    // Reading the watched files (as every reload does) must not count as a change.
    let server = server_with_policy(VERSION_A, "").await;
    std::fs::write(server.dir.path().join("policies/main.cedar"), VERSION_B).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            outcome(&server.check(request("GET", "/b", None, None)).await).0 == 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("portcullis_reloads_total{result=\"success\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = count(&server.get("/metrics").await.1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = count(&server.get("/metrics").await.1);
    assert!(before >= 1, "the change was reloaded");
    assert_eq!(after, before, "reloads without any change");
}
