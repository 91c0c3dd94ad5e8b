//! Portcullis: an external authorization engine. For each request a proxy describes, it
//! verifies the client certificate and the bearer token, evaluates Cedar policies over
//! both, and answers allow or deny, with the headers to send upstream.
//!
//! The `portcullis` binary serves it to proxies over the network (Envoy's ext_authz gRPC,
//! forward-auth for nginx, Traefik and Caddy, a JSON API). This library is the same engine
//! for a proxy written in Rust that wants it in process.
//!
//! # Embedding the engine
//!
//! Load a [`Settings`] (the same TOML file the binary reads) and build an [`Engine`] from it
//! (or build one from parts with [`Engine::builder`]),
//! describe each request as [`RequestFacts`], and ask [`Engine::answer`]. The [`Answer`]
//! is recorded (metrics, audit line) and renders as a plain HTTP reply
//! ([`Answer::http_reply`]) or as Envoy's [`CheckResponse`] ([`Answer::check_response`]).
//!
//! ```
//! use portcullis::{Engine, Question, RequestFacts, Settings};
//! use std::time::SystemTime;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # std::fs::create_dir(dir.path().join("policies"))?;
//! # std::fs::write(
//! #     dir.path().join("policies/health.cedar"),
//! #     r#"permit (principal, action == Action::"GET", resource == Path::"/healthz");"#,
//! # )?;
//! # let config = dir.path().join("portcullis.toml");
//! # std::fs::write(&config, "[policy]\ndir = \"policies\"\n")?;
//! let settings = Settings::load(&config)?; // every problem, each with file and line
//! let engine = std::sync::Arc::new(Engine::load(&settings)?);
//! let _background = engine.start()?; // key fetching and hot reload, while it lives
//!
//! // Per request: the facts as the proxy holds them, checked as the Envoy door checks them.
//! let headers = [("host", b"shop.example".as_slice())];
//! let facts = RequestFacts::from_http("GET", "/healthz", "https", headers, None, None, engine.limits())?;
//! let answer = engine.answer(Question::Facts(&facts), SystemTime::now).await;
//! let reply = answer.http_reply();
//! assert!(answer.allowed());
//! assert_eq!(reply.status, 200); // and `reply.headers` go upstream
//! # Ok(())
//! # }
//! ```
//!
//! A denial is a reply too: its status (401 when no credential was presented, 403 when
//! policies refuse), its `WWW-Authenticate` header and body, which the proxy sends back
//! instead of forwarding. `examples/embedded_proxy.rs` is a whole reverse proxy built this
//! way, with its end-to-end test.
//!
//! # Serving it
//!
//! [`server::run`] is the binary's server process; [`server::AuthorizationService`] is the
//! gRPC door alone, to mount in a tonic server of one's own.
//!
//! # Features
//!
//! - `demo` (default): [`demo`], the throwaway CA, client certificates and token signer of
//!   `portcullis demo`. An embedding proxy can leave it out.
//! - `testing`: for this crate's own tests, benches and fuzz targets: the fuzzing
//!   harnesses, and the internal modules made public. Not a stable API.
//!
//! # Layout
//!
//! The stages run in one direction, and each module imports only those below it (a test,
//! `src/arrows.rs`, checks it): `config → facts → identity → policy → engine → reply →
//! server`. ARCHITECTURE.md is the map.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Declares modules that are private to the crate, except under the `testing` feature,
/// where this crate's tests, benches and fuzz targets reach inside them.
macro_rules! internal {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$attr])*
            #[cfg(feature = "testing")]
            #[doc(hidden)]
            #[allow(missing_docs)]
            pub mod $name;
            $(#[$attr])*
            #[cfg(not(feature = "testing"))]
            mod $name;
        )*
    };
}

pub mod config;
pub mod declared;
#[cfg(feature = "demo")]
pub mod demo;
pub mod explain;
pub mod policyfmt;
pub mod policytest;
pub mod proto;
pub mod replay;
pub mod server;

internal! {
    audit,
    builder,
    engine,
    facts,
    fetch,
    files,
    identity,
    jose,
    metrics,
    policy,
    problem,
    ratelog,
    reload,
    reply,
    security,
    spiffe,
}

#[cfg(feature = "testing")]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod fuzzing;

#[cfg(test)]
mod arrows;

pub use builder::EngineBuilder;
pub use config::Settings;
pub use engine::{Answer, Background, Decision, DenyReason, Engine, Question, ShadowOutcome};
pub use facts::{FactsError, RequestFacts};
pub use identity::{
    CertRejection, Identity, PeerIdentity, PeerOutcome, TokenClaims, TokenOutcome, TokenRejection,
};
pub use policy::{CedarRequest, PolicyOutcome, Uid, Verdict};
pub use problem::{LoadError, Problem};
pub use proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
pub use reply::{DECISION_ID_HEADER, DRY_RUN_HEADER, HttpReply};
pub use spiffe::{SpiffeError, SpiffeId, TrustDomain};

/// The audit log's tamper evidence, for `portcullis audit`: checking a log's hash chain
/// and signed checkpoints, and making the checkpoint signing key (docs/AUDIT.md).
pub mod audit_chain {
    pub use crate::audit::verify::{
        Broken, MAX_LINE_BYTES, Problem, PublicKey, Report, Torn, VerifyError, generate_key,
        public_key_pem, verify,
    };
}

/// Caps the size of every file Portcullis reads (policies, entities, keys, certificates),
/// for the whole process. The binary sets it from `[limits] max_file_bytes` before it
/// loads anything else; an embedding program should do the same.
pub fn set_max_file_bytes(max: u64) {
    files::set_max_bytes(max);
}

/// The Cedar schema that fits a configuration (`portcullis schema`): the default
/// vocabulary, the claims the issuers declare (`[issuer.claims]`), the request headers,
/// `context.time`, and the entity types of the static entities file.
pub fn cedar_schema(settings: &Settings) -> Result<String, LoadError> {
    policy::schema::for_settings(settings)
        .map_err(|problems| LoadError::new("writing the schema", problems))
}

/// Checks, without opening or creating it, that `[log] audit = PATH` can be written: a
/// regular file, or none yet in a directory that exists (`portcullis validate`).
pub fn check_audit_path(path: &std::path::Path) -> Result<(), String> {
    files::check_append(path).map_err(|why| format!("log.audit: {}: {why}", path.display()))
}

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The Rust examples of docs/EMBEDDING.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/EMBEDDING.md")]
struct EmbeddingDoctests;
