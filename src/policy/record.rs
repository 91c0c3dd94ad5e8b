//! A Cedar request as an audit line records it (`[audit] record_requests`) and as
//! `portcullis replay` reads it back: the principal, its parents, the action, the resource
//! and the full (unpruned) context in; the same Cedar request, with the request's own
//! entities rebuilt the way the mapping builds them, out. The static entities come from
//! the policy set it is evaluated against, not from the line.
//!
//! SECURITY: the record holds what policies saw, never a credential: the context already
//! leaves out `authorization`, `proxy-authorization`, `cookie` and the configured token
//! header; the record also leaves out the headers that carry a client certificate
//! (`x-forwarded-client-cert`, `[peer] header`). A token's claims are recorded: they are
//! what policies read (docs/CHANGING-POLICIES.md).

use super::mapping::{CedarRequest, Uid, merge_entities, resource_entity, to_value};
use cedar_policy::{Context, Entity, EntityUid, RestrictedExpression};
use cedar_policy_core::ast::Context as CoreContext;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most parents a recorded principal may have: a token's groups, bounded by its size.
const MAX_PARENTS: usize = 4096;

/// Headers that carry a client certificate: never recorded, whatever policies see.
const CERTIFICATE_HEADERS: &[&str] = &["x-forwarded-client-cert"];

/// Why a recorded request cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(String);

/// A Cedar request read back from an audit line.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The principal.
    pub principal: Uid,
    /// The principal's parents (a token's groups).
    pub parents: Vec<Uid>,
    /// The action.
    pub action: Uid,
    /// The resource.
    pub resource: Uid,
    /// The context, whole.
    context: Map<String, Value>,
}

fn uid_json(uid: &Uid) -> Value {
    json!({ "type": uid.kind, "id": uid.id })
}

/// The record of `request` for an audit line: its uids, the principal's parents and the
/// full context, without `drop_headers` (lower-case names; a certificate in a header).
pub(crate) fn record(request: &CedarRequest, drop_headers: &[String]) -> Value {
    let mut context = request.context();
    if let Some(Value::Object(headers)) = context.pointer_mut("/request/headers") {
        headers.retain(|name, _| {
            !CERTIFICATE_HEADERS.contains(&name.as_str()) && !drop_headers.contains(name)
        });
    }
    json!({
        "principal": uid_json(&request.principal),
        "parents": request.principal_parents().iter().map(uid_json).collect::<Vec<_>>(),
        "action": uid_json(&request.action),
        "resource": uid_json(&request.resource),
        "context": context,
    })
}

fn uid_of(value: Option<&Value>, what: &str) -> Result<Uid, RecordError> {
    let get = |name: &str| {
        value
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .ok_or_else(|| RecordError(format!("{what}: expected {{\"type\": ..., \"id\": ...}}")))
    };
    let uid = Uid::new(get("type")?, get("id")?);
    uid.to_cedar()
        .map_err(|e| RecordError(format!("{what}: {e}")))?;
    Ok(uid)
}

impl RecordedRequest {
    /// Reads a record written by an audit line. Every part is checked: a tampered line is
    /// an error, never a request with parts missing.
    pub fn from_json(record: &Value) -> Result<RecordedRequest, RecordError> {
        if !record.is_object() {
            return Err(RecordError("not an object".into()));
        }
        let principal = uid_of(record.get("principal"), "principal")?;
        let action = uid_of(record.get("action"), "action")?;
        let resource = uid_of(record.get("resource"), "resource")?;
        let parents = match record.get("parents") {
            None => Vec::new(),
            Some(Value::Array(items)) if items.len() <= MAX_PARENTS => items
                .iter()
                .map(|p| uid_of(Some(p), "parents"))
                .collect::<Result<_, _>>()?,
            Some(Value::Array(_)) => {
                return Err(RecordError(format!("parents: more than {MAX_PARENTS}")));
            }
            Some(_) => return Err(RecordError("parents: expected an array".into())),
        };
        let context = match record.get("context") {
            Some(Value::Object(m)) => m.clone(),
            _ => return Err(RecordError("context: expected an object".into())),
        };
        Ok(RecordedRequest {
            principal,
            parents,
            action,
            resource,
            context,
        })
    }

    pub(crate) fn uids(&self) -> Result<(EntityUid, EntityUid, EntityUid), String> {
        Ok((
            self.principal.to_cedar()?,
            self.action.to_cedar()?,
            self.resource.to_cedar()?,
        ))
    }

    /// The context as Cedar takes it: every recorded field (a policy set reads what it
    /// reads; the rest is invisible to it).
    pub(crate) fn cedar_context(&self) -> Result<Context, String> {
        let record: BTreeMap<_, _> = self
            .context
            .iter()
            .filter_map(|(k, v)| to_value(v, 1).map(|v| (k.as_str().into(), v)))
            .collect();
        Ok(Context::from(CoreContext::Value(Arc::new(record))))
    }

    /// The request's own entities as the mapping builds them (`CedarRequest::entities`):
    /// a token's user with its issuer, its string claims as tags and its groups as parents;
    /// a workload or anonymous principal the static entities lack; the `Path` resource with
    /// its path and host. Each merged with its static namesake.
    pub(crate) fn entities(
        &self,
        static_entities: &cedar_policy::Entities,
    ) -> Result<Vec<Entity>, String> {
        let mut out = Vec::with_capacity(2);
        let merged = |own: Entity| match static_entities.get(&own.uid()) {
            Some(known) => merge_entities(known, own),
            None => own,
        };
        let uid = self.principal.to_cedar()?;
        match (self.context.get("token"), static_entities.get(&uid)) {
            (Some(token), _) => {
                let attrs = token
                    .get("issuer")
                    .and_then(Value::as_str)
                    .map(|i| {
                        (
                            "issuer".to_string(),
                            RestrictedExpression::new_string(i.to_string()),
                        )
                    })
                    .into_iter()
                    .collect::<Vec<_>>();
                // SECURITY: as the mapping: only string claims become tags.
                let tags = token
                    .get("claims")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| {
                        v.as_str()
                            .map(|s| (k.clone(), RestrictedExpression::new_string(s.to_string())))
                    })
                    .collect::<Vec<_>>();
                let parents = self
                    .parents
                    .iter()
                    .map(Uid::to_cedar)
                    .collect::<Result<Vec<_>, _>>()?;
                let own = Entity::new_with_tags(uid, attrs, parents, tags)
                    .map_err(|e| format!("principal entity: {e}"))?;
                out.push(merged(own));
            }
            (None, Some(_)) => {}
            (None, None) => out.push(Entity::with_uid(uid)),
        }
        let host = self
            .context
            .get("request")
            .and_then(|r| r.get("host"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        out.extend(resource_entity(&self.resource, host, static_entities)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicySettings;
    use crate::facts::RequestFacts;
    use crate::identity::{Identity, PeerOutcome, TokenClaims, TokenOutcome};

    /// A recorded request, read back, decides as the live request did, for policies that
    /// read the token's user, its tags and groups, the context, the resource's attributes.
    #[test]
    fn a_recorded_request_decides_as_the_live_one() {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(
            dir.path().join("p.cedar"),
            r#"
            @id("dept") permit (principal, action == Action::"GET", resource)
                when { principal.getTag("dept") == "eng" && resource.host == "api" };
            @id("admins") permit (principal in Group::"admins", action, resource);
            @id("issuer") permit (principal, action == Action::"PUT", resource)
                when { principal.issuer == "https://issuer.test" && context.request.headers.x == "1" };
            @id("level") forbid (principal, action, resource)
                when { context.token.claims has level && context.token.claims.level > 5 };
            "#,
        )
        .expect("write");
        let snapshot = crate::policy::load(&PolicySettings {
            dir: dir.path().to_path_buf(),
            schema: None,
            entities: None,
            hidden_headers: Vec::new(),
            time_zone: Default::default(),
            declared_claims: None,
        })
        .expect("load");
        let identity = |claims: Value| Identity {
            peer: PeerOutcome::NotPresented,
            token: TokenOutcome::Verified(TokenClaims::for_policy_test(
                "https://issuer.test",
                "alice",
                claims.as_object().cloned().unwrap_or_default(),
                "groups",
                false,
            )),
        };
        let facts = |method: &str, host: &str, x: &str| RequestFacts {
            method: method.into(),
            path: "/a".into(),
            host: host.into(),
            headers: [("x".to_string(), x.to_string())].into_iter().collect(),
            ..RequestFacts::default()
        };
        let cases = [
            (facts("GET", "api", "0"), json!({"dept": "eng"})),
            (facts("GET", "web", "0"), json!({"dept": "eng"})),
            (facts("DELETE", "api", "0"), json!({"groups": ["admins"]})),
            (facts("DELETE", "api", "0"), json!({"groups": ["staff"]})),
            (facts("PUT", "api", "1"), json!({})),
            (facts("PUT", "api", "2"), json!({})),
            (facts("GET", "api", "0"), json!({"dept": "eng", "level": 7})),
            (facts("GET", "api", "0"), json!({"dept": 3})),
        ];
        let mut allowed = 0;
        for (facts, claims) in cases {
            let live = snapshot.evaluate(&facts, &identity(claims.clone()), std::time::SystemTime::now());
            let line = record(&live.request, &[]);
            let text = line.to_string();
            let back = RecordedRequest::from_json(&serde_json::from_str(&text).expect("json"))
                .expect("record reads back");
            let replayed = snapshot.judge_recorded(&back);
            assert_eq!(replayed.allowed, live.allowed, "{claims} {text}");
            assert_eq!(replayed.determining, live.determining, "{claims}");
            allowed += usize::from(live.allowed);
        }
        assert_eq!(allowed, 3, "the cases cover allows and denies");
    }

    #[test]
    fn tampered_records_are_errors() {
        let good = json!({"principal": {"type": "User", "id": "a"}, "parents": [],
            "action": {"type": "Action", "id": "GET"}, "resource": {"type": "Path", "id": "/"},
            "context": {}});
        assert!(RecordedRequest::from_json(&good).is_ok());
        let cases = [
            ("/principal", json!("User::\"a\"")),
            ("/principal", json!({"type": "not a type!", "id": "a"})),
            ("/action", json!({"type": "Action", "id": 3})),
            ("/parents", json!({"type": "Group", "id": "g"})),
            ("/parents", json!([{"type": "Group"}])),
            ("/context", json!([])),
            ("/resource", Value::Null),
        ];
        for (path, value) in cases {
            let mut bad = good.clone();
            if let Some(v) = bad.pointer_mut(path) {
                *v = value.clone();
            }
            assert!(
                RecordedRequest::from_json(&bad).is_err(),
                "{path} = {value}"
            );
        }
        assert!(RecordedRequest::from_json(&json!("x")).is_err());
    }

    #[test]
    fn certificate_headers_are_not_recorded() {
        let facts = RequestFacts {
            method: "GET".into(),
            path: "/".into(),
            headers: [
                ("x-forwarded-client-cert", "Cert=\"-----BEGIN\""),
                ("ssl-client-cert", "-----BEGIN"),
                ("x-ok", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..RequestFacts::default()
        };
        let identity = Identity {
            peer: PeerOutcome::NotPresented,
            token: TokenOutcome::NotPresented,
        };
        let request = crate::policy::map_request(&facts, &identity);
        let line = record(&request, &["ssl-client-cert".to_string()]);
        let headers = &line["context"]["request"]["headers"];
        assert_eq!(headers, &json!({"x-ok": "1"}));
    }
}
