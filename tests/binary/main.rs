//! Integration tests that run the real `portcullis` binary (`CARGO_BIN_EXE_portcullis`):
//! the command line, servers started through `common::binary::Binary`, hostile input,
//! listener floods, reloads of operator files, fail-open classes, security events (and the
//! alert rules, through promtool), and Envoy's own gRPC client. One test binary (one link);
//! each module was once a binary of its own.
//!
//! Every server is a child process of its own on 127.0.0.1:0, so tests running in parallel
//! threads share no server state. Tests that measure a server alone (the soak, SIGTERM
//! under load) are in the `serial` binary instead.

#[path = "../common/mod.rs"]
mod common;

mod audit_log;
mod audit_verify;
mod authoring;
mod changing_policies;
mod cli;
mod config_errors;
mod configmap;
mod envoy_wire;
mod fail_open;
mod hostile;
mod listeners;
mod readme;
mod reload;
mod schema_time;
mod security_events;
mod syslog;
