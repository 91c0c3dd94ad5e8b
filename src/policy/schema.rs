//! The Cedar schema of a configuration (`portcullis schema`): validated settings and the
//! policy directory's static entities in; Cedar schema text out: the default vocabulary
//! (DESIGN.md), `context.token.claims` with the claims the issuers declare, the request
//! headers, `context.time`, and the entity types the static entities use.

use crate::config::Settings;
use crate::declared::ClaimType;
use crate::problem::Problem;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The entity types the mapping itself builds, with their default parents and attributes.
const DEFAULT_TYPES: [&str; 5] = ["Group", "User", "Workload", "Anonymous", "Path"];

/// Request headers declared by default (the schema's headers record is closed: a policy can
/// read only the headers it names).
const DEFAULT_HEADERS: [&str; 2] = ["user-agent", "x-request-id"];

/// The schema text for `settings`, or the problems that keep one from being written (an
/// unreadable entities file, attributes whose values disagree in type).
pub fn for_settings(settings: &Settings) -> Result<String, Vec<Problem>> {
    let mut claims: BTreeMap<&str, &ClaimType> = BTreeMap::new();
    for issuer in &settings.issuers {
        for (name, ty) in &issuer.claims {
            claims.insert(name, ty);
        }
    }
    let entities = match &settings.policy.entities {
        None => EntityTypes::default(),
        Some(path) => {
            let text = crate::files::read_to_string(path)
                .map_err(|e| vec![Problem::new(e.to_string())])?;
            let json: Value = serde_json::from_str(&text).map_err(|e| {
                vec![Problem::new(format!("not JSON: {e}")).in_file(path)]
            })?;
            EntityTypes::of(&json)
                .map_err(|e| e.into_iter().map(|m| Problem::new(m).in_file(path)).collect::<Vec<_>>())?
        }
    };
    Ok(render(&claims, &entities))
}

/// What the static entities say of each entity type: the types of its parents, its
/// attributes (name -> (type, present on every entity of the type)), its tags' type.
#[derive(Debug, Default)]
struct EntityTypes {
    types: BTreeMap<String, TypeInfo>,
}

#[derive(Debug, Default)]
struct TypeInfo {
    count: usize,
    parents: BTreeSet<String>,
    attributes: BTreeMap<String, (String, usize)>,
    tags: Option<String>,
}

impl EntityTypes {
    fn of(json: &Value) -> Result<EntityTypes, Vec<String>> {
        let mut out = EntityTypes::default();
        let mut problems = Vec::new();
        let Some(items) = json.as_array() else {
            return Err(vec!["entities: expected a JSON array of entities".into()]);
        };
        for item in items {
            let Some(kind) = item["uid"]["type"].as_str() else {
                problems.push("entities: an entity without uid.type".into());
                continue;
            };
            // The schema's own action declarations are the actions.
            if kind == "Action" || kind.ends_with("::Action") {
                continue;
            }
            let info = out.types.entry(kind.to_string()).or_default();
            info.count += 1;
            for p in item["parents"].as_array().into_iter().flatten() {
                if let Some(t) = p["type"].as_str() {
                    info.parents.insert(t.to_string());
                }
            }
            for (name, v) in item["attrs"].as_object().into_iter().flatten() {
                let Some(ty) = infer(v) else {
                    problems.push(format!(
                        "entities: {kind} attribute \"{name}\": no Cedar type can be inferred from {v}; write the schema by hand"
                    ));
                    continue;
                };
                let entry = info.attributes.entry(name.clone()).or_insert((ty.clone(), 0));
                if entry.0 != ty {
                    problems.push(format!(
                        "entities: {kind} attribute \"{name}\" is {} on one entity and {ty} on another",
                        entry.0
                    ));
                }
                entry.1 += 1;
            }
            for (name, v) in item["tags"].as_object().into_iter().flatten() {
                match (infer(v), &info.tags) {
                    (Some(ty), None) => info.tags = Some(ty),
                    (Some(ty), Some(known)) if *known == ty => {}
                    _ => problems.push(format!(
                        "entities: {kind} tag \"{name}\": all tags of one type must have one Cedar type"
                    )),
                }
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// The Cedar type of an entity attribute's JSON value (Cedar's entity JSON format).
fn infer(v: &Value) -> Option<String> {
    match v {
        Value::String(_) => Some("String".into()),
        Value::Bool(_) => Some("Bool".into()),
        Value::Number(n) if n.as_i64().is_some() => Some("Long".into()),
        Value::Array(items) => {
            let mut types = items.iter().map(infer);
            let first = types.next().flatten()?;
            types
                .all(|t| t.as_deref() == Some(first.as_str()))
                .then(|| format!("Set<{first}>"))
        }
        Value::Object(m) => {
            if let Some(uid) = m.get("__entity") {
                return uid["type"].as_str().map(str::to_string);
            }
            if let Some(ext) = m.get("__extn") {
                return match ext["fn"].as_str()? {
                    "ip" => Some("ipaddr".into()),
                    "decimal" => Some("decimal".into()),
                    "datetime" => Some("datetime".into()),
                    "duration" => Some("duration".into()),
                    _ => None,
                };
            }
            let fields: Option<Vec<String>> = m
                .iter()
                .map(|(k, v)| infer(v).map(|t| format!("{}: {t}", quoted(k))))
                .collect();
            Some(format!("{{ {} }}", fields?.join(", ")))
        }
        _ => None,
    }
}

/// A record attribute name as the schema writes it: bare when it is an identifier.
fn quoted(name: &str) -> String {
    let ident = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ident {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// `in [A, B]` for a type's parents (the defaults and what the entities add).
fn parents(defaults: &[&str], info: Option<&TypeInfo>) -> String {
    let mut all: BTreeSet<String> = defaults.iter().map(|s| s.to_string()).collect();
    if let Some(i) = info {
        all.extend(i.parents.iter().cloned());
    }
    if all.is_empty() {
        String::new()
    } else {
        format!(" in [{}]", all.into_iter().collect::<Vec<_>>().join(", "))
    }
}

/// The attributes the static entities give a type, beyond `known`, each optional unless
/// every entity of the type has it (optional for the default types, whose request-built
/// entities never carry them).
fn extra_attributes(info: Option<&TypeInfo>, known: &[&str], always_optional: bool) -> String {
    let Some(info) = info else {
        return String::new();
    };
    info.attributes
        .iter()
        .filter(|(name, _)| !known.contains(&name.as_str()))
        .map(|(name, (ty, seen))| {
            let optional = always_optional || *seen < info.count;
            format!("  {}{}: {ty},\n", quoted(name), if optional { "?" } else { "" })
        })
        .collect()
}

fn render(claims: &BTreeMap<&str, &ClaimType>, entities: &EntityTypes) -> String {
    let info = |t: &str| entities.types.get(t);
    let mut s = String::new();
    s.push_str(
        "// Portcullis's Cedar vocabulary for this configuration, as `portcullis schema` prints it\n\
         // (docs/SCHEMA-AND-TIME.md). Policies are validated strictly against it at load.\n\n",
    );
    s.push_str("// Groups and roles: from a token's groups claim, or declared in entities.json.\n");
    s.push_str(&format!("entity Group{}", parents(&["Group"], info("Group"))));
    push_attributes(&mut s, &extra_attributes(info("Group"), &[], true), ";\n\n");
    s.push_str(
        "// The principal when a token was verified: id = the token's `sub` (with the issuer's\n\
         // id prefix). String claims are the entity's tags: principal.getTag(\"email\").\n",
    );
    s.push_str(&format!(
        "entity User{} {{\n  issuer: String,\n{}}} tags String;\n\n",
        parents(&["Group"], info("User")),
        extra_attributes(info("User"), &["issuer"], true)
    ));
    s.push_str(
        "// The principal when only a client certificate was verified: id = the SPIFFE ID\n\
         // (else first DNS SAN, else subject). entities.json may place workloads in groups.\n",
    );
    s.push_str(&format!("entity Workload{}", parents(&["Group"], info("Workload"))));
    push_attributes(&mut s, &extra_attributes(info("Workload"), &[], true), ";\n\n");
    s.push_str("// The principal when nothing was verified.\n");
    s.push_str(&format!("entity Anonymous{}", parents(&[], info("Anonymous"))));
    push_attributes(&mut s, &extra_attributes(info("Anonymous"), &[], true), ";\n\n");
    s.push_str("// The resource: the request path without its query.\n");
    s.push_str(&format!(
        "entity Path{} {{\n  path: String,\n  host: String,\n{}}};\n\n",
        parents(&[], info("Path")),
        extra_attributes(info("Path"), &["path", "host"], true)
    ));
    let others: Vec<_> = entities
        .types
        .iter()
        .filter(|(t, _)| !DEFAULT_TYPES.contains(&t.as_str()))
        .collect();
    if !others.is_empty() {
        s.push_str("// Entity types of the static entities (entities.json).\n");
        for (name, i) in others {
            s.push_str(&format!("entity {name}{}", parents(&[], Some(i))));
            let attrs = extra_attributes(Some(i), &[], false);
            push_attributes(&mut s, &attrs, "");
            match &i.tags {
                Some(t) => s.push_str(&format!(" tags {t};\n")),
                None => s.push_str(";\n"),
            }
        }
        s.push('\n');
    }
    s.push_str(
        "type RequestInfo = {\n  method: String,\n  path: String,\n  query: String,\n  host: String,\n  scheme: String,\n  source_address: String,\n\
         \x20 // Request headers (lower-case names). The record is closed: declare each header a\n\
         \x20 // policy reads here, as \"name\"?: String. authorization, proxy-authorization, cookie\n\
         \x20 // and the configured token header are never included.\n  headers: {\n",
    );
    for h in DEFAULT_HEADERS {
        s.push_str(&format!("    {h:?}?: String,\n"));
    }
    s.push_str("  },\n};\n\n");
    s.push_str(
        "type PeerInfo = {\n  spiffe_id?: String,\n  trust_domain?: String,\n  uri_sans: Set<String>,\n  dns_sans: Set<String>,\n  email_sans: Set<String>,\n  subject: String,\n  issuer: String,\n  serial: String,\n  fingerprint: String,\n  not_after: Long,\n};\n\n",
    );
    s.push_str(
        "type TokenInfo = {\n  issuer: String,\n  subject: String,\n  audience: Set<String>,\n  scopes: Set<String>,\n  expires_at: Long,\n\
         \x20 // The claims the issuers declare in [issuer.claims], each optional (a token may\n\
         \x20 // lack it). A token whose declared claim has another type is rejected.\n  claims: {\n",
    );
    for (name, ty) in claims {
        s.push_str(&format!("    {}?: {ty},\n", quoted(name)));
    }
    s.push_str("  },\n};\n\n");
    s.push_str(
        "// The request time: the instant the engine decided at, and its reading in\n\
         // [policy] time_zone (UTC by default). `local` is the local wall clock as a datetime\n\
         // (its toDate() and toTime() are the local ones); compare instants with `now`.\n\
         type TimeInfo = {\n  now: datetime,\n  unix: Long,\n  local: datetime,\n  time_zone: String,\n  date: String,\n  day_of_week: String,\n  hour: Long,\n  minute: Long,\n};\n\n",
    );
    s.push_str(
        "type HttpContext = {\n  request: RequestInfo,\n  peer?: PeerInfo,\n  token?: TokenInfo,\n  binding: Bool,\n  time: TimeInfo,\n};\n\n",
    );
    s.push_str(
        "// Action groups, so that `action in Action::\"read\"` covers the safe methods.\n\
         action read, write;\n\n\
         action \"GET\", \"HEAD\", \"OPTIONS\" in [Action::\"read\"] appliesTo {\n  principal: [User, Workload, Anonymous],\n  resource: [Path],\n  context: HttpContext,\n};\n\n\
         action \"POST\", \"PUT\", \"PATCH\", \"DELETE\" in [Action::\"write\"] appliesTo {\n  principal: [User, Workload, Anonymous],\n  resource: [Path],\n  context: HttpContext,\n};\n",
    );
    s
}

/// ` {\n<attrs>}` then `end`, or just `end` when there are none.
fn push_attributes(s: &mut String, attrs: &str, end: &str) {
    if !attrs.is_empty() {
        s.push_str(&format!(" {{\n{attrs}}}"));
    }
    s.push_str(end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entity_types_and_attributes_are_inferred() {
        let e = EntityTypes::of(&json!([
            {"uid": {"type": "Folder", "id": "a"}, "attrs": {"level": 1, "owner": {"__entity": {"type": "User", "id": "x"}}}, "parents": []},
            {"uid": {"type": "Folder", "id": "b"}, "attrs": {"level": 2}, "parents": [{"type": "Folder", "id": "a"}]},
            {"uid": {"type": "Group", "id": "g"}, "attrs": {}, "parents": [{"type": "Folder", "id": "a"}]},
        ]))
        .expect("inferred");
        let text = render(&BTreeMap::new(), &e);
        assert!(text.contains("entity Folder in [Folder] {\n  level: Long,\n  owner?: User,\n};"), "{text}");
        assert!(text.contains("entity Group in [Folder, Group];"), "{text}");
        let (_, _warnings) =
            cedar_policy::Schema::from_cedarschema_str(&text).expect("a valid schema");
        let bad = EntityTypes::of(&json!([
            {"uid": {"type": "Folder", "id": "a"}, "attrs": {"level": 1}, "parents": []},
            {"uid": {"type": "Folder", "id": "b"}, "attrs": {"level": "2"}, "parents": []},
        ]))
        .expect_err("disagreeing types");
        assert!(bad[0].contains("is Long on one entity and String on another"), "{bad:?}");
    }

    #[test]
    fn declared_claims_are_optional_attributes() {
        let level = ClaimType::Long;
        let roles = ClaimType::parse("Set<String>").unwrap();
        let claims = BTreeMap::from([("level", &level), ("roles", &roles), ("x-y", &level)]);
        let text = render(&claims, &EntityTypes::default());
        assert!(text.contains("    level?: Long,\n    roles?: Set<String>,\n    \"x-y\"?: Long,\n"), "{text}");
        let (_, _warnings) =
            cedar_policy::Schema::from_cedarschema_str(&text).expect("a valid schema");
    }
}
