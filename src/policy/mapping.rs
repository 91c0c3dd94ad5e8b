//! The default request mapping: request facts and verified identity in; the Cedar
//! principal, action, resource, context and per-request entities out. Context values are
//! first built as a plain JSON tree (shown verbatim by `portcullis check`), then turned
//! directly into Cedar restricted expressions, never through Cedar's JSON parser.

use crate::facts::RequestFacts;
use crate::identity::{Identity, PeerIdentity, TokenClaims};
use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde_json::{Map, Value, json};
use std::str::FromStr;

/// Headers never shown to policies: credentials stay inside the verifier.
const HIDDEN_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];
/// Deepest claim nesting carried into Cedar; deeper values are dropped.
const MAX_DEPTH: usize = 8;

/// A Cedar entity reference as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uid {
    pub kind: String,
    pub id: String,
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{:?}", self.kind, self.id)
    }
}

impl Uid {
    fn new(kind: &str, id: impl Into<String>) -> Uid {
        Uid {
            kind: kind.to_string(),
            id: id.into(),
        }
    }

    /// Fails only for a type name from a route's `context_extensions` that is not a Cedar name.
    pub(crate) fn to_cedar(&self) -> Result<EntityUid, String> {
        let ty = EntityTypeName::from_str(&self.kind)
            .map_err(|_| format!("\"{}\" is not a Cedar entity type", self.kind))?;
        Ok(EntityUid::from_type_name_and_id(
            ty,
            EntityId::new(&self.id),
        ))
    }

    /// A route's resource: a Cedar entity reference such as `Report::"q3"`.
    fn parse(literal: &str) -> Uid {
        match EntityUid::from_str(literal) {
            Ok(uid) => Uid::new(&uid.type_name().to_string(), uid.id().unescaped()),
            // Kept as is; converting it fails, and the request is denied with the reason.
            Err(_) => Uid::new(literal, ""),
        }
    }
}

/// The Cedar request for one HTTP request, before conversion.
#[derive(Debug, Clone)]
pub struct CedarRequest {
    pub principal: Uid,
    pub action: Uid,
    pub resource: Uid,
    pub context: Value,
    /// Parents of the principal (token groups).
    pub principal_parents: Vec<Uid>,
    /// Attributes of the principal (for `User`: `issuer`).
    pub principal_attrs: Map<String, Value>,
    /// Scalar token claims as strings, the `User`'s tags.
    pub principal_tags: Map<String, Value>,
}

/// The Cedar request for `facts` and `identity`, with the credential headers hidden.
pub fn map_request(facts: &RequestFacts, identity: &Identity) -> CedarRequest {
    map_request_hiding(facts, identity, &[])
}

/// [`map_request`], hiding `hidden` headers besides the usual credential headers.
pub fn map_request_hiding(
    facts: &RequestFacts,
    identity: &Identity,
    hidden: &[String],
) -> CedarRequest {
    let token = identity.token();
    let peer = identity.peer();
    let mut principal_parents = Vec::new();
    let mut principal_attrs = Map::new();
    let mut principal_tags = Map::new();
    let principal = match (token, peer) {
        (Some(t), _) => {
            principal_parents = t
                .groups()
                .iter()
                .map(|g| Uid::new("Group", g.clone()))
                .collect();
            principal_attrs.insert("issuer".into(), json!(t.issuer()));
            for (k, v) in t.claims() {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Bool(_) | Value::Number(_) => v.to_string(),
                    _ => continue,
                };
                principal_tags.insert(k.clone(), Value::String(s));
            }
            Uid::new("User", t.principal_id().to_string())
        }
        (None, Some(p)) => Uid::new("Workload", p.workload_id()),
        (None, None) => Uid::new("Anonymous", "anonymous"),
    };

    let headers: Map<String, Value> = facts
        .headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(':') && !HIDDEN_HEADERS.contains(&k.as_str()) && !hidden.contains(k)
        })
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let mut context = Map::new();
    context.insert(
        "request".into(),
        json!({
            "method": facts.method,
            "path": facts.path,
            "query": facts.query,
            "host": facts.host,
            "scheme": facts.scheme,
            "source_address": facts.source_address,
            "headers": headers,
        }),
    );
    if let Some(p) = peer {
        context.insert("peer".into(), peer_record(p));
    }
    if let Some(t) = token {
        context.insert("token".into(), token_record(t));
    }
    if !facts.context_extensions.is_empty() {
        context.insert("route".into(), json!(facts.context_extensions));
    }
    context.insert(
        "binding".into(),
        json!(token.is_some_and(TokenClaims::bound)),
    );

    CedarRequest {
        principal,
        // A route may name its own action and resource (Envoy `context_extensions`).
        action: Uid::new(
            "Action",
            facts
                .context_extensions
                .get("action")
                .unwrap_or(&facts.method)
                .clone(),
        ),
        resource: match facts.context_extensions.get("resource") {
            Some(literal) => Uid::parse(literal),
            None => Uid::new("Path", facts.path.clone()),
        },
        context: Value::Object(context),
        principal_parents,
        principal_attrs,
        principal_tags,
    }
}

fn peer_record(p: &PeerIdentity) -> Value {
    let mut r = json!({
        "uri_sans": p.uri_sans(),
        "dns_sans": p.dns_sans(),
        "email_sans": p.email_sans(),
        "subject": p.subject(),
        "issuer": p.issuer(),
        "serial": p.serial(),
        "fingerprint": p.thumbprint(),
        "not_after": p.not_after(),
    });
    if let (Some(id), Value::Object(m)) = (p.spiffe_id(), &mut r) {
        m.insert("spiffe_id".into(), json!(id.to_string()));
        m.insert("trust_domain".into(), json!(id.trust_domain().as_str()));
    }
    r
}

fn token_record(t: &TokenClaims) -> Value {
    json!({
        "issuer": t.issuer(),
        "subject": t.subject(),
        "audience": t.audience(),
        "scopes": t.scopes(),
        "expires_at": t.expires_at(),
        "claims": t.claims(),
    })
}

/// A JSON value as a Cedar restricted expression: arrays become sets, objects records.
/// Nulls, non-integer numbers and values nested deeper than [`MAX_DEPTH`] have no Cedar
/// form and are left out (so a policy reading them errors, and errors deny).
pub(crate) fn to_cedar(v: &Value, depth: usize) -> Option<RestrictedExpression> {
    if depth > MAX_DEPTH {
        return None;
    }
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(RestrictedExpression::new_bool(*b)),
        Value::Number(n) => n.as_i64().map(RestrictedExpression::new_long),
        Value::String(s) => Some(RestrictedExpression::new_string(s.clone())),
        Value::Array(items) => Some(RestrictedExpression::new_set(
            items.iter().filter_map(|i| to_cedar(i, depth + 1)),
        )),
        Value::Object(m) => RestrictedExpression::new_record(record(m, depth)).ok(),
    }
}

pub(crate) fn record(m: &Map<String, Value>, depth: usize) -> Vec<(String, RestrictedExpression)> {
    m.iter()
        .filter_map(|(k, v)| to_cedar(v, depth + 1).map(|e| (k.clone(), e)))
        .collect()
}

impl CedarRequest {
    /// The per-request entities: the principal (merged with a static entity of the same
    /// id, whose parents and attributes it keeps) and the `Path` resource.
    pub(crate) fn entities(
        &self,
        static_entities: &cedar_policy::Entities,
    ) -> Result<Vec<Entity>, String> {
        let mut out = Vec::with_capacity(2);
        let uid = self.principal.to_cedar()?;
        let existing = static_entities.get(&uid).cloned();
        match (self.principal.kind.as_str(), existing) {
            // Static workloads and users already carry what the operator gave them;
            // only a token's user gains the token's groups, attributes and tags.
            ("User", existing) => {
                let (mut attrs, mut parents) = match existing {
                    Some(e) => {
                        let (_, attrs, parents) = e.into_inner();
                        (
                            attrs.into_iter().collect::<Vec<_>>(),
                            parents.into_iter().collect::<Vec<_>>(),
                        )
                    }
                    None => (Vec::new(), Vec::new()),
                };
                attrs.retain(|(k, _)| !self.principal_attrs.contains_key(k));
                attrs.extend(record(&self.principal_attrs, 0));
                for parent in &self.principal_parents {
                    parents.push(parent.to_cedar()?);
                }
                let tags = record(&self.principal_tags, 0);
                out.push(
                    Entity::new_with_tags(uid, attrs, parents, tags)
                        .map_err(|e| format!("principal entity: {e}"))?,
                );
            }
            (_, Some(_)) => {}
            (_, None) => out.push(Entity::with_uid(uid)),
        }
        let resource = self.resource.to_cedar()?;
        if self.resource.kind == "Path" {
            let attrs = [
                ("path", self.resource.id.clone()),
                (
                    "host",
                    self.context["request"]["host"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), RestrictedExpression::new_string(v)))
            .collect();
            out.push(
                Entity::new(resource, attrs, Default::default())
                    .map_err(|e| format!("resource entity: {e}"))?,
            );
        } else if static_entities.get(&resource).is_none() {
            // A route's own resource keeps whatever the static entities say of it.
            out.push(Entity::with_uid(resource));
        }
        Ok(out)
    }
}
