//! Bulk material for the scale mode. In: a number of static entities or of policies. Out:
//! an `entities.json` with that many entities, and policy texts with that many policies of
//! which the same ten are candidates for the load's requests whatever the total: a world
//! that grows only where a request need not look.
//!
//! The entities: groups `g-0`, `g-1`, ... in a tree of fan-out 16 (the parent of `g-i` is
//! `g-(i/16)`); the load's own groups (`readers`, `writers`) and the pool's first workloads
//! under the last group, so that their ancestor chains run through the tree up to `g-0`;
//! and generated workloads spread over the groups. A tenth of the entities are workloads.
//!
//! The policies: the load's own [`POLICIES`], five more that are candidates for its
//! requests and change no answer (an unconstrained `forbid`, and one filed under each other
//! key of the index: an ancestor group, the action, the principal type, the resource type),
//! then filler whose scopes name other groups, users, workloads, actions and paths.

use crate::world::{POLICIES, pool_workload};
use std::fmt::Write as _;

/// Fan-out of the group tree.
const FAN_OUT: usize = 16;

/// Policies in the base set: the load's own five and [`BASE_EXTRA`].
pub const BASE_POLICIES: usize = 10;

/// Candidates for every request of the mix that change no answer: their conditions are
/// false for it and cannot error (an error would deny). `{up}` is a group above the load's.
const BASE_EXTRA: &str = r#"
@id("scale-forbid-never")
forbid (principal, action, resource)
when { context.request.path like "/never/*" };

@id("scale-ancestor-delete")
permit (principal in Group::"g-{up}", action == Action::"DELETE", resource);

@id("scale-get-header")
permit (principal, action == Action::"GET", resource)
when { context.request.headers has "x-never" };

@id("scale-users-never")
forbid (principal is User, action, resource)
when { resource.path like "/api/never/*" };

@id("scale-paths-never")
permit (principal, action, resource is Path)
when { resource.path == "/never" };
"#;

/// The shape of the static entities for a total of `entities`.
#[derive(Debug, Clone, Copy)]
pub struct Tree {
    /// Groups `g-0` to `g-(groups - 1)`.
    groups: usize,
    /// Workloads, the pool's first ones included.
    workloads: usize,
    /// The pool's workloads among them.
    pool_workloads: usize,
}

impl Tree {
    /// A tenth workloads (the pool's `certs` first), `readers` and `writers`, and groups for
    /// the rest (at least one).
    pub fn new(entities: usize, certs: usize) -> Tree {
        let workloads = entities / 10;
        Tree {
            groups: entities.saturating_sub(workloads + 2).max(1),
            workloads,
            pool_workloads: workloads.min(certs),
        }
    }

    /// Entities in the file.
    pub fn len(&self) -> usize {
        self.groups + 2 + self.workloads
    }

    /// The group the load's groups and workloads belong to.
    fn leaf(&self) -> usize {
        self.groups - 1
    }

    /// The leaf and its ancestors, up to `g-0`: the groups a policy may not name to stay out
    /// of the load's candidates.
    fn chain(&self) -> Vec<usize> {
        let mut chain = vec![self.leaf()];
        let mut i = self.leaf();
        while i > 0 {
            i /= FAN_OUT;
            chain.push(i);
        }
        chain
    }

    /// The `entities.json` text (written by hand: a million entities through `serde_json`
    /// values would take several times the memory).
    pub fn entities_json(&self) -> String {
        let mut s = String::with_capacity(self.len() * 110);
        s.push_str("[\n");
        let group = |i: usize| format!(r#"{{"type":"Group","id":"g-{i}"}}"#);
        let mut first = true;
        let mut entity = |s: &mut String, kind: &str, id: &str, attrs: &str, parent: &str| {
            if !first {
                s.push_str(",\n");
            }
            first = false;
            let _ = write!(
                s,
                r#"{{"uid":{{"type":"{kind}","id":"{id}"}},"attrs":{{{attrs}}},"parents":[{parent}]}}"#
            );
        };
        for i in 0..self.groups {
            let parent = if i == 0 {
                String::new()
            } else {
                group(i / FAN_OUT)
            };
            entity(&mut s, "Group", &format!("g-{i}"), "", &parent);
        }
        let leaf = group(self.leaf());
        for name in ["readers", "writers"] {
            entity(&mut s, "Group", name, "", &leaf);
        }
        for w in 0..self.workloads {
            let (id, parent) = if w < self.pool_workloads {
                (pool_workload(w), leaf.clone())
            } else {
                (
                    format!("spiffe://example.org/ns/gen/sa/s{w}"),
                    group(w.wrapping_mul(7919) % self.groups),
                )
            };
            let attrs = format!(r#""team":"t{}""#, w % 100);
            entity(&mut s, "Workload", &id, &attrs, &parent);
        }
        s.push_str("\n]\n");
        s
    }

    /// The base policies: the load's own and [`BASE_EXTRA`], naming the leaf's parent.
    pub fn base_policies(&self) -> String {
        let up = self.leaf() / FAN_OUT;
        format!("{POLICIES}{}", BASE_EXTRA.replace("{up}", &up.to_string()))
    }

    /// `count` policies none of which is a candidate for the load's requests, in five kinds
    /// in turn, each filed under a different key of the index: a group outside the load's
    /// chain, a user, an action, a path, a workload.
    pub fn filler_policies(&self, count: usize) -> String {
        let chain = self.chain();
        let mut groups = (0..).filter(|g| !chain.contains(g));
        let mut s = String::from("// Written by portcullis-load: scale filler.\n");
        for k in 0..count {
            let _ = writeln!(s, "@id(\"filler-{k}\")");
            let _ = match k % 5 {
                0 => writeln!(
                    s,
                    "permit (principal in Group::\"g-{}\", action == Action::\"GET\", resource)\n\
                     when {{ resource.path like \"/api/g{k}/*\" }};",
                    groups.next().unwrap_or(0)
                ),
                1 => writeln!(
                    s,
                    "permit (principal == User::\"u-{k}\", action, resource);"
                ),
                2 => writeln!(
                    s,
                    "forbid (principal, action == Action::\"X{k}\", resource);"
                ),
                3 => writeln!(
                    s,
                    "permit (principal, action, resource == Path::\"/api/s{k}\");"
                ),
                _ => writeln!(
                    s,
                    "permit (principal == Workload::\"spiffe://example.org/ns/other/sa/s{k}\", \
                     action == Action::\"GET\", resource)\nwhen {{ context has peer }};"
                ),
            };
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_holds_the_load_under_its_last_group() {
        let tree = Tree::new(1_000_000, 1000);
        assert_eq!(tree.len(), 1_000_000);
        assert_eq!(tree.chain(), vec![899_997, 56_249, 3_515, 219, 13, 0]);
        let small = Tree::new(10, 1000);
        assert_eq!(small.len(), 10);
        assert_eq!(small.chain(), vec![6, 0]);
        let json: serde_json::Value =
            serde_json::from_str(&small.entities_json()).expect("entities JSON");
        assert_eq!(json.as_array().map(Vec::len), Some(10));
    }

    #[test]
    fn filler_never_names_the_load_chain() {
        let tree = Tree::new(10, 1000);
        let filler = tree.filler_policies(50);
        assert_eq!(filler.matches("@id(").count(), 50);
        assert!(!filler.contains("Group::\"g-0\"") && !filler.contains("Group::\"g-6\""));
        assert!(
            tree.base_policies()
                .contains("Group::\"g-0\", action == Action::\"DELETE\"")
        );
    }
}
