//! What issue 14's features cost per decision: `cargo bench --bench changing_policies`.
//!
//! One warm request (token cached, audit line to a file in a temporary directory) answered
//! through `Engine::answer` many times, with: nothing new; `[audit] record_requests`; a
//! shadow policy set (the live set plus one policy reading a header the live set does not
//! read); both. Prints the mean time per answer and the audit line's bytes. A plain timing
//! loop (the medians of several runs), not criterion: the differences asked are those of
//! whole answers. Numbers: docs/PERFORMANCE.md.

use jsonwebtoken::Algorithm;
use portcullis::demo::{TokenSigner, jwks, unix_now};
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use portcullis::{Engine, Question, Settings};
use serde_json::json;
use std::path::Path;
use std::time::{Instant, SystemTime};

// The server's allocator (src/main.rs): the record and the shadow set allocate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "orders-api";
const ROUNDS: usize = 5;
const ANSWERS: usize = 20_000;

/// 20 policies: the permit the request matches, and others over other groups and paths.
fn policies() -> String {
    let mut p = String::from(
        "@id(\"readers\")\npermit (principal in Group::\"readers\", action == Action::\"GET\", resource)\n\
         when { context.token.claims.email like \"*@example.org\" };\n",
    );
    for i in 0..19 {
        p.push_str(&format!(
            "@id(\"p{i}\")\npermit (principal in Group::\"g{i}\", action, resource)\n\
             when {{ resource.path like \"/area{i}/*\" && context.request.method == \"GET\" }};\n"
        ));
    }
    p
}

fn request(token: &str) -> CheckRequest {
    let mut http = attribute_context::HttpRequest {
        method: "GET".into(),
        path: "/orders/42".into(),
        host: "api.example.org".into(),
        scheme: "https".into(),
        ..Default::default()
    };
    for (k, v) in [
        (":method", "GET"),
        (":path", "/orders/42"),
        (":authority", "api.example.org"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("x-request-id", "9af1d6a0-3c2b-4f8e-bf41-0c6de2a1b7c3"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-team", "ops"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        http.headers.insert(k.into(), v.into());
    }
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

fn engine(dir: &Path, name: &str, signer: &TokenSigner, record: bool, shadow: bool) -> Engine {
    let at = dir.join(name);
    std::fs::create_dir_all(at.join("policies")).expect("mkdir");
    std::fs::write(at.join("policies/p.cedar"), policies()).expect("write");
    std::fs::write(at.join("idp.jwks.json"), jwks(&[signer])).expect("write");
    let mut shadow_key = String::new();
    if shadow {
        std::fs::create_dir_all(at.join("next")).expect("mkdir");
        std::fs::write(
            at.join("next/p.cedar"),
            format!(
                "{}@id(\"ops\")\nforbid (principal, action == Action::\"DELETE\", resource)\n\
                 when {{ context.request.headers has \"x-team\" && context.request.headers[\"x-team\"] == \"ops\" }};\n",
                policies()
            ),
        )
        .expect("write");
        shadow_key = "shadow_dir = \"next\"".into();
    }
    let config = format!(
        "[[issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\njwks_file = \"idp.jwks.json\"\n\
         algorithms = [\"ES256\"]\nmax_lifetime = \"1h\"\n\n[policy]\ndir = \"policies\"\n{shadow_key}\n\n\
         [log]\naudit = \"audit.log\"\n\n[audit]\nrecord_requests = {record}\n"
    );
    let settings = Settings::from_toml(&config, &at).expect("settings");
    Engine::load(&settings).expect("engine")
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let signer = TokenSigner::generate(Algorithm::ES256, "es");
    let now = unix_now();
    let token = signer.sign(&json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3000,
        "groups": ["readers"], "email": "alice@example.org", "scope": "orders:read",
        "jti": "b7c3d2", "sid": "s-1",
    }));
    let req = request(&token);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cases = [
        ("baseline", false, false),
        ("record_requests", true, false),
        ("shadow", false, true),
        ("record_requests+shadow", true, true),
    ];
    let engines: Vec<_> = cases
        .iter()
        .map(|(name, record, shadow)| (name, engine(dir.path(), name, &signer, *record, *shadow)))
        .collect();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
    // Rounds interleave the cases, so drift on a shared machine touches all alike.
    for _ in 0..ROUNDS {
        for (i, (_, engine)) in engines.iter().enumerate() {
            runtime.block_on(async {
                for _ in 0..1000 {
                    assert!(
                        engine
                            .answer(Question::Check(&req), SystemTime::now)
                            .await
                            .allowed()
                    );
                }
                let start = Instant::now();
                for _ in 0..ANSWERS {
                    let answer = engine.answer(Question::Check(&req), SystemTime::now).await;
                    std::hint::black_box(answer.allowed());
                }
                results[i].push(start.elapsed().as_secs_f64() * 1e6 / ANSWERS as f64);
            });
        }
    }
    for ((name, _), mut runs) in engines.iter().zip(results) {
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        let audit =
            std::fs::read_to_string(dir.path().join(name).join("audit.log")).unwrap_or_default();
        let line = audit
            .lines()
            .find(|l| l.contains("\"decision\""))
            .map_or(0, str::len);
        println!(
            "{name:<24} {median:>7.2} us/answer (median of {ROUNDS}), audit line {line} bytes"
        );
    }
}
