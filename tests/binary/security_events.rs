//! Security events through the real binary: each event provoked with real certificates and
//! tokens (a bound token with another certificate or none, bursts of forged and of expired
//! tokens, a revoked token, a certificate from an unknown CA, an overload), then asserted in
//! `/metrics` (`portcullis_security_events_total`) and in the audit file; and the shipped
//! Prometheus alert rules checked and unit-tested with `promtool`.

use crate::common;

use common::binary::Binary;
use common::keyserver::{KeyServer, Mode, SLOW_ISSUER};
use common::{AUDIENCE, Authority, ClientCert, ISSUER, LeafSpec, TokenSigner, outcome, request};
use jsonwebtoken::Algorithm;
use portcullis::proto::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use portcullis::proto::envoy::service::auth::v3::CheckResponse;
use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WRITER: &str = "spiffe://example.org/ns/test/sa/writer";
const STOLEN_JTI: &str = "stolen-1";

struct Material {
    root: Authority,
    inter: Authority,
    /// A CA no trust bundle here names.
    stranger: Authority,
    signer: TokenSigner,
    /// Same algorithm and `kid` as `signer`, another key: its signatures fail.
    forger: TokenSigner,
}

fn material() -> Material {
    let root = Authority::root("security events root CA");
    let inter = root.intermediate("security events intermediate CA");
    Material {
        root,
        inter,
        stranger: Authority::root("stranger CA"),
        signer: TokenSigner::generate(Algorithm::ES256, "es"),
        forger: TokenSigner::generate(Algorithm::ES256, "es"),
    }
}

fn claims(sub: &str) -> Value {
    let now = common::now();
    json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600 })
}

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[token]
revoked = "revoked.txt"

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"

[policy]
dir = "policies"

[log]
audit = "audit.log"
{extra}
"#
    )
}

fn start(m: &Material, extra: &str, files: &[(&str, String)]) -> Binary {
    let mut all = vec![
        ("ca.pem", m.root.cert_pem()),
        ("intermediate.pem", m.inter.cert_pem()),
        ("idp.jwks.json", portcullis::demo::jwks(&[&m.signer])),
        ("revoked.txt", format!("jti:{STOLEN_JTI}\n")),
        (
            "policies/all.cedar",
            "@id(\"all\")\npermit (principal, action, resource);\n".to_string(),
        ),
    ];
    all.extend(files.iter().cloned());
    Binary::start(&config(extra), &all)
}

/// `req` as Envoy sends it for a client at `ip`.
fn from(mut req: CheckRequest, ip: &str) -> CheckRequest {
    let source = req
        .attributes
        .as_mut()
        .and_then(|a| a.source.as_mut())
        .expect("a request built by `request`");
    source.address = Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(40_000)),
            ..Default::default()
        })),
    });
    req
}

fn get(path: &str, cert: Option<&ClientCert>, token: &str, ip: &str) -> CheckRequest {
    from(
        request(
            "GET",
            path,
            cert.map(ClientCert::envoy_encoded).as_deref(),
            (!token.is_empty()).then_some(token),
        ),
        ip,
    )
}

/// The decision id of a reply.
fn decision_id(resp: &CheckResponse) -> String {
    let headers = match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => &d.headers,
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        _ => panic!("no HTTP response in {resp:?}"),
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == portcullis::DECISION_ID_HEADER)
        .map(|h| h.value.clone())
        .expect("a decision id header")
}

/// `portcullis_security_events_total{event, severity}` now. Every series exists from the
/// start (at zero), so an absent one fails the test.
async fn events(server: &Binary, event: &str, severity: &str) -> u64 {
    let text = server.metrics().await;
    let series =
        format!("portcullis_security_events_total{{event=\"{event}\",severity=\"{severity}\"}}");
    common::binary::metric(&text, &series)
        .map(|n| n as u64)
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// The security-event audit lines of kind `event` so far.
fn security_lines(server: &Binary, event: &str) -> Vec<Value> {
    server
        .audit()
        .into_iter()
        .filter(|l| l["type"] == "security_event" && l["event"] == event)
        .collect()
}

/// Waits (at most 10 s: the audit writer writes after the reply) for `n` audit lines of
/// `event`, and returns them.
async fn wait_for_lines(server: &Binary, event: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = security_lines(server, event);
        if lines.len() >= n || Instant::now() > deadline {
            assert_eq!(lines.len(), n, "audit lines of {event}:\n{}", server.log());
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The decision's own audit line (its reason), once written.
async fn decision_line(server: &Binary, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = server
            .audit()
            .into_iter()
            .find(|l| l["decision_id"] == id && l["type"] != "security_event")
        {
            return line;
        }
        assert!(Instant::now() < deadline, "no audit line for decision {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks a security event's audit line: its fields, and the decision it came with.
async fn assert_line(server: &Binary, line: &Value, expect: (&str, &str, Option<&str>, u64, &str)) {
    let (event, severity, source, count, reason) = expect;
    assert_eq!(line["event"], event, "{line}");
    assert_eq!(line["severity"], severity, "{line}");
    assert_eq!(line["source"], json!(source), "{line}");
    assert_eq!(line["count"], count, "{line}");
    let time = line["time"].as_str().expect("time");
    assert!(humantime::parse_rfc3339(time).is_ok(), "time {time}");
    assert!(
        line["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{line}"
    );
    let id = line["decision_id"].as_str().expect("decision_id");
    assert_eq!(decision_line(server, id).await["reason"], reason, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_security_event_is_counted_and_audited() {
    let m = material();
    let server = start(&m, "", &[]);
    let alice = m.inter.issue(&LeafSpec::spiffe(common::READER));
    let mallory = m.inter.issue(&LeafSpec::spiffe(WRITER));
    let mut bound = claims("alice");
    bound["cnf"] = json!({ "x5t#S256": alice.thumbprint() });
    let bound = m.signer.sign(&bound);

    // Every series is there from the start, at zero; ordinary traffic adds nothing.
    let ok = server
        .check(get(
            "/a",
            None,
            &m.signer.sign(&claims("bob")),
            "198.51.100.9",
        ))
        .await;
    assert_eq!(outcome(&ok).0, 0, "a valid token is allowed");
    let own = server
        .check(get("/a", Some(&alice), &bound, "198.51.100.9"))
        .await;
    assert_eq!(
        outcome(&own).0,
        0,
        "a bound token with its own certificate is allowed"
    );
    for (event, severity) in [
        ("token_replay", "critical"),
        ("token_replay", "high"),
        ("forged_token_burst", "high"),
        ("expired_token_burst", "medium"),
        ("revoked_token", "high"),
        ("unknown_ca", "medium"),
        ("overload", "high"),
    ] {
        assert_eq!(
            events(&server, event, severity).await,
            0,
            "{event} {severity}"
        );
    }

    // A bound token with another (trusted, verified) certificate: a critical replay.
    let resp = server
        .check(get("/a", Some(&mallory), &bound, "198.51.100.1"))
        .await;
    assert_ne!(
        outcome(&resp).0,
        0,
        "a bound token with another certificate is denied"
    );
    assert_eq!(events(&server, "token_replay", "critical").await, 1);
    let lines = wait_for_lines(&server, "token_replay", 1).await;
    assert_eq!(lines[0]["decision_id"], decision_id(&resp));
    let replay = (
        "token_replay",
        "critical",
        Some("198.51.100.1"),
        1,
        "invalid_token",
    );
    assert_line(&server, &lines[0], replay).await;
    assert!(
        lines[0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(WRITER),
        "the detail names the certificate it came with: {}",
        lines[0]
    );

    // The same token with no certificate at all: a replay too, high.
    let resp = server.check(get("/a", None, &bound, "198.51.100.2")).await;
    assert_ne!(outcome(&resp).0, 0);
    assert_eq!(events(&server, "token_replay", "high").await, 1);
    let lines = wait_for_lines(&server, "token_replay", 2).await;
    let replay = (
        "token_replay",
        "high",
        Some("198.51.100.2"),
        1,
        "invalid_token",
    );
    assert_line(&server, &lines[1], replay).await;

    // Forged tokens (the right kid, another key): nine from one source and nine from
    // another are no burst; the tenth from the first is, once; more add nothing.
    let forged = |i: usize| m.forger.sign(&claims(&format!("forged-{i}")));
    for i in 0..9 {
        let resp = server
            .check(get("/a", None, &forged(i), "203.0.113.1"))
            .await;
        assert_ne!(outcome(&resp).0, 0);
        server
            .check(get("/a", None, &forged(100 + i), "203.0.113.2"))
            .await;
    }
    assert_eq!(
        events(&server, "forged_token_burst", "high").await,
        0,
        "below the threshold"
    );
    server
        .check(get("/a", None, &forged(9), "203.0.113.1"))
        .await;
    assert_eq!(
        events(&server, "forged_token_burst", "high").await,
        1,
        "at the threshold"
    );
    for i in 10..30 {
        server
            .check(get("/a", None, &forged(i), "203.0.113.1"))
            .await;
    }
    assert_eq!(
        events(&server, "forged_token_burst", "high").await,
        1,
        "once per window"
    );
    let lines = wait_for_lines(&server, "forged_token_burst", 1).await;
    let burst = (
        "forged_token_burst",
        "high",
        Some("203.0.113.1"),
        10,
        "invalid_token",
    );
    assert_line(&server, &lines[0], burst).await;

    // Expired tokens, genuinely signed: the same rule.
    let expired = |i: usize| {
        let mut c = claims(&format!("late-{i}"));
        c["iat"] = json!(common::now() - 4000);
        c["exp"] = json!(common::now() - 3600);
        m.signer.sign(&c)
    };
    for i in 0..9 {
        server
            .check(get("/a", None, &expired(i), "203.0.113.5"))
            .await;
    }
    assert_eq!(events(&server, "expired_token_burst", "medium").await, 0);
    for i in 9..15 {
        server
            .check(get("/a", None, &expired(i), "203.0.113.5"))
            .await;
    }
    assert_eq!(events(&server, "expired_token_burst", "medium").await, 1);
    let lines = wait_for_lines(&server, "expired_token_burst", 1).await;
    let burst = (
        "expired_token_burst",
        "medium",
        Some("203.0.113.5"),
        10,
        "invalid_token",
    );
    assert_line(&server, &lines[0], burst).await;

    // A token on the revocation list.
    let mut c = claims("alice");
    c["jti"] = json!(STOLEN_JTI);
    let revoked = m.signer.sign(&c);
    let resp = server
        .check(get("/a", None, &revoked, "198.51.100.6"))
        .await;
    assert_ne!(outcome(&resp).0, 0);
    assert_eq!(events(&server, "revoked_token", "high").await, 1);
    let lines = wait_for_lines(&server, "revoked_token", 1).await;
    let line = (
        "revoked_token",
        "high",
        Some("198.51.100.6"),
        1,
        "invalid_token",
    );
    assert_line(&server, &lines[0], line).await;

    // A client certificate from a CA the trust bundle does not name.
    let stranger = m.stranger.issue(&LeafSpec::spiffe(common::READER));
    let resp = server
        .check(get("/a", Some(&stranger), "", "2001:db8:7:7::1"))
        .await;
    assert_ne!(outcome(&resp).0, 0);
    assert_eq!(events(&server, "unknown_ca", "medium").await, 1);
    let lines = wait_for_lines(&server, "unknown_ca", 1).await;
    let line = (
        "unknown_ca",
        "medium",
        Some("2001:db8:7:7::/64"),
        1,
        "invalid_certificate",
    );
    assert_line(&server, &lines[0], line).await;

    // Nothing else fired, and no credential reached the audit file.
    assert_eq!(events(&server, "overload", "high").await, 0);
    let audit = std::fs::read_to_string(server.path("audit.log")).expect("audit file");
    for (what, secret) in [
        ("bound token", bound.as_str()),
        ("revoked token", revoked.as_str()),
        ("a certificate", stranger.envoy_encoded().as_str()),
        ("a certificate", alice.pem.lines().nth(1).unwrap_or("?")),
        ("a certificate", mallory.pem.lines().nth(1).unwrap_or("?")),
    ] {
        assert!(!audit.contains(secret), "{what} in the audit file");
    }
    // The WARN lines were logged, rate-limited per kind.
    assert!(server.log().contains("security event"), "{}", server.log());
}

/// SECURITY: the source is what the proxy reports (behind some proxies, a client-written
/// `X-Forwarded-For`): forged tokens from a new source each are still a burst, counted
/// across all sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_burst_from_a_new_source_per_request_is_still_an_event() {
    let m = material();
    let server = start(&m, "", &[]);
    for i in 0..100 {
        let token = m.forger.sign(&claims(&format!("spread-{i}")));
        let resp = server
            .check(get("/a", None, &token, &format!("198.51.100.{i}")))
            .await;
        assert_ne!(outcome(&resp).0, 0);
        if i == 98 {
            assert_eq!(events(&server, "forged_token_burst", "high").await, 0);
        }
    }
    assert_eq!(events(&server, "forged_token_burst", "high").await, 1);
    let lines = wait_for_lines(&server, "forged_token_burst", 1).await;
    assert_line(
        &server,
        &lines[0],
        ("forged_token_burst", "high", None, 100, "invalid_token"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_one_event_per_interval_however_many_are_refused() {
    // One place (max_concurrent = 1), held by a token whose kid is unknown while the key
    // server hangs: the request waits `unknown_kid_wait` for a refresh. Meanwhile every
    // other request is refused as overloaded.
    let m = material();
    let ks = KeyServer::start();
    let known = TokenSigner::generate(Algorithm::ES256, "slow-1");
    let unknown = TokenSigner::generate(Algorithm::ES256, "slow-unknown");
    ks.set_jwks(&portcullis::demo::jwks(&[&known]));
    let extra = format!(
        r#"
[limits]
max_concurrent = 1
request_timeout = "10s"
{}"#,
        ks.slow_issuer(Duration::from_secs(6))
    );
    let server = start(&m, &extra, &[("idp-ca.pem", ks.ca_pem())]);
    let slow = |signer: &TokenSigner| {
        let mut c = claims("alice");
        c["iss"] = json!(SLOW_ISSUER);
        signer.sign(&c)
    };
    let known_token = slow(&known);
    let fetched = common::eventually(Duration::from_secs(15), || {
        let req = get("/a", None, &known_token, "198.51.100.20");
        let server = &server;
        async move { outcome(&server.check(req).await).0 == 0 }
    })
    .await;
    assert!(fetched, "the slow issuer's keys were never fetched");
    ks.set_mode(Mode::Slow(Duration::from_secs(600)));
    let fetches = ks.jwks_fetches();

    let unknown_token = slow(&unknown);
    let held = async {
        let started = Instant::now();
        let answer = server
            .try_check(get("/a", None, &unknown_token, "198.51.100.21"))
            .await;
        (started.elapsed(), answer.map(|r| outcome(&r)))
    };
    let valid = || get("/a", None, &m.signer.sign(&claims("bob")), "198.51.100.22");
    let overloaded = |r: &CheckResponse| outcome(r) == (14, 503, None);
    let probes = async {
        // Only once the held request holds the one place (its refresh has reached the key
        // server): a probe sent sooner could take the place first.
        let holding = common::eventually(Duration::from_secs(5), || async {
            ks.jwks_fetches() > fetches
        })
        .await;
        assert!(holding, "the held request never asked for a key refresh");
        let full = common::eventually(Duration::from_secs(5), || {
            let req = valid();
            let server = &server;
            async move { overloaded(&server.check(req).await) }
        })
        .await;
        let mut refused = 0;
        for _ in 0..5 {
            refused += usize::from(overloaded(&server.check(valid()).await));
        }
        (full, refused)
    };
    let ((took, held), (full, refused)) = tokio::join!(held, probes);
    // The held request waited for the refresh, then its unknown kid was refused.
    let why = format!("held request: {held:?} after {took:?}");
    assert!(full, "no request was refused as overloaded; {why}");
    assert_eq!(refused, 5, "still full; {why}");
    assert_eq!(held.ok().map(|o| o.0), Some(16), "{why}");
    assert_eq!(
        events(&server, "overload", "high").await,
        1,
        "one event, not six"
    );
    let lines = wait_for_lines(&server, "overload", 1).await;
    assert_line(
        &server,
        &lines[0],
        ("overload", "high", None, 1, "overloaded"),
    )
    .await;
}

/// `promtool`: `$PROMTOOL`, else on PATH (Debian's `prometheus` package;
/// scripts/install-test-deps installs it).
fn promtool() -> PathBuf {
    std::env::var_os("PROMTOOL").map_or_else(|| "promtool".into(), PathBuf::from)
}

fn run_promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run promtool (apt-get install prometheus): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_shipped_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let checked = run_promtool(&["check", "rules", "portcullis-alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run_promtool(&["test", "rules", "portcullis-alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test that makes it fire.
    let rules = std::fs::read_to_string(dir.join("portcullis-alerts.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("portcullis-alerts.test.yml")).expect("tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        let fires = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_labels")
        });
        assert!(fires, "{alert} has no unit test where it fires");
    }
}

#[test]
fn promtool_refuses_a_broken_rule_file() {
    // The check above can fail: a rule with a syntax error is refused.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("broken.yml"),
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: rate(portcullis_decisions_total[5m) > 0\n",
    )
    .expect("write");
    let out = Command::new(promtool())
        .args(["check", "rules", "broken.yml"])
        .current_dir(dir.path())
        .output()
        .expect("run promtool");
    assert!(!out.status.success(), "a broken rule file passed");
}
