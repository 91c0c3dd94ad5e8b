//! Keys that rotate: a local HTTPS identity provider (generated CA, loopback only) serves
//! JWKS and discovery documents while a real Portcullis server fetches them in the
//! background. Rotation, removal, unknown-`kid` floods, outages, slow and hostile
//! providers, readiness and revocation, each against a running server.

use crate::common;

use common::keyserver::{KeyServer, Mode};
use common::{RunningServer, check, eventually, outcome, start_server};
use jsonwebtoken::Algorithm;
use portcullis::config::Settings;
use portcullis::demo::TokenSigner;
use portcullis::engine::DenyReason;
use portcullis::identity::TokenRejection;
use portcullis::proto::envoy::service::auth::v3::CheckResponse;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const AUD: &str = "orders";
const POLICY: &str = "permit (principal is User, action, resource);";

/// A Portcullis server whose one issuer fetches keys from `ks`.
struct Rig {
    ks: KeyServer,
    issuer: String,
    server: RunningServer,
}

impl std::ops::Deref for Rig {
    type Target = RunningServer;
    fn deref(&self) -> &RunningServer {
        &self.server
    }
}

/// `source` is the key-source part of the issuer table; `{jwks}` is filled in.
async fn rig(ks: KeyServer, issuer: &str, source: &str, extra_token: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp-ca.pem"), ks.ca_pem()).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/p.cedar"), POLICY).unwrap();
    let source = source.replace("{jwks}", &ks.jwks_url());
    let text = format!(
        "[token]\n{extra_token}\n\n[[issuer]]\nissuer = \"{issuer}\"\naudiences = [\"{AUD}\"]\nca_bundle = \"idp-ca.pem\"\n{source}\n\n[policy]\ndir = \"policies\"\n\n[log]\naudit = \"audit.log\"\n"
    );
    let server = start_server(dir, &text).await;
    Rig {
        ks,
        issuer: issuer.to_string(),
        server,
    }
}

impl Rig {
    fn token(&self, signer: &TokenSigner, extra: serde_json::Value) -> String {
        let now = portcullis::demo::unix_now();
        let mut c =
            json!({ "iss": self.issuer, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300 });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        signer.sign(&c)
    }

    async fn check_token(&self, token: &str) -> CheckResponse {
        self.server
            .check(common::request("GET", "/x", None, Some(token)))
            .await
    }

    async fn allowed(&self, token: &str) -> bool {
        let resp = self.check_token(token).await;
        let (code, http, _) = outcome(&resp);
        assert!(
            code == 0 || (code == 16 && http == 401),
            "unexpected outcome {:?}",
            outcome(&resp)
        );
        code == 0
    }

    fn reason(&self, token: &str) -> Option<DenyReason> {
        self.engine
            .check(
                &common::request("GET", "/x", None, Some(token)),
                SystemTime::now(),
            )
            .denial
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.engine.readiness().is_err() {
            assert!(
                Instant::now() < deadline,
                "not ready: {:?}",
                self.engine.readiness()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn es(kid: &str) -> TokenSigner {
    TokenSigner::generate(Algorithm::ES256, kid)
}

#[tokio::test]
async fn discovery_finds_the_keys_and_readiness_follows() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = format!("{}/tenant-a", ks.base_url());
    ks.set_discovery_issuer(&issuer);
    let r = rig(ks, &issuer, "discovery = true", "").await;
    r.wait_ready().await;
    assert!(r.allowed(&r.token(&a, json!({}))).await);
    assert!(r.ks.discovery_fetches() >= 1);
    assert_eq!(r.get("/readyz").await.0, 200);
    assert_eq!(r.get("/healthz").await.0, 200);
    let (_, metrics) = r.get("/metrics").await;
    assert!(
        metrics.contains("portcullis_key_fetches_total{issuer=\"")
            && metrics.contains("result=\"success\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_key_set_keys{"), "{metrics}");
}

#[tokio::test]
async fn a_discovery_document_for_another_issuer_is_refused() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = format!("{}/tenant-a", ks.base_url());
    ks.set_discovery_issuer(&format!("{}/tenant-b", ks.base_url()));
    let r = rig(ks, &issuer, "discovery = true", "").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            r.ks.discovery_fetches() >= 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = r.token(&a, json!({}));
    assert_eq!(
        r.reason(&token),
        Some(DenyReason::Token(TokenRejection::KeysUnavailable(
            issuer.clone()
        )))
    );
    assert!(!r.allowed(&token).await);
    assert_eq!(
        r.ks.jwks_fetches(),
        0,
        "the JWKS of a mismatched issuer must not even be fetched"
    );
    let (status, body) = r.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains(&issuer), "{body}");
}

#[tokio::test]
async fn a_rotated_key_is_accepted_after_one_refetch_without_restart() {
    let ks = KeyServer::start();
    let (a, b) = (es("a"), es("b"));
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let r = rig(
        ks,
        &issuer,
        // A patient wait needs a request timeout to match.
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1h\"\nrefresh_max = \"1h\"\nunknown_kid_wait = \"2s\"\n\n[limits]\nrequest_timeout = \"3s\"",
        "",
    ).await;
    r.wait_ready().await;
    let before = r.ks.jwks_fetches();
    // The provider rotates: b is published; a token signed by b arrives before any refresh.
    r.ks.set_jwks(&portcullis::demo::jwks(&[&a, &b]));
    assert!(r.allowed(&r.token(&b, json!({}))).await);
    assert_eq!(r.ks.jwks_fetches(), before + 1);
    assert!(r.allowed(&r.token(&a, json!({}))).await);
}

#[tokio::test]
async fn a_removed_key_is_rejected_after_the_next_refresh() {
    let ks = KeyServer::start();
    let (a, b) = (es("a"), es("b"));
    ks.set_jwks(&portcullis::demo::jwks(&[&a, &b]));
    ks.set_max_age(Some(1));
    let issuer = ks.base_url();
    let r = rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1s\"\nrefresh_max = \"1h\"",
        "",
    )
    .await;
    r.wait_ready().await;
    let token_b = r.token(&b, json!({}));
    assert!(r.allowed(&token_b).await);
    r.ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let fetched = r.ks.jwks_fetches();
    // max-age=1 within [1s, 1h]: the next refresh comes about a second later.
    assert!(
        eventually(Duration::from_secs(5), || async {
            r.ks.jwks_fetches() > fetched
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            !r.allowed(&token_b).await
        })
        .await
    );
    assert!(matches!(
        r.reason(&token_b),
        Some(DenyReason::Token(TokenRejection::UnknownKey { .. }))
    ));
    assert!(r.allowed(&r.token(&a, json!({}))).await);
}

#[tokio::test]
async fn an_unknown_kid_flood_triggers_at_most_one_fetch_per_interval() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let r = Arc::new(rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1h\"\nrefresh_max = \"1h\"\nunknown_kid_interval = \"30s\"",
        "",
    ).await);
    r.wait_ready().await;
    let before = r.ks.jwks_fetches();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let r = r.clone();
        let signer = es(&format!("attacker-{i}"));
        tasks.push(tokio::spawn(async move {
            let token = r.token(&signer, json!({}));
            let resp = r.check_token(&token).await;
            outcome(&resp)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().1, 401);
    }
    let fetches = r.ks.jwks_fetches() - before;
    println!(
        "unknown-kid flood: 200 requests with 200 unknown kids caused {fetches} key-set fetch(es)"
    );
    assert!(fetches <= 1, "{fetches} fetches");
    // Known keys are unaffected.
    assert!(r.allowed(&r.token(&a, json!({}))).await);
}

#[tokio::test]
async fn provider_down_keeps_the_last_good_keys_until_max_staleness_then_recovers() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let r = rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1s\"\nrefresh_max = \"1s\"\nmax_staleness = \"3s\"",
        "",
    )
    .await;
    r.wait_ready().await;
    let token = r.token(&a, json!({}));
    assert!(r.allowed(&token).await);
    r.ks.set_mode(Mode::Down);
    let down_at = Instant::now();
    let fetched = r.ks.jwks_fetches();
    assert!(
        eventually(Duration::from_secs(5), || async {
            r.ks.jwks_fetches() > fetched
        })
        .await
    );
    // Refreshes fail, but the last good keys serve while they are younger than 3 s.
    if down_at.elapsed() < Duration::from_secs(2) {
        assert!(r.allowed(&token).await, "last good keys must keep serving");
    }
    // Then the issuer's tokens are refused: fail closed.
    assert!(
        eventually(Duration::from_secs(8), || async {
            !r.allowed(&token).await
        })
        .await
    );
    assert_eq!(
        r.reason(&token),
        Some(DenyReason::Token(TokenRejection::KeysStale(issuer.clone())))
    );
    let (_, metrics) = r.get("/metrics").await;
    assert!(metrics.contains("result=\"failure\"}"), "{metrics}");
    // The provider returns: recovery without restart.
    r.ks.set_mode(Mode::Normal);
    assert!(eventually(Duration::from_secs(8), || async { r.allowed(&token).await }).await);
}

#[tokio::test]
async fn a_slow_provider_does_not_slow_requests_with_known_keys() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let r = Arc::new(rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1h\"\nrefresh_max = \"1h\"\nfetch_timeout = \"10s\"\nunknown_kid_wait = \"150ms\"",
        "",
    ).await);
    r.wait_ready().await;
    r.ks.set_mode(Mode::Slow(Duration::from_secs(4)));
    // An unknown kid starts a fetch that hangs; its request waits at most unknown_kid_wait.
    let started = Instant::now();
    let unknown = r.token(&es("new"), json!({}));
    assert!(!r.allowed(&unknown).await);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "unknown-kid request took {waited:?}"
    );
    // Meanwhile requests with known keys stay fast.
    let known = r.token(&a, json!({}));
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert!(r.allowed(&known).await);
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "slow provider: unknown-kid request {waited:?}, slowest known-kid request {slowest:?}"
    );
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
}

#[tokio::test]
async fn oversized_and_malformed_key_sets_keep_the_last_good_set() {
    let ks = KeyServer::start();
    let (a, b) = (es("a"), es("b"));
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let r = rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1s\"\nrefresh_max = \"1s\"\nmax_key_set_size = 4096",
        "",
    ).await;
    r.wait_ready().await;
    let token_a = r.token(&a, json!({}));
    // An oversized document that would carry key b.
    let mut huge =
        serde_json::from_str::<serde_json::Value>(&portcullis::demo::jwks(&[&a, &b])).unwrap();
    huge["padding"] = json!("x".repeat(8000));
    for bad in [
        huge.to_string(),
        "{\"keys\": [".to_string(),
        "<html>oops</html>".to_string(),
        "{\"keys\": []}".to_string(),
    ] {
        r.ks.set_jwks(&bad);
        let fetched = r.ks.jwks_fetches();
        assert!(
            eventually(Duration::from_secs(5), || async {
                r.ks.jwks_fetches() > fetched + 1
            })
            .await
        );
        assert!(
            r.allowed(&token_a).await,
            "last good set must survive {:.30}",
            bad
        );
        assert!(!r.allowed(&r.token(&b, json!({}))).await);
    }
}

#[tokio::test]
async fn not_ready_until_keys_arrive() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    ks.set_mode(Mode::Status(503));
    let issuer = ks.base_url();
    let r = rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"\nrefresh_min = \"1s\"\nrefresh_max = \"1s\"",
        "",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            r.ks.jwks_fetches() >= 1
        })
        .await
    );
    assert_eq!(r.get("/readyz").await.0, 503);
    let health = |addr: SocketAddr| async move {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(health(r.grpc).await, ServingStatus::NotServing as i32);
    let token = r.token(&a, json!({}));
    assert!(!r.allowed(&token).await);
    r.ks.set_mode(Mode::Normal);
    assert!(
        eventually(Duration::from_secs(8), || async {
            r.get("/readyz").await.0 == 200
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            health(r.grpc).await == ServingStatus::Serving as i32
        })
        .await
    );
    assert!(r.allowed(&token).await);
}

#[tokio::test]
async fn editing_the_revocation_file_revokes_without_restart() {
    let ks = KeyServer::start();
    let a = es("a");
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    let issuer = ks.base_url();
    let tmp = tempfile::tempdir().unwrap();
    let revoked = tmp.path().join("revoked.txt");
    std::fs::write(&revoked, "# nothing revoked yet\n").unwrap();
    let r = rig(
        ks,
        &issuer,
        "jwks_uri = \"{jwks}\"",
        &format!("revoked = \"{}\"", revoked.display()),
    )
    .await;
    r.wait_ready().await;
    let stolen = r.token(&a, json!({ "jti": "token-123" }));
    let other = r.token(&a, json!({ "jti": "token-456" }));
    assert!(r.allowed(&stolen).await);
    std::fs::write(&revoked, "# incident 42\njti:token-123\n").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !r.allowed(&stolen).await
        })
        .await,
        "revocation not picked up"
    );
    assert_eq!(
        r.reason(&stolen),
        Some(DenyReason::Token(TokenRejection::Revoked))
    );
    assert!(r.allowed(&other).await);
    // Revoking the subject revokes all of its tokens.
    std::fs::write(&revoked, "jti:token-123\nsub:alice\n").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !r.allowed(&other).await
        })
        .await
    );
    // A broken edit keeps the last good list (fail closed: alice stays revoked).
    std::fs::write(&revoked, "jti:\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!r.allowed(&other).await);
    let (_, metrics) = r.get("/metrics").await;
    assert!(
        metrics.contains("portcullis_revocation_reloads_total{result=\"failure\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn plain_http_to_a_remote_host_is_refused_at_configuration() {
    let text = "[[issuer]]\nissuer = \"https://idp\"\naudiences = [\"a\"]\njwks_uri = \"http://idp.example.org/jwks\"\n";
    let err = Settings::from_toml(text, std::path::Path::new(""))
        .unwrap_err()
        .messages()
        .join("\n");
    assert!(err.contains("only allowed to a loopback address"), "{err}");
    let _ = check; // the shared gRPC world is not used here
}

#[tokio::test]
async fn a_redirect_from_the_key_server_is_not_followed() {
    let ks = KeyServer::start();
    let a = es("a");
    // The keys are only where the redirect points.
    ks.set_moved_jwks(&portcullis::demo::jwks(&[&a]));
    ks.set_mode(Mode::Redirect);
    let issuer = ks.base_url();
    let r = rig(ks, &issuer, "jwks_uri = \"{jwks}\"", "").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            r.ks.jwks_fetches() >= 1
        })
        .await,
        "the key set was never fetched"
    );
    assert!(!r.allowed(&r.token(&a, json!({}))).await);
    assert_eq!(r.ks.moved_fetches(), 0, "the redirect was followed");
    assert!(r.engine.readiness().is_err(), "ready without keys");
}

/// RFC 8725 section 3.10: keys named or carried by the token itself (`jku`, `x5u`, an
/// embedded `jwk`) are attacker-chosen; only the issuer's configured key set counts.
#[tokio::test]
async fn keys_named_or_carried_by_the_token_are_never_used() {
    let ks = KeyServer::start();
    let (a, evil) = (es("a"), es("evil"));
    ks.set_jwks(&portcullis::demo::jwks(&[&a]));
    // On the issuer's own, trusted server: following `jku` would find the attacker's key.
    ks.set_moved_jwks(&portcullis::demo::jwks(&[&evil]));
    let issuer = ks.base_url();
    let r = rig(ks, &issuer, "jwks_uri = \"{jwks}\"", "").await;
    r.wait_ready().await;
    assert!(r.allowed(&r.token(&a, json!({}))).await);
    let now = portcullis::demo::unix_now();
    let claims =
        json!({ "iss": r.issuer, "aud": AUD, "sub": "mallory", "iat": now, "exp": now + 300 });
    for kid in ["evil", "a"] {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        header.jku = Some(r.ks.moved_url());
        header.x5u = Some(r.ks.moved_url());
        header.jwk = Some(serde_json::from_value(evil.jwk()).expect("a JWK"));
        let token = evil.sign_with(&header, &claims);
        assert!(
            !r.allowed(&token).await,
            "kid {kid}: the token's own key was used"
        );
    }
    assert_eq!(
        r.ks.moved_fetches(),
        0,
        "a URL from a token header was fetched"
    );
}

/// A fetched key set with a key unfit to verify (RSA under 2048 bits, `key_ops` without
/// `verify`) leaves that key out and keeps the rest: a token naming it is refused as signed
/// by an unknown key, a token of a good key of the same document still verifies.
#[tokio::test]
async fn a_fetched_key_unfit_to_verify_is_left_out() {
    let ks = KeyServer::start();
    let a = es("a");
    let weak = TokenSigner::generate(Algorithm::RS256, "weak");
    let no_verify = es("no-verify");
    let mut weak_jwk = weak.jwk();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(weak_jwk["n"].as_str().unwrap()).unwrap();
    // The first 1,024 bits of a real modulus: a 1024-bit RSA public key.
    weak_jwk["n"] = json!(b64.encode(&n[..128]));
    let mut no_verify_jwk = no_verify.jwk();
    no_verify_jwk["key_ops"] = json!(["sign"]);
    let doc = json!({ "keys": [weak_jwk, no_verify_jwk, a.jwk()] }).to_string();
    ks.set_jwks(&doc);
    let issuer = ks.base_url();
    let r = rig(ks, &issuer, "jwks_uri = \"{jwks}\"", "").await;
    r.wait_ready().await;
    assert!(r.allowed(&r.token(&a, json!({}))).await);
    for (signer, kid) in [(&weak, "weak"), (&no_verify, "no-verify")] {
        let token = r.token(signer, json!({}));
        assert!(
            !r.allowed(&token).await,
            "a token of key \"{kid}\" verified"
        );
        assert_eq!(
            r.reason(&token),
            Some(DenyReason::Token(TokenRejection::UnknownKey {
                issuer: issuer.clone(),
                kid: kid.to_string()
            }))
        );
    }
}
