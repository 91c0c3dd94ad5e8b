//! The engine as a library, in-process: settings that change the pipeline (dry-run,
//! required certificates, no trust bundle), what policies can see of a token, and how
//! replies treat hostile values.

use crate::common;

use jsonwebtoken::Algorithm;
use portcullis::config::Settings;
use portcullis::demo::{Authority, LeafSpec, TokenSigner};
use portcullis::engine::{DenyReason, Engine};
use portcullis::proto::envoy::service::auth::v3::{CheckRequest, check_response::HttpResponse};
use portcullis::reply::{DRY_RUN_HEADER, check_response};
use serde_json::json;
use std::time::SystemTime;

struct Setup {
    _dir: tempfile::TempDir,
    signer: TokenSigner,
    ca: Authority,
    engine: Engine,
}

fn setup(extra_config: &str, policies: &str, with_peer: bool) -> Setup {
    setup_with_entities(extra_config, policies, with_peer, None)
}

/// [`setup`], with a static entities file when `entities` is given.
fn setup_with_entities(
    extra_config: &str,
    policies: &str,
    with_peer: bool,
    entities: Option<serde_json::Value>,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::root("engine test CA");
    let signer = TokenSigner::generate(Algorithm::ES256, "k1");
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        portcullis::demo::jwks(&[&signer]),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/p.cedar"), policies).unwrap();
    let peer = if with_peer {
        "[peer]\ntrust_bundle = \"ca.pem\"\ntrust_domains = [\"example.org\"]\n"
    } else {
        ""
    };
    let entities_line = match entities {
        Some(e) => {
            std::fs::write(dir.path().join("entities.json"), e.to_string()).unwrap();
            "entities = \"entities.json\"\n"
        }
        None => "",
    };
    let text = format!(
        "{extra_config}\n{peer}\n[[issuer]]\nissuer = \"https://idp\"\naudiences = [\"api\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n\n[policy]\ndir = \"policies\"\n{entities_line}"
    );
    let settings = Settings::from_toml(&text, dir.path()).unwrap();
    let engine = Engine::load(&settings).unwrap();
    Setup {
        _dir: dir,
        signer,
        ca,
        engine,
    }
}

fn token(s: &Setup, extra: serde_json::Value) -> String {
    let now = portcullis::demo::unix_now();
    let mut c =
        json!({ "iss": "https://idp", "aud": "api", "sub": "alice", "iat": now, "exp": now + 300 });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    s.signer.sign(&c)
}

fn request(path: &str, cert: Option<String>, token: Option<String>) -> CheckRequest {
    common::request("GET", path, cert.as_deref(), token.as_deref())
}

#[test]
fn dry_run_allows_but_marks_the_would_be_denial() {
    let s = setup(
        "[server]\nmode = \"dry-run\"",
        "permit (principal, action, resource) when { false };",
        false,
    );
    let d = s
        .engine
        .check(&request("/x", None, None), SystemTime::now());
    assert_eq!(d.denial, Some(DenyReason::NoPermit { anonymous: true }));
    assert!(d.allowed());
    let resp = check_response(&d, s.engine.reply_settings());
    assert_eq!(resp.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("dry-run must allow")
    };
    let marked = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .any(|h| h.key == DRY_RUN_HEADER && h.value.contains("no_permit"));
    assert!(marked);
    assert_eq!(d.audit_json()["enforced"], json!(false));
    assert_eq!(d.audit_json()["decision"], json!("deny"));
}

#[test]
fn enforce_mode_denies_the_same_request() {
    let s = setup(
        "",
        "permit (principal, action, resource) when { false };",
        false,
    );
    let d = s
        .engine
        .check(&request("/x", None, None), SystemTime::now());
    assert!(!d.allowed());
    assert_eq!(
        check_response(&d, s.engine.reply_settings())
            .status
            .unwrap()
            .code,
        16
    );
}

#[test]
fn a_required_certificate_is_checked_before_policy() {
    let s = setup("", "permit (principal, action, resource);", true);
    // Without `require`, the permit-all policy lets an anonymous request through...
    assert!(
        s.engine
            .check(&request("/x", None, None), SystemTime::now())
            .allowed()
    );
    // ...with it, the missing certificate denies first.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), s.ca.cert_pem()).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/p.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    let text = "[peer]\ntrust_bundle = \"ca.pem\"\nrequire = true\n[policy]\ndir = \"policies\"\n";
    let engine = Engine::load(&Settings::from_toml(text, dir.path()).unwrap()).unwrap();
    let d = engine.check(&request("/x", None, None), SystemTime::now());
    assert_eq!(d.denial, Some(DenyReason::CertificateRequired));
    // A certificate that is not SPIFFE is named by its DNS SAN.
    let mut spec = LeafSpec::spiffe("spiffe://example.org/x");
    spec.uris.clear();
    spec.dns = vec!["svc.internal".into()];
    let cert = s.ca.issue(&spec).envoy_encoded();
    let d = engine.check(&request("/x", Some(cert), None), SystemTime::now());
    assert!(d.allowed(), "{:?}", d.reasons);
    assert_eq!(d.principal().as_deref(), Some("Workload::\"svc.internal\""));
}

#[test]
fn a_certificate_without_a_trust_bundle_is_not_trusted() {
    let s = setup(
        "",
        "permit (principal is Workload, action, resource);",
        false,
    );
    let cert =
        s.ca.issue(&LeafSpec::spiffe("spiffe://example.org/x"))
            .envoy_encoded();
    let d = s
        .engine
        .check(&request("/x", Some(cert), None), SystemTime::now());
    assert!(!d.allowed());
    assert_eq!(d.principal().as_deref(), Some("Anonymous::\"anonymous\""));
}

#[test]
fn policies_see_claims_scopes_and_groups() {
    let policy = r#"
        permit (principal in Group::"admins", action, resource)
        when {
            principal.hasTag("email") && principal.getTag("email") like "*@example.org" &&
            context.token.scopes.contains("write") &&
            context.token.claims.tenant.id == 7 &&
            principal.issuer == "https://idp"
        };
    "#;
    let s = setup("", policy, false);
    let good = json!({ "email": "a@example.org", "scope": "read write", "groups": ["admins"], "tenant": { "id": 7 } });
    let d = s.engine.check(
        &request("/x", None, Some(token(&s, good.clone()))),
        SystemTime::now(),
    );
    assert!(d.allowed(), "{:?}", d.reasons);
    for (k, v) in [
        ("email", json!("a@evil.org")),
        ("scope", json!("read")),
        ("groups", json!(["users"])),
    ] {
        let mut c = good.clone();
        c[k] = v;
        let d = s
            .engine
            .check(&request("/x", None, Some(token(&s, c))), SystemTime::now());
        assert!(!d.allowed(), "changing {k} must deny");
        assert_eq!(d.denial, Some(DenyReason::NoPermit { anonymous: false }));
    }
}

/// A token's user that is also a static entity keeps what the operator gave it (its
/// attributes and parents) and gains the token's issuer, groups and tags; a token cannot
/// overwrite the static attributes it does not carry.
#[test]
fn a_tokens_user_that_is_a_static_entity_keeps_its_attributes_and_parents() {
    let policy = r#"
        permit (principal in Group::"order-admins", action, resource)
        when {
            principal.department == "sales" &&
            principal.issuer == "https://idp" &&
            principal in Group::"token-group" &&
            principal.hasTag("email") && principal.getTag("email") == "a@example.org"
        };
    "#;
    let entities = json!([
        {
            "uid": { "type": "User", "id": "alice" },
            "attrs": { "department": "sales", "issuer": "static, overridden by the token" },
            "parents": [{ "type": "Group", "id": "order-admins" }]
        },
        { "uid": { "type": "Group", "id": "order-admins" }, "attrs": {}, "parents": [] }
    ]);
    let s = setup_with_entities("", policy, false, Some(entities));
    let claims = json!({ "email": "a@example.org", "groups": ["token-group"] });
    let d = s.engine.check(
        &request("/x", None, Some(token(&s, claims.clone()))),
        SystemTime::now(),
    );
    assert!(d.allowed(), "{:?}", d.reasons);
    // Each part the permit needs, taken away in turn, denies.
    let mut other_user = claims.clone();
    other_user["sub"] = json!("bob");
    let mut no_group = claims.clone();
    no_group["groups"] = json!([]);
    let mut other_email = claims.clone();
    other_email["email"] = json!("b@example.org");
    for (what, c) in [
        ("a user with no static entity", other_user),
        ("without the token's group", no_group),
        ("another email tag", other_email),
    ] {
        let d = s
            .engine
            .check(&request("/x", None, Some(token(&s, c))), SystemTime::now());
        assert_eq!(
            d.denial,
            Some(DenyReason::NoPermit { anonymous: false }),
            "{what}"
        );
    }
}

#[test]
fn policies_never_see_the_credentials_themselves() {
    let policy = r#"permit (principal, action, resource) when { context.request.headers has "authorization" };"#;
    let s = setup("", policy, false);
    let d = s.engine.check(
        &request("/x", None, Some(token(&s, json!({})))),
        SystemTime::now(),
    );
    assert!(!d.allowed());
    let text = serde_json::to_string(&d.policy.unwrap().request.context()).unwrap();
    assert!(!text.contains("Bearer"));
}

#[test]
fn a_hostile_subject_cannot_inject_headers() {
    let s = setup("", "permit (principal, action, resource);", false);
    let d = s.engine.check(
        &request(
            "/x",
            None,
            Some(token(&s, json!({ "sub": "eve\r\nx-admin: 1" }))),
        ),
        SystemTime::now(),
    );
    assert!(d.allowed());
    let resp = check_response(&d, s.engine.reply_settings());
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!()
    };
    for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
        assert!(
            !h.value.contains('\r') && !h.value.contains('\n'),
            "{:?}",
            h.value
        );
    }
}

#[test]
fn claim_headers_carry_scalar_claims_and_never_a_client_value() {
    let config = "[response]\nclaim_headers = { \"x-user-email\" = \"email\", \"x-tenant\" = \"tenant\", \"x-groups\" = \"groups\" }\nstrip_authorization = true";
    let s = setup(config, "permit (principal, action, resource);", false);
    let t = token(
        &s,
        json!({ "email": "a@example.org", "tenant": 7, "groups": ["x"] }),
    );
    let mut req = request("/x", None, Some(t));
    // The client tries to set a claim header itself.
    common::set_header(&mut req, "x-groups", "admins");
    let d = s.engine.check(&req, SystemTime::now());
    let resp = check_response(&d, s.engine.reply_settings());
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("allowed")
    };
    let set: Vec<(String, String)> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert!(
        set.contains(&("x-user-email".into(), "a@example.org".into())),
        "{set:?}"
    );
    assert!(set.contains(&("x-tenant".into(), "7".into())), "{set:?}");
    // A non-scalar claim is not sent, and the client's header of that name is removed.
    assert!(!set.iter().any(|(k, _)| k == "x-groups"), "{set:?}");
    assert!(ok.headers_to_remove.contains(&"x-groups".to_string()));
    assert!(ok.headers_to_remove.contains(&"authorization".to_string()));
}

#[test]
fn a_token_in_a_configured_cookie_is_verified_like_any_other() {
    let s = setup(
        "[token]\ncookie = \"session\"",
        "permit (principal is User, action, resource);",
        false,
    );
    let cookie_request = |value: &str| {
        let mut req = request("/x", None, None);
        common::set_header(&mut req, "cookie", format!("theme=dark; session={value}"));
        req
    };
    let good = token(&s, json!({}));
    assert!(
        s.engine
            .check(&cookie_request(&good), SystemTime::now())
            .allowed()
    );
    let expired = token(&s, json!({ "iat": 1, "exp": 2 }));
    let d = s.engine.check(&cookie_request(&expired), SystemTime::now());
    assert_eq!(
        d.denial,
        Some(DenyReason::Token(
            portcullis::identity::TokenRejection::Expired
        ))
    );
}

#[test]
fn a_token_in_a_configured_header_is_hidden_from_policies_and_stripped_upstream() {
    // A policy that would allow only if it could read the token header.
    let s = setup(
        "[token]\nheader = \"x-auth-token\"\n[response]\nstrip_authorization = true",
        r#"permit (principal is User, action, resource)
           when { !(context.request.headers has "x-auth-token") };"#,
        false,
    );
    let mut req = request("/x", None, None);
    common::set_header(&mut req, "x-auth-token", token(&s, json!({})));
    let d = s.engine.check(&req, SystemTime::now());
    assert!(d.allowed(), "{:?}", d.reasons);
    let context = d
        .policy
        .as_ref()
        .expect("evaluated")
        .request
        .context()
        .to_string();
    assert!(!context.contains("x-auth-token"), "{context}");
    let resp = check_response(&d, s.engine.reply_settings());
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("allowed")
    };
    assert!(ok.headers_to_remove.contains(&"x-auth-token".to_string()));
    assert!(ok.headers_to_remove.contains(&"authorization".to_string()));
}

#[test]
fn a_second_issuer_cannot_claim_the_first_issuers_groups() {
    let partner = "[[issuer]]\nissuer = \"https://partner\"\naudiences = [\"api\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\nid_prefix = \"partner/\"\n";
    let s = setup(
        partner,
        r#"permit (principal in Group::"admins", action, resource);"#,
        false,
    );
    let ours = token(&s, json!({ "groups": ["admins"] }));
    let d = s
        .engine
        .check(&request("/x", None, Some(ours)), SystemTime::now());
    assert!(d.allowed(), "{:?}", d.reasons);
    let theirs = token(
        &s,
        json!({ "iss": "https://partner", "groups": ["admins"] }),
    );
    let d = s
        .engine
        .check(&request("/x", None, Some(theirs)), SystemTime::now());
    assert!(!d.allowed());
    assert_eq!(d.principal().as_deref(), Some("User::\"partner/alice\""));
    assert_eq!(
        d.policy
            .as_ref()
            .map(|p| p.request.principal_parents().to_vec()),
        Some(vec![portcullis::policy::mapping::Uid {
            kind: "Group".into(),
            id: "partner/admins".into()
        }])
    );
}

#[test]
fn a_route_can_name_its_own_action_and_resource() {
    let policy = r#"
        @id("finance-reports")
        permit (principal, action == Action::"read-reports", resource == Report::"q3")
        when { context has route && context.route.team == "finance" };
    "#;
    let s = setup("", policy, false);
    let with_route = |ext: &[(&str, &str)]| {
        let mut req = request("/reports/q3.pdf", None, None);
        let attrs = req.attributes.as_mut().unwrap();
        for (k, v) in ext {
            attrs
                .context_extensions
                .insert(k.to_string(), v.to_string());
        }
        s.engine.check(&req, SystemTime::now())
    };
    let route = [
        ("action", "read-reports"),
        ("resource", "Report::\"q3\""),
        ("team", "finance"),
    ];
    let d = with_route(&route);
    assert!(d.allowed(), "{:?}", d.reasons);
    assert_eq!(d.policies(), ["finance-reports"]);
    let cedar = &d.policy.as_ref().unwrap().request;
    assert_eq!(
        (cedar.action.to_string(), cedar.resource.to_string()),
        ("Action::\"read-reports\"".into(), "Report::\"q3\"".into())
    );
    // Without the route's mapping the same request is GET on a Path: no permit.
    assert_eq!(
        with_route(&[]).denial,
        Some(DenyReason::NoPermit { anonymous: true })
    );
    assert!(
        !with_route(&[
            ("action", "read-reports"),
            ("resource", "Report::\"q3\""),
            ("team", "sales")
        ])
        .allowed()
    );
    // A resource that is not a Cedar entity reference denies, with the reason.
    let d = with_route(&[("action", "read-reports"), ("resource", "not an entity")]);
    assert_eq!(d.denial, Some(DenyReason::PolicyError));
    assert!(
        d.reasons
            .iter()
            .any(|r| r.contains("not a Cedar entity type")),
        "{:?}",
        d.reasons
    );
}
