//! Soak (GitHub issue 7): the real binary, loopback only, for `PORTCULLIS_SOAK_SECS`
//! (default 120) seconds of mixed valid and invalid traffic from several clients while a
//! mutator swaps the policy set between two versions and rotates the issuer's signing keys
//! through its JWKS file. Every answer is compared with an oracle computed from the request
//! class and the server's state; a request that raced a change (its [sent, received] span
//! overlaps the change's [written, confirmed] window) may get either side's answer, every
//! other request exactly one. Zero wrong decisions; RSS growth bounded.
//!
//! The token cache is on (the default), so the oracle also checks that a token cached while
//! its key was published is refused once the key is withdrawn.

use crate::common;

use base64::Engine as _;
use common::binary::Binary;
use common::{AUDIENCE, Authority, ISSUER, LeafSpec, READER, TokenSigner, outcome, request};
use jsonwebtoken::Algorithm;
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Signing keys the rotation cycles through: k0 → {k0,k1} → k1 → {k1,k2} → … → k3 → {k3,k0}.
const KEYS: usize = 4;
/// Client loops sending traffic.
const WORKERS: u64 = 6;
/// Quiet time between the end of one change and the start of the next.
const BETWEEN_CHANGES: Duration = Duration::from_millis(1000);
/// How long a change may take to be seen by the server.
const CONFIRM_LIMIT: Duration = Duration::from_secs(15);
/// Bound on the server's RSS growth from after warm-up to the end.
const RSS_GROWTH_LIMIT_MIB: u64 = 48;

const BASE_POLICIES: &str = r#"
@id("users-read")
permit (principal is User, action == Action::"GET", resource)
when { resource.path like "/api/*" };

@id("workload-read")
permit (principal == Workload::"spiffe://example.org/ns/test/sa/reader", action == Action::"GET", resource)
when { resource.path like "/internal/*" };

@id("no-admin")
forbid (principal, action, resource)
when { resource.path like "/api/admin/*" };

@id("bound-writes")
permit (principal is User, action == Action::"POST", resource)
when { context.binding };
"#;

/// Version A lets anyone GET /flip-a.
const VERSION_A: &str = r#"
@id("flip-a")
permit (principal, action == Action::"GET", resource == Path::"/flip-a");
"#;

/// Version B lets anyone GET /flip-b, and forbids /api/reports/*.
const VERSION_B: &str = r#"
@id("flip-b")
permit (principal, action == Action::"GET", resource == Path::"/flip-b");

@id("no-reports")
forbid (principal, action, resource)
when { resource.path like "/api/reports/*" };
"#;

/// What the server should hold: the policy version and the published keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    version_b: bool,
    /// Bit `k` set: key `k` is in the JWKS.
    keys: u8,
}

impl State {
    fn has(self, key: usize) -> bool {
        self.keys & (1 << key) != 0
    }
}

/// Kinds of request; the ones taking a key use the token signed by that key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// alice, GET /api/orders/1.
    UserRead,
    /// alice, GET /api/reports/q: forbidden by version B only.
    UserReports,
    /// alice, GET /api/admin/x: always forbidden.
    UserAdmin,
    /// alice, GET /flip-a: permitted by version A only.
    UserFlip,
    /// alice, unbound token, POST /api/orders: no permit.
    UserPost,
    /// A token bound to the frontend certificate, presented with it: POST allowed.
    BoundWrite,
    /// The same bound token, presented with the batch certificate.
    BoundMismatch,
    /// The same bound token, presented without a certificate.
    BoundNoCert,
    /// Expired an hour ago.
    Expired,
    /// Signed by a key that is never published.
    ForeignKey,
    /// Not a valid token at all.
    Garbage,
    /// Nothing presented, GET /api/orders/1.
    Anonymous,
    AnonFlipA,
    AnonFlipB,
    /// The reader's certificate, GET /internal/status.
    WorkloadRead,
    /// The reader's certificate, GET /api/orders/1: no permit.
    WorkloadApi,
    /// The reader's SPIFFE ID in a certificate from a CA nobody trusts.
    ForeignCert,
    /// alice, GET /api//orders: not canonical.
    NonCanonical,
}

const CLASSES: &[Class] = &[
    Class::UserRead,
    Class::UserReports,
    Class::UserAdmin,
    Class::UserFlip,
    Class::UserPost,
    Class::BoundWrite,
    Class::BoundMismatch,
    Class::BoundNoCert,
    Class::Expired,
    Class::ForeignKey,
    Class::Garbage,
    Class::Anonymous,
    Class::AnonFlipA,
    Class::AnonFlipB,
    Class::WorkloadRead,
    Class::WorkloadApi,
    Class::ForeignCert,
    Class::NonCanonical,
];

/// The oracle: the CheckResponse status code for `class` (with the token of `key`) in `s`.
fn expected(class: Class, key: usize, s: State) -> i32 {
    const OK: i32 = 0;
    const BAD_REQUEST: i32 = 3;
    const FORBIDDEN: i32 = 7;
    const UNAUTHENTICATED: i32 = 16;
    let published = s.has(key);
    match class {
        Class::UserRead | Class::BoundWrite if published => OK,
        Class::UserReports | Class::UserFlip if published => {
            if s.version_b {
                FORBIDDEN
            } else {
                OK
            }
        }
        Class::UserAdmin | Class::UserPost if published => FORBIDDEN,
        Class::UserRead
        | Class::BoundWrite
        | Class::UserReports
        | Class::UserFlip
        | Class::UserAdmin
        | Class::UserPost => UNAUTHENTICATED,
        Class::BoundMismatch
        | Class::BoundNoCert
        | Class::Expired
        | Class::ForeignKey
        | Class::Garbage
        | Class::Anonymous
        | Class::ForeignCert => UNAUTHENTICATED,
        Class::AnonFlipA if s.version_b => UNAUTHENTICATED,
        Class::AnonFlipA => OK,
        Class::AnonFlipB if s.version_b => OK,
        Class::AnonFlipB => UNAUTHENTICATED,
        Class::WorkloadRead => OK,
        Class::WorkloadApi => FORBIDDEN,
        Class::NonCanonical => BAD_REQUEST,
    }
}

/// Test material, generated once.
struct World {
    root: Authority,
    inter: Authority,
    signers: Vec<TokenSigner>,
    /// alice's unbound token, by key.
    user: Vec<String>,
    /// alice's token bound to `frontend`, by key.
    bound: Vec<String>,
    expired: String,
    foreign_key: String,
    garbage: Vec<String>,
    reader: String,
    frontend: String,
    batch: String,
    foreign: String,
}

fn world(lifetime: i64) -> World {
    let root = Authority::root("soak root CA");
    let inter = root.intermediate("soak intermediate CA");
    let other = Authority::root("soak foreign CA");
    let issue = |id: &str| inter.issue(&LeafSpec::spiffe(id));
    let reader = issue(READER);
    let frontend = issue("spiffe://example.org/ns/test/sa/frontend");
    let batch = issue("spiffe://example.org/ns/test/sa/batch");
    let foreign = other.issue(&LeafSpec::spiffe(READER));
    let signers: Vec<TokenSigner> = (0..KEYS)
        .map(|k| TokenSigner::generate(Algorithm::ES256, &format!("k{k}")))
        .collect();
    let now = common::now();
    let claims = |exp: i64| {
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": exp,
            "groups": ["readers"], "scope": "orders:read",
        })
    };
    let valid = claims(now + lifetime);
    let mut bound_claims = valid.clone();
    bound_claims["cnf"] = json!({ "x5t#S256": frontend.thumbprint() });
    let user: Vec<String> = signers.iter().map(|s| s.sign(&valid)).collect();
    let bound = signers.iter().map(|s| s.sign(&bound_claims)).collect();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let parts: Vec<&str> = user[0].split('.').collect();
    let garbage = vec![
        "a.b.c".to_string(),
        "...".to_string(),
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(valid.to_string().as_bytes())
        ),
        format!("{}.{}.{}", parts[0], parts[1], b64(b"not a signature")),
        format!(
            "{}.{}.{}",
            parts[0],
            b64(json!({"iss": ISSUER, "sub": "mallory"})
                .to_string()
                .as_bytes()),
            parts[2]
        ),
        "x".repeat(9000),
    ];
    World {
        expired: signers[0].sign(&claims(now - 3600)),
        foreign_key: TokenSigner::generate(Algorithm::ES256, "k0").sign(&valid),
        garbage,
        user,
        bound,
        signers,
        reader: reader.envoy_encoded(),
        frontend: frontend.envoy_encoded(),
        batch: batch.envoy_encoded(),
        foreign: foreign.envoy_encoded(),
        root,
        inter,
    }
}

fn build(w: &World, class: Class, key: usize, pick: usize) -> CheckRequest {
    let user = Some(w.user[key].as_str());
    let bound = Some(w.bound[key].as_str());
    match class {
        Class::UserRead => request("GET", "/api/orders/1", None, user),
        Class::UserReports => request("GET", "/api/reports/q", None, user),
        Class::UserAdmin => request("GET", "/api/admin/x", None, user),
        Class::UserFlip => request("GET", "/flip-a", None, user),
        Class::UserPost => request("POST", "/api/orders", None, user),
        Class::BoundWrite => request("POST", "/api/orders", Some(&w.frontend), bound),
        Class::BoundMismatch => request("POST", "/api/orders", Some(&w.batch), bound),
        Class::BoundNoCert => request("POST", "/api/orders", None, bound),
        Class::Expired => request("GET", "/api/orders/1", None, Some(&w.expired)),
        Class::ForeignKey => request("GET", "/api/orders/1", None, Some(&w.foreign_key)),
        Class::Garbage => request(
            "GET",
            "/api/orders/1",
            None,
            Some(&w.garbage[pick % w.garbage.len()]),
        ),
        Class::Anonymous => request("GET", "/api/orders/1", None, None),
        Class::AnonFlipA => request("GET", "/flip-a", None, None),
        Class::AnonFlipB => request("GET", "/flip-b", None, None),
        Class::WorkloadRead => request("GET", "/internal/status", Some(&w.reader), None),
        Class::WorkloadApi => request("GET", "/api/orders/1", Some(&w.reader), None),
        Class::ForeignCert => request("GET", "/internal/status", Some(&w.foreign), None),
        Class::NonCanonical => request("GET", "/api//orders", None, user),
    }
}

/// The status code of a Check, or -1 for an RPC error.
async fn code_of(client: &mut AuthorizationClient<Channel>, req: CheckRequest) -> i32 {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(10));
    match client.check(r).await {
        Ok(resp) => outcome(resp.get_ref()).0,
        Err(_) => -1,
    }
}

/// xorshift64*, seeded.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One answered request.
struct Record {
    class: Class,
    key: u8,
    sent: Instant,
    received: Instant,
    code: i32,
}

/// One change of the server's files, from the write to the first answer that shows it.
#[derive(Debug)]
struct Change {
    what: String,
    start: Instant,
    confirmed: Instant,
    before: State,
    after: State,
}

/// The states a request sent at `sent` and answered at `received` may have seen.
fn candidates(changes: &[Change], initial: State, sent: Instant, received: Instant) -> Vec<State> {
    let mut current = initial;
    let mut out = Vec::new();
    for c in changes {
        if c.confirmed < sent {
            current = c.after;
            continue;
        }
        if c.start > received {
            break;
        }
        // The request overlapped this change: either side is right.
        if out.is_empty() {
            out.push(current);
        }
        out.push(c.after);
        current = c.after;
    }
    if out.is_empty() {
        out.push(current);
    }
    out
}

fn jwks_of(w: &World, keys: u8) -> String {
    let signers: Vec<&TokenSigner> = (0..KEYS)
        .filter(|k| keys & (1 << k) != 0)
        .map(|k| &w.signers[k])
        .collect();
    portcullis::demo::jwks(&signers)
}

fn policies_of(version_b: bool) -> String {
    format!(
        "{BASE_POLICIES}{}",
        if version_b { VERSION_B } else { VERSION_A }
    )
}

/// Replaces `path` whole (write a temporary file, then rename), as a deployment would.
fn replace(dir: &std::path::Path, path: &std::path::Path, content: &str) {
    let tmp = dir.join(".soak-next.tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[derive(Default)]
struct Tally {
    total: usize,
    allowed: usize,
    denied: usize,
    in_window: usize,
    wrong: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_while_policies_reload_and_keys_rotate() {
    let _alone = crate::alone().await;
    let secs: u64 = std::env::var("PORTCULLIS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let duration = Duration::from_secs(secs);
    let warm_up = Duration::from_secs((secs / 8).clamp(3, 15));
    let w = Arc::new(world(secs as i64 + 3600));

    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path();
    std::fs::write(p.join("ca.pem"), w.root.cert_pem()).unwrap();
    std::fs::write(p.join("intermediate.pem"), w.inter.cert_pem()).unwrap();
    let initial = State {
        version_b: false,
        keys: 1,
    };
    let jwks = p.join("idp.jwks.json");
    let policy = p.join("policies/main.cedar");
    std::fs::write(&jwks, jwks_of(&w, initial.keys)).unwrap();
    std::fs::create_dir(p.join("policies")).unwrap();
    std::fs::write(&policy, policies_of(initial.version_b)).unwrap();
    let config = p.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "24h"

[policy]
dir = "policies"

[log]
audit = "audit.log"
"#
        ),
    )
    .unwrap();
    let server = Arc::new(Binary::serve(&config));

    // The key that clients sign with: the newest one confirmed published.
    let newest = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let end = started + duration;

    let mut workers = Vec::new();
    for id in 0..WORKERS {
        let (server, w, newest, stop) = (server.clone(), w.clone(), newest.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x50a4 + id);
            let mut client = server.client().await;
            let mut records = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let class = CLASSES[rng.below(CLASSES.len())];
                // Half with the key being issued now, half with any key: withdrawn ones,
                // not yet published ones.
                let key = if rng.below(2) == 0 {
                    newest.load(Ordering::Relaxed)
                } else {
                    rng.below(KEYS)
                };
                let req = build(&w, class, key, rng.below(1000));
                let sent = Instant::now();
                let code = code_of(&mut client, req).await;
                records.push(Record {
                    class,
                    key: key as u8,
                    sent,
                    received: Instant::now(),
                    code,
                });
            }
            records
        }));
    }

    // The mutator: policy flips and key rotation steps, one at a time, each confirmed.
    let mutator = {
        let (server, w, newest) = (server.clone(), w.clone(), newest.clone());
        let (jwks, policy, dir_path) = (jwks.clone(), policy.clone(), p.to_path_buf());
        tokio::spawn(async move {
            let mut client = server.client().await;
            let mut state = initial;
            let mut changes = Vec::new();
            let mut step = 0usize;
            loop {
                tokio::time::sleep(BETWEEN_CHANGES).await;
                if Instant::now() >= end {
                    break;
                }
                let newest_key = newest.load(Ordering::Relaxed);
                let mut after = state;
                // (what, the probe's class and key: its answer differs between the sides)
                let (what, probe_class, probe_key) = if step % 2 == 0 {
                    after.version_b = !state.version_b;
                    let what = if after.version_b {
                        "policy A -> B"
                    } else {
                        "policy B -> A"
                    };
                    (what.to_string(), Class::AnonFlipA, 0)
                } else if state.keys.count_ones() == 1 {
                    let next = (newest_key + 1) % KEYS;
                    after.keys |= 1 << next;
                    (format!("publish k{next}"), Class::UserRead, next)
                } else {
                    let old = (0..KEYS)
                        .find(|&k| state.has(k) && k != newest_key)
                        .expect("two keys published");
                    after.keys &= !(1 << old);
                    (format!("withdraw k{old}"), Class::UserRead, old)
                };
                step += 1;
                let want = expected(probe_class, probe_key, after);
                assert_ne!(
                    want,
                    expected(probe_class, probe_key, state),
                    "{what}: probe"
                );
                let start = Instant::now();
                if after.version_b != state.version_b {
                    replace(&dir_path, &policy, &policies_of(after.version_b));
                } else {
                    replace(&dir_path, &jwks, &jwks_of(&w, after.keys));
                }
                loop {
                    let got = code_of(&mut client, build(&w, probe_class, probe_key, 0)).await;
                    if got == want {
                        break;
                    }
                    assert!(
                        start.elapsed() < CONFIRM_LIMIT,
                        "{what}: not in effect after {CONFIRM_LIMIT:?} (probe {probe_class:?} with k{probe_key} answers {got}, expected {want}){}",
                        if probe_class == Class::UserRead && want != 0 {
                            " -- a withdrawn key's cached token still verifies?"
                        } else {
                            ""
                        }
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let confirmed = Instant::now();
                if after.keys.count_ones() == 2 && state.keys.count_ones() == 1 {
                    // Issue tokens with the new key only once it is known to be published.
                    newest.store(probe_key, Ordering::Relaxed);
                }
                changes.push(Change {
                    what,
                    start,
                    confirmed,
                    before: state,
                    after,
                });
                state = after;
            }
            changes
        })
    };

    tokio::time::sleep(warm_up).await;
    server.assert_alive();
    let rss_warm = server.rss_kib();
    let mut rss_samples = vec![(warm_up.as_secs(), rss_warm)];
    while Instant::now() + Duration::from_secs(10) < end {
        tokio::time::sleep(Duration::from_secs(10)).await;
        server.assert_alive();
        rss_samples.push((started.elapsed().as_secs(), server.rss_kib()));
    }
    let changes = mutator.await.expect("the mutator saw a change take effect");
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for worker in workers {
        records.extend(worker.await.expect("worker"));
    }
    server.assert_alive();
    let rss_end = server.rss_kib();
    rss_samples.push((started.elapsed().as_secs(), rss_end));

    // Judge every answer.
    let mut tally: BTreeMap<Class, Tally> = BTreeMap::new();
    let mut wrong = Vec::new();
    for r in &records {
        let states = candidates(&changes, initial, r.sent, r.received);
        let right: BTreeSet<i32> = states
            .iter()
            .map(|&s| expected(r.class, r.key as usize, s))
            .collect();
        let t = tally.entry(r.class).or_default();
        t.total += 1;
        if r.code == 0 {
            t.allowed += 1;
        } else {
            t.denied += 1;
        }
        if states.len() > 1 {
            t.in_window += 1;
        }
        if !right.contains(&r.code) {
            t.wrong += 1;
            if wrong.len() < 30 {
                wrong.push(format!(
                    "{:?} with k{} sent at {:?}, answered after {:?}: got {}, right: {right:?} (states {states:?})",
                    r.class,
                    r.key,
                    r.sent.duration_since(started),
                    r.received.duration_since(r.sent),
                    r.code,
                ));
            }
        }
    }

    let total = records.len();
    let in_window: usize = tally.values().map(|t| t.in_window).sum();
    let wrong_total: usize = tally.values().map(|t| t.wrong).sum();
    let elapsed = started.elapsed();
    println!(
        "soak: {total} requests in {elapsed:?} ({:.0}/s) over {} changes; {in_window} raced a change",
        total as f64 / elapsed.as_secs_f64(),
        changes.len()
    );
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>9} {:>6}",
        "class", "total", "allowed", "denied", "in window", "wrong"
    );
    for (class, t) in &tally {
        println!(
            "{:<14} {:>8} {:>8} {:>8} {:>9} {:>6}",
            format!("{class:?}"),
            t.total,
            t.allowed,
            t.denied,
            t.in_window,
            t.wrong
        );
    }
    let windows: Vec<Duration> = changes.iter().map(|c| c.confirmed - c.start).collect();
    println!(
        "changes: {} ({} policy flips, {} key steps); confirmation took {:?} .. {:?}",
        changes.len(),
        changes
            .iter()
            .filter(|c| c.what.starts_with("policy"))
            .count(),
        changes
            .iter()
            .filter(|c| !c.what.starts_with("policy"))
            .count(),
        windows.iter().min(),
        windows.iter().max()
    );
    println!(
        "RSS (s, KiB): {rss_samples:?}; growth after warm-up {:+} KiB",
        rss_end as i64 - rss_warm as i64
    );

    assert!(
        wrong.is_empty(),
        "{wrong_total} wrong decisions, first ones:\n{}\nchanges: {:#?}",
        wrong.join("\n"),
        changes
            .iter()
            .map(|c| format!(
                "{} ({:?} -> {:?}) [{:?} .. {:?}]",
                c.what,
                c.before,
                c.after,
                c.start.duration_since(started),
                c.confirmed.duration_since(started)
            ))
            .collect::<Vec<_>>()
    );
    for class in CLASSES {
        assert!(
            tally.get(class).is_some_and(|t| t.total > 0),
            "no {class:?} requests"
        );
    }
    let withdrawn = changes
        .iter()
        .filter(|c| c.what.starts_with("withdraw"))
        .count();
    assert!(
        changes.len() >= 4 && withdrawn >= 1,
        "too few changes: {changes:?}"
    );

    // Every change was one successful reload; none failed.
    let metrics = reqwest::get(format!("http://{}/metrics", server.http_addr()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let counter = |result: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("portcullis_reloads_total{{result=\"{result}\"}} "))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    println!(
        "reloads: {} succeeded, {} failed",
        counter("success"),
        counter("failure")
    );
    assert!(counter("success") >= changes.len() as u64, "{metrics}");
    assert_eq!(counter("failure"), 0, "{metrics}");

    let growth_mib = rss_end.saturating_sub(rss_warm) / 1024;
    assert!(
        growth_mib < RSS_GROWTH_LIMIT_MIB,
        "RSS grew by {growth_mib} MiB after warm-up: {rss_samples:?}"
    );
}
