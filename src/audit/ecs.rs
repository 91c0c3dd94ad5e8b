//! The audit line in Elastic Common Schema 8 (`format = "ecs"`): a pure mapping from our
//! JSON line (a decision, or an event line with a `type`) to ECS fields, with what ECS has
//! no field for under `portcullis.*`. Goes in: the line's JSON object; comes out: the ECS
//! object.

use serde_json::{Map, Value, json};

/// The ECS version the mapping follows.
pub(crate) const ECS_VERSION: &str = "8.11.0";

/// Deny reasons that mean a credential was missing or failed verification: ECS category
/// `authentication` as well as `iam`.
/// (`DenyReason::code` in src/engine.rs.)
const CREDENTIAL_REASONS: &[&str] = &["certificate_required", "invalid_certificate", "invalid_token"];

/// Deny reasons about the request or the server rather than who asked: ECS category
/// `network` as well as `iam`.
const NETWORK_REASONS: &[&str] = &[
    "unreadable_request",
    "request_too_large",
    "overloaded",
    "deadline",
];

/// Puts `value` at the dotted `path` of `root` (creating the objects on the way), unless it
/// is null.
fn put(root: &mut Map<String, Value>, path: &str, value: Value) {
    if value.is_null() {
        return;
    }
    let mut parts = path.split('.').peekable();
    let mut at = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            at.insert(part.to_string(), value);
            return;
        }
        let next = at
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        let Value::Object(next) = next else {
            return;
        };
        at = next;
    }
}

/// The Cedar entity id inside a uid such as `User::"alice"` (`alice`), or the whole text.
fn entity_id(uid: &str) -> &str {
    uid.split_once("::\"")
        .and_then(|(_, rest)| rest.strip_suffix('"'))
        .unwrap_or(uid)
}

/// Our audit line as an ECS 8 document. Fields ECS has no place for go under
/// `portcullis.*`; `seq` and `prev` (the hash chain) are kept under `portcullis.chain`.
pub(crate) fn ecs(line: &Value) -> Value {
    let get = |name: &str| line.get(name).cloned().unwrap_or(Value::Null);
    let mut out = Map::new();
    put(&mut out, "@timestamp", get("time"));
    put(&mut out, "ecs.version", json!(ECS_VERSION));
    put(&mut out, "event.kind", json!("event"));
    put(&mut out, "event.module", json!("portcullis"));
    put(&mut out, "event.dataset", json!("portcullis.audit"));
    put(&mut out, "portcullis.chain.seq", get("seq"));
    put(&mut out, "portcullis.chain.prev", get("prev"));

    if let Some(kind) = line.get("type").and_then(Value::as_str) {
        // An event line of our own (a checkpoint, ...): kept whole under portcullis.
        put(&mut out, "event.action", json!(kind));
        put(&mut out, "event.category", json!(["configuration"]));
        put(&mut out, "event.type", json!(["info"]));
        let mut rest = line.clone();
        if let Some(rest) = rest.as_object_mut() {
            for known in ["type", "time", "seq", "prev"] {
                rest.remove(known);
            }
        }
        put(&mut out, &format!("portcullis.{kind}"), rest);
        return Value::Object(out);
    }

    let allowed = line.get("decision").and_then(Value::as_str) == Some("allow");
    let reason = line.get("reason").and_then(Value::as_str);
    let mut category = vec!["iam"];
    match reason {
        Some(r) if CREDENTIAL_REASONS.contains(&r) => category.insert(0, "authentication"),
        Some(r) if NETWORK_REASONS.contains(&r) => category.push("network"),
        _ => {}
    }
    put(&mut out, "event.category", json!(category));
    put(
        &mut out,
        "event.type",
        json!([if allowed { "allowed" } else { "denied" }, "access"]),
    );
    put(&mut out, "event.action", json!("authorization-decision"));
    put(
        &mut out,
        "event.outcome",
        json!(if allowed { "success" } else { "failure" }),
    );
    put(&mut out, "event.id", get("decision_id"));
    put(&mut out, "event.reason", get("reason"));
    if let Some(us) = line.get("latency_us").and_then(Value::as_u64) {
        put(&mut out, "event.duration", json!(us.saturating_mul(1000)));
    }
    put(&mut out, "http.request.id", get("request_id"));
    if let Some(principal) = line.get("principal").and_then(Value::as_str) {
        put(&mut out, "user.id", json!(principal));
        put(&mut out, "user.name", json!(entity_id(principal)));
    }
    if let Some(policies) = line.get("policies").and_then(Value::as_array) {
        if !policies.is_empty() {
            put(&mut out, "rule.id", json!(policies));
            put(&mut out, "rule.name", json!(policies));
        }
    }
    put(&mut out, "labels.enforced", get("enforced"));
    put(&mut out, "portcullis.decision", get("decision"));
    put(&mut out, "portcullis.action", get("action"));
    put(&mut out, "portcullis.resource", get("resource"));
    put(&mut out, "portcullis.reasons", get("reasons"));
    put(&mut out, "portcullis.cedar_request", get("cedar_request"));
    put(&mut out, "portcullis.shadow", get("shadow"));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(decision: &str, reason: Option<&str>) -> Value {
        json!({
            "time": "2026-12-03T15:00:00.000001Z",
            "decision_id": "d-1",
            "request_id": "r-1",
            "decision": decision,
            "enforced": true,
            "reason": reason,
            "principal": if reason == Some("certificate_required") { Value::Null } else { json!("User::\"alice\"") },
            "action": "Action::\"GET\"",
            "resource": "Path::\"/admin\"",
            "policies": if decision == "allow" { json!(["policy0"]) } else { json!([]) },
            "reasons": ["no permit"],
            "latency_us": 42,
            "seq": 7,
            "prev": "00",
        })
    }

    #[test]
    fn decision_lines_map_to_ecs_fields() {
        // (line, field path, expected value; null = absent)
        let allow = decision("allow", None);
        let forbidden = decision("deny", Some("forbidden"));
        let bad_cert = decision("deny", Some("invalid_certificate"));
        let no_creds = decision("deny", Some("certificate_required"));
        let bad_token = decision("deny", Some("invalid_token"));
        let overloaded = decision("deny", Some("overloaded"));
        let checkpoint = json!({"type": "checkpoint", "time": "t", "covers": 3, "head": "ab",
            "every": 4, "key_id": "k", "sig": "s", "seq": 4, "prev": "ab"});
        let cases: Vec<(&Value, &str, Value)> = vec![
            (&allow, "/@timestamp", json!("2026-12-03T15:00:00.000001Z")),
            (&allow, "/ecs/version", json!(ECS_VERSION)),
            (&allow, "/event/kind", json!("event")),
            (&allow, "/event/category", json!(["iam"])),
            (&allow, "/event/type", json!(["allowed", "access"])),
            (&allow, "/event/action", json!("authorization-decision")),
            (&allow, "/event/outcome", json!("success")),
            (&allow, "/event/id", json!("d-1")),
            (&allow, "/event/reason", Value::Null),
            (&allow, "/event/duration", json!(42_000)),
            (&allow, "/http/request/id", json!("r-1")),
            (&allow, "/user/id", json!("User::\"alice\"")),
            (&allow, "/user/name", json!("alice")),
            (&allow, "/rule/id", json!(["policy0"])),
            (&allow, "/rule/name", json!(["policy0"])),
            (&allow, "/labels/enforced", json!(true)),
            (&allow, "/portcullis/action", json!("Action::\"GET\"")),
            (&allow, "/portcullis/resource", json!("Path::\"/admin\"")),
            (&allow, "/portcullis/reasons", json!(["no permit"])),
            (&allow, "/portcullis/chain/seq", json!(7)),
            (&allow, "/portcullis/chain/prev", json!("00")),
            (&forbidden, "/event/outcome", json!("failure")),
            (&forbidden, "/event/type", json!(["denied", "access"])),
            (&forbidden, "/event/reason", json!("forbidden")),
            (&forbidden, "/event/category", json!(["iam"])),
            (&forbidden, "/rule/id", Value::Null),
            (&no_creds, "/event/category", json!(["authentication", "iam"])),
            (&no_creds, "/user", Value::Null),
            (&bad_token, "/event/category", json!(["authentication", "iam"])),
            (&bad_cert, "/event/category", json!(["authentication", "iam"])),
            (&overloaded, "/event/category", json!(["iam", "network"])),
            (&checkpoint, "/event/action", json!("checkpoint")),
            (&checkpoint, "/event/kind", json!("event")),
            (&checkpoint, "/@timestamp", json!("t")),
            (&checkpoint, "/event/outcome", Value::Null),
            (&checkpoint, "/portcullis/checkpoint/covers", json!(3)),
            (&checkpoint, "/portcullis/checkpoint/sig", json!("s")),
            (&checkpoint, "/portcullis/checkpoint/seq", Value::Null),
            (&checkpoint, "/portcullis/chain/seq", json!(4)),
        ];
        for (line, path, expected) in cases {
            let out = ecs(line);
            assert_eq!(
                out.pointer(path).cloned().unwrap_or(Value::Null),
                expected,
                "{path} of {line}"
            );
        }
    }

    #[test]
    fn entity_ids_are_taken_from_uids() {
        let cases = [
            ("User::\"alice\"", "alice"),
            ("Ns::User::\"bob\"", "bob"),
            ("spiffe://x/y", "spiffe://x/y"),
            ("User::\"a::\\\"b\"", "a::\\\"b"),
        ];
        for (uid, id) in cases {
            assert_eq!(entity_id(uid), id, "{uid}");
        }
    }
}
