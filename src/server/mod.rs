//! Front doors: glue between the network and the [`Engine`]. They translate wire formats
//! and hold no security logic.

pub mod grpc;

pub use grpc::{AuthorizationService, serve, serve_on};
