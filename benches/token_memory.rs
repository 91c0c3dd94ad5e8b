//! What a cached token costs in memory (issue 13): `cargo bench --bench token_memory`.
//!
//! A counting allocator (around the server's allocator) gives the bytes live after each
//! step, divided by the number of distinct tokens:
//!
//! 1. `verified`: every token verified once through the engine's verifier, so that the
//!    token cache holds its claims (what a token costs before any policy sees it);
//! 2. `decided`: every token decided once through `Engine::check`, so that its Cedar form
//!    (the `context.token` record and the `User` entity) is built and kept with it;
//! 3. the same with policies that read some of the token's claims and tags, and with
//!    policies that read all of it, which need more of the Cedar form than policies that
//!    do not (the form holds only what the loaded policies can read).
//!
//! The tokens are the load tool's: issuer, audience, subject, `iat`, `exp`, `jti`, an email,
//! a scope and one or two groups; half carry a session id in place of the load tool's `cnf`. Bytes are the
//! sizes asked of the allocator; the allocator's own rounding and the process's RSS are
//! measured end to end by `portcullis-load run --tokens 10000`.

use jsonwebtoken::Algorithm;
use portcullis::config::Settings;
use portcullis::demo::{TokenSigner, jwks, unix_now};
use portcullis::facts::RequestFacts;
use portcullis::identity::{TokenVerifier, Verifier};
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::SystemTime;

/// The server's allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

// A global allocator cannot be written without unsafe code; the workspace denies it elsewhere.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ISSUER: &str = "https://idp.example.org";
const TOKENS: usize = 10_000;

/// Policies that read nothing of the token but the principal's groups (the load tool's).
const PLAIN: &str = r#"
@id("readers") permit (principal in Group::"readers", action == Action::"GET", resource)
when { resource.path like "/api/*" };
@id("no-admin") forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

/// Policies that read the token's record, a claim and a tag as well.
const READING: &str = r#"
@id("readers") permit (principal in Group::"readers", action == Action::"GET", resource)
when {
  resource.path like "/api/*" && context.token.scopes.contains("orders:read") &&
  context.token.claims.email like "*@example.org" && principal.getTag("jti") != ""
};
@id("no-admin") forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

/// Policies that read every part of the token (a record used whole, a computed tag name,
/// the user's attribute): the whole Cedar form is needed, as it was always built before.
const EVERYTHING: &str = r#"
@id("readers") permit (principal in Group::"readers", action == Action::"GET", resource)
when {
  resource.path like "/api/*" && context.token == context.token &&
  !principal.hasTag(context.request.method) && principal has issuer
};
@id("no-admin") forbid (principal, action, resource) when { resource.path like "/api/admin/*" };
"#;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn request(token: &str) -> CheckRequest {
    let mut http = attribute_context::HttpRequest {
        method: "GET".into(),
        path: "/api/orders/1".into(),
        host: "api.example.org".into(),
        scheme: "https".into(),
        ..Default::default()
    };
    http.headers
        .insert("authorization".into(), format!("Bearer {token}"));
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

fn settings(dir: &std::path::Path, policies: &str) -> Settings {
    std::fs::create_dir_all(dir.join("policies")).expect("policy directory");
    std::fs::write(dir.join("policies/p.cedar"), policies).expect("policies");
    let text = format!(
        r#"
[[issuer]]
issuer = "{ISSUER}"
audiences = ["orders"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]

[policy]
dir = "policies"

[cache]
tokens = {TOKENS}
"#
    );
    Settings::from_toml(&text, dir).unwrap_or_else(|e| panic!("{e:?}"))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with fewer tokens.
    let tokens = if std::env::args().any(|a| a == "--bench") {
        TOKENS
    } else {
        200
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let signer = TokenSigner::generate(Algorithm::ES256, "k1");
    std::fs::write(dir.path().join("idp.jwks.json"), jwks(&[&signer])).expect("jwks");
    let now = unix_now();
    let requests: Vec<CheckRequest> = (0..tokens)
        .map(|u| {
            let sub = format!("user-{u:05}");
            let mut claims = json!({
                "iss": ISSUER, "aud": "orders", "sub": sub, "iat": now, "exp": now + 3600,
                "groups": ["readers"], "scope": "orders:read",
                "email": format!("{sub}@example.org"), "jti": format!("jti-{sub}"),
            });
            if u % 2 == 0 {
                claims["groups"] = json!(["readers", "writers"]);
                // In place of the load tool's `cnf` (no certificate here to bind to).
                claims["sid"] = json!(format!("session-{u:05}-Aw3l1Z3Bz6x8TlEqcNfAzM2xC2d7m5c3"));
            }
            request(&signer.sign(&claims))
        })
        .collect();

    println!("bytes per cached token ({tokens} distinct tokens):");
    for (name, policies) in [
        ("plain policies", PLAIN),
        ("claim-reading policies", READING),
        ("policies reading all", EVERYTHING),
    ] {
        let s = settings(dir.path(), policies);
        let snapshot = portcullis::policy::load(&s.policy).unwrap_or_else(|e| panic!("{e:?}"));
        let facts: Vec<RequestFacts> = requests
            .iter()
            .map(|r| RequestFacts::from_check(r, &s.limits).expect("facts"))
            .collect();
        let before = live();
        let tokens_verifier =
            TokenVerifier::load(&s.issuers, &s.token, TOKENS).expect("token verifier");
        let verifier = Verifier::new(tokens_verifier, Default::default(), Default::default());
        // Step 1: verification only; the cache keeps every token's claims.
        for f in &facts {
            let identity = verifier.verify(None, f, SystemTime::now());
            assert!(
                identity.token().is_some(),
                "the token verifies: {:?}",
                identity.token
            );
        }
        let verified = live();
        // Step 2: a decision each (a cache hit, then the policies), which builds and keeps
        // the token's Cedar form.
        for f in &facts {
            let identity = verifier.verify(None, f, SystemTime::now());
            let outcome = snapshot.evaluate(f, &identity, std::time::SystemTime::now());
            assert!(outcome.allowed, "{outcome:?}");
        }
        let decided = live();
        let per = |bytes: isize| bytes as f64 / tokens as f64;
        println!(
            "  {name:<24} verified {:>7.0} B   + Cedar form {:>7.0} B   = {:>7.0} B",
            per(verified - before),
            per(decided - verified),
            per(decided - before)
        );
        drop(verifier);
    }
}
