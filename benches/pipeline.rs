//! Criterion benchmarks of the in-process decision pipeline (issue 6).
//!
//! Every stage is timed on its own and then the whole decision:
//!
//! - `facts/from_check`: an Envoy CheckRequest (a dozen headers, a bearer token, a
//!   URL-encoded PEM client certificate) to [`RequestFacts`];
//! - `cert/cold`, `cert/warm`: a leaf issued by an intermediate under a root, verified with
//!   rustls-webpki (cold, cache off) or answered from the cache of verified certificates;
//! - `jwt/<ALG>/raw`: `jsonwebtoken::decode` alone with the issuer's key, claim checks off,
//!   the raw cost of the signature verification; `jwt/<ALG>/cold` (cache off) and
//!   `jwt/<ALG>/warm` (the token seen before) through [`TokenVerifier::verify`];
//! - `cedar/policies/<N>`: whole decisions with 10, 100 and 1,000 generated policies, the
//!   identity warm (cached), so the policy count is what varies;
//! - `stage/*`: the parts of a warm decision (the certificate decoding a cache hit skips,
//!   identity, request mapping, Cedar evaluation);
//! - `decision/warm` and `decision/cold/<ALG>`: [`Engine::check`] from the CheckRequest,
//!   with a certificate and a token bound to it, caches on (and warm) or off;
//! - `scale/entities/<N>`: `decision/warm` with an `entities.json` of 10 to 1,000,000 static
//!   entities (a tree of groups with the token's group "readers" inside it, users and
//!   workloads), so the store size is what varies; the engine's load time for each N is
//!   printed to stderr;
//! - `scale/policies/<N>`: the same decision with 10 to 10,000 policies written by
//!   [`scoped_policies`], about 10 of which can match the request whatever N is, the rest
//!   scoped to other groups, users, actions, resources and workloads: what the policy index
//!   skips (`cedar/policies/<N>` is the other case, where almost every policy can match).
//!
//! The `scale` engines are built the first time their benchmark runs, so a filter that
//! leaves them out (`cargo bench --bench pipeline -- decision/`) skips writing and loading a
//! million entities.
//!
//! Every benchmarked call is checked once, outside the timed loop, to give the expected
//! outcome, so a failing path cannot be timed by mistake. Run with
//! `cargo bench --bench pipeline`; the medians are in
//! `target/criterion/<group>/<id>/new/estimates.json`.
//! On a machine busy with other work, `PIPELINE_BENCH_CLOCK=cpu cargo bench --bench pipeline`
//! times the benchmark thread's CPU time instead of wall time (Linux only): the pipeline is
//! synchronous and single-threaded, so on an idle machine the two agree.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use portcullis::config::{Limits, Settings};
use portcullis::demo::{Authority, ClientCert, LeafSpec, TokenSigner};
use portcullis::engine::Engine;
use portcullis::facts::RequestFacts;
use portcullis::identity::{
    Identity, PeerOutcome, PeerVerifier, TokenOutcome, TokenVerifier, Verifier,
};
use portcullis::proto::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use rustls_pki_types::UnixTime;
use serde_json::{Value, json};
use std::cell::OnceCell;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

// The server binary's allocator, so that these numbers are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISSUER: &str = "https://idp.bench.example.org";
const AUDIENCE: &str = "orders";
const SPIFFE_ID: &str = "spiffe://example.org/ns/prod/sa/frontend";
/// The request every decision benchmark decides: allowed by `readers-get-orders`.
const METHOD: &str = "GET";
const PATH: &str = "/api/orders/42?expand=items&limit=20";
/// The policy counts of the `cedar/policies/<N>` benchmarks.
const POLICY_COUNTS: [usize; 3] = [10, 100, 1000];
/// The static entity counts of the `scale/entities/<N>` benchmarks.
const ENTITY_COUNTS: [usize; 4] = [10, 1_000, 100_000, 1_000_000];
/// The policy counts of the `scale/policies/<N>` benchmarks.
const SCOPED_POLICY_COUNTS: [usize; 4] = [10, 100, 1_000, 10_000];
/// The group of the generated tree that the token's group "readers" sits in.
const READERS_PARENT: usize = 3;
/// `[limits] max_file_bytes` for the scale benchmarks: a million entities take about 100 MB.
const SCALE_MAX_FILE_BYTES: u64 = 1 << 30;

/// A token signing key with the JWK the issuer publishes for it.
struct Signer {
    name: &'static str,
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    /// RS256, ES256 and EdDSA come from the demo signer; PS256 reuses an RSA key under a
    /// JWK that names PS256; ES384 is generated here (the demo signer has no P-384 form).
    fn generate(name: &'static str, alg: Algorithm) -> Signer {
        let kid = format!("bench-{}", name.to_ascii_lowercase());
        let (key, mut jwk) = match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                let s = TokenSigner::generate(Algorithm::RS256, &kid);
                let key = EncodingKey::from_rsa_pem(s.private_key_pem().as_bytes())
                    .expect("RSA signing key");
                (key, s.jwk())
            }
            Algorithm::ES256 | Algorithm::EdDSA => {
                let s = TokenSigner::generate(alg, &kid);
                let pem = s.private_key_pem();
                let key = if alg == Algorithm::ES256 {
                    EncodingKey::from_ec_pem(pem.as_bytes())
                } else {
                    EncodingKey::from_ed_pem(pem.as_bytes())
                }
                .expect("signing key");
                (key, s.jwk())
            }
            Algorithm::ES384 => {
                use base64::Engine as _;
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                    .expect("generate a P-384 key");
                let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
                    .expect("P-384 signing key");
                // Uncompressed point: 0x04 || x || y, 48 bytes each.
                let point = pair.public_key_raw();
                assert_eq!(point.len(), 97, "uncompressed P-384 point");
                let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
                let jwk = json!({
                    "kty": "EC", "crv": "P-384",
                    "x": b64(&point[1..49]), "y": b64(&point[49..]),
                });
                (key, jwk)
            }
            other => panic!("no benchmark signer for {other:?}"),
        };
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(name);
        jwk["use"] = json!("sig");
        Signer {
            name,
            alg,
            kid,
            key,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign a token")
    }

    /// The key as the issuer's key set holds it (from the JWK), for the raw benchmark.
    fn decoding_key(&self) -> DecodingKey {
        let jwk: Jwk = serde_json::from_value(self.jwk.clone()).expect("a JWK");
        DecodingKey::from_jwk(&jwk).expect("a decoding key")
    }
}

/// A realistic access token's claims; bound to `cert` (RFC 8705) when given.
fn claims(now: i64, cert: Option<&ClientCert>) -> Value {
    let mut c = json!({
        "iss": ISSUER,
        "aud": [AUDIENCE, "catalog"],
        "sub": "alice",
        "azp": "frontend",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 3000,
        "jti": "6f1c2b7e-5d8a-4c1e-9b0f-2a7d3e4c5b61",
        "name": "Alice Example",
        "email": "alice@example.org",
        "email_verified": true,
        "groups": ["readers", "staff", "eu-west"],
        "scope": "orders:read orders:list profile email",
    });
    if let Some(cert) = cert {
        c["cnf"] = json!({ "x5t#S256": cert.thumbprint() });
    }
    c
}

/// A CheckRequest as Envoy builds it: pseudo-headers and a dozen ordinary headers, the
/// source address and the client certificate as URL-encoded PEM.
fn check_request(cert: &ClientCert, token: &str) -> CheckRequest {
    let mut http = attribute_context::HttpRequest {
        id: "9af1d6a0-3c2b-4f8e-bf41-0c6de2a1b7c3".into(),
        method: METHOD.into(),
        path: PATH.into(),
        host: "api.example.org".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        ..Default::default()
    };
    let headers = [
        (":method", METHOD),
        (":path", PATH),
        (":authority", "api.example.org"),
        (":scheme", "https"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("x-request-id", "9af1d6a0-3c2b-4f8e-bf41-0c6de2a1b7c3"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    for (k, v) in headers {
        http.headers.insert(k.into(), v.into());
    }
    http.headers
        .insert("authorization".into(), format!("Bearer {token}"));
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.7".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(41000)),
                        ..Default::default()
                    })),
                }),
                certificate: cert.envoy_encoded(),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// `n` policies of realistic shape: the one permit the benchmark request matches, one
/// fixed forbid, and `n - 2` generated permits and forbids over other groups, users,
/// workloads, paths, scopes and hosts (one in eight a forbid).
fn policies(n: usize) -> String {
    let mut out = String::from(FIXED_POLICIES);
    for i in 0..n.saturating_sub(2) {
        let policy = match i % 8 {
            0 => format!(
                r#"permit (principal in Group::"g{i}", action == Action::"GET", resource)
when {{ resource.path like "/api/s{i}/*" }};"#
            ),
            1 => format!(
                r#"permit (principal is User, action in [Action::"GET", Action::"HEAD"], resource)
when {{ resource.path like "/api/s{i}/*" && context has token && context.token.scopes.contains("s{i}:read") }};"#
            ),
            2 => format!(
                r#"permit (principal == User::"u{i}", action, resource)
when {{ resource.path like "/api/s{i}/*" }};"#
            ),
            3 => format!(
                r#"permit (principal is User, action == Action::"POST", resource)
when {{
  resource.path like "/api/s{i}/*" && context.binding &&
  context has peer && context.peer has spiffe_id &&
  context.peer.spiffe_id == "spiffe://example.org/ns/prod/sa/s{i}"
}};"#
            ),
            4 => format!(
                r#"permit (principal == Workload::"spiffe://example.org/ns/prod/sa/s{i}", action == Action::"GET", resource)
when {{ resource.path like "/internal/s{i}/*" }};"#
            ),
            5 => format!(
                r#"permit (principal in Group::"g{i}", action, resource)
when {{
  resource.path like "/api/s{i}/*" && context has token &&
  context.token.scopes.contains("s{i}:write") && principal.hasTag("email")
}};"#
            ),
            6 => format!(
                r#"permit (principal is User, action == Action::"GET", resource)
when {{ context.request.host == "s{i}.example.org" && resource.path like "/api/s{i}/*" }};"#
            ),
            _ => format!(
                r#"forbid (principal, action, resource)
when {{ resource.path like "/api/s{i}/admin/*" }};"#
            ),
        };
        out.push_str(&format!("\n@id(\"p{i}\")\n{policy}\n"));
    }
    out
}

/// The two policies every generated set starts with: the permit the benchmark request
/// matches and a forbid it does not.
const FIXED_POLICIES: &str = r#"@id("readers-get-orders")
permit (principal in Group::"readers", action == Action::"GET", resource)
when {
  resource.path like "/api/orders/*" &&
  context has token && context.token.scopes.contains("orders:read") &&
  context.binding
};

@id("no-deletes-without-mtls")
forbid (principal, action == Action::"DELETE", resource)
unless { context has peer };
"#;

/// Policies whose scope can match the benchmark request (besides `readers-get-orders`):
/// six with an unconstrained scope, which every request evaluates, and two filed under
/// `Action::"GET"`. Their conditions are false for the request, so the decision stays
/// `readers-get-orders` alone.
const MATCHING_POLICIES: &str = r#"
@id("forbid-unbound-tokens")
forbid (principal, action, resource)
when { context has token && !context.binding };

@id("forbid-plain-http")
forbid (principal, action, resource)
when { context.request.scheme != "https" };

@id("forbid-suspended")
forbid (principal, action, resource)
when { principal in Group::"suspended" };

@id("forbid-admin-paths")
forbid (principal, action, resource)
when { resource.path like "/api/*/admin/*" };

@id("forbid-internal-hosts")
forbid (principal, action, resource)
when { context.request.host like "*.internal.example.org" };

@id("permit-health")
permit (principal, action, resource)
when { resource.path == "/healthz" };

@id("users-get-catalog")
permit (principal is User, action == Action::"GET", resource)
when {
  resource.path like "/api/catalog/*" &&
  context has token && context.token.scopes.contains("catalog:read")
};

@id("public-reads")
permit (principal, action in [Action::"GET", Action::"HEAD"], resource)
when { resource.path like "/public/*" };
"#;

/// `n` policies (at least 10) of which the benchmark request can match the same nine
/// whatever `n` is: `readers-get-orders` and [`MATCHING_POLICIES`]. The others are
/// `no-deletes-without-mtls` and `n - 10` generated ones scoped to other groups, users,
/// actions, resources and workloads (one in four a forbid).
fn scoped_policies(n: usize) -> String {
    let mut out = format!("{FIXED_POLICIES}{MATCHING_POLICIES}");
    for i in 0..n.saturating_sub(10) {
        let policy = match i % 8 {
            0 => format!(
                r#"permit (principal in Group::"g{i}", action == Action::"GET", resource)
when {{ resource.path like "/api/s{i}/*" }};"#
            ),
            1 => format!(
                r#"permit (principal == User::"u{i}", action, resource)
when {{ resource.path like "/api/s{i}/*" }};"#
            ),
            2 => format!(
                r#"permit (principal is User, action == Action::"A{i}", resource)
when {{ context has token && context.token.scopes.contains("s{i}:call") }};"#
            ),
            3 => format!(
                r#"permit (principal, action in [Action::"A{i}", Action::"B{i}"], resource)
when {{ resource.path like "/api/s{i}/*" }};"#
            ),
            4 => format!(
                r#"permit (principal, action, resource == Path::"/api/s{i}")
when {{ context has token }};"#
            ),
            5 => format!(
                r#"permit (principal == Workload::"spiffe://example.org/ns/prod/sa/s{i}", action == Action::"GET", resource)
when {{ resource.path like "/internal/s{i}/*" }};"#
            ),
            6 => format!(
                r#"forbid (principal in Group::"g{i}", action, resource)
when {{ resource.path like "/api/s{i}/admin/*" }};"#
            ),
            _ => format!(r#"forbid (principal == User::"u{i}", action, resource);"#),
        };
        out.push_str(&format!("\n@id(\"f{i}\")\n{policy}\n"));
    }
    out
}

/// `n` static entities (at least 10) in Cedar's entities JSON format: a tree of groups
/// (the parent of `g-<i>` is `g-<i/16>`), the token's group "readers" inside it (below
/// `g-3`, itself below `g-0`), and one in sixteen each users and workloads, members of
/// groups of the tree. Written straight into a string: a million entities as JSON values
/// would take several times the memory of the text.
fn entities(n: usize) -> String {
    let users = (n / 16).max(1);
    let workloads = (n / 16).max(1);
    let groups = n
        .checked_sub(users + workloads + 1)
        .filter(|g| *g > READERS_PARENT)
        .expect("enough entities for a tree with readers inside");
    let mut out = String::with_capacity(n * 120);
    let mut count = 0;
    let mut entity = |id: std::fmt::Arguments<'_>, ty: &str, attrs: &str, parent: Option<usize>| {
        out.push_str(if count == 0 { "[\n" } else { ",\n" });
        count += 1;
        write!(
            out,
            r#"{{"uid":{{"type":"{ty}","id":"{id}"}},"attrs":{{{attrs}}},"parents":["#
        )
        .expect("writing to a String");
        if let Some(p) = parent {
            write!(out, r#"{{"type":"Group","id":"g-{p}"}}"#).expect("writing to a String");
        }
        out.push_str("]}");
    };
    for i in 0..groups {
        entity(
            format_args!("g-{i}"),
            "Group",
            "",
            (i > 0).then_some(i / 16),
        );
    }
    entity(format_args!("readers"), "Group", "", Some(READERS_PARENT));
    // Members spread over the whole tree (7919 and 104,729 are primes).
    for i in 0..users {
        let attrs = format!(r#""email":"u-{i}@example.org""#);
        entity(
            format_args!("u-{i}"),
            "User",
            &attrs,
            Some(i * 7919 % groups),
        );
    }
    for i in 0..workloads {
        entity(
            format_args!("spiffe://example.org/ns/prod/sa/w-{i}"),
            "Workload",
            "",
            Some(i * 104_729 % groups),
        );
    }
    assert_eq!(count, n, "entity count");
    out.push_str("\n]\n");
    out
}

fn config(policy_dir: &str, cache: Option<(usize, usize)>, algorithms: &[&str]) -> String {
    config_with(policy_dir, None, cache, algorithms)
}

/// [`config`], with a static entities file when `entities` names one (and a file cap to fit
/// a million entities).
fn config_with(
    policy_dir: &str,
    entities: Option<&str>,
    cache: Option<(usize, usize)>,
    algorithms: &[&str],
) -> String {
    let algorithms = algorithms
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cache = match cache {
        Some((tokens, certificates)) => {
            format!("[cache]\ntokens = {tokens}\ncertificates = {certificates}\n")
        }
        None => String::new(),
    };
    let entities = match entities {
        Some(file) => {
            format!("entities = \"{file}\"\n\n[limits]\nmax_file_bytes = {SCALE_MAX_FILE_BYTES}\n")
        }
        None => String::new(),
    };
    format!(
        r#"
[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = [{algorithms}]
leeway = "30s"
max_lifetime = "1h"

[policy]
dir = "{policy_dir}"
{entities}
[log]
audit = "audit.log"

{cache}"#
    )
}

fn write(dir: &Path, name: &str, content: &str) {
    if let Some(parent) = Path::new(name).parent() {
        std::fs::create_dir_all(dir.join(parent)).expect("create a directory");
    }
    std::fs::write(dir.join(name), content).expect("write a benchmark file");
}

/// Everything the benchmarks share: trust material, keys, tokens and a request.
struct World {
    dir: tempfile::TempDir,
    signers: Vec<Signer>,
    cert: ClientCert,
    algorithms: Vec<&'static str>,
    now: i64,
}

impl World {
    fn new() -> World {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = Authority::root("bench root CA");
        let inter = root.intermediate("bench intermediate CA");
        let cert = inter.issue(&LeafSpec::spiffe(SPIFFE_ID));
        let signers = vec![
            Signer::generate("RS256", Algorithm::RS256),
            Signer::generate("PS256", Algorithm::PS256),
            Signer::generate("ES256", Algorithm::ES256),
            Signer::generate("ES384", Algorithm::ES384),
            Signer::generate("EdDSA", Algorithm::EdDSA),
        ];
        let jwks = json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() });
        write(dir.path(), "ca.pem", &root.cert_pem());
        write(dir.path(), "intermediate.pem", &inter.cert_pem());
        write(dir.path(), "idp.jwks.json", &jwks.to_string());
        for n in POLICY_COUNTS {
            write(
                dir.path(),
                &format!("policies-{n}/bench.cedar"),
                &policies(n),
            );
        }
        let algorithms = signers.iter().map(|s| s.name).collect();
        World {
            dir,
            signers,
            cert,
            algorithms,
            now: portcullis::demo::unix_now(),
        }
    }

    fn settings(&self, policy_dir: &str, cache: Option<(usize, usize)>) -> Settings {
        let text = config(policy_dir, cache, &self.algorithms);
        Settings::from_toml(&text, self.dir.path()).unwrap_or_else(|e| panic!("{e:?}\n{text}"))
    }

    /// An engine with caches on, loaded from `policy_dir` and, when named, a static
    /// entities file, the file cap raised as the server raises it (`[limits]`); with the
    /// time the load took.
    fn scale_engine(&self, policy_dir: &str, entities: Option<&str>) -> (Engine, Duration) {
        let text = config_with(policy_dir, entities, None, &self.algorithms);
        let settings =
            Settings::from_toml(&text, self.dir.path()).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        // What the binary does before loading anything (main.rs); put back after.
        portcullis::files::set_max_bytes(settings.limits.max_file_bytes);
        let start = Instant::now();
        let engine = Engine::load(&settings);
        let took = start.elapsed();
        portcullis::files::set_max_bytes(portcullis::files::DEFAULT_MAX_BYTES);
        (engine.unwrap_or_else(|e| panic!("{e:?}")), took)
    }

    fn engine(&self, policy_dir: &str, cache: Option<(usize, usize)>) -> Engine {
        Engine::load(&self.settings(policy_dir, cache)).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn signer(&self, name: &str) -> &Signer {
        self.signers
            .iter()
            .find(|s| s.name == name)
            .expect("a signer")
    }

    /// A token bound to the client certificate, and the request that carries both.
    fn bound_request(&self, signer: &Signer) -> CheckRequest {
        check_request(
            &self.cert,
            &signer.sign(&claims(self.now, Some(&self.cert))),
        )
    }
}

/// The clock the benchmarks read: wall time, or the benchmark thread's CPU time when
/// `PIPELINE_BENCH_CLOCK=cpu`. Both count from an arbitrary origin.
struct Clock {
    wall: WallTime,
    origin: std::time::Instant,
    cpu: bool,
}

impl Clock {
    fn from_env() -> Clock {
        let cpu = match std::env::var("PIPELINE_BENCH_CLOCK").as_deref() {
            Err(_) | Ok("wall") => false,
            Ok("cpu") => {
                assert!(thread_cpu_time().is_some(), "no thread CPU clock here");
                eprintln!("timing the benchmark thread's CPU time (PIPELINE_BENCH_CLOCK=cpu)");
                true
            }
            Ok(other) => panic!("PIPELINE_BENCH_CLOCK must be \"wall\" or \"cpu\", not {other:?}"),
        };
        Clock {
            wall: WallTime,
            origin: std::time::Instant::now(),
            cpu,
        }
    }

    fn now(&self) -> Duration {
        if self.cpu {
            thread_cpu_time().unwrap_or_default()
        } else {
            self.origin.elapsed()
        }
    }
}

impl Measurement for Clock {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        self.now()
    }
    fn end(&self, start: Duration) -> Duration {
        self.now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

/// CPU time consumed by the calling thread.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
#[allow(unsafe_code)] // one libc call; the workspace denies unsafe code everywhere else
fn thread_cpu_time() -> Option<Duration> {
    /// `struct timespec` on 64-bit Linux: `time_t` and `long` are both 64 bits.
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec` for the duration of the call, and
    // clock_gettime(2) writes nothing else.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

type C = Criterion<Clock>;

fn assert_allowed(d: &portcullis::engine::Decision, what: &str) {
    assert!(
        d.allowed(),
        "{what}: expected an allow, got {:?}: {:?}",
        d.denial,
        d.reasons
    );
    assert_eq!(
        d.policies(),
        ["readers-get-orders".to_string()],
        "{what}: decided by the wrong policies"
    );
}

fn bench_facts(c: &mut C, w: &World) {
    let req = w.bound_request(w.signer("ES256"));
    let limits = Limits::default();
    let facts = RequestFacts::from_check(&req, &limits).expect("facts of the request");
    assert_eq!(facts.path, "/api/orders/42");
    assert!(facts.peer_certificate.is_some());
    assert!(facts.headers.contains_key("authorization"));
    let mut g = c.benchmark_group("facts");
    g.bench_function("from_check", |b| {
        b.iter(|| RequestFacts::from_check(black_box(&req), &limits))
    });
    g.finish();
}

fn bench_cert(c: &mut C, w: &World) {
    let peer = w.settings("policies-10", None).peer.expect("[peer]");
    let encoded = w.cert.envoy_encoded();
    let cold = PeerVerifier::load(&peer, 0).expect("peer verifier");
    let warm = PeerVerifier::load(&peer, 1000).expect("peer verifier");
    for (what, v) in [("cold", &cold), ("warm", &warm)] {
        let id = v
            .verify_url_encoded_pem(&encoded, UnixTime::now())
            .unwrap_or_else(|e| panic!("cert/{what}: {e}"));
        assert_eq!(
            id.spiffe_id().map(ToString::to_string).as_deref(),
            Some(SPIFFE_ID)
        );
    }
    let mut g = c.benchmark_group("cert");
    for (what, v) in [("cold", &cold), ("warm", &warm)] {
        g.bench_function(what, |b| {
            b.iter(|| v.verify_url_encoded_pem(black_box(&encoded), UnixTime::now()))
        });
    }
    g.finish();
}

fn bench_jwt(c: &mut C, w: &World) {
    let s = w.settings("policies-10", None);
    let cold = TokenVerifier::load(&s.issuers, &s.token, 0).expect("token verifier");
    let warm = TokenVerifier::load(&s.issuers, &s.token, 1000).expect("token verifier");
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut g = c.benchmark_group("jwt");
    for signer in &w.signers {
        let token = signer.sign(&claims(w.now, None));
        let key = signer.decoding_key();
        let mut validation = validation.clone();
        validation.algorithms = vec![signer.alg];
        let raw = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .unwrap_or_else(|e| panic!("jwt/{}/raw: {e}", signer.name));
        assert_eq!(raw.claims["sub"], "alice");
        for (what, v) in [("cold", &cold), ("warm", &warm)] {
            let claims = v
                .verify(&token, None, w.now)
                .unwrap_or_else(|e| panic!("jwt/{}/{what}: {e}", signer.name));
            assert_eq!(claims.subject(), "alice");
        }
        assert!(warm.cached() > 0, "the warm verifier caches");
        g.bench_function(format!("{}/raw", signer.name), |b| {
            b.iter(|| jsonwebtoken::decode::<Value>(black_box(&token), &key, &validation))
        });
        for (what, v) in [("cold", &cold), ("warm", &warm)] {
            g.bench_function(format!("{}/{what}", signer.name), |b| {
                b.iter(|| v.verify(black_box(&token), None, w.now))
            });
        }
    }
    g.finish();
}

fn bench_cedar(c: &mut C, w: &World) {
    let req = w.bound_request(w.signer("ES256"));
    let facts = RequestFacts::from_check(&req, &Limits::default()).expect("facts");
    let mut g = c.benchmark_group("cedar");
    for n in POLICY_COUNTS {
        let engine = w.engine(&format!("policies-{n}"), None);
        assert_eq!(engine.policy_count(), n);
        // The first decision fills the caches: the identity is warm from here on.
        assert_allowed(&engine.decide(&facts, SystemTime::now()), "cedar");
        assert_eq!(engine.cached_tokens(), 1);
        g.bench_function(format!("policies/{n}"), |b| {
            b.iter(|| engine.decide(black_box(&facts), SystemTime::now()))
        });
    }
    g.finish();
}

/// The parts of a warm decision, to see where its time goes.
fn bench_stages(c: &mut C, w: &World) {
    let s = w.settings("policies-10", None);
    let req = w.bound_request(w.signer("ES256"));
    let facts = RequestFacts::from_check(&req, &Limits::default()).expect("facts");
    let peer = PeerVerifier::load(s.peer.as_ref().expect("[peer]"), 1000).expect("peer");
    let tokens = TokenVerifier::load(&s.issuers, &s.token, 1000).expect("tokens");
    let verifier = Verifier::new(tokens, Default::default(), Default::default());
    let now = SystemTime::now();
    let identity: Identity = verifier.verify(Some(&peer), &facts, now);
    assert!(matches!(identity.peer, PeerOutcome::Verified(_)));
    match &identity.token {
        TokenOutcome::Verified(t) => assert!(t.bound(), "the token is bound"),
        other => panic!("stage: token not verified: {other:?}"),
    }
    let snapshot = portcullis::policy::load(&s.policy).expect("policies");
    let outcome = snapshot.evaluate(&facts, &identity, std::time::SystemTime::now());
    assert!(outcome.allowed && outcome.errors.is_empty(), "{outcome:?}");

    // What a cache hit of the certificate verifier still does before its lookup: undo
    // Envoy's percent-encoding and decode the PEM (then SHA-256 of the DER).
    let encoded = w.cert.envoy_encoded();
    let decode = |encoded: &str| {
        use rustls_pki_types::pem::PemObject;
        let pem = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .expect("UTF-8");
        rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM")
    };
    assert_eq!(
        decode(&encoded),
        [rustls_pki_types::CertificateDer::from(w.cert.der.clone())]
    );

    let mut g = c.benchmark_group("stage");
    g.bench_function("cert/decode", |b| b.iter(|| decode(black_box(&encoded))));
    g.bench_function("identity/warm", |b| {
        b.iter(|| verifier.verify(Some(&peer), black_box(&facts), SystemTime::now()))
    });
    g.bench_function("cedar/map_request", |b| {
        b.iter(|| portcullis::policy::map_request(black_box(&facts), &identity))
    });
    g.bench_function("cedar/evaluate/10", |b| {
        b.iter(|| snapshot.evaluate(black_box(&facts), &identity, std::time::SystemTime::now()))
    });
    g.finish();
}

fn bench_decision(c: &mut C, w: &World) {
    let mut g = c.benchmark_group("decision");
    let warm = w.engine("policies-10", None);
    let req = w.bound_request(w.signer("ES256"));
    assert_allowed(&warm.check(&req, SystemTime::now()), "decision/warm");
    assert_eq!(warm.cached_tokens(), 1);
    g.bench_function("warm", |b| {
        b.iter(|| warm.check(black_box(&req), SystemTime::now()))
    });
    let cold = w.engine("policies-10", Some((0, 0)));
    for signer in &w.signers {
        let req = w.bound_request(signer);
        assert_allowed(
            &cold.check(&req, SystemTime::now()),
            &format!("decision/cold/{}", signer.name),
        );
        assert_eq!(cold.cached_tokens(), 0);
        g.bench_function(format!("cold/{}", signer.name), |b| {
            b.iter(|| cold.check(black_box(&req), SystemTime::now()))
        });
    }
    g.finish();
}

/// The peak and current resident memory of this process, from `/proc/self/status`.
fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    format!("RSS {}, peak {}", field("VmRSS:"), field("VmHWM:"))
}

/// `decision/warm` against growing static entity sets and growing policy sets of which the
/// request can match the same few. Each engine is built, checked and reported the first
/// time its benchmark runs (criterion times only `iter`), and dropped before the next.
fn bench_scale(c: &mut C, w: &World) {
    let req = w.bound_request(w.signer("ES256"));
    let mut g = c.benchmark_group("scale");
    for n in ENTITY_COUNTS {
        let engine = OnceCell::new();
        g.bench_function(format!("entities/{n}"), |b| {
            let engine = engine.get_or_init(|| {
                let name = format!("entities-{n}.json");
                let start = Instant::now();
                let text = entities(n);
                let (bytes, written) = (text.len(), start.elapsed());
                write(w.dir.path(), &name, &text);
                drop(text);
                let (engine, load) = w.scale_engine("policies-10", Some(&name));
                assert_eq!(engine.policy_count(), 10);
                let what = format!("scale/entities/{n}");
                assert_allowed(&engine.check(&req, SystemTime::now()), &what);
                assert_eq!(engine.cached_tokens(), 1);
                eprintln!(
                    "{what}: {bytes} bytes of entities written in {written:.2?}, engine loaded in {load:.2?}; {}",
                    memory()
                );
                engine
            });
            b.iter(|| engine.check(black_box(&req), SystemTime::now()))
        });
    }
    for n in SCOPED_POLICY_COUNTS {
        let engine = OnceCell::new();
        g.bench_function(format!("policies/{n}"), |b| {
            let engine = engine.get_or_init(|| {
                let dir = format!("scoped-{n}");
                write(
                    w.dir.path(),
                    &format!("{dir}/bench.cedar"),
                    &scoped_policies(n),
                );
                let (engine, load) = w.scale_engine(&dir, None);
                assert_eq!(engine.policy_count(), n);
                let what = format!("scale/policies/{n}");
                assert_allowed(&engine.check(&req, SystemTime::now()), &what);
                assert_eq!(engine.cached_tokens(), 1);
                eprintln!("{what}: engine loaded in {load:.2?}; {}", memory());
                engine
            });
            b.iter(|| engine.check(black_box(&req), SystemTime::now()))
        });
    }
    g.finish();
}

fn pipeline(c: &mut C) {
    let w = World::new();
    bench_facts(c, &w);
    bench_cert(c, &w);
    bench_jwt(c, &w);
    bench_cedar(c, &w);
    bench_stages(c, &w);
    bench_decision(c, &w);
    bench_scale(c, &w);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(Clock::from_env())
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40);
    targets = pipeline
}
criterion_main!(benches);
