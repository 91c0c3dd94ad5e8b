//! What the loaded policies can observe of the context and of a token's `User` entity, found
//! once per load, so that the Cedar forms built for a request or kept with a cached token
//! hold only that.
//!
//! Cedar reads inside a record only by naming a field (`r.f`, `r has f`, `r has f.g`), and
//! inside an entity only by naming an attribute or a tag (`e.a`, `e has a`, `e.getTag(t)`,
//! `e.hasTag(t)`). Everything else that can be done with a record (compare it, put it in a
//! set, test membership) uses the whole value. So a walk over every policy condition finds,
//! for each path below `context`, whether its value is used whole or only through the
//! fields it names; and which attribute names and tag names are read at all. A field no
//! policy names, in a record no policy uses whole, cannot change any decision, and neither
//! can an attribute or a tag no policy names: leaving them out is invisible to the
//! policies. `tests/oracle.rs` holds the engine, which decides with the pruned forms, to a
//! reference that gives Cedar everything.

use cedar_policy::PolicySet;
use cedar_policy_core::ast::{self, BinaryOp, Expr, ExprKind, Literal, Var};
#[cfg(test)]
use serde_json::{Map, Value};
use crate::declared::DeclaredClaims;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

/// The fields of one record that policies read: all of them (`whole`), or those named.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fields {
    whole: bool,
    named: BTreeMap<String, Fields>,
}

impl Fields {
    fn insert(&mut self, path: &[&str], whole: bool) {
        match path.split_first() {
            None => self.whole |= whole,
            Some((first, rest)) => self
                .named
                .entry((*first).to_string())
                .or_default()
                .insert(rest, whole),
        }
    }

    /// The fields below `name`, or `None` when no policy reads it at all.
    pub(crate) fn field(&self, name: &str) -> Option<&Fields> {
        static ALL: Fields = Fields {
            whole: true,
            named: BTreeMap::new(),
        };
        if self.whole {
            Some(&ALL)
        } else {
            self.named.get(name)
        }
    }

    /// What either reads: the fields of both, whole where either reads it whole.
    fn union(&self, other: &Fields) -> Fields {
        let mut named = self.named.clone();
        for (k, f) in &other.named {
            let merged = match named.get(k) {
                Some(mine) => mine.union(f),
                None => f.clone(),
            };
            named.insert(k.clone(), merged);
        }
        Fields {
            whole: self.whole || other.whole,
            named,
        }
    }

    /// Whether the value is read whole (every field counts).
    pub(crate) fn whole(&self) -> bool {
        self.whole
    }

    /// The fields read below the named field of a record that is not read whole.
    pub(crate) fn named(&self, name: &str) -> Option<&Fields> {
        self.named.get(name)
    }

    /// `value` with only what policies read: a record keeps the fields they name (each
    /// pruned in turn), unless it is used whole; any other value is kept as it is.
    #[cfg(test)]
    pub(crate) fn prune(&self, value: &Value) -> Value {
        match value {
            Value::Object(m) if !self.whole => Value::Object(
                m.iter()
                    .filter_map(|(k, v)| self.named.get(k).map(|f| (k.clone(), f.prune(v))))
                    .collect::<Map<_, _>>(),
            ),
            other => other.clone(),
        }
    }
}

/// What the policies of one snapshot can observe.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Demand {
    /// The context, field by field.
    pub(crate) context: Fields,
    /// Attribute names read on anything (`x.a`, `x has a`); `None`: every attribute counts.
    attributes: Option<BTreeSet<String>>,
    /// Tag names read, or `None` when some tag name is computed (then every tag counts).
    tags: Option<BTreeSet<String>>,
    /// With a schema, the claims each issuer declares: the only ones `context.token.claims`
    /// holds, as the schema's closed claims record says. `None`: every claim (no schema).
    /// Part of the demand so that a token's form built for one filter is never reused
    /// under another (see `mapping::kept_form`).
    pub(crate) claims: Option<Arc<DeclaredClaims>>,
}

impl Demand {
    /// Everything: what a policy set that reads everything would observe.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn everything() -> Demand {
        Demand {
            context: Fields {
                whole: true,
                named: BTreeMap::new(),
            },
            attributes: None,
            tags: None,
            claims: None,
        }
    }

    pub(crate) fn of(set: &PolicySet) -> Demand {
        let mut demand = Demand {
            context: Fields::default(),
            attributes: Some(BTreeSet::new()),
            tags: Some(BTreeSet::new()),
            claims: None,
        };
        for policy in set.policies() {
            let core: &ast::Policy = policy.as_ref();
            if let Some(condition) = core.non_scope_constraints() {
                demand.read(condition);
            }
        }
        demand
    }

    /// This demand, with `context.token.claims` holding only `claims` (a snapshot with a
    /// schema) or every claim (`None`).
    pub(crate) fn with_claims(self, claims: Option<Arc<DeclaredClaims>>) -> Demand {
        Demand { claims, ..self }
    }

    /// What the policies of either snapshot can observe: the shadow policy set is given the
    /// request built for both, so that neither sees less than its own demand (pruning
    /// beyond a set's own demand is invisible to it). `None` when the two see different
    /// claims (one has a schema, the other not): leaving a claim out is not invisible, so
    /// no one request fits both.
    pub(crate) fn union(&self, other: &Demand) -> Option<Demand> {
        if self.claims != other.claims {
            return None;
        }
        let names = |a: &Option<BTreeSet<String>>, b: &Option<BTreeSet<String>>| match (a, b) {
            (Some(a), Some(b)) => Some(a.union(b).cloned().collect()),
            _ => None,
        };
        Some(Demand {
            context: self.context.union(&other.context),
            attributes: names(&self.attributes, &other.attributes),
            tags: names(&self.tags, &other.tags),
            claims: self.claims.clone(),
        })
    }

    /// Whether `context.token.claims` of a token from `issuer` holds `claim`.
    pub(crate) fn shows_claim(&self, issuer: &str, claim: &str) -> bool {
        self.claims
            .as_ref()
            .is_none_or(|declared| declared.declares(issuer, claim))
    }

    /// Whether an entity attribute of this name can be read.
    pub(crate) fn reads_attribute(&self, name: &str) -> bool {
        self.attributes.as_ref().is_none_or(|a| a.contains(name))
    }

    /// Whether a tag of this name can be read.
    pub(crate) fn reads_tag(&self, name: &str) -> bool {
        self.tags.as_ref().is_none_or(|t| t.contains(name))
    }

    fn read(&mut self, condition: &Expr) {
        // The expressions that are the record or entity of an access: those are read only
        // through the field they name, not whole.
        let mut bases: HashSet<*const Expr> = HashSet::new();
        for e in condition.subexpressions() {
            match e.expr_kind() {
                ExprKind::GetAttr { expr, attr } | ExprKind::HasAttr { expr, attr } => {
                    bases.insert(expr.as_ref());
                    if let Some(names) = &mut self.attributes {
                        names.insert(attr.to_string());
                    }
                }
                ExprKind::ExtHasAttr { expr, attrs } => {
                    bases.insert(expr.as_ref());
                    if let Some(names) = &mut self.attributes {
                        names.extend(attrs.iter().map(|a| a.to_string()));
                    }
                }
                ExprKind::BinaryApp {
                    op: BinaryOp::GetTag | BinaryOp::HasTag,
                    arg2,
                    ..
                } => match (arg2.expr_kind(), &mut self.tags) {
                    (ExprKind::Lit(Literal::String(name)), Some(tags)) => {
                        tags.insert(name.to_string());
                    }
                    _ => self.tags = None,
                },
                _ => {}
            }
        }
        for e in condition.subexpressions() {
            match e.expr_kind() {
                ExprKind::HasAttr { expr, attr } => {
                    if let Some(mut path) = context_path(expr) {
                        path.push(attr.as_str());
                        self.context.insert(&path, false);
                    }
                }
                ExprKind::ExtHasAttr { expr, attrs } => {
                    if let Some(mut path) = context_path(expr) {
                        path.extend(attrs.iter().map(|a| a.as_str()));
                        self.context.insert(&path, false);
                    }
                }
                _ => {
                    if let Some(path) = context_path(e) {
                        let whole = !bases.contains(&(e as *const Expr));
                        self.context.insert(&path, whole);
                    }
                }
            }
        }
    }
}

/// The fields from `context` to the value `e` reads, when `e` is `context` or a chain of
/// field accesses on it.
fn context_path(e: &Expr) -> Option<Vec<&str>> {
    match e.expr_kind() {
        ExprKind::Var(Var::Context) => Some(Vec::new()),
        ExprKind::GetAttr { expr, attr } => {
            let mut path = context_path(expr)?;
            path.push(attr.as_str());
            Some(path)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    fn demand(policies: &str) -> Demand {
        Demand::of(&PolicySet::from_str(policies).expect("policies parse"))
    }

    const TOKEN: &str = r#"{"token": {"issuer": "i", "scopes": ["a"],
        "claims": {"email": "e", "groups": ["g"], "cnf": {"x5t#S256": "t"}}},
        "request": {"path": "/", "headers": {"x": "1"}}, "binding": true}"#;

    fn pruned(policies: &str) -> Value {
        let context: Value = serde_json::from_str(TOKEN).expect("json");
        demand(policies).context.prune(&context)
    }

    #[test]
    fn a_field_read_by_name_keeps_only_that_field() {
        let p = r#"permit (principal, action, resource)
            when { context.token.claims.email == "e" && context.binding };"#;
        assert_eq!(
            pruned(p),
            json!({"token": {"claims": {"email": "e"}}, "binding": true})
        );
    }

    #[test]
    fn a_record_used_whole_is_kept_whole() {
        let p = r#"permit (principal, action, resource)
            when { context.token.claims.cnf == {"x5t#S256": "t"} };"#;
        assert_eq!(
            pruned(p),
            json!({"token": {"claims": {"cnf": {"x5t#S256": "t"}}}})
        );
        let p = r#"permit (principal, action, resource) when { context.token == {} };"#;
        assert_eq!(
            pruned(p)["token"],
            json!(serde_json::from_str::<Value>(TOKEN).unwrap()["token"])
        );
        let p = r#"permit (principal, action, resource) when { context == {} };"#;
        assert_eq!(pruned(p), serde_json::from_str::<Value>(TOKEN).unwrap());
        // Through a conditional: the value of `context.token` flows on whole.
        let p = r#"permit (principal, action, resource)
            when { (if true then context.token else {}).issuer == "i" };"#;
        assert_eq!(pruned(p)["token"]["claims"]["email"], "e");
    }

    #[test]
    fn presence_tests_keep_the_field_they_name() {
        let p = r#"permit (principal, action, resource) when { context.token has claims };"#;
        assert_eq!(pruned(p), json!({"token": {"claims": {}}}));
        let p = r#"permit (principal, action, resource)
            when { context has token.claims.cnf };"#;
        assert_eq!(pruned(p), json!({"token": {"claims": {"cnf": {}}}}));
        let p = r#"permit (principal, action, resource) when { context has peer };"#;
        assert_eq!(pruned(p), json!({}));
    }

    #[test]
    fn a_union_reads_what_either_reads() {
        let a = demand(
            r#"permit (principal, action, resource)
            when { context.token.claims.email == "e" && principal.getTag("dept") == "x" };"#,
        );
        let b = demand(
            r#"permit (principal, action, resource)
            when { context.binding && principal has issuer };"#,
        );
        let u = a.union(&b).expect("same claims");
        let context: Value = serde_json::from_str(TOKEN).expect("json");
        assert_eq!(
            u.context.prune(&context),
            json!({"token": {"claims": {"email": "e"}}, "binding": true})
        );
        assert!(u.reads_tag("dept") && u.reads_attribute("issuer"));
        assert!(!u.reads_tag("email") && !u.reads_attribute("level"));
        let whole = demand(r#"permit (principal, action, resource) when { context.token == {} };"#);
        assert_eq!(
            a.union(&whole).expect("same claims").context.prune(&context)["token"],
            context["token"]
        );
        let computed = demand(
            r#"permit (principal, action, resource) when { principal.hasTag(context.request.path) };"#,
        );
        assert!(a.union(&computed).expect("same claims").reads_tag("anything"));
    }

    #[test]
    fn tags_and_attributes_are_found_by_name() {
        let d = demand(
            r#"permit (principal, action, resource)
            when { principal.getTag("dept") == "x" && principal has issuer };"#,
        );
        assert!(d.reads_tag("dept") && !d.reads_tag("email"));
        assert!(d.reads_attribute("issuer") && !d.reads_attribute("level"));
        let d = demand(
            r#"permit (principal, action, resource)
            when { principal.hasTag(context.request.path) };"#,
        );
        assert!(
            d.reads_tag("anything"),
            "a computed tag name reads every tag"
        );
        assert!(!demand("permit (principal, action, resource);").reads_tag("dept"));
    }
}
