//! The verification caches may only ever answer what a fresh verification would: each
//! test verifies a credential once (so it is cached), changes one thing (the key set, the
//! time, the certificate presented, the revocation list, the trust bundle, the CRL's
//! validity) and checks the cached credential is judged as a fresh one would be. Each
//! would pass a credential that must be refused if the matching check were removed.

use crate::common;

use common::{Authority, LeafSpec, TokenSigner};
use jsonwebtoken::Algorithm;
use portcullis::config::Settings;
use portcullis::engine::{DenyReason, Engine};
use portcullis::identity::{CertRejection, TokenRejection};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, SystemTime};

const ISSUER: &str = "https://cache.test";
const READER: &str = "spiffe://example.org/ns/cache/sa/reader";

const POLICY: &str = r#"
permit (principal is User, action == Action::"GET", resource);
permit (principal is Workload, action == Action::"GET", resource);
"#;

/// An engine over its own directory: a root CA, a JWKS file and the policy above.
struct Setup {
    dir: tempfile::TempDir,
    ca: Authority,
    signer: TokenSigner,
    engine: Engine,
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write test file");
}

fn setup(extra: &str) -> Setup {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Authority::root("cache test CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k1");
    write(dir.path(), "ca.pem", &ca.cert_pem());
    // Used by tests whose `extra` names it.
    write(dir.path(), "ca.crl", &ca.crl(&[], time::Duration::days(7)));
    write(dir.path(), "jwks.json", &portcullis::demo::jwks(&[&signer]));
    std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
    write(&dir.path().join("policies"), "p.cedar", POLICY);
    let config = format!(
        r#"
[peer]
trust_bundle = "ca.pem"
trust_domains = ["example.org"]
{extra}

[[issuer]]
issuer = "{ISSUER}"
audiences = ["orders"]
jwks_file = "jwks.json"
algorithms = ["ES256"]
leeway = "0s"

[policy]
dir = "policies"

[log]
audit = "audit.log"
"#
    );
    write(dir.path(), "portcullis.toml", &config);
    let settings = Settings::load(&dir.path().join("portcullis.toml")).expect("valid config");
    let engine = Engine::load(&settings).expect("engine loads");
    Setup {
        dir,
        ca,
        signer,
        engine,
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64
}

fn claims(now: SystemTime, extra: Value) -> Value {
    let now = unix(now);
    let mut c = json!({
        "iss": ISSUER, "aud": "orders", "sub": "alice", "iat": now, "exp": now + 600,
        "jti": "token-1",
    });
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c
}

fn denial(
    engine: &Engine,
    cert: Option<&str>,
    token: Option<&str>,
    at: SystemTime,
) -> Option<DenyReason> {
    let req = common::request("GET", "/api/orders", cert, token);
    engine.check(&req, at).denial
}

#[test]
fn a_cached_token_is_dropped_when_its_key_leaves_the_key_set() {
    let s = setup("");
    let now = SystemTime::now();
    let token = s.signer.sign(&claims(now, json!({})));
    assert_eq!(denial(&s.engine, None, Some(&token), now), None);
    assert_eq!(s.engine.cached_tokens(), 1, "the token is cached");
    assert_eq!(denial(&s.engine, None, Some(&token), now), None);

    // The issuer rotates: k1 is gone, k2 replaces it.
    let k2 = TokenSigner::generate(Algorithm::ES256, "k2");
    write(s.dir.path(), "jwks.json", &portcullis::demo::jwks(&[&k2]));
    s.engine.reload().expect("reload");
    assert!(matches!(
        denial(&s.engine, None, Some(&token), now),
        Some(DenyReason::Token(TokenRejection::UnknownKey { .. }))
    ));
}

/// A token whose signature failed is remembered, so that sending it again costs no
/// signature check, but only while the key set it failed against is current: once the
/// issuer publishes the key that signed it, it verifies.
#[test]
fn a_forged_token_is_remembered_only_while_the_keys_it_failed_against_are_current() {
    let s = setup("");
    let now = SystemTime::now();
    // Another key under the issuer's key id.
    let rogue = TokenSigner::generate(Algorithm::ES256, "k1");
    let forged = rogue.sign(&claims(now, json!({})));
    for _ in 0..2 {
        assert_eq!(
            denial(&s.engine, None, Some(&forged), now),
            Some(DenyReason::Token(TokenRejection::BadSignature))
        );
        assert_eq!(s.engine.cached_forgeries(), 1);
        assert_eq!(s.engine.cached_tokens(), 0);
    }
    // The issuer rotates to the key that signed it: the same bytes now verify.
    write(
        s.dir.path(),
        "jwks.json",
        &portcullis::demo::jwks(&[&rogue]),
    );
    s.engine.reload().expect("reload");
    assert_eq!(denial(&s.engine, None, Some(&forged), now), None);
    assert_eq!(s.engine.cached_tokens(), 1);
}

/// Forgeries have a cache of their own: a flood of distinct ones does not evict the
/// verified tokens, and stays bounded.
#[test]
fn a_flood_of_forged_tokens_does_not_evict_verified_ones() {
    let s = setup("[cache]\ntokens = 16");
    let now = SystemTime::now();
    let good = s.signer.sign(&claims(now, json!({})));
    assert_eq!(denial(&s.engine, None, Some(&good), now), None);
    let rogue = TokenSigner::generate(Algorithm::ES256, "k1");
    for i in 0..64 {
        let forged = rogue.sign(&claims(now, json!({"jti": format!("forged-{i}")})));
        assert_eq!(
            denial(&s.engine, None, Some(&forged), now),
            Some(DenyReason::Token(TokenRejection::BadSignature))
        );
    }
    assert!(
        (1..=16).contains(&s.engine.cached_forgeries()),
        "{} forgeries cached with room for 16",
        s.engine.cached_forgeries()
    );
    assert_eq!(
        s.engine.cached_tokens(),
        1,
        "the verified token was evicted"
    );
    assert_eq!(denial(&s.engine, None, Some(&good), now), None);
}

#[test]
fn a_cached_token_still_expires() {
    let s = setup("");
    let now = SystemTime::now();
    let token = s.signer.sign(&claims(now, json!({})));
    assert_eq!(denial(&s.engine, None, Some(&token), now), None);
    assert_eq!(s.engine.cached_tokens(), 1);
    let later = now + Duration::from_secs(601);
    // Refused on every use; it stays cached, so a client that keeps sending it costs no
    // signature check.
    for _ in 0..2 {
        assert_eq!(
            denial(&s.engine, None, Some(&token), later),
            Some(DenyReason::Token(TokenRejection::Expired))
        );
        assert_eq!(s.engine.cached_tokens(), 1);
    }
    // Not yet valid is checked on every use too.
    let early = s
        .signer
        .sign(&claims(now, json!({"nbf": unix(now) + 60, "jti": "t2"})));
    assert!(denial(&s.engine, None, Some(&early), now + Duration::from_secs(61)).is_none());
    assert_eq!(
        denial(&s.engine, None, Some(&early), now),
        Some(DenyReason::Token(TokenRejection::NotYetValid))
    );
}

#[test]
fn a_cached_bound_token_needs_its_own_certificate_every_time() {
    let s = setup("");
    let now = SystemTime::now();
    let alice = s.ca.issue(&LeafSpec::spiffe(READER));
    let mallory =
        s.ca.issue(&LeafSpec::spiffe("spiffe://example.org/ns/cache/sa/other"));
    let token = s.signer.sign(&claims(
        now,
        json!({"cnf": {"x5t#S256": alice.thumbprint()}}),
    ));
    let alice_pem = alice.envoy_encoded();
    assert_eq!(denial(&s.engine, Some(&alice_pem), Some(&token), now), None);
    assert_eq!(
        denial(&s.engine, Some(&mallory.envoy_encoded()), Some(&token), now),
        Some(DenyReason::Token(TokenRejection::BindingMismatch))
    );
    assert_eq!(
        denial(&s.engine, None, Some(&token), now),
        Some(DenyReason::Token(TokenRejection::BoundWithoutCertificate))
    );
}

#[tokio::test]
async fn a_cached_token_revoked_later_is_refused() {
    let s = setup("");
    write(s.dir.path(), "revoked.txt", "# nothing revoked yet\n");
    let config = std::fs::read_to_string(s.dir.path().join("portcullis.toml"))
        .expect("config")
        .replace("[policy]", "[token]\nrevoked = \"revoked.txt\"\n\n[policy]");
    let settings = Settings::from_toml(&config, s.dir.path()).expect("valid config");
    let engine = std::sync::Arc::new(Engine::load(&settings).expect("engine loads"));
    let _background = engine.start().expect("watches start");
    let now = SystemTime::now();
    let token = s.signer.sign(&claims(now, json!({})));
    assert_eq!(denial(&engine, None, Some(&token), now), None);
    assert_eq!(engine.cached_tokens(), 1);
    write(s.dir.path(), "revoked.txt", "jti:token-1\n");
    let revoked = common::eventually(Duration::from_secs(10), || async {
        denial(&engine, None, Some(&token), SystemTime::now())
            == Some(DenyReason::Token(TokenRejection::Revoked))
    })
    .await;
    assert!(
        revoked,
        "the cached token is refused once its jti is revoked"
    );
}

#[test]
fn a_cached_certificate_is_dropped_with_the_trust_bundle() {
    let s = setup("");
    let now = SystemTime::now();
    let cert = s.ca.issue(&LeafSpec::spiffe(READER)).envoy_encoded();
    assert_eq!(denial(&s.engine, Some(&cert), None, now), None);
    // Operators stop trusting that CA.
    write(
        s.dir.path(),
        "ca.pem",
        &Authority::root("another CA").cert_pem(),
    );
    s.engine.reload().expect("reload");
    assert!(matches!(
        denial(&s.engine, Some(&cert), None, now),
        Some(DenyReason::Certificate(CertRejection::UnknownIssuer(_)))
    ));
}

#[test]
fn a_cached_certificate_revoked_by_a_new_crl_is_refused() {
    let s = setup("crls = [\"ca.crl\"]");
    let leaf = s.ca.issue(&LeafSpec::spiffe(READER));
    let now = SystemTime::now();
    let cert = leaf.envoy_encoded();
    assert_eq!(denial(&s.engine, Some(&cert), None, now), None);
    write(
        s.dir.path(),
        "ca.crl",
        &s.ca.crl(&[&leaf], time::Duration::days(7)),
    );
    s.engine.reload().expect("reload with the new CRL");
    assert_eq!(
        denial(&s.engine, Some(&cert), None, now),
        Some(DenyReason::Certificate(CertRejection::Revoked))
    );
}

#[test]
fn a_cached_certificate_is_not_trusted_past_its_own_or_its_crls_validity() {
    let s = setup("crls = [\"ca.crl\"]");
    let mut spec = LeafSpec::spiffe(READER);
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let leaf = s.ca.issue(&spec);
    // The CRL must be renewed within the hour; past that, no verdict on this CA holds.
    write(
        s.dir.path(),
        "ca.crl",
        &s.ca.crl(&[], time::Duration::hours(1)),
    );
    s.engine.reload().expect("reload");
    let now = SystemTime::now();
    let cert = leaf.envoy_encoded();
    assert_eq!(denial(&s.engine, Some(&cert), None, now), None);
    let crl_expired = now + Duration::from_secs(3600 + 60);
    assert!(
        matches!(
            denial(&s.engine, Some(&cert), None, crl_expired),
            Some(DenyReason::Certificate(_))
        ),
        "a certificate verified against a CRL is not accepted after the CRL's nextUpdate"
    );
    // A fresh CRL again, and the leaf's own expiry ends the cached verdict.
    write(
        s.dir.path(),
        "ca.crl",
        &s.ca.crl(&[], time::Duration::days(7)),
    );
    s.engine.reload().expect("reload");
    assert_eq!(denial(&s.engine, Some(&cert), None, now), None);
    let leaf_expired = now + Duration::from_secs(3 * 3600);
    assert_eq!(
        denial(&s.engine, Some(&cert), None, leaf_expired),
        Some(DenyReason::Certificate(CertRejection::Expired))
    );
}

#[test]
fn caches_hold_nothing_when_turned_off_and_are_bounded_when_on() {
    let with_cache = |s: &Setup, cache: &str| {
        let config = std::fs::read_to_string(s.dir.path().join("portcullis.toml"))
            .expect("config")
            .replace("[policy]", &format!("[cache]\n{cache}\n\n[policy]"));
        let settings = Settings::from_toml(&config, s.dir.path()).expect("valid config");
        Engine::load(&settings).expect("engine loads")
    };
    let s = setup("");
    let now = SystemTime::now();
    let off = with_cache(&s, "tokens = 0\ncertificates = 0");
    let token = s.signer.sign(&claims(now, json!({})));
    assert_eq!(denial(&off, None, Some(&token), now), None);
    assert_eq!(off.cached_tokens(), 0);

    let small = with_cache(&s, "tokens = 8");
    for i in 0..100 {
        let token = s.signer.sign(&claims(now, json!({"jti": format!("t{i}")})));
        assert_eq!(denial(&small, None, Some(&token), now), None);
    }
    assert!(
        (1..=8).contains(&small.cached_tokens()),
        "{} tokens cached with room for 8",
        small.cached_tokens()
    );
}

/// The Cedar form of a verified certificate and token is built once and kept with them in
/// the caches; what policies see must still be exactly what a fresh verification shows,
/// with the request's own parts (path, headers, certificate) never taken from an earlier
/// request.
#[test]
fn a_cached_identity_shows_policies_what_a_fresh_one_would() {
    let s = setup("");
    let now = SystemTime::now();
    let config = std::fs::read_to_string(s.dir.path().join("portcullis.toml"))
        .expect("config")
        .replace(
            "[policy]",
            "[cache]\ntokens = 0\ncertificates = 0\n\n[policy]",
        );
    let fresh = Engine::load(&Settings::from_toml(&config, s.dir.path()).expect("config"))
        .expect("engine loads");
    let alice = s.ca.issue(&LeafSpec::spiffe(READER)).envoy_encoded();
    let other =
        s.ca.issue(&LeafSpec::spiffe("spiffe://example.org/ns/cache/sa/other"))
            .envoy_encoded();
    let token = s.signer.sign(&claims(
        now,
        json!({"groups": ["readers", "staff"], "tier": 3, "email": "a@example.org"}),
    ));
    let seen = |engine: &Engine, path: &str, cert: &str| {
        let d = engine.check(&common::request("GET", path, Some(cert), Some(&token)), now);
        assert_eq!(d.denial, None, "{:?}", d.reasons);
        let r = d.policy.expect("evaluated").request;
        (
            r.principal.to_string(),
            r.principal_parents().to_vec(),
            r.context(),
        )
    };
    // Twice on the caching engine: the second time everything comes from the caches.
    let first = seen(&s.engine, "/api/a", &alice);
    let cached = seen(&s.engine, "/api/a", &alice);
    assert_eq!(s.engine.cached_tokens(), 1, "the token is cached");
    assert_eq!(cached, first);
    assert_eq!(cached, seen(&fresh, "/api/a", &alice));
    assert_eq!(cached.1.len(), 2, "the token's groups: {:?}", cached.1);
    assert_eq!(cached.2["token"]["claims"]["tier"], json!(3));

    // The same cached token on another path, with another certificate: the request's
    // parts are its own.
    let moved = seen(&s.engine, "/api/b", &other);
    assert_eq!(moved, seen(&fresh, "/api/b", &other));
    assert_eq!(moved.2["request"]["path"], json!("/api/b"));
    assert_eq!(
        moved.2["peer"]["spiffe_id"],
        json!("spiffe://example.org/ns/cache/sa/other")
    );
    assert_eq!(moved.2["token"], first.2["token"]);
}

/// No cache serves a decision made at another time: the token's cached form holds no
/// time, and `context.time` is built for each request from the `now` it is decided at.
/// (Without it, a business-hours policy would keep allowing a cached token after hours.)
#[test]
fn a_cached_token_is_judged_at_each_requests_own_time() {
    let s = setup("");
    write(
        &s.dir.path().join("policies"),
        "p.cedar",
        r#"permit (principal is User, action == Action::"GET", resource)
           when { context.time.hour >= 9 && context.time.hour < 18 };"#,
    );
    let settings = Settings::load(&s.dir.path().join("portcullis.toml")).expect("valid config");
    let engine = Engine::load(&settings).expect("engine loads");
    // 2026-12-03 at 10:00 and at 22:00 UTC; the token is valid at both.
    let ten = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_292_000);
    let ten_pm = ten + Duration::from_secs(12 * 3600);
    let mut c = claims(ten, json!({}));
    c["exp"] = json!(unix(ten_pm) + 60);
    let token = s.signer.sign(&c);
    let request = common::request("GET", "/r", None, Some(&token));
    let d = engine.check(&request, ten);
    assert!(d.allowed(), "{:?}", d.reasons);
    assert_eq!(engine.cached_tokens(), 1, "the token is cached");
    let d = engine.check(&request, ten_pm);
    assert!(!d.allowed(), "after hours, from the cache too");
    assert_eq!(d.reasons, ["no permit policy matched"]);
    assert!(engine.check(&request, ten).allowed(), "and back in hours");
}
