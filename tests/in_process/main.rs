//! Integration tests that use the library in this process: engines loaded from throwaway
//! configurations, in-process servers on 127.0.0.1:0 (`common::start_server`, the shared
//! `common::world`), the differential oracle, the fuzz corpora, the test identity provider;
//! and a real nginx in front of an in-process server. One test binary (one link); each
//! module was once a binary of its own.
//!
//! Shared process state: no test here sets an environment variable, changes the current
//! directory or calls a process-wide setter (`portcullis::files::set_max_bytes` is called by
//! the binary only); the rustls crypto provider is installed idempotently; `common::world`
//! is used by `grpc_check` only.

#[path = "../common/mod.rs"]
mod common;
/// The reference decision of `oracle` and `fuzz_corpus` (also included by the fuzz target
/// `decision_oracle`, so it stays at `tests/oracle/mod.rs`).
#[path = "../oracle/mod.rs"]
mod oracle_model;

mod caches;
mod embedded_proxy;
mod engine;
mod front_proxy;
mod fuzz_corpus;
mod grpc_check;
mod http_doors;
mod keyserver_selftest;
mod oracle;
mod policy_test;
mod python_client;
mod remote_keys;
mod xfcc;
