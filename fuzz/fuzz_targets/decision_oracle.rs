#![no_main]
//! The differential oracle of the whole decision (tests/oracle/mod.rs): any input is a
//! random world and its requests; a disagreement between the engine and the reference
//! built with Cedar's public API is a crash.

#[path = "../../tests/oracle/mod.rs"]
mod oracle;

static ORACLE: std::sync::OnceLock<oracle::Oracle> = std::sync::OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut seen = oracle::Seen::default();
    if let Err(e) = ORACLE.get_or_init(oracle::Oracle::new).run(data, &mut seen) {
        panic!("{e}");
    }
});
