//! The differential oracle (issue 12): the engine's decision equals the reference built
//! with Cedar's public API the obvious way (`tests/oracle/mod.rs`), over random worlds and
//! requests. The same harness is the fuzz target `decision_oracle`.

#[path = "oracle/mod.rs"]
mod oracle;

use oracle::{Oracle, Seen};
use proptest::prelude::*;
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
