//! The real `portcullis` binary as a test server: a configuration written to a temporary
//! directory, `portcullis serve` started on 127.0.0.1:0 (gRPC and HTTP), its addresses read
//! from its log, and clients for both listeners (tonic for gRPC, raw HTTP/1.1 over TCP so a
//! test can send a header twice exactly as it wants).

use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most log bytes kept for failure messages.
const LOG_CAP: usize = 256 * 1024;

/// A running `portcullis serve`; killed when dropped.
pub struct Binary {
    child: Mutex<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
}

/// A plain HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Binary {
    /// Writes `files` (relative paths) and `portcullis.toml` = `config` into a new temporary
    /// directory and serves it. The configuration must listen on 127.0.0.1:0 for both.
    pub fn start(config: &str, files: &[(&str, String)]) -> Binary {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create test directory");
            }
            std::fs::write(path, content).expect("write test file");
        }
        std::fs::write(dir.path().join("portcullis.toml"), config).expect("write config");
        Binary::serve(dir)
    }

    fn serve(dir: tempfile::TempDir) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("portcullis.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<(&'static str, String)>();
        let log = Arc::new(Mutex::new(String::new()));
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (what, marker) in [
                    ("grpc", "gRPC listening on "),
                    ("http", "HTTP listening on "),
                ] {
                    if let Some(rest) = line.split(marker).nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send((what, addr.to_string()));
                    }
                }
                if line.trim_end().ends_with(": ready") {
                    let _ = tx.send(("ready", String::new()));
                }
                let mut log = writer.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() < LOG_CAP {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let (mut grpc, mut http, mut ready) = (None, None, false);
        let deadline = Instant::now() + Duration::from_secs(60);
        while grpc.is_none() || http.is_none() || !ready {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(("grpc", a)) => grpc = Some(a.parse().expect("gRPC address")),
                Ok(("http", a)) => http = Some(a.parse().expect("HTTP address")),
                Ok(_) => ready = true,
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "portcullis exited at start ({status}):\n{}",
                            log.lock().unwrap()
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "portcullis did not start:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        Binary {
            child: Mutex::new(child),
            grpc: grpc.expect("gRPC address"),
            http: http.expect("HTTP address"),
            dir,
            log,
        }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// One Check over a new gRPC connection; panics on an RPC error (every answer of
    /// Portcullis is a successful RPC).
    pub async fn check(&self, req: CheckRequest) -> CheckResponse {
        self.try_check(req)
            .await
            .unwrap_or_else(|e| panic!("Check failed: {e:?}\n{}", self.log.lock().unwrap()))
    }

    pub async fn try_check(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        let mut client = AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to portcullis");
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(10));
        client.check(r).await.map(tonic::Response::into_inner)
    }

    /// One HTTP/1.1 request with exactly these header lines (`Host` and
    /// `Connection: close` are added), and its answer.
    pub async fn http(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpAnswer {
        let mut text =
            format!("{method} {target} HTTP/1.1\r\nhost: portcullis\r\nconnection: close\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            text.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        text.push_str("\r\n");
        text.push_str(body);
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.http).await?;
            stream.write_all(text.as_bytes()).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("HTTP answer in time")
            .expect("HTTP exchange");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// The audit lines written so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `portcullis ARGS` to completion within `limit`; (exit code, stdout + stderr).
/// A command still running at `limit` is killed and reported as a failure.
pub fn run(args: &[&str], dir: &Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portcullis");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (out.status.code(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portcullis {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
