//! Audit lines shipped to a real rsyslog over TLS (RFC 5425, octet counting, client
//! certificate required): every line arrives across a receiver restart (SIGTERM) and a
//! crash (SIGKILL), duplicates counted and reported; a receiver whose certificate is from
//! another CA, or one that refuses this client's certificate, gets nothing counted as
//! delivered and the lines stay spooled; and the server binary ships its decisions.
//!
//! Needs `rsyslogd` with its GnuTLS driver (Debian: rsyslog, rsyslog-gnutls;
//! scripts/install-test-deps installs them).

use crate::common::binary::Binary;
use crate::common::{Authority, LeafSpec, request};
use portcullis::audit::syslog::Spool;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// Certificates generated for one test: the receiver's and this client's, from `ca`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Writes `ca.pem`, `server.pem`/`server.key` (for 127.0.0.1 and localhost, from
    /// `server_ca`) and `client.pem`/`client.key` (from `ca`) into `dir`.
    fn write(dir: &Path, ca: &Authority, server_ca: &Authority) -> Pki {
        let server = server_ca.issue(&LeafSpec::loopback_server());
        let client = ca.issue(&LeafSpec::spiffe("spiffe://example.org/portcullis"));
        let files = [
            ("ca.pem", ca.cert_pem()),
            ("server.pem", server.pem),
            ("server.key", server.key_pem),
            ("client.pem", client.pem),
            ("client.key", client.key_pem),
        ];
        for (name, content) in files {
            std::fs::write(dir.join(name), content).expect("write test certificate");
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A free loopback port (bound, then released for the receiver).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A real rsyslogd receiving RFC 5425 on 127.0.0.1:`port`, writing each message as
/// `PRI APP-NAME MSGID MSG` lines to `out`.
struct Rsyslog {
    child: Option<Child>,
    out: PathBuf,
    log: PathBuf,
}

fn receiver_conf(dir: &Path, pki: &Pki, port: u16) -> String {
    format!(
        r#"global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
template(name="siem" type="string" string="%pri% %app-name% %msgid% %msg%\n")
ruleset(name="siem") {{
  action(type="omfile" file="{out}" template="siem")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="siem")
"#,
        work = dir.join("work").display(),
        ca = pki.path("ca.pem").display(),
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
        out = dir.join("received.log").display(),
    )
}

impl Rsyslog {
    /// Starts rsyslogd on `dir/rsyslog.conf` (written from `pki` and `port`) and returns
    /// once it accepts connections.
    fn start(dir: &Path, pki: &Pki, port: u16) -> Rsyslog {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} is missing: run scripts/install-test-deps (rsyslog, rsyslog-gnutls)"
        );
        std::fs::create_dir_all(dir.join("work")).expect("rsyslog work directory");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(&conf, receiver_conf(dir, pki, port)).expect("write rsyslog.conf");
        let log = dir.join("rsyslogd.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("rsyslogd log");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("rsyslogd log"))
            .stderr(stderr)
            .spawn()
            .expect("start rsyslogd");
        let mut receiver = Rsyslog {
            child: Some(child),
            out: dir.join("received.log"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Some(Ok(Some(status))) = receiver.child.as_mut().map(Child::try_wait) {
                panic!("rsyslogd exited ({status}):\n{}", receiver.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {port}:\n{}",
                receiver.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        receiver
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` ("TERM" or "KILL") and waits (at most 15 s) for rsyslogd to exit.
    fn stop(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().expect("wait for rsyslogd").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rsyslogd did not exit on SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What rsyslogd wrote: one (PRI, APP-NAME, MSGID, MSG) per message.
    fn received(&self) -> Vec<(String, String, String, String)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(4, ' ');
                Some((
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.trim_start().to_string(),
                ))
            })
            .collect()
    }

    /// How many times each decision id arrived.
    fn ids(&self) -> BTreeMap<String, usize> {
        let mut ids = BTreeMap::new();
        for (_, _, _, msg) in self.received() {
            if let Ok(line) = serde_json::from_str::<serde_json::Value>(&msg)
                && let Some(id) = line["decision_id"].as_str()
            {
                *ids.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        ids
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `[audit.syslog]` for a receiver on `port`, parsed as the server parses it.
fn syslog_toml(pki: &Pki, port: u16, spool: &Path, client_cert: bool) -> String {
    let mut text = format!(
        "[audit.syslog]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         ca = \"{}\"\nspool_dir = \"{}\"\n",
        pki.path("ca.pem").display(),
        spool.display(),
    );
    if client_cert {
        text.push_str(&format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            pki.path("client.pem").display(),
            pki.path("client.key").display(),
        ));
    }
    text
}

fn open_spool(pki: &Pki, port: u16, spool: &Path, client_cert: bool) -> Spool {
    let text = syslog_toml(pki, port, spool, client_cert);
    let settings =
        portcullis::Settings::from_toml(&text, &pki.dir).unwrap_or_else(|e| panic!("{e:?}"));
    let syslog = settings.audit.syslog.expect("[audit.syslog] parsed");
    Spool::open(&syslog).expect("open the spool")
}

/// A batch of audit-like lines with the ids `prefix-from` .. `prefix-to`.
fn batch(prefix: &str, ids: std::ops::Range<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in ids {
        let line = serde_json::json!({
            "time": "2026-12-03T15:40:34.123456Z",
            "decision_id": format!("{prefix}-{i}"),
            "seq": i,
            "decision": "allow",
            "principal": "spiffe://example.org/ünïcode",
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn append_lines(spool: &mut Spool, prefix: &str, ids: std::ops::Range<usize>) {
    let ids: Vec<usize> = ids.collect();
    for chunk in ids.chunks(50) {
        let range = chunk[0]..chunk[chunk.len() - 1] + 1;
        spool.append(&batch(prefix, range)).expect("append");
    }
}

/// Polls `done` every 50 ms for up to `limit`.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn missing(received: &BTreeMap<String, usize>, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| !received.contains_key(id))
        .collect()
}

/// The restart test's shape: N lines delivered, K more appended just before the receiver
/// goes (in flight when it goes), M more while it is away, then it comes back on the same
/// port. Every id must arrive; duplicates are counted and printed.
fn across_receiver_outage(signal: &str) {
    const N: usize = 500;
    const K: usize = 100;
    const M: usize = 500;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("siem test ca");
    let pki = Pki::write(dir.path(), &ca, &ca);
    let port = free_port();
    let mut receiver = Rsyslog::start(dir.path(), &pki, port);
    let spool_dir = dir.path().join("spool");
    let mut spool = open_spool(&pki, port, &spool_dir, true);
    let stats = spool.stats();

    append_lines(&mut spool, "a", 0..N);
    let arrived = eventually(Duration::from_secs(30), || {
        missing(&receiver.ids(), "a", N).is_empty()
    });
    assert!(
        arrived,
        "not all of the first {N} lines arrived: missing {:?}\nlast error: {:?}\n{}",
        missing(&receiver.ids(), "a", N),
        stats.last_error(),
        receiver.log_text()
    );
    // Once they count as delivered, a restart does not send them again.
    assert!(
        eventually(Duration::from_secs(10), || stats.shipped() == N as u64),
        "shipped {} of {N}",
        stats.shipped()
    );
    // Lines in flight when the receiver goes.
    let in_flight = batch("a", N..N + K);
    spool.append(&in_flight).expect("append");
    receiver.stop(signal);
    let before_restart = receiver.ids();
    let in_flight_arrived = (N..N + K)
        .filter(|i| before_restart.contains_key(&format!("a-{i}")))
        .count();
    // Lines that arrive while the receiver is away stay spooled.
    append_lines(&mut spool, "a", N + K..N + K + M);
    assert!(
        eventually(Duration::from_secs(10), || !stats.connected()),
        "the shipper did not notice the receiver had gone"
    );
    assert!(stats.shipped() < (N + K + M) as u64);

    let receiver = Rsyslog::start(dir.path(), &pki, port);
    let total = N + K + M;
    let arrived = eventually(Duration::from_secs(60), || {
        missing(&receiver.ids(), "a", total).is_empty()
    });
    let ids = receiver.ids();
    let lost = missing(&ids, "a", total);
    assert!(
        arrived && lost.is_empty(),
        "after SIG{signal}: {} of {total} lines missing: {lost:?}\nlast error: {:?}\n{}",
        lost.len(),
        stats.last_error(),
        receiver.log_text()
    );
    let duplicates: usize = ids.values().map(|n| n - 1).sum();
    println!(
        "SIG{signal}: {total} lines sent, all arrived; {duplicates} duplicate(s) \
         ({} line(s) sent again by the shipper; {in_flight_arrived} of the {K} in flight \
         had been written by the receiver before it went)",
        stats.resent()
    );
    // Only what was sent after the last confirmed line can come twice.
    assert!(duplicates <= K + M, "{duplicates} duplicates");
    assert!(
        eventually(Duration::from_secs(10), || stats.shipped() == total as u64),
        "shipped {} of {total}",
        stats.shipped()
    );
    // Every arrival is one of the lines, whole, with the decision's PRI, APP-NAME, MSGID.
    let sent: Vec<String> = [batch("a", 0..total)]
        .iter()
        .flat_map(|b| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    for (pri, app, msgid, msg) in receiver.received() {
        assert_eq!(
            (pri.as_str(), app.as_str(), msgid.as_str()),
            ("110", "portcullis", "decision")
        );
        assert!(sent.contains(&msg), "not a line that was sent: {msg}");
    }
    drop(spool);
    drop(receiver);
}

#[test]
fn no_line_is_lost_across_a_receiver_restart() {
    across_receiver_outage("TERM");
}

#[test]
fn no_line_is_lost_across_a_receiver_crash() {
    across_receiver_outage("KILL");
}

/// SECURITY: a receiver that cannot prove itself with a certificate from `ca` gets nothing.
#[test]
fn a_receiver_with_a_certificate_from_another_ca_gets_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("siem test ca");
    let impostor = Authority::root("impostor ca");
    let pki = Pki::write(dir.path(), &ca, &impostor);
    let port = free_port();
    let receiver = Rsyslog::start(dir.path(), &pki, port);
    let spool_dir = dir.path().join("spool");
    let mut spool = open_spool(&pki, port, &spool_dir, true);
    let stats = spool.stats();
    let lines = batch("x", 0..20);
    spool.append(&lines).expect("append");
    assert!(
        eventually(Duration::from_secs(10), || stats
            .last_error()
            .is_some_and(|e| e.contains("UnknownIssuer"))),
        "the handshake did not fail on the unknown issuer: {:?}",
        stats.last_error()
    );
    // Longer than a line needs to count as delivered.
    std::thread::sleep(Duration::from_secs(2));
    assert!(receiver.ids().is_empty(), "{:?}", receiver.received());
    assert_eq!(stats.shipped(), 0);
    assert!(!stats.connected());
    assert_eq!(stats.spooled_bytes(), lines.len() as u64);
    drop(spool);
    // Still spooled for the next run.
    let spool = open_spool(&pki, port, &spool_dir, true);
    assert_eq!(spool.stats().spooled_bytes(), lines.len() as u64);
}

/// A receiver that refuses this client (no client certificate; rsyslog's x509/certvalid
/// requires one) rejects it after a TLS 1.3 handshake the client saw succeed: the lines
/// written meanwhile must not count as delivered.
#[test]
fn lines_sent_to_a_receiver_that_refuses_the_client_are_not_counted_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("siem test ca");
    let pki = Pki::write(dir.path(), &ca, &ca);
    let port = free_port();
    let receiver = Rsyslog::start(dir.path(), &pki, port);
    let spool_dir = dir.path().join("spool");
    let mut spool = open_spool(&pki, port, &spool_dir, false);
    let stats = spool.stats();
    let lines = batch("y", 0..20);
    spool.append(&lines).expect("append");
    assert!(
        eventually(Duration::from_secs(10), || stats.last_error().is_some()),
        "no error seen"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(receiver.ids().is_empty(), "{:?}", receiver.received());
    println!("refused client: {:?}", stats.last_error());
    assert_eq!(stats.shipped(), 0, "last error: {:?}", stats.last_error());
    assert_eq!(stats.spooled_bytes(), lines.len() as u64);
}

/// Through the real server: each decision's audit line reaches the SIEM as it is in the
/// audit file, and a security event (a client certificate from an unknown CA, severity
/// medium) arrives with its severity in the PRI and its type as MSGID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_ships_its_decisions_audit_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("siem test ca");
    let pki = Pki::write(dir.path(), &ca, &ca);
    let port = free_port();
    let receiver_dir = dir.path().join("receiver");
    std::fs::create_dir_all(&receiver_dir).expect("mkdir");
    let receiver = Rsyslog::start(&receiver_dir, &pki, port);
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir policies");
    std::fs::write(
        dir.path().join("policies/policies.cedar"),
        "permit (principal, action, resource);\n\
         forbid (principal, action == Action::\"GET\", resource == Path::\"/deny\");\n",
    )
    .expect("write policy");
    let peers = Authority::root("peer ca");
    std::fs::write(dir.path().join("peer-ca.pem"), peers.cert_pem()).expect("write peer ca");
    let config = format!(
        "[server]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
         [peer]\ntrust_bundle = \"peer-ca.pem\"\n\n\
         [policy]\ndir = \"policies\"\n\n[log]\naudit = \"audit.log\"\n\n{}",
        syslog_toml(&pki, port, &dir.path().join("spool"), true)
    );
    let server = Binary::start_in(dir, &config);
    for path in ["/a", "/deny", "/b"] {
        server.check(request("GET", path, None, None)).await;
    }
    let stranger =
        Authority::root("stranger ca").issue(&LeafSpec::spiffe("spiffe://example.org/stranger"));
    let cert = stranger.envoy_encoded();
    server.check(request("GET", "/a", Some(&cert), None)).await;
    let security = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(server.path("audit.log"))
            .unwrap_or_default()
            .contains("\"security_event\"")
    });
    assert!(security, "no security event in the audit file");
    let written: Vec<String> = std::fs::read_to_string(server.path("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(written.len() >= 3, "{written:?}");
    let arrived = eventually(Duration::from_secs(30), || {
        let received: Vec<String> = receiver.received().into_iter().map(|r| r.3).collect();
        written.iter().all(|line| received.contains(line))
    });
    assert!(
        arrived,
        "the audit lines did not all reach rsyslog:\nwritten {written:?}\nreceived {:?}\n{}\n{}",
        receiver.received(),
        server.log(),
        receiver.log_text()
    );
    let headers: Vec<(String, String, String)> = receiver
        .received()
        .into_iter()
        .map(|(pri, app, msgid, _)| (pri, app, msgid))
        .collect();
    // Facility 13: a decision is 13 * 8 + 6, a medium security event 13 * 8 + 4.
    let event = (
        "108".to_string(),
        "portcullis".to_string(),
        "security_event".to_string(),
    );
    assert!(headers.contains(&event), "{headers:?}");
    let decision = (
        "110".to_string(),
        "portcullis".to_string(),
        "decision".to_string(),
    );
    assert!(
        headers.iter().filter(|h| **h == decision).count() >= 4,
        "{headers:?}"
    );
    // The shipper's counters are in the metrics (confirmed one second after sending).
    let shipped = eventually(Duration::from_secs(10), || {
        let text = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(server.metrics())
            })
            .join()
            .expect("scrape")
        });
        let value = |name: &str| crate::common::binary::metric(&text, name);
        value("portcullis_audit_syslog_lines_shipped_total") >= Some(written.len() as f64)
            && value("portcullis_audit_syslog_connected") == Some(1.0)
    });
    assert!(shipped, "the metrics do not show the lines shipped");
}

/// Through the real server: while the receiver is away the spool fills, and past
/// `spool_max` requests are denied (`disk_full_action = "deny"`: gRPC UNAVAILABLE) with
/// their lines in neither the audit file nor the spool; once the receiver is back, the
/// spool drains, requests are allowed again, and every line of the audit file arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_denies_until_the_receiver_is_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("siem test ca");
    let pki = Pki::write(dir.path(), &ca, &ca);
    let port = free_port();
    let receiver_dir = dir.path().join("receiver");
    std::fs::create_dir_all(&receiver_dir).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir policies");
    std::fs::write(
        dir.path().join("policies/policies.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("write policy");
    let config = format!(
        "[server]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
         [policy]\ndir = \"policies\"\n\n[log]\naudit = \"audit.log\"\n\n{}spool_max = \"4KiB\"\n",
        syslog_toml(&pki, port, &dir.path().join("spool"), true)
    );
    let server = Binary::start_in(dir, &config);
    let mut denied = 0;
    for n in 0..30 {
        let reply = server.check(request("GET", "/full", None, None)).await;
        match reply.status.as_ref().map(|s| s.code) {
            Some(0) => assert_eq!(denied, 0, "allowed after a denial: request {n}"),
            Some(14) => denied += 1,
            other => panic!("request {n}: {other:?} {reply:?}"),
        }
    }
    assert!(denied >= 10, "only {denied} of 30 denied with a full spool");
    let written = || -> Vec<String> {
        std::fs::read_to_string(server.path("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        written().len(),
        30 - denied,
        "denied lines were not cut back"
    );

    let receiver = Rsyslog::start(&receiver_dir, &pki, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = server.check(request("GET", "/after", None, None)).await;
        if reply.status.as_ref().map(|s| s.code) == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still denied 30 s after the receiver came back:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let arrived = eventually(Duration::from_secs(30), || {
        let received: Vec<String> = receiver.received().into_iter().map(|r| r.3).collect();
        written().iter().all(|line| received.contains(line))
    });
    assert!(
        arrived,
        "not every audit line reached rsyslog:\nwritten {:?}\nreceived {:?}",
        written(),
        receiver.received()
    );
    let recovered = receiver
        .received()
        .into_iter()
        .filter(|(pri, _, msgid, _)| pri == "110" && msgid == "audit_recovered")
        .count();
    assert_eq!(recovered, 1, "the gap's line, with its type as MSGID");
}
