//! The differential oracle of the whole decision (issue 12). A deliberately simple
//! reference, built with Cedar's public API the obvious way, decides the same requests as
//! the engine: every static entity plus the request's own entities (merged with a static
//! entity of the same id as docs/POLICIES.md says: parents of both, the request's attributes and
//! tags winning), the documented context, `Authorizer::is_authorized`, and "allow only when
//! Cedar allows without any error". Random worlds (static entity hierarchies over every
//! entity type, policies with every scope form, `forbid`, `in`, `is`, `has`, tags, context,
//! conditions that error, fields read by name, by presence or as whole records, tags read by
//! literal or computed names) and random requests (token, certificate, both, neither) come
//! from a byte string, so `tests/oracle.rs` (proptest) and the fuzz target
//! `decision_oracle` drive the same code. The engine's decision and determining policies
//! must equal the reference's every time.
//!
//! This file is included by path from both; it uses only public APIs.
#![allow(dead_code)]

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request};
use portcullis::config::Settings;
use portcullis::demo::{Authority, ClientCert, LeafSpec, TokenSigner};
use portcullis::engine::Engine;
use portcullis::facts::RequestFacts;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::SystemTime;

pub const ISSUER: &str = "https://oracle.test";
pub const AUDIENCE: &str = "oracle";
const GROUPS: [&str; 4] = ["g0", "g1", "g2", "g3"];
const FOLDERS: [&str; 3] = ["f0", "f1", "f2"];
const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const PATHS: [&str; 5] = ["/a", "/a/b", "/b", "/c/d", "/e"];
const HOSTS: [&str; 2] = ["h1", "static-host"];
const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
const ACTION_GROUPS: [&str; 2] = ["read", "write"];
const WORKLOADS: [&str; 2] = [
    "spiffe://example.org/ns/oracle/sa/w0",
    "spiffe://example.org/ns/oracle/sa/w1",
];

/// Choices drawn from a byte string; past its end every choice is the first option.
pub struct Gen<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Gen<'a> {
    pub fn new(data: &'a [u8]) -> Gen<'a> {
        Gen { data, at: 0 }
    }
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }
    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        options[self.below(options.len())]
    }
    fn chance(&mut self, in_four: u8) -> bool {
        self.byte() % 4 < in_four
    }
    fn subset<T: Copy>(&mut self, options: &[T]) -> Vec<T> {
        let mask = self.byte();
        options
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, o)| *o)
            .collect()
    }
}

fn uid(kind: &str, id: &str) -> Value {
    json!({ "type": kind, "id": id })
}

/// A random static entity set: groups and folders in hierarchies (parents only of a
/// higher index, so no cycles), static users, workloads and paths with attributes, tags
/// and parents, and action groups.
fn static_entities(g: &mut Gen<'_>) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, grp) in GROUPS.iter().enumerate() {
        if g.chance(3) {
            let mut parents: Vec<Value> = g
                .subset(&GROUPS[i + 1..])
                .into_iter()
                .map(|p| uid("Group", p))
                .collect();
            if i == 3 && g.chance(2) {
                // A static entity below a user: it inherits what the user's token adds.
                parents.push(uid("User", "alice"));
            }
            out.push(json!({ "uid": uid("Group", grp), "attrs": {}, "parents": parents }));
        }
    }
    for (i, f) in FOLDERS.iter().enumerate() {
        if g.chance(3) {
            let parents: Vec<Value> = g
                .subset(&FOLDERS[i + 1..])
                .into_iter()
                .map(|p| uid("Folder", p))
                .collect();
            out.push(
                json!({ "uid": uid("Folder", f), "attrs": { "level": i }, "parents": parents }),
            );
        }
    }
    for u in USERS {
        if g.chance(1) {
            let parents: Vec<Value> = g
                .subset(&GROUPS)
                .into_iter()
                .map(|p| uid("Group", p))
                .collect();
            let mut attrs = Map::new();
            if g.chance(2) {
                attrs.insert("level".into(), json!(g.below(5)));
            }
            if g.chance(1) {
                // The token's own issuer attribute wins over this one.
                attrs.insert("issuer".into(), json!("static"));
            }
            if g.chance(2) {
                // An entity reached only through an attribute.
                attrs.insert(
                    "manager".into(),
                    json!({ "__entity": uid("User", g.pick(&USERS)) }),
                );
            }
            let mut tags = Map::new();
            if g.chance(2) {
                tags.insert("dept".into(), json!(g.pick(&["x", "y"])));
            }
            out.push(
                json!({ "uid": uid("User", u), "attrs": attrs, "parents": parents, "tags": tags }),
            );
        }
    }
    for w in WORKLOADS {
        if g.chance(2) {
            let parents: Vec<Value> = g
                .subset(&GROUPS)
                .into_iter()
                .map(|p| uid("Group", p))
                .collect();
            out.push(json!({ "uid": uid("Workload", w), "attrs": {}, "parents": parents }));
        }
    }
    for p in PATHS {
        if g.chance(2) {
            let parents: Vec<Value> = g
                .subset(&FOLDERS)
                .into_iter()
                .map(|f| uid("Folder", f))
                .collect();
            let mut attrs = Map::new();
            if g.chance(2) {
                attrs.insert("owner".into(), json!(g.pick(&USERS)));
            }
            if g.chance(1) {
                attrs.insert(
                    "readers".into(),
                    json!([{ "__entity": uid("Group", g.pick(&GROUPS)) }, { "__entity": uid("User", g.pick(&USERS)) }]),
                );
            }
            if g.chance(1) {
                // The request's own host attribute wins over this one.
                attrs.insert("host".into(), json!("static-host"));
            }
            out.push(json!({ "uid": uid("Path", p), "attrs": attrs, "parents": parents }));
        }
    }
    for m in METHODS {
        if g.chance(2) {
            let parents: Vec<Value> = g
                .subset(&ACTION_GROUPS)
                .into_iter()
                .map(|a| uid("Action", a))
                .collect();
            out.push(json!({ "uid": uid("Action", m), "attrs": {}, "parents": parents }));
        }
    }
    if g.chance(1) {
        out.push(json!({ "uid": uid("Anonymous", "anonymous"), "attrs": {}, "parents": [uid("Group", "g0")] }));
    }
    out
}

fn scope(g: &mut Gen<'_>) -> String {
    let principal = match g.below(10) {
        0 | 1 => "principal".to_string(),
        2 => format!("principal == User::\"{}\"", g.pick(&USERS)),
        3 => format!("principal in Group::\"{}\"", g.pick(&GROUPS)),
        4 => "principal is User".to_string(),
        5 => format!("principal is User in Group::\"{}\"", g.pick(&GROUPS)),
        6 => format!("principal == Workload::\"{}\"", g.pick(&WORKLOADS)),
        7 => format!("principal is Workload in Group::\"{}\"", g.pick(&GROUPS)),
        8 => "principal == Anonymous::\"anonymous\"".to_string(),
        _ => "principal is Anonymous".to_string(),
    };
    let action = match g.below(5) {
        0 | 1 => "action".to_string(),
        2 => format!("action == Action::\"{}\"", g.pick(&METHODS)),
        3 => format!(
            "action in [Action::\"{}\", Action::\"{}\"]",
            g.pick(&METHODS),
            g.pick(&METHODS)
        ),
        _ => format!("action in Action::\"{}\"", g.pick(&ACTION_GROUPS)),
    };
    let resource = match g.below(6) {
        0 | 1 => "resource".to_string(),
        2 => format!("resource == Path::\"{}\"", g.pick(&PATHS)),
        3 => format!("resource in Folder::\"{}\"", g.pick(&FOLDERS)),
        4 => "resource is Path".to_string(),
        _ => format!("resource is Path in Folder::\"{}\"", g.pick(&FOLDERS)),
    };
    format!("{principal}, {action}, {resource}")
}

fn condition(g: &mut Gen<'_>) -> String {
    match g.below(43) {
        0..=3 => String::new(),
        4 => format!(
            "when {{ resource.path like \"{}*\" }}",
            g.pick(&["/a", "/c", "/"])
        ),
        5 => "when { context.binding }".to_string(),
        // Errors when the principal has no `level`: Portcullis must deny, as the reference.
        6 => format!("when {{ principal.level > {} }}", g.below(4)),
        7 => "when { principal has level && principal.level >= 2 }".to_string(),
        8 => format!("when {{ resource.host == \"{}\" }}", g.pick(&HOSTS)),
        9 => {
            "when { resource has owner && principal is User && resource.owner == principal.issuer }"
                .to_string()
        }
        10 => format!(
            "when {{ principal.hasTag(\"dept\") && principal.getTag(\"dept\") == \"{}\" }}",
            g.pick(&["x", "y"])
        ),
        11 => "when { context has token && context.token.scopes.contains(\"read\") }".to_string(),
        12 => format!(
            "when {{ context has peer && context.peer.spiffe_id == \"{}\" }}",
            g.pick(&WORKLOADS)
        ),
        13 => format!(
            "unless {{ resource.path like \"{}*\" }}",
            g.pick(&["/b", "/e"])
        ),
        14 => format!("when {{ principal in Group::\"{}\" }}", g.pick(&GROUPS)),
        15 => format!("when {{ resource in Folder::\"{}\" }}", g.pick(&FOLDERS)),
        16 => "when { principal has manager && principal.manager has level && principal.manager.level > 1 }"
            .to_string(),
        17 => format!(
            "when {{ principal has manager && principal.manager in Group::\"{}\" }}",
            g.pick(&GROUPS)
        ),
        18 => "when { resource has readers && resource.readers.contains(principal) }".to_string(),
        19 => format!(
            "when {{ resource has readers && resource.readers.containsAny([Group::\"{}\", User::\"{}\"]) }}",
            g.pick(&GROUPS),
            g.pick(&USERS)
        ),
        20 | 23..=26 => format!(
            "when {{ Group::\"g3\" in Group::\"{}\" }}",
            g.pick(&GROUPS)
        ),
        27 => "when { resource has readers && resource.readers.contains(principal) }".to_string(),
        28 => "when { principal has manager && principal.manager has level && principal.manager.level > 1 }"
            .to_string(),
        21 => format!("when {{ User::\"{}\".level > 1 }}", g.pick(&USERS)),
        29 => format!(
            "when {{ User::\"{}\" has manager && User::\"{}\".manager == principal }}",
            g.pick(&USERS),
            g.pick(&USERS)
        ),
        // What policies read of the context and of the token's user decides what the
        // engine builds (src/policy/demand.rs): fields by name, by presence, records used
        // whole, computed tag names, attributes.
        30 => "when { context has token.claims.dept }".to_string(),
        31 => format!(
            "when {{ context has token && context.token.claims has dept && context.token.claims.dept == \"{}\" }}",
            g.pick(&["x", "y"])
        ),
        32 => format!(
            "when {{ context has token && context.token.claims.groups.contains(\"{}\") }}",
            g.pick(&GROUPS)
        ),
        33 => format!(
            "when {{ (if context has token then context.token else {{\"issuer\": \"none\"}}).issuer == \"{ISSUER}\" }}"
        ),
        34 => format!(
            "when {{ context.request has method && context.request.method == \"{}\" }}",
            g.pick(&METHODS)
        ),
        35 => "when { principal.hasTag(if context.binding then \"dept\" else \"scope\") }"
            .to_string(),
        36 => "when { context has token.claims.cnf && context.token.claims.cnf has \"x5t#S256\" }"
            .to_string(),
        // The request time (`context.time`, UTC here), built only when a policy reads it.
        38 => format!("when {{ context.time.hour >= {} }}", g.below(24)),
        39 => format!(
            "when {{ [\"Mon\", \"Tue\", \"Wed\", \"Thu\", \"Fri\"].contains(context.time.day_of_week) && context.time.minute < {} }}",
            g.below(60)
        ),
        40 => format!(
            "when {{ context.time.local.toTime() >= duration(\"{}h\") && context.time.now > datetime(\"2020-01-01\") }}",
            g.below(24)
        ),
        41 => "when { context has token && context.time.unix + 300 < context.token.expires_at }"
            .to_string(),
        // A declared claim (`level = "Long"`): present only in its type, or the token is refused.
        42 => format!(
            "when {{ context has token && context.token.claims has level && context.token.claims.level > {} }}",
            g.below(4)
        ),
        _ => "when { principal has issuer }".to_string(),
    }
}

/// Random policies, each with an `@id`.
fn policies(g: &mut Gen<'_>) -> String {
    let n = 1 + g.below(6);
    (0..n)
        .map(|i| {
            let effect = if g.chance(1) { "forbid" } else { "permit" };
            format!("@id(\"p{i}\")\n{effect} ({}) {};\n", scope(g), condition(g))
        })
        .collect()
}

/// A request as the generator describes it, before any credential is made.
#[derive(Debug, Clone)]
pub struct Described {
    pub method: &'static str,
    pub path: &'static str,
    pub host: &'static str,
    /// The token's claims, when the request carries a token.
    pub claims: Option<Value>,
    /// Index into the workload certificates, when the request carries one.
    pub workload: Option<usize>,
    /// When the request is decided (Unix seconds): the engine's `now`, and `context.time`.
    pub at: i64,
}

fn describe(g: &mut Gen<'_>, now: i64, workload_thumbprints: &[String]) -> Described {
    // Within the workload certificates' validity (an hour ago to a day ahead).
    let at = now + 300 * i64::from(g.byte());
    let workload = g.chance(2).then(|| g.below(WORKLOADS.len()));
    let claims = g.chance(2).then(|| {
        let sub = if g.chance(1) { "alice" } else { g.pick(&USERS) };
        let mut c = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": at, "exp": at + 600,
            "groups": g.subset(&GROUPS),
            "scope": g.pick(&["read", "write", "read write"]),
        });
        match g.below(4) {
            0 => c["dept"] = json!(g.pick(&["x", "y"])),
            // A number is not a string tag: getTag("dept") == "x" must not match it.
            1 => c["dept"] = json!(7),
            _ => {}
        }
        match g.below(5) {
            0 | 1 => c["level"] = json!(g.below(5)),
            // Not the declared Long: the token is refused.
            2 => c["level"] = json!(g.pick(&["3", "x"])),
            3 => c["level"] = json!(2.5),
            _ => {}
        }
        if let Some(w) = workload
            && g.chance(2)
        {
            c["cnf"] = json!({ "x5t#S256": workload_thumbprints[w] });
        }
        c
    });
    Described {
        method: g.pick(&METHODS),
        path: g.pick(&PATHS),
        host: g.pick(&HOSTS),
        claims,
        workload,
        at,
    }
}

/// `context.time` at `at` in UTC, worked out by hand (days since 1970-01-01, a Thursday;
/// the civil date by Howard Hinnant's `civil_from_days`), independently of the engine.
pub fn time_context(at: i64) -> Value {
    let days = at.div_euclid(86_400);
    let secs = at.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let stamp = format!("{y:04}-{m:02}-{d:02}T{hour:02}:{minute:02}:{second:02}Z");
    let datetime = json!({ "__extn": { "fn": "datetime", "arg": stamp } });
    json!({
        "now": datetime, "unix": at, "local": datetime, "time_zone": "UTC",
        "date": format!("{y:04}-{m:02}-{d:02}"), "day_of_week": weekday,
        "hour": hour, "minute": minute,
    })
}

/// How request-built entities meet static ones of the same id: `Merge` is the documented
/// rule; `Replace` is what Portcullis did before issue 12 (kept to show the oracle sees it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Merge,
    Replace,
}

/// `own` merged into the static entity with the same uid, as plain JSON.
fn merged(statics: &[Value], own: Value, rule: Rule) -> Value {
    let Some(known) = statics.iter().find(|e| e["uid"] == own["uid"]) else {
        return own;
    };
    if rule == Rule::Replace {
        return own;
    }
    let mut attrs = known["attrs"].as_object().cloned().unwrap_or_default();
    attrs.extend(own["attrs"].as_object().cloned().unwrap_or_default());
    let mut tags = known["tags"].as_object().cloned().unwrap_or_default();
    tags.extend(own["tags"].as_object().cloned().unwrap_or_default());
    let mut parents = known["parents"].as_array().cloned().unwrap_or_default();
    for p in own["parents"].as_array().cloned().unwrap_or_default() {
        if !parents.contains(&p) {
            parents.push(p);
        }
    }
    json!({ "uid": own["uid"], "attrs": attrs, "parents": parents, "tags": tags })
}

/// The claims declared in the world's configuration (`[issuer.claims] level = "Long"`).
pub const DECLARED: [&str; 1] = ["level"];

/// The reference decision: (allowed, the `@id`s of the determining policies), without a
/// schema: every claim is in `context.token.claims`.
pub fn reference(
    statics: &[Value],
    policies: &PolicySet,
    req: &Described,
    rule: Rule,
) -> (bool, BTreeSet<String>) {
    reference_with(statics, policies, req, rule, None)
}

/// [`reference`] of a world whose policies are loaded with a schema when `declared` is
/// given: then `context.token.claims` holds only those claims (the schema's claims record
/// is closed, docs/SCHEMA-AND-TIME.md); the tags stay every string claim.
pub fn reference_with(
    statics: &[Value],
    policies: &PolicySet,
    req: &Described,
    rule: Rule,
    declared: Option<&[&str]>,
) -> (bool, BTreeSet<String>) {
    // SECURITY: a declared claim (`level = "Long"`) of another type refuses the token.
    if let Some(level) = req.claims.as_ref().and_then(|c| c.get("level"))
        && level.as_i64().is_none()
    {
        return (false, BTreeSet::new());
    }
    let bound = req.claims.as_ref().is_some_and(|c| c.get("cnf").is_some());
    // The principal: the token's user, else the certificate's workload, else anonymous.
    let (principal, own_principal) = match (&req.claims, req.workload) {
        (Some(c), _) => {
            let sub = c["sub"].as_str().unwrap_or_default();
            let parents: Vec<Value> = c["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|g| uid("Group", g))
                .collect();
            // Tags: the string claims.
            let tags: Map<String, Value> = c
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.is_string())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (
                uid("User", sub),
                json!({ "uid": uid("User", sub), "attrs": { "issuer": ISSUER }, "parents": parents, "tags": tags }),
            )
        }
        (None, Some(w)) => {
            let u = uid("Workload", WORKLOADS[w]);
            (u.clone(), json!({ "uid": u, "attrs": {}, "parents": [] }))
        }
        (None, None) => {
            let u = uid("Anonymous", "anonymous");
            (u.clone(), json!({ "uid": u, "attrs": {}, "parents": [] }))
        }
    };
    let resource = uid("Path", req.path);
    let own_resource = json!({
        "uid": resource, "attrs": { "path": req.path, "host": req.host }, "parents": []
    });
    let mut all: Vec<Value> = statics
        .iter()
        .filter(|e| e["uid"] != principal && e["uid"] != resource)
        .cloned()
        .collect();
    all.push(merged(statics, own_principal, rule));
    all.push(merged(statics, own_resource, rule));
    // Cedar refuses an entity set with a cycle (a token's group that is below its user):
    // no decision can be made, and Portcullis denies.
    let Ok(entities) = Entities::from_json_value(Value::Array(all), None) else {
        return (false, BTreeSet::new());
    };

    let mut context = json!({
        "request": {
            "method": req.method, "path": req.path, "query": "", "host": req.host,
            "scheme": "https", "source_address": "", "headers": {},
        },
        "binding": bound,
        "time": time_context(req.at),
    });
    if let Some(w) = req.workload {
        context["peer"] = json!({ "spiffe_id": WORKLOADS[w], "trust_domain": "example.org" });
    }
    if let Some(c) = &req.claims {
        let scopes: Vec<&str> = c["scope"].as_str().unwrap_or_default().split(' ').collect();
        let mut claims = c.as_object().cloned().unwrap_or_default();
        if let Some(declared) = declared {
            claims.retain(|name, _| declared.contains(&name.as_str()));
        }
        context["token"] = json!({
            "issuer": ISSUER, "subject": c["sub"], "audience": [AUDIENCE], "scopes": scopes,
            "expires_at": c["exp"], "claims": claims,
        });
    }
    let context = Context::from_json_value(context, None).expect("reference context");
    let to_uid = |v: &Value| EntityUid::from_json(v.clone()).expect("reference uid");
    let request = Request::new(
        to_uid(&principal),
        to_uid(&uid("Action", req.method)),
        to_uid(&resource),
        context,
        None,
    )
    .expect("reference request");
    let response = Authorizer::new().is_authorized(&request, policies, &entities);
    let errors = response.diagnostics().errors().count();
    let determining = response
        .diagnostics()
        .reason()
        .filter_map(|id| policies.policy(id))
        .filter_map(|p| p.annotation("id").map(str::to_string))
        .collect();
    (
        response.decision() == Decision::Allow && errors == 0,
        determining,
    )
}

/// What is fixed for every case: a CA, two workload certificates, the issuer's key.
pub struct Oracle {
    root: Authority,
    workloads: Vec<ClientCert>,
    thumbprints: Vec<String>,
    signer: TokenSigner,
}

/// What one run saw: how many decisions were compared, and of which kinds (so a test can
/// check that the generator reaches allows, forbids, errors and the static-entity merge).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub compared: usize,
    pub allowed: usize,
    pub forbidden: usize,
    pub errors: usize,
    /// Requests where the pre-issue-12 rule (replace) decides differently from the merge
    /// (counted only when `track_replace` is set: it decides every request once more).
    pub replace_differs: usize,
    pub track_replace: bool,
    /// Requests of a world with a schema that every claim in the context (no filter)
    /// would decide differently.
    pub schema_differs: usize,
}

impl Oracle {
    /// The thumbprint of workload certificate `w`, for a bound token's `cnf`.
    pub fn thumbprint(&self, w: usize) -> String {
        self.thumbprints[w].clone()
    }

    pub fn new() -> Oracle {
        let root = Authority::root("oracle test root CA");
        let workloads: Vec<ClientCert> = WORKLOADS
            .iter()
            .map(|w| root.issue(&LeafSpec::spiffe(w)))
            .collect();
        let thumbprints = workloads.iter().map(ClientCert::thumbprint).collect();
        Oracle {
            root,
            workloads,
            thumbprints,
            signer: TokenSigner::generate(jsonwebtoken::Algorithm::ES256, "oracle"),
        }
    }

    /// One world and up to 12 requests from `data`; an error describes the first request
    /// on which the engine and the reference disagree.
    pub fn run(&self, data: &[u8], seen: &mut Seen) -> Result<(), String> {
        let mut g = Gen::new(data);
        let statics = static_entities(&mut g);
        let policy_text = policies(&mut g);
        let now = portcullis::demo::unix_now();
        let count = 1 + g.below(12);
        let requests: Vec<Described> = (0..count)
            .map(|_| describe(&mut g, now, &self.thumbprints))
            .collect();
        self.check_world(&statics, &policy_text, &requests, seen)
    }

    /// Up to 12 requests from `data` in a world of `policy_text` (which must validate) loaded
    /// with the schema `portcullis schema` prints for it, and no static entities.
    pub fn run_with_schema(
        &self,
        data: &[u8],
        policy_text: &str,
        seen: &mut Seen,
    ) -> Result<(), String> {
        let mut g = Gen::new(data);
        let now = portcullis::demo::unix_now();
        let count = 1 + g.below(12);
        let requests: Vec<Described> = (0..count)
            .map(|_| describe(&mut g, now, &self.thumbprints))
            .collect();
        self.check_world_in(&[], policy_text, &requests, seen, true)
    }

    /// The engine and the reference decide `requests` in a world of these static entities
    /// and policies; an error describes the first disagreement.
    pub fn check_world(
        &self,
        statics: &[Value],
        policy_text: &str,
        requests: &[Described],
        seen: &mut Seen,
    ) -> Result<(), String> {
        self.check_world_in(statics, policy_text, requests, seen, false)
    }

    /// [`Oracle::check_world`], with the policies loaded with the schema that `portcullis
    /// schema` prints for the world when `with_schema`.
    fn check_world_in(
        &self,
        statics: &[Value],
        policy_text: &str,
        requests: &[Described],
        seen: &mut Seen,
        with_schema: bool,
    ) -> Result<(), String> {
        let statics = statics.to_vec();
        let policy_text = policy_text.to_string();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path();
        let write =
            |name: &str, text: &str| std::fs::write(p.join(name), text).map_err(|e| e.to_string());
        std::fs::create_dir(p.join("policies")).map_err(|e| e.to_string())?;
        write("policies/world.cedar", &policy_text)?;
        write("entities.json", &Value::Array(statics.clone()).to_string())?;
        write("ca.pem", &self.root.cert_pem())?;
        write("idp.jwks.json", &portcullis::demo::jwks(&[&self.signer]))?;
        let config = format!(
            r#"
[peer]
trust_bundle = "ca.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "1h"

[issuer.claims]
level = "Long"

[policy]
dir = "policies"
entities = "entities.json"

[log]
audit = "stderr"
"#
        );
        let mut settings = Settings::from_toml(&config, p).map_err(|e| e.messages().join("; "))?;
        if with_schema {
            let schema =
                portcullis::cedar_schema(&settings).map_err(|e| e.messages().join("; "))?;
            write("schema.cedarschema", &schema)?;
            let config = config.replace(
                "entities = \"entities.json\"",
                "entities = \"entities.json\"\nschema = \"schema.cedarschema\"",
            );
            settings = Settings::from_toml(&config, p).map_err(|e| e.messages().join("; "))?;
        }
        let declared = with_schema.then_some(&DECLARED[..]);
        let engine = match Engine::load(&settings) {
            Ok(engine) => engine,
            // Static entities with a cycle are refused by Cedar itself: nothing to compare.
            Err(_) if Entities::from_json_value(Value::Array(statics.clone()), None).is_err() => {
                return Ok(());
            }
            Err(e) => {
                return Err(format!(
                    "engine did not load\n{policy_text}\n{}",
                    e.messages().join("\n")
                ));
            }
        };
        let parsed = PolicySet::from_str(&policy_text).map_err(|e| e.to_string())?;
        for req in requests {
            let mut facts = RequestFacts {
                method: req.method.to_string(),
                path: req.path.to_string(),
                host: req.host.to_string(),
                scheme: "https".into(),
                ..RequestFacts::default()
            };
            if let Some(c) = &req.claims {
                facts.headers.insert(
                    "authorization".into(),
                    format!("Bearer {}", self.signer.sign(c)),
                );
            }
            if let Some(w) = req.workload {
                facts.peer_certificate = Some(self.workloads[w].envoy_encoded());
            }
            let at = SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(req.at).map_err(|e| e.to_string())?);
            let decision = engine.decide(&facts, at);
            let (allowed, determining) =
                reference_with(&statics, &parsed, req, Rule::Merge, declared);
            if with_schema
                && reference(&statics, &parsed, req, Rule::Merge) != (allowed, determining.clone())
            {
                seen.schema_differs += 1;
            }
            let engine_determining: BTreeSet<String> =
                decision.policies().iter().cloned().collect();
            if decision.allowed() != allowed || engine_determining != determining {
                return Err(format!(
                    "engine and reference disagree\nstatic entities: {}\npolicies:\n{policy_text}\nrequest: {req:?}\nengine: allowed={} policies={engine_determining:?} reasons={:?}\nreference: allowed={allowed} policies={determining:?}",
                    Value::Array(statics.clone()),
                    decision.allowed(),
                    decision.reasons
                ));
            }
            seen.compared += 1;
            if allowed {
                seen.allowed += 1;
            } else if !determining.is_empty() {
                seen.forbidden += 1;
            }
            if decision
                .reasons
                .iter()
                .any(|r| r.starts_with("policy error"))
            {
                seen.errors += 1;
            }
            if seen.track_replace
                && reference_with(&statics, &parsed, req, Rule::Replace, declared)
                    != (allowed, determining)
            {
                seen.replace_differs += 1;
            }
        }
        Ok(())
    }
}

impl Default for Oracle {
    fn default() -> Self {
        Oracle::new()
    }
}
