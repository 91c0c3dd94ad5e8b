//! Policy: Cedar loading and evaluation. Facts and a verified identity in; a
//! [`PolicyOutcome`] out. Evaluation is pure and synchronous, and fails closed: no
//! permit means deny, and any evaluation error means deny, even though Cedar itself
//! would merely skip the erroring policy.

mod index;
pub mod load;
pub mod mapping;
mod store;

use crate::facts::RequestFacts;
use crate::identity::Identity;
use cedar_policy::{Authorizer, Decision, Request};
pub use load::{PolicySnapshot, load};
pub use mapping::{CedarRequest, map_request};

/// What the policies said about one request.
#[derive(Debug, Clone)]
pub struct PolicyOutcome {
    pub allowed: bool,
    /// The policies that determined the decision (the permits for an allow, the forbids
    /// for a forbid; empty when no permit matched).
    pub determining: Vec<String>,
    /// Evaluation errors; any error forces a deny.
    pub errors: Vec<String>,
    pub request: CedarRequest,
}

impl PolicySnapshot {
    /// Evaluates the request against this snapshot.
    pub fn evaluate(&self, facts: &RequestFacts, identity: &Identity) -> PolicyOutcome {
        let request = mapping::map_request_hiding(facts, identity, &self.hidden_headers);
        let deny = |request, error: String| PolicyOutcome {
            allowed: false,
            determining: Vec::new(),
            errors: vec![error],
            request,
        };
        let uids = (|| {
            Ok::<_, String>((
                request.principal.to_cedar()?,
                request.action.to_cedar()?,
                request.resource.to_cedar()?,
            ))
        })();
        let (principal, action, resource) = match uids {
            Ok(u) => u,
            Err(e) => return deny(request, format!("request: {e}")),
        };
        // The request's own entities, each merged with its static namesake, with every
        // ancestor it has in the union; then the static principal, action and resource
        // when the request built none of them.
        let mut slice = store::Slice::new(&self.store);
        let own = match request.entities(self.store.entities()) {
            Ok(own) => own,
            Err(e) => return deny(request, e),
        };
        for entity in own {
            let core: &cedar_policy_core::ast::Entity = entity.as_ref();
            let parents: Vec<_> = core.ancestors().cloned().collect();
            let ancestors = self.store.ancestors_of(core.uid(), &parents);
            let is_principal = core.uid() == principal.as_ref();
            if let Err(e) = slice.put_own(entity, ancestors, is_principal) {
                return deny(request, e);
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
            Err(e) => return deny(request, e),
        };
        if candidates.policies.is_empty() {
            // No policy can match: Cedar would find no permit and no error.
            return PolicyOutcome {
                allowed: false,
                determining: Vec::new(),
                errors: Vec::new(),
                request,
            };
        }
        for uid in &candidates.literals {
            slice.put_static(uid);
        }
        let entities = match slice.finish() {
            Ok(e) => e,
            Err(e) => return deny(request, e),
        };
        let context = request.cedar_context();
        let cedar_request = match Request::new(principal, action, resource, context, None) {
            Ok(r) => r,
            Err(e) => return deny(request, format!("request: {e}")),
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
        PolicyOutcome {
            // SECURITY: an erroring policy (a forbid, perhaps) must not let a permit through.
            allowed: response.decision() == Decision::Allow && errors.is_empty(),
            determining,
            errors,
            request,
        }
    }
}
