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
//!
//! With a configuration ([`run_config`]), a case may instead be a *whole request*: a real
//! token (`token = "eyJ..."` or `token_file`) and client certificate (`cert_file`), built
//! into the CheckRequest Envoy would send ([`WholeRequest`]) and decided by the engine
//! exactly as the server decides it: signatures, issuers, audiences, expiry (at `time`),
//! the certificate path against the trust bundle, binding, then policy.

use crate::config::{PolicySettings, line_col};
use crate::engine::{DenyReason, Engine};
use crate::facts::RequestFacts;
use crate::identity::{Identity, PeerIdentity, PeerOutcome, TokenClaims, TokenOutcome};
use crate::policy::PolicySnapshot;
use crate::problem::{LoadError, Problem};
use crate::spiffe::SpiffeId;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
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
    /// Verified claims (a table), or a whole request's token (a string).
    token: Option<TokenField>,
    peer: Option<PeerSpec>,
    /// A whole request's token, in a file (relative to the case file).
    token_file: Option<String>,
    /// A whole request's client certificate, PEM (leaf first), relative to the case file.
    cert_file: Option<String>,
    expect: Expect,
    /// The expected HTTP status (200 on an allow).
    status: Option<u16>,
    /// The expected denial's code (`no_permit`, `invalid_token`, `forbidden`...).
    reason: Option<String>,
    /// The exact set of determining policy ids, when the case cares.
    policies: Option<Vec<String>>,
    /// The request time, RFC 3339 with an offset (`2026-12-03T10:00:00+01:00`), as a string
    /// or a TOML date-time; the time of the run when not given. A whole request's token
    /// and certificate are verified at this time too.
    time: Option<toml::Value>,
    /// The zone of `context.time`'s local fields (as `[policy] time_zone`); the policies'
    /// own by default (the configuration's with `--config`, else UTC).
    time_zone: Option<String>,
}

/// `token`: a table of verified claims, or a whole request's token as a string.
#[derive(Debug)]
enum TokenField {
    Raw(String),
    Claims(TokenSpec),
}

impl<'de> Deserialize<'de> for TokenField {
    // Not `#[serde(untagged)]`: a table's own errors (an unknown key, with its line) must
    // reach the user, not "data did not match any variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TokenField, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TokenField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token (a string) or a table of verified claims")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TokenField, E> {
                Ok(TokenField::Raw(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TokenField, A::Error> {
                TokenSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TokenField::Claims)
            }
        }
        d.deserialize_any(Visitor)
    }
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
    input: Input,
    expect: Expect,
    status: Option<u16>,
    reason: Option<String>,
    policies: Option<BTreeSet<String>>,
    /// `file:line` of the case, for problems found after parsing.
    at: String,
    /// The request time.
    now: std::time::SystemTime,
    /// The zone of `context.time`'s local fields, when the case gives one.
    zone: Option<std::sync::Arc<crate::declared::TimeZoneSetting>>,
}

/// What a case asks about.
#[derive(Debug)]
enum Input {
    /// A request after verification: evaluated by the policies alone.
    Verified {
        facts: Box<RequestFacts>,
        identity: Identity,
    },
    /// A whole request, decided by the engine as the server decides it.
    Whole {
        request: Box<crate::proto::envoy::service::auth::v3::CheckRequest>,
    },
}

/// The denial codes a case's `reason` may name (`DenyReason::code`).
const REASONS: &[&str] = &[
    "unreadable_request",
    "certificate_required",
    "invalid_certificate",
    "invalid_token",
    "no_permit",
    "forbidden",
    "policy_error",
    "overloaded",
    "deadline",
    "request_too_large",
    "audit_unavailable",
];

/// A whole request as a proxy describes it, before anything is verified: what
/// `portcullis check --method ...` and a whole-request test case build into the
/// CheckRequest Envoy's ext_authz filter sends.
#[derive(Debug, Clone, Default)]
pub struct WholeRequest {
    /// The HTTP method.
    pub method: String,
    /// The path, optionally with `?query`.
    pub path: String,
    /// `:authority`; not sent when empty.
    pub host: String,
    /// `:scheme`; `https` when empty.
    pub scheme: String,
    /// Further headers (lower-cased; a name may be given once).
    pub headers: Vec<(String, String)>,
    /// The bearer token, sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The client certificate (PEM, leaf first) as the peer certificate of the connection,
    /// URL-encoded in `source.certificate` as Envoy sends it.
    pub cert_pem: Option<String>,
}

impl WholeRequest {
    /// The CheckRequest in proto3 JSON, as Envoy would send it.
    pub fn check_request_json(&self) -> Result<Value, String> {
        let scheme = if self.scheme.is_empty() {
            "https"
        } else {
            self.scheme.as_str()
        };
        let mut headers = Map::new();
        headers.insert(":method".into(), Value::from(self.method.clone()));
        headers.insert(":path".into(), Value::from(self.path.clone()));
        headers.insert(":scheme".into(), Value::from(scheme));
        if !self.host.is_empty() {
            headers.insert(":authority".into(), Value::from(self.host.clone()));
        }
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with(':') || lower == "host" {
                return Err(format!(
                    "header \"{name}\": give pseudo-headers as the method, path and host"
                ));
            }
            if lower == "authorization" && self.token.is_some() {
                return Err(format!(
                    "header \"{name}\": the token is sent as `authorization: Bearer`; give one or the other"
                ));
            }
            if headers.insert(lower, Value::from(value.clone())).is_some() {
                return Err(format!(
                    "header \"{name}\" is given twice (names are case-insensitive)"
                ));
            }
        }
        if let Some(token) = &self.token {
            headers.insert(
                "authorization".into(),
                Value::from(format!("Bearer {}", token.trim())),
            );
        }
        let mut source = Map::new();
        if let Some(pem) = &self.cert_pem {
            source.insert(
                "certificate".into(),
                Value::from(crate::facts::envoy_url_encode(pem)),
            );
        }
        Ok(serde_json::json!({
            "attributes": {
                "source": source,
                "request": { "http": {
                    "method": self.method, "path": self.path, "host": self.host,
                    "scheme": scheme, "headers": headers,
                }},
            }
        }))
    }

    /// The CheckRequest, as Envoy would send it.
    pub fn check_request(
        &self,
    ) -> Result<crate::proto::envoy::service::auth::v3::CheckRequest, String> {
        let json = self.check_request_json()?;
        crate::proto::from_json("envoy.service.auth.v3.CheckRequest", &json.to_string())
    }
}

/// Loads the policies in `dir` and runs every case in `dir/tests/*.toml` against them.
/// `Err` lists every problem that kept the policies or the cases from loading.
pub fn run_dir(dir: &Path) -> Result<Report, LoadError> {
    run_dir_with(dir, &dir.join("tests"))
}

/// Loads the policies in `dir` and runs every case in `cases/*.toml` against them.
pub fn run_dir_with(dir: &Path, cases: &Path) -> Result<Report, LoadError> {
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let settings = PolicySettings {
        dir: dir.to_path_buf(),
        schema: optional("schema.cedarschema"),
        entities: optional("entities.json"),
        hidden_headers: Vec::new(),
        time_zone: Default::default(),
        declared_claims: None,
    };
    run_cases(&settings, cases, None, &dir.display().to_string())
}

/// Runs every case in `cases/*.toml` against the policies `engine` was loaded with
/// (`policy`, its configuration's `[policy]`); whole-request cases are decided by `engine`
/// itself, so verified as the server verifies them. `config` names the configuration in
/// problems.
pub fn run_config(
    engine: &Engine,
    policy: &PolicySettings,
    cases: &Path,
    config: &Path,
) -> Result<Report, LoadError> {
    run_cases(
        policy,
        cases,
        Some(engine),
        &format!("{} with {}", cases.display(), config.display()),
    )
}

fn run_cases(
    settings: &PolicySettings,
    tests: &Path,
    engine: Option<&Engine>,
    what: &str,
) -> Result<Report, LoadError> {
    let mut problems = Vec::new();
    let snapshot = crate::policy::load(settings)
        .map_err(|errs| problems.extend(errs.iter().map(Problem::to_string)))
        .ok();
    let cases = load_cases(tests, &mut problems);
    if let Some(snapshot) = &snapshot {
        check_policy_ids(snapshot, &cases, &mut problems);
    }
    if engine.is_none() {
        // SECURITY: a whole request cannot be verified without the configuration's keys and
        // trust bundle; it is refused, never evaluated as if its credentials were good.
        for case in &cases {
            if matches!(case.input, Input::Whole { .. }) {
                problems.push(format!(
                    "{}: case \"{}\": a whole request (a token string, token_file or cert_file) is verified with the configuration's issuers and trust bundle: run it with --config",
                    case.at, case.name
                ));
            }
        }
    }
    match snapshot {
        Some(snapshot) if problems.is_empty() => Ok(run(&snapshot, engine, &cases)),
        _ => Err(LoadError::new(
            format!("loading {what}"),
            problems.into_iter().map(Problem::new).collect(),
        )),
    }
}

/// What a case's request came to, in the terms a case states its expectation in.
struct Got {
    /// The denial, when denied (whatever the configuration's mode: the test is of the
    /// decision, not of dry-run).
    denial: Option<DenyReason>,
    determining: Vec<String>,
    /// Why, for a failure's line.
    why: Vec<String>,
    /// Policy evaluation errors (each forces a deny).
    errors: Vec<String>,
}

impl Got {
    fn status(&self) -> u16 {
        self.denial
            .as_ref()
            .map_or(200, |d| crate::reply::deny_reply(d).http_status)
    }

    fn describe(&self) -> String {
        let by = list(&self.determining);
        let why = if self.why.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.why.join("; "))
        };
        match &self.denial {
            None => format!("allow by {by}"),
            Some(d) => format!("deny {} {} by {by}{why}", self.status(), d.code()),
        }
    }
}

fn decide(snapshot: &PolicySnapshot, engine: Option<&Engine>, case: &Case) -> Got {
    match (&case.input, engine) {
        (Input::Verified { facts, identity }, _) => {
            let outcome = snapshot.evaluate_in(
                facts,
                identity,
                case.now,
                case.zone.as_ref().unwrap_or(&snapshot.time_zone),
            );
            // SECURITY: the engine's reading of an outcome (`Engine::decide`): an evaluation
            // error is a deny; no credential verified and no permit is a 401.
            let anonymous = identity.peer().is_none() && identity.token().is_none();
            let (denial, why) = if !outcome.errors.is_empty() {
                (
                    Some(DenyReason::PolicyError),
                    vec![format!(
                        "an evaluation error forces a deny: {}",
                        outcome.errors.join("; ")
                    )],
                )
            } else if outcome.allowed {
                (None, Vec::new())
            } else if outcome.determining.is_empty() {
                (
                    Some(DenyReason::NoPermit { anonymous }),
                    vec!["no permit matched".to_string()],
                )
            } else {
                (Some(DenyReason::Forbidden), vec!["forbid matched".into()])
            };
            Got {
                denial,
                determining: outcome.determining.clone(),
                why,
                errors: outcome.errors.clone(),
            }
        }
        (Input::Whole { request }, Some(engine)) => {
            let decision = engine.check(request, case.now);
            Got {
                determining: decision.policies().to_vec(),
                why: decision.reasons.clone(),
                errors: decision
                    .policy
                    .as_ref()
                    .map(|p| p.errors.clone())
                    .unwrap_or_default(),
                denial: decision.denial,
            }
        }
        // Refused at load (`run_cases`); deny should it ever get here.
        (Input::Whole { .. }, None) => Got {
            denial: Some(DenyReason::PolicyError),
            determining: Vec::new(),
            why: vec!["a whole request needs --config".into()],
            errors: Vec::new(),
        },
    }
}

fn run(snapshot: &PolicySnapshot, engine: Option<&Engine>, cases: &[Case]) -> Report {
    let mut report = Report::default();
    for case in cases {
        let got = decide(snapshot, engine, case);
        let decision_ok = got.denial.is_none() == (case.expect == Expect::Allow);
        let status_ok = case.status.is_none_or(|s| s == got.status());
        let reason_ok = case
            .reason
            .as_deref()
            .is_none_or(|r| got.denial.as_ref().is_some_and(|d| d.code() == r));
        let policies_ok = case.policies.as_ref().is_none_or(|expected| {
            let actual: BTreeSet<String> = got.determining.iter().cloned().collect();
            *expected == actual
        });
        if decision_ok && status_ok && reason_ok && policies_ok {
            report.passed += 1;
            let note = if got.errors.is_empty() {
                String::new()
            } else {
                format!(" (denied by evaluation error: {})", got.errors.join("; "))
            };
            report
                .lines
                .push(format!("ok  {}: {}{note}", case.file, case.name));
        } else {
            report.failed += 1;
            let mut expected = case.expect.as_str().to_string();
            if let Some(status) = case.status {
                expected.push_str(&format!(" {status}"));
            }
            if let Some(reason) = &case.reason {
                expected.push_str(&format!(" {reason}"));
            }
            if let Some(ids) = &case.policies {
                expected.push_str(&format!(" by {}", list(ids)));
            }
            report.lines.push(format!(
                "FAIL {}: {}: expected {expected}, got {}",
                case.file,
                case.name,
                got.describe()
            ));
        }
    }
    report
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
            Ok(text) => cases.extend(parse_file(
                &file.display().to_string(),
                tests,
                &text,
                problems,
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    cases
}

/// `base` is the directory a case's `token_file` and `cert_file` are relative to.
fn parse_file(file: &str, base: &Path, text: &str, problems: &mut Vec<String>) -> Vec<Case> {
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
        match build(spec, file, base, at.clone()) {
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

/// Whether a case is a whole request: it gives a real credential to verify.
fn is_whole(spec: &CaseSpec) -> bool {
    matches!(spec.token, Some(TokenField::Raw(_)))
        || spec.token_file.is_some()
        || spec.cert_file.is_some()
}

/// A case's `time` (RFC 3339 with an offset, as a string or a TOML date-time), or now.
fn case_time(time: Option<&toml::Value>, errs: &mut Vec<String>) -> SystemTime {
    let text = match time {
        None => return SystemTime::now(),
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Datetime(d)) => d.to_string(),
        Some(other) => other.to_string(),
    };
    match text.parse::<jiff::Timestamp>() {
        Ok(t) => {
            let since = std::time::Duration::new(
                t.as_second().unsigned_abs(),
                t.subsec_nanosecond().unsigned_abs(),
            );
            // Before 1970: far from any token's validity, but still a time.
            if t.as_second() >= 0 {
                SystemTime::UNIX_EPOCH + since
            } else {
                SystemTime::UNIX_EPOCH - since
            }
        }
        Err(_) => {
            errs.push(format!(
                "time = {text}: not an RFC 3339 time with an offset, such as \"2026-12-03T10:00:00+01:00\" or 2026-12-03T09:00:00Z"
            ));
            SystemTime::UNIX_EPOCH
        }
    }
}

/// A case's `time_zone` (the zone of `context.time`'s local fields); without one, the
/// policies' own (`[policy] time_zone` with `--config`, else UTC).
fn case_zone(
    zone: Option<&str>,
    errs: &mut Vec<String>,
) -> Option<std::sync::Arc<crate::declared::TimeZoneSetting>> {
    match zone.map(crate::declared::TimeZoneSetting::parse)? {
        Ok(z) => Some(std::sync::Arc::new(z)),
        Err(e) => {
            errs.push(format!("time_zone: {e}"));
            None
        }
    }
}

/// Checks `status` and `reason` against `expect`.
fn check_expectation(spec: &CaseSpec, errs: &mut Vec<String>) {
    match (spec.expect, spec.status) {
        (Expect::Allow, Some(s)) if s != 200 => {
            errs.push(format!("status = {s}: an allow is answered 200"));
        }
        (Expect::Deny, Some(s)) if !(400..600).contains(&s) => {
            errs.push(format!("status = {s}: a denial is answered 4xx or 5xx"));
        }
        _ => {}
    }
    if let Some(reason) = &spec.reason {
        if spec.expect == Expect::Allow {
            errs.push("reason: an allow has no reason; it is for expect = \"deny\"".into());
        } else if !REASONS.contains(&reason.as_str()) {
            errs.push(format!(
                "reason = \"{reason}\": not a denial's code (one of {})",
                REASONS.join(", ")
            ));
        }
    }
}

/// Turns a whole-request case into the CheckRequest Envoy would send.
fn build_whole(spec: CaseSpec, file: &str, base: &Path, at: String) -> Result<Case, Vec<String>> {
    let mut errs = Vec::new();
    check_expectation(&spec, &mut errs);
    if spec.peer.is_some() {
        errs.push(
            "peer: a whole request presents its certificate as cert_file, verified against the trust bundle".into(),
        );
    }
    let read = |what: &str, name: &str, errs: &mut Vec<String>| {
        crate::files::read_to_string(&base.join(name))
            .map_err(|e| errs.push(format!("{what}: {e}")))
            .ok()
    };
    let token = match (spec.token, &spec.token_file) {
        (Some(TokenField::Raw(_)), Some(_)) => {
            errs.push("token and token_file: give the token once".into());
            None
        }
        (Some(TokenField::Raw(t)), None) => Some(t),
        (Some(TokenField::Claims(_)), _) => {
            errs.push("token: a whole request gives its token as a string (or token_file), not a table of claims".into());
            None
        }
        (None, Some(name)) => read("token_file", name, &mut errs).map(|t| t.trim().to_string()),
        (None, None) => None,
    };
    let cert_pem = spec
        .cert_file
        .as_deref()
        .and_then(|name| read("cert_file", name, &mut errs));
    let now = case_time(spec.time.as_ref(), &mut errs);
    if spec.time_zone.is_some() {
        errs.push(
            "time_zone: a whole request is decided as the server decides it, in the configuration's [policy] time_zone".into(),
        );
    }
    let whole = WholeRequest {
        method: spec.method.to_ascii_uppercase(),
        path: spec.path,
        host: spec.host,
        scheme: spec.scheme,
        headers: spec.headers.into_iter().collect(),
        token,
        cert_pem,
    };
    let request = whole
        .check_request()
        .map_err(|e| errs.push(e))
        .ok()
        .map(Box::new);
    match request {
        Some(request) if errs.is_empty() => Ok(Case {
            file: file.to_string(),
            name: spec.name,
            input: Input::Whole { request },
            expect: spec.expect,
            status: spec.status,
            reason: spec.reason,
            policies: spec.policies.map(|ids| ids.into_iter().collect()),
            at,
            now,
            zone: None,
        }),
        _ => Err(errs),
    }
}

/// Turns a parsed case into request facts and a verified identity (or, for a whole
/// request, the CheckRequest), or says what is wrong.
fn build(spec: CaseSpec, file: &str, base: &Path, at: String) -> Result<Case, Vec<String>> {
    if is_whole(&spec) {
        return build_whole(spec, file, base, at);
    }
    let mut errs = Vec::new();
    check_expectation(&spec, &mut errs);
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

    let now = case_time(spec.time.as_ref(), &mut errs);
    let zone = case_zone(spec.time_zone.as_deref(), &mut errs);
    let peer_given = spec.peer.is_some();
    let peer = spec.peer.and_then(|p| peer_identity(p, &mut errs));
    let token = match spec.token {
        Some(TokenField::Claims(t)) => token_claims(t, peer.as_ref(), peer_given, &mut errs),
        // A string makes the case a whole request (`is_whole`).
        Some(TokenField::Raw(_)) | None => None,
    };

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Case {
        file: file.to_string(),
        name: spec.name,
        input: Input::Verified {
            facts: Box::new(RequestFacts {
                method: spec.method.to_ascii_uppercase(),
                path,
                query,
                host: spec.host,
                scheme: spec.scheme,
                headers,
                source_address: spec.source_address,
                ..RequestFacts::default()
            }),
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
        },
        expect: spec.expect,
        status: spec.status,
        reason: spec.reason,
        policies: spec.policies.map(|ids| ids.into_iter().collect()),
        at,
        now,
        zone,
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
        let cases = parse_file("t.toml", Path::new("."), text, &mut problems);
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
        let Input::Verified { facts, identity } = &case.input else {
            panic!("a verified case");
        };
        assert_eq!(facts.method, "GET");
        assert_eq!(facts.path, "/orders/1");
        assert_eq!(facts.query, "x=1");
        assert_eq!(facts.headers["x-thing"], "a");
        let token = identity.token().unwrap();
        assert_eq!(token.principal_id(), "alice");
        assert!(token.bound());
        assert_eq!(token.groups().iter().collect::<Vec<_>>(), ["g"]);
        assert_eq!(token.scopes().iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(token.claims()["email"], "a@x");
        let peer = identity.peer().unwrap();
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

    #[test]
    fn a_whole_request_case_becomes_the_check_request_envoy_sends() {
        let (cases, problems) = parse(
            "[[case]]\nname = \"w\"\nmethod = \"get\"\npath = \"/orders/1?x=1\"\nhost = \"api\"\nheaders = { \"X-Thing\" = \"a\" }\ntoken = \"abc.def.ghi\"\ntime = 2030-01-02T03:04:05Z\nexpect = \"deny\"\nstatus = 401\nreason = \"invalid_token\"\n",
        );
        assert_eq!(problems, Vec::<String>::new());
        let Input::Whole { request } = &cases[0].input else {
            panic!("a whole request");
        };
        let facts = RequestFacts::from_check(request, &crate::config::Limits::default()).unwrap();
        assert_eq!(facts.method, "GET");
        assert_eq!(
            (facts.path.as_str(), facts.query.as_str()),
            ("/orders/1", "x=1")
        );
        assert_eq!(facts.host, "api");
        assert_eq!(facts.headers["authorization"], "Bearer abc.def.ghi");
        assert_eq!(facts.headers["x-thing"], "a");
        assert_eq!(
            cases[0].now,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_893_553_445)
        );
        assert_eq!(cases[0].status, Some(401));
    }

    #[test]
    fn whole_request_and_expectation_problems_are_named() {
        let case = |extra: &str| {
            format!("[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\n{extra}\n")
        };
        let table: &[(&str, &str)] = &[
            (
                "expect = \"deny\"\ntoken = \"t\"\npeer = { spiffe_id = \"spiffe://example.org/x\" }",
                "t.toml:1: case \"a\": peer: a whole request presents its certificate as cert_file",
            ),
            (
                "expect = \"deny\"\ntoken = \"t\"\ntoken_file = \"t.jwt\"",
                "t.toml:1: case \"a\": token and token_file: give the token once",
            ),
            (
                "expect = \"deny\"\ncert_file = \"no-such.pem\"",
                "t.toml:1: case \"a\": cert_file: ./no-such.pem: cannot read",
            ),
            (
                "expect = \"deny\"\ntoken = \"t\"\ntime = 2030-01-02T03:04:05",
                "t.toml:1: case \"a\": time = 2030-01-02T03:04:05: not an RFC 3339 time with an offset",
            ),
            (
                "expect = \"deny\"\ntoken = \"t\"\ntime_zone = \"Europe/Paris\"",
                "t.toml:1: case \"a\": time_zone: a whole request is decided as the server decides it",
            ),
            (
                "expect = \"deny\"\ntoken = \"t\"\nheaders = { Authorization = \"Bearer u\" }",
                "t.toml:1: case \"a\": header \"Authorization\": the token is sent as",
            ),
            (
                "expect = \"allow\"\nstatus = 401",
                "t.toml:1: case \"a\": status = 401: an allow is answered 200",
            ),
            (
                "expect = \"deny\"\nstatus = 200",
                "t.toml:1: case \"a\": status = 200: a denial is answered 4xx or 5xx",
            ),
            (
                "expect = \"deny\"\nreason = \"nope\"",
                "t.toml:1: case \"a\": reason = \"nope\": not a denial's code",
            ),
            (
                "expect = \"allow\"\nreason = \"no_permit\"",
                "t.toml:1: case \"a\": reason: an allow has no reason",
            ),
            (
                "expect = \"deny\"\ntoken = 3",
                "t.toml:6:9: case \"a\": invalid type: integer `3`, expected a token",
            ),
        ];
        for (extra, expected) in table {
            let (_, problems) = parse(&case(extra));
            assert_eq!(problems.len(), 1, "{extra}: {problems:?}");
            assert!(
                problems[0].starts_with(expected),
                "{extra}: {:?} does not start with {expected:?}",
                problems[0]
            );
        }
    }
}
