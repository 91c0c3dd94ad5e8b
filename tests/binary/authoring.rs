//! Trying and testing policies through the real binary: `portcullis token` (accepted by a
//! real server, its claims seen upstream; bound to a certificate; refusing any key
//! `portcullis demo` did not write), `check` on a request described on the command line,
//! `test --config` with whole-request cases (forged, expired and wrongly bound tokens are
//! 401s, never allows) and `fmt`.

use crate::common::binary::{Binary, run_command, write_file};
use portcullis::CheckResponse;
use portcullis::proto::envoy::service::auth::v3::check_response::HttpResponse;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// `portcullis ARGS` in `dir`: (exit code, stdout, stderr).
fn portcullis(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let ran = run_command(args, dir, Some("warn"), LIMIT);
    (ran.status.code(), ran.stdout, ran.stderr)
}

/// The shipped example laid out as in the repository (policies/, examples/), with fresh
/// demo material in demo/.
fn example() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_files(&repo().join("policies"), &tmp.path().join("policies"));
    copy_files(
        &repo().join("policies/tests"),
        &tmp.path().join("policies/tests"),
    );
    copy_files(&repo().join("examples"), &tmp.path().join("examples"));
    copy_files(
        &repo().join("examples/request-tests"),
        &tmp.path().join("examples/request-tests"),
    );
    let (code, _, err) = portcullis(tmp.path(), &["demo"]);
    assert_eq!(code, Some(0), "{err}");
    tmp
}

/// `portcullis token ARGS` in `dir`: the token.
fn token(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let (code, out, err) = portcullis(dir, &all);
    assert_eq!(code, Some(0), "token {args:?}: {err}");
    let token = out.trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{out:?}");
    token
}

/// The token with one character in the middle of its signature changed.
fn forge(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut sig: Vec<char> = sig.chars().collect();
    sig[10] = if sig[10] == 'A' { 'B' } else { 'A' };
    format!("{head}.{}", sig.into_iter().collect::<String>())
}

/// A JWT's payload.
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A configuration for a server on 127.0.0.1:0 over the example's demo material and
/// shipped policies, sending two claims upstream.
const SERVER: &str = r#"
[server]
grpc = "127.0.0.1:0"

[peer]
trust_bundle = "demo/ca.pem"
intermediates = "demo/intermediate.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "https://idp.example.org"
audiences = ["orders"]
jwks_file = "demo/idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"
groups_claim = "groups"
claim_headers = { "x-tier" = "tier", "x-email" = "email" }

[policy]
dir = "policies"
schema = "policies/schema.cedarschema"
entities = "policies/entities.json"

[response]
principal_header = "x-portcullis-principal"

[log]
audit = "stdout"
"#;

fn request(
    dir: &Path,
    token: Option<&str>,
    cert: Option<&str>,
) -> portcullis::proto::envoy::service::auth::v3::CheckRequest {
    portcullis::policytest::WholeRequest {
        method: "GET".into(),
        path: "/orders/42".into(),
        host: "api.example.org".into(),
        token: token.map(str::to_string),
        cert_pem: cert.map(|c| std::fs::read_to_string(dir.join(c)).unwrap()),
        ..Default::default()
    }
    .check_request()
    .unwrap()
}

fn upstream_headers(resp: &CheckResponse) -> Vec<(String, String)> {
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        other => panic!("not allowed: {other:?} {:?}", resp.status),
    }
}

fn denied_status(resp: &CheckResponse) -> (i32, i32) {
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => (
            resp.status.as_ref().map_or(0, |s| s.code),
            d.status.as_ref().map_or(0, |s| s.code),
        ),
        other => panic!("not denied: {other:?}"),
    }
}

#[tokio::test]
async fn a_minted_token_is_accepted_by_a_real_server_and_its_claims_go_upstream() {
    let tmp = example();
    let dir = tmp.path();
    // Defaults: the demo issuer and audience of examples/portcullis.toml.
    let alice = token(
        dir,
        &[
            "--sub",
            "alice",
            "--group",
            "order-readers",
            "--scope",
            "orders:read",
            "--claim",
            "tier=3",
            "--claim",
            "email=alice@example.org",
            "--ttl",
            "10m",
            "--bind",
            "demo/clients/frontend.pem",
        ],
    );
    let c = claims(&alice);
    assert_eq!(c["iss"], "https://idp.example.org");
    assert_eq!(c["aud"], "orders");
    assert_eq!(c["groups"], serde_json::json!(["order-readers"]));
    assert_eq!(c["tier"], 3);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    assert!(c["cnf"]["x5t#S256"].is_string(), "{c}");

    let server = Binary::start_in(tmp, SERVER);
    let dir = server.dir().to_path_buf();
    let resp = server
        .check(request(
            &dir,
            Some(&alice),
            Some("demo/clients/frontend.pem"),
        ))
        .await;
    let headers = upstream_headers(&resp);
    for expected in [
        ("x-portcullis-principal", "User::\"alice\""),
        ("x-tier", "3"),
        ("x-email", "alice@example.org"),
    ] {
        assert!(
            headers.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} not in {headers:?}"
        );
    }

    // The same bound token from another workload's certificate: refused (RFC 8705), 401.
    let resp = server
        .check(request(&dir, Some(&alice), Some("demo/clients/batch.pem")))
        .await;
    assert_eq!(denied_status(&resp), (16, 401));
    // And without any certificate.
    let resp = server.check(request(&dir, Some(&alice), None)).await;
    assert_eq!(denied_status(&resp), (16, 401));

    // Authenticated, but no permit for mallory: 403.
    let mallory = token(
        &dir,
        &[
            "--sub",
            "mallory",
            "--group",
            "guests",
            "--bind",
            "demo/clients/frontend.pem",
        ],
    );
    let resp = server
        .check(request(
            &dir,
            Some(&mallory),
            Some("demo/clients/frontend.pem"),
        ))
        .await;
    assert_eq!(denied_status(&resp), (7, 403));
}

#[test]
fn token_refuses_any_key_portcullis_demo_did_not_write() {
    let tmp = example();
    let dir = tmp.path();
    // A key of the same kind that `demo` did not write: a production key, say.
    let other = portcullis::demo::TokenSigner::generate(jsonwebtoken::Algorithm::ES256, "prod");
    write_file(dir, "prod/idp.key", &other.private_key_pem());

    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["token", "--sub", "alice"];
        all.extend_from_slice(args);
        let (code, out, err) = portcullis(dir, &all);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert_eq!(out, "", "{args:?}: a token was printed");
        assert!(err.contains("refused"), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        // The key itself is never shown.
        assert!(!err.contains("PRIVATE KEY"), "{err}");
    };
    // No manifest beside it.
    refused(&["--key", "prod/idp.key"], "demo-manifest.json");
    // A manifest copied beside it: it does not list this key's public key.
    std::fs::copy(
        dir.join("demo/demo-manifest.json"),
        dir.join("prod/demo-manifest.json"),
    )
    .unwrap();
    refused(&["--key", "prod/idp.key"], "lists no key named \"idp.key\"");
    std::fs::rename(dir.join("prod/idp.key"), dir.join("prod/idp.throwaway.key")).unwrap();
    refused(
        &["--key", "prod/idp.throwaway.key"],
        "its public key is not the one",
    );
    // The demo's key file replaced by another key, in the demo directory itself.
    std::fs::copy(
        dir.join("prod/idp.throwaway.key"),
        dir.join("demo/idp.throwaway.key"),
    )
    .unwrap();
    refused(&[], "its public key is not the one");
    // A manifest that is not one.
    write_file(dir, "prod/demo-manifest.json", "{\"keys\": []}");
    refused(
        &["--key", "prod/idp.throwaway.key"],
        "is not a demo manifest",
    );

    // A fresh demo's key is used; a bad --claim is an error, not a token.
    let (code, _, err) = portcullis(dir, &["demo"]);
    assert_eq!(code, Some(0), "{err}");
    token(dir, &["--sub", "alice", "--group", "admins"]);
    let (code, out, err) = portcullis(dir, &["token", "--sub", "a", "--claim", "novalue"]);
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert!(err.contains("expected KEY=VALUE"), "{err}");
}

#[test]
fn check_decides_a_request_described_on_the_command_line() {
    let tmp = example();
    let dir = tmp.path();
    let alice = token(
        dir,
        &[
            "--sub",
            "alice",
            "--group",
            "order-readers",
            "--bind",
            "demo/clients/frontend.pem",
        ],
    );
    write_file(dir, "alice.jwt", &format!("{alice}\n"));
    let config = "examples/portcullis.toml";
    let base = [
        "check",
        "--config",
        config,
        "--method",
        "get",
        "--path",
        "/orders/42",
        "--host",
        "api.example.org",
    ];
    let check = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        portcullis(dir, &args)
    };

    let (code, out, err) = check(&[
        "--token-file",
        "alice.jwt",
        "--cert",
        "demo/clients/frontend.pem",
        "--header",
        "x-request-id=r1",
        "--explain",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("decision:    ALLOW"), "{out}");
    assert!(out.contains("policies:    frontend-reads-orders"), "{out}");
    assert!(out.contains("bound to the presented certificate"), "{out}");
    // The explained reply shows an OK status's code, which proto3 JSON leaves out.
    assert!(out.contains("\"status\": {\n    \"code\": 0\n  }"), "{out}");
    assert!(!out.contains(&alice), "the token is never printed");

    // The same token presented from the batch workload: 401.
    let (code, out, _) = check(&["--token", &alice, "--cert", "demo/clients/batch.pem"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("decision:    DENY 401 invalid_token\n"),
        "{out}"
    );
    assert!(out.contains("bound to a different certificate"), "{out}");

    // Nothing presented: 401, said in words; authenticated without a permit: 403.
    let (code, out, _) = check(&[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("decision:    DENY 401 no_permit (no credential was presented)\n"),
        "{out}"
    );
    let (code, out, _) = check(&["--cert", "demo/clients/batch.pem"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("decision:    DENY 403 no_permit\n"), "{out}");

    // A tampered signature is refused, never decided on its claims.
    let forged = forge(&alice);
    let (code, out, _) = check(&["--token", &forged, "--cert", "demo/clients/frontend.pem"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("DENY 401 invalid_token"), "{out}");

    // Exactly one form of request.
    let (code, _, err) = portcullis(
        dir,
        &[
            "check",
            "--config",
            config,
            "--request",
            "demo/requests/anonymous.json",
            "--method",
            "GET",
            "--path",
            "/",
        ],
    );
    // A usage error exits 64, never 2: a mistyped flag must not read as a deny.
    assert_eq!(code, Some(64));
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = portcullis(dir, &["check", "--config", config]);
    assert_eq!(code, Some(64));
    assert!(
        err.contains("--request") && err.contains("--method"),
        "{err}"
    );
    let (code, _, err) = check(&["--header", "novalue"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--header \"novalue\": expected NAME=VALUE"),
        "{err}"
    );
    let (code, _, err) = check(&["--token", "x", "--header", "Authorization=Bearer y"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("give one or the other"), "{err}");
}

#[test]
fn every_command_describes_config() {
    let dir = repo();
    for command in ["serve", "check", "validate", "test"] {
        let (code, out, _) = portcullis(&dir, &[command, "--help"]);
        assert_eq!(code, Some(0));
        // The description, on the option's line or the next.
        let lines: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.contains("-c, --config <FILE>"))
            .take(2)
            .collect();
        assert!(
            lines.join(" ").contains("configuration file"),
            "{command}: --config undescribed:\n{out}"
        );
    }
}

/// Writes whole-request cases over the example's demo material into `dir/cases`.
/// `forged` is the expectation of the case presenting the forged token.
fn whole_request_cases(dir: &Path, alice: &str, forged: &str, forged_expect: &str) {
    // Past the token's expiry, within the certificate's validity (a day).
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(2 * 3600),
    );
    let cases = format!(
        r#"
[[case]]
name = "alice, bound token, frontend certificate"
method = "GET"
path = "/orders/42"
host = "api.example.org"
token_file = "alice.jwt"
cert_file = "../demo/clients/frontend.pem"
expect = "allow"
status = 200
policies = ["frontend-reads-orders"]

[[case]]
name = "alice's token from the batch workload"
method = "GET"
path = "/orders/42"
token = "{alice}"
cert_file = "../demo/clients/batch.pem"
expect = "deny"
status = 401
reason = "invalid_token"

[[case]]
name = "alice's token, expired by then"
method = "GET"
path = "/orders/42"
token_file = "alice.jwt"
cert_file = "../demo/clients/frontend.pem"
time = {later}
expect = "deny"
status = 401
reason = "invalid_token"

[[case]]
name = "a forged token"
method = "GET"
path = "/orders/42"
token = "{forged}"
cert_file = "../demo/clients/frontend.pem"
{forged_expect}

[[case]]
name = "the batch workload, no token"
method = "GET"
path = "/orders/42"
cert_file = "../demo/clients/batch.pem"
expect = "deny"
status = 403
reason = "no_permit"

[[case]]
name = "a post-verification case beside them"
method = "GET"
path = "/catalog/items"
peer = {{ spiffe_id = "spiffe://example.org/ns/prod/sa/batch" }}
expect = "allow"
"#
    );
    write_file(dir, "cases/requests.toml", &cases);
    write_file(dir, "cases/alice.jwt", alice);
}

#[test]
fn test_with_config_verifies_whole_requests_as_the_server_does() {
    let tmp = example();
    let dir = tmp.path();
    let alice = token(
        dir,
        &[
            "--sub",
            "alice",
            "--group",
            "order-readers",
            "--bind",
            "demo/clients/frontend.pem",
        ],
    );
    let forged = forge(&alice);
    let deny = "expect = \"deny\"\nstatus = 401\nreason = \"invalid_token\"";
    whole_request_cases(dir, &alice, &forged, deny);
    let config = [
        "test",
        "--config",
        "examples/portcullis.toml",
        "--cases",
        "cases",
    ];

    let (code, out, err) = portcullis(dir, &config);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.ends_with("6 passed, 0 failed\n"), "{out}");

    // Expecting the forged token to be let through fails: it was refused (a runner that
    // skipped verification would pass it).
    whole_request_cases(dir, &alice, &forged, "expect = \"allow\"\nstatus = 200");
    let (code, out, err) = portcullis(dir, &config);
    assert_eq!(code, Some(2), "{out}{err}");
    let fail: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 1, "{out}");
    assert!(
        fail[0].contains(
            "a forged token: expected allow 200, got deny 401 invalid_token by [] (token: "
        ),
        "{out}"
    );

    // Without --config a whole request cannot be verified: an error naming the case.
    whole_request_cases(dir, &alice, &forged, deny);
    let (code, out, err) = portcullis(dir, &["test", "policies", "--cases", "cases"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("case \"alice, bound token, frontend certificate\": a whole request")
            && err.contains("--config"),
        "{err}"
    );
    assert!(!out.contains("passed"), "{out}");

    // The shipped whole-request examples pass on fresh demo material.
    let (code, out, err) = portcullis(
        dir,
        &[
            "test",
            "--config",
            "examples/portcullis.toml",
            "--cases",
            "examples/request-tests",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.ends_with("5 passed, 0 failed\n"), "{out}");

    // The shipped cases pass as before, alone and with the configuration.
    let (code, out, err) = portcullis(dir, &["test", "policies"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = portcullis(dir, &["test", "--config", "examples/portcullis.toml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.ends_with("29 passed, 0 failed\n"), "{out}");
}

#[test]
fn fmt_formats_in_place_keeps_comments_and_mode_and_checks() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let messy = "// Who may read.\n@id(\"read\")\npermit(principal,action==Action::\"GET\",resource) // any resource\nwhen {context.request.path like \"/public/*\"};\n// trailing note\n";
    write_file(dir, "p/a.cedar", messy);
    std::fs::set_permissions(
        dir.join("p/a.cedar"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    write_file(dir, "p/b.cedar", "permit (principal, action, resource);\n");

    let (code, out, err) = portcullis(dir, &["fmt", "--check", "p"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(1), "would reformat p/a.cedar\n"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("p/a.cedar")).unwrap(),
        messy
    );

    let (code, out, err) = portcullis(dir, &["fmt", "p"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "formatted p/a.cedar\n"),
        "{err}"
    );
    let formatted = std::fs::read_to_string(dir.join("p/a.cedar")).unwrap();
    for comment in ["// Who may read.", "// any resource", "// trailing note"] {
        assert!(
            formatted.contains(comment),
            "{comment:?} lost:\n{formatted}"
        );
    }
    assert!(
        formatted.contains("action == Action::\"GET\""),
        "{formatted}"
    );
    let mode = std::fs::metadata(dir.join("p/a.cedar"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    // No temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(dir.join("p"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let (code, out, _) = portcullis(dir, &["fmt", "--check", "p/a.cedar", "p/b.cedar"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));

    // A file that does not parse is reported and left as it is.
    write_file(dir, "p/c.cedar", "permit (principal, action resource);\n");
    let (code, _, err) = portcullis(dir, &["fmt", "p"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("p/c.cedar: cannot format"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("p/c.cedar")).unwrap(),
        "permit (principal, action resource);\n"
    );
}

#[test]
fn the_shipped_policies_are_formatted() {
    let (code, out, err) = portcullis(&repo(), &["fmt", "--check", "policies"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// `token --at` and `check --at` try a time-bound policy at any time: the shipped
/// business-hours policy (09:00 to 18:00 in Paris, Monday to Friday) allows an analyst on a
/// Monday at 10:05 and denies at 22:05, with a token issued at 10:00 and 22:00. A token
/// issued at 10:00 is expired at 22:05: `--at` moves the whole decision, not only
/// `context.time`. An empty token file is an error, never "no token"; a usage error exits
/// 64, never 2 (a deny).
#[test]
fn check_and_token_at_a_given_time() {
    let tmp = example();
    let dir = tmp.path();
    let config = "examples/portcullis.toml";
    let at = |token: &str, time: &str| {
        portcullis(
            dir,
            &[
                "check",
                "--config",
                config,
                "--method",
                "GET",
                "--path",
                "/reports/q3",
                "--token",
                token,
                "--at",
                time,
            ],
        )
    };
    let morning = token(
        dir,
        &[
            "--sub",
            "ann",
            "--group",
            "analysts",
            "--at",
            "2026-12-07T10:00:00+01:00",
        ],
    );
    let (code, out, err) = at(&morning, "2026-12-07T10:05:00+01:00");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("policies:    analysts-read-reports-in-business-hours"),
        "{out}"
    );
    let (code, out, _) = at(&morning, "2026-12-07T22:05:00+01:00");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("token has expired"), "{out}");
    let evening = token(
        dir,
        &[
            "--sub",
            "ann",
            "--group",
            "analysts",
            "--at",
            "2026-12-07T22:00:00+01:00",
        ],
    );
    let (code, out, _) = at(&evening, "2026-12-07T22:05:00+01:00");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("decision:    DENY 403 no_permit"), "{out}");

    let (code, _, err) = at(&morning, "2026-12-07 10:05");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not an RFC 3339 time with an offset"), "{err}");

    std::fs::write(dir.join("empty.jwt"), "").unwrap();
    let (code, _, err) = portcullis(
        dir,
        &[
            "check",
            "--config",
            config,
            "--method",
            "GET",
            "--path",
            "/x",
            "--token-file",
            "empty.jwt",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("empty.jwt: the token file is empty"), "{err}");
}
