//! Issue 14 through the real binary: `portcullis schema` prints a schema that validates the
//! shipped policies (and is the shipped schema); `validate` names the declaration an
//! undeclared claim needs, and points at a bad time zone's line; a business-hours policy
//! decides by `context.time` at fixed times (`portcullis test` cases, and `check` of a
//! request carrying Envoy's `attributes.request.time`); a claim of another type than
//! declared denies, with the reason.

use crate::common::binary::{run, run_command};
use portcullis::demo::{DEMO_AUDIENCE, DEMO_ISSUER, TokenSigner, check_request_json};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("directory");
    for entry in std::fs::read_dir(from).expect("readable") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
}

/// The shipped example laid out as in the repository, with fresh demo material.
fn example() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temporary directory");
    copy_dir(&repo().join("policies"), &tmp.path().join("policies"));
    copy_dir(
        &repo().join("policies/tests"),
        &tmp.path().join("policies/tests"),
    );
    copy_dir(&repo().join("examples"), &tmp.path().join("examples"));
    let (code, out) = run(&["demo", "--out", "demo"], tmp.path(), LIMIT);
    assert_eq!(code, Some(0), "{out}");
    tmp
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("readable");
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("written");
}

#[test]
fn the_printed_schema_is_the_shipped_one_and_validates_the_shipped_policies() {
    let tmp = example();
    let ran = run_command(
        &["schema", "--config", "examples/portcullis.toml"],
        tmp.path(),
        None,
        LIMIT,
    );
    assert!(ran.status.success(), "{}", ran.stderr);
    let shipped = std::fs::read_to_string(repo().join("policies/schema.cedarschema"))
        .expect("shipped schema");
    assert_eq!(
        ran.stdout, shipped,
        "policies/schema.cedarschema is not what `portcullis schema --config examples/portcullis.toml` prints"
    );
    for needle in [
        "department?: String,",
        "level?: Long,",
        "roles?: Set<String>,",
        "verified?: Bool,",
        "now: datetime,",
        "time: TimeInfo,",
        "\"user-agent\"?: String,",
    ] {
        assert!(
            ran.stdout.contains(needle),
            "missing {needle:?}:\n{}",
            ran.stdout
        );
    }
    // The printed schema, used as the configuration's schema, validates the policies.
    std::fs::write(tmp.path().join("x.cedarschema"), &ran.stdout).expect("written");
    let config = tmp.path().join("examples/portcullis.toml");
    edit(
        &config,
        "schema = \"../policies/schema.cedarschema\"",
        "schema = \"../x.cedarschema\"",
    );
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("schema validated strictly"), "{out}");
    // And it still refuses what it should: a policy reading an undeclared claim.
    std::fs::write(
        tmp.path().join("policies/extra.cedar"),
        "permit (principal, action, resource)\nwhen { context has token && context.token.claims.shoe_size > 40 };\n",
    )
    .expect("written");
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(1), "{out}");
}

#[test]
fn a_policy_reading_an_undeclared_claim_is_told_what_to_declare() {
    let tmp = example();
    std::fs::write(
        tmp.path().join("policies/teams.cedar"),
        "// Teams.\n@id(\"team-a\")\npermit (principal, action, resource)\nwhen {\n  context has token &&\n  context.token.claims.team == \"a\"\n};\n",
    )
    .expect("written");
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("1 problem(s)"),
        "one problem, not one per action:\n{out}"
    );
    assert!(out.contains("teams.cedar:6:"), "the policy's line:\n{out}");
    assert!(
        out.contains(
            "the policy reads context.token.claims.team: declare it with `[issuer.claims] team = \"String\"`"
        ),
        "{out}"
    );
    assert!(
        out.contains("(`portcullis schema --config FILE` prints one)"),
        "{out}"
    );
    // Declared in the configuration, printed into the schema, read after a presence test
    // (a token may lack it): valid.
    edit(
        &tmp.path().join("policies/teams.cedar"),
        "context has token &&",
        "context has token && context.token.claims has team &&",
    );
    edit(
        &tmp.path().join("examples/portcullis.toml"),
        "[issuer.claims]\n",
        "[issuer.claims]\nteam = \"String\"\n",
    );
    let ran = run_command(
        &["schema", "--config", "examples/portcullis.toml"],
        tmp.path(),
        None,
        LIMIT,
    );
    assert!(ran.status.success(), "{}", ran.stderr);
    std::fs::write(tmp.path().join("policies/schema.cedarschema"), &ran.stdout).expect("written");
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn a_bad_time_zone_or_claim_type_fails_validate_at_its_line() {
    let tmp = example();
    let config = tmp.path().join("examples/portcullis.toml");
    edit(
        &config,
        "time_zone = \"Europe/Paris\"",
        "time_zone = \"Europe/Atlantis\"",
    );
    let line = std::fs::read_to_string(&config)
        .expect("config")
        .lines()
        .position(|l| l.contains("Europe/Atlantis"))
        .expect("the line")
        + 1;
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("examples/portcullis.toml:{line}:")),
        "line {line}:\n{out}"
    );
    assert!(
        out.contains("\"Europe/Atlantis\" is not a time zone of the tz database"),
        "{out}"
    );
    // `schema` reads the same configuration, and refuses it the same way.
    let (code, _) = run(
        &["schema", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(1));

    edit(
        &config,
        "time_zone = \"Europe/Atlantis\"",
        "time_zone = \"Europe/Paris\"",
    );
    edit(&config, "level = \"Long\"", "level = \"Integer\"");
    let (code, out) = run(
        &["validate", "--config", "examples/portcullis.toml"],
        tmp.path(),
        LIMIT,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("\"Integer\" is not a claim type"), "{out}");
}

#[test]
fn business_hours_by_policy_test_cases() {
    let tmp = example();
    let (code, out) = run(&["test", "policies"], tmp.path(), LIMIT);
    assert_eq!(code, Some(0), "{out}");
    for case in [
        "ok  policies/tests/hours.toml: an analyst reads a report on a Thursday at 10:00 in Paris",
        "ok  policies/tests/hours.toml: an analyst reads a report on a Thursday at 22:00 in Paris",
        "ok  policies/tests/hours.toml: an analyst reads a report on a Sunday at 10:00 in Paris",
    ] {
        assert!(out.contains(case), "{case}:\n{out}");
    }
    // A case expecting an allow at 22:00 fails, and says why.
    edit(
        &tmp.path().join("policies/tests/hours.toml"),
        "time = \"2026-12-03T22:00:00+01:00\"\ntime_zone = \"Europe/Paris\"\nexpect = \"deny\"",
        "time = \"2026-12-03T22:00:00+01:00\"\ntime_zone = \"Europe/Paris\"\nexpect = \"allow\"",
    );
    let (code, out) = run(&["test", "policies"], tmp.path(), LIMIT);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("FAIL policies/tests/hours.toml: an analyst reads a report on a Thursday at 22:00 in Paris: expected allow"),
        "{out}"
    );
    // An unknown zone in a case is refused.
    edit(
        &tmp.path().join("policies/tests/hours.toml"),
        "time = \"2026-12-03T18:00:00+01:00\"\ntime_zone = \"Europe/Paris\"",
        "time = \"2026-12-03T18:00:00+01:00\"\ntime_zone = \"Mars/Olympus\"",
    );
    let (code, out) = run(&["test", "policies"], tmp.path(), LIMIT);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "case \"18:00 in Paris is closed\": time_zone: \"Mars/Olympus\" is not a time zone"
        ),
        "{out}"
    );
    // A time without an offset is refused with the case's line.
    edit(
        &tmp.path().join("policies/tests/hours.toml"),
        "time = \"2026-12-03T10:00:00+01:00\"",
        "time = \"2026-12-03 10:00\"",
    );
    let (code, out) = run(&["test", "policies"], tmp.path(), LIMIT);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("time = 2026-12-03 10:00: not an RFC 3339 time with an offset"),
        "{out}"
    );
}

/// A world of its own for `check`: its own token signer (tokens valid at the fixed times),
/// the business-hours policy, `time_zone = "Europe/Paris"`, a declared `level` claim, and
/// the schema `portcullis schema` prints for it.
struct World {
    dir: tempfile::TempDir,
    signer: TokenSigner,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let signer = TokenSigner::generate(jsonwebtoken::Algorithm::ES256, "k1");
        let p = dir.path();
        std::fs::write(p.join("jwks.json"), portcullis::demo::jwks(&[&signer])).expect("jwks");
        std::fs::create_dir(p.join("policies")).expect("policies");
        std::fs::copy(
            repo().join("policies/hours.cedar"),
            p.join("policies/hours.cedar"),
        )
        .expect("policy");
        std::fs::write(
            p.join("policies/levels.cedar"),
            "@id(\"level-3-reads-levels\")\npermit (principal, action == Action::\"GET\", resource == Path::\"/levels\")\nwhen { context has token && context.token.claims has level && context.token.claims.level >= 3 };\n",
        )
        .expect("policy");
        std::fs::write(
            p.join("portcullis.toml"),
            format!(
                "[[issuer]]\nissuer = \"{DEMO_ISSUER}\"\naudiences = [\"{DEMO_AUDIENCE}\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\nmax_lifetime = \"1h\"\n\n[issuer.claims]\nlevel = \"Long\"\n\n[policy]\ndir = \"policies\"\nschema = \"policies/schema.cedarschema\"\ntime_zone = \"Europe/Paris\"\n\n[log]\naudit = \"stderr\"\n"
            ),
        )
        .expect("config");
        let ran = run_command(&["schema", "--config", "portcullis.toml"], p, None, LIMIT);
        assert!(ran.status.success(), "{}", ran.stderr);
        std::fs::write(p.join("policies/schema.cedarschema"), &ran.stdout).expect("schema");
        let (code, out) = run(&["validate", "--config", "portcullis.toml"], p, LIMIT);
        assert_eq!(code, Some(0), "{out}");
        World { dir, signer }
    }

    /// `check --explain` of a request at `time` (RFC 3339) with a token valid then.
    fn check(&self, path: &str, time: &str, extra: serde_json::Value) -> (Option<i32>, String) {
        let at: i64 = time.parse::<jiff::Timestamp>().expect("a time").as_second();
        let mut claims = json!({
            "iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "sub": "ann", "iat": at - 60,
            "exp": at + 600, "groups": ["analysts"],
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            claims[k] = v.clone();
        }
        let token = self.signer.sign(&claims);
        let mut request = check_request_json("GET", path, None, Some(&token));
        request["attributes"]["request"]["time"] = json!(time);
        let file = self.dir.path().join("request.json");
        std::fs::write(&file, request.to_string()).expect("request");
        run(
            &[
                "check",
                "--config",
                "portcullis.toml",
                "--request",
                "request.json",
                "--explain",
            ],
            self.dir.path(),
            LIMIT,
        )
    }
}

#[test]
fn check_decides_business_hours_at_the_requests_own_time() {
    let w = World::new();
    // Thursday 3 December 2026, 10:00 in Paris (09:00 UTC).
    let (code, out) = w.check("/reports/q3", "2026-12-03T09:00:00Z", json!({}));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("decision:    ALLOW"), "{out}");
    assert!(
        out.contains("policies:    analysts-read-reports-in-business-hours"),
        "{out}"
    );
    for needle in [
        "\"day_of_week\": \"Thu\"",
        "\"hour\": 10",
        "\"time_zone\": \"Europe/Paris\"",
        "\"arg\": \"2026-12-03T09:00:00.000Z\"",
    ] {
        assert!(out.contains(needle), "missing {needle:?}:\n{out}");
    }
    // 22:00 in Paris: closed.
    let (code, out) = w.check("/reports/q3", "2026-12-03T21:00:00Z", json!({}));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no permit policy matched"), "{out}");
    // Sunday 10:00 in Paris: closed.
    let (code, out) = w.check("/reports/q3", "2026-12-06T09:00:00Z", json!({}));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("\"day_of_week\": \"Sun\""), "{out}");
    // The same time decides the token's expiry: a token that expired before the
    // request's time is refused, though it is valid at the time of the run.
    let token_then = w.check(
        "/reports/q3",
        "2026-12-03T09:00:00Z",
        json!({"exp": 1_796_288_000}),
    );
    assert_eq!(token_then.0, Some(2), "{}", token_then.1);
    assert!(
        token_then.1.contains("token: token has expired"),
        "{}",
        token_then.1
    );
}

#[test]
fn a_claim_of_another_type_than_declared_denies_with_the_reason() {
    let w = World::new();
    let at = "2026-12-03T09:00:00Z";
    let (code, out) = w.check("/levels", at, json!({"level": 3}));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("level-3-reads-levels"), "{out}");
    // SECURITY: "3" is not the Long 3, and 3.0 is not a Long either; neither is read as
    // absent: the token is refused.
    for (bad, kind) in [
        (json!("3"), "a string"),
        (json!(3.0), "a non-integer number"),
        (json!([3]), "an array (of another item type)"),
    ] {
        let (code, out) = w.check("/levels", at, json!({ "level": bad }));
        assert_eq!(code, Some(2), "{bad}: {out}");
        assert!(
            out.contains("decision:    DENY 401 invalid_token"),
            "{bad}: {out}"
        );
        assert!(
            out.contains(&format!(
                "reason:      token: claim \"level\" is {kind}, but the configuration declares it Long ([issuer.claims])"
            )),
            "{bad}: {out}"
        );
    }
    // Below the level: denied by the policy, not the type check.
    let (code, out) = w.check("/levels", at, json!({"level": 2}));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no permit policy matched"), "{out}");
}

/// With a schema, `context.token.claims` holds only the declared claims, so run time agrees
/// with the validator. The schema's claims record is closed: Cedar types `has team` of the
/// undeclared `team` as false, so this `forbid ... unless` validates and always fires.
/// SECURITY: a token that carries `team` must be forbidden as the validator reasoned;
/// with every claim in the context (the filter removed) the permit would let it through.
#[test]
fn with_a_schema_an_undeclared_claim_is_absent_as_the_validator_says() {
    let w = World::new();
    std::fs::write(
        w.dir.path().join("policies/teams.cedar"),
        "@id(\"levels-need-a-team\")\nforbid (principal, action == Action::\"GET\", resource == Path::\"/levels\")\nunless { context has token && context.token.claims has team };\n",
    )
    .expect("policy");
    let (code, out) = run(
        &["validate", "--config", "portcullis.toml"],
        w.dir.path(),
        LIMIT,
    );
    assert_eq!(
        code,
        Some(0),
        "the policy validates against the schema: {out}"
    );
    let at = "2026-12-03T09:00:00Z";
    let (code, out) = w.check("/levels", at, json!({"level": 3, "team": "a"}));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("reason:      forbidden by levels-need-a-team"),
        "{out}"
    );
    // `check --explain` shows the context as policies see it: the declared claim, not the
    // undeclared one (the token's other claims too are left out).
    assert!(out.contains("\"level\": 3"), "{out}");
    assert!(!out.contains("\"team\""), "{out}");
    assert!(!out.contains("\"iat\""), "{out}");
    // Without a schema, every claim is there, as before: the token's team is seen.
    edit(
        &w.dir.path().join("portcullis.toml"),
        "schema = \"policies/schema.cedarschema\"\n",
        "",
    );
    let (code, out) = w.check("/levels", at, json!({"level": 3, "team": "a"}));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("level-3-reads-levels"), "{out}");
    assert!(out.contains("\"team\": \"a\""), "{out}");
}
