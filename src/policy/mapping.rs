//! The default request mapping: request facts and verified identity in; the Cedar
//! principal, action, resource, context and per-request entities out. Context values are
//! first built as a plain JSON tree (shown verbatim by `portcullis check`), then turned
//! directly into Cedar's evaluated values, never through Cedar's JSON parser or its
//! expression evaluator; the records of a certificate and a token are turned once and
//! shared by every request that carries them.

use super::demand::{Demand, Fields};
use crate::declared::TimeZoneSetting;
use crate::facts::RequestFacts;
use crate::identity::{Identity, PeerIdentity, TokenClaims};
use cedar_policy::{Context, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use cedar_policy_core::ast::{Context as CoreContext, Value as CedarValue};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

/// Headers never shown to policies: credentials stay inside the verifier.
const HIDDEN_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];
/// Deepest claim nesting carried into Cedar; deeper values are dropped.
const MAX_DEPTH: usize = 8;

/// The entity types the mapping itself names, parsed once.
static KNOWN_TYPES: LazyLock<Vec<(&'static str, EntityTypeName)>> = LazyLock::new(|| {
    ["Action", "Path", "User", "Group", "Workload", "Anonymous"]
        .into_iter()
        .filter_map(|k| EntityTypeName::from_str(k).ok().map(|t| (k, t)))
        .collect()
});

/// A Cedar entity reference as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uid {
    /// The entity type, such as `User`.
    pub kind: String,
    /// The entity id.
    pub id: String,
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{:?}", self.kind, self.id)
    }
}

impl Uid {
    pub(crate) fn new(kind: &str, id: impl Into<String>) -> Uid {
        Uid {
            kind: kind.to_string(),
            id: id.into(),
        }
    }

    /// Fails only for a type name from a route's `context_extensions` that is not a Cedar name.
    pub(crate) fn to_cedar(&self) -> Result<EntityUid, String> {
        let known = KNOWN_TYPES.iter().find(|(k, _)| *k == self.kind);
        let ty = match known {
            Some((_, ty)) => ty.clone(),
            None => EntityTypeName::from_str(&self.kind)
                .map_err(|_| format!("\"{}\" is not a Cedar entity type", self.kind))?,
        };
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
    /// The principal (`User`, `Workload`, `Anonymous`).
    pub principal: Uid,
    /// The action (`Action::"GET"`).
    pub action: Uid,
    /// The resource (`Path`, or the route's).
    pub resource: Uid,
    /// `context.request`.
    request: Value,
    /// The verified certificate and its Cedar form (`context.peer`), when one verified.
    peer: Option<(Arc<PeerIdentity>, Arc<PeerForm>)>,
    /// The token, when one verified, and its Cedar form (`context.token` and its user).
    token: Option<(TokenClaims, Arc<TokenForm>)>,
    /// `context.route`: the route's `context_extensions`, when it has any.
    route: Option<Value>,
    /// `context.binding`.
    binding: bool,
    /// `context.time`; `None` when no policy reads it (then it is not worked out at all),
    /// or for a `now` out of range (then a policy reading it errors, and errors deny).
    time: Option<RequestTime>,
}

/// The request time as policies read it (`context.time`): the engine's `now`, the very
/// instant the token's expiry was checked at, and its wall-clock reading in the configured
/// time zone. Its Cedar form is built only when a policy reads it, and never kept: each
/// request has its own, so no cache can serve a decision made at another time.
#[derive(Debug, Clone)]
pub(crate) struct RequestTime {
    now: jiff::Timestamp,
    zone: Arc<TimeZoneSetting>,
}

/// One field of `context.time`, before conversion.
enum TimePart {
    DateTime(String),
    Long(i64),
    Text(String),
}

impl RequestTime {
    pub(crate) fn new(now: SystemTime, zone: &Arc<TimeZoneSetting>) -> Option<RequestTime> {
        jiff::Timestamp::try_from(now)
            .ok()
            .map(|now| RequestTime {
                now,
                zone: zone.clone(),
            })
    }

    /// The fields, in the order the documentation lists them.
    fn parts(&self) -> [(&'static str, TimePart); 8] {
        let utc = jiff::tz::TimeZone::UTC.to_datetime(self.now);
        let local = self.zone.zone().to_datetime(self.now);
        let day = match local.weekday() {
            jiff::civil::Weekday::Monday => "Mon",
            jiff::civil::Weekday::Tuesday => "Tue",
            jiff::civil::Weekday::Wednesday => "Wed",
            jiff::civil::Weekday::Thursday => "Thu",
            jiff::civil::Weekday::Friday => "Fri",
            jiff::civil::Weekday::Saturday => "Sat",
            jiff::civil::Weekday::Sunday => "Sun",
        };
        [
            ("now", TimePart::DateTime(cedar_datetime(utc))),
            ("unix", TimePart::Long(self.now.as_second())),
            // The local wall clock written as a Cedar datetime: Cedar's datetimes are
            // instants whose `toDate()` and `toTime()` read UTC, so the local reading is
            // given as the instant whose UTC reading it is.
            ("local", TimePart::DateTime(cedar_datetime(local))),
            ("time_zone", TimePart::Text(self.zone.name().to_string())),
            (
                "date",
                TimePart::Text(format!(
                    "{:04}-{:02}-{:02}",
                    local.year(),
                    local.month(),
                    local.day()
                )),
            ),
            ("day_of_week", TimePart::Text(day.to_string())),
            ("hour", TimePart::Long(local.hour().into())),
            ("minute", TimePart::Long(local.minute().into())),
        ]
    }

    /// As plain JSON, datetimes in Cedar's JSON form (`{"__extn": ...}`).
    fn json(&self) -> Value {
        Value::Object(
            self.parts()
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        TimePart::DateTime(d) => {
                            json!({ "__extn": { "fn": "datetime", "arg": d } })
                        }
                        TimePart::Long(n) => json!(n),
                        TimePart::Text(t) => json!(t),
                    };
                    (k.to_string(), v)
                })
                .collect(),
        )
    }

    /// As a Cedar record of the fields `fields` reads.
    fn cedar(&self, fields: &Fields) -> CedarValue {
        CedarValue::record(
            self.parts().into_iter().filter_map(|(k, v)| {
                if !fields.whole() && fields.named(k).is_none() {
                    return None;
                }
                let v = match v {
                    TimePart::DateTime(d) => datetime_value(&d)?,
                    TimePart::Long(n) => CedarValue::from(n),
                    TimePart::Text(t) => CedarValue::from(t.as_str()),
                };
                Some((k, v))
            }),
            None,
        )
    }
}

/// `2026-12-03T10:00:00.000Z`, a form Cedar's `datetime` parses.
fn cedar_datetime(d: jiff::civil::DateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        d.year(),
        d.month(),
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
        d.millisecond()
    )
}

/// A Cedar `datetime` value, as Cedar's own evaluation of `datetime("...")` gives it (its
/// values are private to Cedar); `None` for a text it refuses, so that a policy reading the
/// field errors, and errors deny.
fn datetime_value(text: &str) -> Option<CedarValue> {
    let c = Context::from_pairs([(
        "v".to_string(),
        RestrictedExpression::new_datetime(text),
    )])
    .ok()?;
    match c.as_ref() {
        CoreContext::Value(m) => m.get("v").cloned(),
        CoreContext::RestrictedResidual(_) => None,
    }
}

/// A verified certificate as Cedar sees it: `context.peer`, holding only what the policies
/// can read (their [`Demand`]). Built once per certificate and kept with its identity (so
/// in the certificate cache too): a warm request reuses it while the policies demand the
/// same. Its JSON form is not kept, only rebuilt for display.
pub struct PeerForm {
    /// What it was built for.
    demand: Arc<Demand>,
    /// `context.peer`; `None` when no policy reads it.
    record: Option<CedarValue>,
}

impl PeerForm {
    fn of(p: &PeerIdentity, demand: &Arc<Demand>) -> Arc<PeerForm> {
        kept_form(
            p.derived(),
            demand,
            |f: &PeerForm| &f.demand,
            || PeerForm {
                demand: demand.clone(),
                record: demand
                    .context
                    .field("peer")
                    .and_then(|fields| to_value_read(&peer_record(p), fields, 1)),
            },
        )
    }
}

/// A verified token as Cedar sees it: `context.token` and the `User` principal with the
/// token's groups, attributes and tags, holding only what the policies can read (their
/// [`Demand`]). Built once per token and kept with its claims (so in the token cache too):
/// a warm request reuses it while the policies demand the same. Only the binding, which
/// depends on the request's certificate, is worked out per request. Its JSON form is not
/// kept, only rebuilt for display.
pub struct TokenForm {
    /// What it was built for.
    demand: Arc<Demand>,
    /// `context.token`; `None` when no policy reads it.
    record: Option<CedarValue>,
    principal: Uid,
    parents: Vec<Uid>,
    /// The principal entity when no static entity shares its id (the usual case).
    entity: Result<Entity, String>,
}

impl TokenForm {
    fn of(t: &TokenClaims, demand: &Arc<Demand>) -> Arc<TokenForm> {
        kept_form(
            t.derived(),
            demand,
            |f: &TokenForm| &f.demand,
            || TokenForm::build(t, demand),
        )
    }

    fn build(t: &TokenClaims, demand: &Arc<Demand>) -> TokenForm {
        let principal = Uid::new("User", t.principal_id());
        let parents: Vec<Uid> = t
            .groups()
            .iter()
            .map(|g| Uid::new("Group", g.clone()))
            .collect();
        let parent_uids = parents
            .iter()
            .map(Uid::to_cedar)
            .collect::<Result<Vec<_>, _>>();
        let entity = principal.to_cedar().and_then(|uid| {
            let parents = parent_uids?;
            Entity::new_with_tags(uid, user_attrs(t, demand), parents, user_tags(t, demand))
                .map_err(|e| format!("principal entity: {e}"))
        });
        TokenForm {
            demand: demand.clone(),
            record: demand
                .context
                .field("token")
                .and_then(|fields| to_value_read(&token_record(t, demand), fields, 1)),
            principal,
            parents,
            entity,
        }
    }
}

/// The form kept in `slot` when it was built for the same demand; else `build`'s, kept in
/// its place (a certificate's or token's form outlives a reload of the policies).
fn kept_form<F: Send + Sync + 'static>(
    slot: &crate::identity::FormSlot,
    demand: &Arc<Demand>,
    built_for: impl Fn(&F) -> &Arc<Demand>,
    build: impl FnOnce() -> F,
) -> Arc<F> {
    if let Some(form) = slot.get::<F>() {
        let old = built_for(&form);
        if Arc::ptr_eq(old, demand) || **old == **demand {
            return form;
        }
    }
    let form = Arc::new(build());
    slot.set(form.clone());
    form
}

/// The request's own resource entity: a `Path` with its `path` and `host` (merged with a
/// static namesake), or a route's own resource (Envoy `context_extensions`) that no static
/// entity names; `None` when a static entity already is that resource.
pub(crate) fn resource_entity(
    resource: &Uid,
    host: &str,
    static_entities: &cedar_policy::Entities,
) -> Result<Option<Entity>, String> {
    let uid = resource.to_cedar()?;
    if resource.kind == "Path" {
        let attrs = [("path", resource.id.as_str()), ("host", host)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), RestrictedExpression::new_string(v.to_string())))
            .collect();
        let own = Entity::new(uid, attrs, Default::default())
            .map_err(|e| format!("resource entity: {e}"))?;
        Ok(Some(match static_entities.get(&own.uid()) {
            Some(known) => merge_entities(known, own),
            None => own,
        }))
    } else if static_entities.get(&uid).is_none() {
        // A route's own resource keeps whatever the static entities say of it.
        Ok(Some(Entity::with_uid(uid)))
    } else {
        Ok(None)
    }
}

/// The union of a static entity and the request's own entity of the same id, as Cedar
/// should see it: the parents (and ancestors) of both; the attributes and tags of both,
/// the request's own winning where both define one (they are what was verified or
/// observed for this request: the token's issuer, the request's path and host).
///
/// SECURITY: replacing the static entity instead would drop the parents the operator gave
/// it, and a `forbid (..., resource in Folder::"restricted")` would never fire.
pub(crate) fn merge_entities(static_entity: &Entity, own: Entity) -> Entity {
    use cedar_policy_core::ast::Entity as CoreEntity;
    let (uid, attrs, indirect, parents, tags) = <Entity as AsRef<CoreEntity>>::as_ref(&own)
        .clone()
        .into_inner();
    let known: &CoreEntity = static_entity.as_ref();
    let mut all_attrs: BTreeMap<_, _> =
        known.attrs().map(|(k, v)| (k.clone(), v.clone())).collect();
    all_attrs.extend(attrs);
    let mut all_tags: BTreeMap<_, _> = known.tags().map(|(k, v)| (k.clone(), v.clone())).collect();
    all_tags.extend(tags);
    let mut all_parents: std::collections::HashSet<_> = known.ancestors().cloned().collect();
    all_parents.extend(parents);
    all_parents.extend(indirect);
    Entity::from(CoreEntity::new_with_attr_partial_value(
        uid,
        all_attrs,
        std::collections::HashSet::new(),
        all_parents,
        all_tags,
    ))
}

/// A token's user's attributes: its issuer, when a policy reads it.
fn user_attrs(t: &TokenClaims, demand: &Demand) -> Vec<(String, RestrictedExpression)> {
    [(
        "issuer".to_string(),
        RestrictedExpression::new_string(t.issuer().to_string()),
    )]
    .into_iter()
    .filter(|(name, _)| demand.reads_attribute(name))
    .collect()
}

/// A token's user's tags: its string claims. SECURITY: a claim is compared only in its
/// own type: a number or boolean claim is not turned into a string tag, where
/// `getTag("level") == "5"` would match the number 5 as well as the string "5". Claims of
/// other types stay reachable, typed, in `context.token.claims`.
/// Only the tags a policy reads are kept.
fn user_tags(t: &TokenClaims, demand: &Demand) -> Vec<(String, RestrictedExpression)> {
    t.claims()
        .into_iter()
        .filter(|(k, _)| demand.reads_tag(k))
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k, RestrictedExpression::new_string(s))),
            _ => None,
        })
        .collect()
}

impl std::fmt::Debug for PeerForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerForm({:?})", self.record)
    }
}

impl std::fmt::Debug for TokenForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenForm({})", self.principal)
    }
}

/// The Cedar request for `facts` and `identity`, with the credential headers hidden, for
/// policies that read everything.
#[cfg(any(test, feature = "testing"))]
pub fn map_request(facts: &RequestFacts, identity: &Identity) -> CedarRequest {
    static EVERYTHING: LazyLock<Arc<Demand>> = LazyLock::new(|| Arc::new(Demand::everything()));
    static UTC: LazyLock<Arc<TimeZoneSetting>> = LazyLock::new(Default::default);
    map_request_hiding(
        facts,
        identity,
        &[],
        &EVERYTHING,
        RequestTime::new(SystemTime::UNIX_EPOCH, &UTC),
    )
}

/// [`map_request`], hiding `hidden` headers besides the usual credential headers, with
/// forms that hold what `demand` reads.
pub(crate) fn map_request_hiding(
    facts: &RequestFacts,
    identity: &Identity,
    hidden: &[String],
    demand: &Arc<Demand>,
    time: Option<RequestTime>,
) -> CedarRequest {
    let token = identity
        .token()
        .map(|t| (t.clone(), TokenForm::of(t, demand)));
    let peer = identity.peer();
    let principal = match (&token, peer) {
        (Some((_, t)), _) => t.principal.clone(),
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
        request: json!({
            "method": facts.method,
            "path": facts.path,
            "query": facts.query,
            "host": facts.host,
            "scheme": facts.scheme,
            "source_address": facts.source_address,
            "headers": headers,
        }),
        peer: match &identity.peer {
            crate::identity::PeerOutcome::Verified(p) => Some((p.clone(), PeerForm::of(p, demand))),
            _ => None,
        },
        route: (!facts.context_extensions.is_empty()).then(|| json!(facts.context_extensions)),
        binding: token.as_ref().is_some_and(|(t, _)| t.bound()),
        token,
        time,
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

/// `context.token`. Its claims are those `demand` shows: with a schema, only the ones the
/// token's issuer declares, so that `has` on any other is false at run time as the
/// validator reasoned, and reading one is an error (a deny).
fn token_record(t: &TokenClaims, demand: &Demand) -> Value {
    let mut claims = t.claims();
    claims.retain(|name, _| demand.shows_claim(t.issuer(), name));
    json!({
        "issuer": t.issuer(),
        "subject": t.subject(),
        "audience": t.audience(),
        "scopes": t.scopes(),
        "expires_at": t.expires_at(),
        "claims": claims,
    })
}

/// A JSON value as a Cedar value: arrays become sets, objects records. Nulls,
/// non-integer numbers and values nested deeper than [`MAX_DEPTH`] have no Cedar form and
/// are left out (so a policy reading them errors, and errors deny). The value is what
/// Cedar's own evaluation of the same restricted expression gives (tested below), built
/// without evaluating anything.
pub(crate) fn to_value(v: &Value, depth: usize) -> Option<CedarValue> {
    if depth > MAX_DEPTH {
        return None;
    }
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(CedarValue::from(*b)),
        Value::Number(n) => n.as_i64().map(CedarValue::from),
        Value::String(s) => Some(CedarValue::from(s.as_str())),
        Value::Array(items) => Some(CedarValue::set(
            items.iter().filter_map(|i| to_value(i, depth + 1)),
            None,
        )),
        Value::Object(m) => Some(CedarValue::record(
            m.iter()
                .filter_map(|(k, v)| to_value(v, depth + 1).map(|e| (k.as_str(), e))),
            None,
        )),
    }
}

/// [`to_value`] of only the fields policies read: what [`Fields::prune`] keeps.
fn to_value_read(v: &Value, fields: &Fields, depth: usize) -> Option<CedarValue> {
    match v {
        Value::Object(m) if !fields.whole() => {
            if depth > MAX_DEPTH {
                return None;
            }
            Some(CedarValue::record(
                m.iter().filter_map(|(k, v)| {
                    let read = fields.named(k)?;
                    to_value_read(v, read, depth + 1).map(|e| (k.as_str(), e))
                }),
                None,
            ))
        }
        other => to_value(other, depth),
    }
}

impl CedarRequest {
    /// The principal's parents (a token's groups).
    pub fn principal_parents(&self) -> &[Uid] {
        self.token.as_ref().map_or(&[], |(_, t)| &t.parents)
    }

    /// The context as plain JSON: what policies see, as `portcullis check` shows it.
    pub fn context(&self) -> Value {
        let mut c = Map::new();
        c.insert("request".into(), self.request.clone());
        if let Some((p, _)) = &self.peer {
            c.insert("peer".into(), peer_record(p));
        }
        if let Some((t, form)) = &self.token {
            c.insert("token".into(), token_record(t, &form.demand));
        }
        if let Some(r) = &self.route {
            c.insert("route".into(), r.clone());
        }
        c.insert("binding".into(), json!(self.binding));
        if let Some(t) = &self.time {
            c.insert("time".into(), t.json());
        }
        Value::Object(c)
    }

    /// The context as Cedar takes it, already evaluated; the certificate's and the token's
    /// parts are shared from their forms (a clone of a Cedar value is a reference count).
    /// Of the request's own record, only the fields `demand` reads are built.
    pub(crate) fn cedar_context(&self, demand: &Demand) -> Context {
        let pairs = [
            (
                "request",
                demand
                    .context
                    .field("request")
                    .and_then(|fields| to_value_read(&self.request, fields, 1)),
            ),
            (
                "peer",
                self.peer.as_ref().and_then(|(_, p)| p.record.clone()),
            ),
            (
                "token",
                self.token.as_ref().and_then(|(_, t)| t.record.clone()),
            ),
            ("route", self.route.as_ref().and_then(|r| to_value(r, 1))),
            ("binding", Some(CedarValue::from(self.binding))),
            // Built only when a policy reads it: others pay nothing for the time.
            (
                "time",
                demand
                    .context
                    .field("time")
                    .and_then(|fields| Some(self.time.as_ref()?.cedar(fields))),
            ),
        ];
        let record: BTreeMap<_, _> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.into(), v)))
            .collect();
        Context::from(CoreContext::Value(Arc::new(record)))
    }

    /// The per-request entities: the principal and the `Path` resource, each merged with
    /// the static entity of the same id when there is one (see [`merge_entities`]).
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
        match (self.token.as_ref(), static_entities.get(&uid)) {
            (Some((_, form)), _) => out.push(merged(form.entity.clone()?)),
            // Static workloads and anonymous principals already carry what the operator
            // gave them, and the request adds nothing to them.
            (None, Some(_)) => {}
            (None, None) => out.push(Entity::with_uid(uid)),
        }
        let host = self.request["host"].as_str().unwrap_or_default();
        out.extend(resource_entity(&self.resource, host, static_entities)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The restricted expression Cedar would evaluate for a JSON value, as the mapping
    /// built it before it made values directly: the reference for [`to_value`].
    fn to_restricted(v: &Value, depth: usize) -> Option<RestrictedExpression> {
        if depth > MAX_DEPTH {
            return None;
        }
        match v {
            Value::Null => None,
            Value::Bool(b) => Some(RestrictedExpression::new_bool(*b)),
            Value::Number(n) => n.as_i64().map(RestrictedExpression::new_long),
            Value::String(s) => Some(RestrictedExpression::new_string(s.clone())),
            Value::Array(items) => Some(RestrictedExpression::new_set(
                items.iter().filter_map(|i| to_restricted(i, depth + 1)),
            )),
            Value::Object(m) => RestrictedExpression::new_record(
                m.iter()
                    .filter_map(|(k, v)| to_restricted(v, depth + 1).map(|e| (k.clone(), e))),
            )
            .ok(),
        }
    }

    fn paris_time(at: &str) -> RequestTime {
        let zone = Arc::new(TimeZoneSetting::parse("Europe/Paris").expect("zone"));
        let t: jiff::Timestamp = at.parse().expect("a time");
        let now = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(t.as_second()).expect("after 1970"));
        RequestTime::new(now, &zone).expect("in range")
    }

    #[test]
    fn the_time_is_read_in_the_configured_zone() {
        // A Thursday, 10:30 in Paris (UTC+1 in winter).
        let t = paris_time("2026-12-03T09:30:00Z");
        assert_eq!(
            t.json(),
            json!({
                "now": {"__extn": {"fn": "datetime", "arg": "2026-12-03T09:30:00.000Z"}},
                "unix": 1_796_290_200,
                "local": {"__extn": {"fn": "datetime", "arg": "2026-12-03T10:30:00.000Z"}},
                "time_zone": "Europe/Paris",
                "date": "2026-12-03",
                "day_of_week": "Thu",
                "hour": 10,
                "minute": 30,
            })
        );
        // Summer time: UTC+2; and the local date can differ from the UTC one.
        let t = paris_time("2026-07-04T22:15:00Z");
        assert_eq!(t.json()["day_of_week"], "Sun");
        assert_eq!(t.json()["date"], "2026-07-05");
        assert_eq!(t.json()["hour"], 0);
    }

    /// The Cedar record equals what Cedar makes of its JSON form (datetimes included), and
    /// holds only the fields policies read.
    #[test]
    fn the_time_record_is_what_cedar_makes_of_it() {
        let t = paris_time("2026-12-03T09:30:00Z");
        let everything = Demand::everything();
        let whole = everything.context.field("time").expect("whole");
        let direct = Context::from(CoreContext::Value(Arc::new(BTreeMap::from([(
            "time".into(),
            t.cedar(whole),
        )]))));
        let by_cedar =
            Context::from_json_value(json!({ "time": t.json() }), None).expect("cedar parses it");
        assert_eq!(direct, by_cedar);

        let demand = Demand::of(
            &cedar_policy::PolicySet::from_str(
                "permit (principal, action, resource) when { context.time.hour >= 9 };",
            )
            .expect("policy"),
        );
        let read = demand.context.field("time").expect("time is read");
        let pruned = Context::from(CoreContext::Value(Arc::new(BTreeMap::from([(
            "time".into(),
            t.cedar(read),
        )]))));
        let only_hour = Context::from_json_value(json!({ "time": { "hour": 10 } }), None)
            .expect("cedar parses it");
        assert_eq!(pruned, only_hour);
        let no_time = Demand::of(
            &cedar_policy::PolicySet::from_str("permit (principal, action, resource);")
                .expect("policy"),
        );
        assert!(no_time.context.field("time").is_none(), "nobody pays for the time");
    }

    fn nested(depth: usize) -> Value {
        (0..depth).fold(
            json!("leaf"),
            |inner, _| json!({ "a": inner, "n": [1, inner] }),
        )
    }

    /// Building values directly gives exactly the context Cedar's own evaluation of the
    /// same expressions gives: same values, same sets (order and duplicates), the same
    /// parts left out (nulls, floats, too deep).
    #[test]
    fn direct_values_equal_cedar_evaluation() {
        let cases = [
            json!(true),
            json!(-7),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1.5),
            json!(null),
            json!(""),
            json!("ünïcode \" \\ \n"),
            json!([]),
            json!({}),
            json!([3, 1, 2, 1, "a", true, null, 2.5, [1], {"k": 1}]),
            json!(["b", "a", "b"]),
            json!({"x": null, "y": 1.5, "z": [null], "w": {"v": null}}),
            json!({"aud": ["api", "web"], "scope": "read write", "exp": 1_700_000_000}),
            nested(MAX_DEPTH - 1),
            nested(MAX_DEPTH),
            nested(MAX_DEPTH + 3),
        ];
        for v in cases {
            let by_cedar = Context::from_pairs(to_restricted(&v, 1).map(|e| ("v".to_string(), e)))
                .expect("cedar evaluates it");
            let direct: BTreeMap<_, _> = to_value(&v, 1)
                .map(|c| ("v".into(), c))
                .into_iter()
                .collect();
            let direct = Context::from(CoreContext::Value(Arc::new(direct)));
            assert_eq!(direct, by_cedar, "{v}");
        }
    }
}
