//! Policy: Cedar loading and evaluation. Facts and a verified identity in; a
//! [`PolicyOutcome`] out. Evaluation is pure and synchronous, and fails closed: no
//! permit means deny, and any evaluation error means deny, even though Cedar itself
//! would merely skip the erroring policy.

pub mod load;
pub mod mapping;

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
        let entities = match request.entities(&self.entities).and_then(|extra| {
            self.entities
                .clone()
                .upsert_entities(extra, None)
                .map_err(|e| format!("entities: {e}"))
        }) {
            Ok(e) => e,
            Err(e) => return deny(request, e),
        };
        let context = request.cedar_context();
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
        let cedar_request = match Request::new(principal, action, resource, context, None) {
            Ok(r) => r,
            Err(e) => return deny(request, format!("request: {e}")),
        };
        let response = Authorizer::new().is_authorized(&cedar_request, &self.policies, &entities);
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
