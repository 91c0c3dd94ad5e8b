//! The differential oracle (issue 12): the engine's decision equals the reference built
//! with Cedar's public API the obvious way (`tests/oracle/mod.rs`), over random worlds and
//! requests. The same harness is the fuzz target `decision_oracle`.

use crate::oracle_model as oracle;

use oracle::{AUDIENCE, Described, ISSUER, Oracle, Seen};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::{Mutex, OnceLock};

fn shared() -> &'static Oracle {
    static O: OnceLock<Oracle> = OnceLock::new();
    O.get_or_init(Oracle::new)
}

fn seen() -> &'static Mutex<Seen> {
    static S: OnceLock<Mutex<Seen>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Seen::default()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_decides_as_the_reference(data in prop::collection::vec(any::<u8>(), 16..400)) {
        let mut s = Seen::default();
        let result = shared().run(&data, &mut s);
        prop_assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
        let mut total = seen().lock().unwrap_or_else(|e| e.into_inner());
        total.compared += s.compared;
        total.allowed += s.allowed;
        total.forbidden += s.forbidden;
        total.errors += s.errors;
        total.replace_differs += s.replace_differs;
    }
}

/// The oracle is only worth something if the cases reach what can go wrong: allows,
/// forbids, erroring policies, and requests where replacing a static entity (the bug of
/// issue 12, finding 1) would decide differently from merging it. A fixed pseudo-random
/// sweep, so the counts do not depend on proptest's seeds.
#[test]
fn the_cases_reach_allows_forbids_errors_and_static_merges() {
    let mut s = Seen {
        track_replace: true,
        ..Seen::default()
    };
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..150 {
        let data: Vec<u8> = (0..256)
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        if let Err(e) = shared().run(&data, &mut s) {
            panic!("{e}");
        }
    }
    assert!(s.compared > 500, "{s:?}");
    for (what, n) in [
        ("allow", s.allowed),
        ("forbid", s.forbidden),
        ("policy error", s.errors),
        ("replace differs from merge", s.replace_differs),
    ] {
        assert!(n * 50 > s.compared, "too few cases of {what}: {s:?}");
    }
}

fn token(sub: &str, groups: &[&str]) -> Option<Value> {
    let now = portcullis::demo::unix_now();
    Some(
        json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600,
                 "groups": groups, "scope": "read" }),
    )
}

fn get(path: &'static str, claims: Option<Value>) -> Described {
    Described {
        method: "GET",
        path,
        host: "h1",
        claims,
        workload: None,
        at: portcullis::demo::unix_now(),
    }
}

/// Worlds built by hand for what random worlds reach rarely; each fails if the engine's
/// entity slice or policy index cuts the corner it names.
#[test]
fn hand_built_worlds_hold_the_corners_of_slicing_and_indexing() {
    let o = shared();
    let mut seen = Seen::default();
    let e = |v: Value| v;
    let cases: Vec<(&str, Vec<Value>, &str, Vec<Described>)> = vec![
        (
            // A static group below the user: the token's group is its ancestor too.
            "ancestors the token adds reach entities below the principal",
            vec![e(
                json!({ "uid": {"type": "Group", "id": "g3"}, "attrs": {}, "parents": [{"type": "User", "id": "alice"}] }),
            )],
            r#"@id("p0") permit (principal, action, resource) when { Group::"g3" in Group::"g1" };"#,
            vec![
                get("/a", token("alice", &["g1"])),
                get("/a", token("alice", &["g2"])),
                get("/a", token("bob", &["g1"])),
            ],
        ),
        (
            // Entities reached only through attributes, two levels deep and inside sets.
            "entities named by attributes are in the slice",
            vec![
                e(
                    json!({ "uid": {"type": "Path", "id": "/a"}, "attrs": { "owner": {"__entity": {"type": "User", "id": "carol"}}, "readers": [{"__entity": {"type": "Group", "id": "g2"}}] }, "parents": [] }),
                ),
                e(
                    json!({ "uid": {"type": "User", "id": "carol"}, "attrs": { "manager": {"__entity": {"type": "User", "id": "dave"}} }, "parents": [{"type": "Group", "id": "g1"}] }),
                ),
                e(
                    json!({ "uid": {"type": "User", "id": "dave"}, "attrs": { "level": 3 }, "parents": [] }),
                ),
                e(
                    json!({ "uid": {"type": "Group", "id": "g2"}, "attrs": { "open": true }, "parents": [] }),
                ),
            ],
            r#"@id("p0") permit (principal, action, resource) when { resource.owner.manager.level > 2 };
@id("p1") forbid (principal, action, resource) when { resource.owner in Group::"g1" && principal == User::"bob" };
@id("p2") permit (principal is User, action, resource) when { resource.readers.contains(Group::"g2") && Group::"g2".open };"#,
            vec![
                get("/a", token("alice", &[])),
                get("/a", token("bob", &[])),
                get("/b", None),
            ],
        ),
        (
            // Policies filed under every kind of key, forbids among them.
            "every scope form is found by the index",
            vec![
                e(
                    json!({ "uid": {"type": "Path", "id": "/a"}, "attrs": {}, "parents": [{"type": "Folder", "id": "f0"}] }),
                ),
                e(
                    json!({ "uid": {"type": "Folder", "id": "f0"}, "attrs": {}, "parents": [{"type": "Folder", "id": "f1"}] }),
                ),
                e(
                    json!({ "uid": {"type": "Action", "id": "GET"}, "attrs": {}, "parents": [{"type": "Action", "id": "read"}] }),
                ),
                e(
                    json!({ "uid": {"type": "Group", "id": "g0"}, "attrs": {}, "parents": [{"type": "Group", "id": "g1"}] }),
                ),
            ],
            r#"@id("p0") permit (principal in Group::"g1", action, resource);
@id("p1") forbid (principal, action, resource in Folder::"f1") when { context.binding == false && principal == User::"bob" };
@id("p2") permit (principal, action in Action::"read", resource) when { principal == User::"carol" };
@id("p3") permit (principal is User, action, resource) when { principal == User::"dave" };
@id("p4") forbid (principal, action, resource is Path) when { principal == User::"dave" && resource.path == "/b" };
@id("p5") permit (principal, action in [Action::"POST", Action::"GET"], resource == Path::"/b");"#,
            vec![
                get("/a", token("alice", &["g0"])),
                get("/a", token("bob", &["g0"])),
                get("/a", token("carol", &[])),
                get("/b", token("dave", &[])),
                get("/a", token("dave", &[])),
                get("/b", None),
                get("/e", None),
            ],
        ),
    ];
    for (what, statics, policies, requests) in cases {
        if let Err(e) = o.check_world(&statics, policies, &requests, &mut seen) {
            panic!("{what}: {e}");
        }
    }
    assert!(seen.allowed > 0 && seen.forbidden > 0, "{seen:?}");
}

/// With a schema, the engine's `context.token.claims` holds only the declared claims
/// (`level`), as the reference given the same rule does, over requests whose tokens carry
/// undeclared claims (`dept`, `cnf`, `groups`...) or none. The policies validate against
/// the schema, which types `has` of an undeclared claim as false; the sweep must reach
/// requests that every claim in the context would decide otherwise, so that it would fail
/// if the engine stopped leaving them out.
#[test]
fn with_a_schema_the_engine_decides_as_the_reference_on_declared_claims() {
    let policies = r#"
@id("p0") permit (principal, action, resource)
    when { context has token && context.token.claims has level && context.token.claims.level >= 2 };
@id("p1") permit (principal is User, action, resource)
    when { principal.hasTag("dept") && principal.getTag("dept") == "x" };
@id("p2") permit (principal, action == Action::"GET", resource) when { context.binding };
@id("f0") forbid (principal, action == Action::"DELETE", resource)
    unless { context has token && context.token.claims has dept };
@id("f1") forbid (principal, action == Action::"POST", resource)
    when { context has token && context.token.claims has cnf };
"#;
    let mut s = Seen::default();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..40 {
        let data: Vec<u8> = (0..64)
            .map(|_| {
                // splitmix64
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        if let Err(e) = shared().run_with_schema(&data, policies, &mut s) {
            panic!("{e}");
        }
    }
    assert!(s.compared > 100, "{s:?}");
    assert!(s.allowed > 0 && s.forbidden > 0, "{s:?}");
    assert!(
        s.schema_differs * 20 > s.compared,
        "too few requests where the filter matters: {s:?}"
    );
}
