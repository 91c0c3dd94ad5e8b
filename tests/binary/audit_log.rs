//! The audit log's guarantees through the real binary (GitHub issue 17): no answered
//! decision without its line when the process is killed, the failure actions when the disk
//! is full (a real 512 KiB tmpfs), rotation by logrotate (a rename, then SIGHUP or not) and
//! by size, and the hash chain across restarts and rotated files.

use crate::common::binary::Binary;
use crate::common::request;
use portcullis::proto::envoy::service::auth::v3::CheckResponse;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Serves an allow-all policy (with `GET /deny` forbidden) from `dir`, auditing to `audit`.
fn serve(dir: tempfile::TempDir, audit: &Path, extra: &str) -> Binary {
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir policies");
    std::fs::write(
        policies.join("policies.cedar"),
        "permit (principal, action, resource);\n\
         forbid (principal, action == Action::\"GET\", resource == Path::\"/deny\");\n",
    )
    .expect("write policy");
    let config = format!(
        "[server]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
         [policy]\ndir = \"policies\"\n\n[log]\naudit = \"{}\"\n\n{extra}",
        audit.display()
    );
    Binary::start_in(dir, &config)
}

fn decision_id(reply: &CheckResponse) -> String {
    use prost_types::value::Kind;
    let fields = &reply.dynamic_metadata.as_ref().expect("metadata").fields;
    match fields.get("decision_id").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(id)) => id.clone(),
        other => panic!("no decision_id in the metadata: {other:?}"),
    }
}

/// Every line of the files, in order; each must be one whole JSON object.
fn lines(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in a torn line",
            file.display()
        );
        for line in text.lines() {
            out.push(
                serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{}: not a JSON line ({e}): {line}", file.display())
                }),
            );
        }
    }
    out
}

fn ids(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["decision_id"].as_str().map(str::to_string))
        .collect()
}

/// `clients` gRPC clients asking until `stop`; the decision ids of the answers received.
async fn load(server: &Binary, clients: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = server.client().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut r = tonic::Request::new(request("GET", "/load", None, None));
                r.set_timeout(Duration::from_secs(5));
                match client.check(r).await {
                    Ok(reply) => answered.push(decision_id(reply.get_ref())),
                    Err(_) => break,
                }
            }
            answered
        }));
    }
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await.expect("client task"));
    }
    answered
}

fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// SIGTERM, and the exit within 15 s (the writer's last lines and checkpoint written).
fn terminate(server: &Binary) {
    signal(server.pid, "-TERM");
    assert!(
        server.wait_exit(Duration::from_secs(15)).is_some(),
        "no exit after SIGTERM"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    crate::common::binary::metric(text, name)
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_answered_decision() {
    sigkill_under_load("").await;
}

/// The same through the writer thread's group commit (lines that need an `fsync` go there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_with_fsync_always_loses_no_answered_decision() {
    sigkill_under_load("[audit]\nfsync = \"always\"\n").await;
}

async fn sigkill_under_load(extra: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = dir.path().join("audit.log");
    let server = serve(dir, &audit, extra);
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        let pid = server.pid;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            signal(pid, "-KILL");
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let answered = load(&server, 8, stop).await;
    killer.await.expect("killer");
    assert!(
        server.wait_exit(Duration::from_secs(5)).is_some(),
        "not killed"
    );
    let recorded: BTreeSet<String> = ids(&lines(std::slice::from_ref(&audit)))
        .into_iter()
        .collect();
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    eprintln!(
        "SIGKILL under load ({extra:?}): {} answered, {} audit lines, {} answered but unrecorded",
        answered.len(),
        recorded.len(),
        lost.len()
    );
    assert!(answered.len() > 200, "too little load: {}", answered.len());
    assert!(lost.is_empty(), "answered but never recorded: {lost:?}");
}

/// A tmpfs of 512 KiB mounted on a new directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: the disk-full tests need root (CI runs as root)"
        );
        SmallDisk { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Fills the disk with `filler` until a write fails.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path("filler")).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
        let _ = f.flush();
    }

    fn free(&self) {
        std::fs::remove_file(self.path("filler")).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The gRPC health service's status for the whole server ("" service).
async fn grpc_health(server: &Binary) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = crate::common::binary::connect(server.grpc).await;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Waits (bounded) until the gRPC health service reports `status` (1 SERVING, 2 NOT_SERVING).
async fn grpc_health_becomes(server: &Binary, status: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while grpc_health(server).await != status {
        assert!(
            Instant::now() < deadline,
            "gRPC health never became {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready(server: &Binary) -> (u16, String) {
    let r = server.http("GET", "/readyz", &[], "").await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_denies_until_space_returns() {
    let disk = SmallDisk::mount();
    let audit = disk.path("audit.log");
    let server = serve(tempfile::tempdir().expect("dir"), &audit, "");
    let reply = server.check(request("GET", "/before", None, None)).await;
    assert_eq!(reply.status.map(|s| s.code), Some(0), "allowed before");

    disk.fill();
    // The audit file's last page may still take a few lines; after the first line that
    // cannot be written, none can.
    let mut denied = 0;
    for n in 0..40 {
        let reply = server.check(request("GET", "/full", None, None)).await;
        let code = reply.status.as_ref().map(|s| s.code);
        if denied > 0 || code != Some(0) {
            // UNAVAILABLE: denied, since the decision could not be recorded.
            assert_eq!(
                code,
                Some(14),
                "request {n} after {denied} denials: {reply:?}"
            );
            denied += 1;
        }
    }
    assert!(denied >= 20, "only {denied} of 40 denied on a full disk");
    let (status, body) = ready(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("audit log cannot be written"), "{body}");
    grpc_health_becomes(&server, 2).await;
    let m = server.metrics().await;
    assert_eq!(
        metric(&m, "portcullis_audit_lines_failed_total"),
        denied as f64
    );
    assert_eq!(metric(&m, "portcullis_audit_sink_up"), 0.0);
    assert_eq!(metric(&m, "portcullis_audit_lines_dropped_total"), 0.0);
    // One rate-limited error line, not one per lost line.
    let errors = server.log().matches("audit log write failed").count();
    assert!((1..=3).contains(&errors), "{errors} error lines");

    disk.free();
    // The writer tries a broken sink again every second even with no request to write.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(&server).await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready after space returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = server.check(request("GET", "/after", None, None)).await;
    assert_eq!(reply.status.map(|s| s.code), Some(0), "allowed after");
    grpc_health_becomes(&server, 1).await;
    assert!(lines_at_least(&audit, 43 - denied).await);
    let written = lines(std::slice::from_ref(&audit));
    let recovered: Vec<_> = written
        .iter()
        .filter(|l| l["type"] == "audit_recovered")
        .collect();
    assert_eq!(recovered.len(), 1, "{written:?}");
    assert_eq!(recovered[0]["lines_not_written"], denied);
    // The chain has no gap: the lines not written left no hole and no torn line.
    for (n, l) in written.iter().enumerate() {
        assert_eq!(l["seq"], n as u64, "{written:?}");
    }
    let m = server.metrics().await;
    assert_eq!(metric(&m, "portcullis_audit_sink_up"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_with_serve_answers_and_counts_the_drops() {
    let disk = SmallDisk::mount();
    let audit = disk.path("audit.log");
    let server = serve(
        tempfile::tempdir().expect("dir"),
        &audit,
        "[audit]\ndisk_full_action = \"serve\"\n",
    );
    disk.fill();
    for _ in 0..10 {
        let reply = server.check(request("GET", "/full", None, None)).await;
        assert_eq!(reply.status.as_ref().map(|s| s.code), Some(0), "{reply:?}");
    }
    let reply = server.check(request("GET", "/deny", None, None)).await;
    assert_eq!(reply.status.map(|s| s.code), Some(7), "a deny stays a deny");
    let m = server.metrics().await;
    assert_eq!(metric(&m, "portcullis_audit_lines_dropped_total"), 11.0);
    assert_eq!(metric(&m, "portcullis_audit_lines_failed_total"), 0.0);
    let (status, body) = ready(&server).await;
    assert_eq!(
        status, 503,
        "a broken sink shows in /readyz either way: {body}"
    );
}

/// Waits until `audit` holds at least `n` lines (bounded).
async fn lines_at_least(audit: &Path, n: usize) -> bool {
    {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = std::fs::read_to_string(audit)
                .unwrap_or_default()
                .lines()
                .count();
            if count >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs the real logrotate on `audit` with `postrotate` (or none).
fn logrotate(dir: &Path, audit: &Path, postrotate: Option<&str>) {
    let conf = dir.join("logrotate.conf");
    let post = postrotate
        .map(|p| format!("  postrotate\n    {p}\n  endscript\n"))
        .unwrap_or_default();
    std::fs::write(
        &conf,
        format!(
            "{} {{\n  rotate 5\n  nocreate\n  nocompress\n  missingok\n{post}}}\n",
            audit.display()
        ),
    )
    .expect("write logrotate.conf");
    let out = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(&conf)
        .output()
        .expect("run logrotate (Debian package logrotate)");
    assert!(
        out.status.success(),
        "logrotate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logrotate_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("log dir");
    let audit = logs.path().join("audit.log");
    let server = serve(dir, &audit, "");
    let stop = Arc::new(AtomicBool::new(false));
    let rotations = {
        let stop = stop.clone();
        let (logs, audit, pid) = (logs.path().to_path_buf(), audit.clone(), server.pid);
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500));
            // First as logrotate does by default: a rename and nothing else; the server
            // sees the path renamed and opens a new file.
            logrotate(&logs, &audit, None);
            std::thread::sleep(Duration::from_millis(800));
            // Then with the usual postrotate signal.
            logrotate(&logs, &audit, Some(&format!("kill -HUP {pid}")));
            std::thread::sleep(Duration::from_millis(800));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let answered = load(&server, 4, stop).await;
    rotations.await.expect("rotations");
    terminate(&server);
    let files: Vec<PathBuf> = ["audit.log.2", "audit.log.1", "audit.log"]
        .iter()
        .map(|n| logs.path().join(n))
        .collect();
    let mut per_file = Vec::new();
    for f in &files {
        per_file.push(ids(&lines(std::slice::from_ref(f))).len());
    }
    let all = lines(&files);
    let recorded = ids(&all);
    let mut seen = BTreeMap::new();
    for id in &recorded {
        *seen.entry(id.clone()).or_insert(0) += 1;
    }
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    let lost = answered.iter().filter(|id| !seen.contains_key(*id)).count();
    eprintln!(
        "logrotate under load: {} answered; lines per file (oldest first) {per_file:?}; {lost} lost, {duplicated} duplicated",
        answered.len()
    );
    assert!(
        per_file.iter().all(|&n| n > 0),
        "a file got no lines: {per_file:?}"
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    assert_eq!(recorded.len(), answered.len());
    // One chain across the three files.
    for (n, l) in all.iter().enumerate() {
        assert_eq!(l["seq"], n as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_rotation_keeps_the_newest_files_and_one_chain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = dir.path().join("audit.log");
    let server = serve(
        dir,
        &audit,
        "[audit]\nrotate_size = \"4KiB\"\nrotate_keep = 2\n",
    );
    for _ in 0..120 {
        server.check(request("GET", "/x", None, None)).await;
    }
    terminate(&server);
    let named = |n: &str| audit.with_file_name(n);
    assert!(!named("audit.log.3").exists(), "more than rotate_keep kept");
    let files = vec![named("audit.log.2"), named("audit.log.1"), audit.clone()];
    for f in &files[..2] {
        let len = std::fs::metadata(f).expect("rotated file").len();
        assert!(len >= 4096, "{} rotated at {len} bytes", f.display());
    }
    let all = lines(&files);
    let first = all[0]["seq"].as_u64().expect("seq");
    assert!(first > 0, "the oldest files were removed");
    for (n, l) in all.iter().enumerate() {
        assert_eq!(l["seq"], first + n as u64, "one chain across the files");
    }
    assert_eq!(all.last().expect("lines")["seq"], 119);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_resumes_after_a_restart() {
    let keep = tempfile::tempdir().expect("audit dir");
    let audit = keep.path().join("audit.log");
    for _ in 0..2 {
        let server = serve(tempfile::tempdir().expect("dir"), &audit, "");
        for _ in 0..5 {
            server.check(request("GET", "/x", None, None)).await;
        }
        terminate(&server);
    }
    let text = std::fs::read_to_string(&audit).expect("audit");
    let raw: Vec<&str> = text.lines().collect();
    assert_eq!(raw.len(), 10);
    for (n, line) in raw.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["seq"], n as u64);
        if n > 0 {
            let digest =
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw[n - 1].as_bytes());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(v["prev"], hex, "line {n} is not linked to the one before");
        }
    }
}

/// `portcullis audit ...` run to completion.
fn audit_command(dir: &Path, args: &[&str]) -> crate::common::binary::Ran {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    crate::common::binary::run_command(&all, dir, None, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_lines_are_sealed_and_checkpoints_come_on_time_and_at_shutdown() {
    let keys = tempfile::tempdir().expect("key dir");
    let made = audit_command(keys.path(), &["keygen", "--out", "key.pem"]);
    assert_eq!(made.status.code(), Some(0), "{}", made.stderr);
    std::fs::write(keys.path().join("public.pem"), &made.stdout).expect("public key");
    let audit = keys.path().join("audit.log");
    let server = serve(
        tempfile::tempdir().expect("dir"),
        &audit,
        &format!(
            "[audit]\nformat = \"ecs\"\nsigning_key = \"{}\"\ncheckpoint_interval = \"1s\"\n",
            keys.path().join("key.pem").display()
        ),
    );
    for _ in 0..3 {
        server.check(request("GET", "/x", None, None)).await;
    }
    // A checkpoint within the interval (and the writer's one-second look) with no new line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .contains(r#""type":"checkpoint""#)
    {
        assert!(Instant::now() < deadline, "no timed checkpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.check(request("GET", "/deny", None, None)).await;
    terminate(&server);
    let all = lines(std::slice::from_ref(&audit));
    let decisions: Vec<_> = all
        .iter()
        .filter(|l| {
            l.get("@timestamp").is_some()
                && l["event"]["kind"] == "event"
                && l.get("type").is_none()
        })
        .collect();
    assert_eq!(decisions.len(), 4, "{all:?}");
    assert_eq!(decisions[0]["event"]["outcome"], "success");
    assert_eq!(decisions[3]["event"]["outcome"], "failure");
    assert_eq!(
        all[3]["type"], "checkpoint",
        "timed checkpoint after 3 lines: {all:?}"
    );
    assert_eq!(
        all.last().expect("lines")["type"],
        "checkpoint",
        "shutdown checkpoint"
    );
    let verified = audit_command(keys.path(), &["verify", "audit.log", "--key", "public.pem"]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}{}",
        verified.stdout,
        verified.stderr
    );
    assert!(
        verified.stdout.contains("intact: 6 lines"),
        "{}",
        verified.stdout
    );
    assert!(
        !verified.stdout.contains("not signed"),
        "{}",
        verified.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_before_the_chain_goes_on() {
    let keep = tempfile::tempdir().expect("audit dir");
    let audit = keep.path().join("audit.log");
    let server = serve(tempfile::tempdir().expect("dir"), &audit, "");
    for _ in 0..2 {
        server.check(request("GET", "/x", None, None)).await;
    }
    signal(server.pid, "-KILL");
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    // What a host crash in the middle of a write leaves.
    let mut text = std::fs::read_to_string(&audit).expect("audit");
    text.push_str(r#"{"time":"2026-12-03T00:00:00Z","decision_id":"torn"#);
    std::fs::write(&audit, &text).expect("tear");
    let server = serve(tempfile::tempdir().expect("dir"), &audit, "");
    server.check(request("GET", "/x", None, None)).await;
    assert!(
        server.log().contains("cut a torn last line"),
        "{}",
        server.log()
    );
    drop(server);
    let all = lines(std::slice::from_ref(&audit));
    assert_eq!(all.len(), 3);
    assert_eq!(
        all[2]["seq"], 2,
        "the chain goes on after the last whole line"
    );
    let verified = audit_command(keep.path(), &["verify", "audit.log"]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}{}",
        verified.stdout,
        verified.stderr
    );
}

/// SECURITY: an audit path that is a FIFO neither blocks start-up (opening a FIFO with no
/// reader waits for one) nor takes the lines: `serve` and `validate` refuse it at once.
#[test]
fn a_fifo_for_the_audit_file_fails_start_up_promptly() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir");
    std::fs::write(
        dir.path().join("policies/all.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("policy");
    let fifo = dir.path().join("audit.log");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    std::fs::write(
        dir.path().join("portcullis.toml"),
        "[server]\ngrpc = \"127.0.0.1:0\"\n[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
    )
    .expect("config");
    for command in ["validate", "serve"] {
        let started = Instant::now();
        let ran = crate::common::binary::run_command(
            &[command, "--config", "portcullis.toml"],
            dir.path(),
            None,
            Duration::from_secs(20),
        );
        assert!(!ran.status.success(), "{command}: {}", ran.stderr);
        assert!(
            ran.stderr.contains("audit.log")
                && ran.stderr.contains("not a regular file (it is a FIFO)"),
            "{command}: {}",
            ran.stderr
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{command} hung"
        );
    }
}
