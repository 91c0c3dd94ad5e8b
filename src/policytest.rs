//! Policy tests (`portcullis test DIR`): a policy directory (`DIR/*.cedar`, optional
//! `DIR/schema.cedarschema` and `DIR/entities.json`) and its test cases (`DIR/tests/*.toml`)
//! in; a [`Report`] with one line per case out, or every problem that kept the policies or
//! the cases from loading, each with file and line.
//!
//! A case states what a request would look like *after* verification: HTTP facts plus the
//! verified certificate identity and token claims (never a real certificate or token). The
//! runner builds [`RequestFacts`] and an [`Identity`] from it and asks
//! `PolicySnapshot::evaluate`, so the decision comes from the production mapping and
//! evaluation, with the engine's fail-closed reading: allowed only when Cedar allowed and
//! no policy errored.

use crate::config::{PolicySettings, line_col};
use crate::facts::RequestFacts;
use crate::identity::{Identity, PeerIdentity, PeerOutcome, TokenClaims, TokenOutcome};
use crate::policy::{PolicyOutcome, PolicySnapshot};
use crate::problem::{LoadError, Problem};
use crate::spiffe::SpiffeId;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The claim a test token's groups are written to; [`TokenClaims::for_policy_test`] reads
/// the groups back from it.
const GROUPS_CLAIM: &str = "groups";
/// Headers a case may not set: a case states verified credentials as `token` and `peer`
/// (and pseudo-headers as `method`, `path` and `host`).
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// The outcome of a test run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// One line per case, in file then case order: `ok  <file>: <name>` or
    /// `FAIL <file>: <name>: expected <...>, got <...>`.
    pub lines: Vec<String>,
}

impl Report {
    /// The closing line: `N passed, M failed`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

/// One test file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(rename = "case", default)]
    cases: Vec<Spanned<CaseSpec>>,
}

/// The same file read loosely, only to name the case a parse error falls in.
#[derive(Debug, Deserialize)]
struct LooseFile {
    #[serde(rename = "case", default)]
    cases: Vec<Spanned<toml::Table>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseSpec {
    name: String,
    method: String,
    /// The request path, optionally with `?query`.
    path: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    scheme: String,
    #[serde(default)]
    source_address: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    token: Option<TokenSpec>,
    peer: Option<PeerSpec>,
    expect: Expect,
    /// The exact set of determining policy ids, when the case cares.
    policies: Option<Vec<String>>,
    /// The request time, RFC 3339 with an offset (`2026-12-03T10:00:00+01:00`); the time
    /// of the run when not given.
    time: Option<String>,
    /// The zone of `context.time`'s local fields (as `[policy] time_zone`); UTC by default.
    time_zone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpec {
    issuer: String,
    subject: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    audience: Vec<String>,
    /// The token's `cnf.x5t#S256` matched the case's peer certificate (RFC 8705).
    #[serde(default)]
    bound: bool,
    /// Any other claims.
    #[serde(default)]
    claims: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSpec {
    spiffe_id: Option<String>,
    #[serde(default)]
    dns_sans: Vec<String>,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    issuer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl Expect {
    fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        }
    }
}

/// A case ready to evaluate.
#[derive(Debug)]
struct Case {
    file: String,
    name: String,
    facts: RequestFacts,
    identity: Identity,
    expect: Expect,
    policies: Option<BTreeSet<String>>,
    /// `file:line` of the case, for problems found after parsing.
    at: String,
    /// The request time.
    now: std::time::SystemTime,
    /// The zone of `context.time`'s local fields.
    zone: std::sync::Arc<crate::declared::TimeZoneSetting>,
}

/// Loads the policies in `dir` and runs every case in `dir/tests/*.toml` against them.
/// `Err` lists every problem that kept the policies or the cases from loading.
pub fn run_dir(dir: &Path) -> Result<Report, LoadError> {
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let settings = PolicySettings {
        dir: dir.to_path_buf(),
        schema: optional("schema.cedarschema"),
        entities: optional("entities.json"),
        hidden_headers: Vec::new(),
        time_zone: Default::default(),
    };
    let mut problems = Vec::new();
    let snapshot = crate::policy::load(&settings)
        .map_err(|errs| problems.extend(errs.iter().map(Problem::to_string)))
        .ok();
    let cases = load_cases(&dir.join("tests"), &mut problems);
    if let Some(snapshot) = &snapshot {
        check_policy_ids(snapshot, &cases, &mut problems);
    }
    match snapshot {
        Some(snapshot) if problems.is_empty() => Ok(run(&snapshot, &cases)),
        _ => Err(LoadError::new(
            format!("loading {}", dir.display()),
            problems.into_iter().map(Problem::new).collect(),
        )),
    }
}

fn run(snapshot: &PolicySnapshot, cases: &[Case]) -> Report {
    let mut report = Report::default();
    for case in cases {
        let outcome = snapshot.evaluate_in(&case.facts, &case.identity, case.now, &case.zone);
        // SECURITY: the engine's reading of an outcome; an evaluation error is a deny.
        let allowed = outcome.allowed && outcome.errors.is_empty();
        let decision_ok = allowed == (case.expect == Expect::Allow);
        let policies_ok = case.policies.as_ref().is_none_or(|expected| {
            let actual: BTreeSet<String> = outcome.determining.iter().cloned().collect();
            *expected == actual
        });
        if decision_ok && policies_ok {
            report.passed += 1;
            let note = if outcome.errors.is_empty() {
                String::new()
            } else {
                format!(
                    " (denied by evaluation error: {})",
                    outcome.errors.join("; ")
                )
            };
            report
                .lines
                .push(format!("ok  {}: {}{note}", case.file, case.name));
        } else {
            report.failed += 1;
            let expected = match &case.policies {
                Some(ids) => format!("{} by {}", case.expect.as_str(), list(ids)),
                None => case.expect.as_str().to_string(),
            };
            report.lines.push(format!(
                "FAIL {}: {}: expected {expected}, got {}",
                case.file,
                case.name,
                describe(allowed, &outcome)
            ));
        }
    }
    report
}

/// What happened, in the engine's terms (`src/engine.rs` gives the same three deny reasons).
fn describe(allowed: bool, outcome: &PolicyOutcome) -> String {
    let by = list(&outcome.determining);
    if allowed {
        format!("allow by {by}")
    } else if !outcome.errors.is_empty() {
        format!(
            "deny by {by} (an evaluation error forces a deny: {})",
            outcome.errors.join("; ")
        )
    } else if outcome.determining.is_empty() {
        format!("deny by {by} (no permit matched)")
    } else {
        format!("deny by {by} (forbid matched)")
    }
}

fn list<'a>(ids: impl IntoIterator<Item = &'a String>) -> String {
    let ids: Vec<&str> = ids.into_iter().map(String::as_str).collect();
    format!("[{}]", ids.join(", "))
}

/// An expected id that no policy has can never match; say so instead of failing the case.
fn check_policy_ids(snapshot: &PolicySnapshot, cases: &[Case], problems: &mut Vec<String>) {
    let known: BTreeSet<String> = snapshot
        .policies
        .policies()
        .map(|p| p.id().to_string())
        .collect();
    for case in cases {
        for id in case.policies.iter().flatten() {
            if !known.contains(id) {
                problems.push(format!(
                    "{}: case \"{}\": no policy has id \"{id}\" (known: {})",
                    case.at,
                    case.name,
                    list(&known)
                ));
            }
        }
    }
}

fn load_cases(tests: &Path, problems: &mut Vec<String>) -> Vec<Case> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(tests) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(e) => {
            problems.push(format!(
                "{}: cannot read the test directory: {e}",
                tests.display()
            ));
            return Vec::new();
        }
    };
    files.sort();
    // SECURITY: a run that tests nothing must not look like a pass.
    if files.is_empty() {
        problems.push(format!("{}: no *.toml test files", tests.display()));
    }
    let mut cases = Vec::new();
    for file in files {
        // A regular file within the size cap: a FIFO among the tests must not hang the run.
        match crate::files::read_to_string(&file) {
            Ok(text) => cases.extend(parse_file(&file.display().to_string(), &text, problems)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    cases
}

fn parse_file(file: &str, text: &str, problems: &mut Vec<String>) -> Vec<Case> {
    let parsed: CaseFile = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            problems.push(parse_error(file, text, &e));
            return Vec::new();
        }
    };
    if parsed.cases.is_empty() {
        problems.push(format!("{file}: no [[case]] tables"));
    }
    let mut names = BTreeSet::new();
    let mut cases = Vec::new();
    for spanned in parsed.cases {
        let (line, _) = line_col(text, spanned.span().start);
        let at = format!("{file}:{line}");
        let spec = spanned.into_inner();
        if !names.insert(spec.name.clone()) {
            problems.push(format!(
                "{at}: case \"{}\": another case in this file has the same name",
                spec.name
            ));
        }
        let name = spec.name.clone();
        match build(spec, file, at.clone()) {
            Ok(case) => cases.push(case),
            Err(errs) => problems.extend(
                errs.into_iter()
                    .map(|e| format!("{at}: case \"{name}\": {e}")),
            ),
        }
    }
    cases
}

/// `file:line:col: [case "name": ]message`, naming the case the error falls in when the
/// file is at least well-formed TOML.
fn parse_error(file: &str, text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end_matches('\n');
    let Some(span) = e.span() else {
        return format!("{file}: {message}");
    };
    let (line, col) = line_col(text, span.start);
    // Each case's span starts at its `[[case]]` header (or inline table), in document order,
    // so the error belongs to the last case starting at or before it.
    let case = toml::from_str::<LooseFile>(text).ok().and_then(|loose| {
        loose
            .cases
            .iter()
            .rev()
            .find(|c| c.span().start <= span.start)
            .map(
                |c| match c.get_ref().get("name").and_then(toml::Value::as_str) {
                    Some(name) => format!("case \"{name}\": "),
                    None => "case without a name: ".to_string(),
                },
            )
    });
    format!("{file}:{line}:{col}: {}{message}", case.unwrap_or_default())
}

/// Turns a parsed case into request facts and a verified identity, or says what is wrong.
fn build(spec: CaseSpec, file: &str, at: String) -> Result<Case, Vec<String>> {
    let mut errs = Vec::new();
    if spec.name.trim().is_empty() {
        errs.push("name must not be empty".to_string());
    }
    if spec.method.trim().is_empty() {
        errs.push("method must not be empty".to_string());
    }
    if spec.path.is_empty() {
        errs.push("path must not be empty".to_string());
    }
    // As the facts stage splits Envoy's `:path`.
    let (path, query) = match spec.path.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (spec.path.clone(), String::new()),
    };
    let mut headers = BTreeMap::new();
    for (name, value) in spec.headers {
        let lower = name.to_ascii_lowercase();
        if CREDENTIAL_HEADERS.contains(&lower.as_str()) {
            errs.push(format!(
                "header \"{name}\": credentials are never visible to policies; state the verified identity with `token` and `peer`"
            ));
        } else if lower.starts_with(':') {
            errs.push(format!(
                "header \"{name}\": pseudo-headers are given by `method`, `path` and `host`"
            ));
        } else if headers.insert(lower, value).is_some() {
            errs.push(format!(
                "header \"{name}\" is given twice (names are case-insensitive)"
            ));
        }
    }

    let now = match spec.time.as_deref().map(str::parse::<jiff::Timestamp>) {
        None => std::time::SystemTime::now(),
        Some(Ok(t)) => {
            let since = std::time::Duration::new(
                t.as_second().unsigned_abs(),
                t.subsec_nanosecond().unsigned_abs(),
            );
            // Before 1970: far from any token's validity, but still a time.
            if t.as_second() >= 0 {
                std::time::SystemTime::UNIX_EPOCH + since
            } else {
                std::time::SystemTime::UNIX_EPOCH - since
            }
        }
        Some(Err(_)) => {
            errs.push(format!(
                "time: \"{}\" is not an RFC 3339 time with an offset, such as \"2026-12-03T10:00:00+01:00\"",
                spec.time.unwrap_or_default()
            ));
            std::time::SystemTime::UNIX_EPOCH
        }
    };
    let zone = match spec
        .time_zone
        .as_deref()
        .map(crate::declared::TimeZoneSetting::parse)
    {
        None => Default::default(),
        Some(Ok(z)) => z,
        Some(Err(e)) => {
            errs.push(format!("time_zone: {e}"));
            Default::default()
        }
    };
    let peer_given = spec.peer.is_some();
    let peer = spec.peer.and_then(|p| peer_identity(p, &mut errs));
    let token = spec
        .token
        .and_then(|t| token_claims(t, peer.as_ref(), peer_given, &mut errs));

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Case {
        file: file.to_string(),
        name: spec.name,
        facts: RequestFacts {
            method: spec.method.to_ascii_uppercase(),
            path,
            query,
            host: spec.host,
            scheme: spec.scheme,
            headers,
            source_address: spec.source_address,
            ..RequestFacts::default()
        },
        identity: Identity {
            peer: match peer {
                Some(p) => PeerOutcome::Verified(std::sync::Arc::new(p)),
                None => PeerOutcome::NotPresented,
            },
            token: match token {
                Some(t) => TokenOutcome::Verified(t),
                None => TokenOutcome::NotPresented,
            },
        },
        expect: spec.expect,
        policies: spec.policies.map(|ids| ids.into_iter().collect()),
        at,
        now,
        zone: std::sync::Arc::new(zone),
    })
}

fn peer_identity(spec: PeerSpec, errs: &mut Vec<String>) -> Option<PeerIdentity> {
    let spiffe_id = match spec.spiffe_id.as_deref().map(SpiffeId::try_from) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(e)) => {
            errs.push(format!("peer.spiffe_id: {e}"));
            return None;
        }
    };
    if spiffe_id.is_none() && spec.dns_sans.is_empty() && spec.subject.is_empty() {
        errs.push("peer needs a spiffe_id, dns_sans or a subject to name the workload".into());
        return None;
    }
    Some(PeerIdentity::for_policy_test(
        spiffe_id,
        spec.dns_sans,
        spec.subject,
        spec.issuer,
    ))
}

fn token_claims(
    spec: TokenSpec,
    peer: Option<&PeerIdentity>,
    peer_given: bool,
    errs: &mut Vec<String>,
) -> Option<TokenClaims> {
    let before = errs.len();
    if spec.issuer.is_empty() {
        errs.push("token.issuer must not be empty".into());
    }
    if spec.subject.is_empty() {
        errs.push("token.subject must not be empty".into());
    }
    // Claims the other keys write; one source for each.
    for (claim, key) in [
        ("iss", "issuer"),
        ("sub", "subject"),
        ("aud", "audience"),
        ("scope", "scopes"),
        ("scp", "scopes"),
        (GROUPS_CLAIM, "groups"),
        ("cnf", "bound"),
    ] {
        if spec.claims.contains_key(claim) {
            errs.push(format!(
                "token.claims.{claim}: write it as token.{key} instead"
            ));
        }
    }
    // SECURITY: binding needs a verified certificate (RFC 8705 §3); production never
    // evaluates a bound token without one.
    let bound_to = match (spec.bound, peer) {
        (true, Some(p)) => Some(p.thumbprint()),
        // An invalid `peer` has been reported already.
        (true, None) if peer_given => None,
        (true, None) => {
            errs.push("token.bound = true needs a peer: a token is bound to a certificate".into());
            None
        }
        (false, _) => None,
    };
    if errs.len() > before {
        return None;
    }
    let mut claims: Map<String, Value> = spec
        .claims
        .iter()
        .map(|(k, v)| (k.clone(), json(v)))
        .collect();
    claims.insert("iss".into(), Value::from(spec.issuer.clone()));
    claims.insert("sub".into(), Value::from(spec.subject.clone()));
    if !spec.audience.is_empty() {
        claims.insert("aud".into(), Value::from(spec.audience));
    }
    if !spec.scopes.is_empty() {
        // RFC 8693 §4.2: space-separated, as identity providers usually send it.
        claims.insert("scope".into(), Value::from(spec.scopes.join(" ")));
    }
    if !spec.groups.is_empty() {
        claims.insert(GROUPS_CLAIM.into(), Value::from(spec.groups));
    }
    if let Some(thumbprint) = bound_to {
        claims.insert("cnf".into(), serde_json::json!({ "x5t#S256": thumbprint }));
    }
    Some(TokenClaims::for_policy_test(
        &spec.issuer,
        &spec.subject,
        claims,
        GROUPS_CLAIM,
        spec.bound,
    ))
}

/// A TOML value as the JSON a token would carry (datetimes as their RFC 3339 text).
fn json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::from(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::from(*b),
        toml::Value::Datetime(d) => Value::from(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.iter().map(|(k, v)| (k.clone(), json(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Case>, Vec<String>) {
        let mut problems = Vec::new();
        let cases = parse_file("t.toml", text, &mut problems);
        (cases, problems)
    }

    #[test]
    fn a_case_becomes_facts_and_identity() {
        let (cases, problems) = parse(
            r#"
[[case]]
name = "n"
method = "get"
path = "/orders/1?x=1"
host = "api"
headers = { "X-Thing" = "a" }
peer = { spiffe_id = "spiffe://example.org/ns/prod/sa/frontend" }
token = { issuer = "https://idp", subject = "alice", groups = ["g"], scopes = ["a", "b"], bound = true, claims = { email = "a@x" } }
expect = "allow"
policies = ["p"]
"#,
        );
        assert_eq!(problems, Vec::<String>::new());
        let case = &cases[0];
        assert_eq!(case.facts.method, "GET");
        assert_eq!(case.facts.path, "/orders/1");
        assert_eq!(case.facts.query, "x=1");
        assert_eq!(case.facts.headers["x-thing"], "a");
        let token = case.identity.token().unwrap();
        assert_eq!(token.principal_id(), "alice");
        assert!(token.bound());
        assert_eq!(token.groups().iter().collect::<Vec<_>>(), ["g"]);
        assert_eq!(token.scopes().iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(token.claims()["email"], "a@x");
        let peer = case.identity.peer().unwrap();
        assert_eq!(
            peer.workload_id(),
            "spiffe://example.org/ns/prod/sa/frontend"
        );
        assert_eq!(token.claims()["cnf"]["x5t#S256"], peer.thumbprint());
        assert_eq!(case.at, "t.toml:2");
    }

    #[test]
    fn problems_name_file_line_and_case() {
        let table: &[(&str, &str)] = &[
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\n\n[[case]]\nname = \"b\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"maybe\"\n",
                "t.toml:11:10: case \"b\": unknown variant `maybe`, expected `allow` or `deny`",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\n[case.token]\nissuer = \"i\"\nsubject = \"s\"\nbogus = 1\n",
                "t.toml:9:1: case \"a\": unknown field `bogus`, expected one of",
            ),
            (
                "[[case]]\nname = \"a\"\npath = \"/\"\nexpect = \"allow\"\n",
                "t.toml:1:1: case \"a\": missing field `method`",
            ),
            ("[[case]\n", "t.toml:1:"),
            ("", "t.toml: no [[case]] tables"),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\ntoken = { issuer = \"i\", subject = \"s\", bound = true }\n",
                "t.toml:1: case \"a\": token.bound = true needs a peer",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\npeer = { spiffe_id = \"spiffe://Example.org/x\" }\n",
                "t.toml:1: case \"a\": peer.spiffe_id: trust domain \"Example.org\"",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\npeer = {}\n",
                "t.toml:1: case \"a\": peer needs",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\nheaders = { Authorization = \"Bearer x\" }\n",
                "t.toml:1: case \"a\": header \"Authorization\": credentials",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\ntoken = { issuer = \"i\", subject = \"s\", claims = { sub = \"t\" } }\n",
                "t.toml:1: case \"a\": token.claims.sub: write it as token.subject",
            ),
            (
                "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\n[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"deny\"\n",
                "t.toml:6: case \"a\": another case in this file has the same name",
            ),
        ];
        for (text, expected) in table {
            let (_, problems) = parse(text);
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert!(
                problems[0].starts_with(expected),
                "{text}: {:?} does not start with {expected:?}",
                problems[0]
            );
        }
    }
}
