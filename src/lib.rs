//! Portcullis: an external authorization server. For each request a proxy describes,
//! it verifies the client certificate and the bearer token, evaluates Cedar policies
//! over both, and answers allow or deny.
//!
//! ```text
//! front door ─► RequestFacts ─► identity (certificate, token, binding) ─► policy ─► Decision ─► reply
//!  (server)       (facts)          (identity)                              (policy)   (engine)   (decision)
//! ```
//!
//! Each stage imports only the ones before it. Verification and evaluation are pure:
//! inputs, trust material and `now` in, a value out.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;

pub mod demo;
pub mod engine;
pub mod explain;
pub mod facts;
pub mod fetch;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
mod jose;
pub mod metrics;
pub mod policy;
pub mod policytest;
pub mod proto;
pub mod reply;
pub mod ratelog;
pub mod reload;
pub mod server;
pub mod spiffe;
#[cfg(test)]
mod arrows;

pub use config::Settings;
pub use engine::{Answer, Background, Decision, DenyReason, Engine, Question};
pub use facts::{FactsError, RequestFacts};
pub use identity::{
    CertRejection, Identity, PeerIdentity, PeerOutcome, TokenClaims, TokenOutcome, TokenRejection,
};
pub use proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
pub use reply::HttpReply;
pub use spiffe::{SpiffeId, TrustDomain};
