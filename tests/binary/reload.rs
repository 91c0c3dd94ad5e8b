//! Hot reload against a running server: policies swapped many times under continuous load
//! (including invalid versions), CRLs added at run time, and the visibility of a failed
//! reload.

use crate::common;

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

// ---- Operator files as the real binary reads them: FIFOs, size caps, half-written
// revocation lists, logs written into a watched directory.

pub(crate) mod binary {
    use super::common::binary::{Binary, run_command};
    use super::common::{check_at, outcome, request};
    use portcullis::demo::TokenSigner;
    use serde_json::json;
    use std::path::PathBuf;
    use std::process::{Command, ExitStatus};
    use std::time::Duration;

    pub const ISSUER: &str = "https://idp.test";

    /// A configuration directory: one ES256 issuer from a JWKS file, a revocation list, a
    /// policy allowing every user, and `extra` appended to the configuration.
    pub struct Setup {
        pub dir: tempfile::TempDir,
        pub signer: TokenSigner,
    }

    impl Setup {
        pub fn new(revoked: &str, extra: &str) -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path();
            let signer = TokenSigner::generate(jsonwebtoken::Algorithm::ES256, "k1");
            std::fs::write(p.join("idp.jwks.json"), portcullis::demo::jwks(&[&signer])).unwrap();
            std::fs::write(p.join("revoked.txt"), revoked).unwrap();
            std::fs::create_dir(p.join("policies")).unwrap();
            std::fs::write(
                p.join("policies/main.cedar"),
                "permit (principal is User, action, resource);\n",
            )
            .unwrap();
            std::fs::write(p.join("entities.json"), "[]").unwrap();
            let config = format!(
                "[server]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
                 [token]\nrevoked = \"revoked.txt\"\n\n\
                 [[issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"orders\"]\n\
                 jwks_file = \"idp.jwks.json\"\nalgorithms = [\"ES256\"]\n\n\
                 [policy]\ndir = \"policies\"\nentities = \"entities.json\"\n\n{extra}\n"
            );
            std::fs::write(p.join("portcullis.toml"), config).unwrap();
            Setup { dir, signer }
        }

        pub fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        pub fn token(&self, jti: &str) -> String {
            let now = portcullis::demo::unix_now();
            self.signer.sign(&json!({
                "iss": ISSUER, "aud": "orders", "sub": "alice", "iat": now,
                "exp": now + 600, "jti": jti,
            }))
        }

        /// Replaces `name` by a FIFO, as an attacker with write access to the directory, or
        /// a confused deployment tool, could.
        pub fn make_fifo(&self, name: &str) {
            let path = self.path(name);
            let _ = std::fs::remove_file(&path);
            let ok = Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mkfifo {}", path.display());
        }

        /// Writes `text` to `name` the safe way: a temporary file renamed into place.
        pub fn replace(&self, name: &str, text: &str) {
            let tmp = self.path(&format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }

        /// Runs `portcullis <command> --config portcullis.toml`; it must exit within 20 s
        /// (a hang is killed and fails the test). Returns its status and standard error.
        pub fn run(&self, command: &str) -> (ExitStatus, String) {
            let config = self.path("portcullis.toml");
            let config = config.to_str().expect("a UTF-8 path");
            let ran = run_command(
                &[command, "--config", config],
                self.dir.path(),
                Some("info"),
                Duration::from_secs(20),
            );
            (ran.status, ran.stderr)
        }

        /// Starts `portcullis serve` and waits until it is ready.
        pub fn serve(&self) -> Served {
            Served(Binary::serve(&self.path("portcullis.toml")))
        }
    }

    /// A server of a [`Setup`], killed when dropped.
    pub struct Served(Binary);

    impl Served {
        pub async fn allowed(&self, token: &str) -> bool {
            let resp = check_at(self.0.grpc, request("GET", "/x", None, Some(token))).await;
            outcome(&resp).0 == 0
        }

        pub async fn get(&self, path: &str) -> String {
            reqwest::get(format!("http://{}{path}", self.0.http_addr()))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }

        /// `portcullis_revocation_reloads_total{result="failure"}`.
        pub async fn revocation_failures(&self) -> u64 {
            self.get("/metrics")
                .await
                .lines()
                .find(|l| l.starts_with("portcullis_revocation_reloads_total{result=\"failure\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        }

        pub fn log(&self) -> String {
            self.0.log()
        }
    }
}

/// `validate` and `serve` on a configuration naming a FIFO (the revocation list, one of
/// several policy files, the entities file) exit non-zero at once with a message naming
/// the file; they used to hang opening it, or drop the policy file in silence.
#[test]
fn a_fifo_in_place_of_an_operator_file_fails_start_up_promptly() {
    for name in ["revoked.txt", "policies/extra.cedar", "entities.json"] {
        let setup = binary::Setup::new("# none\n", "");
        setup.make_fifo(name);
        for command in ["validate", "serve"] {
            let started = std::time::Instant::now();
            let (status, stderr) = setup.run(command);
            assert!(!status.success(), "{command} with {name} a FIFO: {stderr}");
            assert!(
                stderr.contains(name) && stderr.contains("not a regular file (it is a FIFO)"),
                "{command} with {name} a FIFO: {stderr}"
            );
            assert!(started.elapsed() < Duration::from_secs(15));
        }
    }
}

/// While serving, the revocation list replaced by a FIFO: the reload fails visibly (log,
/// counter, `/readyz`), the last good list keeps serving, and a proper file written again
/// is applied (the reload thread did not hang on the FIFO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_replaced_by_a_fifo_fails_visibly_and_recovers() {
    let setup = binary::Setup::new("jti:old-token\n", "");
    let served = setup.serve();
    let token = setup.token("tok-1");
    assert!(served.allowed(&token).await);
    assert!(!served.allowed(&setup.token("old-token")).await);
    setup.make_fifo("revoked.txt");
    assert!(
        eventually(Duration::from_secs(10), || async {
            served.revocation_failures().await >= 1
        })
        .await,
        "no failure counted; log:\n{}",
        served.log()
    );
    let readyz = served.get("/readyz").await;
    assert!(
        readyz.contains("revocation list not reloaded") && readyz.contains("it is a FIFO"),
        "{readyz}"
    );
    assert!(
        served.log().contains("revocation list not reloaded"),
        "{}",
        served.log()
    );
    assert!(
        !served.allowed(&setup.token("old-token")).await,
        "the last good list serves"
    );
    setup.replace("revoked.txt", "jti:old-token\njti:tok-1\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            !served.allowed(&token).await
        })
        .await,
        "the revocation written after the FIFO was never applied; log:\n{}",
        served.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            !served.get("/readyz").await.contains("revocation list")
        })
        .await,
        "a good reload clears the problem"
    );
    // The engine's own reload (policies, schema, entities, keys, trust material) says so too.
    setup.make_fifo("entities.json");
    assert!(
        eventually(Duration::from_secs(10), || async {
            served
                .get("/readyz")
                .await
                .contains("entities.json: not a regular file")
        })
        .await,
        "a FIFO entities file was not reported; log:\n{}",
        served.log()
    );
    assert!(!served.allowed(&token).await && served.allowed(&setup.token("tok-9")).await);
}

/// A revoked token stays refused while its list is truncated to zero bytes and written
/// again in several slow steps (each step a state a reload may read); the server used to
/// take the empty file as "nothing revoked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_then_slowly_rewritten_revocation_list_keeps_refusing() {
    use std::io::Write;
    let setup = binary::Setup::new("# incident 42\njti:tok-1\n", "");
    let served = setup.serve();
    let revoked = setup.token("tok-1");
    let other = setup.token("tok-2");
    assert!(!served.allowed(&revoked).await);
    assert!(served.allowed(&other).await);
    let mut file = std::fs::File::create(setup.path("revoked.txt")).unwrap();
    let mut checks = 0;
    let mut let_through = 0;
    for step in ["", "# incident 42\njti:to", "k-1\njti:tok", "-3\n"] {
        file.write_all(step.as_bytes()).unwrap();
        file.flush().unwrap();
        // Each state lasts well past the quiet time a reload waits for.
        let until = std::time::Instant::now() + Duration::from_millis(700);
        while std::time::Instant::now() < until {
            checks += 1;
            if served.allowed(&revoked).await {
                let_through += 1;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    drop(file);
    assert_eq!(
        let_through, 0,
        "{let_through} of {checks} checks let the revoked token through"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            !served.allowed(&setup.token("tok-3")).await
        })
        .await,
        "the completed list was not applied"
    );
    assert!(
        served.revocation_failures().await >= 1,
        "the half-written states were not counted"
    );
    // Clearing the list on purpose: a comment line.
    setup.replace("revoked.txt", "# cleared after the incident\n");
    assert!(
        eventually(Duration::from_secs(5), || async {
            served.allowed(&revoked).await
        })
        .await,
        "a list cleared on purpose was not applied"
    );
}

/// A revocation list over `[limits] max_file_bytes` is refused with a clear error at
/// start-up; on reload, the last good list keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_over_the_size_cap_is_refused() {
    let huge = format!("# {}\njti:other\n", "x".repeat(8000));
    let setup = binary::Setup::new(&huge, "[limits]\nmax_file_bytes = 4096\n");
    let (status, stderr) = setup.run("validate");
    assert!(!status.success());
    assert!(
        stderr.contains("revoked.txt: larger than 4096 bytes"),
        "{stderr}"
    );
    setup.replace("revoked.txt", "jti:tok-1\n");
    let served = setup.serve();
    let revoked = setup.token("tok-1");
    assert!(!served.allowed(&revoked).await);
    setup.replace("revoked.txt", &huge);
    assert!(
        eventually(Duration::from_secs(10), || async {
            served.revocation_failures().await >= 1
        })
        .await
    );
    assert!(
        served
            .get("/readyz")
            .await
            .contains("larger than 4096 bytes")
    );
    assert!(!served.allowed(&revoked).await, "the last good list serves");
}

/// `RUST_LOG=trace` with standard error written into the watched policy directory: the
/// log must not feed on itself (file events logged, each log line a file event).
#[test]
fn trace_logs_written_into_the_watched_directory_stay_small() {
    let setup = binary::Setup::new("# none\n", "");
    let log = setup.path("policies/portcullis.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("serve")
        .arg("--config")
        .arg(setup.path("portcullis.toml"))
        .env("RUST_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let size = std::fs::metadata(&log).unwrap().len();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        alive,
        "the server exited: {}",
        &text[..text.len().min(4000)]
    );
    assert!(
        size < 1024 * 1024,
        "{size} bytes of log in 3 s; it begins:\n{}",
        &text[..text.len().min(4000)]
    );
}

/// A JWKS file with a 1024-bit RSA key fails the configuration, naming the key.
#[test]
fn a_weak_rsa_key_in_a_jwks_file_fails_the_load() {
    use base64::Engine;
    let setup = binary::Setup::new("# none\n", "");
    let weak = portcullis::demo::TokenSigner::generate(jsonwebtoken::Algorithm::RS256, "weak");
    let mut jwk = weak.jwk();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(jwk["n"].as_str().unwrap()).unwrap();
    jwk["n"] = serde_json::json!(b64.encode(&n[..128]));
    let doc = serde_json::json!({ "keys": [jwk, setup.signer.jwk()] }).to_string();
    std::fs::write(setup.path("idp.jwks.json"), doc).unwrap();
    let (status, stderr) = setup.run("validate");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("idp.jwks.json")
            && stderr.contains("kid \"weak\"")
            && stderr.contains("RSA modulus of 1024 bits"),
        "{stderr}"
    );
}
