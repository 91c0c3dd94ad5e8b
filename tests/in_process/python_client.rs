//! The Python gRPC client example (`examples/python/check_client.py`) against a real
//! Portcullis gRPC server on 127.0.0.1:0: an allowed request (certificate and token), and
//! denials with the status and challenge a proxy would pass on.
//!
//! Needs python3 with grpcio and xds-protos (`scripts/install-test-deps`); fails without.

use jsonwebtoken::Algorithm;
use portcullis::demo::{Authority, LeafSpec, TokenSigner, unix_now};
use portcullis::{Engine, Settings};
use serde_json::json;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "run scripts/install-test-deps (python3 with grpcio and xds-protos)";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const FRONTEND: &str = "spiffe://example.org/ns/test/sa/frontend";

const POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource) when { resource.path like "/api/*" };
@id("frontend-users")
permit (principal is User, action == Action::"GET", resource) when {
  resource.path like "/mtls/*" && context has peer && context.peer has spiffe_id &&
  context.peer.spiffe_id == "spiffe://example.org/ns/test/sa/frontend"
};
@id("no-admin")
forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

/// Starts a gRPC server over a configuration in `dir` on its own thread and runtime;
/// it runs until the test process ends.
fn start_server(dir: &Path) -> SocketAddr {
    let config = r#"
[peer]
trust_bundle = "ca.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "https://idp.test"
audiences = ["orders"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]

[policy]
dir = "policies"

[log]
audit = "audit.log"
"#;
    let settings = Settings::from_toml(config, dir).expect("valid test config");
    let engine = Arc::new(Engine::load(&settings).expect("engine loads"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("address"))
                .expect("send address");
            portcullis::server::serve_on(listener, engine, std::future::pending())
                .await
                .expect("server runs");
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("server started")
}

/// Runs the example with `args`, killed after `SCRIPT_TIMEOUT`. Returns its exit code,
/// stdout and stderr.
fn run_client(args: &[&str]) -> (Option<i32>, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/check_client.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {INSTALL_HINT}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("wait for python3") {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("check_client.py {args:?} did not finish within {SCRIPT_TIMEOUT:?}");
            }
        }
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if err.contains("missing Python module") {
        panic!("{}; {INSTALL_HINT}", err.trim());
    }
    (status.code(), out, err)
}

#[test]
fn python_client_asks_the_grpc_door() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = Authority::root("python client test CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k1");
    std::fs::write(path("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(path("idp.jwks.json"), portcullis::demo::jwks(&[&signer])).unwrap();
    std::fs::create_dir(path("policies")).unwrap();
    std::fs::write(path("policies/p.cedar"), POLICIES).unwrap();
    let cert = ca.issue(&LeafSpec::spiffe(FRONTEND));
    std::fs::write(path("frontend.pem"), &cert.pem).unwrap();
    let now = unix_now();
    let token = signer.sign(&json!({
        "iss": "https://idp.test", "aud": "orders", "sub": "alice", "iat": now, "exp": now + 600,
    }));
    let target = start_server(dir.path()).to_string();
    let cert_file = path("frontend.pem");
    let cert_file = cert_file.to_str().unwrap();

    // (arguments, exit code, lines the output must contain)
    let cases: [(Vec<&str>, i32, &[&str]); 4] = [
        (
            // The policy needs the certificate: it must arrive intact, URL-encoded.
            vec![
                "--path",
                "/mtls/orders?page=2",
                "--token",
                &token,
                "--client-cert",
                cert_file,
            ],
            0,
            &[
                "allow",
                "status: 200",
                "header: x-portcullis-principal: User::\"alice\"",
            ],
        ),
        (
            vec!["--path", "/mtls/orders?page=2", "--token", &token],
            1,
            &["deny", "status: 403 (gRPC code 7: no_permit)"],
        ),
        (
            vec!["--path", "/api/orders"],
            1,
            &[
                "deny",
                "status: 401 (gRPC code 16: no_permit)",
                "header: www-authenticate: Bearer realm=\"portcullis\"",
            ],
        ),
        (
            vec![
                "--path",
                "/api/admin/users",
                "--token",
                &token,
                "--header",
                "x-request-id: r-7",
            ],
            1,
            &["deny", "status: 403 (gRPC code 7: forbidden)"],
        ),
    ];
    for (args, code, expected) in cases {
        let args: Vec<&str> = ["--target", target.as_str()]
            .into_iter()
            .chain(args)
            .collect();
        let (status, out, err) = run_client(&args);
        let context = format!("check_client.py {args:?}\n--- stdout\n{out}--- stderr\n{err}");
        assert_eq!(status, Some(code), "{context}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first(), expected.first(), "{context}");
        for line in expected {
            assert!(lines.contains(line), "missing {line:?}\n{context}");
        }
        if code != 0 {
            assert!(
                !out.contains("x-portcullis-principal"),
                "a denial carries no identity header\n{context}"
            );
        }
    }
}
