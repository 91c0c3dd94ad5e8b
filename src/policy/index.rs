//! The policy index: a policy set in; for a request's principal, action and resource (each
//! with its ancestors) out, the policies whose scope can match, as a policy set of their
//! own. A request then costs the policies that can apply to it, not all of them.
//!
//! Each policy is filed under one key of its scope, the first of: the entity its principal
//! constraint names (`==`, `in`, `is ... in`), the entity its resource constraint names,
//! the actions its action constraint names, the type its principal or resource constraint
//! names (`is`); a policy with none of these is always a candidate. A policy filed under
//! an entity can only match a request whose principal (or resource, or action) is that
//! entity or has it as an ancestor, so looking up the request's entities and their
//! ancestors finds every policy that can match. SECURITY: a policy left out is one whose
//! scope is false for the request; Cedar evaluates the scope before the conditions, so such
//! a policy can neither determine the decision nor report an error: the decision is the
//! same as over the whole set. `tests/oracle.rs` holds it to that, `forbid`s included.

use cedar_policy::{Policy, PolicySet};
use cedar_policy_core::ast::{
    self, EntityType, EntityUID, ExprKind, Literal, PrincipalOrResourceConstraint,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Most distinct candidate sets remembered (each is a small policy set).
const MAX_SUBSETS: usize = 4096;

/// The policies a request may match, ready for Cedar, with the entities their conditions name.
#[derive(Debug)]
pub(crate) struct Candidates {
    pub(crate) policies: PolicySet,
    pub(crate) literals: Vec<EntityUID>,
}

pub(crate) struct PolicyIndex {
    policies: Vec<Policy>,
    /// For each policy, the entities its conditions name (not its scope: Cedar never looks
    /// up the entity on the right of `in`).
    literals: Vec<Vec<EntityUID>>,
    always: Vec<u32>,
    principal: HashMap<EntityUID, Vec<u32>>,
    resource: HashMap<EntityUID, Vec<u32>>,
    action: HashMap<EntityUID, Vec<u32>>,
    principal_type: HashMap<EntityType, Vec<u32>>,
    resource_type: HashMap<EntityType, Vec<u32>>,
    /// Candidate sets built before, by their sorted policy numbers.
    built: quick_cache::sync::Cache<Vec<u32>, Arc<Candidates>>,
}

impl std::fmt::Debug for PolicyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyIndex")
            .field("policies", &self.policies.len())
            .field("always", &self.always.len())
            .finish_non_exhaustive()
    }
}

/// The entity a principal or resource constraint names, or the type it names.
enum Key {
    Entity(EntityUID),
    Type(EntityType),
    None,
}

fn key_of(c: &PrincipalOrResourceConstraint) -> Key {
    match c {
        PrincipalOrResourceConstraint::Eq(ast::EntityReference::EUID(u))
        | PrincipalOrResourceConstraint::In(ast::EntityReference::EUID(u))
        | PrincipalOrResourceConstraint::IsIn(_, ast::EntityReference::EUID(u)) => {
            Key::Entity(u.as_ref().clone())
        }
        PrincipalOrResourceConstraint::Is(t) => Key::Type(t.as_ref().clone()),
        // Templates are refused at load, so no slot is left; Any constrains nothing.
        _ => Key::None,
    }
}

impl PolicyIndex {
    pub(crate) fn new(set: &PolicySet) -> PolicyIndex {
        let mut index = PolicyIndex {
            policies: Vec::new(),
            literals: Vec::new(),
            always: Vec::new(),
            principal: HashMap::new(),
            resource: HashMap::new(),
            action: HashMap::new(),
            principal_type: HashMap::new(),
            resource_type: HashMap::new(),
            built: quick_cache::sync::Cache::new(MAX_SUBSETS),
        };
        for (n, policy) in set.policies().enumerate() {
            let n = n as u32;
            let core: &ast::Policy = policy.as_ref();
            let mut literals: Vec<EntityUID> = core
                .non_scope_constraints()
                .into_iter()
                .flat_map(|e| e.subexpressions())
                .filter_map(|e| match e.expr_kind() {
                    ExprKind::Lit(Literal::EntityUID(u)) => Some(u.as_ref().clone()),
                    _ => None,
                })
                .collect();
            literals.sort();
            literals.dedup();
            let principal = key_of(core.principal_constraint().as_inner());
            let resource = key_of(core.resource_constraint().as_inner());
            let push_uid =
                |map: &mut HashMap<EntityUID, Vec<u32>>, k| map.entry(k).or_default().push(n);
            let push_type =
                |map: &mut HashMap<EntityType, Vec<u32>>, k| map.entry(k).or_default().push(n);
            match (principal, resource, core.action_constraint()) {
                (Key::Entity(u), _, _) => push_uid(&mut index.principal, u),
                (_, Key::Entity(u), _) => push_uid(&mut index.resource, u),
                (_, _, ast::ActionConstraint::Eq(a)) => {
                    push_uid(&mut index.action, a.as_ref().clone())
                }
                (_, _, ast::ActionConstraint::In(list)) => {
                    for a in list {
                        push_uid(&mut index.action, a.as_ref().clone());
                    }
                }
                (Key::Type(t), _, _) => push_type(&mut index.principal_type, t),
                (_, Key::Type(t), _) => push_type(&mut index.resource_type, t),
                _ => index.always.push(n),
            }
            index.policies.push(policy.clone());
            index.literals.push(literals);
        }
        index
    }

    /// The policies whose scope can match a request whose principal, action and resource
    /// are these entities, each given with its every ancestor.
    pub(crate) fn candidates<'a>(
        &self,
        principal: (&'a EntityUID, impl Iterator<Item = &'a EntityUID>),
        action: (&'a EntityUID, impl Iterator<Item = &'a EntityUID>),
        resource: (&'a EntityUID, impl Iterator<Item = &'a EntityUID>),
    ) -> Result<Arc<Candidates>, String> {
        let mut numbers: Vec<u32> = self.always.clone();
        let mut take = |map: &HashMap<EntityUID, Vec<u32>>, uid: &EntityUID| {
            if let Some(found) = map.get(uid) {
                numbers.extend_from_slice(found);
            }
        };
        for (map, (uid, ancestors)) in [
            (
                &self.principal,
                (principal.0, principal.1.collect::<Vec<_>>()),
            ),
            (&self.action, (action.0, action.1.collect::<Vec<_>>())),
            (&self.resource, (resource.0, resource.1.collect::<Vec<_>>())),
        ] {
            take(map, uid);
            for a in ancestors {
                take(map, a);
            }
        }
        for (map, uid) in [
            (&self.principal_type, principal.0),
            (&self.resource_type, resource.0),
        ] {
            if let Some(found) = map.get(uid.entity_type()) {
                numbers.extend_from_slice(found);
            }
        }
        numbers.sort_unstable();
        numbers.dedup();
        if let Some(hit) = self.built.get(&numbers) {
            return Ok(hit);
        }
        let mut policies = PolicySet::new();
        let mut literals = Vec::new();
        for &n in &numbers {
            let (Some(policy), Some(named)) =
                (self.policies.get(n as usize), self.literals.get(n as usize))
            else {
                return Err(format!("policy index: no policy number {n}"));
            };
            policies
                .add(policy.clone())
                .map_err(|e| format!("policy index: {e}"))?;
            literals.extend(named.iter().cloned());
        }
        literals.sort();
        literals.dedup();
        let built = Arc::new(Candidates { policies, literals });
        self.built.insert(numbers, built.clone());
        Ok(built)
    }
}
