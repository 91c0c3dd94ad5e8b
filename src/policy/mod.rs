//! Policy: Cedar loading and evaluation. Facts and a verified identity in; a
//! [`PolicyOutcome`] out. Evaluation is pure and synchronous, and fails closed: no
//! permit means deny, and any evaluation error means deny, even though Cedar itself
//! would merely skip the erroring policy.

pub(crate) mod demand;
mod index;
pub mod schema;
pub mod load;
pub mod mapping;
mod record;
mod store;

use crate::facts::RequestFacts;
use crate::identity::Identity;
use cedar_policy::{Authorizer, Decision, Request};
pub use load::{PolicySnapshot, candidate, load};
#[cfg(any(test, feature = "testing"))]
pub use mapping::map_request;
pub use mapping::{CedarRequest, Uid};
pub(crate) use record::record;
pub use record::RecordedRequest;

/// What the policies said about one request.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct PolicyOutcome {
    /// Whether the policies permit the request.
    pub allowed: bool,
    /// The policies that determined the decision (the permits for an allow, the forbids
    /// for a forbid; empty when no permit matched).
    pub determining: Vec<String>,
    /// Evaluation errors; any error forces a deny.
    pub errors: Vec<String>,
    /// The Cedar request the policies were evaluated on.
    pub request: CedarRequest,
}

/// What one policy set said about one request: a [`PolicyOutcome`] without the request.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the policies permit the request (never with an error).
    pub allowed: bool,
    /// The determining policies (the permits for an allow, the forbids for a forbid).
    pub determining: Vec<String>,
    /// Evaluation errors; any error forces a deny.
    pub errors: Vec<String>,
}

impl Verdict {
    fn error(error: String) -> Verdict {
        Verdict {
            allowed: false,
            determining: Vec::new(),
            errors: vec![error],
        }
    }

    fn with(self, request: CedarRequest) -> PolicyOutcome {
        PolicyOutcome {
            allowed: self.allowed,
            determining: self.determining,
            errors: self.errors,
            request,
        }
    }
}

impl PolicySnapshot {
    /// Evaluates the request against this snapshot at `now` (`context.time`), the time the
    /// engine verified the credentials at.
    pub fn evaluate(
        &self,
        facts: &RequestFacts,
        identity: &Identity,
        now: std::time::SystemTime,
    ) -> PolicyOutcome {
        self.evaluate_in(facts, identity, now, &self.time_zone)
    }

    /// [`PolicySnapshot::evaluate`] with `context.time`'s local fields in `zone` (a policy
    /// test case's zone).
    pub(crate) fn evaluate_in(
        &self,
        facts: &RequestFacts,
        identity: &Identity,
        now: std::time::SystemTime,
        zone: &std::sync::Arc<crate::declared::TimeZoneSetting>,
    ) -> PolicyOutcome {
        let request = self.map_in(facts, identity, &self.demand, now, zone);
        self.judge(&request, &self.demand).with(request)
    }

    /// [`PolicySnapshot::evaluate`] on a request built for `demand` (which must read at
    /// least what this snapshot's policies read: the union with a shadow set's, say).
    pub(crate) fn evaluate_for(
        &self,
        facts: &RequestFacts,
        identity: &Identity,
        demand: &std::sync::Arc<demand::Demand>,
        now: std::time::SystemTime,
    ) -> PolicyOutcome {
        let request = self.map_for(facts, identity, demand, now);
        self.judge(&request, demand).with(request)
    }

    /// The request for `facts` and `identity` at `now`, built for `demand` (which must read
    /// at least what this snapshot's policies read: the union with a shadow set's, say).
    pub(crate) fn map_for(
        &self,
        facts: &RequestFacts,
        identity: &Identity,
        demand: &std::sync::Arc<demand::Demand>,
        now: std::time::SystemTime,
    ) -> CedarRequest {
        self.map_in(facts, identity, demand, now, &self.time_zone)
    }

    fn map_in(
        &self,
        facts: &RequestFacts,
        identity: &Identity,
        demand: &std::sync::Arc<demand::Demand>,
        now: std::time::SystemTime,
        zone: &std::sync::Arc<crate::declared::TimeZoneSetting>,
    ) -> CedarRequest {
        mapping::map_request_hiding(
            facts,
            identity,
            &self.hidden_headers,
            demand,
            // Only when a policy reads it: other requests pay nothing for the time.
            demand
                .context
                .field("time")
                .and_then(|_| mapping::RequestTime::new(now, zone)),
        )
    }

    /// What these policies can read.
    pub(crate) fn demand(&self) -> &std::sync::Arc<demand::Demand> {
        &self.demand
    }

    /// Evaluates a request built by [`PolicySnapshot::map_for`] with `demand`.
    pub(crate) fn judge(&self, request: &CedarRequest, demand: &demand::Demand) -> Verdict {
        let uids = (|| {
            Ok::<_, String>((
                request.principal.to_cedar()?,
                request.action.to_cedar()?,
                request.resource.to_cedar()?,
            ))
        })();
        let uids = match uids {
            Ok(u) => u,
            Err(e) => return Verdict::error(format!("request: {e}")),
        };
        self.decide(
            uids,
            request.entities(self.store.entities()),
            || Ok(request.cedar_context(demand)),
        )
    }

    /// Evaluates a request recorded in an audit line (`portcullis replay`), with this
    /// snapshot's static entities.
    pub fn judge_recorded(&self, request: &RecordedRequest) -> Verdict {
        let uids = match request.uids() {
            Ok(u) => u,
            Err(e) => return Verdict::error(format!("request: {e}")),
        };
        self.decide(uids, request.entities(self.store.entities()), || {
            request.cedar_context()
        })
    }

    /// The evaluation proper, of a request's uids, own entities and context.
    fn decide(
        &self,
        (principal, action, resource): (
            cedar_policy::EntityUid,
            cedar_policy::EntityUid,
            cedar_policy::EntityUid,
        ),
        own: Result<Vec<cedar_policy::Entity>, String>,
        context: impl FnOnce() -> Result<cedar_policy::Context, String>,
    ) -> Verdict {
        // The request's own entities, each merged with its static namesake, with every
        // ancestor it has in the union; then the static principal, action and resource
        // when the request built none of them.
        let mut slice = store::Slice::new(&self.store);
        let own = match own {
            Ok(own) => own,
            Err(e) => return Verdict::error(e),
        };
        for entity in own {
            let core: &cedar_policy_core::ast::Entity = entity.as_ref();
            let parents: Vec<_> = core.ancestors().cloned().collect();
            let ancestors = self.store.ancestors_of(core.uid(), &parents);
            let is_principal = core.uid() == principal.as_ref();
            if let Err(e) = slice.put_own(entity, ancestors, is_principal) {
                return Verdict::error(e);
            }
        }
        for uid in [&principal, &action, &resource] {
            slice.put_static(uid.as_ref());
        }
        let ancestors = |uid: &cedar_policy::EntityUid| slice.ancestors(uid.as_ref());
        let (p_anc, a_anc, r_anc) = (
            ancestors(&principal),
            ancestors(&action),
            ancestors(&resource),
        );
        let candidates = match self.index.candidates(
            (principal.as_ref(), p_anc.iter()),
            (action.as_ref(), a_anc.iter()),
            (resource.as_ref(), r_anc.iter()),
        ) {
            Ok(c) => c,
            Err(e) => return Verdict::error(e),
        };
        if candidates.policies.is_empty() {
            // No policy can match: Cedar would find no permit and no error.
            return Verdict {
                allowed: false,
                determining: Vec::new(),
                errors: Vec::new(),
            };
        }
        for uid in &candidates.literals {
            slice.put_static(uid);
        }
        let entities = match slice.finish() {
            Ok(e) => e,
            Err(e) => return Verdict::error(e),
        };
        let context = match context() {
            Ok(c) => c,
            Err(e) => return Verdict::error(format!("request: {e}")),
        };
        let cedar_request = match Request::new(principal, action, resource, context, None) {
            Ok(r) => r,
            Err(e) => return Verdict::error(format!("request: {e}")),
        };
        let response =
            Authorizer::new().is_authorized(&cedar_request, &candidates.policies, &entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        let mut determining: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        determining.sort();
        Verdict {
            // SECURITY: an erroring policy (a forbid, perhaps) must not let a permit through.
            allowed: response.decision() == Decision::Allow && errors.is_empty(),
            determining,
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicySettings;
    use crate::identity::{PeerOutcome, TokenClaims, TokenOutcome};
    use serde_json::json;

    fn snapshot(dir: &std::path::Path, policies: &str) -> PolicySnapshot {
        std::fs::write(dir.join("p.cedar"), policies).expect("write policies");
        load(&PolicySettings {
            dir: dir.to_path_buf(),
            schema: None,
            entities: None,
            hidden_headers: Vec::new(),
            time_zone: Default::default(),
            declared_claims: None,
        })
        .expect("policies load")
    }

    /// A token's Cedar form is kept with the token and holds only what the policies of its
    /// time read. SECURITY: policies loaded later that read more (here a `forbid` on a
    /// claim the old policies never read) must see it, not the form built for the old
    /// ones, which would let the request through.
    #[test]
    fn a_token_form_built_for_other_policies_is_not_reused() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let claims = json!({ "dept": "x", "level": 3 });
        let token = TokenClaims::for_policy_test(
            "https://issuer.test",
            "alice",
            claims.as_object().cloned().unwrap_or_default(),
            "groups",
            false,
        );
        let identity = Identity {
            peer: PeerOutcome::NotPresented,
            token: TokenOutcome::Verified(token),
        };
        let facts = RequestFacts {
            method: "GET".into(),
            path: "/a".into(),
            ..RequestFacts::default()
        };
        let permit_all = r#"@id("all") permit (principal, action, resource);"#;
        let before = snapshot(dir.path(), permit_all);
        assert!(before.evaluate(&facts, &identity, std::time::SystemTime::UNIX_EPOCH).allowed);
        let after = snapshot(
            dir.path(),
            &format!(
                "{permit_all}\n@id(\"no-x\") forbid (principal, action, resource) \
                 when {{ context has token.claims.dept && principal.getTag(\"dept\") == \"x\" }};"
            ),
        );
        let outcome = after.evaluate(&facts, &identity, std::time::SystemTime::UNIX_EPOCH);
        assert!(!outcome.allowed, "{outcome:?}");
        assert_eq!(outcome.determining, ["no-x"]);
        // And back: the old policies with the newer form decide as before.
        assert!(before.evaluate(&facts, &identity, std::time::SystemTime::UNIX_EPOCH).allowed);
    }

    /// With a schema, `context.token.claims` holds only the claims the token's issuer
    /// declares, as the validator reasons (its claims record is closed: `has` of an
    /// undeclared claim is false). SECURITY: a `forbid ... unless { ... has team }` that
    /// validates must fire for a token carrying an undeclared `team`; with every claim in
    /// the context it would not. Without a schema, every claim is there, as before.
    #[test]
    fn with_a_schema_only_declared_claims_reach_policies() {
        const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
        let policies = r#"@id("all") permit (principal, action, resource);
            @id("teamless") forbid (principal, action, resource)
                unless { context has token && context.token.claims has team };
            @id("low") forbid (principal, action, resource)
                when { context has token && context.token.claims has level && context.token.claims.level < 2 };"#;
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("p.cedar"), policies).expect("write policies");
        std::fs::write(dir.path().join("s.cedarschema"), SCHEMA).expect("write schema");
        let declared = crate::declared::DeclaredClaims::of(
            [(
                "https://issuer.test",
                &[("level".to_string(), crate::declared::ClaimType::Long)][..],
            )]
            .into_iter(),
        );
        let settings = |schema: bool| PolicySettings {
            dir: dir.path().to_path_buf(),
            schema: schema.then(|| dir.path().join("s.cedarschema")),
            entities: None,
            hidden_headers: Vec::new(),
            time_zone: Default::default(),
            declared_claims: Some(declared.clone()),
        };
        let with_schema = load(&settings(true)).expect("the policies validate");
        let without = load(&settings(false)).expect("policies load");
        let identity = |issuer: &str| Identity {
            peer: PeerOutcome::NotPresented,
            token: TokenOutcome::Verified(TokenClaims::for_policy_test(
                issuer,
                "alice",
                json!({ "team": "a", "level": 1 })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                "groups",
                false,
            )),
        };
        let facts = RequestFacts {
            method: "GET".into(),
            path: "/a".into(),
            ..RequestFacts::default()
        };
        let at = std::time::SystemTime::UNIX_EPOCH;
        let token = identity("https://issuer.test");
        // Both snapshots decide the same cached token alternately: each with its own form.
        for _ in 0..2 {
            let o = with_schema.evaluate(&facts, &token, at);
            assert!(!o.allowed, "{o:?}");
            assert_eq!(o.determining, ["low", "teamless"]);
            assert_eq!(o.request.context()["token"]["claims"], json!({ "level": 1 }));
            let o = without.evaluate(&facts, &token, at);
            assert!(!o.allowed, "{o:?}");
            assert_eq!(o.determining, ["low"], "no schema: the token's team is seen");
            assert_eq!(
                o.request.context()["token"]["claims"],
                json!({ "team": "a", "level": 1 })
            );
        }
        // Another issuer declares nothing: its `level` is not shown either.
        let o = with_schema.evaluate(&facts, &identity("https://other.test"), at);
        assert_eq!(o.determining, ["teamless"], "{o:?}");
        assert_eq!(o.request.context()["token"]["claims"], json!({}));
        // Tags are open in the schema: the string claims stay tags.
        let tags = load(&PolicySettings {
            dir: {
                let d = dir.path().join("tags");
                std::fs::create_dir(&d).expect("dir");
                std::fs::write(
                    d.join("p.cedar"),
                    r#"permit (principal is User, action, resource)
                        when { principal.hasTag("team") && principal.getTag("team") == "a" };"#,
                )
                .expect("write");
                d
            },
            ..settings(true)
        })
        .expect("validates");
        assert!(tags.evaluate(&facts, &token, at).allowed);
    }

    /// A set evaluated on the request built for the union of its demand and a shadow set's
    /// (which reads more) decides as it does alone.
    #[test]
    fn the_union_with_a_shadow_demand_decides_as_the_set_alone() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let live = snapshot(
            dir.path(),
            r#"@id("eng") permit (principal, action, resource) when { principal.getTag("dept") == "eng" };
               @id("deep") forbid (principal, action, resource)
                   when { context.token.claims has level && context.token.claims.level > 5 };"#,
        );
        let other = tempfile::tempdir().expect("temporary directory");
        let shadow = snapshot(
            other.path(),
            r#"permit (principal, action, resource)
                   when { context.request.headers has "x" && principal has issuer && context == {} };"#,
        );
        let union = std::sync::Arc::new(live.demand().union(shadow.demand()).expect("neither has a schema"));
        assert_ne!(*union, **live.demand());
        for (dept, level) in [("eng", 1), ("eng", 9), ("ops", 1), ("ops", 9)] {
            let claims = json!({ "dept": dept, "level": level });
            let identity = Identity {
                peer: PeerOutcome::NotPresented,
                token: TokenOutcome::Verified(TokenClaims::for_policy_test(
                    "https://issuer.test",
                    "alice",
                    claims.as_object().cloned().unwrap_or_default(),
                    "groups",
                    false,
                )),
            };
            let facts = RequestFacts {
                method: "GET".into(),
                path: "/a".into(),
                headers: [("x".to_string(), "1".to_string())].into_iter().collect(),
                ..RequestFacts::default()
            };
            let alone = live.evaluate(&facts, &identity, std::time::SystemTime::now());
            let both = live.judge(&live.map_for(&facts, &identity, &union, std::time::SystemTime::now()), &union);
            assert_eq!(
                (alone.allowed, &alone.determining, &alone.errors),
                (both.allowed, &both.determining, &both.errors),
                "{claims}"
            );
        }
    }
}
