//! The real `portcullis` binary as a test server: `portcullis serve` started on a
//! configuration that listens on 127.0.0.1:0, its addresses read from its log, and clients
//! for both listeners (tonic for gRPC, raw HTTP/1.1 over TCP so a test can send a header
//! twice exactly as it wants); and `portcullis <command>` run to completion within a time
//! bound. Every test that runs the binary goes through here.

use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

/// Log bytes kept from the start of a server's log, for failure messages and searches.
const LOG_HEAD: usize = 1 << 20;
/// Log bytes kept from its latest part (a long run logs a line per reload): at least this
/// much, at most four times it.
const LOG_TAIL: usize = 1 << 20;

/// A server's standard error: its beginning, and its latest part once it grows long.
#[derive(Default)]
struct Log {
    head: String,
    tail: String,
    cut: bool,
}

impl Log {
    fn push(&mut self, line: &str) {
        let into = if self.head.len() < LOG_HEAD {
            &mut self.head
        } else {
            &mut self.tail
        };
        into.push_str(line);
        into.push('\n');
        if self.tail.len() > 4 * LOG_TAIL {
            let mut cut = self.tail.len() - LOG_TAIL;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.replace_range(..cut, "");
            self.cut = true;
        }
    }

    fn text(&self) -> String {
        let gap = if self.cut { "[...]\n" } else { "" };
        format!("{}{gap}{}", self.head, self.tail)
    }
}

/// A running `portcullis serve`; killed when dropped.
pub struct Binary {
    child: Mutex<Child>,
    pub pid: u32,
    pub grpc: SocketAddr,
    http: Option<SocketAddr>,
    config: PathBuf,
    /// The temporary directory holding the configuration, when the server owns it.
    owned: Option<tempfile::TempDir>,
    log: Arc<Mutex<Log>>,
    reader: Mutex<Option<JoinHandle<()>>>,
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

/// Writes `content` to `dir/name`, creating the directories on the way.
pub fn write_file(dir: &Path, name: &str, content: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create test directory");
    }
    std::fs::write(path, content).expect("write test file");
}

impl Binary {
    /// Writes `files` (relative paths) and `portcullis.toml` = `config` into a new temporary
    /// directory and serves it.
    pub fn start(config: &str, files: &[(&str, String)]) -> Binary {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            write_file(dir.path(), name, content);
        }
        Binary::start_in(dir, config)
    }

    /// Writes `portcullis.toml` = `config` into `dir` (which holds the files it names) and
    /// serves it; the server owns `dir` from then on.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Binary {
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config).expect("write config");
        let mut server = Binary::serve(&path);
        server.owned = Some(dir);
        server
    }

    /// Serves the configuration file `config`, in a directory the caller keeps. Returns once
    /// the gRPC listener (and the HTTP listener, if configured) is bound and the server
    /// reports ready. The configuration must listen on 127.0.0.1:0.
    pub fn serve(config: &Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<(&'static str, String)>();
        let log = Arc::new(Mutex::new(Log::default()));
        let writer = log.clone();
        let reader = std::thread::spawn(move || {
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
                writer.lock().unwrap_or_else(|e| e.into_inner()).push(&line);
            }
        });
        let text = |log: &Mutex<Log>| log.lock().unwrap_or_else(|e| e.into_inner()).text();
        // Both listeners are logged before "ready", in that order, through one channel: at
        // "ready", the HTTP address is known if there is an HTTP listener.
        let (mut grpc, mut http, mut ready) = (None, None, false);
        let deadline = Instant::now() + Duration::from_secs(60);
        while grpc.is_none() || !ready {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(("grpc", a)) => grpc = Some(a.parse().expect("gRPC address")),
                Ok(("http", a)) => http = Some(a.parse().expect("HTTP address")),
                Ok(_) => ready = true,
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("portcullis exited at start ({status}):\n{}", text(&log));
                    }
                    assert!(
                        Instant::now() < deadline,
                        "portcullis did not start:\n{}",
                        text(&log)
                    );
                }
            }
        }
        Binary {
            pid: child.id(),
            child: Mutex::new(child),
            grpc: grpc.expect("gRPC address"),
            http,
            config: config.to_path_buf(),
            owned: None,
            log,
            reader: Mutex::new(Some(reader)),
        }
    }

    /// The directory of the configuration file.
    pub fn dir(&self) -> &Path {
        self.config.parent().expect("the configuration's directory")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The HTTP listener's address; panics when none is configured.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("the HTTP listener is configured")
    }

    /// What the server wrote to standard error so far (its start, and its latest part).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).text()
    }

    /// Resident set size, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Panics, with the log, when the process has exited.
    pub fn assert_alive(&self) {
        let exited = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
            .expect("try_wait");
        if let Some(status) = exited {
            panic!("portcullis died ({status}); its log:\n{}", self.log());
        }
    }

    /// Waits at most `limit` for the process to exit: its status, once its whole log has
    /// been read; `None` if it is still running.
    pub fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let status = loop {
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_wait()
                .expect("try_wait");
            if let Some(status) = exited {
                break status;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        Some(status)
    }

    /// A new gRPC client on a connection of its own.
    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(connect(self.grpc).await)
    }

    /// One Check over a new gRPC connection; panics on an RPC error (every answer of
    /// Portcullis is a successful RPC).
    pub async fn check(&self, req: CheckRequest) -> CheckResponse {
        self.try_check(req)
            .await
            .unwrap_or_else(|e| panic!("Check failed: {e:?}\n{}", self.log()))
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
        let addr = self.http_addr();
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
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

    /// The HTTP listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http("GET", "/metrics", &[], "").await.body
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

/// The value of one series in a `/metrics` text: `series` is its name with its labels
/// exactly as exposed (`portcullis_audit_sink_up`, `name{label="value"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A gRPC channel to `addr`, connected within 5 s.
pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to portcullis")
}

/// How a `portcullis` command run to completion ended.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `portcullis ARGS` in `dir` (with `RUST_LOG` = `rust_log` when given) to completion
/// within `limit`. A command still running at `limit` is killed and fails the test.
pub fn run_command(args: &[&str], dir: &Path, rust_log: Option<&str>, limit: Duration) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(level) = rust_log {
        command.env("RUST_LOG", level);
    }
    let mut child = command.spawn().expect("start portcullis");
    // Read both pipes while waiting, so that a command writing more than a pipe holds
    // cannot stall until the limit.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "portcullis {args:?} did not finish within {limit:?}; its output:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Runs `portcullis ARGS` to completion within `limit`; (exit code, stdout + stderr).
/// A command still running at `limit` is killed and reported as a failure.
pub fn run(args: &[&str], dir: &Path, limit: Duration) -> (Option<i32>, String) {
    let ran = run_command(args, dir, None, limit);
    (ran.status.code(), format!("{}{}", ran.stdout, ran.stderr))
}
