//! The entities one request shows Cedar: the static entities (loaded and closed once per
//! reload) and the request's own, sliced to what evaluation can reach, so that a decision
//! costs the same with ten static entities or a million.
//!
//! What evaluation can reach: Cedar looks an entity up only to read its ancestors (`in`),
//! its attributes (`.`, `has`) or its tags, and only for an entity it holds as a value. The
//! values a request's evaluation can hold come from `principal`, `action` and `resource`,
//! from the entity literals of the policies it evaluates, and from the attributes and tags
//! of entities it reaches (the context holds no entity). So the slice is: the principal, the
//! action and the resource, each with every ancestor it has in the union of the static
//! entities and the request's own; the entities the evaluated policies name in their
//! conditions; and, transitively, the entities named by the attributes and tags of those.
//! Every other entity is invisible to the decision. `tests/oracle.rs` holds the result to a
//! reference that gives Cedar the whole union.

use cedar_policy::Entity;
use cedar_policy_core::ast::{self, EntityUID, PartialValue, Value, ValueKind};
use cedar_policy_core::entities::{Entities as CoreEntities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::extensions::Extensions;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The static entities, closed (every entity carries all its ancestors), with the entity
/// references of their attributes and tags found once.
#[derive(Debug)]
pub(crate) struct EntityStore {
    entities: cedar_policy::Entities,
    /// The entities named by each entity's attributes and tags, for the few that name any.
    refs: HashMap<EntityUID, Vec<EntityUID>>,
}

/// Every entity uid inside a value.
fn uids_in(v: &Value, out: &mut Vec<EntityUID>) {
    match &v.value {
        ValueKind::Lit(ast::Literal::EntityUID(uid)) => out.push(uid.as_ref().clone()),
        ValueKind::Lit(_) | ValueKind::ExtensionValue(_) => {}
        ValueKind::Set(set) => set.authoritative.iter().for_each(|i| uids_in(i, out)),
        ValueKind::Record(r) => r.values().for_each(|i| uids_in(i, out)),
    }
}

/// The entity uids an entity's attributes and tags name.
fn named_by(e: &ast::Entity) -> Vec<EntityUID> {
    let mut out = Vec::new();
    for (_, v) in e.attrs().chain(e.tags()) {
        if let PartialValue::Value(v) = v {
            uids_in(v, &mut out);
        }
    }
    out
}

impl EntityStore {
    pub(crate) fn new(entities: cedar_policy::Entities) -> EntityStore {
        let refs = entities
            .as_ref()
            .iter()
            .filter_map(|e| {
                let named = named_by(e);
                (!named.is_empty()).then(|| (e.uid().clone(), named))
            })
            .collect();
        EntityStore { entities, refs }
    }

    pub(crate) fn entities(&self) -> &cedar_policy::Entities {
        &self.entities
    }

    pub(crate) fn get(&self, uid: &EntityUID) -> Option<&ast::Entity> {
        match self.entities.as_ref().entity(uid) {
            cedar_policy_core::entities::Dereference::Data(e) => Some(e),
            _ => None,
        }
    }

    /// Every ancestor of an entity the request builds with `parents`, in the union of the
    /// static entities and the request's own: its static ancestors, its own parents, and
    /// theirs.
    pub(crate) fn ancestors_of(
        &self,
        uid: &EntityUID,
        parents: &[EntityUID],
    ) -> HashSet<EntityUID> {
        let mut all: HashSet<EntityUID> = self
            .get(uid)
            .map(|e| e.ancestors().cloned().collect())
            .unwrap_or_default();
        for p in parents {
            if all.insert(p.clone())
                && let Some(e) = self.get(p)
            {
                all.extend(e.ancestors().cloned());
            }
        }
        all
    }
}

/// A request's slice being assembled: entities by uid.
pub(crate) struct Slice<'a> {
    store: &'a EntityStore,
    entities: HashMap<EntityUID, Arc<ast::Entity>>,
    /// The principal's ancestors that only the request adds (a token's groups and theirs),
    /// which a static entity below the principal inherits too.
    principal: Option<(EntityUID, HashSet<EntityUID>)>,
}

impl<'a> Slice<'a> {
    pub(crate) fn new(store: &'a EntityStore) -> Slice<'a> {
        Slice {
            store,
            entities: HashMap::new(),
            principal: None,
        }
    }

    /// A request-built entity (already merged with its static namesake), with `ancestors`
    /// its every ancestor. `principal` marks the request's principal.
    ///
    /// SECURITY: a token's groups may close a cycle through the static entities (a static
    /// group below the user that the token puts the user in). Cedar refuses an entity set
    /// with a cycle, so this is an error, and errors deny.
    pub(crate) fn put_own(
        &mut self,
        own: Entity,
        ancestors: HashSet<EntityUID>,
        principal: bool,
    ) -> Result<(), String> {
        let (uid, attrs, _, _, tags) = <Entity as AsRef<ast::Entity>>::as_ref(&own)
            .clone()
            .into_inner();
        if ancestors.contains(&uid)
            || ancestors
                .iter()
                .filter_map(|a| self.store.get(a))
                .any(|a| a.is_descendant_of(&uid))
        {
            return Err(format!("entities: {uid} would be its own ancestor"));
        }
        if principal {
            let known: HashSet<EntityUID> = self
                .store
                .get(&uid)
                .map(|e| e.ancestors().cloned().collect())
                .unwrap_or_default();
            let added: HashSet<EntityUID> = ancestors.difference(&known).cloned().collect();
            self.principal = Some((uid.clone(), added));
        }
        let entity = ast::Entity::new_with_attr_partial_value(
            uid.clone(),
            attrs,
            HashSet::new(),
            ancestors,
            tags,
        );
        self.entities.insert(uid, Arc::new(entity));
        Ok(())
    }

    /// A static entity, when there is one and it is not in the slice yet.
    pub(crate) fn put_static(&mut self, uid: &EntityUID) {
        if self.entities.contains_key(uid) {
            return;
        }
        if let Some(e) = self.store.get(uid) {
            self.entities.insert(uid.clone(), Arc::new(e.clone()));
        }
    }

    /// Every ancestor of an entity in the slice (none when it is not there).
    pub(crate) fn ancestors(&self, uid: &EntityUID) -> Vec<EntityUID> {
        self.entities
            .get(uid)
            .map(|e| e.ancestors().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds, transitively, the static entities named by the attributes and tags of the
    /// entities in the slice, and gives a static entity below the principal the ancestors
    /// the request added to the principal. Then the slice as Cedar's entities.
    pub(crate) fn finish(mut self) -> Result<cedar_policy::Entities, String> {
        let mut todo: Vec<EntityUID> = Vec::new();
        for e in self.entities.values() {
            match self.store.refs.get(e.uid()) {
                // A request's own entity merged with a static one carries its references.
                Some(named) => todo.extend(named.iter().cloned()),
                None if self.store.get(e.uid()).is_none() => todo.extend(named_by(e)),
                None => {}
            }
        }
        while let Some(uid) = todo.pop() {
            if self.entities.contains_key(&uid) {
                continue;
            }
            if let Some(e) = self.store.get(&uid) {
                if let Some(named) = self.store.refs.get(&uid) {
                    todo.extend(named.iter().cloned());
                }
                self.entities.insert(uid, Arc::new(e.clone()));
            }
        }
        if let Some((principal, added)) = &self.principal
            && !added.is_empty()
        {
            for e in self.entities.values_mut() {
                if e.uid() != principal && e.is_descendant_of(principal) {
                    let inner = Arc::make_mut(e);
                    for a in added {
                        inner.add_indirect_ancestor(a.clone());
                    }
                }
            }
        }
        let entities = CoreEntities::from_entities(
            self.entities.into_values().map(Arc::unwrap_or_clone),
            None::<&NoEntitiesSchema>,
            TCComputation::AssumeAlreadyComputed,
            Extensions::all_available(),
        )
        .map_err(|e| format!("entities: {e}"))?;
        Ok(cedar_policy::Entities::from(entities))
    }
}
