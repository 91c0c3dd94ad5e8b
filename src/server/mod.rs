//! Front doors: glue between the network and the [`Engine`](crate::engine::Engine). They
//! translate wire formats and hold no security logic.

pub mod admin;
pub mod grpc;
pub mod http;
mod linger;
pub mod listen;
mod slots;

pub use grpc::{AuthorizationService, serve, serve_on};
