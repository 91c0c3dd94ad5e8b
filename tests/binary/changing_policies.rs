//! Changing policies without fear (issue 14) through the real binary: Cedar requests
//! recorded in the audit log (`[audit] record_requests`, never a credential), `portcullis
//! replay` of a known traffic mix against a candidate policy set (exactly the gained and
//! lost decisions, by policy; garbled lines reported by number), and a shadow policy set
//! (`[policy] shadow_dir`) evaluated beside the live one and never enforced.

use crate::common;

use common::binary::{Binary, metric, run_command, write_file};
use common::{AUDIENCE, ISSUER, TokenSigner, outcome, request, set_header};
use jsonwebtoken::Algorithm;
use portcullis::proto::envoy::service::auth::v3::CheckRequest;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// The live policies: readers may GET; anyone may GET /healthz.
const LIVE: &str = r#"
@id("readers")
permit (principal in Group::"readers", action == Action::"GET", resource);

@id("health")
permit (principal, action == Action::"GET", resource == Path::"/healthz");
"#;

/// The candidate: readers lose /secret*; writers of team ops gain POST (a header the live
/// policies never read).
const CANDIDATE: &str = r#"
@id("readers")
permit (principal in Group::"readers", action == Action::"GET", resource);

@id("health")
permit (principal, action == Action::"GET", resource == Path::"/healthz");

@id("no-secret")
forbid (principal, action, resource) when { resource.path like "/secret*" };

@id("ops-writers")
permit (principal in Group::"writers", action == Action::"POST", resource)
when { context.request.headers has "x-team" && context.request.headers["x-team"] == "ops" };
"#;

fn config(extra_policy: &str, extra: &str) -> String {
    format!(
        r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"

[policy]
dir = "policies"
{extra_policy}

[log]
audit = "audit.log"
{extra}
"#
    )
}

fn token(signer: &TokenSigner, sub: &str, groups: &[&str]) -> String {
    let now = common::now();
    signer.sign(&json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600,
        "groups": groups, "email": format!("{sub}@example.org"),
    }))
}

/// A server with the live policies (and `files`), the given `[policy]` and other lines.
fn serve(signer: &TokenSigner, extra_policy: &str, extra: &str, files: &[(&str, &str)]) -> Binary {
    let mut all = vec![
        ("idp.jwks.json", portcullis::demo::jwks(&[signer])),
        ("policies/live.cedar", LIVE.to_string()),
    ];
    all.extend(files.iter().map(|(n, t)| (*n, t.to_string())));
    Binary::start(&config(extra_policy, extra), &all)
}

fn allowed(reply: &portcullis::CheckResponse) -> bool {
    outcome(reply).0 == 0
}

fn get(path: &str, token: Option<&str>) -> CheckRequest {
    request("GET", path, None, token)
}

fn with_team(mut req: CheckRequest, team: &str) -> CheckRequest {
    set_header(&mut req, "x-team", team);
    req
}

fn decisions(server: &Binary) -> Vec<Value> {
    server
        .audit()
        .into_iter()
        .filter(|l| l.get("decision").is_some())
        .collect()
}

fn replay(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["replay", "--config", "portcullis.toml"];
    all.extend(args);
    let ran = run_command(&all, dir, None, Duration::from_secs(60));
    (ran.status.code(), format!("{}\n{}", ran.stdout, ran.stderr))
}

#[tokio::test]
async fn requests_are_not_recorded_by_default() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(&signer, "", "", &[]);
    let alice = token(&signer, "alice", &["readers"]);
    assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    let lines = decisions(&server);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].get("cedar_request").is_none(), "{}", lines[0]);
    assert_eq!(lines[0]["principal"], "User::\"alice\"");
    // Replay says why it cannot help.
    write_file(server.dir(), "candidate/p.cedar", CANDIDATE);
    let (code, out) = replay(server.dir(), &["--policies", "candidate", "audit.log"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 0 decisions")
            && out
                .contains("1 decision(s) had no recorded request: enable [audit] record_requests"),
        "{out}"
    );
}

/// The known traffic mix, its recorded requests, and the replay of it against the candidate
/// (exactly the changed decisions, by policy), against the live set (nothing changes), and
/// of a garbled copy (each bad line by number).
#[tokio::test]
async fn replay_finds_exactly_the_decisions_that_change() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let forger = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(&signer, "", "[audit]\nrecord_requests = true\n", &[]);
    let alice = token(&signer, "alice", &["readers"]);
    let bob = token(&signer, "bob", &["writers"]);
    let forged = token(&forger, "mallory", &["readers"]);
    // (request, live answer)
    let mut mix: Vec<(CheckRequest, bool)> = Vec::new();
    for _ in 0..3 {
        mix.push((get("/orders", Some(&alice)), true)); // unchanged allow
    }
    for _ in 0..2 {
        mix.push((get("/secret/plans", Some(&alice)), true)); // lost: no-secret
    }
    for _ in 0..4 {
        mix.push((
            with_team(request("POST", "/orders", None, Some(&bob)), "ops"),
            false,
        )); // gained
    }
    mix.push((
        with_team(request("POST", "/orders", None, Some(&bob)), "dev"),
        false,
    )); // unchanged deny
    mix.push((get("/orders", Some(&bob)), false)); // unchanged deny
    for _ in 0..2 {
        mix.push((get("/healthz", None), true)); // unchanged allow, anonymous
    }
    mix.push((get("/orders", Some(&forged)), false)); // never reaches the policies
    for (req, expected) in mix {
        assert_eq!(allowed(&server.check(req).await), expected);
    }

    // SECURITY: no credential in the audit file; the recorded request is what policies saw.
    let text = std::fs::read_to_string(server.path("audit.log")).expect("audit file");
    for secret in [&alice, &bob, &forged] {
        assert!(
            !text.contains(secret.as_str()),
            "a token is in the audit log"
        );
        let signature = secret.rsplit('.').next().expect("a JWS");
        assert!(
            !text.contains(signature),
            "a token's signature is in the audit log"
        );
    }
    assert!(!text.to_ascii_lowercase().contains("bearer"), "{text}");
    let lines = decisions(&server);
    assert_eq!(lines.len(), 14);
    let first = &lines[0]["cedar_request"];
    assert_eq!(first["principal"], json!({"type": "User", "id": "alice"}));
    assert_eq!(
        first["parents"],
        json!([{"type": "Group", "id": "readers"}])
    );
    assert_eq!(first["action"], json!({"type": "Action", "id": "GET"}));
    assert_eq!(first["resource"], json!({"type": "Path", "id": "/orders"}));
    assert_eq!(
        first["context"]["token"]["claims"]["email"],
        "alice@example.org"
    );
    assert!(
        first["context"]["request"]["headers"]
            .get("authorization")
            .is_none()
    );
    assert!(
        lines.last().expect("lines").get("cedar_request").is_none(),
        "a rejected token has no Cedar request"
    );

    write_file(server.dir(), "candidate/p.cedar", CANDIDATE);
    let (code, out) = replay(
        server.dir(),
        &["--policies", "candidate", "--limit", "3", "audit.log"],
    );
    assert_eq!(code, Some(3), "{out}");
    println!("portcullis replay against the candidate:\n{out}");
    for expected in [
        "replayed 13 decisions against candidate: 6 would change (4 gained, 2 lost), 7 unchanged",
        "gained access: 4 request(s)\n  allowed by ops-writers: 4\n",
        "lost access: 2 request(s)\n  was allowed by readers: 2\n",
        "unchanged: 1 decision(s) never reached the policies",
        "changes (first 3 of 6):",
        "User::\"alice\" Action::\"GET\" Path::\"/secret/plans\" at ",
        "lost: was allowed by readers, now denied (forbidden by no-secret)",
        "User::\"bob\" Action::\"POST\" Path::\"/orders\" at ",
        "gained: now allowed by ops-writers",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    assert_eq!(out.matches("\n  User::").count(), 3, "--limit 3:\n{out}");

    // The live set itself: nothing changes.
    let (code, out) = replay(server.dir(), &["--policies", "policies", "audit.log"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 13 decisions against policies: 0 would change"),
        "{out}"
    );

    // A garbled copy: each bad line reported with its number, the rest replayed.
    let mut garbled = text.lines().map(str::to_string).collect::<Vec<_>>();
    garbled.insert(2, "{not json".into());
    garbled.insert(5, r#"{"decision": "allow", "principal": "User::\"x\"", "cedar_request": {"principal": "User::\"x\""}}"#.into());
    garbled.insert(7, "\u{0}\u{1}\u{2}".into());
    std::fs::write(server.path("garbled.log"), garbled.join("\n")).expect("write");
    let (code, out) = replay(server.dir(), &["--policies", "policies", "garbled.log"]);
    assert_eq!(code, Some(1), "unreadable lines and nothing changed: {out}");
    for expected in [
        "replayed 13 decisions",
        "unreadable: 3 line(s)",
        "garbled.log:3: not JSON",
        "garbled.log:6: recorded request: principal:",
        "garbled.log:8: not JSON",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }

    // Errors: a candidate that does not load, an audit file that is not there.
    write_file(server.dir(), "broken/p.cedar", "permit (principal, action");
    let (code, out) = replay(server.dir(), &["--policies", "broken", "audit.log"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("p.cedar:1:"), "{out}");
    let (code, out) = replay(server.dir(), &["--policies", "candidate", "missing.log"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("missing.log: cannot open"), "{out}");
}

const FORBID_ALL: &str = "@id(\"nothing\")\nforbid (principal, action, resource);\n";

fn shadow_count(metrics: &str, outcome: &str) -> f64 {
    metric(
        metrics,
        &format!("portcullis_shadow_decisions_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or_else(|| panic!("no shadow {outcome} in:\n{metrics}"))
}

/// A shadow set that denies everything changes no live answer; every disagreement is
/// counted and shown on its audit line, agreements only counted.
#[tokio::test]
async fn a_shadow_set_that_denies_everything_changes_no_live_answer() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(
        &signer,
        "shadow_dir = \"policies-next\"",
        "",
        &[("policies-next/next.cedar", FORBID_ALL)],
    );
    let alice = token(&signer, "alice", &["readers"]);
    let bob = token(&signer, "bob", &["writers"]);
    for _ in 0..3 {
        assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    }
    assert!(!allowed(&server.check(get("/orders", Some(&bob))).await));
    let metrics = server.metrics().await;
    assert_eq!(shadow_count(&metrics, "lost"), 3.0);
    assert_eq!(shadow_count(&metrics, "agree"), 1.0);
    assert_eq!(shadow_count(&metrics, "gained"), 0.0);
    assert_eq!(shadow_count(&metrics, "error"), 0.0);
    assert_eq!(metric(&metrics, "portcullis_shadow_policies"), Some(1.0));
    assert_eq!(
        metric(
            &metrics,
            "portcullis_decisions_total{decision=\"allow\",reason=\"\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    let lines = decisions(&server);
    assert_eq!(lines.len(), 4);
    for line in &lines[..3] {
        assert_eq!(line["decision"], "allow");
        assert_eq!(
            line["shadow"],
            json!({"outcome": "lost", "decision": "deny", "policies": ["nothing"], "errors": []})
        );
    }
    assert!(
        lines[3].get("shadow").is_none(),
        "an agreement: {}",
        lines[3]
    );
}

/// SECURITY: a shadow allow-all never allows live; the disagreements are `gained`.
#[tokio::test]
async fn a_shadow_allow_all_never_allows_live() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(
        &signer,
        "shadow_dir = \"policies-next\"",
        "",
        &[(
            "policies-next/next.cedar",
            "@id(\"all\")\npermit (principal, action, resource);\n",
        )],
    );
    let bob = token(&signer, "bob", &["writers"]);
    let denied = [
        get("/orders", Some(&bob)),
        request("DELETE", "/orders", None, Some(&bob)),
        get("/orders", None),
    ];
    for req in denied {
        let reply = server.check(req).await;
        assert!(!allowed(&reply), "{reply:?}");
    }
    let metrics = server.metrics().await;
    assert_eq!(shadow_count(&metrics, "gained"), 3.0);
    assert_eq!(shadow_count(&metrics, "agree"), 0.0);
    for line in decisions(&server) {
        assert_eq!(line["decision"], "deny");
        assert_eq!(line["shadow"]["outcome"], "gained");
        assert_eq!(line["shadow"]["policies"], json!(["all"]));
    }
}

/// The shadow set reads a header the live set never reads: it is given the request built
/// for both (else reading it would be an evaluation error).
#[tokio::test]
async fn a_shadow_set_sees_the_fields_only_it_reads() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(
        &signer,
        "shadow_dir = \"policies-next\"",
        "",
        &[("policies-next/next.cedar", CANDIDATE)],
    );
    let bob = token(&signer, "bob", &["writers"]);
    let alice = token(&signer, "alice", &["readers"]);
    let post = || request("POST", "/orders", None, Some(&bob));
    assert!(!allowed(&server.check(with_team(post(), "ops")).await));
    assert!(!allowed(&server.check(with_team(post(), "dev")).await));
    assert!(allowed(&server.check(get("/secret/x", Some(&alice))).await));
    let metrics = server.metrics().await;
    assert_eq!(shadow_count(&metrics, "gained"), 1.0, "{metrics}");
    assert_eq!(shadow_count(&metrics, "agree"), 1.0, "{metrics}");
    assert_eq!(shadow_count(&metrics, "lost"), 1.0, "{metrics}");
    assert_eq!(shadow_count(&metrics, "error"), 0.0, "{metrics}");
    let lines = decisions(&server);
    assert_eq!(lines[0]["shadow"]["policies"], json!(["ops-writers"]));
    assert_eq!(lines[2]["shadow"]["policies"], json!(["no-secret"]));
}

/// A shadow set broken at start: `validate` fails and says so; `serve` decides with the
/// live set alone, ready, the failure counted.
#[tokio::test]
async fn a_shadow_set_broken_at_start_fails_validate_not_serve() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let broken = [("policies-next/next.cedar", "permit (principal, action")];
    let server = serve(&signer, "shadow_dir = \"policies-next\"", "", &broken);
    let ran = run_command(
        &["validate", "--config", "portcullis.toml"],
        server.dir(),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(ran.status.code(), Some(1), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("shadow policies") && ran.stderr.contains("next.cedar:1:"),
        "{}",
        ran.stderr
    );
    let alice = token(&signer, "alice", &["readers"]);
    assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    assert!(!allowed(&server.check(get("/admin", None)).await));
    let ready = server.http("GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "portcullis_shadow_reloads_total{result=\"failure\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "portcullis_shadow_policies"), Some(0.0));
    assert_eq!(
        shadow_count(&metrics, "agree") + shadow_count(&metrics, "lost"),
        0.0
    );
    assert!(decisions(&server).iter().all(|l| l.get("shadow").is_none()));
    assert!(
        server
            .log()
            .contains("shadow policies (never enforced) failed to load")
    );
}

/// A shadow set broken by a reload keeps its last good version; the live set is untouched.
#[tokio::test]
async fn a_shadow_set_broken_on_reload_keeps_the_last_good_one() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(
        &signer,
        "shadow_dir = \"policies-next\"",
        "",
        &[("policies-next/next.cedar", FORBID_ALL)],
    );
    let alice = token(&signer, "alice", &["readers"]);
    assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    write_file(
        server.dir(),
        "policies-next/next.cedar",
        "forbid (principal,",
    );
    let reloaded = common::eventually(Duration::from_secs(10), || async {
        metric(
            &server.metrics().await,
            "portcullis_shadow_reloads_total{result=\"failure\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(reloaded, "no failed shadow reload:\n{}", server.log());
    for _ in 0..2 {
        assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    }
    let metrics = server.metrics().await;
    assert_eq!(shadow_count(&metrics, "lost"), 3.0, "{metrics}");
    assert_eq!(metric(&metrics, "portcullis_shadow_policies"), Some(1.0));
    let ready = server.http("GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // A good version again is taken.
    write_file(
        server.dir(),
        "policies-next/next.cedar",
        "@id(\"all\")\npermit (principal, action, resource);\n",
    );
    let taken = common::eventually(Duration::from_secs(10), || async {
        metric(
            &server.metrics().await,
            "portcullis_shadow_reloads_total{result=\"success\"}",
        ) == Some(2.0)
    })
    .await;
    assert!(
        taken,
        "the good shadow set was not reloaded:\n{}",
        server.log()
    );
    assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    assert_eq!(shadow_count(&server.metrics().await, "agree"), 1.0);
}

/// A shadow directory that is not there: `validate` fails, `serve` serves the live set.
#[tokio::test]
async fn a_missing_shadow_dir_does_not_stop_serve() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let server = serve(&signer, "shadow_dir = \"not-there\"", "", &[]);
    let alice = token(&signer, "alice", &["readers"]);
    assert!(allowed(&server.check(get("/orders", Some(&alice))).await));
    let ran = run_command(
        &["validate", "--config", "portcullis.toml"],
        server.dir(),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(ran.status.code(), Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("not-there"), "{}", ran.stderr);
}

/// A shadow set with a schema beside a live set without one: each sees the claims by its
/// own rule (docs/SCHEMA-AND-TIME.md), so no one request fits both and each is decided on
/// its own. The live set sees the token's undeclared `email`; the shadow set, validated
/// against a schema that declares no `email`, does not (`has email` is false, as its
/// validator said), and loses the allow.
#[tokio::test]
async fn a_shadow_set_with_a_schema_sees_only_declared_claims() {
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let mail = "@id(\"mail\")\npermit (principal, action == Action::\"GET\", resource == Path::\"/mail\")\nwhen { context has token && context.token.claims has email };\n";
    let schema = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/schema.cedarschema"),
    )
    .expect("the shipped schema");
    let server = serve(
        &signer,
        "shadow_dir = \"policies-next\"",
        "",
        &[
            ("policies/mail.cedar", mail),
            ("policies-next/mail.cedar", mail),
            ("policies-next/schema.cedarschema", &schema),
        ],
    );
    let alice = token(&signer, "alice", &[]);
    assert!(allowed(&server.check(get("/mail", Some(&alice))).await));
    let metrics = server.metrics().await;
    assert_eq!(shadow_count(&metrics, "lost"), 1.0, "{metrics}");
    assert_eq!(shadow_count(&metrics, "error"), 0.0, "{metrics}");
    let lines = decisions(&server);
    assert_eq!(lines[0]["shadow"]["outcome"], "lost", "{}", lines[0]);
}
