//! Front doors: glue between the network and the [`Engine`](crate::engine::Engine). They
//! translate wire formats and hold no security logic: each door turns what arrived into a
//! [`Question`](crate::engine::Question), calls [`Engine::answer`](crate::engine::Engine::answer)
//! once, and writes the answer back in its own wire format.
//!
//! - `grpc.rs`: the Envoy ext_authz gRPC door and gRPC health.
//! - `http_listener.rs`: the HTTP listener (admin endpoints, the HTTP doors' routes).
//! - `http_doors.rs`: forward-auth and the JSON check API.
//! - `listen.rs`: binding, TLS and mTLS, the listener's certificate reload, connection caps.
//! - `process.rs`: the process around them: signals, reload, shutdown grace.

pub mod grpc;
mod http_doors;
pub mod http_listener;
mod linger;
pub mod listen;
mod process;
mod slots;

pub use grpc::{AuthorizationService, serve_incoming, serve_on, transport};
pub use http_listener::serve_http;
pub use process::run;
