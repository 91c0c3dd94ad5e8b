//! The world under test, written into a fresh temporary directory: a throwaway root and
//! intermediate CA, client certificates, an identity provider's signing keys and JWKS, Cedar
//! policies and a `portcullis.toml`. Out of it comes the request mix: Envoy-shaped
//! CheckRequests, pre-encoded, each with the answer Portcullis must give.

use jsonwebtoken::Algorithm;
use portcullis::demo::{Authority, ClientCert, LeafSpec, TokenSigner, jwks, unix_now};
use portcullis::proto::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use prost::Message;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tonic::codegen::Bytes;

const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "orders";
const TRUST_DOMAIN: &str = "example.org";
/// Tokens live this long: longer than any sensible run, within `max_lifetime` below.
const TOKEN_LIFETIME_S: i64 = 3 * 3600;

/// The policies under load: permits for users and workloads, a forbid, and one permit that
/// needs the RFC 8705 binding, in the vocabulary of the shipped `policies/`.
pub const POLICIES: &str = r#"// Written by portcullis-load.

@id("users-read-api")
permit (principal in Group::"readers", action == Action::"GET", resource)
when { resource.path like "/api/*" };

@id("bound-writers-write-orders")
permit (principal in Group::"writers", action == Action::"POST", resource)
when { resource.path like "/api/orders/*" && context.binding };

@id("workloads-read-internal")
permit (principal is Workload, action == Action::"GET", resource)
when {
  resource.path like "/internal/*" &&
  context has peer && context.peer has trust_domain &&
  context.peer.trust_domain == "example.org"
};

@id("no-admin")
forbid (principal, action, resource)
when { resource.path like "/api/admin/*" };

@id("public-health")
permit (principal, action == Action::"GET", resource == Path::"/healthz");
"#;

/// What the world should hold, from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct WorldSpec {
    /// Distinct client certificates in the pool.
    pub certs: usize,
    /// Distinct valid tokens (one per user) in the pool.
    pub tokens: usize,
    /// Share of requests that must be denied, in [0, 1).
    pub deny_share: f64,
    /// Seed of the request order.
    pub seed: u64,
    /// Lines of the server's `[audit]` table (e.g. `fsync = "always"`), to measure what
    /// each audit guarantee costs.
    pub audit: Vec<String>,
}

/// One kind of request in the mix, with the answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A user's token bound to the workload certificate it arrives with (RFC 8705); GET or POST.
    BoundUser,
    /// A user's unbound token and no certificate.
    BearerUser,
    /// A user's unbound token over some workload's certificate.
    UserViaWorkload,
    /// A workload's certificate alone.
    Workload,
    /// A valid token on a path a forbid covers: 403.
    ForbiddenPath,
    /// A token signed by a key the issuer never published, under the issuer's `kid`: 401.
    ForgedToken,
    /// A token past its `exp`: 401.
    ExpiredToken,
}

impl Kind {
    /// The gRPC status code Portcullis must answer with.
    pub fn expected_code(self) -> i32 {
        match self {
            Kind::BoundUser | Kind::BearerUser | Kind::UserViaWorkload | Kind::Workload => 0,
            Kind::ForbiddenPath => 7,
            Kind::ForgedToken | Kind::ExpiredToken => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::BoundUser => "bound_user",
            Kind::BearerUser => "bearer_user",
            Kind::UserViaWorkload => "user_via_workload",
            Kind::Workload => "workload",
            Kind::ForbiddenPath => "forbidden_path",
            Kind::ForgedToken => "forged_token",
            Kind::ExpiredToken => "expired_token",
        }
    }

    fn uses_cert(self) -> bool {
        matches!(
            self,
            Kind::BoundUser | Kind::UserViaWorkload | Kind::Workload
        )
    }
}

/// One request ready to send: its encoded CheckRequest and the status it must get.
#[derive(Clone)]
pub struct Entry {
    pub bytes: Bytes,
    pub kind: Kind,
}

/// A certificate as the tool needs it: Envoy's encoding and the RFC 8705 thumbprint.
struct Cert {
    encoded: String,
    thumbprint: String,
}

impl From<ClientCert> for Cert {
    fn from(c: ClientCert) -> Cert {
        Cert {
            encoded: c.envoy_encoded(),
            thumbprint: c.thumbprint(),
        }
    }
}

/// The generated files and keys. Dropping it removes the directory.
pub struct World {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub spec: WorldSpec,
    inter: Authority,
    /// The issuer's two published keys; users alternate between them.
    signers: [TokenSigner; 2],
    /// A key nobody published, for forged tokens.
    rogue: TokenSigner,
    /// The shuffled kinds of one pass over the pool, which distinct mode repeats.
    template: Vec<(Kind, usize)>,
    /// Remove the directory when dropped.
    remove: bool,
}

impl Drop for World {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A small deterministic generator (SplitMix64), enough to shuffle the mix reproducibly.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

impl World {
    /// Creates the directory and writes the CA chain, JWKS, policies and configuration
    /// (gRPC on `grpc`). No certificate or token is generated yet.
    pub fn create(spec: WorldSpec, grpc: std::net::SocketAddr) -> Result<World, String> {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-load-{}-{}",
            std::process::id(),
            unix_now()
        ));
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::create_dir_all(dir.join("policies"))
            .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let root = Authority::root("portcullis-load root CA (throwaway)");
        let inter = root.intermediate("portcullis-load intermediate CA (throwaway)");
        let signers = [
            TokenSigner::generate(Algorithm::ES256, "idp-a"),
            TokenSigner::generate(Algorithm::ES256, "idp-b"),
        ];
        let rogue = TokenSigner::generate(Algorithm::ES256, "idp-a");
        let world = World {
            // Not beside the watched trust files: each write to a watched directory wakes
            // the file watcher, which a deployment avoids (/var/log, not /etc).
            audit: dir.join("logs/audit.log"),
            config: dir.join("portcullis.toml"),
            template: mix(&spec),
            dir,
            spec,
            inter,
            signers,
            rogue,
            remove: true,
        };
        // From here on, dropping `world` on an error removes the directory.
        let write = |name: &str, text: &str| {
            let path = world.dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| format!("{}: cannot write: {e}", path.display()))
        };
        write("ca.pem", &root.cert_pem())?;
        write("intermediate.pem", &world.inter.cert_pem())?;
        write(
            "idp.jwks.json",
            &jwks(&[&world.signers[0], &world.signers[1]]),
        )?;
        write("policies/load.cedar", POLICIES)?;
        write(
            "portcullis.toml",
            &config_text(grpc, &world.audit, &world.spec, &Extras::default()),
        )?;
        Ok(world)
    }

    /// Leaves the directory in place (for inspection) when dropped.
    pub fn keep(&mut self) {
        self.remove = false;
    }

    /// Requests in one pass over the pool.
    pub fn pass_len(&self) -> usize {
        self.template.len()
    }

    /// How many requests of each kind one pass holds.
    pub fn mix_counts(&self) -> std::collections::BTreeMap<Kind, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for (kind, _) in &self.template {
            *counts.entry(*kind).or_insert(0) += 1;
        }
        counts
    }

    /// The warm-cache pool: `certs` certificates and `tokens` valid tokens, each used at
    /// least once per pass, in the shuffled order of the template.
    pub fn pool(&self) -> Vec<Entry> {
        let now = unix_now();
        let certs: Vec<Cert> = parallel(self.spec.certs, |c| {
            self.inter
                .issue(&LeafSpec::spiffe(&pool_workload(c)))
                .into()
        });
        let tokens: Vec<String> = parallel(self.spec.tokens, |u| {
            let bound = is_bound(u).then(|| &certs[u % certs.len()]);
            self.user_token(&format!("user-{u:05}"), u, bound, now)
        });
        parallel(self.template.len(), |i| {
            let (kind, n) = self.template[i];
            // A bound token is only accepted with its certificate, so a forbidden-path
            // request carries the certificate when its user's token is bound.
            let cert = match kind {
                Kind::Workload => Some(&certs[n]),
                Kind::BoundUser | Kind::UserViaWorkload => Some(&certs[n % certs.len()]),
                Kind::ForbiddenPath if is_bound(n % tokens.len()) => {
                    Some(&certs[(n % tokens.len()) % certs.len()])
                }
                _ => None,
            };
            let token = match kind {
                Kind::Workload => None,
                Kind::ForgedToken | Kind::ExpiredToken => {
                    Some(self.bad_token(kind, &format!("user-{:05}", n % tokens.len()), n, now))
                }
                _ => Some(tokens[n % tokens.len()].clone()),
            };
            entry(kind, i as u64, cert, token.as_deref())
        })
    }

    /// `count` requests in the template's proportions, every certificate and token new:
    /// nothing in them can be in the server's caches.
    pub fn distinct(&self, count: usize, generation: u64) -> Vec<Entry> {
        let now = unix_now();
        parallel(count, |i| {
            let (kind, n) = self.template[i % self.template.len()];
            let id = format!("g{generation}-{i:07}");
            let cert = kind.uses_cert().then(|| self.cert(&id));
            let user = format!("user-{id}");
            let token = match kind {
                Kind::Workload => None,
                Kind::ForgedToken | Kind::ExpiredToken => Some(self.bad_token(kind, &user, n, now)),
                Kind::BoundUser => Some(self.user_token(&user, n, cert.as_ref(), now)),
                _ => Some(self.user_token(&user, n, None, now)),
            };
            entry(kind, i as u64, cert.as_ref(), token.as_deref())
        })
    }

    fn cert(&self, name: &str) -> Cert {
        self.inter.issue(&LeafSpec::spiffe(&spiffe_id(name))).into()
    }

    fn user_token(&self, sub: &str, n: usize, bound: Option<&Cert>, now: i64) -> String {
        let mut claims = claims(sub, now);
        if let Some(cert) = bound {
            claims["groups"] = json!(["readers", "writers"]);
            claims["cnf"] = json!({ "x5t#S256": cert.thumbprint });
        }
        self.signers[n % 2].sign(&claims)
    }

    fn bad_token(&self, kind: Kind, sub: &str, n: usize, now: i64) -> String {
        let mut claims = claims(sub, now);
        claims["jti"] = json!(format!("bad-{n}-{sub}"));
        if kind == Kind::ExpiredToken {
            claims["iat"] = json!(now - 2 * 3600);
            claims["exp"] = json!(now - 3600);
            self.signers[n % 2].sign(&claims)
        } else {
            self.rogue.sign(&claims)
        }
    }
}

fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/load/sa/{name}")
}

/// The SPIFFE ID (the `Workload` principal) of certificate `c` of the pool.
pub fn pool_workload(c: usize) -> String {
    spiffe_id(&format!("w{c:05}"))
}

fn claims(sub: &str, now: i64) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + TOKEN_LIFETIME_S,
        "groups": ["readers"], "scope": "orders:read", "email": format!("{sub}@example.org"),
        "jti": format!("jti-{sub}"),
    })
}

/// Half the users hold tokens bound to a workload certificate.
fn is_bound(user: usize) -> bool {
    user % 2 == 0
}

/// The kinds of one pass, shuffled: every user's token once, every certificate once on its
/// own, and enough denials (forbidden path, forged, expired, in turn) for `deny_share`.
fn mix(spec: &WorldSpec) -> Vec<(Kind, usize)> {
    let mut kinds: Vec<(Kind, usize)> = (0..spec.tokens)
        .map(|u| {
            let kind = if is_bound(u) {
                Kind::BoundUser
            } else if u % 4 == 1 {
                Kind::BearerUser
            } else {
                Kind::UserViaWorkload
            };
            (kind, u)
        })
        .chain((0..spec.certs).map(|c| (Kind::Workload, c)))
        .collect();
    let allowed = kinds.len() as f64;
    let denials = (allowed * spec.deny_share / (1.0 - spec.deny_share)).round() as usize;
    let deny_kinds = [Kind::ForbiddenPath, Kind::ForgedToken, Kind::ExpiredToken];
    kinds.extend((0..denials).map(|k| (deny_kinds[k % 3], k)));
    SplitMix(spec.seed).shuffle(&mut kinds);
    kinds
}

/// What the configuration holds beyond the load's own needs (the scale mode's).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// The admin listener (`/metrics`), to see reloads complete.
    pub admin: Option<std::net::SocketAddr>,
    /// Static entities in `entities.json`.
    pub entities: bool,
    /// `[limits] max_file_bytes`, for an entities file over the default cap.
    pub max_file_bytes: Option<u64>,
}

impl World {
    /// Rewrites `portcullis.toml`: gRPC on `grpc`, with `extras`.
    pub fn write_config(&self, grpc: std::net::SocketAddr, extras: &Extras) -> Result<(), String> {
        let text = config_text(grpc, &self.audit, &self.spec, extras);
        self.replace(&self.config, &text)
    }

    /// Replaces the file at `path` (inside the directory) with `text` in one step: written
    /// beside it under a name no watch reads, then renamed over it, as an operator's
    /// deployment would, so a watching server never reads half a file.
    pub fn replace(&self, path: &Path, text: &str) -> Result<(), String> {
        let temp = self.dir.join("replacing.tmp");
        std::fs::write(&temp, text)
            .map_err(|e| format!("{}: cannot write: {e}", temp.display()))?;
        std::fs::rename(&temp, path).map_err(|e| {
            format!(
                "{}: cannot rename to {}: {e}",
                temp.display(),
                path.display()
            )
        })
    }
}

/// The method and path a request of `kind` asks for.
fn target(kind: Kind, seq: u64) -> (&'static str, String) {
    match kind {
        Kind::BoundUser if seq % 3 == 0 => ("POST", format!("/api/orders/{seq}")),
        Kind::BoundUser => ("GET", format!("/api/orders/{seq}?expand=items")),
        Kind::BearerUser | Kind::UserViaWorkload => {
            ("GET", format!("/api/catalog/items/{seq}?page=2"))
        }
        Kind::Workload => ("GET", format!("/internal/inventory/{seq}")),
        Kind::ForbiddenPath => ("GET", format!("/api/admin/users/{seq}")),
        Kind::ForgedToken | Kind::ExpiredToken => ("GET", format!("/api/orders/{seq}")),
    }
}

/// An encoded CheckRequest as Envoy builds it (see tests/common `request()`), with the
/// headers a browser-facing Envoy typically forwards.
fn entry(kind: Kind, seq: u64, cert: Option<&Cert>, token: Option<&str>) -> Entry {
    let (method, path) = target(kind, seq);
    let mut http = attribute_context::HttpRequest {
        id: format!("{seq:016x}"),
        method: method.into(),
        path: path.clone(),
        host: "api.example.org".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        ..Default::default()
    };
    for (k, v) in [
        (":method", method),
        (":path", path.as_str()),
        (":authority", "api.example.org"),
        (":scheme", "https"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) portcullis-load",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("x-forwarded-proto", "https"),
    ] {
        http.headers.insert(k.into(), v.into());
    }
    http.headers
        .insert("x-request-id".into(), format!("{seq:032x}"));
    if let Some(t) = token {
        http.headers
            .insert("authorization".into(), format!("Bearer {t}"));
    }
    let socket = |ip: String, port: u32| Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip,
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    };
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(socket(
                    format!("10.1.{}.{}", (seq >> 8) % 256, seq % 256),
                    40_000 + (seq % 20_000) as u32,
                )),
                certificate: cert.map(|c| c.encoded.clone()).unwrap_or_default(),
                ..Default::default()
            }),
            destination: Some(attribute_context::Peer {
                address: Some(socket("10.0.0.2".into(), 8443)),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    };
    Entry {
        bytes: Bytes::from(request.encode_to_vec()),
        kind,
    }
}

/// `f(0..count)` on every available core (generation is signing-bound), in order.
fn parallel<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = count.div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                // A panic in generation is a bug in this tool; surface it as is.
                h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect::<Vec<T>>()
    })
}

/// The configuration under test: the repository's defaults except where a load test needs
/// otherwise (a fixed port, an audit file, caches at least as large as the pool), and the
/// `extras` of the scale mode.
fn config_text(
    grpc: std::net::SocketAddr,
    audit: &Path,
    spec: &WorldSpec,
    extras: &Extras,
) -> String {
    let (tokens, certs) = (spec.tokens, spec.certs);
    let audit_table = if spec.audit.is_empty() {
        String::new()
    } else {
        format!("\n[audit]\n{}\n", spec.audit.join("\n"))
    };
    let admin = extras
        .admin
        .map(|a| format!("http = \"{a}\"\n"))
        .unwrap_or_default();
    let entities = if extras.entities {
        "entities = \"entities.json\"\n"
    } else {
        ""
    };
    let limits = extras
        .max_file_bytes
        .map(|b| format!("\n[limits]\nmax_file_bytes = {b}\n"))
        .unwrap_or_default();
    format!(
        r#"# Written by portcullis-load.
[server]
grpc = "{grpc}"
{admin}
[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["{TRUST_DOMAIN}"]

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256"]
max_lifetime = "4h"

[policy]
dir = "policies"
{entities}
[cache]
tokens = {tokens_cache}
certificates = {certs_cache}

[log]
audit = "{audit}"
{audit_table}{limits}"#,
        tokens_cache = tokens.max(10_000),
        certs_cache = certs.max(10_000),
        audit = audit.display(),
    )
}
